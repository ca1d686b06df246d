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

Shared mode (``-o shared``, docs/DESIGN.md "Shared storage"): daemons that may serve
the volume together take the same lock *shared* (``LOCK_SH``), so they coexist with
each other but not with an exclusive daemon or tool (``LOCK_EX``).  Every daemon also
registers itself in ``.kmsfs.d/daemons/``: one file per daemon (host, pid and a random
part in its name; host, pid, mount point and mode inside), locked while it serves, so
tools can name who serves the volume, also from another host.  A registration whose
lock is free belongs to a daemon that died: it is removed by whoever lists them.  What
a registration says is only displayed, never trusted (anyone who can write the backing
directory can write one).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass

from kmsfs.errors import ConfigError, MountError
from kmsfs.format.volume import STATE_DIR_NAME
from kmsfs.fs.tree import DIR_FLAGS, FILE_FLAGS, NOT_FOLLOWED, open_root, open_state_dir

LOCK_NAME = "lock"
DAEMONS_DIR = "daemons"
_PENDING_PREFIX = ".new-"  # a registration being written: not yet locked by its daemon
_PENDING_STALE_AFTER = 60.0  # seconds after which an unlocked pending one is removed
_INFO_MAX = 4096


@dataclass(frozen=True)
class DaemonInfo:
    """One live registration in ``.kmsfs.d/daemons/`` (what it says, unverified).

    Attributes: name (the file's name), host, pid, mountpoint, shared (its mode).
    """

    name: str
    host: str
    pid: int
    mountpoint: str
    shared: bool

    def __str__(self) -> str:
        mode = "shared" if self.shared else "exclusive"
        return f"{self.host} pid {self.pid} at {self.mountpoint} ({mode})"


def lock_volume(backing: str | os.PathLike[str], shared: bool = False) -> int:
    """Take the volume's lock, exclusive or (*shared*) shared with other shared
    daemons; returns the descriptor that holds it.

    The lock lasts until that descriptor is closed or the process exits.  MountError
    naming the volume (and the registered daemons) if a process holds it in a
    conflicting mode; ConfigError if the backing directory, ``.kmsfs.d`` or the lock
    file cannot be opened or is a symlink.
    """
    fd = _open_lock(backing, create=True)
    if fd is None:  # EROFS on a filesystem that does not say it is read-only
        raise ConfigError(f"cannot create the volume lock in {backing}: read-only")
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(in_use_message(backing, shared)) from None
    return fd


def in_use_message(backing: str | os.PathLike[str], shared: bool = False) -> str:
    """Why the volume's lock cannot be taken: who serves it, as far as registrations say."""
    daemons = daemons_serving(backing)
    if not daemons:
        return f"volume {backing} is in use by another kmsfs process (already mounted, or a tool)"
    names = "; ".join(str(daemon) for daemon in daemons)
    if shared and not any(daemon.shared for daemon in daemons):
        return (
            f"volume {backing} is served by an exclusive daemon ({names}): a shared mount"
            " needs every daemon of the volume mounted with -o shared"
        )
    if not shared and all(daemon.shared for daemon in daemons):
        return (
            f"volume {backing} is served in shared mode by {names}: mount it with -o shared"
            " too, or unmount those first"
        )
    return f"volume {backing} is in use by another kmsfs process (already mounted?): {names}"


def volume_in_use(backing: str | os.PathLike[str]) -> bool:
    """True while a daemon or a tool holds the volume's lock, or a daemon is registered
    as serving it (shared daemons, on this host or another).  Creates nothing."""
    fd = _open_lock(backing, create=False)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's shared lock
    return bool(daemons_serving(backing))


class VolumeClaim:
    """What a serving daemon holds: its registration, then the volume lock.

    Attributes: lock_fd (the volume lock's descriptor), registration (None on a
    read-only backing filesystem).
    """

    def __init__(self, lock_fd: int, registration: Registration | None) -> None:
        self.lock_fd = lock_fd
        self.registration = registration

    def close(self) -> None:
        """Unregister and release the lock (never raises)."""
        if self.registration is not None:
            self.registration.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def claim_volume(backing: str | os.PathLike[str], mountpoint: str, shared: bool) -> VolumeClaim:
    """Register as serving *backing* at *mountpoint*, then take the volume lock in the
    mode *shared* says.  Registration first, so no tool finds the volume unused while
    a daemon starts.  MountError (naming the daemons found) or ConfigError as
    ``lock_volume`` says; nothing is left registered then.
    """
    registration = register_daemon(backing, mountpoint, shared)
    try:
        return VolumeClaim(lock_volume(backing, shared), registration)
    except MountError:
        if registration is not None:
            registration.close()
        raise MountError(in_use_message(backing, shared)) from None  # without ourselves
    except BaseException:
        if registration is not None:
            registration.close()
        raise


class Registration:
    """This daemon's file in ``.kmsfs.d/daemons/``, locked until ``close``.

    Attributes: name (the file's name), fd (holds the lock; -1 once closed).
    """

    def __init__(self, state_fd: int, name: str, fd: int) -> None:
        self._state_fd = state_fd
        self.name = name
        self.fd = fd

    def close(self) -> None:
        """Remove the registration and release its lock (never raises)."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.name, dir_fd=self._state_fd)
        except OSError:
            pass  # removed as stale meanwhile, or a read-only filesystem
        os.close(self.fd)
        os.close(self._state_fd)
        self.fd = -1


def register_daemon(
    backing: str | os.PathLike[str], mountpoint: str, shared: bool
) -> Registration | None:
    """Register this process as serving *backing* at *mountpoint*.

    The file is written under a pending name, locked, then renamed into place,
    so a lister never takes it for a dead daemon's.  None on a read-only
    backing filesystem (nothing can be written there, nor served by others).
    ConfigError if ``.kmsfs.d/daemons`` is a symlink or cannot be made.
    """
    state = _open_daemons_dir(backing, create=True)
    if state is None:
        return None
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
    name = f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
    pending = _PENDING_PREFIX + name
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "mountpoint": mountpoint,
        "shared": shared,
        "started": time.time(),
    }
    try:
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=state)
    except OSError as exc:
        os.close(state)
        if exc.errno == errno.EROFS:
            return None
        raise ConfigError(
            f"cannot register in {backing}/{STATE_DIR_NAME}/{DAEMONS_DIR}: {exc.strerror}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps(info).encode())
        os.rename(pending, name, src_dir_fd=state, dst_dir_fd=state)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(pending, dir_fd=state)
        except OSError:
            pass
        os.close(state)
        raise
    return Registration(state, name, fd)


def daemons_serving(backing: str | os.PathLike[str]) -> list[DaemonInfo]:
    """The daemons registered as serving *backing* whose registration is locked (alive).

    Registrations whose lock is free (their daemon died: SIGKILL, a crashed host
    whose locks the server dropped) are removed on the way.  Never raises for a
    damaged registration: it is listed with what could be read.
    """
    try:
        state = _open_daemons_dir(backing, create=False)
    except ConfigError:
        return []
    if state is None:
        return []
    found = []
    try:
        for name in sorted(os.listdir(state)):
            daemon = _live_daemon(state, name)
            if daemon is not None:
                found.append(daemon)
    finally:
        os.close(state)
    return found


def _live_daemon(state: int, name: str) -> DaemonInfo | None:
    """The registration *name* if its daemon holds its lock; removes it if dead."""
    try:
        fd = os.open(name, os.O_RDONLY | FILE_FLAGS, dir_fd=state)
    except OSError:
        return None  # gone meanwhile, or not a file kmsfs made: ignored
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse_info(name, os.pread(fd, _INFO_MAX, 0))
        if not name.startswith(_PENDING_PREFIX) or time.time() - st.st_mtime > _PENDING_STALE_AFTER:
            try:
                os.unlink(name, dir_fd=state)
            except OSError:
                pass
        return None
    finally:
        os.close(fd)


def _printable(value: object, limit: int) -> str:
    """*value* as text without control characters (it is shown on terminals and logs)."""
    return "".join(c if c.isprintable() else "?" for c in str(value)[:limit])


def _parse_info(name: str, raw: bytes) -> DaemonInfo:
    """What a registration says; written by anyone who can write the backing directory,
    so only displayed (printable, bounded), never used to find or signal a process."""
    name = _printable(name, 256)
    try:
        info = json.loads(raw)
        return DaemonInfo(
            name,
            _printable(info["host"], 256),
            int(info["pid"]),
            _printable(info["mountpoint"], 4096),
            info["shared"] is True,
        )
    except (ValueError, KeyError, TypeError):
        return DaemonInfo(name, "(unreadable registration)", 0, "?", True)


def _open_daemons_dir(backing: str | os.PathLike[str], create: bool) -> int | None:
    """``.kmsfs.d/daemons`` (created 0700 if *create*), or None if absent or read-only."""
    where = f"{backing}/{STATE_DIR_NAME}/{DAEMONS_DIR}"
    try:
        root = open_root(backing)
    except OSError as exc:
        raise ConfigError(f"cannot open the backing directory {backing}: {exc.strerror}") from None
    try:
        state = open_state_dir(root, create)
        if state is None:
            return None
        try:
            if create:
                try:
                    os.mkdir(DAEMONS_DIR, 0o700, dir_fd=state)
                except FileExistsError:
                    pass
            return os.open(DAEMONS_DIR, DIR_FLAGS, dir_fd=state)
        finally:
            os.close(state)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return None
        raise ConfigError(_refusal(where, exc)) from None
    finally:
        os.close(root)


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
    # Read-write when taking it: on NFS, flock is emulated with a whole-file byte-range
    # lock, and an exclusive one needs a descriptor open for writing.
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | FILE_FLAGS
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
