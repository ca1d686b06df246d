"""Shared pieces of the lifecycle tools: headers on descriptors, journals, the volume
lock and mount names, birth times, durations and the progress bar.

Walking the backing tree is ``kmsfs.backing.tree`` (by descriptor, never following a
symlink); everything here works on the descriptors it hands out.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import click

from kmsfs.backing.durable import replace_durably
from kmsfs.backing.header_xattr import read_raw_header
from kmsfs.backing.tree import FILE_FLAGS, open_root, open_state_dir
from kmsfs.backing.volume_lock import daemons_serving, lock_volume, mountpoints_of, volume_in_use
from kmsfs.errors import HeaderChanged, LifecycleError, MountError, VolumeMounted
from kmsfs.format.header import XATTR_NAME
from kmsfs.format.volume_config import STATE_DIR_NAME

MAX_JOURNAL_SIZE = 1 << 20


# -- headers -----------------------------------------------------------------


def replace_header(fd: int, expected: bytes | None, header: bytes, what: str) -> None:
    """Compare-and-swap the header of the open file *fd*: set *header* only if the
    header is still byte-identical to *expected* (None: the file has none).

    One setxattr replaces the value whole, so a crash leaves the old header or the
    new one.  Working on the descriptor the header was read from, the write can only
    reach the inode that was read, whatever is renamed meanwhile.  HeaderChanged if
    the header differs from *expected* (nothing written); ENODATA if it vanished
    between the check and the write.
    """
    if read_raw_header(fd) != expected:
        raise HeaderChanged("its header changed while the tool ran: left as it is", where=what)
    flags = os.XATTR_CREATE if expected is None else os.XATTR_REPLACE
    os.setxattr(fd, XATTR_NAME, header, flags)


# -- journals ----------------------------------------------------------------


@contextmanager
def _state(backing: Path, create: bool) -> Iterator[int | None]:
    """The descriptor of ``.kmsfs.d`` (None if absent and not *create*)."""
    root = open_root(backing)
    try:
        try:
            state = open_state_dir(root, create)
        except OSError as exc:
            raise LifecycleError(
                f"{backing}/{STATE_DIR_NAME}: {exc.strerror} (kmsfs never follows a symlink there)"
            ) from None
    finally:
        os.close(root)
    try:
        yield state
    finally:
        if state is not None:
            os.close(state)


def load_journal(backing: Path, name: str) -> dict[str, Any] | None:
    where = f"{backing}/{STATE_DIR_NAME}/{name}.json"
    with _state(backing, create=False) as state:
        if state is None:
            return None
        try:
            fd = os.open(f"{name}.json", os.O_RDONLY | FILE_FLAGS, dir_fd=state)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LifecycleError(f"cannot read journal {where}: {exc.strerror}") from None
        try:
            raw = os.read(fd, MAX_JOURNAL_SIZE + 1)
        finally:
            os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LifecycleError(f"cannot read journal {where}: {exc}") from None
    if not isinstance(data, dict):
        raise LifecycleError(f"journal {where} is not a JSON object")
    return data


def save_journal(backing: Path, name: str, data: dict[str, Any]) -> None:
    """Write the journal atomically and durably (temp file, fsync, rename, fsync dir)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    with _state(backing, create=True) as state:
        assert state is not None
        replace_durably(state, f"{name}.json", text.encode())


def drop_journal(backing: Path, name: str) -> None:
    with _state(backing, create=False) as state:
        if state is None:
            return
        try:
            os.unlink(f"{name}.json", dir_fd=state)
        except FileNotFoundError:
            pass
        os.fsync(state)


def unlink_if_present(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


# -- the volume lock and mounts -----------------------------------------------


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


# -- progress ----------------------------------------------------------------


class Progress:
    """A progress bar (files, percentage, ETA: ``click.progressbar``) on a terminal;
    silent otherwise.  Attributes: done (files counted), enabled."""

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self.enabled = stream.isatty() if enabled is None else enabled
        self.done = 0
        self._bar: Any = None
        if self.enabled:
            self._bar = click.progressbar(
                length=max(total, 1), label=label, file=stream, show_pos=True, show_eta=True
            )
            self._bar.__enter__()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
