"""POSIX edge cases not in test_posix.py: name lengths, deep paths, nanosecond
times, O_EXCL and O_NOFOLLOW, renames over and links to open or unlinked files.
"""

from __future__ import annotations

import errno
import os

import pytest
from support.fuse import requires_fuse
from support.volumes import BOTH_NAMES, Volume

pytestmark = [requires_fuse, BOTH_NAMES]

# -- POSIX edge cases -----------------------------------------------------------


def test_name_lengths(mounted: Volume) -> None:
    longest = "n" * 255
    mounted.path(longest).write_bytes(b"long")
    (mounted.path("d" * 255)).mkdir()
    os.symlink("t" * 255, mounted.path("s" + "x" * 254))
    with pytest.raises(OSError) as info:
        mounted.path("n" * 256).write_bytes(b"")
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        mounted.path("d" * 256).mkdir()
    assert info.value.errno == errno.ENAMETOOLONG
    mounted.remount()
    assert mounted.path(longest).read_bytes() == b"long"
    assert sorted(os.listdir(mounted.mountpoint)) == sorted(["n" * 255, "d" * 255, "s" + "x" * 254])
    assert os.readlink(mounted.path("s" + "x" * 254)) == "t" * 255
    name = "é" * 127  # 254 bytes of UTF-8
    mounted.path(name).write_bytes(b"utf8")
    assert mounted.path(name).read_bytes() == b"utf8"


def test_deep_paths_beyond_path_max(mounted: Volume) -> None:
    depth, part = 50, "p" * 100  # 5,050 bytes of path: beyond PATH_MAX (4096)
    fd = os.open(mounted.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(part, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)
    mounted.remount()
    fd = os.open(mounted.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 10) == b"deep"
        os.close(leaf)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        os.stat(mounted.mountpoint / "/".join([part] * depth) / "leaf")
    assert info.value.errno == errno.ENAMETOOLONG


def test_nanosecond_timestamps(mounted: Volume) -> None:
    path = mounted.path("t")
    path.write_bytes(b"t")
    (mounted.path("d")).mkdir()
    os.symlink("t", mounted.path("l"))
    times = (1_234_567_890_123_456_789, 1_600_000_000_987_654_321)
    for target in (path, mounted.path("d")):
        os.utime(target, ns=times)
    os.utime(mounted.path("l"), ns=times, follow_symlinks=False)
    mounted.remount()
    for target in ("t", "d", "l"):
        st = os.stat(mounted.path(target), follow_symlinks=False)
        if target == "l" and mounted.encrypted_names:
            # lstat reads the stored target to give its plaintext length, and the backing
            # filesystem's relatime then moves an atime older than the mtime (as any
            # readlink does): only the mtime is the one set
            assert st.st_mtime_ns == times[1]
            continue
        assert (st.st_atime_ns, st.st_mtime_ns) == times, target
    st = os.stat(mounted.backing_path("t"))
    assert (st.st_atime_ns, st.st_mtime_ns) == times


def test_o_excl_and_o_nofollow(mounted: Volume) -> None:
    path = mounted.path("f")
    path.write_bytes(b"f")
    os.symlink("f", mounted.path("link"))
    os.symlink("nowhere", mounted.path("dangling"))
    for name in ("f", "link", "dangling"):
        with pytest.raises(OSError) as info:
            os.open(mounted.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        assert info.value.errno == errno.EEXIST, name
    assert not mounted.backing_path("nowhere").exists()  # O_EXCL did not follow it
    with pytest.raises(OSError) as info:
        os.open(mounted.path("link"), os.O_RDONLY | os.O_NOFOLLOW)
    assert info.value.errno == errno.ELOOP
    fd = os.open(mounted.path("link"), os.O_PATH | os.O_NOFOLLOW)
    os.close(fd)
    fd = os.open(mounted.path("f"), os.O_RDONLY | os.O_NOFOLLOW)
    assert os.read(fd, 5) == b"f"
    os.close(fd)


def test_rename_over_an_open_file(mounted: Volume) -> None:
    old, new = mounted.path("target"), mounted.path("incoming")
    old.write_bytes(b"old content " * 1000)
    new.write_bytes(b"new content " * 500)
    mounted.remount()  # reads below reach the daemon
    with open(old, "rb") as handle:
        os.rename(new, old)
        assert handle.read() == b"old content " * 1000  # the open file keeps its inode
        assert os.fstat(handle.fileno()).st_nlink == 0
        assert old.read_bytes() == b"new content " * 500
    target = mounted.backing_path("target").name
    assert sorted(os.listdir(mounted.backing)) == sorted([".kmsfs.d", ".kmsfs.json", target])
    # the daemon's volume lock and its registration (kmsfs/backing/volume_lock.py)
    assert sorted(os.listdir(mounted.backing / ".kmsfs.d")) == ["daemons", "lock"]
    mounted.remount()
    assert old.read_bytes() == b"new content " * 500


def test_hard_link_to_an_open_file(mounted: Volume) -> None:
    a, b = mounted.path("a"), mounted.path("b")
    a.write_bytes(b"0" * 10000)
    fd = os.open(a, os.O_RDWR)
    try:
        os.link(a, b)
        os.pwrite(fd, b"through a", 4090)
        os.fsync(fd)
        assert b.read_bytes()[4090:4099] == b"through a"
        a.unlink()
        os.pwrite(fd, b"after unlink", 9995)
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    mounted.remount()
    data = b.read_bytes()
    assert len(data) == 10007 and data[4090:4099] == b"through a" and data.endswith(b"after unlink")
    assert b.stat().st_nlink == 1


def test_two_descriptors_on_unlinked_file(mounted: Volume) -> None:
    path = mounted.path("u")
    path.write_bytes(b"x" * 5000)
    first = os.open(path, os.O_RDWR)
    second = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        os.pwrite(first, b"y" * 3000, 4000)
        os.close(first)
        first = -1
        assert os.pread(second, 10000, 0) == b"x" * 4000 + b"y" * 3000
    finally:
        if first >= 0:
            os.close(first)
        os.close(second)
    assert os.listdir(mounted.mountpoint) == []
