"""The namespace handlers: lookup, attributes, directory entries and directories."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

import pyfuse3
from pyfuse3 import FUSEError

from kmsfs.backing import syscalls
from kmsfs.errors import KmsfsError, PlaintextTooLong
from kmsfs.format.content import format_of_mode, mode_for_format
from kmsfs.fs.access import Access, once
from kmsfs.fs.attributes import Attributes
from kmsfs.fs.content_access import LocalContentAccess
from kmsfs.fs.contents import Contents
from kmsfs.fs.errno_map import log
from kmsfs.fs.inodes import O_PATH_FLAGS, ROOT_INODE, DirHandle, Inode
from kmsfs.fs.places import Places
from kmsfs.fs.served import ServedVolume


class Namespace:
    """lookup, forget, getattr, setattr, readlink, mknod, mkdir, symlink, unlink, rmdir,
    rename, link, opendir, readdir, releasedir, fsyncdir, statfs (a truncation by
    setattr goes to ``contents``)."""

    def __init__(
        self,
        parts: ServedVolume,
        places: Places,
        access: Access,
        attributes: Attributes,
        contents: Contents,
        content_access: LocalContentAccess,
    ) -> None:
        self.places = places
        self.access = access
        self.attributes = attributes
        self.contents = contents
        self.content_access = content_access
        self.backing = parts.backing
        self.inodes = parts.inodes
        self.names = parts.names

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.entry(parent_inode)
        if parent_inode == ROOT_INODE and name == b"..":
            st = os.stat(parent.fd)
            parent.lookups += 1
            return self.attributes.of(st, parent)
        if self.names.reserved(parent_inode == ROOT_INODE, name):
            raise FUSEError(errno.ENOENT)
        path = once(self.places.path_of(parent, name))
        await self.access.allow(ctx, "list", path)
        backing = self.names.backing_name(self.places.dir(parent), name)
        try:
            st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.access.timeout_for(path)
            return negative
        try:
            link_size = self.attributes.entry_size(st, parent.fd, backing)
        except KmsfsError as exc:  # a symlink whose target does not decrypt
            raise exc.located(
                os.path.join(self.places.describe(parent), os.fsdecode(name))
            ) from None
        entry, st = self.inodes.remember(st, parent_inode, name, backing)
        self.inodes.trim()
        timeout = self.access.timeout_for(path)  # the looked-up name: a hard link's may differ
        if entry.fd < 0 or link_size is not None:  # deferred: no descriptor to lock through
            return self.attributes.of(st, entry, link_size, timeout)
        return await self.attributes.sized(st, entry, ctx.pid, timeout)

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop the kernel's lookup references; never raises (FORGET has no answer)."""
        for ino, count in inode_list:
            try:
                self.inodes.forget(ino, count)
            except OSError as exc:  # closing a descriptor cannot really fail; never raise here
                log.warning("forget inode %d: %s", ino, exc)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = await self.inodes.entry_waiting(inode)
        path = once(self.places.path_of(entry))
        await self.access.allow(ctx, "list", path)
        timeout = self.access.timeout_for(path)
        return await self.attributes.sized(os.stat(entry.fd), entry, ctx.pid, timeout)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        entry = await self.inodes.entry_waiting(inode)
        await self.access.allow(ctx, "write", self.places.path_of(entry))
        if fields.update_size:
            if not entry.is_regular:
                raise FUSEError(errno.EISDIR if stat.S_ISDIR(entry.mode) else errno.EINVAL)
            await self.contents.truncate(entry, attr.st_size, ctx)
        if fields.update_mode and not stat.S_ISLNK(entry.mode):
            mode = stat.S_IMODE(attr.st_mode)
            if entry.is_regular:  # the backing file keeps its format marker, whatever was asked
                mode = mode_for_format(
                    mode, entry.format or format_of_mode(os.stat(entry.fd).st_mode)
                )
            os.chmod(entry.proc_path, mode)
            entry.mode = stat.S_IFMT(entry.mode) | mode
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
        return await self.attributes.sized(os.stat(entry.fd), entry, ctx.pid)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        entry = self.inodes.entry(inode)
        await self.access.allow(ctx, "list", self.places.path_of(entry))
        try:
            return self.names.read_link(entry.fd)
        except KmsfsError as exc:
            raise exc.located(self.places.describe(entry)) from None

    async def _created(
        self,
        parent: Inode,
        name: bytes,
        backing: bytes,
        ctx: pyfuse3.RequestContext,
        dir_id: bytes = b"",
    ) -> pyfuse3.EntryAttributes:
        """Count the first lookup of the entry *name* (stored as *backing*) just made in
        *parent*, owned by the caller; *dir_id*: a new directory's ID, kept with it."""
        fd = os.open(backing, O_PATH_FLAGS, dir_fd=parent.fd)
        try:
            self.places.own(fd, parent, ctx)
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        entry = self.inodes.adopt(st, fd, parent.ino, name, backing=backing)
        if dir_id and entry.dir_id is None:
            entry.dir_id = dir_id
        self.inodes.trim()
        kept_for = self.access.timeout_for(self.places.path_of(parent, name))
        return self.attributes.of(st, entry, kept_for=kept_for)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.places.check_name(parent_inode, name)
        parent = self.inodes.entry(parent_inode)
        await self.access.allow(ctx, "create", self.places.path_of(parent, name))
        if stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)  # regular files are made by create, with a header
        new_mode = self.places.new_mode(parent, mode, ctx)
        backing = self.names.make_node(self.places.dir(parent), name, new_mode, rdev)
        return await self._created(parent, name, backing, ctx)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.places.check_name(parent_inode, name)
        parent = self.inodes.entry(parent_inode)
        await self.access.allow(ctx, "create", self.places.path_of(parent, name))
        new_mode = self.places.new_mode(parent, mode, ctx)
        backing, dir_id = self.names.make_dir(self.places.dir(parent), name, new_mode)
        return await self._created(parent, name, backing, ctx, dir_id)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.places.check_name(parent_inode, name)
        parent = self.inodes.entry(parent_inode)
        await self.access.allow(ctx, "create", self.places.path_of(parent, name))
        try:
            backing = self.names.make_symlink(self.places.dir(parent), name, target)
        except PlaintextTooLong:
            raise FUSEError(errno.ENAMETOOLONG) from None  # a target the volume cannot store
        return await self._created(parent, name, backing, ctx)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.places.check_name(parent_inode, name)
        parent = self.inodes.entry(parent_inode)
        await self.access.allow(ctx, "delete", self.places.path_of(parent, name))
        self.names.unlink(self.places.dir(parent), name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.places.check_name(parent_inode, name)
        parent = self.inodes.entry(parent_inode)
        await self.access.allow(ctx, "delete", self.places.path_of(parent, name))
        self.names.rmdir(self.places.dir(parent), name)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.places.check_name(parent_inode_old, name_old)
        self.places.check_name(parent_inode_new, name_new)
        old_parent = self.inodes.entry(parent_inode_old)
        new_parent = self.inodes.entry(parent_inode_new)
        await self.access.allow_rename(ctx, old_parent, name_old, new_parent, name_new)
        self.names.rename(
            self.places.dir(old_parent), name_old, self.places.dir(new_parent), name_new, flags
        )
        self.access.forget_moved(parent_inode_old, name_old, parent_inode_new, name_new)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.places.check_name(new_parent_inode, new_name)
        entry = self.inodes.entry(inode)
        parent = self.inodes.entry(new_parent_inode)
        await self.access.allow(ctx, "rename", self.places.path_of(entry))  # a new name for it
        path = once(self.places.path_of(parent, new_name))
        await self.access.allow(ctx, "create", path)
        self.names.link(entry.proc_path, self.places.dir(parent), new_name)
        entry.lookups += 1
        timeout = self.access.timeout_for(path)
        return await self.attributes.sized(os.stat(entry.fd), entry, ctx.pid, timeout)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        entry = await self.inodes.entry_waiting(inode)
        path = once(self.places.path_of(entry))
        await self.access.allow(ctx, "list", path)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=entry.fd)
        # READDIR has no requester: the opener's decides what the listing shows
        fh = self.inodes.open_dir(
            fd, inode, self.access.identities.lookup(ctx.pid, ctx.uid, ctx.gid)
        )
        # The kernel may keep the listing (FOPEN_CACHE_DIR) while it keeps entries: every
        # change reaches it through the mount, OPENDIR (the policy's "list" check) is still
        # sent on every open, and no listing is kept where a "list" decision on an entry
        # may differ per requester.  A listing kept under an earlier policy is not kept again.
        if self.content_access.cache_listings and self.access.listing_kept(path):
            keep = entry.listed_under == self.access.policy_serial
            entry.listed_under = self.access.policy_serial
            return pyfuse3.FileInfo(fh=fh, cache_readdir=True, keep_cache=keep)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.inodes.dirs[fh]
        if handle.names is None or start_id == 0:
            directory = self.inodes.get(handle.ino)
            if directory is None:
                raise FUSEError(errno.ESTALE)
            listed = self.names.listing(
                self.places.dir(directory, handle.fd), lambda: self.places.describe(directory)
            )
            handle.names = await self.access.listable(handle, listed)
        names = handle.names
        fd = handle.fd
        folder = self.inodes.get(handle.ino)
        # Offsets: 1 is ".", 2 is "..", 3 + i is names[i].  The kernel takes no
        # lookup reference for the dot entries.
        if start_id < 1:
            st = os.stat(fd)
            if not pyfuse3.readdir_reply(token, b".", self.attributes.of(st, folder), 1):
                return
        if start_id < 2:
            st = os.stat("..", dir_fd=fd) if handle.ino != ROOT_INODE else os.stat(fd)
            if not pyfuse3.readdir_reply(token, b"..", self.attributes.of(st), 2):
                return
        for index in range(max(start_id - 2, 0), len(names)):
            name, backing = names[index].name, names[index].backing
            try:
                st = os.stat(backing, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            known = self.inodes.get(self.inodes.fuse_ino(st.st_ino))
            new_fd: int | None = None
            born = None
            if known is None:  # open it before the kernel counts a reference to it
                try:
                    new_fd, st, born = self.inodes.open_new(fd, backing, st)
                except FileNotFoundError:
                    continue
                known = self.inodes.get(self.inodes.fuse_ino(st.st_ino))
                if known is not None:  # the name was replaced by an inode we know
                    os.close(new_fd)
                    new_fd = None
            try:
                size = self.attributes.entry_size(st, fd, backing)
            except KmsfsError as exc:  # a symlink whose target does not decrypt
                log.error("%s: left out of the listing: %s", self._listed_path(handle, name), exc)
                if new_fd is not None and new_fd >= 0:
                    os.close(new_fd)
                continue
            attr = self.attributes.of(st, known, size, self.access.timeout_of_listed(folder, name))
            if not pyfuse3.readdir_reply(token, name, attr, index + 3):
                if new_fd is not None and new_fd >= 0:
                    os.close(new_fd)
                break
            if new_fd is None:
                entry, _ = self.inodes.remember(st, handle.ino, name, backing)
            else:
                entry = self.inodes.adopt(st, new_fd, handle.ino, name, born, backing)
            if known is None and stat.S_ISREG(st.st_mode):
                self.attributes.layout_for(st, entry)  # the size just reported came from its marker
        self.inodes.trim()

    def _listed_path(self, handle: DirHandle, name: bytes) -> str:
        directory = self.inodes.get(handle.ino)
        base = f"inode {handle.ino}" if directory is None else self.places.describe(directory)
        return os.path.join(base, os.fsdecode(name))

    async def releasedir(self, fh: int) -> None:
        self.inodes.close_dir(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.contents.syncs.run(os.fsync, self.inodes.dirs[fh].fd)

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
        data.f_namemax = self.names.namemax(vfs.f_namemax)
        return data
