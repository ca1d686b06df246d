"""A volume's names in its backing directory, plain or encrypted, behind one interface.

The FUSE handlers, the path of a descriptor (kmsfs/backing/paths.py) and the
offline tools ask a ``Names`` object where a plaintext name lives and make,
link, rename and remove entries through it; they never test which kind of
volume they serve:

- ``PlainNames`` (here; volumes with plain names, config formats 1 to 3): a
  name is its own backing name, and at the backing root names starting with
  ``.kmsfs`` are kmsfs's (reserved: hidden, not to be made).  It is also the
  interface, each method saying what it does and raises;
- ``EncryptedNames`` (kmsfs/backing/encrypted_names.py; format 4): names,
  symlink targets and user/trusted xattrs encrypted, long names with sidecars.

``names_for`` (there) picks one for a volume.  Also here: which backing entries
are kmsfs's own in either kind of volume (``own_entry``), a rename that never
replaces (``rename_noreplace``), and the checks that a backing filesystem tells
names apart by case.  No FUSE, no trio: errno values are the operations layer's
to choose (OSError passes through with its own).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

from kmsfs.backing.syscalls import RENAME_NOREPLACE, renameat2
from kmsfs.errors import ConfigError, PlaintextTooLong
from kmsfs.format.names import (
    EntryKind,
    entry_kind,
)
from kmsfs.format.volume_config import RESERVED_PREFIX

log = logging.getLogger(__name__)

RESERVED = RESERVED_PREFIX.encode()
TEMP_PREFIX = b".kmsfs-tmp."  # kmsfs's own (a '.' name): a directory or sidecar being made
NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_LOGGED = 1024  # undecryptable entries logged once each, up to this many
MAX_CACHED = 8192  # decrypted path components kept for paths.py


class XattrNameTooLong(PlaintextTooLong):
    """An extended attribute name longer than its encrypted form can be (ERANGE)."""


@dataclass(frozen=True)
class Dir:
    """A backing directory as the name operations need it.

    Attributes: fd (a descriptor of it: O_PATH serves, as a dir_fd), dir_id (its
    directory ID; b"" in a volume with plain names, which has none), root (it is
    the backing root).
    """

    fd: int
    dir_id: bytes
    root: bool = False


@dataclass(frozen=True)
class Listed:
    """One entry of a listing: its plaintext name and the backing entry's name."""

    name: bytes
    backing: bytes


class PlainNames:
    """Names of a volume with plain names: each is its own backing name.

    Also the interface every ``Names`` has (``EncryptedNames`` overrides it).
    Methods raise OSError as the system calls do, and KmsfsError subclasses
    where they say so.
    """

    encrypted = False

    # -- directories -------------------------------------------------------------

    def dir_id(self, path: str, root: bool) -> bytes:
        """The directory ID of the backing directory at *path* (a ``/proc/self/fd/N``
        path serves).  Plain names: none (b""), nothing read."""
        return b""

    def reserved(self, root: bool, name: bytes) -> bool:
        """True for a name kmsfs keeps for itself (hidden; not to be made) in a directory
        (*root*: the backing root): ``.kmsfs*`` at the root of a volume with plain names."""
        return root and name.startswith(RESERVED)

    def namemax(self, backing_namemax: int) -> int:
        """The longest name the mount takes, given the backing filesystem's."""
        return backing_namemax

    # -- names -------------------------------------------------------------------

    def backing_name(self, parent: Dir, name: bytes) -> bytes:
        """The backing entry that holds *name* in *parent* (no I/O)."""
        return name

    def listing(self, parent: Dir, where: Callable[[], str]) -> list[Listed]:
        """The entries of the directory open as *parent* (a readable descriptor),
        without kmsfs's own; *where* names the directory in log lines."""
        names = [os.fsencode(n) for n in os.listdir(parent.fd)]
        return [Listed(n, n) for n in names if not self.reserved(parent.root, n)]

    def name_of(self, parent: Dir, backing: bytes) -> bytes:
        """The plaintext name of the backing entry *backing* of *parent*.

        EncryptedNameError if it does not decrypt; ValueError for one of kmsfs's own.
        """
        return backing

    # -- making and removing entries -------------------------------------------------

    def make_dir(self, parent: Dir, name: bytes, mode: int) -> tuple[bytes, bytes]:
        """mkdir *name*; returns its backing name and its directory ID (b"" if none)."""
        os.mkdir(name, mode, dir_fd=parent.fd)
        return name, b""

    def make_node(self, parent: Dir, name: bytes, mode: int, rdev: int) -> bytes:
        """mknod *name* (a FIFO, socket or device); returns its backing name."""
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        return name

    def make_symlink(self, parent: Dir, name: bytes, target: bytes) -> bytes:
        """A symlink *name* to *target*; returns its backing name.  PlaintextTooLong
        for a target longer than the volume stores."""
        os.symlink(target, name, dir_fd=parent.fd)
        return name

    def read_link(self, fd: int) -> bytes:
        """The target of the symlink open as the O_PATH descriptor *fd*.
        EncryptedNameError if a stored target does not decrypt."""
        return os.readlink(b"", dir_fd=fd)

    def target_of(self, stored: bytes) -> bytes:
        """The plaintext target of a backing symlink whose target is *stored*."""
        return stored

    def link_size(self, backing_size: int, read: Callable[[], bytes] | None) -> int:
        """A symlink's size as ``lstat`` shows it (its target's length), given the
        backing symlink's size and a way to read its stored target.  Plain names: the
        backing size, nothing read.  EncryptedNameError if the target does not
        decrypt (or cannot be read: *read* None)."""
        return backing_size

    def stored_target(self, target: bytes) -> bytes:
        """What a backing symlink to the plaintext *target* points to."""
        return target

    def open_new(self, parent: Dir, name: bytes, flags: int, mode: int) -> tuple[int, bytes]:
        """``open(name, flags | O_CREAT | O_EXCL)`` in *parent*: the descriptor and the
        backing name (FileExistsError if it exists)."""
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=parent.fd)
        return fd, name

    def link(self, path: str, parent: Dir, name: bytes) -> bytes:
        """A new hard link *name* in *parent* to the inode at *path* (``/proc/self/fd/N``
        of the inode: followed, as it names the inode, not a path in the tree)."""
        os.link(path, name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return name

    def place(self, from_fd: int, from_name: bytes, parent: Dir, name: bytes) -> bytes:
        """Rename the finished entry *from_name* of the directory *from_fd* (a tool's
        temporary name in ``.kmsfs.d``) to *name* in *parent*, never over an existing
        entry (FileExistsError); returns its backing name.  Where RENAME_NOREPLACE
        is not supported, a file is linked to its name, then unlinked
        (``rename_noreplace``)."""
        rename_noreplace(from_fd, from_name, parent.fd, name)
        return name

    def unlink(self, parent: Dir, name: bytes) -> None:
        os.unlink(name, dir_fd=parent.fd)

    def rmdir(self, parent: Dir, name: bytes) -> None:
        os.rmdir(name, dir_fd=parent.fd)

    def rename(self, old: Dir, old_name: bytes, new: Dir, new_name: bytes, flags: int) -> None:
        """rename (``renameat2`` with *flags*: RENAME_NOREPLACE, RENAME_EXCHANGE)."""
        if flags:
            renameat2(old.fd, old_name, new.fd, new_name, flags)
        else:
            os.rename(old_name, new_name, src_dir_fd=old.fd, dst_dir_fd=new.fd)

    # -- extended attributes ---------------------------------------------------------

    def get_xattr(self, path: str, name: bytes, object_id: Callable[[], bytes]) -> bytes:
        """The value of the attribute *name* of the inode at *path*.

        *object_id* gives the ID its encrypted values are bound to (called only
        for an encrypted attribute): the file ID of a regular file, the
        directory ID of a directory, b"" for other objects.
        """
        return os.getxattr(path, name)

    def set_xattr(
        self, path: str, name: bytes, value: bytes, object_id: Callable[[], bytes]
    ) -> None:
        """Set the attribute; XattrNameTooLong / PlaintextTooLong (the value) if the
        volume cannot store it encrypted."""
        os.setxattr(path, name, value)

    def remove_xattr(self, path: str, name: bytes) -> None:
        os.removexattr(path, name)

    def stored_xattrs(
        self, values: dict[str, bytes], object_id: bytes
    ) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
        """The backing names and values of the plaintext attributes *values* of an object
        whose ID is *object_id*, and (name, why) of those the volume cannot store
        (too long once encrypted).  Plain names: *values* as they are."""
        return dict(values), []

    def rebind_xattrs(
        self, values: dict[str, bytes], old_id: bytes, new_id: bytes
    ) -> dict[str, bytes]:
        """The stored attributes *values* (backing names) of a file re-keyed from the
        file ID *old_id* to *new_id*: each encrypted value sealed again under the new
        ID.  EncryptedNameError if one does not decrypt.  Plain names: as they are."""
        return dict(values)

    def xattr_names(self, path: str, where: Callable[[], str]) -> list[bytes]:
        """The names of the inode's attributes, as the mount shows them (kmsfs's own
        and unsupported ones still to be filtered by the caller)."""
        return [os.fsencode(n) for n in os.listxattr(path)]

    # -- paths ---------------------------------------------------------------------

    def plain_path(self, root_fd: int, backing_path: str) -> str | None:
        """The path in the volume (``/a/b``) of the backing path *backing_path*
        (``/X/Y``, relative to the root open as *root_fd*); None if a component
        does not decrypt or cannot be reached (logged)."""
        return backing_path

    def resolve_plain(self, root_fd: int, backing_path: str) -> str:
        """``plain_path``, raising instead: EncryptedNameError (or FormatError for a
        malformed directory ID) naming the component that does not decrypt, OSError
        for one that cannot be reached (never through a symlink), ValueError for one
        of kmsfs's own names."""
        return "/" + "/".join(part for part in backing_path.split("/") if part)

    def backing_path(self, root_fd: int, path: bytes) -> bytes:
        """The backing path (``X/Y``, relative to the root open as *root_fd*) of the
        path in the volume *path* (``a/b``; '' or '/' for the root).  Every directory
        on the way must exist (its ID is read); the last component need not.
        FileNotFoundError / NotADirectoryError naming the first that does not,
        OSError(ELOOP) for a backing symlink on the way (never followed), ValueError
        for '.' or '..' components."""
        parts = [part for part in path.split(b"/") if part]
        if any(part in (b".", b"..") for part in parts):
            raise ValueError(f"{os.fsdecode(path)!r}: '.' and '..' are not names in a volume")
        out: list[bytes] = []
        dir_fd, dir_id = root_fd, self.dir_id(f"/proc/self/fd/{root_fd}", root=True)
        try:
            for index, part in enumerate(parts):
                if self.reserved(index == 0, part):
                    raise FileNotFoundError(errno.ENOENT, "a name kmsfs keeps", os.fsdecode(part))
                backing = self.backing_name(Dir(dir_fd, dir_id, index == 0), part)
                out.append(backing)
                if index + 1 < len(parts):
                    where = os.fsdecode(b"/".join(parts[: index + 1]))
                    try:
                        next_fd = os.open(backing, O_PATH_DIR, dir_fd=dir_fd)
                    except OSError as exc:
                        raise OSError(exc.errno, exc.strerror, where) from None
                    if dir_fd != root_fd:
                        os.close(dir_fd)
                    dir_fd = next_fd
                    dir_id = self.dir_id(f"/proc/self/fd/{dir_fd}", root=False)
        finally:
            if dir_fd != root_fd:
                os.close(dir_fd)
        return b"/".join(out)


Names = PlainNames  # the interface: every kind of names is one


def own_entry(backing: bytes, at_root: bool, encrypted: bool) -> bool:
    """True for a backing entry that is kmsfs's own, not a volume's entry: with plain
    names, ``.kmsfs*`` at the root; with encrypted names, every name starting with '.'
    but a long name's entry (sidecars, temporary names, the config and state)."""
    if encrypted:
        return entry_kind(backing) not in (EntryKind.NAME, EntryKind.LONG_NAME)
    return at_root and backing.startswith(RESERVED)


NO_RENAME_FLAGS = (errno.EINVAL, errno.ENOSYS)  # renameat2's flags unsupported (NFS, FUSE)


def rename_noreplace(from_fd: int, from_name: bytes, to_fd: int, to_name: bytes) -> None:
    """Rename *from_name* of *from_fd* to *to_name* of *to_fd*, FileExistsError if that
    exists.  Where RENAME_NOREPLACE is unsupported (EINVAL: NFS, GlusterFS's client),
    a regular file or symlink is hard-linked to the new name (atomic: EEXIST if
    taken) and its old name unlinked; a directory raises the EINVAL (it cannot be
    linked: the caller decides)."""
    try:
        renameat2(from_fd, from_name, to_fd, to_name, RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno not in NO_RENAME_FLAGS:
            raise
        if stat.S_ISDIR(os.stat(from_name, dir_fd=from_fd, follow_symlinks=False).st_mode):
            raise
    os.link(from_name, to_name, src_dir_fd=from_fd, dst_dir_fd=to_fd, follow_symlinks=False)
    os.unlink(from_name, dir_fd=from_fd)


FS_IOC_GETFLAGS = 0x80086601
FS_CASEFOLD_FL = 0x40000000


def check_not_casefolded(backing: str | os.PathLike[str]) -> None:
    """ConfigError if the directory *backing* has ext4's casefold flag (``chattr +F``):
    its names would be looked up ignoring case, and encrypted names may differ in case
    only.  A filesystem without the flag's ioctl passes (init probes case itself)."""
    fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
    except OSError:
        return
    finally:
        os.close(fd)
    if int.from_bytes(flags[:4], sys.byteorder) & FS_CASEFOLD_FL:
        raise ConfigError(
            f"{backing} has the casefold attribute (chattr +F): names there are looked up"
            " ignoring case, and encrypted names differ in case only; move the volume to a"
            " directory without it"
        )


def check_case_sensitive(backing: str | os.PathLike[str]) -> None:
    """ConfigError if the filesystem of the directory *backing* folds case (ext4's
    casefold, vfat, exFAT, some SMB shares): encrypted names may differ in case only.
    Probes with a scratch file (a reserved name, removed after)."""
    name = f".kmsfs-case-probe-{os.urandom(4).hex()}"
    dir_fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        os.close(fd)
        try:
            os.stat(name.upper(), dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        finally:
            os.unlink(name, dir_fd=dir_fd)
        raise ConfigError(
            f"{backing}: the backing filesystem ignores case in names, and encrypted names"
            " differ in case only: use a case-sensitive filesystem (ext4 without casefold,"
            " xfs, btrfs), or --plain-names"
        )
    finally:
        os.close(dir_fd)
