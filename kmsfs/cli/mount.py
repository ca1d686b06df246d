"""``kmsfs mount``, ``umount`` and ``status``: a volume served by a daemon."""

from __future__ import annotations

import json
import os
import subprocess

import click

from kmsfs.cli.common import handle_errors, key_option_values, key_options, prompt_secret
from kmsfs.cli.configfile import config_option
from kmsfs.errors import MountError, UsageError


@click.command()
@click.argument("backing", required=False, type=click.Path(file_okay=False, exists=True))
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option(
    "-o",
    "mount_options",
    multiple=True,
    help="Mount options, comma-separated (allow_other, ro, nonempty, ...).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option("--log-file", type=click.Path(dir_okay=False), help="Log here instead of stderr.")
@click.option("--cache-max-entries", type=int, default=None, help="Unwrapped-key cache size.")
@click.option(
    "--cache-max-age", type=float, default=None, help="Seconds an unwrapped key stays cached."
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False),
    help="Append one JSON line per key use and per open or create to this file"
    " (default: no audit log).",
)
@config_option
@click.option(
    "--metrics-listen",
    metavar="HOST:PORT",
    default=None,
    help="Serve Prometheus metrics here (needs kmsfs[metrics]; port 0 picks one).",
)
@key_options(for_init=False)
@handle_errors
def mount(
    backing: str | None,
    mountpoint: str | None,
    foreground: bool,
    mount_options: tuple[str, ...],
    log_level: str,
    log_file: str | None,
    cache_max_entries: int | None,
    cache_max_age: float | None,
    audit_log: str | None,
    metrics_listen: str | None,
    **kwargs: object,
) -> None:
    """Mount the volume in BACKING at MOUNTPOINT.

    Without --foreground, returns once the mount answers (exit 0) or failed.
    With --config FILE, BACKING, MOUNTPOINT and other settings may come from
    the file; the command line wins.  A stale mount left at MOUNTPOINT by a
    daemon that died is detached first.
    """
    from kmsfs.cli.mountspec import mount_spec
    from kmsfs.server.launch import preflight, run_foreground, run_in_background

    spec = mount_spec(
        backing,
        mountpoint,
        mount_options,
        key_options=key_option_values(kwargs),
        prompt=prompt_secret,
        cache_max_entries=cache_max_entries,
        cache_max_age=cache_max_age,
        audit_log=audit_log,
        metrics_listen=metrics_listen,
        log_level=log_level,
        log_file=log_file,
    )
    preflight(spec, lambda line: click.echo(line, err=True))
    if foreground:
        run_foreground(spec)
        return
    pid = run_in_background(spec)
    click.echo(f"mounted {spec.backing} at {spec.mountpoint} (daemon pid {pid})")


@click.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if the mount is busy.")
@config_option
@handle_errors
def umount(mountpoint: str | None, lazy: bool) -> None:
    """Unmount MOUNTPOINT (also clears a stale mount left by a dead daemon).

    With --config FILE, MOUNTPOINT may come from the file.
    """
    from kmsfs.server.mountpoint import is_stale

    if mountpoint is None:
        raise UsageError("MOUNTPOINT missing: give it or --config FILE")
    if not os.path.exists(mountpoint) and not is_stale(mountpoint):
        raise MountError(f"cannot unmount {mountpoint}: no such directory")
    if not os.path.ismount(mountpoint) and not is_stale(mountpoint):
        raise MountError(f"{mountpoint} is not mounted (nothing to unmount)")
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().replace("fusermount3: ", "") or "fusermount3 failed"
        raise MountError(f"cannot unmount {mountpoint}: {reason}")


@click.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys, for scripts).")
@config_option
@handle_errors
def status(mountpoint: str | None, as_json: bool) -> None:
    """Show the state of the mount at MOUNTPOINT: volume, keys, key cache, I/O, uptime.

    Exit 7 if no daemon answers for MOUNTPOINT.
    """
    from kmsfs.server.status import format_status, query

    if mountpoint is None:
        raise UsageError("MOUNTPOINT missing: give it or --config FILE")
    info = query(os.path.abspath(mountpoint))
    click.echo(json.dumps(info, indent=2) if as_json else format_status(info))
