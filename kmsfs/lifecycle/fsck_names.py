"""fsck of a volume with encrypted names: every name, sidecar, symlink target, directory
ID and encrypted xattr (docs/FORMAT.md, "Encrypted names").

Findings (``Finding.kind``), each naming the backing path (and the path in the volume
where the names above it decrypt):

- ``dir-id``: a directory whose ``user.kmsfs.dirid`` is missing or malformed: none of
  its names can be read (its entries are not checked further).
- ``name``: an entry whose name does not decrypt in its directory (edited, moved
  from another directory or volume, a long name without its sidecar or with one
  that does not match).
- ``symlink``: a symlink whose stored target does not decrypt.
- ``xattr``: an encrypted extended attribute whose name or value does not decrypt
  (a value is bound to its file's or directory's ID).
- ``leftover``: kmsfs's own debris, hidden through the mount: a sidecar whose entry
  is gone, a temporary name of an interrupted mkdir or sidecar write, a probe file.
- ``stray``: a name starting with '.' that kmsfs never makes (put there by hand);
  hidden through the mount.

The tree is walked by descriptor, never following a symlink (``kmsfs.backing.tree``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from kmsfs.backing.encrypted_names import EncryptedNames
from kmsfs.backing.header_xattr import read_header
from kmsfs.backing.names import TEMP_PREFIX, Dir
from kmsfs.backing.tree import Node, walk
from kmsfs.errors import KmsfsError, reason_of
from kmsfs.format.names import (
    ROOT_DIR_ID,
    EntryKind,
    XattrKind,
    entry_kind,
    long_name_of_sidecar,
    xattr_kind,
)
from kmsfs.format.volume_config import CONFIG_NAME, STATE_DIR_NAME

Report = Callable[[str, str, str], None]  # (backing rel, kind, message)


def check_names(root_fd: int, names: EncryptedNames, add: Report) -> dict[str, str]:
    """Check every name under the backing root *root_fd*, reporting through *add*;
    returns the path in the volume of every backing path whose names decrypt."""
    plain: dict[str, str] = {"": ""}
    dir_ids: dict[str, bytes | None] = {"": ROOT_DIR_ID}

    def prune(node: Node) -> bool:
        return "/" not in node.rel and node.name in (CONFIG_NAME, STATE_DIR_NAME)

    for node in walk(root_fd, prune):
        parent_rel = node.rel.rpartition("/")[0]
        parent_id = dir_ids.get(parent_rel)
        if parent_id is None:
            if stat.S_ISDIR(node.st.st_mode):
                dir_ids[node.rel] = None  # below a directory without an ID: not checked
            continue
        name = _check_entry(node, Dir(node.parent_fd, parent_id), names, add)
        if name is not None and parent_rel in plain:
            plain[node.rel] = os.path.join(plain[parent_rel], os.fsdecode(name))
        if stat.S_ISDIR(node.st.st_mode):
            dir_ids[node.rel] = _dir_id(node, names, add) if name is not None else None
        if name is not None:
            _check_object(node, names, dir_ids.get(node.rel), add)
    return plain


def _check_entry(node: Node, parent: Dir, names: EncryptedNames, add: Report) -> bytes | None:
    """The plaintext name of *node*, or None after reporting why it has none (kmsfs's
    own entries are checked for being leftovers)."""
    backing = os.fsencode(node.name)
    kind = entry_kind(backing)
    if kind is EntryKind.SIDECAR:
        entry = long_name_of_sidecar(backing)
        try:
            os.stat(entry, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            add(node.rel, "leftover", "a long name's sidecar whose entry is gone")
        return None
    if kind is EntryKind.OWN:
        if backing.startswith((TEMP_PREFIX, b".kmsfs-probe-", b".kmsfs-case-probe-")):
            add(node.rel, "leftover", "a temporary name of an interrupted kmsfs operation")
        else:
            add(node.rel, "stray", "a name kmsfs never makes (hidden through the mount)")
        return None
    try:
        return names.name_of(parent, backing)
    except (KmsfsError, OSError) as exc:
        add(node.rel, "name", _reason(exc))
        return None


def _dir_id(node: Node, names: EncryptedNames, add: Report) -> bytes | None:
    assert node.fd is not None
    try:
        return names.dir_id(f"/proc/self/fd/{node.fd}", root=False)
    except (KmsfsError, OSError) as exc:
        add(node.rel, "dir-id", f"{_reason(exc)}: its entries were not checked")
        return None


def _check_object(node: Node, names: EncryptedNames, dir_id: bytes | None, add: Report) -> None:
    """The symlink target and the encrypted xattrs of the entry *node*."""
    mode = node.st.st_mode
    if stat.S_ISLNK(mode):
        try:
            names.target_of(os.readlink(os.fsencode(node.name), dir_fd=node.parent_fd))
        except (KmsfsError, OSError) as exc:
            add(node.rel, "symlink", _reason(exc))
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return  # FIFOs, sockets, devices: no user xattrs
    fd = node.fd
    if fd is None:
        try:
            fd = os.open(node.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=node.parent_fd)
        except OSError:
            return  # removed or replaced meanwhile: the file checks say so
    path = f"/proc/self/fd/{fd}"
    try:
        _check_xattrs(node, path, names, dir_id, add)
    finally:
        if fd != node.fd:
            os.close(fd)


def _check_xattrs(
    node: Node, path: str, names: EncryptedNames, dir_id: bytes | None, add: Report
) -> None:
    try:
        listed = [os.fsencode(n) for n in os.listxattr(path)]
    except OSError:
        return
    object_id: bytes | None = None
    for backing in listed:
        if xattr_kind(backing) is not XattrKind.ENCRYPTED:
            continue
        try:
            name = names.cipher.decrypt_xattr_name(backing)
            if object_id is None:
                object_id = _object_id(node, path, dir_id)
            names.cipher.decrypt_xattr_value(object_id, name, os.getxattr(path, backing))
        except (KmsfsError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENODATA:
                continue  # removed meanwhile
            add(node.rel, "xattr", _reason(exc))


def _object_id(node: Node, path: str, dir_id: bytes | None) -> bytes:
    """What the node's xattr values are bound to (FormatError for a file without a
    readable header: its own finding says so)."""
    if stat.S_ISDIR(node.st.st_mode):
        return dir_id or b""
    return read_header(path, node.rel).file_id


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return reason_of(exc)
