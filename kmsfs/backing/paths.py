"""A backing inode's path in the volume, from the daemon's own descriptors.

The access policy's paths, audit records and log lines name a file by its
path under the mount root.  ``VolumePaths.of(fd)`` computes it from the
kernel's name of the open descriptor (``readlink /proc/self/fd/N``, about
3 µs) relative to the kernel's name of the backing root's descriptor, read
the same way once at start.  Both names are the kernel's, in the daemon's
mount namespace, with every symlink already resolved: the backing path as
the operator wrote it (which may lead through a symlink, ``/srv`` ->
``/data``) is never compared with them.  When the root's name no longer
prefixes a path (the backing directory was renamed or moved while mounted),
the root's name is read again once.  In a volume with encrypted names the
kernel's name is a backing path: each component is then decrypted under its
directory's ID (kmsfs/backing/encrypted_names.py, ``plain_path``), opening each directory
on the way with O_NOFOLLOW from the root's descriptor.

None means "not resolvable": the file is no longer under the backing root
(moved out by someone who can write the backing directory), the name is too
long for the kernel to print, the descriptor is not open, or a component does
not decrypt.  The operations
layer then denies whatever a path rule could decide (docs/DESIGN.md "Access
policy").  A file unlinked while open keeps its last path: the kernel's
`` (deleted)`` suffix is dropped when the inode has no link left.
"""

from __future__ import annotations

import os

from kmsfs.backing.names import Names, PlainNames

DELETED = " (deleted)"


class VolumePaths:
    """Paths in the volume of descriptors under the backing root.

    Attributes: root_fd (the backing root's descriptor, not owned), root (its
    kernel name, re-read when a path no longer falls under it), names (the
    volume's names: plain, or encrypted under directory IDs).
    """

    def __init__(self, root_fd: int, names: Names | None = None) -> None:
        """OSError if the root descriptor has no name (it is not open)."""
        self.root_fd = root_fd
        self.root = os.readlink(f"/proc/self/fd/{root_fd}")
        self.names = names if names is not None else PlainNames()

    def of(self, fd: int) -> str | None:
        """``/`` or ``/a/b`` for the file open on *fd*, None if not resolvable (above)."""
        backing = self.backing_of(fd)
        return None if backing is None else self.names.plain_path(self.root_fd, backing)

    def backing_of(self, fd: int) -> str | None:
        """The backing path (relative to the root, ``/X/Y``) of the file open on *fd*,
        None if it is not under the root or not open."""
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        path = self._under_root(name)
        if path is None:
            try:
                root = os.readlink(f"/proc/self/fd/{self.root_fd}")
            except OSError:
                return None
            if root == self.root:
                return None
            self.root = root  # the backing directory itself was moved
            path = self._under_root(name)
            if path is None:
                return None
        if path.endswith(DELETED) and _unlinked(fd):
            path = path[: -len(DELETED)] or "/"
        return path

    def _under_root(self, name: str) -> str | None:
        root = self.root
        if name == root:
            return "/"
        prefix = root if root.endswith("/") else root + "/"  # a backing root of "/"
        if not name.startswith(prefix):
            return None
        return "/" + name[len(prefix) :]


def _unlinked(fd: int) -> bool:
    try:
        return os.stat(fd).st_nlink == 0
    except OSError:
        return False
