"""The base of the FUSE operations: errno mapping, the handler wrapper, and the helpers
every handler uses (inode lookup, attributes, content, key and I/O threads).

This package's operations modules are the only place an errno is chosen (see
kmsfs.fs.operations).  Threads: metadata syscalls on the backing filesystem and
small reads and writes run on the trio loop, because a worker-thread hop costs
0.1-0.4 ms on the machines we measured (docs/DESIGN.md); requests of
OFFLOAD_BYTES or more, fsync, and calls to providers that are not ``inline`` go
to worker threads.  In shared mode nothing waits for another daemon in a thread:
a request that finds another daemon's lock in its way waits through
``lock_waits`` (kmsfs/fs/lockwait.py), on the loop, with a deadline.  What
differs in shared mode is ``content_access``, chosen once
(kmsfs/fs/content_access.py).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from kmsfs.backing import syscalls, xattrs
from kmsfs.backing.content_file import ContentFile, KeyUsage
from kmsfs.backing.header_xattr import read_header, set_format_marker
from kmsfs.backing.names import Dir
from kmsfs.backing.paths import VolumePaths
from kmsfs.backing.shared import LockBusy
from kmsfs.errors import KeyAccessDenied, KmsfsError
from kmsfs.format.content import FORMAT_MARKER, BlockCipher, Layout, format_of_mode
from kmsfs.format.header import FORMAT_1, FORMAT_2, FileHeader
from kmsfs.fs.content_access import content_access_for
from kmsfs.fs.fuseloop import PYFUSE3
from kmsfs.fs.inodes import ROOT_INODE, Inode
from kmsfs.fs.lockwait import LockWaitInterrupted, LockWaits
from kmsfs.fs.requests import OPCODES, RequestStats
from kmsfs.fs.served import ServedVolume

log = logging.getLogger("kmsfs.fs")

T = TypeVar("T")
P = ParamSpec("P")
S = TypeVar("S", bound="OperationsBase")


class LookAgain(Exception):
    """The kernel holds a size computed for the wrong file format (``_check_marker``):
    answered ESTALE, on which the kernel looks the file up again and retries the
    request (an open or a truncate by name); not a failure the caller sees."""


def errno_for(exc: BaseException) -> int:
    """The errno a request answers when its handler raised *exc*.

    OSError keeps its own; the key provider's refusal is EACCES; a wait for
    another daemon's lock whose caller was interrupted is EINTR (what the kernel
    expects for an interrupted request); any other kmsfs error (integrity,
    format, wrong key, provider outage, a lock wait given up) and anything
    unexpected is EIO.
    """
    if isinstance(exc, FUSEError):
        return int(exc.errno)
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, KeyAccessDenied):
        return errno.EACCES
    if isinstance(exc, LockWaitInterrupted):
        return errno.EINTR
    return errno.EIO


_FMODE_EXEC = 0x20  # in an OPEN's flags when the kernel opens a file to execute it


def open_actions(flags: int) -> tuple[str, ...]:
    """The policy actions an open with *flags* needs: read, write, both, or exec."""
    mode = flags & os.O_ACCMODE
    actions: list[str] = []
    if mode in (os.O_RDONLY, os.O_RDWR):
        actions.append("exec" if flags & _FMODE_EXEC else "read")
    if mode in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC:
        actions.append("write")
    return tuple(actions)


def fuse_op(
    func: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Turn every exception of a handler into a FUSEError (pyfuse3 must never see others),
    and count the request, its time and its failure under the handler's FUSE opcode."""
    opcode = OPCODES[func.__name__]

    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        counter = self.requests.by_opcode[opcode]
        start = perf_counter_ns()
        try:
            return await func(self, *args, **kwargs)
        except FUSEError:
            counter.errors += 1
            raise
        except LookAgain:
            counter.errors += 1
            raise FUSEError(errno.ESTALE) from None
        except OSError as exc:
            counter.errors += 1
            if exc.errno in (errno.EBADF, errno.EMFILE, errno.ENFILE):  # our own descriptors
                log.warning("%s: %s", func.__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            raise FUSEError(errno_for(exc)) from None
        except LockWaitInterrupted as exc:  # not the volume's fault: no error line
            counter.errors += 1
            log.info("%s: %s", func.__name__, exc)
            raise FUSEError(errno_for(exc)) from None
        except KmsfsError as exc:
            counter.errors += 1
            self.errors += 1
            log.error("%s: %s", func.__name__, exc)
            raise FUSEError(errno_for(exc)) from None
        except Exception:
            counter.errors += 1
            self.errors += 1
            log.exception("%s: unexpected error", func.__name__)
            raise FUSEError(errno.EIO) from None
        finally:
            counter.add(perf_counter_ns() - start)

    functools.update_wrapper(wrapper, func)
    return wrapper


class OperationsBase(pyfuse3.Operations):
    """State and helpers of the operations (``KmsfsOperations``), with the parts given
    (``ServedVolume``).

    Attributes: backing (path), config, keyring, inodes, names (where a name lives
    in the backing directory, plain or encrypted: kmsfs/backing/names.py), paths
    (volume paths of descriptors: kmsfs/backing/paths.py), key_usage, timeout,
    offload_bytes, on_access, on_worn (``-o auto_rekey``'s queue, or None),
    content_access (local or shared: kmsfs/fs/content_access.py), lock_waits (shared
    mode's waits for other daemons), and the counters errors, bytes_read,
    bytes_written and requests (per FUSE opcode,
    ``kmsfs.fs.requests``).
    """

    enable_writeback_cache = True
    # FUSE_POSIX_ACL: the kernel caches ACLs and checks them with default_permissions
    # (and stops asking for them on every ls -l); they are stored on the backing files.
    enable_acl = True
    # FUSE_DONT_MASK, with a patched pyfuse3 (docs/pyfuse3-patch.md): new entries get the
    # mode the process asked for, and _new_mode applies its umask unless a default ACL rules
    enable_dont_mask = PYFUSE3.dont_mask

    def __init__(self, parts: ServedVolume) -> None:
        super().__init__()
        self.backing = parts.backing
        self.config = parts.config
        self.keyring = parts.keyring
        self.on_access = parts.on_access
        self._volume_hex = parts.config.volume_id.hex()
        # Sizes without keys: the layout of the file's format (FORMAT.md "The format marker")
        self.layouts = {v: Layout(parts.config.block_size, v) for v in (FORMAT_1, FORMAT_2)}
        self._timeout = parts.timeout  # the configured one; ``timeout`` may be 0 (policy)
        self.timeout = parts.timeout
        self.offload_bytes = parts.offload_bytes
        self.inodes = parts.inodes
        self.names = parts.names
        self.paths = VolumePaths(parts.inodes.root_fd, parts.names)
        self._unresolved_logged: set[int] = set()
        self._exec_warned: set[int] = set()  # inodes (ops_access._warn_exec_only)
        # Block encryptions per file key, kept across opens and closes (FORMAT.md,
        # "How much one file key may encrypt")
        self.key_usage = parts.key_usage
        self._limiter = parts.io_limiter
        self._key_limiter = parts.key_limiter
        self._is_root = os.geteuid() == 0
        self.identities = parts.identities
        self.on_policy = parts.on_policy
        self.policy_serial = 0  # policies set so far (the setter counts them)
        self.policy = parts.policy
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.requests = RequestStats()
        self._forgets = self.requests.counter("forget")
        self.lock_waits = LockWaits(parts.lock_timeout)
        self.content_access = content_access_for(parts, self.lock_waits)
        self.enable_writeback_cache = self.content_access.writeback_cache
        # -o auto_rekey: called with the inode of a file whose format-1 key reached the
        # usage warning (kmsfs/server/rekey_job.py queues it for an online rekey)
        self.on_worn: Callable[[int], None] | None = None

    def _attr(
        self,
        st: os.stat_result,
        entry: Inode | None = None,
        size: int | None = None,
        kept_for: float | None = None,
    ) -> pyfuse3.EntryAttributes:
        """Attributes of backing inode *st*; a regular file's or symlink's size is *size*
        if given (a symlink's is its target's length, else read through *entry*:
        ``_link_size``; EncryptedNameError if its target does not decrypt).  The kernel
        keeps them *kept_for* seconds, ``self.timeout`` if None.

        Otherwise the size of its open content, else the one computed from the backing
        file's, which shared mode's kernel does not cache (``content_access``: another
        daemon may have been extending the file when the backing size was read).
        """
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = entry.ino if entry is not None else self.inodes.fuse_ino(st.st_ino)
        attr.generation = entry.generation if entry is not None else 0
        timeout = self.timeout if kept_for is None else kept_for
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        if stat.S_ISREG(st.st_mode):
            attr.st_mode = st.st_mode & ~FORMAT_MARKER  # the plaintext never shows it
            if size is None:
                size = self.content_access.open_size(entry)
            if size is not None:
                attr.st_size = size
            else:
                attr.st_size = self._layout_for(st, entry).plain_size(st.st_size)
                attr.attr_timeout = self.content_access.attr_timeout_of_computed_size(timeout)
        elif stat.S_ISLNK(st.st_mode):
            attr.st_mode = st.st_mode
            if size is None:
                fd = -1 if entry is None else entry.fd
                read = None if fd < 0 else (lambda: os.readlink(b"", dir_fd=fd))
                size = self._link_size(st, read)
            attr.st_size = size
        else:
            attr.st_mode = st.st_mode
            attr.st_size = st.st_size
        attr.st_blksize = self.config.block_size
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _link_size(self, st: os.stat_result, read: Callable[[], bytes] | None) -> int:
        """The size ``lstat`` shows for the backing symlink *st* (its target's length),
        reading the stored target with *read* if the names need it."""
        return self.names.link_size(st.st_size, read)

    def _entry_size(self, st: os.stat_result, dir_fd: int, backing: bytes) -> int | None:
        """For the entry *backing* of *dir_fd* with attributes *st*: a symlink's size (read
        by name: its inode may have no descriptor yet), None for anything else."""
        if not stat.S_ISLNK(st.st_mode):
            return None
        return self._link_size(st, lambda: os.readlink(backing, dir_fd=dir_fd))

    async def _attr_sized(
        self, st: os.stat_result, entry: Inode, caller: int, kept_for: float | None = None
    ) -> pyfuse3.EntryAttributes:
        """``_attr``, with a regular file's size read under a lock in shared mode
        (``content_access.locked_size``: *caller* is the requester's pid, and
        LockWaitFailed and its kin come from there)."""
        if not stat.S_ISREG(st.st_mode):
            return self._attr(st, entry, kept_for=kept_for)
        size = await self.content_access.locked_size(st, entry, self._layout_for, caller)
        return self._attr(st, entry, size, kept_for)

    def _layout_for(self, st: os.stat_result, entry: Inode | None) -> Layout:
        """The layout a regular file's size is computed with, without reading its header:
        its format as its header gave it if the file was opened before, else as its
        format marker claims (recorded in ``entry.claims``, for ``_check_marker``)."""
        if entry is not None and entry.format:
            return self.layouts[entry.format]
        claimed = format_of_mode(st.st_mode)
        if entry is not None:
            entry.claims |= 1 << claimed
        return self.layouts[claimed]

    def _check_marker(self, entry: Inode, fd: int, header: FileHeader) -> None:
        """Hold the file's format marker to its header, which is authoritative (FORMAT.md
        "The format marker"): a marker lost by a copy that dropped mode bits, or set
        by whoever can write the backing directory, is restored, with a log line.

        If a size reported for the inode before came from the other format's layout,
        the kernel holds it (with the writeback cache it never takes a size from us
        again while it caches the inode), so this raises LookAgain (ESTALE) with the
        inode's generation raised: the kernel then looks the name up again (an open
        retries with LOOKUP_REVAL, truncate too), sees the new generation, drops its
        inode and makes a new one with the size the header gives.
        """
        version = header.version
        wrong_claims = entry.claims & ~(1 << version)
        entry.format, entry.claims = version, 0
        try:
            claimed = set_format_marker(fd, version)
            if claimed != version:
                log.warning(
                    "%s: the backing file's format marker (mode bit S_ISVTX) said file format"
                    " %d, its header says %d (mode bits lost by a copy, or the backing"
                    " directory edited): marker restored",
                    self.describe(entry),
                    claimed,
                    version,
                )
        except OSError as exc:
            log.warning(
                "%s: the backing file's format marker (mode bit S_ISVTX) disagrees with its"
                " header (file format %d) and cannot be restored: %s; sizes are taken from"
                " the header while this daemon knows the file",
                self.describe(entry),
                version,
                exc.strerror,
            )
        if wrong_claims:
            entry.generation += 1
            log.info(
                "%s: its size was shown for the other file format: the kernel looks it up again",
                self.describe(entry),
            )
            raise LookAgain(self.describe(entry))

    def _check_name(self, parent: int, name: bytes) -> None:
        """EPERM for names reserved for kmsfs's own files (``.kmsfs*`` at the root of a
        volume with plain names; none with encrypted names)."""
        if self.names.reserved(parent == ROOT_INODE, name):
            raise FUSEError(errno.EPERM)

    def _dir(self, entry: Inode, fd: int | None = None) -> Dir:
        """The directory *entry* for the name operations (``self.names``), through its
        descriptor (or *fd*, another of it).  Its directory ID is read once and kept
        with the entry: EncryptedNameError or FormatError if it is missing or
        malformed (logged by the handler, EIO)."""
        root = entry.ino == ROOT_INODE
        if entry.dir_id is None:
            entry.dir_id = self.names.dir_id(entry.proc_path, root)
        return Dir(entry.fd if fd is None else fd, entry.dir_id, root)

    def _object_id(self, entry: Inode) -> bytes:
        """What the encrypted values of *entry*'s xattrs are bound to: a regular file's
        file ID (from its header), a directory's ID, b"" for other objects."""
        if stat.S_ISDIR(entry.mode):
            return self._dir(entry).dir_id
        if not entry.is_regular:
            return b""
        if entry.content is not None:
            return entry.content.file_id
        return read_header(entry.proc_path, self.describe(entry)).file_id

    def _path_of(self, entry: Inode, name: bytes | None = None) -> Callable[[], str | None]:
        """The volume path of *entry* (or of *name* inside it), computed when asked;
        None if it cannot be established (logged once per inode: kmsfs/backing/paths.py)."""

        def path() -> str | None:
            base = self.paths.of(entry.fd) if entry.fd >= 0 else None
            if base is None:
                self._unresolved(entry)
                return None
            return base if name is None else os.path.join(base, os.fsdecode(name))

        return path

    def _unresolved(self, entry: Inode) -> None:
        if entry.ino in self._unresolved_logged or len(self._unresolved_logged) > 1024:
            return
        self._unresolved_logged.add(entry.ino)
        try:
            name = os.readlink(entry.proc_path)
        except OSError as exc:
            name = f"no name: {exc.strerror}"
        log.warning(
            "inode %d is not under the mount root (the kernel names it %s): requests on it"
            " that a path rule could decide are denied",
            entry.ino,
            name,
        )

    def describe(self, entry: Inode) -> str:
        """The file's path in the volume, for log lines (never raises): else its
        backing path, else its inode number."""
        if entry.fd < 0:
            return f"inode {entry.ino}"
        path = self.paths.of(entry.fd)
        if path is not None:
            return path
        backing = self.paths.backing_of(entry.fd)
        return f"inode {entry.ino}" if backing is None else f"inode {entry.ino} (backing {backing})"

    async def _key_call(self, func: Callable[..., T], *args: Any) -> T:
        if self.keyring.inline:
            return func(*args)
        return await trio.to_thread.run_sync(func, *args, limiter=self._key_limiter)

    async def _io(self, size: int, func: Callable[..., T], *args: Any) -> T:
        """*func(*args)* inline if *size* is below the offload size, else in a worker
        thread."""
        if size < self.offload_bytes:
            return func(*args)
        return await trio.to_thread.run_sync(func, *args, limiter=self._limiter)

    async def _content_run(
        self, entry: Inode, size: int, call: Callable[[ContentFile], T], caller: int = 0
    ) -> T:
        """``call(content)`` on the entry's open ContentFile (EBADF if none) for a
        request of *size* bytes.

        A small request that finds the inode's lock free runs inline without
        awaiting: it cannot interleave with another task.  Otherwise it takes the
        inode's lock, and a large one (``offload_bytes`` or more) runs in a worker
        thread.  In shared mode, when another daemon holds the byte range it needs
        (LockBusy: nothing was done), it waits through ``lock_waits`` (deadline,
        limit, *caller* interrupted: LockWaitFailed and its kin), holding neither
        the inode's lock nor a thread meanwhile.  A request that waited for the lock
        uses the entry's content as it is once it has the lock: the online rekey may
        have switched the file to a new backing inode meanwhile (rekey_online.py).
        """
        content = entry.content
        if content is None:
            raise FUSEError(errno.EBADF)
        busy = None
        if size < self.offload_bytes and not entry.lock.locked():
            try:
                return call(content)
            except LockBusy as exc:
                busy = exc

        async def attempt() -> T:
            async with entry.lock:
                current = entry.content
                if current is None:
                    raise FUSEError(errno.EBADF)
                return await self._io(size, call, current)

        return await self.lock_waits.run(attempt, busy=busy, caller=caller, key=entry.ino)

    async def _release_content(self, entry: Inode) -> None:
        """Give up one open of the entry's content, closing it after the last."""
        async with entry.lock:
            entry.opens -= 1
            self.inodes.drop_content(entry)

    def _new_mode(self, parent: Inode, mode: int, ctx: pyfuse3.RequestContext) -> int:
        """The mode to make a new entry of *parent* with.  With FUSE_DONT_MASK the kernel
        leaves the requester's umask to us: it applies unless *parent* has a default ACL,
        which POSIX lets rule alone (the backing filesystem gives the entry that ACL,
        narrowed only by *mode*; the daemon's own umask is 0).  Without it, the kernel
        has applied the umask to *mode* already, also under a default ACL (which it
        thereby narrows).  OSError if *parent*'s ACL cannot be read."""
        if not self.enable_dont_mask or xattrs.has_default_acl(parent.proc_path):
            return mode
        return mode & ~ctx.umask

    def _own(self, fd: int, parent: Inode, ctx: pyfuse3.RequestContext) -> None:
        """Give a new entry to the caller (group from a setgid parent), as the kernel would."""
        if not self._is_root:
            return
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = os.stat(parent.fd).st_gid
        st = os.stat(fd)
        if (st.st_uid, st.st_gid) == (ctx.uid, gid):
            return  # nothing to change, and chown would clear a set-user-ID bit
        syscalls.fchown_path_fd(fd, ctx.uid, gid)
        # chown clears S_ISUID (and S_ISGID) of a regular file even for root:
        # give back what the creator asked for (S_ISGID only with its own group).
        keep = st.st_mode & (stat.S_ISUID | (stat.S_ISGID if gid == ctx.gid else 0))
        if keep and stat.S_ISREG(st.st_mode):
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode))

    async def _content(self, entry: Inode, requester: dict[str, Any]) -> ContentFile:
        """The entry's open ContentFile, opening the backing file and its key if needed.

        *requester* (``_requester``) goes into the key's audit record.  Call
        with entry.lock held (and after ``content_access.wait_created``).
        """
        if entry.content is not None:
            return entry.content
        fd = await self.inodes.open_content(entry)
        try:
            what = f"inode {entry.ino}"  # replaced by the path if an error is reported
            header = read_header(fd, what)
            self._check_marker(entry, fd, header)
            cipher = await self._key_call(self.keyring.cipher_for, header, what, requester)
            content = self.content_access.content_class.open(
                fd,
                cipher,
                lambda: self.describe(entry),
                header.file_id,
                self._key_usage_of(cipher, header.file_id),
            )
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, KmsfsError):
                raise exc.located(self.describe(entry)) from None
            raise
        if self.on_worn is not None and cipher.max_encryptions:
            on_worn = self.on_worn
            content.on_worn = lambda: on_worn(entry.ino)
        entry.content = content
        return content

    def _key_usage_of(self, cipher: BlockCipher, file_id: bytes) -> KeyUsage | None:
        """The daemon's count of block encryptions under *file_id*'s key if the file's
        format bounds them (format 1), else None (a count of the open file's own)."""
        return self.key_usage.get(file_id) if cipher.max_encryptions else None

    @staticmethod
    def _is_admin(ctx: pyfuse3.RequestContext) -> bool:
        """CAP_SYS_ADMIN of the initial user namespace (what ext4 asks for trusted.*)."""
        return xattrs.is_host_admin(ctx.pid)

    def close(self) -> None:
        """Close every descriptor (after the FUSE loop has ended)."""
        self.inodes.close_all()
