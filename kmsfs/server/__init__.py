"""Running kmsfs as a service: config files, systemd notification, status, metrics.

Nothing here is needed by the filesystem itself; the CLI and the daemon call
into it.  Modules: ``config`` (``/etc/kmsfs/NAME.toml``), ``notify``
(sd_notify), ``logs`` (journald-aware stderr logging), ``stats`` (figures of a
running mount), ``status`` (the control socket and its client), ``metrics``
(Prometheus), ``runtime`` (what the daemon runs beside the FUSE loop),
``mountpoint`` (stale-mount recovery).
"""
