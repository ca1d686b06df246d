"""Import: turn a plaintext tree into a new volume (a copy: the plaintext is never touched).

Each regular file is encrypted into ``.kmsfs.d/import-tmp``, given its owner,
mode, user xattrs and times, fsynced, then renamed to its place: a name in the
volume either does not exist yet or holds a complete encrypted copy.  A second
run (same source) therefore resumes: it skips every name that exists.
Directories, symlinks, FIFOs and device nodes are recreated with their
metadata (directory times last, bottom-up); sockets are skipped; hard links
among the source's files are hard links in the volume.  Names at the source
root that begin with ``.kmsfs`` are reserved and skipped (reported).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs.format.volume import CONFIG_NAME, RESERVED_PREFIX, VolumeConfig
from kmsfs.keys.keyring import Keyring
from kmsfs.lifecycle.common import (
    LifecycleError,
    Progress,
    drop_journal,
    fsync_dir,
    load_journal,
    refuse_if_mounted,
    save_journal,
    state_dir,
)
from kmsfs.lifecycle.copy import copy_metadata, write_encrypted

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
    """Copy the plaintext tree *source* into the volume *backing*, encrypting files."""
    src_root = Path(source).absolute()
    root = Path(backing).absolute()
    started = time.monotonic()
    refuse_if_mounted(root, "import")
    journal = load_journal(root, JOURNAL)
    if journal is None:
        journal = {
            "source": str(src_root.resolve()),
            "started": dt.datetime.now(dt.UTC).isoformat(),
        }
        save_journal(root, JOURNAL, journal)
    tmp = state_dir(root) / TMP_NAME
    tmp.unlink(missing_ok=True)
    report = ImportReport()

    total = sum(len(files) for _, _, files in os.walk(src_root))
    progress = Progress("importing", total, enabled=show_progress)
    linked: dict[tuple[int, int], Path] = {}
    dirs: list[tuple[Path, Path, os.stat_result]] = []
    try:
        for dirpath, dirnames, filenames in os.walk(src_root):
            here = Path(dirpath)
            rel_dir = here.relative_to(src_root)
            dirnames.sort()
            if here == src_root:
                for name in [d for d in dirnames if d.startswith(RESERVED_PREFIX)]:
                    report.skipped.append((name, "name reserved for kmsfs"))
                dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            for name in dirnames:
                target = root / rel_dir / name
                st = os.lstat(here / name)
                target.mkdir(mode=0o700, exist_ok=True)
                dirs.append((here / name, target, st))
                report.dirs += 1
            touched = False
            for name in sorted(filenames):
                progress.advance()
                rel = str(rel_dir / name) if str(rel_dir) != "." else name
                if here == src_root and name.startswith(RESERVED_PREFIX):
                    report.skipped.append((rel, "name reserved for kmsfs"))
                    continue
                touched |= _import_one(
                    here / name, root / rel, rel, keyring, config, tmp, linked, report
                )
            if touched:
                fsync_dir(root / rel_dir)
    finally:
        progress.close()
    for src_dir, target, st in reversed(dirs):
        copy_metadata(st, src_dir, target)
    drop_journal(root, JOURNAL)
    report.seconds = time.monotonic() - started
    return report


def _import_one(
    source: Path,
    target: Path,
    rel: str,
    keyring: Keyring,
    config: VolumeConfig,
    tmp: Path,
    linked: dict[tuple[int, int], Path],
    report: ImportReport,
) -> bool:
    st = os.lstat(source)
    mode = st.st_mode
    inode = (st.st_dev, st.st_ino)
    if stat.S_ISREG(mode):
        report.files += 1
        if os.path.lexists(target):
            report.already += 1
            linked.setdefault(inode, target)
            return False
        if st.st_nlink > 1 and inode in linked:
            os.link(linked[inode], target)
            report.links += 1
            return True
        fd = os.open(source, os.O_RDONLY)
        try:
            write_encrypted(
                tmp, keyring, config.block_size, lambda off, n: os.pread(fd, n, off), st.st_size
            )
        finally:
            os.close(fd)
        copy_metadata(st, source, tmp)
        os.rename(tmp, target)
        linked[inode] = target
        report.imported += 1
        report.bytes += st.st_size
        return True
    if os.path.lexists(target):
        return False
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        os.mknod(target, mode, st.st_rdev)
    else:
        report.skipped.append((rel, "socket or unknown file type"))
        return False
    copy_metadata(st, source, target)
    report.other += 1
    return True
