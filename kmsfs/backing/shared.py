"""Shared-storage mode: byte-range locks on backing files served by several daemons.

In shared mode (``-o shared``, docs/DESIGN.md "Shared storage") other daemons, on
this host or others, write the same backing files.  Every operation on a file's
content then holds an OFD byte-range lock on the backing file (NFSv4, CephFS and
GlusterFS carry these across clients) and re-derives the plaintext size from the
backing file under it, never from what this daemon saw before:

- a run of middle blocks (all before the final block) is locked on its own
  backing bytes: shared to read, exclusive to write (a read-modify-write of a
  partial block included);
- anything that touches the final block, or changes the size (extension,
  truncation), locks from the lower of its first block and the final block to
  the end of the file (and beyond): so the final block, which is sealed with the
  last flag, is never read or re-sealed while another daemon moves it.

The lock is taken first, then the size re-read; if the size moved so that the
range locked no longer covers what the operation needs, the lock is dropped and
taken again.  Locks are held for the syscalls of one request only.

Nothing here ever waits for another daemon: every lock is asked for with
``F_OFD_SETLK`` (granted or refused at once), and a refusal raises LockBusy
before anything is read or written.  The operations layer decides whether, how
long and where to wait (kmsfs/fs/lockwait.py): another daemon's lock may be held
forever (a dead NFS client, a hostile process), and a blocking ``F_OFD_SETLKW``
can be neither timed out nor cancelled.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from kmsfs.backing.content_file import ContentFile
from kmsfs.errors import ConfigError
from kmsfs.format.content import Layout

log = logging.getLogger(__name__)

T = TypeVar("T")
_TO_END = 0  # l_len 0: the lock reaches the end of the file, however far it grows
_FLOCK = "hhqqi4x"  # struct flock on Linux (x86-64 and arm64): type, whence, start, len, pid
DEFAULT_SHARED_TIMEOUT = 1.0  # entry and attribute seconds in shared mode
DEFAULT_LOCK_TIMEOUT = 10.0  # seconds a request waits for another daemon's lock (EIO after)
CREATING_WAIT = 2.0  # seconds a file without its header yet is waited for (being created)


def ofd_lock(fd: int, exclusive: bool, start: int, length: int, wait: bool = True) -> bool:
    """Lock [start, start + length) of *fd* (length 0: to the end and beyond) with an
    open-file-description lock; blocks until granted unless not *wait* (then False
    if another description holds a conflicting lock).  OSError otherwise (ENOLCK:
    the filesystem has no such locks).  The daemon never passes *wait* (tools and
    tests standing for another host do)."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    arg = struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def ofd_unlock(fd: int, start: int, length: int) -> None:
    """Release [start, start + length) of *fd* locked by ``ofd_lock``."""
    arg = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, start, length, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)


def lock_text(exclusive: bool, start: int, length: int) -> str:
    """How log lines name a lock: ``an exclusive lock of bytes 0-4123``, ``a shared
    lock of bytes 8248 to the end``."""
    kind = "an exclusive" if exclusive else "a shared"
    span = f"{start} to the end" if length == _TO_END else f"{start}-{start + length - 1}"
    return f"{kind} lock of bytes {span}"


class LockBusy(Exception):
    """Another daemon holds what an operation needs: nothing was done; try it again
    later (kmsfs/fs/lockwait.py decides when, and for how long).

    Attributes: path (the backing file, for log lines), needed (what the operation
    asked for, as words: ``lock_text``), start and end (the backing bytes it needs,
    end None: to the end of the file; for telling whether two needs overlap).
    """

    def __init__(self, path: str, needed: str, start: int = 0, end: int | None = None) -> None:
        super().__init__(f"{path}: {needed}")
        self.path = path
        self.needed = needed
        self.start = start
        self.end = end


def _fd_path(fd: int) -> str:
    """The path of open file *fd*, for log lines (never raises)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"descriptor {fd}"


def _try_lock(fd: int, exclusive: bool, start: int, length: int) -> None:
    """``ofd_lock`` without waiting: LockBusy (naming *fd*'s path) if refused."""
    if not ofd_lock(fd, exclusive, start, length, wait=False):
        raise LockBusy(
            _fd_path(fd),
            lock_text(exclusive, start, length),
            start,
            start + length if length else None,
        )


class SharedContentFile(ContentFile):
    """A ContentFile whose every read, write and truncate holds a byte-range lock on
    the backing file and starts from the size the backing file has under that lock.

    Never waits: LockBusy, before anything is read or written, when another daemon
    holds what a call needs.  Raises what ContentFile raises, plus IntegrityError
    when the backing size read under the lock cannot belong to a well-formed file.
    """

    _holding = False  # a lock covering the whole operation is held (truncate -> write)

    @classmethod
    def for_backing(cls, backing: str) -> type[SharedContentFile]:
        """The class for a volume in *backing*: this one, or on a backing filesystem
        whose page cache a byte-range lock does not make coherent between hosts (a
        FUSE filesystem: GlusterFS's client keeps pages another client has since
        rewritten, where NFS's client drops them when a lock is taken),
        ``DirectSharedContentFile``, which reads and writes past that cache."""
        if lock_coherent_cache(backing):
            return cls
        log.info(
            "%s is on %s: shared mode reads and writes its blocks with O_DIRECT"
            " (past this host's page cache, which locks do not make coherent)",
            backing,
            backing_fs_type(backing),
        )
        return DirectSharedContentFile

    def read(self, offset: int, length: int) -> bytes | bytearray:
        bs = self.layout.block_size
        last = (offset + max(length, 1) - 1) // bs
        return self._locked(
            offset // bs, last, False, lambda: ContentFile.read(self, offset, length)
        )

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        if self._holding:
            return ContentFile.write(self, offset, data)
        bs = self.layout.block_size
        last = (offset + max(len(data), 1) - 1) // bs
        return self._locked(offset // bs, last, True, lambda: ContentFile.write(self, offset, data))

    def truncate(self, new_size: int) -> None:
        first = self.layout.final_index(new_size)
        self._locked(first, -1, True, lambda: ContentFile.truncate(self, new_size))

    # write_empty is ContentFile's, without a lock: it seals the first block of a file
    # this daemon just created (O_EXCL), and no daemon opens a file's content before
    # that block is there (``check_created``).

    def _locked(self, first: int, last: int, exclusive: bool, run: Callable[[], T]) -> T:
        """Run *run* holding the lock that blocks *first*..*last* need (*last* -1: to
        the end), with ``size`` re-read from the backing file under it; LockBusy if
        another daemon holds part of it."""
        layout = self.layout
        bbs = layout.backing_block
        while True:
            final = layout.final_index(self._backing_plain_size())
            if 0 <= last < final:
                start, length = first * bbs, (last - first + 1) * bbs
            else:
                start, length = min(first, final) * bbs, _TO_END
            _try_lock(self.fd, exclusive, start, length)
            try:
                st = os.fstat(self.fd)
                size = layout.plain_size(st.st_size)
                final = layout.final_index(size)
                covered = last < final if length else start <= final * bbs
                if covered:
                    if st.st_size:  # zero: the file is being created (write_empty)
                        layout.check_backing_size(st.st_size, self.what)
                    self.size = size
                    self._final = None  # another daemon may have re-sealed it
                    self._holding = True
                    try:
                        return run()
                    finally:
                        self._holding = False
            finally:
                ofd_unlock(self.fd, start, length)
            # The size moved between our look and the lock: lock what it needs now.

    def _backing_plain_size(self) -> int:
        return self.layout.plain_size(os.fstat(self.fd).st_size)


class DirectSharedContentFile(SharedContentFile):
    """A SharedContentFile whose backing descriptor is switched to O_DIRECT when it is
    wrapped: every block is read from the backing filesystem's server, never from this
    host's page cache of the backing file (``for_backing`` says where).

    Dropping the cached pages of the bytes locked (posix_fadvise DONTNEED) is not
    enough there: the kernel keeps a page that is mapped, locked by a read in flight
    (readahead, another reader's) or being copied by another reader, and a page that
    holds the end of one block and the start of the next is filled by whoever reads
    either block, under a lock of that block only.  On GlusterFS such pages gave reads
    half an old block (failed authentication) or an old block whole (it
    authenticates: a read-modify-write sealed it back over another host's write).

    Raises OSError if the descriptor refuses O_DIRECT (``check_shared_support`` has
    checked at mount that this filesystem takes it).
    """

    def __init__(self, fd: int, *args: Any, **kwargs: Any) -> None:  # ContentFile's
        set_direct_io(fd)
        super().__init__(fd, *args, **kwargs)


def set_direct_io(fd: int) -> None:
    """Switch open file *fd* to O_DIRECT (for every descriptor of its open file
    description); OSError (EINVAL) if its filesystem refuses."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_DIRECT:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)


def locked_plain_size(path: str, layout: Layout) -> int:
    """The plaintext size of the backing file at *path*, read under a shared lock of its
    final block to the end: never mid-way through another daemon's extension, whose
    backing size grows page by page while it writes (a size read then is a size the
    file never had).  LockBusy at once if another daemon holds a conflicting lock;
    OSError if the file cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        bbs = layout.backing_block
        start = layout.final_index(layout.plain_size(os.fstat(fd).st_size)) * bbs
        while True:
            _try_lock(fd, False, start, _TO_END)
            try:
                size = layout.plain_size(os.fstat(fd).st_size)
            finally:
                ofd_unlock(fd, start, _TO_END)
            final_start = layout.final_index(size) * bbs
            if final_start >= start:
                return size
            start = final_start  # it shrank below what we locked: lock from there
    finally:
        os.close(fd)


def check_created(path: str, has_header: Callable[[], bool]) -> None:
    """Return if the backing file at *path* (an O_PATH descriptor's ``/proc/self/fd``
    path will do) has its header and its first block; LockBusy while it has not: it
    looks like a file another daemon is creating (its O_EXCL open, header and first
    block are three syscalls).  The caller decides how long to wait (CREATING_WAIT)
    and then reports what is missing.  OSError if the file cannot be stat'ed."""
    if os.stat(path).st_size > 0 and has_header():
        return
    where = os.path.realpath(path)  # the backing path, for log lines
    raise LockBusy(where, "its header and first block (another daemon may be creating it)")


def backing_fs_type(path: str) -> str:
    """The type of the filesystem *path* is on (``ext4``, ``nfs4``, ``fuse.glusterfs``),
    from the kernel's mount table: the mount whose point is the longest prefix of the
    resolved path.  ``""`` if it cannot be told."""
    target = os.fsencode(os.path.realpath(path))
    best, kind = b"", b""
    try:
        with open("/proc/self/mountinfo", "rb") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        head, separator, tail = line.partition(b" - ")
        fields = head.split()
        if not separator or len(fields) < 5 or not tail:
            continue
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
        inside = target == point or target.startswith(point.rstrip(b"/") + b"/")
        if inside and len(point) >= len(best):
            best, kind = point, tail.split()[0]
    return os.fsdecode(kind)


def lock_coherent_cache(backing: str) -> bool:
    """False if *backing* is on a FUSE filesystem: its kernel page cache is only as
    coherent as its server makes it, and GlusterFS's client does not drop pages that
    another client rewrote when a byte-range lock is taken (NFS's client does; a local
    filesystem has one cache)."""
    kind = backing_fs_type(backing)
    return not (kind == "fuse" or kind.startswith(("fuse.", "fuseblk")))


def check_shared_support(backing: str) -> None:
    """ConfigError naming what the backing filesystem lacks for shared mode: user
    extended attributes, OFD byte-range locks that conflict between two open file
    descriptions, or (where locks do not make its page cache coherent) unaligned
    O_DIRECT reads and writes.  Tries them on a scratch file (removed after)."""
    check_user_xattrs(backing)
    check_ofd_locks(backing)
    if not lock_coherent_cache(backing):
        check_direct_io(backing)


def check_direct_io(backing: str) -> None:
    """ConfigError if the backing filesystem refuses O_DIRECT, or unaligned reads and
    writes under it (blocks are not page-aligned): ``DirectSharedContentFile``."""

    def probe(fd: int) -> None:
        try:
            set_direct_io(fd)
            os.pwrite(fd, b"kmsfs", 4097)
            if os.pread(fd, 5, 4097) == b"kmsfs":
                return
            why = "other bytes were read back"
        except OSError as exc:
            why = exc.strerror or str(exc)
        raise ConfigError(
            f"{backing}: the backing filesystem ({backing_fs_type(backing)}) refuses"
            f" unaligned O_DIRECT reads and writes ({why}): shared mode needs them there"
            " to read blocks past this host's page cache, which byte-range locks do not"
            " make coherent (see docs/DESIGN.md, 'Shared storage')"
        )

    _with_scratch_file(backing, probe)


def check_user_xattrs(backing: str) -> None:
    """ConfigError if the backing filesystem refuses user extended attributes (kmsfs
    keeps every file's header in one, in any mode)."""

    def probe(fd: int) -> None:
        try:
            os.setxattr(fd, "user.kmsfs.probe", b"1")
            os.removexattr(fd, "user.kmsfs.probe")
        except OSError as exc:
            raise ConfigError(
                f"{backing}: the backing filesystem has no user extended attributes"
                f" ({exc.strerror}): kmsfs keeps each file's header in one, so it cannot"
                " hold a volume (see docs/SHARED.md, 'What the shared filesystem must offer')"
            ) from None

    _with_scratch_file(backing, probe)


def check_ofd_locks(backing: str) -> None:
    """ConfigError if OFD byte-range locks on the backing filesystem fail or do not
    conflict between two open file descriptions (shared mode relies on them)."""
    missing = (
        f"{backing}: the backing filesystem has no working OFD byte-range locks"
        " (fcntl F_OFD_SETLK){}: shared mode needs them to keep two daemons from sealing"
        " one block at once (see docs/SHARED.md, 'What the shared filesystem must offer')"
    )

    def probe(first: int) -> None:
        second = os.open(f"/proc/self/fd/{first}", os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                ofd_lock(first, True, 0, 4096, wait=False)
            except OSError as exc:
                raise ConfigError(missing.format(f" ({exc.strerror})")) from None
            try:
                if ofd_lock(second, True, 0, 4096, wait=False):
                    raise ConfigError(
                        missing.format(" (a second lock of the same range was granted)")
                    )
            finally:
                ofd_unlock(first, 0, 4096)
        finally:
            os.close(second)

    _with_scratch_file(backing, probe)


def _with_scratch_file(backing: str, probe: Callable[[int], None]) -> None:
    """Run *probe* on a new empty file in the backing root (a ``.kmsfs`` name, never
    shown through a mount), removed after.  ConfigError if it cannot be made."""
    from kmsfs.backing.tree import FILE_FLAGS, open_root

    name = f".kmsfs-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        root = open_root(backing)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=root)
        except BaseException:
            os.close(root)
            raise
    except OSError as exc:
        raise ConfigError(
            f"{backing}: cannot check the backing filesystem: {exc.strerror}"
        ) from None
    try:
        probe(fd)
    finally:
        os.close(fd)
        try:
            os.unlink(name, dir_fd=root)
        finally:
            os.close(root)
