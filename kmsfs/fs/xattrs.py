"""The extended attribute handlers: setxattr, getxattr, listxattr, removexattr.

Which names are stored, refused, or answered without a syscall is decided by
kmsfs/backing/xattrs.py's ``namespace_of``: ``user.kmsfs*`` is hidden and refused.
With encrypted names, user/trusted names and values are stored encrypted, each value
bound to its object's ID (``_object_id``).
"""

from __future__ import annotations

import errno
import stat

import pyfuse3
from pyfuse3 import FUSEError

from kmsfs.backing import xattrs
from kmsfs.backing.header_xattr import read_header
from kmsfs.backing.names import XattrNameTooLong
from kmsfs.backing.xattrs import Namespace
from kmsfs.errors import KmsfsError, PlaintextTooLong
from kmsfs.fs.access import Access
from kmsfs.fs.inodes import Inode
from kmsfs.fs.places import Places
from kmsfs.fs.served import ServedVolume


class Xattrs:
    """The xattr handlers, on the backing files through the volume's names."""

    def __init__(self, parts: ServedVolume, places: Places, access: Access) -> None:
        self.places = places
        self.access = access
        self.inodes = parts.inodes
        self.names = parts.names

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
        await self.access.allow(ctx, "write", self.places.path_of(entry))
        try:
            self.names.set_xattr(entry.proc_path, name, value, lambda: self._object_id(entry))
        except XattrNameTooLong:
            raise FUSEError(errno.ERANGE) from None  # a name longer than the volume stores
        except PlaintextTooLong:
            raise FUSEError(errno.E2BIG) from None  # a value longer than the volume stores

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # ls -l asks for security.selinux on every file, and the kernel for
        # security.capability on every write: no syscall for those.
        kind = xattrs.namespace_of(name)
        if kind is Namespace.PRIVILEGED and self._is_admin(ctx) or kind is Namespace.STORED:
            entry = self.inodes.entry(inode)
            await self.access.allow(ctx, "list", self.places.path_of(entry))
            try:
                return self.names.get_xattr(entry.proc_path, name, lambda: self._object_id(entry))
            except XattrNameTooLong:
                raise FUSEError(errno.ENODATA) from None  # no such name can be stored
            except KmsfsError as exc:
                raise exc.located(self.places.describe(entry)) from None
        raise FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        entry = self.inodes.entry(inode)
        await self.access.allow(ctx, "list", self.places.path_of(entry))
        names = self.names.xattr_names(entry.proc_path, lambda: self.places.describe(entry))
        kinds = {name: xattrs.namespace_of(name) for name in names}
        admin = Namespace.PRIVILEGED in kinds.values() and self._is_admin(ctx)
        return [
            name
            for name, kind in kinds.items()
            if kind is Namespace.STORED or kind is Namespace.PRIVILEGED and admin
        ]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        kind = xattrs.namespace_of(name)
        if kind is Namespace.PRIVILEGED and not self._is_admin(ctx):
            raise FUSEError(errno.EPERM)
        if kind is Namespace.RESERVED or kind is Namespace.UNSUPPORTED:
            raise FUSEError(errno.ENODATA)
        entry = self.inodes.entry(inode)
        await self.access.allow(ctx, "write", self.places.path_of(entry))
        try:
            self.names.remove_xattr(entry.proc_path, name)
        except XattrNameTooLong:
            raise FUSEError(errno.ENODATA) from None  # no such name can be stored

    def _object_id(self, entry: Inode) -> bytes:
        """What the encrypted values of *entry*'s xattrs are bound to: a regular file's
        file ID (from its header), a directory's ID, b"" for other objects."""
        if stat.S_ISDIR(entry.mode):
            return self.places.dir(entry).dir_id
        if not entry.is_regular:
            return b""
        if entry.content is not None:
            return entry.content.file_id
        return read_header(entry.proc_path, self.places.describe(entry)).file_id

    @staticmethod
    def _is_admin(ctx: pyfuse3.RequestContext) -> bool:
        """CAP_SYS_ADMIN of the initial user namespace (what ext4 asks for trusted.*)."""
        return xattrs.is_host_admin(ctx.pid)
