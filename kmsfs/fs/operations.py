"""pyfuse3 operations: the thin layer that maps FUSE requests onto the backing tree.

This is the only place an errno is chosen (``fuse_op``, kmsfs/fs/errno_map.py, wraps
every handler).  Lower layers raise OSError (passed through with its errno) or kmsfs
domain errors, which are logged with the file and cause and answered with EIO
(integrity, format, wrong key, provider outage) or EACCES (the key provider refused
access).

Names reach the backing directory through the volume's ``Names``
(kmsfs/backing/names.py): encrypted (names, symlink targets, user/trusted
xattrs) or plain, where names at the root starting with ``.kmsfs`` (the volume
config and state) are invisible and cannot be created.  ``user.kmsfs*`` xattrs
are hidden and refused in both.

``KmsfsOperations`` holds one collaborator per concern, made once from the
``ServedVolume`` (served.py), and each handler hands its request to one of them:
access.py (``Access``: policy decisions, requester identity, audit), namespace.py
(``Namespace``: lookup, attributes, directories, rename/link/unlink, readdir),
contents.py (``Contents``: create, open, read, write, flush, release, fsync),
xattrs.py (``Xattrs``).  What several need: places.py (``Places``: entries' paths,
directories, reserved names, new entries' mode and owner), attributes.py
(``Attributes``: the attributes the kernel is shown), and content_access.py (local
or shared mode, chosen once).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from time import perf_counter_ns

import pyfuse3
from pyfuse3 import FUSEError

from kmsfs.fs.access import Access
from kmsfs.fs.attributes import Attributes
from kmsfs.fs.content_access import content_access_for
from kmsfs.fs.contents import Contents
from kmsfs.fs.errno_map import errno_for, fuse_op
from kmsfs.fs.fuseloop import PYFUSE3, request_queued
from kmsfs.fs.lockwait import LockWaits
from kmsfs.fs.namespace import Namespace
from kmsfs.fs.places import Places
from kmsfs.fs.requests import RequestStats
from kmsfs.fs.served import DEFAULT_TIMEOUT, OFFLOAD_BYTES, ServedVolume, open_served_volume
from kmsfs.fs.syncs import SyncPath
from kmsfs.fs.xattrs import Xattrs

__all__ = [
    "DEFAULT_TIMEOUT",
    "OFFLOAD_BYTES",
    "KmsfsOperations",
    "ServedVolume",
    "errno_for",
    "open_served_volume",
]


class KmsfsOperations(pyfuse3.Operations):
    """Serves one volume with the parts it is given (``ServedVolume``).

    Attributes: backing (path), config, keyring, inodes, names, key_usage, the
    collaborators (places, access_control, attributes, contents, namespace, xattrs:
    ``access`` is pyfuse3's ACCESS handler),
    content_access (local or shared: kmsfs/fs/content_access.py), lock_waits (shared
    mode's waits for other daemons), and the counters errors, bytes_read,
    bytes_written and requests (per FUSE opcode, ``kmsfs.fs.requests``).
    """

    enable_writeback_cache = True
    # FUSE_POSIX_ACL: the kernel caches ACLs and checks them with default_permissions
    # (and stops asking for them on every ls -l); they are stored on the backing files.
    enable_acl = True
    # FUSE_DONT_MASK, with a patched pyfuse3 (docs/pyfuse3-patch.md): new entries get the
    # mode the process asked for, and Places.new_mode applies its umask unless a default
    # ACL rules
    enable_dont_mask = PYFUSE3.dont_mask

    def __init__(self, parts: ServedVolume) -> None:
        super().__init__()
        self.backing = parts.backing
        self.config = parts.config
        self.keyring = parts.keyring
        self.inodes = parts.inodes
        self.names = parts.names
        self.key_usage = parts.key_usage
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.requests = RequestStats()
        self._forgets = self.requests.counter("forget")
        self.lock_waits = LockWaits(parts.lock_timeout)
        self.content_access = content_access_for(parts, self.lock_waits)
        self.enable_writeback_cache = self.content_access.writeback_cache
        # FSYNC and FSYNCDIR: inline when no other request waits (kmsfs/fs/syncs.py)
        self.syncs = SyncPath(parts.io_limiter, self._others_waiting)
        self.places = Places(parts)
        self.access_control = Access(parts, self.places)
        self.attributes = Attributes(parts, self.access_control, self.places, self.content_access)
        self.contents = Contents(
            parts,
            self.places,
            self.access_control,
            self.attributes,
            self.content_access,
            self.lock_waits,
            self._open_created_elsewhere,
            self.syncs,
        )
        self.namespace = Namespace(
            parts,
            self.places,
            self.access_control,
            self.attributes,
            self.contents,
            self.content_access,
        )
        self.xattrs = Xattrs(parts, self.places, self.access_control)

    def close(self) -> None:
        """Close every descriptor (after the FUSE loop has ended)."""
        self.inodes.close_all()

    def _others_waiting(self) -> bool:
        """Whether a request other than the caller's is being handled or waits unread."""
        return self.requests.in_flight > 1 or request_queued()

    # namespace

    @fuse_op
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.namespace.lookup(parent_inode, name, ctx)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Not wrapped in fuse_op: FORGET has no answer, and pyfuse3 must never see
        # an exception from it (Namespace.forget raises none); counted here instead.
        start = perf_counter_ns()
        self.namespace.forget(inode_list)
        self._forgets.add(perf_counter_ns() - start)

    @fuse_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self.namespace.getattr(inode, ctx)

    @fuse_op
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return await self.namespace.setattr(inode, attr, fields, fh, ctx)

    @fuse_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.namespace.readlink(inode, ctx)

    @fuse_op
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.namespace.mknod(parent_inode, name, mode, rdev, ctx)

    @fuse_op
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.namespace.mkdir(parent_inode, name, mode, ctx)

    @fuse_op
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.namespace.symlink(parent_inode, name, target, ctx)

    @fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.namespace.unlink(parent_inode, name, ctx)

    @fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.namespace.rmdir(parent_inode, name, ctx)

    @fuse_op
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.namespace.rename(
            parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx
        )

    @fuse_op
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self.namespace.link(inode, new_parent_inode, new_name, ctx)

    @fuse_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        return await self.namespace.opendir(inode, ctx)

    @fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self.namespace.readdir(fh, start_id, token)

    @fuse_op
    async def releasedir(self, fh: int) -> None:
        await self.namespace.releasedir(fh)

    @fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.namespace.fsyncdir(fh, datasync)

    @fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return await self.namespace.statfs(ctx)

    # contents

    @fuse_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        return await self.contents.create(parent_inode, name, mode, flags, ctx)

    async def _open_created_elsewhere(
        self, parent_inode: int, name: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Shared mode: lookup and open *name*, which another daemon just created (the
        requests as the kernel would send them, each counted and answered as one)."""
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
        return await self.contents.open(inode, flags, ctx)

    # read and write get no request context from pyfuse3: their waits for another
    # daemon's lock end at the deadline, never because the caller was interrupted.

    @fuse_op
    async def read(  # type: ignore[override]  # pyfuse3 takes any buffer: no copy
        self, fh: int, off: int, size: int
    ) -> bytes | bytearray:
        data = await self.contents.read(fh, off, size)
        self.bytes_read += len(data)
        return data

    @fuse_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        written = await self.contents.write(fh, off, buf)
        self.bytes_written += written
        return written

    @fuse_op
    async def flush(self, fh: int) -> None:
        await self.contents.flush(fh)

    @fuse_op
    async def release(self, fh: int) -> None:
        await self.contents.release(fh)

    @fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.contents.fsync(fh, datasync)

    # xattrs

    @fuse_op
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.xattrs.setxattr(inode, name, value, ctx)

    @fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.xattrs.getxattr(inode, name, ctx)

    @fuse_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self.xattrs.listxattr(inode, ctx)

    @fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.xattrs.removexattr(inode, name, ctx)
