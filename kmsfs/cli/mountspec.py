"""``kmsfs mount``'s command line and config file, made into one MountSpec
(kmsfs/server/spec.py).

click has merged the command line with ``--config`` already (the file's values
are click defaults: kmsfs/cli/configfile.py).  What is not a click option is
merged here: the file's FUSE options first, then the command line's; shared
mode if either says so; a shared-mode timeout from the command line over the
file's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kmsfs.cli.configfile import current_config
from kmsfs.errors import UsageError
from kmsfs.keys.cache import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES
from kmsfs.keys.settings import HostOptions, host_options
from kmsfs.server.spec import SHARED_SECONDS, MountSpec, SharedMode, seconds_range_problem

if TYPE_CHECKING:
    from kmsfs.keys.secrets import Prompt
    from kmsfs.server.config import ServerConfig

_SHARED_FIELDS = {"shared_timeout": "timeout", "shared_lock_timeout": "lock_timeout"}


def mount_spec(
    backing: str | None,
    mountpoint: str | None,
    mount_options: tuple[str, ...],
    *,
    key_options: HostOptions | Mapping[str, Any],
    prompt: Prompt | None,
    cache_max_entries: int | None,
    cache_max_age: float | None,
    audit_log: str | None,
    metrics_listen: str | None,
    log_level: str,
    log_file: str | None,
) -> MountSpec:
    """The spec of the mount the command asks for (None: a default).

    Raises UsageError if BACKING or MOUNTPOINT is given nowhere or a shared-mode
    option is wrong (``shared_mode``), ConfigError if the config file's provider
    does not fit the volume.
    """
    config = current_config()
    if backing is None or mountpoint is None:
        missing = " and ".join(
            name for name, value in (("BACKING", backing), ("MOUNTPOINT", mountpoint)) if not value
        )
        raise UsageError(
            f"{missing} missing: give it on the command line or in the config file"
            " (backing = ..., mountpoint = ...)"
        )
    backing = os.path.abspath(backing)
    options = [*(config.mount_options if config else ())]
    options += [o for opts in mount_options for o in opts.split(",") if o]
    if config is not None:
        from kmsfs.server.config import check_volume_provider

        check_volume_provider(config, backing)
    fuse_options, shared = shared_mode(options, config)
    auto_rekey = "auto_rekey" in fuse_options
    fuse_options = [option for option in fuse_options if option != "auto_rekey"]
    return MountSpec(
        backing,
        os.path.abspath(mountpoint),
        tuple(fuse_options),
        shared,
        key_options=host_options(key_options),
        prompt=prompt,
        cache_max_entries=DEFAULT_MAX_ENTRIES if cache_max_entries is None else cache_max_entries,
        cache_max_age=DEFAULT_MAX_AGE if cache_max_age is None else cache_max_age,
        audit_log=os.path.abspath(audit_log) if audit_log else None,
        metrics_listen=metrics_listen,
        log_level=log_level,
        log_file=log_file,
        policy=config.policy if config is not None else None,
        config_file=os.path.abspath(config.path) if config is not None else None,
        auto_rekey=auto_rekey,
    )


def shared_mode(
    options: list[str], config: ServerConfig | None = None
) -> tuple[list[str], SharedMode | None]:
    """Take ``shared``, ``shared_timeout=SECONDS`` and ``shared_lock_timeout=SECONDS``
    out of the FUSE *options*, over what the config file says of shared mode.

    Returns (the other options, the shared-mode settings or None: not shared).
    UsageError for a timeout that is not a number in its range (kmsfs/server/spec.py:
    0 to 60, and 0.1 to 600 for the lock timeout), or one given without ``shared``.
    """
    rest: list[str] = []
    shared = bool(config is not None and config.shared)
    given: dict[str, float] = {}
    if config is not None:
        from_file = {
            "shared_timeout": config.shared_timeout,
            "shared_lock_timeout": config.shared_lock_timeout,
        }
        given = {name: value for name, value in from_file.items() if value is not None}
    for option in options:
        name, equals, text = option.partition("=")
        if option == "shared":
            shared = True
        elif name in SHARED_SECONDS and equals:
            try:
                value = float(text)
            except ValueError:
                value = math.nan  # in no range
            problem = seconds_range_problem(name, value)
            if problem is not None:
                raise UsageError(f"-o {option}: {problem}")
            given[name] = value
        else:
            rest.append(option)
    if not shared:
        if given:
            name = next(iter(given))
            raise UsageError(f"-o {name} applies to shared mode only: add -o shared")
        return rest, None
    return rest, SharedMode(**{_SHARED_FIELDS[name]: value for name, value in given.items()})
