"""Re-keying: re-encrypt file contents under fresh file keys and file IDs (offline).

Per file (all names of one inode together):

1. the new content is written to ``.kmsfs.d/rekey-tmp`` (same filesystem),
   with a new header, owner, mode, user xattrs and times, and fsynced;
2. the journal ``.kmsfs.d/rekey.json`` records the file's names;
3. the new file is renamed over the first name (atomic: a crash leaves the
   old or the new file, never a mix), then each further hard link is re-made
   (``link`` to a temporary name, ``rename`` over the old name);
4. the journal entry is cleared.

Why not rewrite in place through ContentFile with a new header: the header
and every block would change in separate writes, and a crash in between
leaves blocks under two keys.  Temp file + rename is atomic per name; a crash
between the renames of two hard links leaves two inodes holding the same
plaintext, each readable; the next run re-links them (step 3 is replayed from
the journal).

Which files are due: ``kmsfs.lifecycle.selection`` (the inode's birth time is the
key's age: ``--older-than D`` re-keys files born more than D before the run started,
without it every file born before the run; ``--master-key``, ``--path``).  The
selection and the cutoff are kept in the journal, so a resumed run selects as it
was started and skips the files it already re-keyed (they were born after the
cutoff).  Directory times are restored after each rename.

Everything is done by descriptor (``kmsfs.backing.tree``): the old file is opened
beneath the backing root without following any symlink and must be the inode
the walk saw; the new file is written, given its metadata and renamed from
``.kmsfs.d`` into the descriptor of the directory the old file was found in;
further names are linked to the new inode through its descriptor.  A directory
swapped for a symlink while rekey runs is never followed: its files are listed
as failed (run rekey again).  The volume lock is held for the whole run, so no
daemon mounts the volume meanwhile.

A mounted volume is re-keyed by its daemon instead (docs/DESIGN.md "Online
rekey"), which holds open files' keys and descriptors on the old inode.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.copy import copy_metadata, read_xattrs, write_encrypted
from kmsfs.backing.encrypted_names import names_for
from kmsfs.backing.header_xattr import parse_header, read_raw_header
from kmsfs.backing.journals import drop_journal, load_journal, save_journal, unlink_if_present
from kmsfs.backing.names import Names
from kmsfs.backing.syscalls import RENAME_EXCHANGE, birth_time, renameat2
from kmsfs.backing.tool_lock import volume_locked
from kmsfs.backing.tree import FILE_FLAGS, Entry, Tree, TreeChanged, check_file
from kmsfs.errors import FormatError, KmsfsError, LifecycleError, reason_of
from kmsfs.format.volume_config import VolumeConfig
from kmsfs.keys.keyring import Keyring
from kmsfs.lifecycle.progress import Progress
from kmsfs.lifecycle.selection import Selection, backing_paths, journal_cutoff

JOURNAL = "rekey"
TMP_NAME = "rekey-tmp"
LINK_TMP_NAME = "rekey-link-tmp"


@dataclass
class RekeyReport:
    files: int = 0
    rekeyed: int = 0
    not_due: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def rekey_volume(
    backing: str | os.PathLike[str],
    config: VolumeConfig,
    keyring: Keyring,
    selection: Selection | None = None,
    show_progress: bool | None = None,
) -> RekeyReport:
    """Re-encrypt every due file of the (unmounted) volume under a fresh key (every
    file born before the run if *selection* is None; a resumed run keeps the selection
    it was started with).

    VolumeMounted (exit 7) if a daemon holds the volume; per-file failures
    (including files that changed under the run) are listed in the report.
    """
    root = Path(backing).absolute()
    started = time.monotonic()
    names = names_for(config.names, keyring.volume_key, config.volume_id)
    with (
        volume_locked(root, "rekey"),
        Tree(root, encrypted_names=config.encrypted_names) as tree,
        tree.state_dir() as state,
    ):
        report = _rekey_tree(tree, state, names, keyring, selection, show_progress)
    report.seconds = time.monotonic() - started
    return report


def _rekey_tree(
    tree: Tree,
    state: int,
    names: Names,
    keyring: Keyring,
    selection: Selection | None,
    show_progress: bool | None,
) -> RekeyReport:
    root = tree.path
    report = RekeyReport()
    journal = load_journal(root, JOURNAL)
    if journal is None:
        selection = selection or Selection()
        journal = {
            "older_than": selection.older_than,
            "selection": selection.to_json(),
            "cutoff": None,
            "current": None,
        }
        save_journal(root, JOURNAL, journal)
        try:
            journal["cutoff"] = journal_cutoff(root, JOURNAL, selection.older_than)
        except LifecycleError:
            drop_journal(root, JOURNAL)
            raise
        save_journal(root, JOURNAL, journal)
    elif "selection" in journal:  # journals of earlier versions select by age only
        selection = Selection.from_json(journal["selection"], f"{root}/.kmsfs.d/{JOURNAL}.json")
    selection = selection or Selection()
    wanted_paths = selection.in_backing(backing_paths(names, tree.fd))
    cutoff = float(journal["cutoff"])
    _recover(tree, state, journal)

    groups: dict[tuple[int, int], list[Entry]] = {}
    for entry in tree.files():
        groups.setdefault(entry.inode, []).append(entry)
    for rel, reason in tree.skipped:
        report.problems.append((rel, reason))
    progress = Progress("re-keying", len(groups), enabled=show_progress)
    try:
        for entries in groups.values():
            progress.advance()
            report.files += 1
            first = entries[0]
            if not any(wanted_paths.path_selected(entry.rel) for entry in entries):
                report.not_due += 1
                continue
            try:
                dir_fd, name = tree.parent(first.rel)
                try:
                    fd = check_file(
                        os.open(name, os.O_RDONLY | FILE_FLAGS, dir_fd=dir_fd), first.rel, first
                    )
                    try:
                        born = birth_time(fd)
                        if born is not None and born >= cutoff:
                            report.not_due += 1
                            continue
                        found = (dir_fd, name, fd)
                        _rekey_one(
                            tree, state, names, found, entries, keyring, journal, report,
                            selection,
                        )  # fmt: skip
                    finally:
                        os.close(fd)
                finally:
                    os.close(dir_fd)
            except FileNotFoundError:
                continue
            except FormatError as exc:
                report.skipped.append((first.rel, str(exc)))
            except (KmsfsError, OSError) as exc:
                report.problems.append((first.rel, _describe(exc, first.rel)))
    finally:
        progress.close()
    if not report.problems:
        drop_journal(root, JOURNAL)
    return report


def _describe(exc: BaseException, rel: str) -> str:
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return reason_of(exc)


def _recover(tree: Tree, state: int, journal: dict[str, object]) -> None:
    """Finish or undo the file a previous run was swapping when it stopped.

    ``rekey-tmp`` holding the file the journal names (by file ID): the exchange never
    happened and the old file is intact; the new one is dropped.  Otherwise the new
    file is in place (``rekey-tmp``, if any, is the old one): the further hard links
    are re-made to it.  (Journals of earlier versions have no file ID: they renamed,
    so a ``rekey-tmp`` there means the rename never happened.)
    """
    current = journal.get("current")
    unlink_if_present(state, LINK_TMP_NAME)
    if isinstance(current, list) and current:
        names = [str(name) for name in current]
        new_id = journal.get("file_id")
        tmp_id = _file_id_at(state, TMP_NAME)
        if (tmp_id is None) if new_id is None else (tmp_id != new_id):
            try:
                fd = tree.open_file(names[0])
            except (FileNotFoundError, TreeChanged):
                fd = -1  # gone or replaced since: nothing of this run's to link
            if fd >= 0:
                try:
                    if new_id is None or _header_id(fd, names[0]) == new_id:
                        _relink(tree, state, fd, names)
                finally:
                    os.close(fd)
        journal["current"] = None
        journal.pop("file_id", None)
        save_journal(tree.path, JOURNAL, journal)
    unlink_if_present(state, TMP_NAME)


def _file_id_at(dir_fd: int, name: str) -> str | None:
    """The file ID (hex) in the header of the regular file *name* of *dir_fd*, or None."""
    try:
        fd = check_file(os.open(name, os.O_RDONLY | FILE_FLAGS, dir_fd=dir_fd), name)
    except (FileNotFoundError, TreeChanged):
        return None
    try:
        return _header_id(fd, name)
    finally:
        os.close(fd)


def _header_id(fd: int, rel: str) -> str | None:
    try:
        raw = read_raw_header(fd)
        return parse_header(raw, rel).file_id.hex() if raw is not None else None
    except FormatError:
        return None


def _relink(tree: Tree, state: int, fd: int, names: list[str]) -> None:
    """Make every further name of *names* a hard link of the inode of *fd*."""
    new = os.fstat(fd)
    for name in names[1:]:
        dir_fd, base = tree.parent(name)
        try:
            try:
                now = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (new.st_dev, new.st_ino):
                    continue
            except FileNotFoundError:
                pass
            unlink_if_present(state, LINK_TMP_NAME)
            # link the inode we hold, not whatever a name leads to by now
            os.link(f"/proc/self/fd/{fd}", LINK_TMP_NAME, dst_dir_fd=state, follow_symlinks=True)
            times = os.fstat(dir_fd)
            os.rename(LINK_TMP_NAME, base, src_dir_fd=state, dst_dir_fd=dir_fd)
            os.utime(dir_fd, ns=(times.st_atime_ns, times.st_mtime_ns))
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _rekey_one(
    tree: Tree,
    state: int,
    names: Names,
    found: tuple[int, str, int],
    entries: list[Entry],
    keyring: Keyring,
    journal: dict[str, object],
    report: RekeyReport,
    selection: Selection,
) -> None:
    """Re-key the file open as *fd*, found as *name* in *dir_fd* (``found``: the first
    of *entries*), if *selection* wants its header.  Its encrypted xattr values are
    sealed again under the new file ID (*names*: they are bound to it)."""
    dir_fd, name, fd = found
    rel = entries[0].rel
    raw = read_raw_header(fd)
    if raw is None:
        report.skipped.append((rel, "no kmsfs header (not encrypted)"))
        return
    header = parse_header(raw, rel)
    if header.volume_id != keyring.volume_id:
        report.skipped.append((rel, "header of another volume"))
        return
    if not selection.header_selected(header):
        report.not_due += 1
        return
    cipher = keyring.cipher_for(header, rel)
    st = os.fstat(fd)
    unlink_if_present(state, TMP_NAME)
    new_fd = os.open(TMP_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=state)
    try:
        old = ContentFile.open(fd, cipher, lambda: rel)
        new_header, new_cipher = keyring.new_file_cipher(header.block_size)
        write_encrypted(new_fd, new_header, new_cipher, old.read, old.size, rel)
        values = names.rebind_xattrs(read_xattrs(fd), header.file_id, new_header.file_id)
        copy_metadata(st, new_fd, values)
        os.fsync(new_fd)
        rels = [entry.rel for entry in entries]
        journal["current"] = rels
        journal["file_id"] = new_header.file_id.hex()
        save_journal(tree.path, JOURNAL, journal)
        times = os.fstat(dir_fd)
        _replace(state, dir_fd, name, st)
        os.utime(dir_fd, ns=(times.st_atime_ns, times.st_mtime_ns))
        os.fsync(dir_fd)
        _relink(tree, state, new_fd, rels)
    finally:
        os.close(new_fd)
    journal["current"] = None
    journal.pop("file_id", None)
    save_journal(tree.path, JOURNAL, journal)
    report.rekeyed += 1
    report.bytes += old.size


def _replace(state: int, dir_fd: int, name: str, old: os.stat_result) -> None:
    """Rename the new file over *name* in *dir_fd*, if *name* is still the old inode.

    The new file is first exchanged with the name (atomic), and the inode that comes
    back must be the old one; if the directory's owner put something else there
    meanwhile, the exchange is undone and TreeChanged raised.
    """
    try:
        renameat2(state, TMP_NAME.encode(), dir_fd, os.fsencode(name), RENAME_EXCHANGE)
    except FileNotFoundError:
        raise TreeChanged("removed while rekey ran: not re-keyed", where=name) from None
    back = os.stat(TMP_NAME, dir_fd=state, follow_symlinks=False)
    if (back.st_dev, back.st_ino) != (old.st_dev, old.st_ino):
        renameat2(state, TMP_NAME.encode(), dir_fd, os.fsencode(name), RENAME_EXCHANGE)
        raise TreeChanged("replaced while rekey ran: not re-keyed", where=name)
    os.unlink(TMP_NAME, dir_fd=state)
