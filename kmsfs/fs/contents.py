"""The content handlers: create, open, read, write, flush, release, fsync, and the
open files' content they work on (opening it with its key, running a request on it
inline or in a worker thread, in shared mode after waiting for another daemon's lock).

Threads: small reads and writes run on the trio loop, because a worker-thread hop
costs 0.1-0.4 ms on the machines we measured (docs/DESIGN.md); requests of
OFFLOAD_BYTES or more, fsync while another request waits (kmsfs/fs/syncs.py), and
calls to providers that are not ``inline`` go to worker threads.  In shared mode
nothing waits for another daemon in a thread: a request that finds another daemon's
lock in its way waits through ``lock_waits`` (kmsfs/fs/lockwait.py), on the loop,
with a deadline.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from kmsfs.backing.content_file import ContentFile, KeyUsage
from kmsfs.backing.header_xattr import read_header, write_new_header
from kmsfs.backing.shared import LockBusy
from kmsfs.errors import KmsfsError
from kmsfs.format.content import BlockCipher
from kmsfs.format.header import FileHeader
from kmsfs.fs.access import Access, open_actions
from kmsfs.fs.attributes import Attributes
from kmsfs.fs.content_access import LocalContentAccess
from kmsfs.fs.errno_map import LookAgain, log
from kmsfs.fs.inodes import Inode
from kmsfs.fs.lockwait import LockWaits
from kmsfs.fs.places import Places
from kmsfs.fs.served import ServedVolume
from kmsfs.fs.syncs import SyncPath

T = TypeVar("T")

# Shared mode's create that finds the name made by another daemon meanwhile:
# (parent inode, name, flags, ctx) -> the open of that file (``KmsfsOperations``).
OpenCreatedElsewhere = Callable[
    [int, bytes, int, pyfuse3.RequestContext],
    Awaitable[tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]],
]


class Contents:
    """The open files' content and the handlers that reach it.

    Attributes: keyring, key_usage (block encryptions per file key, kept across
    opens and closes: FORMAT.md "How much one file key may encrypt"), offload_bytes,
    io_limiter (threads for large I/O and fsync), syncs (where FSYNC and FSYNCDIR
    run: kmsfs/fs/syncs.py), content_access (local or shared:
    kmsfs/fs/content_access.py), lock_waits (shared mode's waits for other daemons),
    on_worn (``-o auto_rekey``'s queue, or None), header_room (whether new files'
    headers fit in the backing inodes: kmsfs/backing/inode_room.py).
    """

    def __init__(
        self,
        parts: ServedVolume,
        places: Places,
        access: Access,
        attributes: Attributes,
        content_access: LocalContentAccess,
        lock_waits: LockWaits,
        open_created_elsewhere: OpenCreatedElsewhere,
        syncs: SyncPath,
    ) -> None:
        self.places = places
        self.access = access
        self.attributes = attributes
        self.content_access = content_access
        self.lock_waits = lock_waits
        self.open_created_elsewhere = open_created_elsewhere
        self.syncs = syncs
        self.config = parts.config
        self.backing = parts.backing
        self.keyring = parts.keyring
        self.inodes = parts.inodes
        self.names = parts.names
        self.key_usage = parts.key_usage
        self.header_room = parts.header_room
        self.offload_bytes = parts.offload_bytes
        self.io_limiter = parts.io_limiter
        self._key_limiter = parts.key_limiter
        # -o auto_rekey: called with the inode of a file whose format-1 key reached the
        # usage warning (kmsfs/server/rekey_job.py queues it for an online rekey)
        self.on_worn: Callable[[int], None] | None = None

    async def key_call(self, func: Callable[..., T], *args: Any) -> T:
        if self.keyring.inline:
            return func(*args)
        return await trio.to_thread.run_sync(func, *args, limiter=self._key_limiter)

    async def _io(self, size: int, func: Callable[..., T], *args: Any) -> T:
        """*func(*args)* inline if *size* is below the offload size, else in a worker
        thread."""
        if size < self.offload_bytes:
            return func(*args)
        return await trio.to_thread.run_sync(func, *args, limiter=self.io_limiter)

    async def run(
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

    async def release_content(self, entry: Inode) -> None:
        """Give up one open of the entry's content, closing it after the last."""
        async with entry.lock:
            entry.opens -= 1
            self.inodes.drop_content(entry)

    async def content(self, entry: Inode, requester: dict[str, Any]) -> ContentFile:
        """The entry's open ContentFile, opening the backing file and its key if needed.

        *requester* (``Access.requester``) goes into the key's audit record.  Call
        with entry.lock held (and after ``content_access.wait_created``).
        """
        if entry.content is not None:
            return entry.content
        fd = await self.inodes.open_content(entry)
        try:
            what = f"inode {entry.ino}"  # replaced by the path if an error is reported
            header = read_header(fd, what)
            self.attributes.check_marker(entry, fd, header)
            cipher = await self.key_call(self.keyring.cipher_for, header, what, requester)
            content = self.content_access.content_class.open(
                fd,
                cipher,
                lambda: self.places.describe(entry),
                header.file_id,
                self._key_usage_of(cipher, header.file_id),
            )
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, KmsfsError):
                raise exc.located(self.places.describe(entry)) from None
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

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        requester: dict[str, Any] = {}
        file_id = None
        try:
            self.places.check_name(parent_inode, name)
            parent = self.inodes.entry(parent_inode)
            requester = self.access.requester(ctx, parent, name)
            path = self.places.path_of(parent, name)
            await self.access.allow(ctx, "create", path)
            for action in open_actions(flags):
                await self.access.allow(ctx, action, path)
            header, cipher = await self.key_call(
                self.keyring.new_file_cipher, self.config.block_size, requester
            )
            file_id = header.file_id
            answer = self._create(parent, name, mode, ctx, header, cipher)
        except Exception as exc:
            if self.content_access.opens_created_elsewhere(exc, flags):
                # Another daemon created it since our negative lookup: open theirs
                # (O_CREAT without O_EXCL), as a local filesystem would.
                return await self.open_created_elsewhere(parent_inode, name, flags, ctx)
            self.access.audit_access(
                "create", flags, requester or self.access.requester(ctx, None), None, exc
            )
            raise
        self.access.audit_access("create", flags, requester, file_id)
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
        directory = self.places.dir(parent)
        fd, backing = self.names.open_new(
            directory,
            name,
            os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            stat.S_IMODE(self.places.new_mode(parent, mode, ctx)),
        )
        try:
            header_size = write_new_header(fd, header)
            self.places.own(fd, parent, ctx)
            content = self.content_access.content_class(
                fd,
                cipher,
                0,
                lambda: name.decode(errors="replace"),
                file_id,
                self._key_usage_of(cipher, file_id),
            )
            content.write_empty()
            st = os.fstat(fd)
            path_fd = os.dup(fd)  # serves as the inode's descriptor, like an O_PATH one
        except BaseException:
            os.close(fd)
            try:
                self.names.unlink(directory, name)
            except OSError:
                pass
            raise
        if self.header_room.note_header(header_size):
            log.warning(
                "file headers of %d bytes do not fit the %d bytes the backing filesystem keeps"
                " in an inode (%s): each file takes one more 4 KiB block, and a cold open or"
                " ACL lookup one more disk read; an ext4 made with larger inodes keeps them"
                ' there (docs/SERVERS.md, "The backing filesystem")',
                header_size,
                self.header_room.xattr_bytes,
                self.backing,
            )
        entry = self.inodes.adopt(st, path_fd, parent.ino, name, backing=backing)
        entry.format = header.version
        self.inodes.trim()
        content.describe = lambda: self.places.describe(entry)
        entry.content = content
        entry.opens += 1
        info = pyfuse3.FileInfo(fh=entry.ino, keep_cache=self.content_access.keep_cache)
        kept_for = self.access.timeout_for(self.places.path_of(parent, name))
        return info, self.attributes.of(st, entry, content.size, kept_for)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # Every open reaches the audit log, also of a file already open (whose key
        # needs no provider call).  Opens the kernel refuses itself (permission
        # bits, default_permissions) never get here.
        requester: dict[str, Any] = {}
        try:
            entry = await self.inodes.entry_waiting(inode)
            requester = self.access.requester(ctx, entry)
            for action in open_actions(flags):
                await self.access.allow(ctx, action, self.places.path_of(entry))
            if "exec" in open_actions(flags):
                await self.access.warn_exec_only(ctx, entry)
            if not entry.is_regular:
                raise FUSEError(errno.EINVAL)
            await self.content_access.wait_created(entry, ctx.pid)
            async with entry.lock:
                content = await self.content(entry, requester)
                entry.opens += 1
            if flags & os.O_TRUNC and self.content_access.truncates_on_open(content):
                try:
                    await self.run(entry, 0, lambda c: c.truncate(0), ctx.pid)
                except BaseException:
                    await self.release_content(entry)  # the kernel sends no RELEASE
                    raise
        except LookAgain:
            raise  # the kernel retries the open, which is audited
        except Exception as exc:
            self.access.audit_access(
                "open", flags, requester or self.access.requester(ctx, None), None, exc
            )
            raise
        self.access.audit_access("open", flags, requester, content.file_id)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.content_access.keep_cache)

    # read and write get no request context from pyfuse3: their waits for another
    # daemon's lock end at the deadline, never because the caller was interrupted.

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        entry = self.inodes.entry(fh)
        return await self.run(entry, size, lambda content: content.read(off, size))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        entry = self.inodes.entry(fh)
        return await self.run(entry, len(buf), lambda content: content.write(off, buf))

    async def flush(self, fh: int) -> None:
        # Nothing to do: writes reach the backing file when they arrive, and the
        # kernel writes back its cached pages before it sends FLUSH.  ENOSYS
        # tells the kernel to stop sending FLUSH on every close (one round trip).
        raise FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        entry = self.inodes.entry(fh)
        await self.release_content(entry)
        self.inodes.release_if_unused(entry)

    async def fsync(self, fh: int, datasync: bool) -> None:
        entry = self.inodes.entry(fh)
        content = entry.content
        if content is not None:
            await self.syncs.run(content.fsync, datasync, unsynced=content.unsynced)

    async def truncate(self, entry: Inode, size: int, ctx: pyfuse3.RequestContext) -> None:
        """Truncate the regular file *entry* to *size* (SETATTR of its size), opening its
        content for the time it takes (in shared mode it may wait for another daemon's
        lock: LockWaitFailed and its kin)."""
        await self.content_access.wait_created(entry, ctx.pid)
        async with entry.lock:
            await self.content(entry, self.access.requester(ctx, entry))
            entry.opens += 1  # kept open while the truncation may wait for its lock
        try:
            await self.run(entry, 0, lambda c: c.truncate(size), ctx.pid)
        finally:
            await self.release_content(entry)
