"""Volume paths from the daemon's own descriptors (kmsfs/backing/paths.py), on real directories:
through a symlinked backing path, after renames, for files moved out of the backing
directory, unlinked files, and a backing directory moved while open."""

from __future__ import annotations

import os
from pathlib import Path

from kmsfs.backing.paths import VolumePaths
from kmsfs.fs.inodes import O_PATH_FLAGS


def opened(path: Path) -> int:
    return os.open(path, O_PATH_FLAGS)


def test_paths_through_a_symlinked_backing_path(tmp_path: Path) -> None:
    (tmp_path / "data/enc/db").mkdir(parents=True)
    (tmp_path / "data/enc/db/t").write_text("x")
    (tmp_path / "srv").symlink_to(tmp_path / "data")
    root = os.open(tmp_path / "srv/enc", os.O_PATH | os.O_DIRECTORY)  # as configured
    paths = VolumePaths(root)
    entry = os.open("db/t", O_PATH_FLAGS, dir_fd=root)
    try:
        assert paths.of(root) == "/"
        assert paths.of(entry) == "/db/t"  # not the kernel's /…/data/enc/db/t
    finally:
        os.close(entry)
        os.close(root)


def test_renames_inside_and_moves_out_of_the_backing_directory(tmp_path: Path) -> None:
    backing = tmp_path / "enc"
    (backing / "a").mkdir(parents=True)
    (backing / "a/f").write_text("x")
    (tmp_path / "enc2").mkdir()  # a sibling whose name the root's name prefixes
    root = opened(backing)
    paths = VolumePaths(root)
    entry = opened(backing / "a/f")
    try:
        os.rename(backing / "a", backing / "b")
        assert paths.of(entry) == "/b/f"
        os.rename(backing / "b/f", tmp_path / "enc2/f")  # by a backing-directory writer
        assert paths.of(entry) is None
        os.rename(tmp_path / "enc2/f", tmp_path / "f")
        assert paths.of(entry) is None
    finally:
        os.close(entry)
        os.close(root)


def test_the_backing_directory_moved_while_open(tmp_path: Path) -> None:
    (tmp_path / "enc/a").mkdir(parents=True)
    root = opened(tmp_path / "enc")
    paths = VolumePaths(root)
    entry = opened(tmp_path / "enc/a")
    try:
        os.rename(tmp_path / "enc", tmp_path / "moved")
        assert paths.of(entry) == "/a"
        assert paths.root == str(tmp_path / "moved")
    finally:
        os.close(entry)
        os.close(root)


def test_an_unlinked_file_keeps_its_last_path(tmp_path: Path) -> None:
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc/gone").write_text("x")
    (tmp_path / "enc/kept (deleted)").write_text("x")  # a real name with the suffix
    root = opened(tmp_path / "enc")
    paths = VolumePaths(root)
    gone = opened(tmp_path / "enc/gone")
    kept = opened(tmp_path / "enc/kept (deleted)")
    try:
        os.unlink(tmp_path / "enc/gone")
        assert paths.of(gone) == "/gone"
        assert paths.of(kept) == "/kept (deleted)"
        assert paths.of(9999) is None  # not open
    finally:
        os.close(gone)
        os.close(kept)
        os.close(root)
