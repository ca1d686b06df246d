"""Whether file headers fit in the backing filesystem's inodes, measured and reported.

On ext4 with the default 256-byte inodes a header xattr (138 bytes with a local
key) takes a 4 KiB block of its own; with 512-byte inodes it stays in the inode
(docs/PERFORMANCE.md, "The backing filesystem's inodes").  These tests make both
filesystems on loop devices, check the probe's figures against ext4's layout, and
check that the daemon says which one it has, in its log and in ``kmsfs status``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.volumes import Volume, check_log, make_volume

from kmsfs.backing.inode_room import PROBE_LIMIT, header_room
from kmsfs.format.header import XATTR_NAME

# ext4's room for one xattr value in the inode: inode size - 128 (the base inode) -
# 32 (i_extra_isize) - 4 (the xattr area's magic) - 4 (its end) - 16 (the entry) -
# 12 (the name "kmsfs.header" after the "user." prefix's index)
EXT4_ROOM = {256: 60, 512: 316}
WARNING = "file headers of {size} bytes do not fit the {room} bytes the backing filesystem keeps"


def _ext4(tmp_path: Path, inode_size: int) -> Iterator[Path]:
    image, mountpoint = tmp_path / f"ext4-{inode_size}.img", tmp_path / f"ext4-{inode_size}"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", str(inode_size), str(image)],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.decode().strip()}")
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount an ext4 image on a loop device: {mounted.stderr.decode().strip()}"
        )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture(params=[256, 512], ids=["inode256", "inode512"])
def ext4(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, Path]]:
    """A fresh ext4 on a loop device with the parameter's inode size, mounted in *tmp_path*."""
    for mountpoint in _ext4(tmp_path, request.param):
        yield request.param, mountpoint


def test_the_probe_finds_ext4s_room_and_leaves_nothing(ext4: tuple[int, Path]) -> None:
    inode_size, directory = ext4
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        before = os.statvfs(directory)
        assert header_room(fd) == EXT4_ROOM[inode_size]
        after = os.statvfs(directory)
    finally:
        os.close(fd)
    assert sorted(os.listdir(directory)) == ["lost+found"]
    assert (after.f_bfree, after.f_ffree) == (before.f_bfree, before.f_ffree)

    # where it cannot probe (here a read-only filesystem) it says so, and raises nothing
    subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        assert header_room(fd) is None
    finally:
        os.close(fd)


def test_the_probe_reports_its_limit_where_xattrs_take_no_blocks(tmp_path: Path) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    fd = os.open("/dev/shm", os.O_PATH | os.O_DIRECTORY)
    try:
        assert header_room(fd) == PROBE_LIMIT  # tmpfs keeps xattrs in memory
    finally:
        os.close(fd)


@requires_fuse
def test_the_daemon_says_whether_headers_fit(ext4: tuple[int, Path]) -> None:
    inode_size, directory = ext4
    volume = make_volume(directory / "volume")
    try:
        _check_reported(volume, inode_size)
    finally:
        force_unmount(volume.mountpoint)
        check_log(volume)


def test_init_notes_when_headers_will_not_fit(ext4: tuple[int, Path]) -> None:
    inode_size, directory = ext4
    backing, key = directory / "backing", directory / "master.key"
    made = run_kmsfs("init", backing, "--key-file", key, "--encrypted-names")
    room = EXT4_ROOM[inode_size]
    size = 138  # a local key's header: docs/FORMAT.md "File header", "Local provider"
    warning = (
        f"kmsfs: note: a file's header ({size} bytes) does not fit the {room} bytes this"
        " filesystem keeps in an inode"
    )
    assert (warning in made.stderr) is (inode_size == 256), made.stderr
    assert "created volume " in made.stdout  # a note, not a refusal

    # the size init predicted is the size of the headers the daemon then writes
    volume = Volume(directory, backing, directory / "mnt", key, directory / "kmsfs.log")
    volume.key_args = ["--key-file", str(key)]
    volume.encrypted_names = True
    volume.mountpoint.mkdir()
    try:
        volume.mount()
        volume.path("f").write_bytes(b"x")
        assert len(os.getxattr(volume.backing_path("f"), XATTR_NAME)) == size
        volume.umount()
    finally:
        force_unmount(volume.mountpoint)
        check_log(volume)


def _check_reported(volume: Volume, inode_size: int) -> None:
    volume.mount()
    before = json.loads(run_kmsfs("status", volume.mountpoint, "--json").stdout)
    room = EXT4_ROOM[inode_size]
    assert before["header_room"] == {"xattr_bytes": room, "header_bytes": None, "fits": None}
    assert f"{room} bytes of room in a backing inode; none created yet" in _status(volume)

    for name in ("a", "b"):
        volume.path(name).write_bytes(b"data of " + name.encode())
    size = len(os.getxattr(volume.backing_path("a"), XATTR_NAME))
    info = json.loads(run_kmsfs("status", volume.mountpoint, "--json").stdout)
    fits = size <= room
    assert info["header_room"] == {"xattr_bytes": room, "header_bytes": size, "fits": fits}
    assert fits is (inode_size == 512)
    # what the status says is what the backing file costs: a block for the header or not
    header_blocks = os.stat(volume.backing_path("a")).st_blocks - 8  # 8: the one data block
    assert header_blocks == (0 if fits else 8)

    text, log = _status(volume), volume.log_text()
    warning = WARNING.format(size=size, room=room)
    if fits:
        assert f"{size} bytes, {room} bytes of room in a backing inode: kept in the inode" in text
        assert "do not fit" not in log
    else:
        assert (
            f"{size} bytes, {room} bytes of room in a backing inode: each takes a 4 KiB"
            ' block of its own (docs/SERVERS.md, "The backing filesystem")'
        ) in text
        assert log.count(warning) == 1, log  # once, not per create
        assert f"({volume.backing})" in log
    assert volume.path("b").read_bytes() == b"data of b"
    volume.umount()


def _status(volume: Volume) -> str:
    return run_kmsfs("status", volume.mountpoint).stdout
