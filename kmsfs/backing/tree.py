"""Walking a directory tree by descriptor, as root, when its users are the adversary.

Whoever owns a directory of the backing tree (every user of a mount owns the backing
copies of the directories they create) can rename, replace or swap for a symlink
anything in it at any moment.  The offline tools, which run as root, therefore never
resolve a path twice and never follow a symlink in the tree:

- the root is opened once, ``O_DIRECTORY|O_NOFOLLOW`` (the operator's spelling of it,
  symlinks included, is resolved once: the command line is trusted, the tree is not);
- a walk lists a directory through its descriptor, ``fstatat``s each name without
  following it, and opens each subdirectory relative to its parent with
  ``O_NOFOLLOW``; it never leaves the root's filesystem;
- an entry is reopened beneath the root with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`` where the kernel has it (Linux 5.6), else
  one component at a time with ``O_NOFOLLOW``; ``Tree.open_file`` then checks that it
  holds a regular file, and the inode the walk saw (else ``TreeChanged``);
- everything after that (xattrs, stat, reads, writes, renames, links) goes through
  the descriptors, so what was checked is what is used.

Symlinks are ordinary entries of a tree (users make them through the mount): a walk
yields them and never follows them.  Used by every lifecycle tool, ``kmsfs.offline``
and the volume lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from kmsfs.backing.names import own_entry
from kmsfs.errors import KmsfsError
from kmsfs.format.volume_config import STATE_DIR_NAME

log = logging.getLogger(__name__)

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
SYS_OPENAT2 = 437  # the same number on every architecture (unified syscall table)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a file's name must not hang the tool
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
# errno of a path that met a symlink (ELOOP; ENOTDIR for O_DIRECTORY on some kernels)
# or a mount point (EXDEV): the tree changed, or is not what it seemed
NOT_FOLLOWED = (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None  # None: not tried yet


class TreeChanged(KmsfsError):
    """An entry is no longer what the walk saw (renamed, replaced, made a symlink)."""

    exit_code = 1


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """The openat2 system call; OSError with the C errno (ENOSYS on kernels before 5.6)."""
    how = _OpenHow(flags, mode, resolve)
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def split_rel(rel: str) -> list[str]:
    """The components of a relative path; ValueError for '', absolute, '.' or '..' parts."""
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{rel!r} is not a plain relative path")
    return parts


def open_root(path: str | os.PathLike[str]) -> int:
    """Open the directory *path* (the operator's spelling resolved once) without following
    a symlink in its last component; OSError as os.open raises it."""
    return os.open(os.path.realpath(path), DIR_FLAGS)


def open_beneath(root_fd: int, rel: str, flags: int, mode: int = 0) -> int:
    """Open *rel* beneath the directory *root_fd*: never through a symlink (OSError ELOOP),
    never onto another filesystem (EXDEV), never above it.  *flags* gets O_NOFOLLOW and
    O_CLOEXEC added; ValueError for a *rel* that is not a plain relative path."""
    global _have_openat2
    parts = split_rel(rel)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _have_openat2 is not False:
        resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV
        for _attempt in range(3):
            try:
                fd = openat2(root_fd, rel, flags, mode if flags & os.O_CREAT else 0, resolve)
                _have_openat2 = True
                return fd
            except OSError as exc:
                if exc.errno == errno.ENOSYS:
                    _have_openat2 = False
                    break
                _have_openat2 = True
                if exc.errno != errno.EAGAIN:  # EAGAIN: a concurrent rename; try again
                    raise
    return _open_by_components(root_fd, parts, flags, mode)


def _open_by_components(root_fd: int, parts: list[str], flags: int, mode: int) -> int:
    """open_beneath without openat2: one O_NOFOLLOW openat per component."""
    device = os.fstat(root_fd).st_dev
    fd = root_fd
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:  # O_DIRECTORY|O_NOFOLLOW on a symlink: say so
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            if fd != root_fd:
                os.close(fd)
            fd = next_fd
            if os.fstat(fd).st_dev != device:
                raise OSError(errno.EXDEV, "another filesystem is mounted here", part)
        result = os.open(parts[-1], flags, mode, dir_fd=fd)
        if os.fstat(result).st_dev != device:
            os.close(result)
            raise OSError(errno.EXDEV, "another filesystem is mounted here", parts[-1])
        return result
    finally:
        if fd != root_fd:
            os.close(fd)


def open_state_dir(root_fd: int, create: bool) -> int | None:
    """The volume's ``.kmsfs.d`` directory (created 0700 if *create*), or None if absent.

    OSError(ELOOP or ENOTDIR) if something other than a directory holds the name.
    """
    if create:
        try:
            os.mkdir(STATE_DIR_NAME, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
    try:
        return os.open(STATE_DIR_NAME, DIR_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        if create:
            raise
        return None


@dataclass(frozen=True)
class Node:
    """One entry met by ``walk``.

    ``st`` is its ``fstatat`` without following (at listing time; for a directory, the
    ``fstat`` of the descriptor ``fd`` the walk opened).  ``parent_fd`` and ``fd`` are
    the walk's own descriptors: valid only until the walk moves on.
    """

    rel: str
    name: str
    st: os.stat_result
    parent_fd: int
    fd: int | None = None

    @property
    def inode(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)


def walk(
    root_fd: int,
    prune: Callable[[Node], bool] | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[Node]:
    """Every entry beneath *root_fd*, names sorted, a directory's other entries before its
    subdirectories, each subdirectory yielded before its contents.

    Symlinks are yielded, never followed.  A subdirectory that is not one any more when
    opened, is on another filesystem or cannot be read is not entered; its rel and the
    reason are appended to *skipped*.  ``prune(node)`` True: neither yielded nor entered.
    """
    device = os.fstat(root_fd).st_dev
    yield from _walk_dir(root_fd, "", device, prune, skipped if skipped is not None else [])


def _walk_dir(
    dir_fd: int,
    rel_dir: str,
    device: int,
    prune: Callable[[Node], bool] | None,
    skipped: list[tuple[str, str]],
) -> Iterator[Node]:
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError as exc:  # the directory was removed meanwhile (ENOENT), or worse
        skipped.append((rel_dir, f"cannot be listed: {exc.strerror}"))
        return
    subdirs = []
    dir_count = 0
    for name in names:
        rel = f"{rel_dir}/{name}" if rel_dir else name
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed meanwhile
        except OSError as exc:  # EACCES: another user's FUSE mount
            skipped.append((rel, f"cannot be examined: {exc.strerror}"))
            continue
        dir_count += stat.S_ISDIR(st.st_mode)
        node = Node(rel, name, st, dir_fd)
        if prune is not None and prune(node):
            continue
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(node)
        else:
            yield node
    # A directory's link count is 2 + its subdirectories (ext4, xfs; 1 where unknown):
    # fewer found means one was renamed or hidden behind a symlink while we listed it
    links = os.fstat(dir_fd).st_nlink
    if links >= 2 and links - 2 != dir_count:
        skipped.append(
            (
                rel_dir or ".",
                f"{links - 2} subdirectories by its link count, {dir_count} listed:"
                " one was renamed, moved or hidden behind a symlink while walking",
            )
        )
    for node in subdirs:
        try:
            fd = os.open(node.name, DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = (
                "changed while walking (now a symlink or not a directory): not followed"
                if exc.errno in NOT_FOLLOWED
                else f"cannot be opened: {exc.strerror}"
            )
            skipped.append((node.rel, reason))
            continue
        try:
            st = os.fstat(fd)
            if st.st_dev != device:
                log.warning("%s: another filesystem is mounted here: not entered", node.rel)
                skipped.append((node.rel, "another filesystem is mounted here: not entered"))
                continue
            if (st.st_dev, st.st_ino) != node.inode:
                skipped.append((node.rel, "replaced while walking: not entered"))
                continue
            yield replace(node, st=st, fd=fd)
            yield from _walk_dir(fd, node.rel, device, prune, skipped)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Entry:
    """A regular file met by ``Tree.files`` (each name of a hard-linked inode separately)."""

    rel: str  # relative to the tree's root, '/'-separated
    st: os.stat_result  # at walk time

    @property
    def inode(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)


class Tree:
    """A directory tree opened once by descriptor; everything in it is reached from there.

    Attributes: path (the operator's spelling, for messages), fd (the root's descriptor),
    skipped ((rel, reason) of directories the walks could not enter), reserved (a
    backing tree: kmsfs's own entries are left out of walks, ``own_entry``: with plain
    names the root's ``.kmsfs*``, with *encrypted_names* every name starting with '.'
    but long names' entries, in every directory).  Use as a context manager, or call
    ``close``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reserved: bool = True,
        *,
        encrypted_names: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fd = open_root(path)
        self.reserved = reserved
        self.encrypted_names = encrypted_names
        self.skipped: list[tuple[str, str]] = []

    @classmethod
    def at(
        cls,
        dir_fd: int,
        path: str | os.PathLike[str],
        reserved: bool = True,
        *,
        encrypted_names: bool = False,
    ) -> Tree:
        """The tree of the directory *dir_fd* (may be O_PATH; a descriptor of its own is
        opened), named *path* in messages: for the daemon, whose backing root is open.
        OSError as os.open raises it."""
        tree = cls.__new__(cls)
        tree.path = Path(path)
        tree.fd = os.open(".", DIR_FLAGS, dir_fd=dir_fd)
        tree.reserved = reserved
        tree.encrypted_names = encrypted_names
        tree.skipped = []
        return tree

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextmanager
    def state_dir(self) -> Iterator[int]:
        """A descriptor of the volume's ``.kmsfs.d`` (created 0700 if absent) for the block.

        OSError(ELOOP or ENOTDIR) if something else holds that name.
        """
        fd = open_state_dir(self.fd, create=True)
        assert fd is not None
        try:
            yield fd
        finally:
            os.close(fd)

    def walk(self, prune: Callable[[Node], bool] | None = None) -> Iterator[Node]:
        """``walk`` from the root (without the reserved names if ``reserved``)."""

        def pruned(node: Node) -> bool:
            at_root = "/" not in node.rel
            if self.reserved and own_entry(os.fsencode(node.name), at_root, self.encrypted_names):
                return True
            return prune is not None and prune(node)

        return walk(self.fd, pruned, self.skipped)

    def files(self) -> Iterator[Entry]:
        """Every regular file, in walk order."""
        for node in self.walk():
            if stat.S_ISREG(node.st.st_mode):
                yield Entry(node.rel, node.st)

    def open_dir(self, rel: str) -> int:
        """A new descriptor (O_RDONLY) of the directory *rel* ('' is the root).

        FileNotFoundError if it is gone; TreeChanged if a symlink, a mount point or a
        non-directory is in the way.
        """
        if not rel:
            return os.open(".", DIR_FLAGS, dir_fd=self.fd)
        try:
            return open_beneath(self.fd, rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno in NOT_FOLLOWED:
                raise TreeChanged(
                    "not a directory, or a symlink or a mount point is in its path: not followed",
                    where=rel,
                ) from None
            raise

    def parent(self, rel: str) -> tuple[int, str]:
        """A new descriptor of the directory holding *rel*, and *rel*'s last component."""
        head, _, name = rel.rpartition("/")
        split_rel(rel)
        return self.open_dir(head), name

    def open_file(self, rel: str, flags: int = os.O_RDONLY, expect: Entry | None = None) -> int:
        """A descriptor of the regular file *rel*, opened beneath the root without
        following any symlink.

        FileNotFoundError if it is gone; TreeChanged if a symlink or a mount point is
        in the way, if it is no longer a regular file, or (with *expect*) if it is
        another inode than the walk saw.
        """
        try:
            fd = open_beneath(self.fd, rel, flags | FILE_FLAGS)
        except OSError as exc:
            if exc.errno in NOT_FOLLOWED:
                raise TreeChanged(
                    "a symlink or a mount point is in its path: not followed", where=rel
                ) from None
            raise
        return check_file(fd, rel, expect)


def check_file(fd: int, rel: str, expect: Entry | None = None) -> int:
    """*fd* if it holds a regular file (and *expect*'s inode); else close it, TreeChanged."""
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file (any more): not touched"
    elif expect is not None and (st.st_dev, st.st_ino) != expect.inode:
        problem = "replaced by another file while the tool ran: not touched"
    if problem is not None:
        os.close(fd)
        raise TreeChanged(problem, where=rel)
    return fd
