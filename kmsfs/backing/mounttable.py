"""The kernel's mount table (``/proc/self/mountinfo``): which kmsfs mounts serve a directory.

A kmsfs daemon mounts with ``subtype=kmsfs`` and the backing path as its fsname
(escaped for libfuse's option parser, which turns it back into the path: the kernel
records the path itself), so its line has the filesystem type ``fuse.kmsfs`` and that
path as its source.  Which backing directory a mount serves is decided by identity,
not by string: the source is stat'ed and its (st_dev, st_ino) compared with the
directory's, so every spelling (a symlink, a bind mount) matches.

This is the answer tools get even if the volume lock and the daemon registrations in
the backing directory were moved aside: the kernel's table is not in the backing
directory.  Only mounts made by root or by the directory's owner are looked at
(``user_id=``, which fusermount3 sets to its caller's real uid): any user may mount a
FUSE filesystem of type fuse.kmsfs naming any source, and another user's mount must
neither block a tool nor make it stat a path of that user's choosing (one inside a
FUSE mount that never answers would hang it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
KMSFS_FSTYPE = "fuse.kmsfs"
_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo.  Attributes: device ("major:minor"), mountpoint, fstype,
    source, options (the superblock's: ``user_id=0``, ...)."""

    device: str
    mountpoint: str
    fstype: str
    source: str
    options: tuple[str, ...]

    @property
    def owner(self) -> int | None:
        """The uid a FUSE mount records as its mounter (``user_id=``), if any."""
        for option in self.options:
            if option.startswith("user_id="):
                try:
                    return int(option[8:])
                except ValueError:
                    return None
        return None


def unescape(field: bytes) -> str:
    """A mountinfo field as the path it names: the kernel writes space, tab, newline and
    backslash as three octal digits (``\\040``); other bytes are the path's own."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount this process sees; [] if the table cannot be read.  Lines are split
    at the " - " separator (the optional fields before it vary in number)."""
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        head, sep, tail = line.partition(b" - ")
        fields, rest = head.split(b" "), tail.split(b" ")
        if not sep or len(fields) < 6 or len(rest) < 3:
            continue
        entries.append(
            MountEntry(
                device=fields[2].decode("ascii", "replace"),
                mountpoint=unescape(fields[4]),
                fstype=unescape(rest[0]),
                source=unescape(rest[1]),
                options=tuple(unescape(rest[2]).split(",")),
            )
        )
    return entries


def kmsfs_mounts_of(directory: os.stat_result) -> list[str]:
    """Mount points of the kmsfs mounts whose source is *directory* (its ``stat``), made
    by root or by the directory's owner; in the table's order."""
    found = []
    for entry in read_mountinfo():
        if entry.fstype != KMSFS_FSTYPE or entry.owner not in (0, directory.st_uid):
            continue
        try:
            st = os.stat(entry.source)
        except (OSError, ValueError):
            continue  # gone, or not a path (an old mount with another fsname)
        if (st.st_dev, st.st_ino) == (directory.st_dev, directory.st_ino):
            found.append(entry.mountpoint)
    return found
