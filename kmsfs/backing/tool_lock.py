"""The volume lock as the offline tools use it: refuse while the volume is mounted or
served in shared mode, hold the lock for a run, name who uses the volume (no FUSE).

Each refusal is VolumeMounted (exit 7) with a message naming the tool, the mount
point or the daemons (kmsfs/backing/volume_lock.py keeps the lock and the
registrations themselves).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kmsfs.backing.volume_lock import daemons_serving, lock_volume, mountpoints_of, volume_in_use
from kmsfs.errors import MountError, VolumeMounted


def in_use_by(backing: Path) -> str | None:
    """None if the volume is not in use (``volume_in_use``); else who: the mount point
    if the kernel's mount table names one, else the registered daemons (shared mode,
    other hosts), else 'another kmsfs process'."""
    if not volume_in_use(backing):
        return None
    where = mountpoints_of(backing)
    if where:
        return where[0]
    daemons = daemons_serving(backing)
    return "; ".join(map(str, daemons)) if daemons else "another kmsfs process"


def refuse_if_shared(backing: Path, tool: str) -> None:
    """VolumeMounted (exit 7) naming them while daemons serve the volume in shared
    mode: *tool* rewrites headers, and does not coordinate with daemons on other hosts."""
    shared = [daemon for daemon in daemons_serving(backing) if daemon.shared]
    if shared:
        names = "; ".join(map(str, shared))
        raise VolumeMounted(
            f"{backing} is served in shared mode by {names}: {tool} does not coordinate with"
            " daemons on other hosts, so it refuses; unmount every one of them first"
        )


def _in_use_message(backing: Path, tool: str) -> str:
    where = mountpoints_of(backing)
    daemons = daemons_serving(backing)
    names = "; ".join(map(str, daemons))
    if where:
        also = f"; daemons registered: {names}" if len(daemons) > 1 else ""
        return (
            f"{backing} is mounted at {where[0]}: {tool} works on an unmounted volume"
            f" (kmsfs umount {where[0]} first{also})"
        )
    if daemons:
        return (
            f"{backing} is served by {names}: {tool} works on an unmounted volume"
            " (unmount every daemon listed first)"
        )
    return (
        f"{backing} is in use by another kmsfs process (a daemon or a tool holds its lock):"
        f" {tool} works on an unmounted volume"
    )


def refuse_if_mounted(backing: Path, tool: str) -> None:
    """VolumeMounted (exit 7) while a daemon (or another tool) holds the volume lock, or
    the kernel's mount table has a kmsfs mount of it."""
    if volume_in_use(backing):
        raise VolumeMounted(_in_use_message(backing, tool))


@contextmanager
def volume_locked(backing: Path, tool: str) -> Iterator[None]:
    """Hold the volume lock for the block: no daemon can mount the volume meanwhile.
    VolumeMounted (exit 7) if a daemon or another tool holds it."""
    try:
        fd = lock_volume(backing)
    except MountError:
        raise VolumeMounted(_in_use_message(backing, tool)) from None
    try:
        yield
    finally:
        os.close(fd)
