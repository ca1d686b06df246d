"""The benchmark's ``floor`` filesystem (scripts/benchlib/floorfs.py) works as a filesystem.

It is mounted as ``scripts/bench`` mounts it (its own process, this venv's
python); the checks are what the benchmark rows rely on: data read back after
the page cache is dropped, the namespace operations tar, git and rm use, and
memory given back when files are removed (the floor keeps data in memory).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fuse import force_unmount, requires_fuse

pytestmark = requires_fuse

FLOORFS = Path(__file__).resolve().parents[2] / "scripts" / "benchlib" / "floorfs.py"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


class Floor:
    def __init__(self, mnt: Path, proc: subprocess.Popen[bytes]) -> None:
        self.mnt = mnt
        self.proc = proc

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[Floor]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "floor.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(FLOORFS), str(mnt)], stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, f"floorfs exited: {log.read_text()}"
            assert time.monotonic() < deadline, "floorfs did not mount in 20 s"
            time.sleep(0.05)
        yield Floor(mnt, proc)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert proc.wait(timeout=20) == 0
        assert log.read_text() == "", "floorfs logged errors"
    finally:
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def renameat2(old: Path, new: Path, flags: int) -> int:
    """renameat2(2) (Python has no wrapper): 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def drop_cached_pages(path: Path) -> None:
    """Drop the kernel's cached pages of *path*: the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_floor_mounts_and_reads_back_a_file(floor: Floor) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    path = floor.mnt / "f.bin"
    with open(path, "wb") as out:
        out.write(data[:1000])
        out.write(data[1000:])
        out.flush()
        os.fsync(out.fileno())
    drop_cached_pages(path)
    assert path.read_bytes() == data
    assert path.stat().st_size == len(data)
    with open(path, "r+b") as f:  # overwrite in the middle, past the end, then truncate
        f.seek(4096)
        f.write(b"x" * 10)
        f.seek(len(data) + 100)
        f.write(b"tail")
    drop_cached_pages(path)
    got = path.read_bytes()
    assert got == data[:4096] + b"x" * 10 + data[4106:] + bytes(100) + b"tail"
    os.truncate(path, 5)
    assert path.read_bytes() == data[:5]
    with open(path, "w") as f:  # O_TRUNC
        f.write("new")
    drop_cached_pages(path)
    assert path.read_text() == "new"
    fstype = [line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()]
    assert "fuse.floor" in fstype


def test_floor_namespace_operations(floor: Floor) -> None:
    m = floor.mnt
    (m / "d1" / "sub").mkdir(parents=True)
    (m / "d2").mkdir()
    assert os.stat(m / "d1").st_nlink == 3
    (m / "d1" / "a").write_text("a")
    (m / "d1" / "b").write_text("b")
    os.rename(m / "d1" / "a", m / "d1" / "b")  # replaces b
    assert sorted(os.listdir(m / "d1")) == ["b", "sub"]
    assert (m / "d1" / "b").read_text() == "a"
    os.rename(m / "d1" / "sub", m / "d2" / "sub")
    assert (os.stat(m / "d1").st_nlink, os.stat(m / "d2").st_nlink) == (2, 3)
    os.link(m / "d1" / "b", m / "d2" / "hard")
    assert os.stat(m / "d2" / "hard").st_nlink == 2
    os.symlink("d1/b", m / "link")
    assert os.readlink(m / "link") == "d1/b"
    assert (m / "link").read_text() == "a"
    with pytest.raises(OSError) as notempty:
        os.rmdir(m / "d2")
    assert notempty.value.errno == errno.ENOTEMPTY
    assert renameat2(m / "d1" / "b", m / "d2" / "hard", RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(m / "d2" / "sub", m / "d1" / "b", RENAME_EXCHANGE) == 0
    assert (m / "d2" / "sub").read_text() == "a"
    assert (os.stat(m / "d1").st_nlink, os.stat(m / "d2").st_nlink) == (3, 2)
    with pytest.raises(OSError) as nodata:
        os.getxattr(m / "d1" / "b", "user.x")
    assert nodata.value.errno == errno.ENODATA
    os.setxattr(m / "d1" / "b", "user.x", b"1")
    assert os.getxattr(m / "d1" / "b", "user.x") == b"1"
    os.chmod(m / "d1" / "b", 0o600)
    os.utime(m / "d1" / "b", ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(m / "d1" / "b")
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 2_000_000_000)
    assert os.statvfs(m).f_namemax == 255
    subprocess.run(["rm", "-rf", str(m / "d1"), str(m / "d2"), str(m / "link")], check=True)
    assert os.listdir(m) == []


def test_floor_gives_memory_back_when_files_are_removed(floor: Floor) -> None:
    before = floor.rss_kb()
    path = floor.mnt / "big"
    with open(path, "wb") as out:
        for _ in range(64):
            out.write(b"\1" * (1 << 20))
    os.sync()
    grown = floor.rss_kb()
    assert grown - before > 60 * 1024
    path.unlink()
    deadline = time.monotonic() + 10  # the kernel sends FORGET once it drops the inode
    while floor.rss_kb() > grown - 60 * 1024:
        assert time.monotonic() < deadline, f"RSS {floor.rss_kb()} kB after removal"
        time.sleep(0.1)
