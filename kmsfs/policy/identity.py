"""Who made a request: uid/gid from FUSE; program, namespaces and groups from ``/proc/PID``.

``IdentityCache.lookup(pid, uid, gid)`` costs nothing: the ``Requester`` it
returns reads ``/proc`` only when a rule needs it, at most once per request.
The program is identified by the file the process runs, never by its name:

- ``exe_stat``: statx of ``/proc/PID/exe`` (through ctypes, about twice a
  readlink of it: 6 µs where the readlink takes 3; the magic link leads to
  the very inode the process runs, whatever its path says in the process's own
  mount namespace), with ``AT_STATX_DONT_SYNC`` so that the executable's
  filesystem is never asked (it may be this FUSE mount, whose loop is the
  caller).  Its identity is (st_dev, st_ino, birth time), or (st_dev, st_ino,
  ctime) where the filesystem records no birth time: an inode number freed and
  given to a new file never matches the old file's identity.  Read on every
  request that reaches a rule with ``programs``; not cached per pid on purpose:
  ``execve`` keeps the pid and the start time, so nothing cheaper than this
  statx notices an exec, and a reused pid shows its own executable.
- ``unknown_program``: why the program cannot be known, None when it can.  A
  process in another mount or user namespace than the daemon's (two readlinks,
  about 3 µs each, of ``/proc/PID/ns/mnt`` and ``ns/user``) may run the permitted
  inode with other libraries mounted over the real ones, or a binary of its
  choice at the permitted path (``unshare -Urm`` needs no privilege): its
  program is unknown, and only rules without ``programs`` (or with ``sha256``)
  can match it.  Read only when the executable matches a configured program (or
  before a configured path is looked up again), and for audit records; never
  cached (``unshare`` and ``setns`` change it without an exec).  The daemon's
  own namespaces are read once: it never changes them.
- ``exe``: ``readlink /proc/PID/exe`` (about 3 µs), the name for audit records
  and messages, and for noticing a configured program replaced since the policy
  was loaded (programs.py).  readlink prints the kernel's name of the file
  without entering its filesystem.
- ``groups``: the request's gid plus the ``Groups:`` of ``/proc/PID/status``
  (about 11 µs), read only when a rule's groups do not contain the request's
  gid.  Fresh every time, so ``setgroups`` takes effect at once.
- ``sha256`` of the executable: cached per file under (st_dev, st_ino,
  st_size, st_mtime_ns, st_ctime_ns) of ``exe_stat``, so a hundred processes of
  one program hash it once, and a process that exec'd another file, or a file
  rewritten in place, hashes again.  Hashing opens ``/proc/PID/exe`` (the very
  file the process runs, also in another namespace, so ``sha256`` rules match
  there) and may block, or even reach this FUSE mount: ``Requester.sha256``
  therefore raises ``HashPending`` unless the requester may block; the
  operations layer then calls ``pending.resolve()`` in a worker thread and
  decides again.

What is cached, and why it is safe: the daemon's own namespaces (it never
calls ``setns`` or ``unshare``); a hash per file key (a new inode, or a write
to this one, changes the key); the identities of configured programs
(programs.py: looked up again when a requester runs a file now at a configured
path).  Nothing is cached per pid: a pid keeps its start time across an exec,
and its namespaces change without one, so any per-pid key would cost a /proc
read as large as what it saves.

FUSE gives the requesting thread's id as pid (``/proc/TID`` works like a pid)
and 0 for a process outside the mount's pid namespace or for the kernel's own
requests: their program is unknown.  The hash cache is bounded (least recently
used entries dropped).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import kmsfs.backing.statx as statx
from kmsfs.backing.statx import Statx

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
GONE = "process gone, or its /proc entries unreadable"
_UNSET: object = object()
# (st_dev, st_ino, True, birth ns) or (st_dev, st_ino, False, ctime ns): see the docstring
FileKey = tuple[int, int, bool, int]
HashKey = tuple[int, int, int, int, int]


class Pending(Exception):
    """A rule needs a fact that takes blocking I/O, and this requester may not block.

    Call ``resolve()`` off the event loop (in a worker thread), then decide
    again: the requester then has the fact, so the same request is never
    pending twice for it.
    """

    def __init__(self, what: str, resolve: Callable[[], object]) -> None:
        super().__init__(what)
        self.resolve = resolve


class HashPending(Pending):
    """A rule needs the program's SHA-256, not yet known (``resolve`` computes it)."""


def file_key(st: Statx) -> FileKey:
    """The identity of a file: device, inode, and its birth time (else its ctime)."""
    if st.birth_ns is not None:
        return (st.dev, st.ino, True, st.birth_ns)
    return (st.dev, st.ino, False, st.ctime_ns)


def hash_key(st: Statx) -> HashKey:
    """What keys a cached SHA-256: a new inode, or a write to this one, changes it."""
    return (st.dev, st.ino, st.size, st.mtime_ns, st.ctime_ns)


def file_sha256(fd: int) -> str:
    """Hex SHA-256 of the whole file open on *fd* (read from offset 0); OSError if unreadable."""
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, HASH_CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


def stat_program(path: str, flags: int = 0) -> Statx:
    """statx of the file at *path*, following symlinks; OSError if it cannot be read."""
    return statx.statx(statx.AT_FDCWD, path, flags)


class Requester:
    """One request's requester; /proc is read lazily, at most once per attribute.

    Attributes: uid, gid (the request's fsuid/fsgid), pid (0 if unknown),
    blocking (False: facts that need blocking I/O raise Pending instead),
    refreshed (a configured program was looked up again for this request).
    Properties: exe_stat, unknown_program, exe, groups, sha256 (module docstring).
    """

    __slots__ = (
        "uid",
        "gid",
        "pid",
        "blocking",
        "refreshed",
        "_cache",
        "_given",
        "_exe",
        "_exe_stat",
        "_unknown",
        "_groups",
        "_sha256",
    )

    def __init__(
        self,
        uid: int,
        gid: int,
        pid: int = 0,
        *,
        exe: str | None | object = _UNSET,
        groups: frozenset[int] | None = None,
        sha256: str | None | object = _UNSET,
        cache: IdentityCache | None = None,
        blocking: bool = True,
    ) -> None:
        """A requester; values not given are read from /proc through *cache* when needed.

        *exe* given (``kmsfs policy check``, tests) describes a process of this
        host's namespaces running the file at that path: its identity is that
        file's (symlinks followed), its SHA-256 that file's content; None is an
        unknown program.  Without a cache and without *exe*, the program is
        unknown and the groups are just *gid*.
        """
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.blocking = blocking
        self.refreshed = False
        self._cache = cache
        self._given = exe is not _UNSET
        self._exe: str | None | object = _UNSET
        if isinstance(exe, str):
            self._exe = os.path.realpath(exe)
        elif exe is None:
            self._exe = None
        self._exe_stat: Statx | None | object = None if exe is None else _UNSET
        self._unknown: str | None | object = _UNSET
        self._groups = None if groups is None else frozenset(groups) | {gid}
        self._sha256 = sha256

    @property
    def exe_stat(self) -> Statx | None:
        """statx of the running executable (module docstring); None if it cannot be read."""
        if self._exe_stat is _UNSET:
            if self._given:
                try:
                    self._exe_stat = stat_program(str(self._exe))
                except OSError:
                    self._exe_stat = None
            elif self._cache is not None:
                self._exe_stat = self._cache.exe_stat(self.pid)
            else:
                self._exe_stat = None
        return self._exe_stat  # type: ignore[return-value]

    @property
    def unknown_program(self) -> str | None:
        """Why the program is unknown (no process, gone, another namespace), or None."""
        if self._unknown is _UNSET:
            if self._given:
                if self._exe is None:
                    self._unknown = "not given"
                else:
                    self._unknown = None if self.exe_stat is not None else "no such file"
            elif self._cache is None or self.pid <= 0:
                self._unknown = "no process (the kernel's own request, or another pid namespace)"
            else:
                self._unknown = self._cache.foreign(self.pid)
                if self._unknown is None and self.exe_stat is None:
                    self._unknown = GONE
        return self._unknown  # type: ignore[return-value]

    @property
    def exe_text(self) -> str | None:
        """``/proc/PID/exe`` as the daemon reads it (the given path, resolved), not checked
        against namespaces: use ``exe`` for what to show."""
        if self._exe is _UNSET:
            self._exe = self._cache.exe(self.pid) if self._cache is not None else None
        return self._exe  # type: ignore[return-value]

    @property
    def exe(self) -> str | None:
        """The executable's path for records and messages, None if the program is unknown
        (`` (deleted)`` at the end if its file was replaced since the process started)."""
        return None if self.unknown_program is not None else self.exe_text

    @property
    def groups(self) -> frozenset[int]:
        if self._groups is None:
            found = self._cache.groups(self.pid) if self._cache is not None else None
            self._groups = (found or frozenset()) | {self.gid}
        return self._groups

    @property
    def sha256_known(self) -> bool:
        """True if ``sha256`` will answer without hashing a file (its answer may be None)."""
        if self._sha256 is _UNSET:
            st = self.exe_stat
            if st is None:
                self._sha256 = None
            elif self._cache is not None:
                cached = self._cache.cached_sha256(st)
                if cached is not None:
                    self._sha256 = cached
        return self._sha256 is not _UNSET

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 of the running executable; None if unknown or unreadable.

        Raises HashPending if it must be computed and ``blocking`` is False.
        """
        if not self.sha256_known:
            if not self.blocking:
                raise HashPending(f"sha256 of {self.exe_text}", self.compute_sha256)
            self.compute_sha256()
        return self._sha256  # type: ignore[return-value]

    def compute_sha256(self) -> str | None:
        """Hash the executable now (blocking: run it in a worker thread); None if unknown."""
        if self._sha256 is _UNSET:
            st = self.exe_stat
            if st is None:
                self._sha256 = None
            elif self._given or self._cache is None:
                self._sha256 = IdentityCache.hash_path(str(self._exe))
            else:
                self._sha256 = self._cache.sha256(self.pid, st)
        return self._sha256  # type: ignore[return-value]

    def __repr__(self) -> str:
        exe = self._exe if self._exe is not _UNSET else "?"
        return f"Requester(uid={self.uid}, gid={self.gid}, pid={self.pid}, exe={exe!r})"


class IdentityCache:
    """Reads requester identities from /proc; caches executable hashes (thread-safe).

    Attributes: max_files (bound of the hash cache), hashes (files hashed so
    far, for tests and status), namespaces (the daemon's own mount and user
    namespaces, as ``/proc/self/ns`` links read them).
    """

    def __init__(self, max_files: int = 256) -> None:
        self.max_files = max_files
        self.hashes = 0
        self.namespaces = (_read_link("/proc/self/ns/mnt"), _read_link("/proc/self/ns/user"))
        self._lock = threading.Lock()
        # hash_key(statx of the executable) -> sha256
        self._by_file: OrderedDict[HashKey, str] = OrderedDict()

    def lookup(self, pid: int, uid: int, gid: int, blocking: bool = False) -> Requester:
        """The requester of a FUSE request (``ctx.pid``, ``ctx.uid``, ``ctx.gid``); no I/O yet."""
        return Requester(uid, gid, pid, cache=self, blocking=blocking)

    def exe(self, pid: int) -> str | None:
        """``readlink /proc/PID/exe``; None for pid 0, a gone process or a kernel thread."""
        if pid <= 0:
            return None
        return _read_link(f"/proc/{pid}/exe")

    def exe_stat(self, pid: int) -> Statx | None:
        """statx of ``/proc/PID/exe`` without revalidation; None if gone or unreadable."""
        if pid <= 0:
            return None
        try:
            return stat_program(f"/proc/{pid}/exe", statx.AT_STATX_DONT_SYNC)
        except OSError:
            return None

    def foreign(self, pid: int) -> str | None:
        """Why *pid* is not in the daemon's mount and user namespaces ("another mount
        namespace", "another user namespace", GONE), or None if it is."""
        mount = _read_link(f"/proc/{pid}/ns/mnt")
        if mount is None or mount != self.namespaces[0]:
            return "another mount namespace" if mount else GONE
        user = _read_link(f"/proc/{pid}/ns/user")
        if user is None or user != self.namespaces[1]:
            return "another user namespace" if user else GONE
        return None

    def groups(self, pid: int) -> frozenset[int] | None:
        """The supplementary groups of *pid* (``Groups:`` in /proc/PID/status), None if gone."""
        if pid <= 0:
            return None
        text = self._read(f"/proc/{pid}/status")
        if text is None:
            return None
        start = text.find("\nGroups:")
        if start < 0:
            return frozenset()
        end = text.find("\n", start + 8)
        return frozenset(int(group) for group in text[start + 8 : end].split())

    def cached_sha256(self, st: Statx) -> str | None:
        """The hash recorded for the executable file *st* describes, or None (not hashed yet)."""
        key = hash_key(st)
        with self._lock:
            digest = self._by_file.get(key)
            if digest is not None:
                self._by_file.move_to_end(key)
            return digest

    def sha256(self, pid: int, seen: Statx) -> str | None:
        """Hash of the executable *pid* runs (blocking); None if it is not *seen* any more.

        *seen* is the executable the decision saw: if the process exec'ed, or the
        file was written, since then, nothing is recorded and None is returned
        (no ``sha256`` rule matches it).
        """
        cached = self.cached_sha256(seen)
        if cached is not None:
            return cached
        try:
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("cannot open the executable of pid %d: %s", pid, exc.strerror)
            return None
        try:
            if hash_key(statx.statx(fd, "", statx.AT_EMPTY_PATH)) != hash_key(seen):
                return None
            digest = file_sha256(fd)
        except OSError as exc:
            log.warning("cannot hash the executable of pid %d: %s", pid, exc.strerror)
            return None
        finally:
            os.close(fd)
        with self._lock:
            self.hashes += 1
            self._by_file[hash_key(seen)] = digest
            while len(self._by_file) > self.max_files:
                self._by_file.popitem(last=False)
        return digest

    @staticmethod
    def hash_path(path: str) -> str | None:
        """Hex SHA-256 of the file at *path*, or None if it cannot be read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return file_sha256(fd)
        except OSError:
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _read(path: str) -> str | None:
        """The whole text of a /proc file, or None if it cannot be read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            chunks = [os.read(fd, 65536)]
            while chunks[-1]:
                chunks.append(os.read(fd, 65536))
        except OSError:
            return None
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "replace")


def _read_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
