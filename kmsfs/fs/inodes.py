"""The inode table: one O_PATH descriptor per backing inode the kernel knows.

FUSE inode numbers are the backing st_ino, except that the backing root is
inode 1 (and a backing inode numbered 1, if any, takes the root's number).
Each entry holds an O_PATH|O_NOFOLLOW descriptor, so renames of the entry or
its parents need no bookkeeping, and the backing inode (and so its number)
stays alive while the kernel may still refer to it.  Lookup counts follow
pyfuse3's rules: +1 for every entry returned by lookup, create, mkdir, mknod,
symlink, link and readdir; -n in forget; the entry is closed at zero.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import trio

from kmsfs.fs.content_file import ContentFile

ROOT_INODE = 1


@dataclass(eq=False)
class Inode:
    """Attributes: ino (FUSE), fd (O_PATH), mode (file type bits), lookups,
    content (the open ContentFile, regular files only), opens (open handles),
    lock (serialises content changes)."""

    ino: int
    fd: int
    mode: int
    lookups: int = 0
    content: ContentFile | None = None
    opens: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def proc_path(self) -> str:
        """A path that reaches the backing inode (follows the O_PATH descriptor)."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)


class InodeTable:
    """Maps FUSE inode numbers to Inode entries."""

    def __init__(self, root_fd: int) -> None:
        st = os.stat(root_fd)
        self.root_st_ino = st.st_ino
        self._entries: dict[int, Inode] = {
            ROOT_INODE: Inode(ROOT_INODE, root_fd, st.st_mode, lookups=1)
        }

    def __len__(self) -> int:
        return len(self._entries)

    def fuse_ino(self, st_ino: int) -> int:
        if st_ino == self.root_st_ino:
            return ROOT_INODE
        if st_ino == ROOT_INODE:
            return self.root_st_ino
        return st_ino

    def get(self, ino: int) -> Inode | None:
        return self._entries.get(ino)

    def remember(self, st: os.stat_result, open_fd: object) -> Inode:
        """Count one more lookup of the inode *st* describes, opening it if new.

        *open_fd* is a callable returning an O_PATH descriptor for the entry;
        it is called only when the inode is not in the table yet.
        """
        ino = self.fuse_ino(st.st_ino)
        entry = self._entries.get(ino)
        if entry is None:
            fd = open_fd()  # type: ignore[operator]
            entry = Inode(ino, fd, st.st_mode)
            self._entries[ino] = entry
        entry.lookups += 1
        return entry

    def adopt(self, st: os.stat_result, fd: int) -> Inode:
        """Count one lookup for an inode we just created and hold *fd* for."""
        ino = self.fuse_ino(st.st_ino)
        entry = self._entries.get(ino)
        if entry is None:
            entry = Inode(ino, fd, st.st_mode)
            self._entries[ino] = entry
        else:
            os.close(fd)
        entry.lookups += 1
        return entry

    def forget(self, ino: int, count: int) -> None:
        entry = self._entries.get(ino)
        if entry is None or ino == ROOT_INODE:
            return
        entry.lookups -= count
        if entry.lookups <= 0 and entry.opens == 0:
            self._close(entry)

    def release_if_unused(self, entry: Inode) -> None:
        """Close an entry whose last open handle went away after its last forget."""
        if entry.lookups <= 0 and entry.opens == 0 and entry.ino != ROOT_INODE:
            self._close(entry)

    def _close(self, entry: Inode) -> None:
        if self._entries.get(entry.ino) is entry:
            del self._entries[entry.ino]
        os.close(entry.fd)

    def close_all(self) -> None:
        for entry in list(self._entries.values()):
            if entry.content is not None:
                os.close(entry.content.fd)
                entry.content = None
            os.close(entry.fd)
        self._entries.clear()
