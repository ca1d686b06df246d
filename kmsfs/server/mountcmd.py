"""The server side of ``kmsfs mount``: config-file values, stale mounts, the runtime.

``kmsfs.cli.mount`` calls ``prepare_mount`` after click has merged the command
line with ``--config`` (the file's values are click defaults, so the command
line wins; see ``kmsfs.server.config``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from kmsfs.backing.shared import DEFAULT_LOCK_TIMEOUT, DEFAULT_SHARED_TIMEOUT
from kmsfs.errors import UsageError
from kmsfs.policy import Policy
from kmsfs.server.config import check_volume_provider, current_config
from kmsfs.server.mountpoint import recover_stale_mount
from kmsfs.server.runtime import ServerRuntime


@dataclass
class MountPlan:
    """Everything ``kmsfs mount`` decided, for kmsfs/server/launch.py.

    Attributes: backing and mountpoint (absolute), extra (FUSE options: the
    config file's, then the command line's), runtime (status, metrics, notify),
    key_options (what the providers read: this host's key options), prompt
    (asks for a passphrase or PIN, or None), cache_max_entries/cache_max_age
    (None: defaults), audit_log (absolute, or None), log_level, log_file,
    policy (the config file's access policy, or None: permit all),
    config_file (absolute: re-read for the policy on reload, after the daemon
    has left the working directory), shared (``-o shared``: other daemons may
    serve the volume at once), shared_timeout (entry and attribute seconds in
    shared mode) and shared_lock_timeout (seconds a request waits for another
    daemon's byte-range lock before it fails with EIO), auto_rekey (``-o auto_rekey``:
    a format-1 file whose key reaches the usage warning is re-keyed online).
    """

    backing: str
    mountpoint: str
    extra: list[str]
    runtime: ServerRuntime
    key_options: dict[str, Any] = field(default_factory=dict)
    prompt: Callable[[str, bool], str] | None = None
    cache_max_entries: int | None = None
    cache_max_age: float | None = None
    audit_log: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    policy: Policy | None = None
    config_file: str | None = None
    shared: bool = False
    shared_timeout: float = DEFAULT_SHARED_TIMEOUT
    shared_lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    auto_rekey: bool = False


def mount_server_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--config FILE`` and ``--metrics-listen HOST:PORT`` for ``kmsfs mount``."""
    from kmsfs.server.config import config_option

    func = click.option(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=None,
        help="Serve Prometheus metrics here (needs kmsfs[metrics]; port 0 picks one).",
    )(func)
    return config_option(func)


def prepare_mount(
    backing: str | None,
    mountpoint: str | None,
    mount_options: tuple[str, ...],
    kwargs: dict[str, Any],
) -> MountPlan:
    """Resolve what to mount; pops this module's options from *kwargs*.

    Raises UsageError if BACKING or MOUNTPOINT is given nowhere, ConfigError if
    the config file's provider does not fit the volume or metrics cannot work,
    MountError if a stale mount at MOUNTPOINT cannot be detached.
    """
    config = current_config()
    metrics_listen = kwargs.pop("metrics_listen", None)
    if backing is None or mountpoint is None:
        missing = " and ".join(
            name for name, value in (("BACKING", backing), ("MOUNTPOINT", mountpoint)) if not value
        )
        raise UsageError(
            f"{missing} missing: give it on the command line or in the config file"
            " (backing = ..., mountpoint = ...)"
        )
    backing = os.path.abspath(backing)
    mountpoint = os.path.abspath(mountpoint)
    extra = [*(config.mount_options if config else ())]
    extra += [o for opts in mount_options for o in opts.split(",") if o]
    if config is not None:
        check_volume_provider(config, backing)
    extra, shared, shared_timeout, lock_timeout = split_shared_options(extra)
    auto_rekey = "auto_rekey" in extra
    extra = [option for option in extra if option != "auto_rekey"]
    runtime = ServerRuntime(mountpoint, metrics_listen)
    runtime.check()
    problem = runtime.socket_problem()
    if problem is not None:
        click.echo(f"kmsfs: warning: {problem}; this mount has no status socket", err=True)
    if recover_stale_mount(mountpoint):
        click.echo(
            f"kmsfs: detached the stale mount at {mountpoint} (its daemon had died)", err=True
        )
    return MountPlan(
        backing,
        mountpoint,
        extra,
        runtime,
        policy=config.policy if config is not None else None,
        config_file=os.path.abspath(config.path) if config is not None else None,
        shared=shared,
        shared_timeout=shared_timeout,
        shared_lock_timeout=lock_timeout,
        auto_rekey=auto_rekey,
    )


MAX_SHARED_TIMEOUT = 60.0
LOCK_TIMEOUT_RANGE = (0.1, 600.0)


def split_shared_options(options: list[str]) -> tuple[list[str], bool, float, float]:
    """Take ``shared``, ``shared_timeout=SECONDS`` and ``shared_lock_timeout=SECONDS``
    out of the FUSE options.

    Returns (the other options, shared, timeout, lock timeout).  UsageError for a
    timeout that is not a number from 0 to 60, a lock timeout that is not one from
    0.1 to 600, or either given without ``shared``.
    """
    rest: list[str] = []
    shared = False
    given: dict[str, float] = {}
    ranges = {
        "shared_timeout": (0.0, MAX_SHARED_TIMEOUT),
        "shared_lock_timeout": LOCK_TIMEOUT_RANGE,
    }
    for option in options:
        name, equals, text = option.partition("=")
        if option == "shared":
            shared = True
        elif name in ranges and equals:
            low, high = ranges[name]
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            if not low <= value <= high:
                raise UsageError(f"-o {option}: give seconds from {low:g} to {high:g}")
            given[name] = value
        else:
            rest.append(option)
    if given and not shared:
        name = next(iter(given))
        raise UsageError(f"-o {name} applies to shared mode only: add -o shared")
    return (
        rest,
        shared,
        given.get("shared_timeout", DEFAULT_SHARED_TIMEOUT),
        given.get("shared_lock_timeout", DEFAULT_LOCK_TIMEOUT),
    )
