"""kmsfs.backing.tree: opening beneath a root without symlinks, walking by descriptor.

Each test runs twice: with openat2 (this kernel has it) and with the component-by-
component O_NOFOLLOW fallback used on kernels before 5.6 (forced by setting the
module's probe result; the fallback itself is the real code path).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.backing import tree as tree_module
from kmsfs.backing.tree import Tree, TreeChanged, open_beneath, open_root


@pytest.fixture(params=["openat2", "fallback"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(tree_module, "_have_openat2", None if request.param == "openat2" else False)
    yield request.param
    if request.param == "openat2":
        assert tree_module._have_openat2 is True  # it really was used


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    (base / "a" / "b").mkdir(parents=True)
    (base / "a" / "b" / "f").write_bytes(b"inside\n")
    (tmp_path / "outside").write_bytes(b"outside\n")
    (base / "link").symlink_to(base / "a")
    (base / "a" / "flink").symlink_to("b/f")
    (base / "a" / "escape").symlink_to(tmp_path / "outside")
    return base


def _read(root_fd: int, rel: str) -> bytes:
    fd = open_beneath(root_fd, rel, os.O_RDONLY)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


@pytest.mark.nomount
def test_open_beneath_never_follows_a_symlink(root: Path, resolver: str) -> None:
    root_fd = open_root(root)
    try:
        assert _read(root_fd, "a/b/f") == b"inside\n"
        for rel in ("link/b/f", "a/flink", "a/escape"):
            with pytest.raises(OSError) as info:
                _read(root_fd, rel)
            assert info.value.errno == errno.ELOOP, rel
        for rel in ("../root/a/b/f", "a/../a/b/f", "/etc/passwd", "a//b/f", "./a/b/f", ""):
            with pytest.raises(ValueError, match="not a plain relative path"):
                _read(root_fd, rel)
    finally:
        os.close(root_fd)


@pytest.mark.nomount
def test_open_beneath_does_not_cross_a_mount_point(
    root: Path, tmp_path: Path, resolver: str
) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "g").write_bytes(b"another filesystem's file\n")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "a" / "b")], check=True)
    try:
        (root / "a" / "b" / "g").write_bytes(b"on tmpfs\n")
        root_fd = open_root(root)
        try:
            with pytest.raises(OSError) as info:
                _read(root_fd, "a/b/g")
            assert info.value.errno == errno.EXDEV
            with Tree(root) as tree:
                assert [node.rel for node in tree.walk()] == [
                    "link",
                    "a",
                    "a/escape",
                    "a/flink",
                ]
                assert tree.skipped == [("a/b", "another filesystem is mounted here: not entered")]
        finally:
            os.close(root_fd)
    finally:
        subprocess.run(["umount", str(root / "a" / "b")], check=True)


@pytest.mark.nomount
def test_walk_yields_symlinks_never_enters_them_and_skips_reserved_names(root: Path) -> None:
    (root / ".kmsfs.d").mkdir()
    (root / ".kmsfs.d" / "secret").write_bytes(b"")
    (root / ".kmsfs.json").write_bytes(b"{}")
    (root / "a" / ".kmsfs.json").write_bytes(b"not reserved below the root")
    with Tree(root) as tree:
        nodes = list(tree.walk())
        assert [(n.rel, stat.S_IFMT(n.st.st_mode)) for n in nodes] == [
            ("link", stat.S_IFLNK),
            ("a", stat.S_IFDIR),
            ("a/.kmsfs.json", stat.S_IFREG),
            ("a/escape", stat.S_IFLNK),
            ("a/flink", stat.S_IFLNK),
            ("a/b", stat.S_IFDIR),
            ("a/b/f", stat.S_IFREG),
        ]
        assert [e.rel for e in tree.files()] == ["a/.kmsfs.json", "a/b/f"]
    with Tree(root, reserved=False) as tree:
        assert ".kmsfs.d/secret" in [node.rel for node in tree.walk()]


@pytest.mark.nomount
def test_walk_names_a_directory_whose_subdirectory_hid_behind_a_symlink(root: Path) -> None:
    # a holds b/, escape, flink and z/.  While the walk is paused at a/escape (b was
    # already examined), z is renamed and a symlink takes its name: the walk meets one
    # directory in a, a's link count says two, so "a" is reported as changed
    (root / "a" / "z").mkdir()
    with Tree(root) as tree:
        for node in tree.walk():
            if node.rel == "a/escape":
                os.rename(root / "a" / "z", root / "a" / ".z.hidden")
                os.symlink("/", root / "a" / "z")
        assert [rel for rel, _ in tree.skipped] == ["a"]
        assert "2 subdirectories by its link count, 1 listed" in tree.skipped[0][1]


@pytest.mark.nomount
def test_open_file_checks_type_and_inode(root: Path, resolver: str) -> None:
    with Tree(root) as tree:
        (entry,) = [e for e in tree.files() if e.rel == "a/b/f"]
        os.close(tree.open_file("a/b/f", expect=entry))
        # replaced under the walk: another inode at the same name
        (root / "a" / "b" / "f2").write_bytes(b"other\n")
        os.rename(root / "a" / "b" / "f2", root / "a" / "b" / "f")
        with pytest.raises(TreeChanged, match="replaced by another file"):
            tree.open_file("a/b/f", expect=entry)
        # a FIFO planted under the name: refused at once, never waited on
        os.unlink(root / "a" / "b" / "f")
        os.mkfifo(root / "a" / "b" / "f")
        with pytest.raises(TreeChanged, match="not a regular file"):
            tree.open_file("a/b/f", os.O_RDWR)
        # a directory swapped for a symlink
        os.rename(root / "a" / "b", root / "a" / "b.real")
        os.symlink("b.real", root / "a" / "b")
        with pytest.raises(TreeChanged, match="not followed"):
            tree.open_file("a/b/f")
        with pytest.raises(TreeChanged, match="not followed"):
            tree.parent("a/b/f")
        with pytest.raises(FileNotFoundError):
            tree.open_file("a/nothing")
