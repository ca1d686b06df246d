"""Running a mount: from the MountSpec the command line made to a served volume.

Where a mount is built: ``launch`` (checks before anything starts, the process
settings, foreground or a forked daemon) calls ``assembly.serve_mount(spec)``,
which builds every part once and hands the operations to ``daemon.serve`` (the
FUSE session).  The rest: ``spec`` (the MountSpec), ``config``
(``/etc/kmsfs/NAME.toml``), ``runtime`` (what the daemon runs beside the FUSE
loop), ``status`` (the control socket and its client), ``stats`` (figures of
a running mount), ``metrics`` (Prometheus), ``notify`` (sd_notify), ``logs``
(journald-aware stderr logging), ``policyfile`` (policy reloads),
``mountpoint`` (mount point checks, stale-mount recovery), ``rundir`` (the
runtime directory).
"""
