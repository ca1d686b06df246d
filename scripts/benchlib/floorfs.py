"""The ``floor`` system: a minimal in-memory pyfuse3 filesystem.

    .venv/bin/python scripts/benchlib/floorfs.py [--pyfuse3-loop] [--allow-other] MOUNTPOINT

It measures what pyfuse3 + trio cost before kmsfs does any work of its own: no
backing I/O, no crypto, handlers that only update dicts, mounted with kmsfs's
settings (``pyfuse3.default_options`` plus fsname/subtype, the writeback cache,
60 s entry and attribute timeouts, negative entries cached as long,
``pyfuse3.main(min_tasks=4, max_tasks=64)``, pyfuse3's loop waiting for
/dev/fuse only when no request is queued (``kmsfs.fs.fuseloop.configure``: a
patched pyfuse3's read-before-wait, else kmsfs's adapter; with
``--pyfuse3-loop``, pyfuse3's own wait, as kmsfs before its loop adapter), listings
cached by the kernel where pyfuse3 can ask for it (``FileInfo.cache_readdir``,
docs/pyfuse3-patch.md), FLUSH answered ENOSYS, getxattr answered without any
work).  It serves in the foreground until unmounted (``fusermount3 -u``) or sent
SIGTERM/SIGINT.

Everything is kept in the daemon's memory: file data in one bytearray per file,
freed when the file is removed and the kernel forgets it.  Memory is therefore
bounded by what a benchmark keeps at once (at full sizes the largest is the
concurrent-I/O row, 8 x 64 MiB, plus the untarred tree, about 120 MB); nothing
limits it otherwise.  Not for anything but benchmarks: no persistence, no
permission checks beyond the kernel's ``default_permissions``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence

import pyfuse3
import trio
from pyfuse3 import FUSEError

log = logging.getLogger(__name__)
TIMEOUT = 60.0  # entry/attribute timeouts, as kmsfs's DEFAULT_TIMEOUT
CACHE_DIR = hasattr(pyfuse3.FileInfo, "cache_readdir")  # as kmsfs.fs.fuseloop.PYFUSE3
BLOCK_SIZE = 4096


class Node:
    """One inode.  Attributes: ino, mode, nlink, uid, gid, rdev, times (ns), data (files),
    children (directories: name -> inode number), target (symlinks), parent (directories),
    lookups (the kernel's references), opens, xattrs."""

    __slots__ = (
        "ino",
        "mode",
        "nlink",
        "uid",
        "gid",
        "rdev",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "data",
        "children",
        "target",
        "parent",
        "lookups",
        "opens",
        "xattrs",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, parent: int = 0) -> None:
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.uid = uid
        self.gid = gid
        self.rdev = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.data = bytearray() if stat.S_ISREG(mode) else None
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.target = b""
        self.parent = parent
        self.lookups = 0
        self.opens = 0
        self.xattrs: dict[bytes, bytes] | None = None

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.children is not None:
            return BLOCK_SIZE
        return len(self.target)


class DirHandle:
    """An open directory: its inode and the names listed from offset 0."""

    __slots__ = ("ino", "names")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.names: list[bytes] | None = None


class FloorOperations(pyfuse3.Operations):
    """The in-memory filesystem.  Attributes: nodes (inode number -> Node)."""

    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        root = Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        root.parent = pyfuse3.ROOT_INODE
        root.lookups = 1  # the kernel's reference to the root is never forgotten
        self.nodes: dict[int, Node] = {root.ino: root}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._dirs: dict[int, DirHandle] = {}
        self._next_dir = 1

    # -- helpers -------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _dir(self, ino: int) -> tuple[Node, dict[bytes, int]]:
        node = self._node(ino)
        if node.children is None:
            raise FUSEError(errno.ENOTDIR)
        return node, node.children

    def _child(self, parent_ino: int, name: bytes) -> tuple[Node, Node]:
        """The directory *parent_ino* and its entry *name*; ENOENT if there is none."""
        parent, children = self._dir(parent_ino)
        ino = children.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return parent, self.nodes[ino]

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_rdev = node.rdev
        size = node.size()
        attr.st_size = size
        attr.st_blksize = BLOCK_SIZE
        attr.st_blocks = (size + 511) // 512
        attr.st_atime_ns = node.atime_ns
        attr.st_mtime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        return attr

    def _new(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Node:
        """Make an entry *name* in *parent_ino* for a new inode (lookup count 1)."""
        parent, children = self._dir(parent_ino)
        if name in children:
            raise FUSEError(errno.EEXIST)
        if not stat.S_ISLNK(mode):
            mode &= ~ctx.umask
        node = Node(self._next_ino, mode, ctx.uid, ctx.gid, parent_ino)
        self._next_ino += 1
        self.nodes[node.ino] = node
        children[name] = node.ino
        node.lookups = 1
        if node.children is not None:
            parent.nlink += 1
        parent.mtime_ns = parent.ctime_ns = node.ctime_ns
        return node

    def _maybe_free(self, node: Node) -> None:
        """Drop an inode no entry, kernel reference or open file refers to."""
        if node.nlink == 0 and node.lookups == 0 and node.opens == 0:
            del self.nodes[node.ino]

    def _unlinked(self, parent: Node, name: bytes, node: Node) -> None:
        """Remove the entry *name* of *parent*, which refers to *node*."""
        assert parent.children is not None
        del parent.children[name]
        now = time.time_ns()
        parent.mtime_ns = parent.ctime_ns = node.ctime_ns = now
        if node.children is not None:
            node.nlink = 0
            parent.nlink -= 1
        else:
            node.nlink -= 1
        self._maybe_free(node)

    # -- lookup and attributes ----------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent, children = self._dir(parent_inode)
        if name == b".":
            ino: int | None = parent.ino
        elif name == b"..":
            ino = parent.parent
        else:
            ino = children.get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative
        node = self.nodes[ino]
        node.lookups += 1
        return self._attr(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is not None:
                node.lookups -= count
                self._maybe_free(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            if node.data is None:
                raise FUSEError(errno.EISDIR if node.children is not None else errno.EINVAL)
            _resize(node.data, attr.st_size)
            node.mtime_ns = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
        return self._attr(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise FUSEError(errno.EINVAL)
        return node.target

    # -- directory entries ----------------------------------------------------

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._new(parent_inode, name, mode, ctx)
        node.rdev = rdev
        return self._attr(node)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attr(self._new(parent_inode, name, stat.S_IFDIR | mode, ctx))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._new(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        node.target = target
        return self._attr(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, node = self._child(parent_inode, name)
        if node.children is not None:
            raise FUSEError(errno.EISDIR)
        self._unlinked(parent, name, node)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, node = self._child(parent_inode, name)
        if node.children is None:
            raise FUSEError(errno.ENOTDIR)
        if node.children:
            raise FUSEError(errno.ENOTEMPTY)
        self._unlinked(parent, name, node)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent, node = self._child(parent_inode_old, name_old)
        assert old_parent.children is not None
        old_children = old_parent.children
        new_parent, new_children = self._dir(parent_inode_new)
        ino = node.ino
        other_ino = new_children.get(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if other_ino is None:
                raise FUSEError(errno.ENOENT)
            other = self.nodes[other_ino]
            old_children[name_old], new_children[name_new] = other_ino, ino
            self._moved(node, old_parent, new_parent)
            self._moved(other, new_parent, old_parent)
            return
        if other_ino is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if other_ino == ino:
                return
            other = self.nodes[other_ino]
            if other.children is not None:
                if node.children is None:
                    raise FUSEError(errno.EISDIR)
                if other.children:
                    raise FUSEError(errno.ENOTEMPTY)
            elif node.children is not None:
                raise FUSEError(errno.ENOTDIR)
            self._unlinked(new_parent, name_new, other)
        del old_children[name_old]
        new_children[name_new] = ino
        self._moved(node, old_parent, new_parent)

    def _moved(self, node: Node, old_parent: Node, new_parent: Node) -> None:
        now = time.time_ns()
        node.ctime_ns = old_parent.mtime_ns = old_parent.ctime_ns = now
        new_parent.mtime_ns = new_parent.ctime_ns = now
        if node.children is not None and old_parent is not new_parent:
            node.parent = new_parent.ino
            old_parent.nlink -= 1
            new_parent.nlink += 1

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        parent, children = self._dir(new_parent_inode)
        if new_name in children:
            raise FUSEError(errno.EEXIST)
        children[new_name] = node.ino
        node.nlink += 1
        node.lookups += 1
        node.ctime_ns = parent.mtime_ns = parent.ctime_ns = time.time_ns()
        return self._attr(node)

    # -- directories ------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        self._dir(inode)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = DirHandle(inode)
        if CACHE_DIR:  # as kmsfs: the kernel may keep listings (patched pyfuse3)
            return pyfuse3.FileInfo(fh=fh, cache_readdir=True)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        node, children = self._dir(handle.ino)
        if handle.names is None or start_id == 0:
            handle.names = list(children)
        names = handle.names
        # Offsets: 1 is ".", 2 is "..", 3 + i is names[i].  The kernel takes no
        # lookup reference for the dot entries (as in kmsfs).
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attr(node), 1):
            return
        if start_id < 2:
            parent = self.nodes.get(node.parent, node)
            if not pyfuse3.readdir_reply(token, b"..", self._attr(parent), 2):
                return
        nodes = self.nodes
        for index in range(max(start_id - 2, 0), len(names)):
            name = names[index]
            ino = children.get(name)
            if ino is None:  # removed since the listing began
                continue
            child = nodes[ino]
            if not pyfuse3.readdir_reply(token, name, self._attr(child), index + 3):
                return
            child.lookups += 1

    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = data.f_bfree = data.f_bavail = 1 << 28  # 1 TiB
        data.f_files = data.f_ffree = data.f_favail = 1 << 24
        data.f_namemax = 255
        return data

    # -- files ------------------------------------------------------------------

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        node.opens += 1
        return pyfuse3.FileInfo(fh=node.ino, keep_cache=True), self._attr(node)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.data is None:
            raise FUSEError(errno.EINVAL)
        if flags & os.O_TRUNC and node.data:
            node.data.clear()
            node.mtime_ns = node.ctime_ns = time.time_ns()
        node.opens += 1
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = self._node(fh).data
        assert data is not None
        return data[off : off + size]  # type: ignore[return-value]  # any buffer will do

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node(fh)
        data = node.data
        assert data is not None
        end = off + len(buf)
        if end > len(data):
            _resize(data, end)
        data[off:end] = buf
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        raise FUSEError(errno.ENOSYS)  # as kmsfs: no FLUSH on every close

    async def release(self, fh: int) -> None:
        node = self._node(fh)
        node.opens -= 1
        self._maybe_free(node)

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    # -- extended attributes ------------------------------------------------------

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self._node(inode)
        if node.xattrs is None:
            node.xattrs = {}
        node.xattrs[name] = value

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        xattrs = self._node(inode).xattrs
        if xattrs is None or name not in xattrs:
            raise FUSEError(errno.ENODATA)
        return xattrs[name]

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._node(inode).xattrs or ())

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        xattrs = self._node(inode).xattrs
        if xattrs is None or xattrs.pop(name, None) is None:
            raise FUSEError(errno.ENODATA)


def _resize(data: bytearray, size: int) -> None:
    """Truncate or zero-extend *data* to *size* bytes."""
    if size < len(data):
        del data[size:]
    else:
        data.extend(bytes(size - len(data)))


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main(min_tasks=4, max_tasks=64)  # as kmsfs.daemon
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    """Mount at argv[0] and serve until unmounted; 1 with a message if mounting fails."""
    args = sys.argv[1:] if argv is None else argv
    pyfuse3_loop = "--pyfuse3-loop" in args
    allow_other = "--allow-other" in args
    args = [a for a in args if a not in ("--pyfuse3-loop", "--allow-other")]
    if len(args) != 1:
        print("usage: floorfs.py [--pyfuse3-loop] [--allow-other] MOUNTPOINT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="floorfs: %(levelname)s %(message)s")
    options = set(pyfuse3.default_options) | {"fsname=floor", "subtype=floor"}
    if allow_other:  # other users reach the mount, as the benchmark mounts every system
        options.add("allow_other")
    ops = FloorOperations()
    try:
        pyfuse3.init(ops, args[0], options)
    except RuntimeError as exc:
        print(f"floorfs: cannot mount at {args[0]}: {exc}", file=sys.stderr)
        return 1
    if not pyfuse3_loop:
        from kmsfs.fs import fuseloop  # the checkout's, as kmsfs.daemon uses it

        fuseloop.configure(ops)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
