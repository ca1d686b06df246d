"""Import: turn a plaintext tree into a new volume (a copy: the plaintext is never touched).

Each regular file is encrypted into ``.kmsfs.d/import-tmp``, given its owner,
mode, user xattrs and times, fsynced, then renamed to its place: a name in the
volume either does not exist yet or holds a complete encrypted copy.  A second
run (same source) therefore resumes: it skips every name that exists.
Directories, symlinks, FIFOs and device nodes are recreated with their
metadata (directory times last, bottom-up); sockets are skipped; hard links
among the source's files are hard links in the volume.  Names at the source
root that begin with ``.kmsfs`` are reserved and skipped (reported).

Both trees are read and written by descriptor (``kmsfs.backing.tree``), because the
source can belong to other users as much as the backing tree does: the source
is walked without following any symlink (a symlink is recreated as a symlink,
whatever it points to), each file is opened relative to its directory's
descriptor with ``O_NOFOLLOW`` and must be a regular file, and its content,
xattrs and metadata are read from that descriptor.  An entry that changes type
under the walk is skipped and reported.  The volume lock is held for the run.

Into a volume with encrypted names, every name is made through the volume's
``Names`` (kmsfs/backing/names.py), as the daemon makes it: encrypted under its
directory's ID (a directory gets its ID before it is visible), long names with
their sidecars, symlink targets and user xattrs encrypted; a symlink target or
xattr longer than encrypted names store is skipped and reported.  This is also
how a volume with plain names becomes one with encrypted names: import a
read-only mount of it into a new volume (docs/FORMAT.md, "Converting a volume
with plain names").
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs.backing.copy import copy_metadata, read_xattrs, write_encrypted
from kmsfs.backing.encrypted_names import names_for
from kmsfs.backing.journals import drop_journal, load_journal, save_journal, unlink_if_present
from kmsfs.backing.names import Dir, Names
from kmsfs.backing.tool_lock import volume_locked
from kmsfs.backing.tree import (
    FILE_FLAGS,
    NOT_FOLLOWED,
    Node,
    Tree,
    TreeChanged,
    check_file,
)
from kmsfs.errors import LifecycleError, PlaintextTooLong
from kmsfs.format.volume_config import CONFIG_NAME, RESERVED_PREFIX, VolumeConfig
from kmsfs.keys.keyring import Keyring
from kmsfs.lifecycle.progress import Progress

JOURNAL = "import"
TMP_NAME = "import-tmp"


@dataclass
class ImportReport:
    files: int = 0
    imported: int = 0
    already: int = 0
    links: int = 0
    dirs: int = 0
    other: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def check_import_target(source: Path, backing: Path) -> dict[str, object] | None:
    """The pending import journal of *backing*, or None for a fresh import.

    LifecycleError if *backing* is a volume with files and no pending import
    of *source*, or if one directory lies inside the other.
    """
    src, dst = source.resolve(), backing.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise LifecycleError(f"{source} and {backing} must not contain one another")
    if not (backing / CONFIG_NAME).exists():
        return None
    journal = load_journal(backing, JOURNAL)
    if journal is not None:
        if journal.get("source") != str(src):
            raise LifecycleError(
                f"{backing} has an unfinished import of {journal.get('source')}, not {src}"
            )
        return journal
    if any(not name.startswith(RESERVED_PREFIX) for name in os.listdir(backing)):
        raise LifecycleError(
            f"{backing} is already a volume with files: import creates a new volume"
        )
    return {}


def import_tree(
    source: str | os.PathLike[str],
    backing: str | os.PathLike[str],
    config: VolumeConfig,
    keyring: Keyring,
    show_progress: bool | None = None,
) -> ImportReport:
    """Copy the plaintext tree *source* into the volume *backing*, encrypting files.

    VolumeMounted (exit 7) if a daemon holds the volume.
    """
    src_root = Path(source).absolute()
    root = Path(backing).absolute()
    started = time.monotonic()
    names = names_for(config.names, keyring.volume_key, config.volume_id)
    with (
        volume_locked(root, "import"),
        Tree(src_root, reserved=False) as src,
        Tree(root, encrypted_names=config.encrypted_names) as dst,
    ):
        journal = load_journal(root, JOURNAL)
        if journal is None:
            journal = {
                "source": str(src_root.resolve()),
                "started": dt.datetime.now(dt.UTC).isoformat(),
            }
            save_journal(root, JOURNAL, journal)
        with dst.state_dir() as state:
            target = Target(dst, names, state)
            report = _import(src, target, config, keyring, show_progress)
        drop_journal(root, JOURNAL)
    report.seconds = time.monotonic() - started
    return report


@dataclass
class Target:
    """The volume imported into: its backing tree, its names (plain or encrypted) and
    the descriptor of its state directory (where files are written before they get
    their names)."""

    tree: Tree
    names: Names
    state: int

    def open_dir(self, rel: str) -> Dir:
        """The directory at the path *rel* of the volume ('' is the root), with a new
        descriptor (the caller closes ``fd``) and its ID."""
        backing = self.names.backing_path(self.tree.fd, os.fsencode(rel))
        fd = self.tree.open_dir(os.fsdecode(backing))
        try:
            return Dir(fd, self.names.dir_id(f"/proc/self/fd/{fd}", root=not rel), not rel)
        except BaseException:
            os.close(fd)
            raise

    def parent(self, rel: str) -> tuple[Dir, bytes]:
        """The directory holding the path *rel* (as ``open_dir``) and *rel*'s last name."""
        head, _, name = rel.rpartition("/")
        return self.open_dir(head), os.fsencode(name)


def _reserved(node: Node) -> bool:
    return "/" not in node.rel and node.name.startswith(RESERVED_PREFIX)


def _import(
    src: Tree,
    dst: Target,
    config: VolumeConfig,
    keyring: Keyring,
    show_progress: bool | None,
) -> ImportReport:
    report = ImportReport()
    unlink_if_present(dst.state, TMP_NAME)

    def skip_reserved(node: Node) -> bool:
        if _reserved(node):
            report.skipped.append((node.rel, "name reserved for kmsfs"))
            return True
        return False

    total = sum(not stat.S_ISDIR(node.st.st_mode) for node in src.walk(prune=_reserved))
    progress = Progress("importing", total, enabled=show_progress)
    linked: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result, dict[str, bytes]]] = []
    touched: set[str] = set()
    try:
        for node in src.walk(prune=skip_reserved):
            if stat.S_ISDIR(node.st.st_mode):
                assert node.fd is not None
                parent, name = dst.parent(node.rel)
                try:
                    dst.names.make_dir(parent, name, 0o700)
                except FileExistsError:
                    pass
                finally:
                    os.close(parent.fd)
                dirs.append((node.rel, node.st, read_xattrs(node.fd)))
                report.dirs += 1
                continue
            progress.advance()
            if _import_one(node, dst, keyring, config, linked, report):
                touched.add(node.rel.rpartition("/")[0])
    finally:
        progress.close()
    src.skipped.sort()
    report.skipped.extend((rel, f"{reason} (not imported)") for rel, reason in src.skipped)
    for rel in sorted(touched):
        directory = dst.open_dir(rel)
        try:
            os.fsync(directory.fd)
        finally:
            os.close(directory.fd)
    for rel, st, xattrs in reversed(dirs):  # children first: directory times last
        directory = dst.open_dir(rel)
        try:
            copy_metadata(
                st, directory.fd, _stored_xattrs(dst, rel, xattrs, directory.dir_id, report)
            )
        finally:
            os.close(directory.fd)
    return report


def _stored_xattrs(
    dst: Target, rel: str, values: dict[str, bytes], object_id: bytes, report: ImportReport
) -> dict[str, bytes]:
    """*values* as the volume stores them; those it cannot store are reported."""
    stored, refused = dst.names.stored_xattrs(values, object_id)
    report.skipped.extend((rel, f"xattr {name}: {why} (not imported)") for name, why in refused)
    return stored


def _import_one(
    node: Node,
    dst: Target,
    keyring: Keyring,
    config: VolumeConfig,
    linked: dict[tuple[int, int], str],
    report: ImportReport,
) -> bool:
    """Recreate the source entry *node* in the volume; True if something was made."""
    mode = node.st.st_mode
    if stat.S_ISREG(mode):
        report.files += 1
    parent, name = dst.parent(node.rel)
    names = dst.names
    try:
        try:
            os.stat(names.backing_name(parent, name), dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:  # done by an earlier run
            if stat.S_ISREG(mode):
                report.already += 1
                linked.setdefault(node.inode, node.rel)
            return False
        if stat.S_ISREG(mode):
            return _import_file(node, dst, parent, name, keyring, config, linked, report)
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(os.fsencode(node.name), dir_fd=node.parent_fd)
            except OSError as exc:  # EINVAL: no longer a symlink; ENOENT: gone
                report.skipped.append((node.rel, f"changed during import ({exc.strerror})"))
                return False
            try:
                backing = names.make_symlink(parent, name, target)
            except PlaintextTooLong as exc:
                report.skipped.append((node.rel, f"{exc} (not imported)"))
                return False
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            backing = names.make_node(parent, name, mode, node.st.st_rdev)
        else:
            report.skipped.append((node.rel, "socket or unknown file type"))
            return False
        fd = os.open(backing, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            copy_metadata(node.st, fd)
        finally:
            os.close(fd)
        report.other += 1
        return True
    finally:
        os.close(parent.fd)


def _import_file(
    node: Node,
    dst: Target,
    parent: Dir,
    name: bytes,
    keyring: Keyring,
    config: VolumeConfig,
    linked: dict[tuple[int, int], str],
    report: ImportReport,
) -> bool:
    """Encrypt the regular source file *node* into *name* of *parent* (or link it)."""
    names = dst.names
    if node.st.st_nlink > 1 and node.inode in linked:
        other_parent, other = dst.parent(linked[node.inode])
        try:
            other_fd = os.open(
                names.backing_name(other_parent, other),
                os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=other_parent.fd,
            )
        finally:
            os.close(other_parent.fd)
        try:
            names.link(f"/proc/self/fd/{other_fd}", parent, name)
        finally:
            os.close(other_fd)
        report.links += 1
        return True
    try:
        fd = check_file(
            os.open(node.name, os.O_RDONLY | FILE_FLAGS, dir_fd=node.parent_fd), node.rel
        )
    except (FileNotFoundError, TreeChanged):
        report.skipped.append((node.rel, "changed during import (not a regular file now)"))
        return False
    except OSError as exc:
        if exc.errno not in NOT_FOLLOWED:
            raise
        report.skipped.append((node.rel, "changed during import (now a symlink): not followed"))
        return False
    try:
        st = os.fstat(fd)  # the file read, whatever the walk saw
        new = os.open(
            TMP_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=dst.state
        )
        try:
            header, cipher = keyring.new_file_cipher(config.block_size)
            write_encrypted(
                new,
                header,
                cipher,
                lambda off, n: os.pread(fd, n, off),
                st.st_size,
                node.rel,
            )
            values = _stored_xattrs(dst, node.rel, read_xattrs(fd), header.file_id, report)
            copy_metadata(st, new, values)
        finally:
            os.close(new)
    finally:
        os.close(fd)
    names.place(dst.state, TMP_NAME.encode(), parent, name)
    linked[(st.st_dev, st.st_ino)] = node.rel
    report.imported += 1
    report.bytes += st.st_size
    return True
