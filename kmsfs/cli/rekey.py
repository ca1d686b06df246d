"""``kmsfs rekey``: re-encrypt file contents under fresh file keys, offline or online.

On an unmounted volume this process does it (kmsfs/lifecycle/rekey.py, key options
needed).  On a mounted one the daemon does it while the volume stays in use
(docs/DESIGN.md "Online rekey"): this command hands the job over through the control
socket and returns, or follows it (``--wait``); ``--pause``, ``--resume``, ``--cancel``
and ``--status`` control it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kmsfs.cli.common import (
    handle_errors,
    key_option_values,
    key_options,
    parse_duration,
    progress_flag,
    prompt_secret,
    quiet_option,
)
from kmsfs.cli.configfile import config_option, current_config
from kmsfs.errors import KmsfsError, UsageError

if TYPE_CHECKING:
    from kmsfs.lifecycle.selection import Selection

WAIT_POLL = 1.0  # seconds between two looks at a job --wait follows
WAIT_REPORT = 10.0  # seconds between two progress lines --wait prints
FAILED = 1


@click.command()
@click.argument("target", required=False, type=click.Path(file_okay=False, exists=True))
@key_options(for_init=False)
@click.option("--older-than", help="Only files whose key is older (90d, 12h, 2w, 1y...).")
@click.option(
    "--master-key",
    "master_keys",
    multiple=True,
    metavar="KEY_REF",
    help="Only files with a key wrapped by this master key, as 'kmsfs keys list' names it"
    " (repeat for several).",
)
@click.option(
    "--path",
    "paths",
    multiple=True,
    metavar="PATH",
    help="Only this path in the volume and what is below it, e.g. /projects/a (repeat for"
    " several).",
)
@click.option(
    "--sealed-more-than",
    type=click.IntRange(min=0),
    metavar="N",
    help="Mounted volume: only files whose key has sealed more than N blocks (the daemon's count).",
)
@click.option("--max-mbps", type=click.FloatRange(min=0, min_open=True), metavar="MB/S",
              help="Mounted volume: re-encrypt at most this many MB a second.")  # fmt: skip
@click.option("--max-files-per-second", type=click.FloatRange(min=0, min_open=True),
              metavar="N", help="Mounted volume: re-key at most N files a second.")  # fmt: skip
@click.option(
    "--wait", is_flag=True, help="Mounted volume: follow the job until it ends (offline: always)."
)
@click.option("--pause", "action", flag_value="pause", help="Pause the job of a mounted volume.")
@click.option("--resume", "action", flag_value="resume", help="Resume a paused or stopped job.")
@click.option("--cancel", "action", flag_value="cancel", help="Cancel the job (files done stay).")
@click.option("--status", "action", flag_value="status", help="Show the job of a mounted volume.")
@click.option("--json", "as_json", is_flag=True, help="Mounted volume: print the job as JSON.")
@quiet_option
@config_option
@handle_errors
def rekey(
    target: str | None,
    older_than: str | None,
    master_keys: tuple[str, ...],
    paths: tuple[str, ...],
    sealed_more_than: int | None,
    max_mbps: float | None,
    max_files_per_second: float | None,
    wait: bool,
    action: str | None,
    as_json: bool,
    quiet: bool,
    **kwargs: Any,
) -> None:
    """Re-encrypt file contents of TARGET under fresh file keys (file format 2).

    TARGET is a backing directory or a mount point (with --config FILE: the
    file's mount point if it is mounted, else its backing directory, for a
    timer that rotates keys whether or not the volume is in use).  Mounted, the
    daemon re-keys
    the files while they stay in use: this command starts the job and returns
    (--wait follows it; exit 1 if files failed); --pause, --resume, --cancel and
    --status control it, and the job resumes at the next mount if the daemon
    stops.  Unmounted, this command re-keys them (key options needed): crash-safe
    and resumable (run it again); keeps hard links, owner, mode, times and xattrs.
    Exit 7 if the volume is mounted in shared mode (it names the daemons).
    """
    from kmsfs.lifecycle.selection import Selection

    selection = Selection.of(
        parse_duration(older_than) if older_than else None, master_keys, paths, sealed_more_than
    )
    target, mountpoint = _target(target)
    if mountpoint is None:
        if action is not None:
            raise UsageError(
                f"{target} is not mounted: --pause, --resume, --cancel and --status apply to"
                " the job of a mounted volume's daemon"
            )
        if max_mbps or max_files_per_second:  # so one command line serves both (the timer)
            click.echo(
                f"kmsfs: {target} is not mounted: re-keying offline, without rate limits",
                err=True,
            )
        if sealed_more_than is not None:
            raise UsageError("--sealed-more-than needs the daemon's counts: give a mounted volume")
        _offline(target, selection, quiet, kwargs)
        return
    if action is not None:
        reply = _ask(mountpoint, f"rekey-{action}")
    else:
        asked = {
            "selection": selection.to_json(),
            "max_mbps": max_mbps,
            "max_files_per_second": max_files_per_second,
        }
        reply = _ask(mountpoint, "rekey-start " + json.dumps(asked))
        if not as_json:
            click.echo(f"rekey started by the daemon of {mountpoint}: {selection.describe()}")
    if wait:
        reply = _follow(mountpoint, quiet)
    _show(reply, as_json, action is None and not wait)
    job = (reply.get("rekey") or {}).get("job") or {}
    if wait and (job.get("files_failed") or job.get("state") in ("failed", "cancelled")):
        sys.exit(FAILED)


def _target(target: str | None) -> tuple[str, str | None]:
    """(TARGET, the mount point serving it or None), TARGET from --config if not given;
    UsageError if there is none."""
    if target is not None:
        return target, _live_mount(target)
    config = current_config()
    if config is not None and config.mountpoint and os.path.isdir(config.mountpoint):
        mountpoint = _live_mount(config.mountpoint)
        if mountpoint is not None:
            return config.mountpoint, mountpoint
    if config is not None and config.backing:
        return config.backing, _live_mount(config.backing)
    raise UsageError("TARGET missing: give a backing directory or mount point, or --config FILE")


def _live_mount(target: str) -> str | None:
    """The mount point of the kmsfs mount that *target* is, or that serves the backing
    directory *target* on this host; None if there is none."""
    from kmsfs.backing.mounttable import KMSFS_FSTYPE, read_mountinfo
    from kmsfs.backing.volume_lock import mountpoints_of

    real = os.path.realpath(target)
    for entry in read_mountinfo():
        if entry.fstype == KMSFS_FSTYPE and entry.mountpoint == real:
            return real
    found = mountpoints_of(Path(target))
    return found[0] if found else None


def _ask(mountpoint: str, request: str) -> dict[str, Any]:
    """The daemon's answer to *request*; its refusal as an error with its exit code.
    VolumeMounted (exit 7) if no daemon answers for the mount."""
    from kmsfs.errors import MountError, VolumeMounted
    from kmsfs.server.status import query

    try:
        reply = query(mountpoint, request)
    except MountError as exc:
        raise VolumeMounted(
            f"the volume is mounted at {mountpoint}, whose daemon must do an online rekey,"
            f" but {exc}; an offline rekey needs the volume unmounted"
        ) from None
    if "refused" in reply:
        error = KmsfsError(f"the daemon of {mountpoint} refused: {reply['refused']}")
        error.exit_code = int(reply.get("exit_code") or 1)
        raise error
    return reply


def _follow(mountpoint: str, quiet: bool) -> dict[str, Any]:
    """Poll the job until it has ended; a progress line every WAIT_REPORT seconds."""
    from kmsfs.server.rekey_progress import format_rekey

    shown = time.monotonic()
    while True:
        reply = _ask(mountpoint, "rekey-status")
        job = (reply.get("rekey") or {}).get("job") or {}
        if job.get("state") in ("done", "cancelled", "failed", None):
            return reply
        if not quiet and time.monotonic() - shown >= WAIT_REPORT:
            shown = time.monotonic()
            click.echo(format_rekey(reply.get("rekey"))[0], err=True)
        time.sleep(WAIT_POLL)


def _show(reply: dict[str, Any], as_json: bool, brief: bool) -> None:
    from kmsfs.server.rekey_progress import format_rekey

    if as_json:
        click.echo(json.dumps(reply.get("rekey"), indent=2))
    elif not brief:
        for line in format_rekey(reply.get("rekey")) or ["rekey: no job"]:
            click.echo(line)


def _offline(target: str, selection: Selection, quiet: bool, kwargs: dict[str, Any]) -> None:
    from kmsfs.backing.tool_lock import refuse_if_mounted
    from kmsfs.keys.cache import NullCache
    from kmsfs.lifecycle.rekey import rekey_volume
    from kmsfs.volume_open import open_volume

    refuse_if_mounted(Path(target).absolute(), "rekey")
    config, keyring = open_volume(
        target, key_option_values(kwargs), prompt_secret, NullCache(), migrate=True
    )
    try:
        report = rekey_volume(target, config, keyring, selection, progress_flag(quiet))
    finally:
        keyring.close()
    for rel, message in report.skipped:
        click.echo(f"skipped {rel}: {message}", err=True)
    for rel, message in report.problems:
        click.echo(f"FAILED {rel}: {message}", err=True)
    click.echo(
        f"rekey: {report.files} files, {report.rekeyed} re-keyed ({report.bytes:,} bytes),"
        f" {report.not_due} not due, {len(report.skipped)} skipped,"
        f" {len(report.problems)} failed, in {report.seconds:.1f} s"
    )
    if report.problems:
        sys.exit(FAILED)
