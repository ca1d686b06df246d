"""The file handlers: create, open, read, write, flush, release, fsync, and extended
attributes."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from kmsfs.backing import xattrs
from kmsfs.backing.header_xattr import write_new_header
from kmsfs.backing.names import XattrNameTooLong
from kmsfs.backing.xattrs import Namespace
from kmsfs.errors import KmsfsError, PlaintextTooLong
from kmsfs.format.content import BlockCipher
from kmsfs.format.header import FileHeader
from kmsfs.fs.inodes import Inode
from kmsfs.fs.ops_base import LookAgain, fuse_op, open_actions
from kmsfs.fs.ops_namespace import NamespaceOps


class FileOps(NamespaceOps):
    """create, open, read, write, flush, release, fsync, and the xattr handlers."""

    @fuse_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        requester: dict[str, Any] = {}
        file_id = None
        try:
            self._check_name(parent_inode, name)
            parent = self.inodes.entry(parent_inode)
            requester = self._requester(ctx, parent, name)
            path = self._path_of(parent, name)
            await self._allow(ctx, "create", path)
            for action in open_actions(flags):
                await self._allow(ctx, action, path)
            header, cipher = await self._key_call(
                self.keyring.new_file_cipher, self.config.block_size, requester
            )
            file_id = header.file_id
            answer = self._create(parent, name, mode, ctx, header, cipher)
        except Exception as exc:
            if self.content_access.opens_created_elsewhere(exc, flags):
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
        directory = self._dir(parent)
        fd, backing = self.names.open_new(
            directory,
            name,
            os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            stat.S_IMODE(self._new_mode(parent, mode, ctx)),
        )
        try:
            write_new_header(fd, header)
            self._own(fd, parent, ctx)
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
        entry = self.inodes.adopt(st, path_fd, parent.ino, name, backing=backing)
        entry.format = header.version
        self.inodes.trim()
        content.describe = lambda: self.describe(entry)
        entry.content = content
        entry.opens += 1
        info = pyfuse3.FileInfo(fh=entry.ino, keep_cache=self.content_access.keep_cache)
        kept_for = self._timeout_for(self._path_of(parent, name))
        return info, self._attr(st, entry, content.size, kept_for)

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

    @fuse_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # Every open reaches the audit log, also of a file already open (whose key
        # needs no provider call).  Opens the kernel refuses itself (permission
        # bits, default_permissions) never get here.
        requester: dict[str, Any] = {}
        try:
            entry = await self.inodes.entry_waiting(inode)
            requester = self._requester(ctx, entry)
            for action in open_actions(flags):
                await self._allow(ctx, action, self._path_of(entry))
            if "exec" in open_actions(flags):
                await self._warn_exec_only(ctx, entry)
            if not entry.is_regular:
                raise FUSEError(errno.EINVAL)
            await self.content_access.wait_created(entry, ctx.pid)
            async with entry.lock:
                content = await self._content(entry, requester)
                entry.opens += 1
            if flags & os.O_TRUNC and self.content_access.truncates_on_open(content):
                try:
                    await self._content_run(entry, 0, lambda c: c.truncate(0), ctx.pid)
                except BaseException:
                    await self._release_content(entry)  # the kernel sends no RELEASE
                    raise
        except LookAgain:
            raise  # the kernel retries the open, which is audited
        except Exception as exc:
            self._audit_access("open", flags, requester or self._requester(ctx, None), None, exc)
            raise
        self._audit_access("open", flags, requester, content.file_id)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.content_access.keep_cache)

    # read and write get no request context from pyfuse3: their waits for another
    # daemon's lock end at the deadline, never because the caller was interrupted.

    @fuse_op
    async def read(  # type: ignore[override]  # pyfuse3 takes any buffer: no copy
        self, fh: int, off: int, size: int
    ) -> bytes | bytearray:
        entry = self.inodes.entry(fh)
        data = await self._content_run(entry, size, lambda content: content.read(off, size))
        self.bytes_read += len(data)
        return data

    @fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        entry = self.inodes.entry(fh)
        written = await self._content_run(
            entry, len(buf), lambda content: content.write(off, buf)
        )
        self.bytes_written += written
        return written

    @fuse_op
    async def flush(self, fh: int) -> None:
        # Nothing to do: writes reach the backing file when they arrive, and the
        # kernel writes back its cached pages before it sends FLUSH.  ENOSYS
        # tells the kernel to stop sending FLUSH on every close (one round trip).
        raise FUSEError(errno.ENOSYS)

    @fuse_op
    async def release(self, fh: int) -> None:
        entry = self.inodes.entry(fh)
        await self._release_content(entry)
        self.inodes.release_if_unused(entry)

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        entry = self.inodes.entry(fh)
        content = entry.content
        if content is not None:
            await trio.to_thread.run_sync(content.fsync, datasync, limiter=self._limiter)

    @fuse_op
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        kind = xattrs.namespace_of(name)
        if kind is Namespace.RESERVED:
            raise FUSEError(errno.EPERM)
        if kind is Namespace.UNSUPPORTED:
            raise FUSEError(errno.EOPNOTSUPP)  # see kmsfs/backing/xattrs.py
        if kind is Namespace.PRIVILEGED and not self._is_admin(ctx):
            raise FUSEError(errno.EPERM)
        entry = self.inodes.entry(inode)
        await self._allow(ctx, "write", self._path_of(entry))
        try:
            self.names.set_xattr(entry.proc_path, name, value, lambda: self._object_id(entry))
        except XattrNameTooLong:
            raise FUSEError(errno.ERANGE) from None  # a name longer than the volume stores
        except PlaintextTooLong:
            raise FUSEError(errno.E2BIG) from None  # a value longer than the volume stores

    @fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # ls -l asks for security.selinux on every file, and the kernel for
        # security.capability on every write: no syscall for those.
        kind = xattrs.namespace_of(name)
        if kind is Namespace.PRIVILEGED and self._is_admin(ctx) or kind is Namespace.STORED:
            entry = self.inodes.entry(inode)
            await self._allow(ctx, "list", self._path_of(entry))
            try:
                return self.names.get_xattr(entry.proc_path, name, lambda: self._object_id(entry))
            except XattrNameTooLong:
                raise FUSEError(errno.ENODATA) from None  # no such name can be stored
            except KmsfsError as exc:
                raise exc.located(self.describe(entry)) from None
        raise FUSEError(errno.ENODATA)

    @fuse_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        entry = self.inodes.entry(inode)
        await self._allow(ctx, "list", self._path_of(entry))
        names = self.names.xattr_names(entry.proc_path, lambda: self.describe(entry))
        kinds = {name: xattrs.namespace_of(name) for name in names}
        admin = Namespace.PRIVILEGED in kinds.values() and self._is_admin(ctx)
        return [
            name
            for name, kind in kinds.items()
            if kind is Namespace.STORED or kind is Namespace.PRIVILEGED and admin
        ]

    @fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        kind = xattrs.namespace_of(name)
        if kind is Namespace.PRIVILEGED and not self._is_admin(ctx):
            raise FUSEError(errno.EPERM)
        if kind is Namespace.RESERVED or kind is Namespace.UNSUPPORTED:
            raise FUSEError(errno.ENODATA)
        entry = self.inodes.entry(inode)
        await self._allow(ctx, "write", self._path_of(entry))
        try:
            self.names.remove_xattr(entry.proc_path, name)
        except XattrNameTooLong:
            raise FUSEError(errno.ENODATA) from None  # no such name can be stored
