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

Which files are due: a file key is created with its backing inode (by
create, import and rekey alike), so the inode's birth time (statx btime) is
the key's age.  ``--older-than D`` re-keys files born more than D before the
run started; without it, every file born before the run.  The cutoff is kept
in the journal, so a resumed run skips the files it already re-keyed (they
were born after it).  Directory times are restored after each rename.

Online re-keying would need the daemon's cooperation: it holds open files'
keys and file descriptors on the old inode, so the swap has to happen under
the inode lock inside the daemon (re-encrypt to a temp file, then rename and
re-point the open handles), which is work for the FUSE layer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs.errors import FormatError, KmsfsError
from kmsfs.format.content import BlockCipher
from kmsfs.format.volume import VolumeConfig
from kmsfs.fs.content_file import ContentFile
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import wipe
from kmsfs.lifecycle.common import (
    LifecycleError,
    Progress,
    birth_time,
    drop_journal,
    fsync_dir,
    journal_path,
    load_journal,
    parse_header,
    read_raw_header,
    refuse_if_mounted,
    save_journal,
    state_dir,
    walk_files,
)
from kmsfs.lifecycle.copy import copy_metadata, write_encrypted

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
    older_than: float | None = None,
    show_progress: bool | None = None,
) -> RekeyReport:
    """Re-encrypt every due file of the (unmounted) volume under a fresh key."""
    root = Path(backing).absolute()
    started = time.monotonic()
    refuse_if_mounted(root, "rekey")
    report = RekeyReport()
    journal = load_journal(root, JOURNAL)
    if journal is None:
        journal = {"older_than": older_than, "cutoff": None, "current": None}
        save_journal(root, JOURNAL, journal)
        born = birth_time(journal_path(root, JOURNAL))
        if born is None:
            drop_journal(root, JOURNAL)
            raise LifecycleError(
                "rekey needs inode birth times (statx btime), which this filesystem does not keep"
            )
        journal["cutoff"] = born - (older_than or 0.0)
        save_journal(root, JOURNAL, journal)
    cutoff = float(journal["cutoff"])
    _recover(root, journal)

    groups: dict[tuple[int, int], list[str]] = {}
    for entry in walk_files(root):
        groups.setdefault((entry.st.st_dev, entry.st.st_ino), []).append(entry.rel)
    progress = Progress("re-keying", len(groups), enabled=show_progress)
    try:
        for names in groups.values():
            progress.advance()
            report.files += 1
            primary = root / names[0]
            try:
                born = birth_time(primary)
                if born is not None and born >= cutoff:
                    report.not_due += 1
                    continue
                _rekey_one(root, names, config, keyring, journal, report)
            except FileNotFoundError:
                continue
            except FormatError as exc:
                report.skipped.append((names[0], str(exc)))
            except (KmsfsError, OSError) as exc:
                report.problems.append((names[0], str(exc)))
    finally:
        progress.close()
    if not report.problems:
        drop_journal(root, JOURNAL)
    report.seconds = time.monotonic() - started
    return report


def _recover(root: Path, journal: dict[str, object]) -> None:
    """Finish or undo the file a previous run was swapping when it stopped."""
    current = journal.get("current")
    tmp = state_dir(root) / TMP_NAME
    link_tmp = state_dir(root) / LINK_TMP_NAME
    link_tmp.unlink(missing_ok=True)
    if isinstance(current, list) and current:
        if tmp.exists():
            tmp.unlink()  # the rename never happened: the old file is intact
        else:
            _relink(root, [str(name) for name in current])
        journal["current"] = None
        save_journal(root, JOURNAL, journal)
    tmp.unlink(missing_ok=True)


def _relink(root: Path, names: list[str]) -> None:
    primary = root / names[0]
    link_tmp = state_dir(root) / LINK_TMP_NAME
    for name in names[1:]:
        other = root / name
        if other.exists() and os.path.samefile(primary, other):
            continue
        link_tmp.unlink(missing_ok=True)
        os.link(primary, link_tmp)
        times = os.stat(other.parent)
        os.rename(link_tmp, other)
        os.utime(other.parent, ns=(times.st_atime_ns, times.st_mtime_ns))
        fsync_dir(other.parent)


def _rekey_one(
    root: Path,
    names: list[str],
    config: VolumeConfig,
    keyring: Keyring,
    journal: dict[str, object],
    report: RekeyReport,
) -> None:
    primary = root / names[0]
    raw = read_raw_header(primary)
    if raw is None:
        report.skipped.append((names[0], "no kmsfs header (not encrypted)"))
        return
    header = parse_header(raw, names[0])
    if header.volume_id != config.volume_id:
        report.skipped.append((names[0], "header of another volume"))
        return
    key = keyring.unwrap(header, names[0])
    try:
        cipher = BlockCipher.for_file(key, header)
    finally:
        wipe(key)
    tmp = state_dir(root) / TMP_NAME
    tmp.unlink(missing_ok=True)
    with open(primary, "rb") as handle:
        st = os.fstat(handle.fileno())
        old = ContentFile.open(handle.fileno(), cipher, lambda: names[0])
        write_encrypted(tmp, keyring, header.block_size, old.read, old.size)
        size = old.size
    copy_metadata(st, primary, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    journal["current"] = names
    save_journal(root, JOURNAL, journal)
    times = os.stat(primary.parent)
    os.rename(tmp, primary)
    os.utime(primary.parent, ns=(times.st_atime_ns, times.st_mtime_ns))
    fsync_dir(primary.parent)
    _relink(root, names)
    journal["current"] = None
    save_journal(root, JOURNAL, journal)
    report.rekeyed += 1
    report.bytes += size
