"""Linux calls the os module lacks: renameat2 flags, *at() on an O_PATH descriptor,
fallocate, and the process-wide protections of key material (no core dumps,
locked memory).

Each raises OSError with the C errno, like the os module, unless it says otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import kmsfs.backing.statx as statx

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_OMIT = (1 << 30) - 2
PR_SET_DUMPABLE = 4
FALLOC_FL_KEEP_SIZE = 1
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
CAP_IPC_LOCK = 14


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dir, old, new_dir, new, ctypes.c_uint(flags)), "renameat2")


def fchown_path_fd(fd: int, uid: int, gid: int) -> None:
    """chown the inode an O_PATH descriptor refers to (symlinks included)."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def utimens_path_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times of the inode an O_PATH descriptor refers to; None leaves one as it is."""
    times = (_Timespec * 2)()
    for slot, value in enumerate((atime_ns, mtime_ns)):
        if value is None:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_OMIT
        else:
            times[slot].tv_sec, times[slot].tv_nsec = divmod(value, 1_000_000_000)
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve backing space for [offset, offset + length) without changing the file size.

    OSError(ENOSPC) if the space is not there.  On a filesystem without
    fallocate (EOPNOTSUPP) nothing is reserved and nothing is raised.
    """
    result = _libc.fallocate(
        fd, FALLOC_FL_KEEP_SIZE, ctypes.c_int64(offset), ctypes.c_int64(length)
    )
    if result != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, f"fallocate: {os.strerror(err)}")


def disable_core_dumps() -> None:
    """No core files and no ptrace by other users: key material must not reach disk."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


_MEMORY_LOCK_TRIED = False


def lock_memory() -> str | None:
    """Keep the process's memory (and so its keys) out of swap: ``mlockall``.

    Locks every page now mapped and every page mapped later, each once it is
    first touched (MCL_ONFAULT: thread stacks and malloc arenas are not
    filled in up front).  Done only when the kernel lets the locked amount
    grow without bound, that is with RLIMIT_MEMLOCK unlimited (raised to the
    hard limit first) or CAP_IPC_LOCK: under a finite limit, MCL_FUTURE would
    make later allocations fail once the limit is reached.

    Returns None once locked, else one line saying why not and what to set
    (for a warning), only the first time it is called in a process; never raises.
    """
    global _MEMORY_LOCK_TRIED
    if _MEMORY_LOCK_TRIED:
        return None
    _MEMORY_LOCK_TRIED = True
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and not _has_capability(CAP_IPC_LOCK):
        return (
            f"memory not locked: RLIMIT_MEMLOCK is {_bytes(soft)} (needs unlimited, or"
            " CAP_IPC_LOCK), so keys may reach swap: set LimitMEMLOCK=infinity in the"
            " systemd unit (or 'ulimit -l unlimited' before mounting)"
        )
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        err = ctypes.get_errno()
        return f"memory not locked: mlockall failed: {os.strerror(err)}, so keys may reach swap"
    return None


def _has_capability(cap: int) -> bool:
    """True if *cap* is in this process's effective capability set."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _bytes(limit: int) -> str:
    return f"{limit // 1024} KiB" if limit >= 1024 else f"{limit} bytes"


def birth_time(fd: int, name: bytes = b"") -> float | None:
    """The birth time (statx btime) of the open file *fd* (or of entry *name* of
    directory *fd*, not following a symlink) in seconds, or None if unknown (no statx
    in this libc, or a filesystem that does not record it); OSError otherwise.

    A file key is created with its backing inode (by create, rekey and import,
    which all make new inodes), so the birth time is the age of the file key.
    """
    if not statx.available():
        return None
    flags = statx.AT_SYMLINK_NOFOLLOW | (0 if name else statx.AT_EMPTY_PATH)
    born = statx.statx(fd, name, flags).birth_ns
    if born is None:
        return None
    seconds, nanos = divmod(born, 1_000_000_000)
    return seconds + nanos / 1e9  # as before statx.py: journals hold such values
