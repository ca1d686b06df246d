"""Who made a request: uid/gid from FUSE, program and groups from ``/proc/PID``.

``IdentityCache.lookup(pid, uid, gid)`` costs nothing: the ``Requester`` it
returns reads ``/proc`` only when a rule needs it, at most once per request:

- ``exe``: ``readlink /proc/PID/exe`` (about 3 µs), on every request that
  reaches a rule with ``programs``.  It is not cached per pid on purpose:
  ``execve`` keeps the pid and the start time, so no cheaper check detects an
  exec, and a reused pid shows its own exe.  readlink never enters the
  program's filesystem (it prints the kernel's name of the file), so it is safe
  on the FUSE loop even for a program stored on this volume.
- ``groups``: the request's gid plus the ``Groups:`` of ``/proc/PID/status``
  (about 11 µs), read only when a rule's groups do not contain the request's
  gid.  Fresh every time, so ``setgroups`` takes effect at once.
- ``sha256`` of the executable: cached per process under (pid, start time
  from ``/proc/PID/stat`` field 22, exe link text), so a reused pid (new start
  time) or an exec of another file (new link text) hashes again; and per file
  under (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), so a hundred
  processes of one program hash it once.  Hashing opens ``/proc/PID/exe``
  (the very file the process runs, even if its path was replaced) and may
  block, or even reach this FUSE mount: ``Requester.sha256`` therefore raises
  ``HashPending`` unless the requester may block; the operations layer then
  computes it in a worker thread (``Requester.compute_sha256``) and decides
  again.

FUSE gives the requesting thread's id as pid (``/proc/TID`` works like a pid)
and 0 for a process outside the mount's pid namespace or for the kernel's own
requests: their program is unknown (None) and matches no ``programs`` rule.
Both caches are bounded (least recently used entries dropped).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict

log = logging.getLogger(__name__)

DELETED = " (deleted)"
HASH_CHUNK = 1 << 20
_UNSET: object = object()


class HashPending(Exception):
    """A rule needs the program's SHA-256, not yet known, and this requester may not block.

    Compute it off the event loop (``requester.compute_sha256()`` in a worker
    thread), then decide again.
    """


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


def path_sha256(path: str) -> str | None:
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


class Requester:
    """One request's requester; /proc is read lazily, at most once per attribute.

    Attributes: uid, gid (the request's fsuid/fsgid), pid (0 if unknown),
    blocking (False: ``sha256`` raises HashPending instead of hashing).
    Properties: exe (``/proc/PID/exe`` link text, None if unknown), program
    (exe without the kernel's `` (deleted)`` suffix), groups (gid and the
    supplementary groups).
    """

    __slots__ = (
        "uid",
        "gid",
        "pid",
        "blocking",
        "_cache",
        "_exe",
        "_program",
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

        Without a cache, an unknown exe is None, groups are just *gid*, and the
        SHA-256 is that of the file at *exe* (computed when first needed).
        """
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.blocking = blocking
        self._cache = cache
        self._exe = exe
        self._program: str | None | object = _UNSET
        self._groups = None if groups is None else frozenset(groups) | {gid}
        self._sha256 = sha256

    @property
    def exe(self) -> str | None:
        if self._exe is _UNSET:
            self._exe = self._cache.exe(self.pid) if self._cache is not None else None
        return self._exe  # type: ignore[return-value]

    @property
    def program(self) -> str | None:
        if self._program is _UNSET:  # asked once per rule with programs: computed once
            exe = self.exe
            if exe is not None and exe.endswith(DELETED):
                exe = exe[: -len(DELETED)]
            self._program = exe
        return self._program  # type: ignore[return-value]

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
            exe = self.exe
            if exe is None:
                self._sha256 = None
            elif self._cache is not None:
                cached = self._cache.cached_sha256(self.pid, exe)
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
                raise HashPending(self.exe)
            self.compute_sha256()
        return self._sha256  # type: ignore[return-value]

    def compute_sha256(self) -> str | None:
        """Hash the executable now (blocking: run it in a worker thread); None if unknown."""
        if self._sha256 is _UNSET:
            exe = self.exe
            if exe is None:
                self._sha256 = None
            elif self._cache is None:
                self._sha256 = path_sha256(exe)
            else:
                self._sha256 = self._cache.sha256(self.pid, exe)
        return self._sha256  # type: ignore[return-value]

    def __repr__(self) -> str:
        exe = self._exe if self._exe is not _UNSET else "?"
        return f"Requester(uid={self.uid}, gid={self.gid}, pid={self.pid}, exe={exe!r})"


class IdentityCache:
    """Reads requester identities from /proc; caches executable hashes (thread-safe).

    Attributes: max_processes, max_files (bounds of the two hash caches),
    hashes (files hashed so far, for tests and status).
    """

    def __init__(self, max_processes: int = 4096, max_files: int = 256) -> None:
        self.max_processes = max_processes
        self.max_files = max_files
        self.hashes = 0
        self._lock = threading.Lock()
        # pid -> (start time, exe link text, sha256)
        self._by_process: OrderedDict[int, tuple[int, str, str]] = OrderedDict()
        # (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> sha256
        self._by_file: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()

    def lookup(self, pid: int, uid: int, gid: int, blocking: bool = False) -> Requester:
        """The requester of a FUSE request (``ctx.pid``, ``ctx.uid``, ``ctx.gid``); no I/O yet."""
        return Requester(uid, gid, pid, cache=self, blocking=blocking)

    def exe(self, pid: int) -> str | None:
        """``readlink /proc/PID/exe``; None for pid 0, a gone process or a kernel thread."""
        if pid <= 0:
            return None
        try:
            return os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None

    def groups(self, pid: int) -> frozenset[int] | None:
        """The supplementary groups of *pid* (``Groups:`` in /proc/PID/status), None if gone."""
        if pid <= 0:
            return None
        text = self._read(f"/proc/{pid}/status", whole=True)
        if text is None:
            return None
        start = text.find("\nGroups:")
        if start < 0:
            return frozenset()
        end = text.find("\n", start + 8)
        return frozenset(int(group) for group in text[start + 8 : end].split())

    def start_time(self, pid: int) -> int | None:
        """Field 22 of /proc/PID/stat (clock ticks after boot), None if gone."""
        if pid <= 0:
            return None
        text = self._read(f"/proc/{pid}/stat")
        if text is None:
            return None
        # comm (field 2) may hold spaces and parentheses: count from the last ")"
        fields = text[text.rfind(")") + 2 :].split()
        try:
            return int(fields[19])
        except (IndexError, ValueError):
            return None

    def cached_sha256(self, pid: int, exe: str) -> str | None:
        """The hash recorded for this very process and exe, or None (not hashed yet)."""
        start = self.start_time(pid)
        with self._lock:
            entry = self._by_process.get(pid)
            if entry is None or entry[0] != start or entry[1] != exe:
                return None
            self._by_process.move_to_end(pid)
            return entry[2]

    def sha256(self, pid: int, exe: str) -> str | None:
        """Hash of the executable *pid* runs (blocking); None if the process is gone or changed.

        *exe* is the link text the decision saw: if the process exec'ed or the
        pid was reused while hashing, the hash is not recorded and None is
        returned (no ``sha256`` rule matches it).
        """
        cached = self.cached_sha256(pid, exe)
        if cached is not None:
            return cached
        start = self.start_time(pid)
        if start is None:
            return None
        try:
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("cannot open the executable of pid %d: %s", pid, exc.strerror)
            return None
        try:
            digest = self._file_hash(fd)
        finally:
            os.close(fd)
        if digest is None or self.start_time(pid) != start or self.exe(pid) != exe:
            return None
        with self._lock:
            self._by_process[pid] = (start, exe, digest)
            self._by_process.move_to_end(pid)
            while len(self._by_process) > self.max_processes:
                self._by_process.popitem(last=False)
        return digest

    def _file_hash(self, fd: int) -> str | None:
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._lock:
                digest = self._by_file.get(key)
                if digest is not None:
                    self._by_file.move_to_end(key)
                    return digest
            digest = file_sha256(fd)
        except OSError as exc:
            log.warning("cannot hash an executable: %s", exc.strerror)
            return None
        with self._lock:
            self.hashes += 1
            self._by_file[key] = digest
            while len(self._by_file) > self.max_files:
                self._by_file.popitem(last=False)
        return digest

    @staticmethod
    def _read(path: str, whole: bool = False) -> str | None:
        """The text of a /proc file: one read (enough for stat), or all of it if *whole*."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            chunks = [os.read(fd, 65536)]
            while whole and chunks[-1]:
                chunks.append(os.read(fd, 65536))
        except OSError:
            return None
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "replace")
