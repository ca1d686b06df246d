"""The volume lock: one daemon per volume, and no offline writer beside it.

A daemon holds an exclusive ``flock`` on ``BACKING/.kmsfs.d/lock`` for as long as it
serves.  Tools that must not run beside a daemon (rekey, import, keys remove, the key
switch of rewrap) take the same lock for their run; tools that may (rewrap's cover
pass, fsck) ask ``volume_in_use``.

Why this file: the lock used to be taken on ``.kmsfs.json`` itself, but every config
update replaces that file by rename, which silently left the daemon's lock on the old
inode; and comparing /proc/mounts strings misses a volume reached by another spelling
(a symlink, a bind mount).  The lock file is never replaced, and a lock is on an inode,
so every spelling of the backing path finds it.  It is reached by descriptor from the
backing root, never through a symlink, and created 0600 in a 0700 ``.kmsfs.d`` (which
users cannot open, so they cannot take the lock to block a mount).

On a read-only backing filesystem without a lock file (a snapshot mounted for
recovery) the lock is taken on the backing root directory itself instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from kmsfs.errors import ConfigError, MountError
from kmsfs.format.volume import STATE_DIR_NAME
from kmsfs.fs.tree import FILE_FLAGS, NOT_FOLLOWED, open_root, open_state_dir

LOCK_NAME = "lock"


def lock_volume(backing: str | os.PathLike[str]) -> int:
    """Take the volume's exclusive lock; returns the descriptor that holds it.

    The lock lasts until that descriptor is closed or the process exits.  MountError
    naming the volume if another process (or another descriptor) holds it;
    ConfigError if the backing directory, ``.kmsfs.d`` or the lock file cannot be
    opened or is a symlink.
    """
    fd = _open_lock(backing, create=True)
    if fd is None:  # EROFS on a filesystem that does not say it is read-only
        raise ConfigError(f"cannot create the volume lock in {backing}: read-only")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(
            f"volume {backing} is in use by another kmsfs process (already mounted?)"
        ) from None
    return fd


def volume_in_use(backing: str | os.PathLike[str]) -> bool:
    """True while a daemon or a tool holds the volume's lock.  Creates nothing."""
    fd = _open_lock(backing, create=False)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's shared lock
    return False


def _open_lock(backing: str | os.PathLike[str], create: bool) -> int | None:
    """A descriptor to lock: the lock file (created if *create*), or None if there is
    none; on a read-only filesystem without one, the backing root directory."""
    where = f"{backing}/{STATE_DIR_NAME}"
    try:
        root = open_root(backing)
    except OSError as exc:
        raise ConfigError(f"cannot open the backing directory {backing}: {exc.strerror}") from None
    try:
        try:
            fd = _open_lock_file(root, create, where)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            fd = _open_lock_file(root, False, where)
        if fd is None and os.fstatvfs(root).f_flag & os.ST_RDONLY:
            return os.dup(root)
        return fd
    finally:
        os.close(root)


def _open_lock_file(root: int, create: bool, where: str) -> int | None:
    try:
        state = open_state_dir(root, create)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise
        raise ConfigError(_refusal(where, exc)) from None
    if state is None:
        return None
    flags = os.O_RDONLY | FILE_FLAGS | (os.O_CREAT if create else 0)
    try:
        fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=state)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise
        raise ConfigError(_refusal(f"{where}/{LOCK_NAME}", exc)) from None
    finally:
        os.close(state)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{where}/{LOCK_NAME} is not a regular file: remove it")
    return fd


def _refusal(where: str, exc: OSError) -> str:
    if exc.errno in NOT_FOLLOWED or exc.errno == errno.EISDIR:
        return f"{where} is a symlink or of the wrong type: kmsfs never follows it (remove it)"
    return f"cannot open {where}: {exc.strerror}"
