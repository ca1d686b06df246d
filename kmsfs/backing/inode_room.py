"""Whether the backing filesystem keeps a file's header inside its inode (no FUSE).

ext4 keeps a file's extended attributes inside the inode while they fit the
inode's spare room (about 60 bytes of value for the header's name with the
default 256-byte inodes, about 316 with 512-byte ones); a larger value goes to a
4 KiB block of its own.  A header there costs every file one more block, a cold
open or ACL lookup one more disk read, and an unlink that block's release
(docs/PERFORMANCE.md, "The backing filesystem's inodes").  ``header_room``
measures the room once, on unnamed files, so the daemon can say so in its log
and in ``kmsfs status``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from kmsfs.format.header import ID_SIZE, XATTR_NAME, FileHeader, WrappedKey
from kmsfs.format.volume_config import VolumeConfig

# the largest value probed: more than any one-key header needs (the room of a 512-byte
# ext4 inode is about 316 bytes, of a 1,024-byte one about 828)
PROBE_LIMIT = 1024


def header_room(dir_fd: int, limit: int = PROBE_LIMIT) -> int | None:
    """The largest header xattr value (bytes, at most *limit*) that a new file in the
    directory *dir_fd* keeps without a block of its own, or None when it cannot tell.

    Probes unnamed files (O_TMPFILE: nothing is ever linked into the directory, and
    each vanishes when closed), setting the header's xattr with values of chosen
    sizes and reading ``st_blocks``; a filesystem that never counts an xattr in
    ``st_blocks`` (tmpfs) reports *limit*.  None where it cannot probe: no
    O_TMPFILE or no user xattrs (shared mode's network filesystems, for one), a
    read-only or full filesystem; a diagnostic never stops a mount.
    """
    try:
        if _costs_a_block(dir_fd, 1):
            return 0
        if not _costs_a_block(dir_fd, limit):
            return limit
        fits, costs = 1, limit  # fits <= room < costs
        while costs - fits > 1:
            middle = (fits + costs) // 2
            if _costs_a_block(dir_fd, middle):
                costs = middle
            else:
                fits = middle
    except OSError:  # no O_TMPFILE, no user xattrs, a read-only or full filesystem
        return None
    return fits


def header_room_at(path: str) -> int | None:
    """``header_room`` of the directory *path* (None as there, or if it cannot be opened)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return header_room(fd)
    finally:
        os.close(fd)


def new_header_size(config: VolumeConfig) -> int:
    """The size in bytes of a new file's header in the volume of *config*: one entry per
    master key, each blob as long as that key's check value, which the provider made by
    wrapping a 32-byte key as it wraps file keys (docs/FORMAT.md, "File header")."""
    entries = tuple(WrappedKey(key.provider, key.key_ref, key.check) for key in config.keys)
    header = FileHeader.new(config.volume_id, bytes(ID_SIZE), config.block_size, entries)
    return len(header.pack())


def _costs_a_block(dir_fd: int, size: int) -> bool:
    """Whether a fresh unnamed file in *dir_fd* takes blocks once it has a header xattr of
    *size* bytes (True too if the filesystem refuses a value that large).  OSError as
    O_TMPFILE or setxattr raise it."""
    fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        before = os.fstat(fd).st_blocks
        try:
            os.setxattr(fd, XATTR_NAME, bytes(size))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.E2BIG):  # too large for even a block
                return True
            raise
        return os.fstat(fd).st_blocks > before
    finally:
        os.close(fd)


@dataclass
class HeaderRoom:
    """What the daemon knows of where its headers go.

    Attributes: xattr_bytes (``header_room`` of the backing root at mount, None if it
    could not tell), header_bytes (the largest header this daemon wrote, None before
    its first create), reported (the log has said that a header does not fit).
    """

    xattr_bytes: int | None = None
    header_bytes: int | None = None
    reported: bool = False

    def note_header(self, size: int) -> bool:
        """Record a written header's *size* (header_bytes keeps the largest); True the
        first time one does not fit (the moment to say so in the log), else False."""
        self.header_bytes = max(size, self.header_bytes or 0)
        if self.reported or self.xattr_bytes is None or size <= self.xattr_bytes:
            return False
        self.reported = True
        return True

    def summary(self) -> dict[str, int | bool | None]:
        """For ``kmsfs status --json``: the room, the header size, and whether it fits
        (None while either is unknown)."""
        fits = None
        if self.xattr_bytes is not None and self.header_bytes is not None:
            fits = self.header_bytes <= self.xattr_bytes
        return {"xattr_bytes": self.xattr_bytes, "header_bytes": self.header_bytes, "fits": fits}
