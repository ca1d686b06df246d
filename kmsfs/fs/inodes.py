"""The inode table: one O_PATH descriptor per backing inode the kernel knows.

FUSE inode numbers are the backing st_ino, except that the backing root is
inode 1 (and a backing inode numbered 1, if any, takes the root's number).
Each entry holds an O_PATH|O_NOFOLLOW descriptor, so renames of the entry or
its parents need no bookkeeping, and the backing inode (and so its number)
stays alive while the kernel may still refer to it.  Lookup counts follow
pyfuse3's rules: +1 for every entry returned by lookup, create, mkdir, mknod,
symlink, link and readdir; -n in forget; the entry is closed at zero.

Descriptors are bounded: each entry remembers one (parent, name) it was
reached by, and once the table holds ``high_water`` entries it asks the kernel
to drop the dentries of the oldest unused ones (``trim``), whose inodes the
kernel then forgets.  A directory of 100,000 files
thus never needs 100,000 descriptors.

The descriptor of a forgotten entry is closed by a thread of its own
(``Closer``): closing the last descriptor of an unlinked file is where the
backing filesystem frees it (blocks, xattr block, inode), 100-200 µs on the
machines we measured, which would otherwise stall every request behind it.
At most ``Closer.max_pending`` wait; beyond that they are closed at once.

An entry whose file the online rekey replaced by a new backing inode
(docs/DESIGN.md "Online rekey") keeps its number: the new inode's number is an
*alias* of it (``rebind``), and a descriptor of the old inode is kept until the
entry is closed, so that its number is not given to a new file meanwhile.

A few descriptors are held in reserve (``Reserve``): when the process is out
of descriptors, a deferred entry (fd -1) that a request needs takes one of
them.  Without it, a daemon whose table is full of inodes the kernel was asked
to forget but still holds (dirty ones wait for their SETATTR of times) could
not answer that very SETATTR, and so could never be given its FORGETs.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from kmsfs.backing import syscalls
from kmsfs.backing.content_file import ContentFile

if TYPE_CHECKING:
    from kmsfs.backing.names import Listed
    from kmsfs.policy.identity import Requester

T = TypeVar("T")

log = logging.getLogger(__name__)

ROOT_INODE = 1
O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class Reserve:
    """Spare descriptors (of "/", O_PATH) given up, one at a time, to let an open
    that failed with EMFILE succeed; ``refill`` takes them back when there are
    descriptors free again.  Never raises."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._spares: list[int] = []
        self.refill()

    def __len__(self) -> int:
        return len(self._spares)

    def give_one(self) -> bool:
        """Close one spare; False if none is left."""
        if not self._spares:
            return False
        _close(self._spares.pop())
        return True

    def refill(self) -> None:
        while len(self._spares) < self.size:
            try:
                self._spares.append(os.open("/", O_PATH_FLAGS))
            except OSError:
                return

    def close(self) -> None:
        while self._spares:
            _close(self._spares.pop())


class Closer:
    """Closes descriptors in a daemon thread, in the order given.

    ``close`` hands a descriptor over and returns at once (the caller must not
    use it again); with ``max_pending`` or more already waiting it closes it
    itself, so the descriptors held stay bounded.  ``stop`` closes every one
    still waiting and ends the thread.  A failing close is logged, never raised.
    """

    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def close(self, fd: int) -> None:
        if self.max_pending == 0:
            _close(fd)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kmsfs-closer", daemon=True)
            self._thread.start()
        if self._queue.qsize() >= self.max_pending:
            _close(fd)
        else:
            self._queue.put(fd)

    def _run(self) -> None:
        while (fd := self._queue.get()) is not None:
            _close(fd)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        while not self._queue.empty():  # put after the sentinel: never, but close them
            fd = self._queue.get_nowait()
            if fd is not None:
                _close(fd)


class EntryLock:
    """A trio.Lock that takes no checkpoint when it is free.

    trio's ``Lock.acquire`` always yields to the scheduler once (a trip around
    the run loop and an ``epoll_wait``: about 4 µs), even when the lock is
    free; this one takes a free lock at once and waits (with trio's lock) only
    when another task holds it, such as one waiting for a worker thread.
    Mutual exclusion is trio's: the same owner rules, the same fairness.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        if self._lock.locked():
            await self._lock.acquire()
        else:
            self._lock.acquire_nowait()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # EBADF would be our bug; closing cannot otherwise fail here
        log.warning("closing descriptor %d: %s", fd, exc)


@dataclass(eq=False)
class Inode:
    """Attributes: ino (FUSE), fd (O_PATH), mode (file type bits), lookups,
    content (the open ContentFile, regular files only), opens (open handles),
    lock (serialises content changes), format (a regular file's format, from its
    header once it was opened; 0 before), claims (the formats, as bits 1 << format,
    whose layouts gave the sizes reported before that), generation (told to the
    kernel; raised to make it drop what it cached of the inode), listed_under (a
    directory: the ``policy_serial`` under which the kernel was last let keep its
    listing), parent and name (one directory and name the kernel reached it by, to
    ask it to forget the entry) and backing_name (that name's backing entry, to
    open it again), dir_id (a directory's ID once read: kmsfs/backing/encrypted_names.py;
    it never changes, and the descriptor keeps the inode from being reused), alias
    (the backing inode number that stands for this entry since an online rekey
    replaced its backing file, else 0), retired (descriptors of backing inodes it
    stood for before: the first keeps its number from being reused; all are closed
    with the entry)."""

    ino: int
    fd: int
    mode: int
    lookups: int = 0
    content: ContentFile | None = None
    opens: int = 0
    lock: EntryLock = field(default_factory=EntryLock)
    parent: int = 0  # one (parent, name) this inode was reached by, to evict it
    name: bytes = b""
    backing_name: bytes = b""
    evicting: bool = False  # the kernel was asked to forget it
    born: float | None = None  # a deferred entry's birth time: its number may be reused
    format: int = 0
    claims: int = 0
    generation: int = 0
    listed_under: int = 0
    dir_id: bytes | None = None
    alias: int = 0
    retired: list[int] = field(default_factory=list)

    @property
    def proc_path(self) -> str:
        """A path that reaches the backing inode (follows the O_PATH descriptor)."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)


def deferred_birth_time(dir_fd: int, name: bytes) -> float | None:
    """The birth time of *name* in *dir_fd* (of *dir_fd* itself if *name* is empty), or
    None if unknown: a deferred entry holds no inode, so its number may be given to a
    new file before its first use, which only the birth time tells apart."""
    try:
        return syscalls.birth_time(dir_fd, name)
    except OSError:
        return None


class DirHandle:
    """An open directory: fd (its own descriptor), ino, names (the listing, made at the
    first READDIR and at a rewind: each entry's name and backing name), requester (who
    opened it: whose ``list`` rules decide which entries the listing shows)."""

    __slots__ = ("fd", "ino", "names", "requester")

    def __init__(self, fd: int, ino: int, requester: Requester | None = None) -> None:
        self.fd = fd
        self.ino = ino
        self.names: list[Listed] | None = None
        self.requester = requester


class InodeTable:
    """Maps FUSE inode numbers to Inode entries; the one owner of the daemon's
    descriptors: the entries', their open contents', and open directories' (``dirs``:
    handle -> DirHandle)."""

    def __init__(self, root_fd: int, high_water: int = 1 << 30) -> None:
        self.high_water = high_water
        # Deferred closes hold descriptors a while: only when there are plenty of them
        # (a daemon under a small RLIMIT_NOFILE closes at once, as it must to keep going).
        self.closer = Closer(max_pending=0 if high_water < 4096 else min(64, high_water // 8))
        self.reserve = Reserve(min(32, max(4, high_water // 16)))
        self.evicting = 0  # entries the kernel was asked to forget and has not yet
        self.retired = 0  # descriptors held in entries' ``retired`` lists
        self._aliases: dict[int, int] = {}  # backing st_ino -> FUSE number (``rebind``)
        st = os.stat(root_fd)
        self.root_fd = root_fd
        self.root_st_ino = st.st_ino
        self._entries: dict[int, Inode] = {
            ROOT_INODE: Inode(ROOT_INODE, root_fd, st.st_mode, lookups=1)
        }
        self.dirs: dict[int, DirHandle] = {}
        self._next_dir = 1

    def __len__(self) -> int:
        return len(self._entries)

    def fuse_ino(self, st_ino: int) -> int:
        if self._aliases:
            alias = self._aliases.get(st_ino)
            if alias is not None:
                return alias
        if st_ino == self.root_st_ino:
            return ROOT_INODE
        if st_ino == ROOT_INODE:
            return self.root_st_ino
        return st_ino

    def get(self, ino: int) -> Inode | None:
        return self._entries.get(ino)

    def entry(self, ino: int) -> Inode:
        """The entry the kernel calls *ino*, its descriptor opened if it was deferred.
        ESTALE (FUSEError) if the table does not know it; OSError as ``open_deferred``."""
        entry = self._entries.get(ino)
        if entry is None:
            raise FUSEError(errno.ESTALE)
        if entry.fd < 0:
            self.open_deferred(entry)
        return entry

    async def entry_waiting(self, ino: int) -> Inode:
        """``entry`` for requests that hold no directory lock (getattr, open, opendir,
        setattr): a deferred entry that finds no free descriptor waits for one
        (``when_free``) instead of failing."""
        return await self.when_free(lambda: self.entry(ino))

    async def when_free(self, opener: Callable[[], T]) -> T:
        """``opener()``; while it fails with EMFILE (the kernel has not yet forgotten
        the entries the daemon asked it to), ask it to forget more and wait, up to
        2 s for its FORGETs to free descriptors.  OSError after that."""
        for _ in range(200):
            try:
                return opener()
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
            self.trim(force=True)  # more victims: the pending ones may be in use
            await trio.sleep(0.01)
        return opener()

    def trim(self, force: bool = False) -> None:
        """Past the high-water mark, ask the kernel to forget the oldest unused entries.

        Each entry holds a descriptor, and the kernel keeps entries until memory
        runs short: without this, a directory of more files than RLIMIT_NOFILE
        would fail with EMFILE.  Invalidation is queued to pyfuse3's notify
        thread; the FORGETs that follow close the descriptors.
        """
        if not force and not self.over_high_water():  # O(1): on every lookup and create
            return
        for parent, name in self.victims(self.high_water // 4):
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    async def open_content(self, entry: Inode) -> int:
        """A new descriptor of the entry's backing file, read-write (read-only if that
        is refused); out of descriptors, from the reserve or once some are free."""

        def opener() -> int:
            try:
                return os.open(entry.proc_path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                return os.open(entry.proc_path, os.O_RDONLY | os.O_CLOEXEC)

        return await self.when_free(lambda: self.open_spared(opener))

    def drop_content(self, entry: Inode) -> None:
        """Close the entry's content once no open uses it."""
        if entry.content is not None and entry.opens == 0:
            os.close(entry.content.fd)
            entry.content = None

    def open_dir(self, fd: int, ino: int, requester: Requester | None) -> int:
        """Keep the open directory *fd* of inode *ino*; its handle number."""
        fh = self._next_dir
        self._next_dir += 1
        self.dirs[fh] = DirHandle(fd, ino, requester)
        return fh

    def close_dir(self, fh: int) -> None:
        """Close the open directory *fh* (KeyError if unknown)."""
        os.close(self.dirs.pop(fh).fd)

    def remember(
        self, st: os.stat_result, parent: int, name: bytes, backing: bytes | None = None
    ) -> tuple[Inode, os.stat_result]:
        """Count one more lookup of entry *name* of directory *parent*, stored as the
        backing entry *backing* (*name* itself if None), which the caller found to
        have attributes *st*; open it if new.

        Returns the entry and its attributes: those of the inode opened, which are not
        *st* if the name was replaced between the caller's stat and this open (another
        daemon renaming over it, in shared mode).  Entry and descriptor never disagree:
        an entry holding another inode than its number's would let that number be
        reused by a new file while the kernel still caches the old one's attributes.
        """
        backing = name if backing is None else backing
        entry = self._entries.get(self.fuse_ino(st.st_ino))
        if entry is None:
            fd, st, born = self.open_new(self._entries[parent].fd, backing, st)
            return self.adopt(st, fd, parent, name, born, backing), st
        entry.lookups += 1
        self._keep(entry, parent, name, backing)
        return entry, st

    def adopt(
        self,
        st: os.stat_result,
        fd: int,
        parent: int,
        name: bytes,
        born: float | None = None,
        backing: bytes | None = None,
    ) -> Inode:
        """Count one lookup for an inode we just created and hold *fd* for (-1: deferred,
        born at *born*: ``deferred_birth_time``), reached as *name* of *parent*, stored
        as the backing entry *backing* (*name* itself if None)."""
        ino = self.fuse_ino(st.st_ino)
        entry = self._entries.get(ino)
        if entry is None:
            entry = Inode(ino, fd, st.st_mode, born=born)
            self._entries[ino] = entry
        elif fd >= 0:
            os.close(fd)
        entry.lookups += 1
        self._keep(entry, parent, name, name if backing is None else backing)
        return entry

    @staticmethod
    def open_new(
        dir_fd: int, name: bytes, st: os.stat_result
    ) -> tuple[int, os.stat_result, float | None]:
        """Open entry *name* of *dir_fd* (found with attributes *st*) for a new entry.

        Returns its O_PATH descriptor and the attributes of the inode opened (not
        *st* if the name was replaced meanwhile), or, out of descriptors, -1, *st*
        and its birth time (``open_deferred`` opens it on first use).
        FileNotFoundError if it was removed meanwhile.
        """
        try:
            fd = os.open(name, O_PATH_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
            return -1, st, deferred_birth_time(dir_fd, name)
        return fd, os.fstat(fd), None

    def open_spared(self, opener: Callable[[], int]) -> int:
        """``opener()``, a descriptor; out of descriptors (EMFILE), again after giving
        up a spare of the reserve, until none is left (then EMFILE)."""
        while True:
            try:
                return opener()
            except OSError as exc:
                if exc.errno != errno.EMFILE or not self.reserve.give_one():
                    raise

    def open_deferred(self, entry: Inode) -> None:
        """Give a deferred entry (fd -1) its descriptor, through its parent and name.

        OSError: ESTALE if that name now leads elsewhere or nowhere (it was
        renamed or removed meanwhile), EMFILE if still out of descriptors.
        """
        parent = self._entries.get(entry.parent)
        if parent is None:
            raise OSError(errno.ESTALE, "parent of a deferred entry was forgotten")
        if parent.fd < 0:
            self.open_deferred(parent)
        try:
            fd = self.open_spared(
                lambda: os.open(entry.backing_name, O_PATH_FLAGS, dir_fd=parent.fd)
            )
        except FileNotFoundError:
            raise OSError(errno.ESTALE, "deferred entry was renamed or removed") from None
        if self.fuse_ino(os.stat(fd).st_ino) != entry.ino:
            os.close(fd)
            raise OSError(errno.ESTALE, "deferred entry's name now leads to another inode")
        if entry.born is not None and deferred_birth_time(fd, b"") != entry.born:
            os.close(fd)
            raise OSError(errno.ESTALE, "deferred entry's number was taken by a new file")
        entry.fd = fd

    def hold(self, st: os.stat_result, fd: int) -> Inode:
        """The entry of the regular file open as *fd* (attributes *st*), with one more
        open counted, for a holder that is not the kernel (the online rekey).

        The entry the kernel knows is used if there is one (*fd* is closed then; a
        deferred entry gets its descriptor: ``open_deferred``'s errors), else a new
        one takes *fd*, counted by no lookup: it is closed when the last open goes
        (``release_if_unused``), unless the kernel looked it up meanwhile.
        """
        entry = self._entries.get(self.fuse_ino(st.st_ino))
        if entry is None:
            entry = Inode(self.fuse_ino(st.st_ino), fd, st.st_mode)
            self._entries[entry.ino] = entry
        else:
            os.close(fd)
            if entry.fd < 0:
                self.open_deferred(entry)
        entry.opens += 1
        return entry

    def rebind(self, entry: Inode, fd: int, st: os.stat_result, retire: int) -> None:
        """Make *entry* stand for the backing inode of *fd* (attributes *st*) from now on,
        under its own number, which the kernel caches (the online rekey put that inode
        under the file's name).  *retire*, a descriptor of the inode it stood for, is
        kept until the entry is closed: the first one keeps the original inode, and so
        the entry's number, from being given to a new file meanwhile; later ones may
        still be used by a request in a worker thread (fsync).  The entry's former
        descriptor is closed."""
        if entry.alias:
            del self._aliases[entry.alias]
        self.closer.close(entry.fd)
        entry.fd = fd
        entry.retired.append(retire)
        self.retired += 1
        entry.alias = st.st_ino
        self._aliases[st.st_ino] = entry.ino

    def _keep(self, entry: Inode, parent: int, name: bytes, backing: bytes) -> None:
        """Record the entry's latest name; it is in use again, so no longer evicting."""
        entry.parent, entry.name, entry.backing_name = parent, name, backing
        if entry.evicting:
            entry.evicting = False
            self.evicting -= 1

    def over_high_water(self) -> bool:
        """True if the entries not already being evicted reach the high-water mark."""
        return len(self._entries) + self.retired - self.evicting >= self.high_water

    def victims(self, count: int) -> list[tuple[int, bytes]]:
        """(parent, name) of up to *count* of the oldest entries not open or being evicted."""
        found: list[tuple[int, bytes]] = []
        for entry in self._entries.values():
            if len(found) >= count:
                break
            if entry.opens or entry.evicting or not entry.name or entry.ino == ROOT_INODE:
                continue
            entry.evicting = True
            self.evicting += 1
            found.append((entry.parent, entry.name))
        return found

    def forget(self, ino: int, count: int) -> None:
        entry = self._entries.get(ino)
        if entry is None or ino == ROOT_INODE:
            return
        entry.lookups -= count
        if entry.lookups <= 0 and entry.opens == 0:
            self._close(entry)

    def release_if_unused(self, entry: Inode) -> None:
        """Close an entry whose last open handle went away after its last forget."""
        if entry.lookups <= 0 and entry.opens == 0 and entry.ino != ROOT_INODE:
            self._close(entry)

    def _close(self, entry: Inode) -> None:
        if self._entries.get(entry.ino) is entry:
            del self._entries[entry.ino]
        if entry.evicting:
            entry.evicting = False
            self.evicting -= 1
        if entry.alias:
            self._aliases.pop(entry.alias, None)
            entry.alias = 0
        for fd in entry.retired:
            self.closer.close(fd)
        self.retired -= len(entry.retired)
        entry.retired.clear()
        if entry.fd >= 0:
            self.closer.close(entry.fd)
            entry.fd = -1
            self.reserve.refill()

    def close_all(self) -> None:
        """Close every descriptor (after the FUSE loop has ended)."""
        for handle in self.dirs.values():
            os.close(handle.fd)
        self.dirs.clear()
        self.closer.stop()
        self.reserve.close()
        for entry in list(self._entries.values()):
            if entry.content is not None:
                os.close(entry.content.fd)
                entry.content = None
            for fd in (entry.fd, *entry.retired):
                if fd >= 0:
                    os.close(fd)
        self._entries.clear()
        self._aliases.clear()
