"""pyfuse3 operations: the thin layer that maps FUSE requests onto the backing tree.

This is the only place an errno is chosen.  Lower layers raise OSError (passed
through with its errno) or kmsfs domain errors, which are logged with the file
and cause and answered with EIO (integrity, format, wrong key, provider
outage) or EACCES (the key provider refused access).

Names are not encrypted (see docs/FORMAT.md, "Threat model"); at the root,
names starting with ``.kmsfs`` (the volume config and state) are invisible
and cannot be created, and ``user.kmsfs*`` xattrs are hidden and refused.

Threads: metadata syscalls on the backing filesystem and small reads and
writes run on the trio loop, because a worker-thread hop costs 0.1-0.4 ms on
the machines we measured (docs/DESIGN.md); requests of OFFLOAD_BYTES or more,
fsync, and calls to providers that are not ``inline`` go to worker threads.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from kmsfs.errors import KeyAccessDenied, KmsfsError
from kmsfs.format.content import BlockCipher, Layout
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.format.volume import RESERVED_PREFIX, VolumeConfig
from kmsfs.fs import syscalls, xattrs
from kmsfs.fs.content_file import ContentFile, KeyUsageTable
from kmsfs.fs.events import AccessEvent, AccessSink, access_mode
from kmsfs.fs.headerio import read_header
from kmsfs.fs.inodes import ROOT_INODE, Inode, InodeTable
from kmsfs.fs.requests import OPCODES, RequestStats
from kmsfs.fs.shared import SharedContentFile, locked_plain_size, wait_until_created
from kmsfs.fs.xattrs import Namespace
from kmsfs.keys.keyring import Keyring
from kmsfs.policy import Policy
from kmsfs.policy.identity import HashPending, IdentityCache
from kmsfs.policy.records import audit_record

log = logging.getLogger("kmsfs.fs")

OFFLOAD_BYTES = 128 * 1024 + 1  # reads up to the readahead window run inline (DESIGN.md)
DEFAULT_TIMEOUT = 60.0
_RESERVED_NAME = RESERVED_PREFIX.encode()
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

T = TypeVar("T")
P = ParamSpec("P")


def errno_for(exc: BaseException) -> int:
    """The errno a request answers when its handler raised *exc*.

    OSError keeps its own; the key provider's refusal is EACCES; any other
    kmsfs error (integrity, format, wrong key, provider outage) and anything
    unexpected is EIO.
    """
    if isinstance(exc, FUSEError):
        return int(exc.errno)
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, KeyAccessDenied):
        return errno.EACCES
    return errno.EIO


_FMODE_EXEC = 0x20  # in an OPEN's flags when the kernel opens a file to execute it


def _open_actions(flags: int) -> tuple[str, ...]:
    """The policy actions an open with *flags* needs: read, write, both, or exec."""
    mode = flags & os.O_ACCMODE
    actions: list[str] = []
    if mode in (os.O_RDONLY, os.O_RDWR):
        actions.append("exec" if flags & _FMODE_EXEC else "read")
    if mode in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC:
        actions.append("write")
    return tuple(actions)


def _fuse_op(
    func: Callable[Concatenate[KmsfsOperations, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[KmsfsOperations, P], Coroutine[Any, Any, T]]:
    """Turn every exception of a handler into a FUSEError (pyfuse3 must never see others),
    and count the request, its time and its failure under the handler's FUSE opcode."""
    opcode = OPCODES[func.__name__]

    async def wrapper(self: KmsfsOperations, /, *args: P.args, **kwargs: P.kwargs) -> T:
        counter = self.requests.by_opcode[opcode]
        start = perf_counter_ns()
        try:
            return await func(self, *args, **kwargs)
        except FUSEError:
            counter.errors += 1
            raise
        except OSError as exc:
            counter.errors += 1
            if exc.errno in (errno.EBADF, errno.EMFILE, errno.ENFILE):  # our own descriptors
                log.warning("%s: %s", func.__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
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


class DirHandle:
    __slots__ = ("fd", "ino", "names")

    def __init__(self, fd: int, ino: int) -> None:
        self.fd = fd
        self.ino = ino
        self.names: list[bytes] | None = None


@dataclass
class ServedVolume:
    """The parts an operations object serves with, built by ``serve_volume`` (or a test).

    Attributes: backing (absolute path), config, keyring, inodes (the inode
    table over the backing root's descriptor), key_usage (block encryptions
    per file key), io_limiter (threads for large I/O and fsync), key_limiter
    (threads for provider calls: a KMS outage must not stall other files'
    I/O), timeout (entry and attribute seconds), offload_bytes (reads and
    writes at least this large run in a thread), on_access (the audit log's
    sink for every open and create, or None), policy (the access policy;
    permit-all without one), identities (requester identities for it),
    on_policy (the audit log's sink for policy decisions marked for audit),
    shared (other daemons serve the volume too: docs/DESIGN.md "Shared storage").
    """

    backing: str
    config: VolumeConfig
    keyring: Keyring
    inodes: InodeTable
    key_usage: KeyUsageTable
    io_limiter: trio.CapacityLimiter
    key_limiter: trio.CapacityLimiter
    timeout: float = DEFAULT_TIMEOUT
    offload_bytes: int = OFFLOAD_BYTES
    on_access: AccessSink | None = None
    policy: Policy = field(default_factory=Policy.permit_all)
    identities: IdentityCache = field(default_factory=IdentityCache)
    on_policy: Callable[[dict[str, Any]], None] | None = None
    shared: bool = False


def serve_volume(
    backing: str,
    config: VolumeConfig,
    keyring: Keyring,
    timeout: float = DEFAULT_TIMEOUT,
    on_access: AccessSink | None = None,
    policy: Policy | None = None,
    on_policy: Callable[[dict[str, Any]], None] | None = None,
    shared: bool = False,
) -> ServedVolume:
    """The parts for *backing*: its root descriptor, an inode table sized to the descriptor
    limit (a quarter of it, at most 2,048, stays free for open files), fresh limiters.
    *shared*: every content request runs in a worker thread (it may wait for another
    daemon's byte-range lock)."""
    backing = os.path.abspath(backing)
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    inodes = InodeTable(
        os.open(backing, _O_PATH | os.O_DIRECTORY),
        high_water=fd_limit - min(fd_limit // 4, 2048) if fd_limit > 0 else 1 << 30,
    )
    return ServedVolume(
        backing,
        config,
        keyring,
        inodes,
        KeyUsageTable(),
        io_limiter=trio.CapacityLimiter(4),
        key_limiter=trio.CapacityLimiter(8),
        timeout=timeout,
        offload_bytes=0 if shared else OFFLOAD_BYTES,
        on_access=on_access,
        policy=policy or Policy.permit_all(),
        on_policy=on_policy,
        shared=shared,
    )


class KmsfsOperations(pyfuse3.Operations):
    """Serves one volume with the parts it is given (``ServedVolume``).

    Attributes: backing (path), config, keyring, inodes, key_usage, timeout,
    offload_bytes, on_access, and the counters errors, bytes_read, bytes_written
    and requests (per FUSE opcode, ``kmsfs.fs.requests``).
    """

    enable_writeback_cache = True
    # FUSE_POSIX_ACL: the kernel caches ACLs and checks them with default_permissions
    # (and stops asking for them on every ls -l); they are stored on the backing files.
    enable_acl = True

    def __init__(self, parts: ServedVolume) -> None:
        super().__init__()
        self.backing = parts.backing
        self.config = parts.config
        self.keyring = parts.keyring
        self.on_access = parts.on_access
        self._volume_hex = parts.config.volume_id.hex()
        self.layout = Layout(parts.config.block_size)
        self._timeout = parts.timeout  # the configured one; ``timeout`` may be 0 (policy)
        self.timeout = parts.timeout
        self.offload_bytes = parts.offload_bytes
        self.inodes = parts.inodes
        self._dirs: dict[int, DirHandle] = {}
        self._next_dir = 1
        # Block encryptions per file key, kept across opens and closes (FORMAT.md,
        # "How much one file key may encrypt")
        self.key_usage = parts.key_usage
        self._limiter = parts.io_limiter
        self._key_limiter = parts.key_limiter
        self._is_root = os.geteuid() == 0
        self.identities = parts.identities
        self.on_policy = parts.on_policy
        self.policy = parts.policy
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.requests = RequestStats()
        self._forgets = self.requests.counter("forget")
        # Shared mode: no writeback cache (the kernel would write back whole pages over
        # another host's bytes), no page cache kept across opens, sizes from the backing.
        self.shared = parts.shared
        self._content_class = SharedContentFile if parts.shared else ContentFile
        if parts.shared:
            self.enable_writeback_cache = False

    # -- helpers -----------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        entry = self.inodes.get(ino)
        if entry is None:
            raise FUSEError(errno.ESTALE)
        if entry.fd < 0:
            self.inodes.open_deferred(entry)
        return entry

    def _attr(
        self, st: os.stat_result, entry: Inode | None = None, size: int | None = None
    ) -> pyfuse3.EntryAttributes:
        """Attributes of backing inode *st*; a regular file's size is *size* if given.

        Shared mode: a size the caller did not read under a lock (``_shared_attr``)
        is not cached by the kernel (attribute timeout 0), as another daemon may have
        been extending the file when the backing size was read.
        """
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = entry.ino if entry is not None else self.inodes.fuse_ino(st.st_ino)
        attr.generation = 0
        attr.entry_timeout = self.timeout
        attr.attr_timeout = self.timeout
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        if stat.S_ISREG(st.st_mode):
            if size is not None:
                attr.st_size = size
            elif entry is not None and entry.content is not None and not self.shared:
                attr.st_size = entry.content.size
            else:
                attr.st_size = self.layout.plain_size(st.st_size)
                if self.shared:
                    attr.attr_timeout = 0
        else:
            attr.st_size = st.st_size
        attr.st_blksize = self.config.block_size
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    async def _shared_attr(self, st: os.stat_result, entry: Inode) -> pyfuse3.EntryAttributes:
        """``_attr``, with a regular file's size read under a lock in shared mode."""
        if not (self.shared and stat.S_ISREG(st.st_mode)):
            return self._attr(st, entry)
        size = await trio.to_thread.run_sync(
            locked_plain_size, entry.proc_path, self.layout, limiter=self._limiter
        )
        return self._attr(st, entry, size)

    async def _inode_waiting(self, ino: int) -> Inode:
        """``_inode`` for requests that hold no directory lock (getattr, open,
        opendir, setattr): if a deferred entry finds no free descriptor, wait up
        to 2 s for the kernel to forget older entries instead of failing."""
        for _ in range(200):
            try:
                return self._inode(ino)
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                self._trim(force=True)  # more victims: the pending ones may be in use
                await trio.sleep(0.01)
        return self._inode(ino)

    def _trim(self, force: bool = False) -> None:
        """Past the high-water mark, ask the kernel to forget the oldest unused entries.

        Each entry holds a descriptor, and the kernel keeps entries until memory
        runs short: without this, a directory of more files than RLIMIT_NOFILE
        would fail with EMFILE.  Invalidation is queued to pyfuse3's notify
        thread; the FORGETs that follow close the descriptors.
        """
        table = self.inodes
        if not force and not table.over_high_water():  # O(1): on every lookup and create
            return
        for parent, name in table.victims(table.high_water // 4):
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    def _check_name(self, parent: int, name: bytes) -> None:
        """EPERM for names reserved for kmsfs's own files at the root."""
        if parent == ROOT_INODE and name.startswith(_RESERVED_NAME):
            raise FUSEError(errno.EPERM)

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """Swap the access policy (SIGHUP reload).  When two processes may be shown
        different things for one name (``list`` rules that test the requester), entries
        and attributes are not cached by the kernel (docs/DESIGN.md "Access policy")."""
        self._policy = policy
        self.timeout = 0.0 if policy.varies_by_requester("list") else self._timeout

    async def _allow(
        self,
        ctx: pyfuse3.RequestContext,
        action: str,
        path: Callable[[], str],
        tree: bool = False,
    ) -> None:
        """EACCES unless the access policy lets the requester do *action* on *path*.

        With *tree*, on *path* and everything below it (renaming a directory).
        Decisions marked for audit go to ``on_policy``.  Permit-all policies cost
        one dictionary look-up.
        """
        policy = self._policy
        if not policy.applies(action):
            decision = policy.default_decision
            if decision.allowed and not decision.audit:
                return
            requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
        else:
            requester = self.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
            try:
                decision = self._decide(policy, requester, action, path, tree)
            except HashPending:  # a rule needs the program's SHA-256: read it off the loop
                await trio.to_thread.run_sync(requester.compute_sha256, limiter=self._key_limiter)
                decision = self._decide(policy, requester, action, path, tree)
        if decision.audit and self.on_policy is not None:
            self.on_policy(audit_record(requester, action, path(), decision))
        if not decision.allowed:
            raise FUSEError(errno.EACCES)  # the access policy denies it

    @staticmethod
    def _decide(
        policy: Policy, requester: Any, action: str, path: Callable[[], str], tree: bool
    ) -> Any:
        if tree:
            return policy.decide_tree(requester, action, path())
        return policy.decide(requester, action, path)

    async def _allow_rename(
        self,
        ctx: pyfuse3.RequestContext,
        old_parent: Inode,
        old_name: bytes,
        new_parent: Inode,
        new_name: bytes,
    ) -> None:
        """rename on the source (and all below it), create on the destination, delete on a
        name it replaces; the existence check costs a syscall only under a delete rule."""
        await self._allow(ctx, "rename", self._path_of(old_parent, old_name), tree=True)
        await self._allow(ctx, "create", self._path_of(new_parent, new_name))
        if self._policy.applies("delete") or not self._policy.default_decision.allowed:
            try:
                os.stat(new_name, dir_fd=new_parent.fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            await self._allow(ctx, "delete", self._path_of(new_parent, new_name), tree=True)

    def _path_of(self, entry: Inode, name: bytes | None = None) -> Callable[[], str]:
        """The volume path of *entry* (or of *name* inside it), computed when asked."""

        def path() -> str:
            base = self.describe(entry)
            return base if name is None else os.path.join(base, os.fsdecode(name))

        return path

    def describe(self, entry: Inode) -> str:
        """The file's path in the volume, for log lines (never raises)."""
        try:
            path = os.readlink(entry.proc_path)
        except OSError:
            return f"inode {entry.ino}"
        if path.startswith(self.backing):
            path = path[len(self.backing) :] or "/"
        return path

    def _requester(
        self,
        ctx: pyfuse3.RequestContext | None,
        entry: Inode | None,
        name: bytes | None = None,
    ) -> dict[str, Any]:
        """Who asked, for the audit log (built only when there is one: two small
        /proc reads per request, on the loop).

        The path is the entry's, or *name* inside the directory *entry*.  The
        process may have exited (or be a kernel thread): then "process" and
        "exe" are empty.
        """
        if self.on_access is None or ctx is None:
            return {}
        try:
            with open(f"/proc/{ctx.pid}/comm") as handle:
                process = handle.read().strip()
        except OSError:
            process = ""
        try:
            exe = os.readlink(f"/proc/{ctx.pid}/exe")
        except OSError:
            exe = ""
        info: dict[str, Any] = {
            "uid": ctx.uid,
            "gid": ctx.gid,
            "pid": ctx.pid,
            "process": process,
            "exe": exe,
        }
        if entry is not None:
            path = self.describe(entry)
            if name is not None:
                path = os.path.join(path, os.fsdecode(name))
            info["path"] = path
        return info

    def _audit_access(
        self,
        operation: str,
        flags: int,
        requester: dict[str, Any],
        file_id: bytes | None,
        exc: BaseException | None = None,
    ) -> None:
        """Report an open or create, allowed (*exc* None) or refused, to the audit log."""
        if self.on_access is None:
            return
        if exc is None:
            result, error = "ok", ""
        else:
            code = errno_for(exc)
            result = errno.errorcode.get(code, str(code))
            error = os.strerror(code) if isinstance(exc, FUSEError) else str(exc)
        self.on_access(
            AccessEvent(
                operation,
                access_mode(flags),
                self._volume_hex,
                file_id.hex() if file_id else "",
                result,
                error,
                requester,
            )
        )

    async def _key_call(self, func: Callable[..., T], *args: Any) -> T:
        if self.keyring.inline:
            return func(*args)
        return await trio.to_thread.run_sync(func, *args, limiter=self._key_limiter)

    async def _io(self, size: int, func: Callable[..., T], *args: Any) -> T:
        if size < self.offload_bytes:
            return func(*args)
        return await trio.to_thread.run_sync(func, *args, limiter=self._limiter)

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
        with entry.lock held.
        """
        if entry.content is not None:
            return entry.content
        try:
            fd = os.open(entry.proc_path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            fd = os.open(entry.proc_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            what = f"inode {entry.ino}"  # replaced by the path if an error is reported
            if self.shared:  # another daemon may be between its O_EXCL open and the header
                await trio.to_thread.run_sync(
                    wait_until_created, fd, functools.partial(_has_header, fd), what
                )
            header = read_header(fd, what)
            cipher = await self._key_call(self.keyring.cipher_for, header, what, requester)
            content = self._content_class.open(
                fd,
                cipher,
                lambda: self.describe(entry),
                header.file_id,
                self.key_usage.get(header.file_id),
            )
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, KmsfsError):
                raise exc.located(self.describe(entry)) from None
            raise
        entry.content = content
        return content

    def _drop_content(self, entry: Inode) -> None:
        if entry.content is not None and entry.opens == 0:
            os.close(entry.content.fd)
            entry.content = None

    # -- lookup and attributes ---------------------------------------------

    @_fuse_op
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        if parent_inode == ROOT_INODE and (name.startswith(_RESERVED_NAME) or name == b".."):
            if name == b"..":
                st = os.stat(parent.fd)
                parent.lookups += 1
                return self._attr(st, parent)
            raise FUSEError(errno.ENOENT)
        await self._allow(ctx, "list", self._path_of(parent, name))
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.timeout
            return negative
        entry, st = self.inodes.remember(st, parent_inode, name)
        self._trim()
        if entry.fd < 0:  # deferred: no descriptor to read a locked size through
            return self._attr(st, entry)
        return await self._shared_attr(st, entry)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Not wrapped in _fuse_op: FORGET has no answer, and pyfuse3 must never see
        # an exception from it; counted here instead.
        start = perf_counter_ns()
        for ino, count in inode_list:
            try:
                self.inodes.forget(ino, count)
            except OSError as exc:  # closing a descriptor cannot really fail; never raise here
                log.warning("forget inode %d: %s", ino, exc)
        self._forgets.add(perf_counter_ns() - start)

    @_fuse_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = await self._inode_waiting(inode)
        await self._allow(ctx, "list", self._path_of(entry))
        return await self._shared_attr(os.stat(entry.fd), entry)

    @_fuse_op
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        entry = await self._inode_waiting(inode)
        await self._allow(ctx, "write", self._path_of(entry))
        if fields.update_size:
            if not entry.is_regular:
                raise FUSEError(errno.EISDIR if stat.S_ISDIR(entry.mode) else errno.EINVAL)
            async with entry.lock:
                content = await self._content(entry, self._requester(ctx, entry))
                try:
                    await self._io(0, content.truncate, attr.st_size)
                finally:
                    self._drop_content(entry)
        if fields.update_mode and not stat.S_ISLNK(entry.mode):
            os.chmod(entry.proc_path, stat.S_IMODE(attr.st_mode))
            entry.mode = stat.S_IFMT(entry.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid or fields.update_gid:
            syscalls.fchown_path_fd(
                entry.fd,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
            )
        if fields.update_atime or fields.update_mtime:
            syscalls.utimens_path_fd(
                entry.fd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
        return await self._shared_attr(os.stat(entry.fd), entry)

    @_fuse_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        entry = self._inode(inode)
        await self._allow(ctx, "list", self._path_of(entry))
        return os.readlink(b"", dir_fd=entry.fd)

    # -- directory entries -------------------------------------------------

    async def _created(
        self, parent: Inode, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Count the first lookup of an entry just made in *parent*, owned by the caller."""
        fd = os.open(name, _O_PATH, dir_fd=parent.fd)
        try:
            self._own(fd, parent, ctx)
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        entry = self.inodes.adopt(st, fd, parent.ino, name)
        self._trim()
        return self._attr(st, entry)

    @_fuse_op
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        await self._allow(ctx, "create", self._path_of(parent, name))
        if stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)  # regular files are made by create, with a header
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        return await self._created(parent, name, ctx)

    @_fuse_op
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        await self._allow(ctx, "create", self._path_of(parent, name))
        os.mkdir(name, mode, dir_fd=parent.fd)
        return await self._created(parent, name, ctx)

    @_fuse_op
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        await self._allow(ctx, "create", self._path_of(parent, name))
        os.symlink(target, name, dir_fd=parent.fd)
        return await self._created(parent, name, ctx)

    @_fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        await self._allow(ctx, "delete", self._path_of(parent, name))
        os.unlink(name, dir_fd=parent.fd)

    @_fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        await self._allow(ctx, "delete", self._path_of(parent, name))
        os.rmdir(name, dir_fd=parent.fd)

    @_fuse_op
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._check_name(parent_inode_old, name_old)
        self._check_name(parent_inode_new, name_new)
        old_parent, new_parent = self._inode(parent_inode_old), self._inode(parent_inode_new)
        await self._allow_rename(ctx, old_parent, name_old, new_parent, name_new)
        old_fd = old_parent.fd
        new_fd = new_parent.fd
        if flags:
            syscalls.renameat2(old_fd, name_old, new_fd, name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=old_fd, dst_dir_fd=new_fd)

    @_fuse_op
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_name(new_parent_inode, new_name)
        entry = self._inode(inode)
        parent = self._inode(new_parent_inode)
        await self._allow(ctx, "rename", self._path_of(entry))  # a new name for it
        await self._allow(ctx, "create", self._path_of(parent, new_name))
        os.link(entry.proc_path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        entry.lookups += 1
        return await self._shared_attr(os.stat(entry.fd), entry)

    # -- directories -------------------------------------------------------

    @_fuse_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        entry = await self._inode_waiting(inode)
        await self._allow(ctx, "list", self._path_of(entry))
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=entry.fd)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = DirHandle(fd, inode)
        return fh

    @_fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        if handle.names is None or start_id == 0:
            names = [os.fsencode(n) for n in os.listdir(handle.fd)]
            if handle.ino == ROOT_INODE:
                names = [n for n in names if not n.startswith(_RESERVED_NAME)]
            handle.names = names
        names = handle.names
        fd = handle.fd
        # Offsets: 1 is ".", 2 is "..", 3 + i is names[i].  The kernel takes no
        # lookup reference for the dot entries.
        if start_id < 1:
            st = os.stat(fd)
            if not pyfuse3.readdir_reply(
                token, b".", self._attr(st, self.inodes.get(handle.ino)), 1
            ):
                return
        if start_id < 2:
            st = os.stat("..", dir_fd=fd) if handle.ino != ROOT_INODE else os.stat(fd)
            if not pyfuse3.readdir_reply(token, b"..", self._attr(st), 2):
                return
        for index in range(max(start_id - 2, 0), len(names)):
            name = names[index]
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            known = self.inodes.get(self.inodes.fuse_ino(st.st_ino))
            new_fd = None
            if known is None:  # open it before the kernel counts a reference to it
                try:
                    new_fd = os.open(name, _O_PATH, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EMFILE:
                        raise
                    new_fd = -1  # opened on first use (InodeTable.open_deferred)
                else:  # the name may lead elsewhere by now: describe what was opened
                    st = os.fstat(new_fd)
                    known = self.inodes.get(self.inodes.fuse_ino(st.st_ino))
                    if known is not None:
                        os.close(new_fd)
                        new_fd = None
            if not pyfuse3.readdir_reply(token, name, self._attr(st, known), index + 3):
                if new_fd is not None and new_fd >= 0:
                    os.close(new_fd)
                break
            if new_fd is None:
                self.inodes.remember(st, handle.ino, name)
            else:
                self.inodes.adopt(st, new_fd, handle.ino, name)
        self._trim()

    @_fuse_op
    async def releasedir(self, fh: int) -> None:
        os.close(self._dirs.pop(fh).fd)

    @_fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fsync, self._dirs[fh].fd, limiter=self._limiter)

    @_fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        vfs = os.statvfs(self.backing)
        data = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(data, name, getattr(vfs, name))
        data.f_namemax = vfs.f_namemax
        return data

    # -- files -------------------------------------------------------------

    @_fuse_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        requester: dict[str, Any] = {}
        file_id = None
        try:
            self._check_name(parent_inode, name)
            parent = self._inode(parent_inode)
            requester = self._requester(ctx, parent, name)
            path = self._path_of(parent, name)
            await self._allow(ctx, "create", path)
            for action in _open_actions(flags):
                await self._allow(ctx, action, path)
            header, cipher = await self._key_call(
                self.keyring.new_file_cipher, self.config.block_size, requester
            )
            file_id = header.file_id
            answer = self._create(parent, name, mode, ctx, header, cipher)
        except Exception as exc:
            if self.shared and isinstance(exc, FileExistsError) and not flags & os.O_EXCL:
                # Another daemon created it since our negative lookup: open theirs
                # (O_CREAT without O_EXCL), as a local filesystem would.
                return await self._open_created_elsewhere(parent_inode, name, flags, ctx)
            self._audit_access("create", flags, requester or self._requester(ctx, None), None, exc)
            raise
        self._audit_access("create", flags, requester, file_id)
        return answer

    def _create(
        self,
        parent: Inode,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        header: FileHeader,
        cipher: BlockCipher,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Create *name* in *parent* with the new file's *header*, its blocks sealed by
        *cipher*; nothing is left behind if a step fails."""
        file_id = header.file_id
        fd = os.open(
            name,
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            stat.S_IMODE(mode),
            dir_fd=parent.fd,
        )
        try:
            os.setxattr(fd, XATTR_NAME, header.pack())
            self._own(fd, parent, ctx)
            content = self._content_class(
                fd,
                cipher,
                0,
                lambda: name.decode(errors="replace"),
                file_id,
                self.key_usage.get(file_id),
            )
            content.write_empty()
            st = os.fstat(fd)
            path_fd = os.dup(fd)  # serves as the inode's descriptor, like an O_PATH one
        except BaseException:
            os.close(fd)
            try:
                os.unlink(name, dir_fd=parent.fd)
            except OSError:
                pass
            raise
        entry = self.inodes.adopt(st, path_fd, parent.ino, name)
        self._trim()
        content.describe = lambda: self.describe(entry)
        entry.content = content
        entry.opens += 1
        info = pyfuse3.FileInfo(fh=entry.ino, keep_cache=not self.shared)
        return info, self._attr(st, entry, content.size)

    async def _open_created_elsewhere(
        self, parent_inode: int, name: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Shared mode: lookup and open *name*, which another daemon just created."""
        attr = await self.lookup(parent_inode, name, ctx)
        if attr.st_ino == 0:  # and removed again meanwhile
            raise FUSEError(errno.ENOENT)
        try:
            info = await self.open(attr.st_ino, flags & ~(os.O_CREAT | os.O_EXCL), ctx)
        except BaseException:
            await self.forget([(attr.st_ino, 1)])
            raise
        return info, attr

    @_fuse_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # Every open reaches the audit log, also of a file already open (whose key
        # needs no provider call).  Opens the kernel refuses itself (permission
        # bits, default_permissions) never get here.
        requester: dict[str, Any] = {}
        try:
            entry = await self._inode_waiting(inode)
            requester = self._requester(ctx, entry)
            for action in _open_actions(flags):
                await self._allow(ctx, action, self._path_of(entry))
            if not entry.is_regular:
                raise FUSEError(errno.EINVAL)
            async with entry.lock:
                content = await self._content(entry, requester)
                entry.opens += 1
                if flags & os.O_TRUNC and (content.size or self.shared):
                    await self._io(0, content.truncate, 0)
        except Exception as exc:
            self._audit_access("open", flags, requester or self._requester(ctx, None), None, exc)
            raise
        self._audit_access("open", flags, requester, content.file_id)
        return pyfuse3.FileInfo(fh=inode, keep_cache=not self.shared)

    async def _content_call(self, fh: int, size: int, call: Callable[[ContentFile], T]) -> T:
        """Run *call* on the open file's ContentFile under the inode's lock, offloading
        large requests (``size`` at least ``offload_bytes``) to a worker thread.

        A small request runs inline without awaiting: it cannot interleave with
        another task, so it only waits for the lock if a worker thread holds it.
        """
        entry = self._inode(fh)
        content = entry.content
        if content is None:
            raise FUSEError(errno.EBADF)
        if size < self.offload_bytes and not entry.lock.locked():
            return call(content)
        async with entry.lock:
            return await self._io(size, call, content)

    @_fuse_op
    async def read(  # type: ignore[override]  # pyfuse3 takes any buffer: no copy
        self, fh: int, off: int, size: int
    ) -> bytes | bytearray:
        data = await self._content_call(fh, size, lambda content: content.read(off, size))
        self.bytes_read += len(data)
        return data

    @_fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        written = await self._content_call(fh, len(buf), lambda content: content.write(off, buf))
        self.bytes_written += written
        return written

    @_fuse_op
    async def flush(self, fh: int) -> None:
        # Nothing to do: writes reach the backing file when they arrive, and the
        # kernel writes back its cached pages before it sends FLUSH.  ENOSYS
        # tells the kernel to stop sending FLUSH on every close (one round trip).
        raise FUSEError(errno.ENOSYS)

    @_fuse_op
    async def release(self, fh: int) -> None:
        entry = self._inode(fh)
        async with entry.lock:
            entry.opens -= 1
            self._drop_content(entry)
        self.inodes.release_if_unused(entry)

    @_fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        entry = self._inode(fh)
        content = entry.content
        if content is not None:
            await trio.to_thread.run_sync(content.fsync, datasync, limiter=self._limiter)

    # -- extended attributes -----------------------------------------------

    @_fuse_op
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        kind = xattrs.namespace_of(name)
        if kind is Namespace.RESERVED:
            raise FUSEError(errno.EPERM)
        if kind is Namespace.UNSUPPORTED:
            raise FUSEError(errno.EOPNOTSUPP)  # see kmsfs/fs/xattrs.py
        if kind is Namespace.PRIVILEGED and not self._is_admin(ctx):
            raise FUSEError(errno.EPERM)
        entry = self._inode(inode)
        await self._allow(ctx, "write", self._path_of(entry))
        os.setxattr(entry.proc_path, name, value)

    @_fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # ls -l asks for security.selinux on every file, and the kernel for
        # security.capability on every write: no syscall for those.
        kind = xattrs.namespace_of(name)
        if kind is Namespace.PRIVILEGED and self._is_admin(ctx) or kind is Namespace.STORED:
            entry = self._inode(inode)
            await self._allow(ctx, "list", self._path_of(entry))
            return os.getxattr(entry.proc_path, name)
        raise FUSEError(errno.ENODATA)

    @_fuse_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        entry = self._inode(inode)
        await self._allow(ctx, "list", self._path_of(entry))
        names = [os.fsencode(n) for n in os.listxattr(entry.proc_path)]
        kinds = {name: xattrs.namespace_of(name) for name in names}
        admin = Namespace.PRIVILEGED in kinds.values() and self._is_admin(ctx)
        return [
            name
            for name, kind in kinds.items()
            if kind is Namespace.STORED or kind is Namespace.PRIVILEGED and admin
        ]

    @_fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        kind = xattrs.namespace_of(name)
        if kind is Namespace.PRIVILEGED and not self._is_admin(ctx):
            raise FUSEError(errno.EPERM)
        if kind is Namespace.RESERVED or kind is Namespace.UNSUPPORTED:
            raise FUSEError(errno.ENODATA)
        entry = self._inode(inode)
        await self._allow(ctx, "write", self._path_of(entry))
        os.removexattr(entry.proc_path, name)

    @staticmethod
    def _is_admin(ctx: pyfuse3.RequestContext) -> bool:
        """CAP_SYS_ADMIN in the requester's effective set (what ext4 asks for trusted.*)."""
        return xattrs.has_capability(ctx.pid, xattrs.CAP_SYS_ADMIN)

    def close(self) -> None:
        """Close every descriptor (after the FUSE loop has ended)."""
        for handle in self._dirs.values():
            os.close(handle.fd)
        self._dirs.clear()
        self.inodes.close_all()


def _has_header(fd: int) -> bool:
    """True if the open backing file *fd* has a kmsfs header xattr."""
    try:
        os.getxattr(fd, XATTR_NAME)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return False
    return True
