"""Where the volume's entries are: their paths in the volume (policy, logs, audit),
their directories for the name operations, the names reserved for kmsfs, and the mode
and owner a new entry is placed with."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import pyfuse3
from pyfuse3 import FUSEError

from kmsfs.backing import syscalls, xattrs
from kmsfs.backing.names import Dir
from kmsfs.backing.paths import VolumePaths
from kmsfs.fs.errno_map import log
from kmsfs.fs.fuseloop import PYFUSE3
from kmsfs.fs.inodes import ROOT_INODE, Inode
from kmsfs.fs.served import ServedVolume


class Places:
    """The entries' places, for every concern of the operations.

    Attributes: names (where a name lives in the backing directory, plain or
    encrypted: kmsfs/backing/names.py), paths (volume paths of descriptors:
    kmsfs/backing/paths.py).
    """

    def __init__(self, parts: ServedVolume) -> None:
        self.names = parts.names
        self.paths = VolumePaths(parts.inodes.root_fd, parts.names)
        self._unresolved_logged: set[int] = set()
        self._is_root = os.geteuid() == 0

    def check_name(self, parent: int, name: bytes) -> None:
        """EPERM for names reserved for kmsfs's own files (``.kmsfs*`` at the root of a
        volume with plain names; none with encrypted names)."""
        if self.names.reserved(parent == ROOT_INODE, name):
            raise FUSEError(errno.EPERM)

    def dir(self, entry: Inode, fd: int | None = None) -> Dir:
        """The directory *entry* for the name operations (``self.names``), through its
        descriptor (or *fd*, another of it).  Its directory ID is read once and kept
        with the entry: EncryptedNameError or FormatError if it is missing or
        malformed (logged by the handler, EIO)."""
        root = entry.ino == ROOT_INODE
        if entry.dir_id is None:
            entry.dir_id = self.names.dir_id(entry.proc_path, root)
        return Dir(entry.fd if fd is None else fd, entry.dir_id, root)

    def path_of(self, entry: Inode, name: bytes | None = None) -> Callable[[], str | None]:
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

    def new_mode(self, parent: Inode, mode: int, ctx: pyfuse3.RequestContext) -> int:
        """The mode to make a new entry of *parent* with.  With FUSE_DONT_MASK the kernel
        leaves the requester's umask to us: it applies unless *parent* has a default ACL,
        which POSIX lets rule alone (the backing filesystem gives the entry that ACL,
        narrowed only by *mode*; the daemon's own umask is 0).  Without it, the kernel
        has applied the umask to *mode* already, also under a default ACL (which it
        thereby narrows).  OSError if *parent*'s ACL cannot be read."""
        if not PYFUSE3.dont_mask or xattrs.has_default_acl(parent.proc_path):
            return mode
        return mode & ~ctx.umask

    def own(self, fd: int, parent: Inode, ctx: pyfuse3.RequestContext) -> None:
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
