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

Anyone who can write the backing directory can also move the lock file and the
registrations aside.  So an exclusive lock (a tool, an exclusive daemon) is also refused
while the kernel's mount table has a kmsfs mount of the directory (``mountpoints_of``,
``kmsfs.backing.mounttable``), and a serving daemon rechecks its claim and makes both again
(``VolumeClaim.recheck``).
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

from kmsfs.backing.mounttable import kmsfs_mounts_of
from kmsfs.backing.tree import DIR_FLAGS, FILE_FLAGS, NOT_FOLLOWED, open_root, open_state_dir
from kmsfs.errors import ConfigError, KmsfsError, MountError
from kmsfs.format.volume_config import STATE_DIR_NAME

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
    conflicting mode, or, for an exclusive lock, if the kernel's mount table has a
    kmsfs mount of it (the lock file was moved aside); ConfigError if the backing
    directory, ``.kmsfs.d`` or the lock file cannot be opened or is a symlink.
    """
    fd = _take_lock(backing, shared)
    if not shared:
        _refuse_if_in_mount_table(backing, fd)
    return fd


class _LockHeld(MountError):
    """Another process holds the volume lock in a conflicting mode."""


def _take_lock(backing: str | os.PathLike[str], shared: bool) -> int:
    """The lock file's descriptor, locked; _LockHeld, or ConfigError as ``lock_volume``."""
    fd = _open_lock(backing, create=True)
    if fd is None:  # EROFS on a filesystem that does not say it is read-only
        raise ConfigError(f"cannot create the volume lock in {backing}: read-only")
    try:
        fcntl.flock(fd, _mode(shared) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _LockHeld(in_use_message(backing, shared)) from None
    return fd


def _refuse_if_in_mount_table(backing: str | os.PathLike[str], fd: int) -> None:
    """MountError naming the mount point (closing *fd*, the lock just taken) if the
    kernel's mount table has a kmsfs mount of *backing*."""
    mounted = mountpoints_of(backing)
    if mounted:
        os.close(fd)
        raise MountError(
            f"volume {backing} is mounted at {mounted[0]} (the kernel's mount table says so,"
            f" though no process holds its lock: was {STATE_DIR_NAME}/{LOCK_NAME} moved aside?)"
        )


def _mode(shared: bool) -> int:
    return fcntl.LOCK_SH if shared else fcntl.LOCK_EX


def mountpoints_of(backing: str | os.PathLike[str]) -> list[str]:
    """Mount points of the kmsfs mounts of *backing* in the kernel's mount table (by the
    directory's identity, however either is spelled: ``kmsfs.backing.mounttable``); [] if the
    directory cannot be opened."""
    try:
        root = open_root(backing)
    except OSError:
        return []
    try:
        return kmsfs_mounts_of(os.fstat(root))
    finally:
        os.close(root)


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
    """True while a daemon or a tool holds the volume's lock, a daemon is registered as
    serving it (shared daemons, on this host or another), or the kernel's mount table
    has a kmsfs mount of it (also when the lock and registrations were moved aside).
    Creates nothing."""
    fd = _open_lock(backing, create=False)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the probe's shared lock
    return bool(daemons_serving(backing)) or bool(mountpoints_of(backing))


class VolumeClaim:
    """What a serving daemon holds: its registration, then the volume lock.

    Anyone who can write the backing directory can move ``.kmsfs.d/lock`` and the
    registrations aside, and a tool would then find the volume free; the kernel's
    mount table still names the mount (``mountpoints_of``), and ``recheck`` (which the
    daemon runs every ``RECHECK_INTERVAL`` seconds and before answering ``kmsfs
    status``) puts both back.

    Attributes: backing, mountpoint, shared, lock_fd (the volume lock's descriptor),
    registration (None on a read-only backing filesystem).
    """

    def __init__(
        self,
        backing: str | os.PathLike[str],
        mountpoint: str,
        shared: bool,
        lock_fd: int,
        registration: Registration | None,
    ) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.shared = shared
        self.lock_fd = lock_fd
        self.registration = registration
        self._root = open_root(backing)  # the directory served, whatever its path becomes

    def recheck(self) -> list[str]:
        """Make sure tools still find this daemon: the lock file is still the inode it
        locked, and the registration still in place.  One moved aside, removed or
        replaced is created and taken again.  Returns what was found and done, one line
        each ([] if all was well).  Never raises."""
        found = []
        try:
            if not stat.S_ISDIR(os.fstat(self.lock_fd).st_mode):  # a read-only root: none
                found += self._recheck_lock()
            if self.registration is not None:
                found += self._recheck_registration(self.registration)
        except OSError as exc:
            found.append(f"cannot check the volume lock of {self.backing}: {exc.strerror}")
        return found

    def _recheck_lock(self) -> list[str]:
        where = f"{self.backing}/{STATE_DIR_NAME}"
        if _same_file(_stat_in_state(self._root, None, LOCK_NAME), os.fstat(self.lock_fd)):
            return []
        what = f"the volume lock {where}/{LOCK_NAME} was moved aside, removed or replaced"
        try:
            fd = _open_lock_file(self._root, True, where)
        except (OSError, KmsfsError) as exc:
            return [f"{what}, and cannot be made again: {exc}"]
        assert fd is not None  # created
        try:
            fcntl.flock(fd, _mode(self.shared) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return [
                f"{what}, and another process holds the new one: a tool may be working on"
                " this mounted volume (checked again every few seconds)"
            ]
        os.close(self.lock_fd)
        self.lock_fd = fd
        return [f"{what}: made again and locked, so tools see this mount"]

    def _recheck_registration(self, registration: Registration) -> list[str]:
        where = f"{self.backing}/{STATE_DIR_NAME}/{DAEMONS_DIR}"
        current = _stat_in_state(self._root, DAEMONS_DIR, registration.name)
        if _same_file(current, os.fstat(registration.fd)):
            return []
        what = f"this daemon's registration {where}/{registration.name} was moved or removed"
        try:
            new = _register_at(self._root, where, self.mountpoint, self.shared)
        except (OSError, KmsfsError) as exc:
            return [f"{what}, and cannot be made again: {exc}"]
        registration.close()
        self.registration = new
        return [f"{what}: registered again as {new.name if new else '?'}"]

    def close(self) -> None:
        """Unregister and release the lock (never raises)."""
        if self.registration is not None:
            self.registration.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        if self._root >= 0:
            os.close(self._root)
            self._root = -1


RECHECK_INTERVAL = 5.0  # seconds between a serving daemon's ``VolumeClaim.recheck``


def _same_file(current: os.stat_result | None, held: os.stat_result) -> bool:
    return current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)


def _stat_in_state(root: int, subdir: str | None, name: str) -> os.stat_result | None:
    """``lstat`` of ``.kmsfs.d/[subdir/]name`` reached by descriptor from *root*; None if
    any part is missing or is not what it should be (never followed)."""
    try:
        state = open_state_dir(root, create=False)
    except OSError:
        return None
    if state is None:
        return None
    try:
        where = state
        if subdir is not None:
            where = os.open(subdir, DIR_FLAGS, dir_fd=state)
        try:
            return os.stat(name, dir_fd=where, follow_symlinks=False)
        finally:
            if where != state:
                os.close(where)
    except OSError:
        return None
    finally:
        os.close(state)


def claim_volume(backing: str | os.PathLike[str], mountpoint: str, shared: bool) -> VolumeClaim:
    """Register as serving *backing* at *mountpoint*, then take the volume lock in the
    mode *shared* says.  Registration first, so no tool finds the volume unused while
    a daemon starts.  MountError (naming the daemons found, or for an exclusive claim
    the mount point the kernel's mount table has) or ConfigError as ``lock_volume``
    says; nothing is left registered then.
    """
    registration = register_daemon(backing, mountpoint, shared)
    try:
        lock_fd = _take_lock(backing, shared)
        if not shared:
            _refuse_if_in_mount_table(backing, lock_fd)
        try:
            return VolumeClaim(backing, mountpoint, shared, lock_fd, registration)
        except OSError as exc:
            os.close(lock_fd)
            raise ConfigError(
                f"cannot open the backing directory {backing}: {exc.strerror}"
            ) from None
    except _LockHeld:
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
    try:
        root = open_root(backing)
    except OSError as exc:
        raise ConfigError(f"cannot open the backing directory {backing}: {exc.strerror}") from None
    try:
        return _register_at(root, f"{backing}/{STATE_DIR_NAME}/{DAEMONS_DIR}", mountpoint, shared)
    finally:
        os.close(root)


def _register_at(root: int, where: str, mountpoint: str, shared: bool) -> Registration | None:
    """``register_daemon`` in the backing directory held open as *root*."""
    state = _open_daemons_dir_at(root, True, where)
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
        raise ConfigError(f"cannot register in {where}: {exc.strerror}") from None
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
    try:
        root = open_root(backing)
    except OSError as exc:
        raise ConfigError(f"cannot open the backing directory {backing}: {exc.strerror}") from None
    try:
        return _open_daemons_dir_at(root, create, f"{backing}/{STATE_DIR_NAME}/{DAEMONS_DIR}")
    finally:
        os.close(root)


def _open_daemons_dir_at(root: int, create: bool, where: str) -> int | None:
    """``_open_daemons_dir`` in the backing directory held open as *root*."""
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
