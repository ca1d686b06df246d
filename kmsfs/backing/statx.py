"""statx(2), which the os module lacks before Python 3.15: birth times, and a stat that never
asks the file's filesystem to revalidate (``AT_STATX_DONT_SYNC``).

Layer 0 (docs/DESIGN.md): the access policy uses it to identify a requester's
executable by inode without entering the executable's filesystem (which may be
this very FUSE mount, whose event loop is the caller), and kmsfs.backing.syscalls for
birth times.  Raises OSError with the C errno, like the os module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import threading
from typing import NamedTuple

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_statx = getattr(_libc, "statx", None)
if _statx is not None:  # declared: about 3x faster per call than ctypes guessing each time
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int
# struct statx: mask, ino, size, btime/ctime/mtime (s64 s, u32 ns), dev major/minor
_LAYOUT = struct.Struct("<I28xQQ32xqI4xqI4xqI4x8xII")
_buffers = threading.local()  # one 256-byte struct statx per thread

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
    return _statx is not None


def statx(dir_fd: int, path: bytes | str, flags: int = 0) -> Statx:
    """statx(*dir_fd*, *path*, *flags*) for inode, size, times and birth time.

    OSError: the C errno (ENOENT, EACCES...), or ENOSYS without statx in libc.
    """
    if _statx is None:
        raise OSError(38, "statx is not in this C library")
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = ctypes.create_string_buffer(256)
    mask = STATX_MTIME | STATX_CTIME | STATX_INO | STATX_SIZE | STATX_BTIME
    if _statx(dir_fd, os.fsencode(path), flags, mask, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    got, ino, size, b_s, b_ns, c_s, c_ns, m_s, m_ns, major, minor = _LAYOUT.unpack_from(buf)
    return Statx(  # dev, ino, size, mtime_ns, ctime_ns, birth_ns
        os.makedev(major, minor),
        ino,
        size,
        m_s * 1_000_000_000 + m_ns,
        c_s * 1_000_000_000 + c_ns,
        b_s * 1_000_000_000 + b_ns if got & STATX_BTIME else None,
    )
