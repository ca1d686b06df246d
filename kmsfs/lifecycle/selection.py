"""Which files a rekey re-encrypts: the selection the offline and the online rekey share.

A file is due when all of the conditions given hold:

- its key is old enough: a file key is born with its backing inode, so the inode's
  birth time (statx btime) is its age; due are the files born before the *cutoff*,
  the rekey's start less ``older_than`` (every file born before the start without it);
  a file re-keyed by the run is born after the cutoff, so a resumed run skips it;
- ``master_keys``: one of the file's wrapped keys is under one of these master keys
  (the key references ``kmsfs keys list`` shows);
- ``paths``: the file is one of these volume paths or below one of them (the walks
  meet backing paths: ``in_backing`` maps the paths to them, which with encrypted
  names are other names);
- ``sealed_more_than`` (online only): its key has sealed more than this many blocks
  by the daemon's count (FORMAT.md "How much one file key may encrypt").

Nothing here is trusted from the backing directory beyond what it decides: a journal's
selection is checked for types and shape (``from_json``), and paths are compared with
names the walk met, never opened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs.backing.names import Names
from kmsfs.backing.syscalls import birth_time
from kmsfs.backing.tree import FILE_FLAGS, open_root, open_state_dir
from kmsfs.errors import KmsfsError, LifecycleError, UsageError
from kmsfs.format.header import FileHeader

NOWHERE = "\0"  # a path no backing entry has (a name cannot hold NUL)


@dataclass(frozen=True)
class Selection:
    """Attributes: older_than (seconds, or None), master_keys (key references; empty:
    any), paths (volume paths without a leading '/'; empty: every file),
    sealed_more_than (blocks, or None).  See the module docstring."""

    older_than: float | None = None
    master_keys: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    sealed_more_than: int | None = None

    @classmethod
    def of(
        cls,
        older_than: float | None = None,
        master_keys: tuple[str, ...] | list[str] = (),
        paths: tuple[str, ...] | list[str] = (),
        sealed_more_than: int | None = None,
    ) -> Selection:
        """A selection from command-line values; UsageError naming the bad one."""
        if older_than is not None and older_than < 0:
            raise UsageError("--older-than must not be negative")
        if sealed_more_than is not None and sealed_more_than < 0:
            raise UsageError("--sealed-more-than must not be negative")
        return cls(
            older_than,
            tuple(dict.fromkeys(master_keys)),
            tuple(dict.fromkeys(_volume_path(path) for path in paths if path.strip("/"))),
            sealed_more_than,
        )

    def path_selected(self, rel: str) -> bool:
        """True if the file *rel* (relative to the volume root) is within ``paths``."""
        return not self.paths or any(rel == p or rel.startswith(p + "/") for p in self.paths)

    def in_backing(self, to_backing: Callable[[str], str | None]) -> Selection:
        """This selection with ``paths`` as the backing tree names them, for
        ``path_selected`` of a walk's backing paths: *to_backing(path)* gives a path's
        backing path, or None if it does not exist (it then selects nothing).  Not
        for journals: they keep the paths the operator gave."""
        if not self.paths:
            return self
        mapped = tuple(to_backing(path) or NOWHERE for path in self.paths)
        return Selection(self.older_than, self.master_keys, mapped, self.sealed_more_than)

    def header_selected(self, header: FileHeader) -> bool:
        """True if *header* has a wrapped key under one of ``master_keys`` (or none given)."""
        return not self.master_keys or any(e.key_ref in self.master_keys for e in header.entries)

    def sealed_selected(self, sealed: int) -> bool:
        """True if a key that sealed *sealed* blocks is due (or no such condition)."""
        return self.sealed_more_than is None or sealed > self.sealed_more_than

    def describe(self) -> str:
        """A short text for messages and ``kmsfs status``."""
        parts = []
        if self.older_than is not None:
            parts.append(f"keys older than {_duration(self.older_than)}")
        if self.master_keys:
            parts.append("wrapped by " + ", ".join(self.master_keys))
        if self.paths:
            parts.append("under " + ", ".join("/" + p for p in self.paths))
        if self.sealed_more_than is not None:
            parts.append(f"keys that sealed more than {self.sealed_more_than} blocks")
        return "; ".join(parts) or "every file"

    def to_json(self) -> dict[str, Any]:
        return {
            "older_than": self.older_than,
            "master_keys": list(self.master_keys),
            "paths": list(self.paths),
            "sealed_more_than": self.sealed_more_than,
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> Selection:
        """The selection *data* (``to_json``'s form) holds; LifecycleError naming *where*
        if it is malformed."""
        try:
            if not isinstance(data, dict):
                raise ValueError("not an object")
            older = data.get("older_than")
            sealed = data.get("sealed_more_than")
            keys = data.get("master_keys", [])
            paths = data.get("paths", [])
            if older is not None and not isinstance(older, int | float):
                raise ValueError("older_than")
            if sealed is not None and (not isinstance(sealed, int) or isinstance(sealed, bool)):
                raise ValueError("sealed_more_than")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError("master_keys")
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ValueError("paths")
            return cls.of(older, keys, paths, sealed)
        except (ValueError, UsageError) as exc:
            raise LifecycleError(f"malformed rekey selection ({exc})", where=where) from None


def backing_paths(names: Names, root_fd: int) -> Callable[[str], str | None]:
    """For ``Selection.in_backing``: a path in the volume to its backing path (relative
    to the root open as *root_fd*), by descriptor, never through a symlink; None if a
    directory on the way is missing, is not one, or its ID does not read (fsck says
    why)."""

    def to_backing(path: str) -> str | None:
        try:
            return os.fsdecode(names.backing_path(root_fd, os.fsencode(path)))
        except (KmsfsError, OSError, ValueError):
            return None

    return to_backing


def _volume_path(path: str) -> str:
    """*path* as the walk names files (no leading '/'); UsageError if it has '.', '..'
    or empty components."""
    parts = path.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UsageError(f"--path {path!r}: give a path in the volume, such as /projects/a")
    return "/".join(parts)


def _duration(seconds: float) -> str:
    for unit, size in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def journal_cutoff(backing: Path, journal: str, older_than: float | None) -> float:
    """The birth-time cutoff of a rekey that just wrote its journal ``.kmsfs.d/JOURNAL.json``:
    the journal's own birth time (the backing filesystem's clock, which the files' birth
    times are compared with) less *older_than*.  LifecycleError if the filesystem keeps no
    birth times (statx btime)."""
    root = open_root(backing)
    try:
        state = open_state_dir(root, create=False)
    finally:
        os.close(root)
    if state is None:
        raise LifecycleError(f"{backing}: no state directory after writing a journal")
    try:
        fd = os.open(f"{journal}.json", os.O_RDONLY | FILE_FLAGS, dir_fd=state)
        try:
            born = birth_time(fd)
        finally:
            os.close(fd)
    finally:
        os.close(state)
    if born is None:
        raise LifecycleError(
            "rekey needs inode birth times (statx btime), which this filesystem does not keep"
        )
    return born - (older_than or 0.0)


def iso_time(seconds: float | None = None) -> str:
    """UTC time *seconds* (now if None) as journals and status show it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
