"""The attributes the kernel is shown: sizes computed without keys from the file's
format (its marker, held to its header by ``check_marker``), symlinks' sizes, and how
long the kernel may keep them (the policy's timeout, shared mode's rules)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import pyfuse3

from kmsfs.backing.header_xattr import set_format_marker
from kmsfs.format.content import FORMAT_MARKER, Layout, format_of_mode
from kmsfs.format.header import FORMAT_1, FORMAT_2, FileHeader
from kmsfs.fs.access import Access
from kmsfs.fs.content_access import LocalContentAccess
from kmsfs.fs.errno_map import LookAgain, log
from kmsfs.fs.inodes import Inode
from kmsfs.fs.places import Places
from kmsfs.fs.served import ServedVolume


class Attributes:
    """Builds the attributes of backing inodes (``of``, ``sized``).

    Attributes: layouts (sizes without keys: the layout of each file format,
    FORMAT.md "The format marker").
    """

    def __init__(
        self,
        parts: ServedVolume,
        access: Access,
        places: Places,
        content_access: LocalContentAccess,
    ) -> None:
        self.access = access
        self.places = places
        self.content_access = content_access
        self.inodes = parts.inodes
        self.names = parts.names
        self.config = parts.config
        self.layouts = {v: Layout(parts.config.block_size, v) for v in (FORMAT_1, FORMAT_2)}

    def of(
        self,
        st: os.stat_result,
        entry: Inode | None = None,
        size: int | None = None,
        kept_for: float | None = None,
    ) -> pyfuse3.EntryAttributes:
        """Attributes of backing inode *st*; a regular file's or symlink's size is *size*
        if given (a symlink's is its target's length, else read through *entry*:
        ``link_size``; EncryptedNameError if its target does not decrypt).  The kernel
        keeps them *kept_for* seconds, ``access.timeout`` if None.

        Otherwise the size of its open content, else the one computed from the backing
        file's, which shared mode's kernel does not cache (``content_access``: another
        daemon may have been extending the file when the backing size was read).
        """
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = entry.ino if entry is not None else self.inodes.fuse_ino(st.st_ino)
        attr.generation = entry.generation if entry is not None else 0
        timeout = self.access.timeout if kept_for is None else kept_for
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        if stat.S_ISREG(st.st_mode):
            attr.st_mode = st.st_mode & ~FORMAT_MARKER  # the plaintext never shows it
            if size is None:
                size = self.content_access.open_size(entry)
            if size is not None:
                attr.st_size = size
            else:
                attr.st_size = self.layout_for(st, entry).plain_size(st.st_size)
                attr.attr_timeout = self.content_access.attr_timeout_of_computed_size(timeout)
        elif stat.S_ISLNK(st.st_mode):
            attr.st_mode = st.st_mode
            if size is None:
                fd = -1 if entry is None else entry.fd
                read = None if fd < 0 else (lambda: os.readlink(b"", dir_fd=fd))
                size = self.link_size(st, read)
            attr.st_size = size
        else:
            attr.st_mode = st.st_mode
            attr.st_size = st.st_size
        attr.st_blksize = self.config.block_size
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def link_size(self, st: os.stat_result, read: Callable[[], bytes] | None) -> int:
        """The size ``lstat`` shows for the backing symlink *st* (its target's length),
        reading the stored target with *read* if the names need it."""
        return self.names.link_size(st.st_size, read)

    def entry_size(self, st: os.stat_result, dir_fd: int, backing: bytes) -> int | None:
        """For the entry *backing* of *dir_fd* with attributes *st*: a symlink's size (read
        by name: its inode may have no descriptor yet), None for anything else."""
        if not stat.S_ISLNK(st.st_mode):
            return None
        return self.link_size(st, lambda: os.readlink(backing, dir_fd=dir_fd))

    async def sized(
        self, st: os.stat_result, entry: Inode, caller: int, kept_for: float | None = None
    ) -> pyfuse3.EntryAttributes:
        """``of``, with a regular file's size read under a lock in shared mode
        (``content_access.locked_size``: *caller* is the requester's pid, and
        LockWaitFailed and its kin come from there)."""
        if not stat.S_ISREG(st.st_mode):
            return self.of(st, entry, kept_for=kept_for)
        size = await self.content_access.locked_size(st, entry, self.layout_for, caller)
        return self.of(st, entry, size, kept_for)

    def layout_for(self, st: os.stat_result, entry: Inode | None) -> Layout:
        """The layout a regular file's size is computed with, without reading its header:
        its format as its header gave it if the file was opened before, else as its
        format marker claims (recorded in ``entry.claims``, for ``check_marker``)."""
        if entry is not None and entry.format:
            return self.layouts[entry.format]
        claimed = format_of_mode(st.st_mode)
        if entry is not None:
            entry.claims |= 1 << claimed
        return self.layouts[claimed]

    def check_marker(self, entry: Inode, fd: int, header: FileHeader) -> None:
        """Hold the file's format marker to its header, which is authoritative (FORMAT.md
        "The format marker"): a marker lost by a copy that dropped mode bits, or set
        by whoever can write the backing directory, is restored, with a log line.

        If a size reported for the inode before came from the other format's layout,
        the kernel holds it (with the writeback cache it never takes a size from us
        again while it caches the inode), so this raises LookAgain (ESTALE) with the
        inode's generation raised: the kernel then looks the name up again (an open
        retries with LOOKUP_REVAL, truncate too), sees the new generation, drops its
        inode and makes a new one with the size the header gives.
        """
        version = header.version
        wrong_claims = entry.claims & ~(1 << version)
        entry.format, entry.claims = version, 0
        try:
            claimed = set_format_marker(fd, version)
            if claimed != version:
                log.warning(
                    "%s: the backing file's format marker (mode bit S_ISVTX) said file format"
                    " %d, its header says %d (mode bits lost by a copy, or the backing"
                    " directory edited): marker restored",
                    self.places.describe(entry),
                    claimed,
                    version,
                )
        except OSError as exc:
            log.warning(
                "%s: the backing file's format marker (mode bit S_ISVTX) disagrees with its"
                " header (file format %d) and cannot be restored: %s; sizes are taken from"
                " the header while this daemon knows the file",
                self.places.describe(entry),
                version,
                exc.strerror,
            )
        if wrong_claims:
            entry.generation += 1
            log.info(
                "%s: its size was shown for the other file format: the kernel looks it up again",
                self.places.describe(entry),
            )
            raise LookAgain(self.places.describe(entry))
