"""statx(2), which the os module lacks before Python 3.15: birth times, and a stat that never
asks the file's filesystem to revalidate (``AT_STATX_DONT_SYNC``).

Layer 0 (docs/DESIGN.md): the access policy uses it to identify a requester's
executable by inode without entering the executable's filesystem (which may be
this very FUSE mount, whose event loop is the caller), and kmsfs.fs.syscalls for
birth times.  Raises OSError with the C errno, like the os module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import NamedTuple

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_STATX_DONT_SYNC = 0x4000  # attributes as cached: no GETATTR to FUSE, no NFS revalidation
STATX_MTIME, STATX_CTIME, STATX_INO, STATX_SIZE, STATX_BTIME = 0x40, 0x80, 0x100, 0x200, 0x800


class Statx(NamedTuple):
    """What the policy and the birth-time readers use of ``struct statx``.

    ``birth_ns`` is None when the filesystem does not record a birth time.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    birth_ns: int | None


def available() -> bool:
    """True if this libc has statx (glibc 2.28 and later)."""
    return hasattr(_libc, "statx")


def statx(dir_fd: int, path: bytes | str, flags: int = 0) -> Statx:
    """statx(*dir_fd*, *path*, *flags*) for inode, size, times and birth time.

    OSError: the C errno (ENOENT, EACCES...), or ENOSYS without statx in libc.
    """
    if not available():
        raise OSError(38, "statx is not in this C library")
    buf = ctypes.create_string_buffer(256)
    mask = STATX_MTIME | STATX_CTIME | STATX_INO | STATX_SIZE | STATX_BTIME
    if _libc.statx(dir_fd, os.fsencode(path), flags, mask, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    raw = buf.raw
    got = int.from_bytes(raw[0:4], "little")
    return Statx(
        dev=os.makedev(_u32(raw, 136), _u32(raw, 140)),
        ino=int.from_bytes(raw[32:40], "little"),
        size=int.from_bytes(raw[40:48], "little"),
        mtime_ns=_timestamp(raw, 112),
        ctime_ns=_timestamp(raw, 96),
        birth_ns=_timestamp(raw, 80) if got & STATX_BTIME else None,
    )


def _u32(raw: bytes, offset: int) -> int:
    return int.from_bytes(raw[offset : offset + 4], "little")


def _timestamp(raw: bytes, offset: int) -> int:
    """A ``struct statx_timestamp`` (s64 seconds, u32 nanoseconds) in nanoseconds."""
    seconds = int.from_bytes(raw[offset : offset + 8], "little", signed=True)
    return seconds * 1_000_000_000 + _u32(raw, offset + 8)
