"""POSIX semantics on a real mount, compared with what a plain directory does.

The tests share one mounted volume per kind of names (mounting costs two CLI
start-ups): every test that takes ``mounted`` or ``root`` runs on a volume with
plain names and on one with encrypted names.  Each works in its own directory
of it (fixture ``mounted``, an ``Area``), and tests that need a volume of their
own (other mount options) take ``volume``.  They assert bytes, errno values and
attributes; many unmount and mount again, so what is checked is what reached
the backing files, not what the kernel page cache still holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import force_unmount, fuse_available, requires_fuse
from support.volumes import NAMES, Volume, make_volume

pytestmark = requires_fuse

BS = 4096  # the default block size of the volumes made by the fixtures
OVERHEAD = 40  # nonce (24) + tag (16) per block: files made through the mount are format 2
SIZES = [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 3 * BS + 17]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@pytest.fixture(scope="module", params=NAMES)
def shared(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Volume]:
    """One volume for the module per kind of names, mounted; its log must hold no
    traceback at the end."""
    if not fuse_available():
        pytest.skip("needs /dev/fuse")
    vol = make_volume(tmp_path_factory.mktemp("posix"), names=request.param)
    try:
        vol.mount()
        yield vol
        if vol.mounted:
            vol.umount()
    finally:
        force_unmount(vol.mountpoint)
    text = vol.log_text()
    assert "Traceback" not in text and "unexpected error" not in text, text[-4000:]


@dataclass
class Area:
    """A test's own directory in the shared volume, with the Volume methods tests use."""

    vol: Volume
    name: str

    @property
    def mountpoint(self) -> Path:
        return self.vol.path(self.name)

    @property
    def backing(self) -> Path:
        return self.vol.backing_path(self.name)

    @property
    def key_file(self) -> Path:
        return self.vol.key_file

    @property
    def key_args(self) -> list[str]:
        return self.vol.key_args

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def backing_path(self, name: str) -> Path:
        return self.vol.backing_path(f"{self.name}/{name}")

    @property
    def encrypted_names(self) -> bool:
        return self.vol.encrypted_names

    def remount(self) -> None:
        self.vol.remount()

    def umount(self) -> None:
        self.vol.umount()

    def mount(self) -> None:
        self.vol.mount()


@pytest.fixture
def mounted(shared: Volume, request: pytest.FixtureRequest) -> Area:
    """This test's directory in the shared volume (mounted again if a test left it down)."""
    if not shared.mounted:
        shared.mount()
    area = Area(shared, re.sub(r"\W", "_", request.node.name))
    area.mountpoint.mkdir()
    return area


@pytest.fixture
def root(shared: Volume) -> Volume:
    """The shared volume itself, mounted, for tests about its root."""
    if not shared.mounted:
        shared.mount()
    return shared


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) through ctypes; OSError with the C errno."""
    result = _libc.renameat2(
        AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking content (no all-zero blocks)."""
    return random.Random(seed).randbytes(size)


def errno_of(func, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        func(*args, **kwargs)
    return info.value.errno


# -- content: random writes, sparse files, truncate, append ------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_random_writes_match_reference(mounted: Area, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ref_path = tmp_path / f"reference-{seed}"
    target = mounted.path("random.bin")
    with open(ref_path, "w+b") as ref, open(target, "w+b") as f:
        for _ in range(300):
            offset = rng.choice(
                [rng.randrange(0, 6 * BS), rng.randrange(0, 40) * BS - rng.randrange(0, 3)]
            )
            offset = max(offset, 0)
            length = rng.choice([1, 2, BS - 1, BS, BS + 1, rng.randrange(1, 3 * BS)])
            data = rng.randbytes(length)
            assert os.pwrite(f.fileno(), data, offset) == length
            os.pwrite(ref.fileno(), data, offset)
            if rng.random() < 0.2:  # read back in the middle of the run
                where = rng.randrange(0, os.fstat(ref.fileno()).st_size + 1)
                span = rng.randrange(0, 3 * BS)
                assert os.pread(f.fileno(), span, where) == os.pread(ref.fileno(), span, where)
        f.flush()
        os.fsync(f.fileno())
    expected = ref_path.read_bytes()
    assert target.stat().st_size == len(expected)
    assert target.read_bytes() == expected
    mounted.remount()
    assert target.stat().st_size == len(expected)
    assert target.read_bytes() == expected
    with open(target, "rb") as f:
        for _ in range(50):
            where = rng.randrange(0, len(expected) + 10)
            span = rng.randrange(0, 3 * BS)
            assert os.pread(f.fileno(), span, where) == expected[where : where + span]


def test_write_far_beyond_eof_is_sparse(mounted: Area) -> None:
    target = mounted.path("sparse.bin")
    far = 1 << 30
    with open(target, "wb") as f:
        f.write(b"head")
        f.seek(far)
        f.write(b"tail")
    mounted.remount()
    assert target.stat().st_size == far + 4
    with open(target, "rb") as f:
        assert f.read(4) == b"head"
        assert os.pread(f.fileno(), 8192, 4) == bytes(8192)
        assert os.pread(f.fileno(), 8192, far // 2) == bytes(8192)
        assert os.pread(f.fileno(), 100, far - 4) == bytes(4) + b"tail"
    backing = mounted.backing_path("sparse.bin").stat()
    assert backing.st_blocks * 512 < 1 << 20  # a few blocks on disk, not a gigabyte


def test_truncate_10g_is_instant_and_reads_zeros(mounted: Area) -> None:
    target = mounted.path("big.bin")
    target.write_bytes(b"x" * 10)
    started = time.monotonic()
    subprocess.run(["truncate", "-s", "10G", str(target)], check=True)
    assert time.monotonic() - started < 5
    size = 10 * 1024**3
    assert target.stat().st_size == size
    with open(target, "rb") as f:
        assert os.pread(f.fileno(), 20, 0) == b"x" * 10 + bytes(10)
        assert os.pread(f.fileno(), 1 << 16, size // 3) == bytes(1 << 16)
        assert os.pread(f.fileno(), 5000, size - 4096) == bytes(4096)
    mounted.remount()
    assert target.stat().st_size == size
    with open(target, "rb") as f:
        assert os.pread(f.fileno(), 5000, size - 4096) == bytes(4096)
        assert os.pread(f.fileno(), 20, 0) == b"x" * 10 + bytes(10)
    assert mounted.backing_path("big.bin").stat().st_blocks * 512 < 1 << 20
    # Writing in the middle of the hole keeps the rest of it zero.
    with open(target, "r+b") as f:
        os.pwrite(f.fileno(), b"mid", size // 2)
    mounted.remount()
    with open(target, "rb") as f:
        assert os.pread(f.fileno(), 9000, size // 2 - 4096) == bytes(4096) + b"mid" + bytes(4901)
        assert os.pread(f.fileno(), 10, size - 10) == bytes(10)
    # Truncating down into the hole makes a hole block the (sealed) final block.
    os.truncate(target, size // 4 + 100)
    with open(target, "ab") as f:
        f.write(b"end")
    mounted.remount()
    assert target.stat().st_size == size // 4 + 103
    with open(target, "rb") as f:
        assert os.pread(f.fileno(), 5000, size // 4 - 4000) == bytes(4100) + b"end"
        assert os.pread(f.fileno(), 20, 0) == b"x" * 10 + bytes(10)
    assert mounted.backing_path("big.bin").stat().st_blocks * 512 < 1 << 20


def test_truncate_up_and_down(mounted: Area) -> None:
    """Every pair of sizes around block boundaries, in both directions."""
    cases = []
    for start in SIZES:
        base = pattern(start, seed=start)
        for new in SIZES + [5 * BS + 3]:
            name = f"t-{start}-{new}"
            want = base[:new] + bytes(max(new - start, 0))
            cases.append((name, want))
            path = mounted.path(name)
            path.write_bytes(base)
            os.truncate(path, new)
            assert path.stat().st_size == new
            assert path.read_bytes() == want, name
    mounted.remount()
    for name, want in cases:
        assert mounted.path(name).stat().st_size == len(want), name
        assert mounted.path(name).read_bytes() == want, name
        # And the file still takes writes after the boundary block was re-sealed.
        with open(mounted.path(name), "ab") as f:
            f.write(b"++")
    mounted.remount()
    for name, want in cases:
        assert mounted.path(name).read_bytes() == want + b"++", name


def test_ftruncate_on_open_file_then_write(mounted: Area) -> None:
    data = pattern(3 * BS + 100, seed=7)
    path = mounted.path("f")
    with open(path, "w+b") as f:
        f.write(data)
        f.flush()
        os.ftruncate(f.fileno(), BS + 5)
        os.pwrite(f.fileno(), b"Z", 2 * BS + 1)
        os.ftruncate(f.fileno(), 2 * BS + 3)
    want = data[: BS + 5] + bytes(2 * BS + 1 - (BS + 5)) + b"Z" + bytes(1)
    assert path.read_bytes() == want
    mounted.remount()
    assert path.read_bytes() == want


_APPENDER = """
import os, sys
path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(count):
    record = f"{tag}:{i:06d}:".encode() + tag.encode() * (90 + i % 300) + b"\\n"
    assert os.write(fd, record) == len(record)
os.close(fd)
"""


def test_o_append_from_two_processes(mounted: Area) -> None:
    path = mounted.path("log.txt")
    path.write_bytes(b"")
    count = 400
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), tag, str(count)])
        for tag in ("A", "B")
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0

    def check() -> None:
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b""
        seen: dict[str, list[int]] = {"A": [], "B": []}
        for line in lines[:-1]:
            tag, number, body = line.decode().split(":")
            index = int(number)
            assert body == tag * (90 + index % 300), f"torn record {line[:40]!r}"
            seen[tag].append(index)
        # Every record present, once, and each writer's records in its own order.
        assert seen == {"A": list(range(count)), "B": list(range(count))}

    check()
    mounted.remount()
    check()


def test_o_append_single_writer_with_seek(mounted: Area) -> None:
    path = mounted.path("a")
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"abc")  # O_APPEND ignores the offset
        os.pwrite(fd, b"def", 0)  # Linux: pwrite on O_APPEND also appends
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789abcdef"


def test_o_trunc(mounted: Area) -> None:
    path = mounted.path("f")
    path.write_bytes(pattern(3 * BS + 1))
    with open(path, "wb") as f:  # O_WRONLY|O_CREAT|O_TRUNC
        f.write(b"short")
    assert path.read_bytes() == b"short"
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    os.close(fd)
    assert path.stat().st_size == 0
    assert path.read_bytes() == b""
    mounted.remount()
    assert path.stat().st_size == 0
    with open(path, "ab") as f:
        f.write(b"again")
    mounted.remount()
    assert path.read_bytes() == b"again"


def test_concurrent_readers_and_writer_see_whole_blocks(mounted: Area) -> None:
    """A writer rewriting whole blocks with one byte value; readers never get EIO or a
    short read, and no block is left mixed once the writer is done.

    A read racing a write may see a page half copied by the kernel (the page
    cache gives no read/write atomicity on Linux, ext4 included), so a mixed
    block seen during the race counts only if it is still mixed afterwards.
    """
    path = mounted.path("shared")
    blocks = 8
    path.write_bytes(b"a" * (blocks * BS))
    stop = threading.Event()
    errors: list[str] = []
    suspects: set[int] = set()

    def reader() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            while not stop.is_set():
                for index in range(blocks):
                    try:
                        block = os.pread(fd, BS, index * BS)
                    except OSError as exc:
                        errors.append(f"block {index}: {exc}")
                        continue
                    if len(block) != BS:
                        errors.append(f"block {index}: short read of {len(block)}")
                    elif len(set(block)) != 1:
                        suspects.add(index)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            for round_ in range(200):
                value = bytes([ord("b") + round_ % 20]) * BS
                os.pwrite(fd, value, (round_ % blocks) * BS)
        finally:
            os.close(fd)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    data = path.read_bytes()
    for index in suspects | set(range(blocks)):
        assert len(set(data[index * BS : (index + 1) * BS])) == 1, f"block {index} mixed"


# -- names: rename, links, symlinks, directories, FIFOs -----------------------


def test_rename_plain_and_over_existing(mounted: Area) -> None:
    a, b = mounted.path("a"), mounted.path("b")
    a.write_bytes(b"content of a" * 1000)
    a.rename(mounted.path("c"))
    assert not a.exists()
    assert mounted.path("c").read_bytes() == b"content of a" * 1000
    b.write_bytes(b"bbb")
    os.rename(mounted.path("c"), b)  # replaces b
    assert b.read_bytes() == b"content of a" * 1000
    assert sorted(os.listdir(mounted.mountpoint)) == ["b"]
    mounted.path("d1").mkdir()
    mounted.path("d2").mkdir()
    mounted.path("d1/inner").write_bytes(b"inner")
    os.rename(b, mounted.path("d1/moved"))
    os.rename(mounted.path("d1"), mounted.path("d2/d1"))
    assert mounted.path("d2/d1/inner").read_bytes() == b"inner"
    assert mounted.path("d2/d1/moved").read_bytes() == b"content of a" * 1000
    # A directory cannot replace a non-empty one.
    mounted.path("d3").mkdir()
    assert errno_of(os.rename, mounted.path("d3"), mounted.path("d2")) in (
        errno.ENOTEMPTY,
        errno.EEXIST,
    )
    mounted.remount()
    assert mounted.path("d2/d1/moved").read_bytes() == b"content of a" * 1000
    assert mounted.path("d2/d1/inner").read_bytes() == b"inner"


def test_rename_noreplace_and_exchange(mounted: Area) -> None:
    a, b = mounted.path("a"), mounted.path("b")
    a.write_bytes(b"A" * 5000)
    b.write_bytes(b"B" * 3)
    assert errno_of(renameat2, a, b, RENAME_NOREPLACE) == errno.EEXIST
    assert a.read_bytes() == b"A" * 5000 and b.read_bytes() == b"B" * 3
    renameat2(a, mounted.path("c"), RENAME_NOREPLACE)
    assert not a.exists()
    renameat2(mounted.path("c"), b, RENAME_EXCHANGE)
    assert b.read_bytes() == b"A" * 5000
    assert mounted.path("c").read_bytes() == b"B" * 3
    assert errno_of(renameat2, mounted.path("c"), mounted.path("none"), RENAME_EXCHANGE) == (
        errno.ENOENT
    )
    mounted.remount()
    assert b.read_bytes() == b"A" * 5000
    assert mounted.path("c").read_bytes() == b"B" * 3


def test_hard_links(mounted: Area) -> None:
    a, b = mounted.path("a"), mounted.path("sub/b")
    mounted.path("sub").mkdir()
    a.write_bytes(b"linked" * 2000)
    os.link(a, b)
    assert a.stat().st_nlink == 2 and b.stat().st_nlink == 2
    assert a.stat().st_ino == b.stat().st_ino
    with open(b, "r+b") as f:
        f.write(b"LINKED")
    assert a.read_bytes() == b"LINKED" + b"linked" * 1999
    with open(a, "ab") as f:
        f.write(b"!")
    assert b.stat().st_size == 12001
    mounted.remount()
    assert b.read_bytes() == b"LINKED" + b"linked" * 1999 + b"!"
    assert a.stat().st_nlink == 2
    a.unlink()
    assert b.stat().st_nlink == 1
    assert b.read_bytes() == b"LINKED" + b"linked" * 1999 + b"!"
    assert errno_of(os.link, mounted.path("sub"), mounted.path("dirlink")) == errno.EPERM
    assert errno_of(os.link, b, mounted.path("sub/b")) == errno.EEXIST
    mounted.remount()
    assert b.stat().st_nlink == 1
    assert b.read_bytes() == b"LINKED" + b"linked" * 1999 + b"!"


def test_symlinks(mounted: Area) -> None:
    mounted.path("dir").mkdir()
    mounted.path("dir/target").write_bytes(b"through the link")
    os.symlink("dir/target", mounted.path("rel"))
    os.symlink("/nonexistent/elsewhere", mounted.path("dangling"))
    assert os.readlink(mounted.path("rel")) == "dir/target"
    assert stat.S_ISLNK(os.lstat(mounted.path("rel")).st_mode)
    assert mounted.path("rel").read_bytes() == b"through the link"
    assert os.lstat(mounted.path("dangling")).st_size == len("/nonexistent/elsewhere")
    assert errno_of(os.stat, mounted.path("dangling")) == errno.ENOENT
    assert errno_of(os.symlink, "x", mounted.path("rel")) == errno.EEXIST
    assert errno_of(os.readlink, mounted.path("dir/target")) == errno.EINVAL
    mounted.remount()
    assert os.readlink(mounted.path("dangling")) == "/nonexistent/elsewhere"
    assert mounted.path("rel").read_bytes() == b"through the link"
    stored = os.readlink(mounted.backing_path("rel"))
    if mounted.encrypted_names:  # encrypted, and randomized: not the target's length
        assert "target" not in stored and "/" not in stored and len(stored) > 43
    else:  # stored as given
        assert stored == "dir/target"


def test_mkdir_rmdir(mounted: Area) -> None:
    d = mounted.path("d")
    d.mkdir(mode=0o750)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert errno_of(os.mkdir, d) == errno.EEXIST
    (d / "f").write_bytes(b"x")
    (d / "e").mkdir()
    assert errno_of(os.rmdir, d) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, d / "f") == errno.ENOTDIR
    assert errno_of(os.unlink, d / "e") == errno.EISDIR
    assert errno_of(os.rmdir, d / "missing") == errno.ENOENT
    assert errno_of(os.mkdir, d / "f" / "under-a-file") == errno.ENOTDIR
    assert sorted(os.listdir(d)) == ["e", "f"]
    assert d.stat().st_nlink == 3
    (d / "f").unlink()
    (d / "e").rmdir()
    d.rmdir()
    assert not d.exists()
    assert os.listdir(mounted.mountpoint) == []


def test_many_entries_in_a_directory(mounted: Area) -> None:
    d = mounted.path("many")
    d.mkdir()
    names = {f"file-{i:04d}" for i in range(300)}
    for name in names:
        (d / name).write_bytes(name.encode())
    assert set(os.listdir(d)) == names
    mounted.remount()
    assert set(os.listdir(d)) == names
    for entry in os.scandir(d):
        assert entry.is_file()
        assert entry.stat().st_size == len(entry.name)
    assert (d / "file-0123").read_bytes() == b"file-0123"


def test_fifo(mounted: Area) -> None:
    fifo = mounted.path("pipe")
    os.mkfifo(fifo, 0o600)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert stat.S_IMODE(fifo.stat().st_mode) == 0o600
    assert stat.S_ISFIFO(mounted.backing_path("pipe").stat().st_mode)
    received: list[bytes] = []

    def read_all() -> None:
        with open(fifo, "rb") as f:
            received.append(f.read())

    thread = threading.Thread(target=read_all)
    thread.start()
    with open(fifo, "wb") as f:
        f.write(b"through the fifo" * 1000)
    thread.join(timeout=20)
    assert received == [b"through the fifo" * 1000]
    mounted.remount()
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    fifo.unlink()
    assert not fifo.exists()


# -- attributes: chmod, chown, utimens, xattrs, statfs -----------------------


def test_chmod_chown_utimens(mounted: Area) -> None:
    path = mounted.path("f")
    path.write_bytes(b"attrs")
    d = mounted.path("d")
    d.mkdir()
    os.chown(path, 1234, 5678)
    os.chown(d, 4321, -1)
    os.chmod(path, 0o4751)  # after chown, which clears set-user-ID (as on ext4)
    os.chmod(d, 0o2700)
    atime, mtime = 1_000_000_001_123_456_789, 1_500_000_000_987_654_321
    os.utime(path, ns=(atime, mtime))
    os.utime(d, ns=(atime + 1, mtime + 1))
    os.symlink("f", mounted.path("link"))
    os.chown(mounted.path("link"), 99, 98, follow_symlinks=False)

    def check() -> None:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o4751
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
        dst = d.stat()
        assert stat.S_IMODE(dst.st_mode) == 0o2700
        assert dst.st_uid == 4321
        assert (dst.st_atime_ns, dst.st_mtime_ns) == (atime + 1, mtime + 1)
        lst = os.lstat(mounted.path("link"))
        assert (lst.st_uid, lst.st_gid) == (99, 98)
        assert path.stat().st_uid == 1234  # the link's owner change did not touch f
        assert path.read_bytes() == b"attrs"

    check()
    mounted.remount()
    check()
    # The backing inode carries the same metadata.
    bst = mounted.backing_path("f").stat()
    assert (bst.st_uid, bst.st_gid, bst.st_mtime_ns) == (1234, 5678, mtime)


def test_utime_now_and_mtime_on_write(mounted: Area) -> None:
    path = mounted.path("f")
    path.write_bytes(b"x")
    os.utime(path, ns=(0, 0))
    before = time.time_ns()
    with open(path, "ab") as f:
        f.write(b"y")
    mounted.remount()
    assert path.stat().st_mtime_ns >= before - 2_000_000_000
    os.utime(path, ns=(5, 7))
    assert (path.stat().st_atime_ns, path.stat().st_mtime_ns) == (5, 7)
    os.utime(path)  # UTIME_NOW for both
    assert abs(path.stat().st_mtime_ns - time.time_ns()) < 5_000_000_000


def test_utime_with_dirty_pages_is_not_undone_by_writeback(mounted: Area) -> None:
    """Times set while cached writes are pending survive their write-back."""
    path = mounted.path("f")
    with open(path, "wb") as f:
        f.write(pattern(3 * BS + 5))
        f.flush()
        os.utime(f.fileno(), ns=(111_000_000_007, 222_000_000_009))
        time.sleep(0.1)
    assert path.stat().st_mtime_ns == 222_000_000_009
    mounted.remount()
    assert (path.stat().st_atime_ns, path.stat().st_mtime_ns) == (111_000_000_007, 222_000_000_009)
    assert path.read_bytes() == pattern(3 * BS + 5)


def test_fsync_makes_the_mtime_of_write_durable(mounted: Area) -> None:
    """With the writeback cache the kernel owns a file's mtime: it sets it at write(2)
    and, at fsync or fdatasync, writes it back after the cached data, as a SETATTR of
    mtime and ctime with the file handle.  kmsfs must apply that SETATTR over the time
    its own backing write left, so that the mtime seen before the sync is the one on
    the backing file and after a remount.  These are most of the SETATTRs a SQLite
    commit costs (docs/PERFORMANCE.md, "The SETATTRs of a commit"): they carry the
    mtime and cannot be dropped."""
    path = mounted.path("f")
    path.write_bytes(b"x")
    os.utime(path, ns=(0, 0))
    with open(path, "r+b") as f:
        f.write(b"y")  # the kernel's mtime: now
        f.flush()
        seen = os.fstat(f.fileno()).st_mtime_ns
        time.sleep(0.2)  # the cached page reaches the daemon later, at the sync
        os.fdatasync(f.fileno())
        assert os.fstat(f.fileno()).st_mtime_ns == seen
    assert abs(seen - time.time_ns()) < 5_000_000_000
    # not the time of the backing write, 0.2 s later
    assert mounted.backing_path("f").stat().st_mtime_ns == seen
    mounted.remount()
    assert path.stat().st_mtime_ns == seen
    assert path.read_bytes() == b"y"


@pytest.mark.xfail(
    strict=False,
    reason="known: with the writeback cache the kernel sets mtime at write(2) and often never"
    " sends it (no SETATTR); the backing file gets the time the WRITE reached the daemon,"
    " a few ms (up to the write-back delay) later, which is what a remount shows",
)
def test_implicit_mtime_is_the_same_after_remount(mounted: Area) -> None:
    before = {}
    for i in range(5):
        path = mounted.path(f"f{i}")
        path.write_bytes(pattern(5000 + i))
        before[path] = path.stat().st_mtime_ns
    mounted.remount()
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_new_file_owner_and_mode(mounted: Area) -> None:
    old = os.umask(0o022)
    try:
        path = mounted.path("f")
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        mounted.path("d").mkdir(0o777)
        assert stat.S_IMODE(mounted.path("d").stat().st_mode) == 0o755
        os.umask(0)
        # Set-user-ID and set-group-ID bits given at creation are kept (a chown
        # of the new backing file must not clear them).
        fd = os.open(mounted.path("suid"), os.O_CREAT | os.O_WRONLY, 0o6755)
        os.close(fd)
        assert stat.S_IMODE(mounted.path("suid").stat().st_mode) == 0o6755
    finally:
        os.umask(old)
    assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid())


def test_user_xattrs_and_hidden_header(mounted: Area) -> None:
    path = mounted.path("f")
    path.write_bytes(b"x")
    os.setxattr(path, "user.colour", b"blue")
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.colour") == b"blue"
    assert os.getxattr(path, "user.empty") == b""
    assert sorted(os.listxattr(path)) == ["user.colour", "user.empty"]
    assert errno_of(os.setxattr, path, "user.colour", b"red", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, path, "user.none", b"red", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(path, "user.colour", b"red", os.XATTR_REPLACE)
    os.removexattr(path, "user.empty")
    assert errno_of(os.getxattr, path, "user.empty") == errno.ENODATA
    assert errno_of(os.removexattr, path, "user.empty") == errno.ENODATA
    # The header is there on the backing file but invisible and untouchable here.
    assert os.getxattr(mounted.backing_path("f"), "user.kmsfs.header")
    assert errno_of(os.getxattr, path, "user.kmsfs.header") == errno.ENODATA
    assert errno_of(os.setxattr, path, "user.kmsfs.header", b"evil") == errno.EPERM
    assert errno_of(os.setxattr, path, "user.kmsfs.other", b"evil") == errno.EPERM
    assert errno_of(os.removexattr, path, "user.kmsfs.header") in (errno.ENODATA, errno.EPERM)
    assert "user.kmsfs.header" not in os.listxattr(path)
    # Directories take user xattrs too.
    mounted.path("d").mkdir()
    os.setxattr(mounted.path("d"), "user.dir", b"yes")
    mounted.remount()
    assert os.listxattr(path) == ["user.colour"]
    assert os.getxattr(path, "user.colour") == b"red"
    assert os.getxattr(mounted.path("d"), "user.dir") == b"yes"
    assert path.read_bytes() == b"x"  # the header survived all of that


def test_volume_config_is_invisible(root: Volume) -> None:
    mounted = root
    config = mounted.backing / ".kmsfs.json"
    assert config.exists()
    if mounted.encrypted_names:
        # Nothing is reserved: every name is encrypted, and no encrypted name starts
        # with '.', so the config, the state and the sidecars never meet a user's names.
        assert not any(n.startswith(".kmsfs") for n in os.listdir(mounted.mountpoint))
        mounted.path(".kmsfs.json").write_bytes(b"mine")
        mounted.path(".kmsfs.d").mkdir()
        mounted.remount()
        assert mounted.path(".kmsfs.json").read_bytes() == b"mine"
        assert {".kmsfs.json", ".kmsfs.d"} <= set(os.listdir(mounted.mountpoint))
        assert config.read_bytes().startswith(b"{")
        mounted.path(".kmsfs.json").unlink()
        mounted.path(".kmsfs.d").rmdir()
        assert config.read_bytes().startswith(b"{")
        assert (mounted.backing / ".kmsfs.d").is_dir()
        return
    assert ".kmsfs.json" not in os.listdir(mounted.mountpoint)
    assert errno_of(os.stat, mounted.path(".kmsfs.json")) == errno.ENOENT
    assert errno_of(open, mounted.path(".kmsfs.json"), "rb") == errno.ENOENT
    assert errno_of(open, mounted.path(".kmsfs.json"), "wb") == errno.EPERM
    assert errno_of(os.mkdir, mounted.path(".kmsfs-x")) == errno.EPERM
    assert errno_of(os.symlink, "x", mounted.path(".kmsfs.json")) == errno.EPERM
    assert errno_of(os.unlink, mounted.path(".kmsfs.json")) in (errno.ENOENT, errno.EPERM)
    mounted.path("f").write_bytes(b"f")
    assert errno_of(os.rename, mounted.path("f"), mounted.path(".kmsfs.json")) == errno.EPERM
    assert errno_of(os.link, mounted.path("f"), mounted.path(".kmsfs.json")) == errno.EPERM
    # Only at the root: a subdirectory may hold such a name.
    mounted.path("sub").mkdir()
    mounted.path("sub/.kmsfs.json").write_bytes(b"mine")
    assert mounted.path("sub/.kmsfs.json").read_bytes() == b"mine"
    mounted.remount()
    names = set(os.listdir(mounted.mountpoint))
    assert {"f", "sub"} <= names and not any(n.startswith(".kmsfs") for n in names)
    assert config.read_bytes().startswith(b"{")


def test_statfs(mounted: Area) -> None:
    mine = os.statvfs(mounted.mountpoint)
    backing = os.statvfs(mounted.backing)
    assert mine.f_bsize == backing.f_bsize
    assert mine.f_blocks * mine.f_frsize == backing.f_blocks * backing.f_frsize
    assert mine.f_namemax == backing.f_namemax
    assert 0 < mine.f_bavail <= mine.f_blocks
    assert mine.f_files == backing.f_files
    df = subprocess.run(["df", "-P", str(mounted.mountpoint)], capture_output=True, text=True)
    assert df.returncode == 0 and str(mounted.vol.mountpoint) in df.stdout


def test_stat_sizes_and_blocks(mounted: Area) -> None:
    for size in SIZES:
        mounted.path(f"s{size}").write_bytes(pattern(size, size))
    mounted.remount()
    for size in SIZES:
        st = mounted.path(f"s{size}").stat()
        assert st.st_size == size
        assert stat.S_ISREG(st.st_mode)
        assert not st.st_mode & stat.S_ISVTX  # the format marker is the backing file's only
        blocks = max(-(-size // BS), 1)
        backing = mounted.backing_path(f"s{size}").stat()
        assert backing.st_size == size + blocks * OVERHEAD
        assert backing.st_mode & stat.S_ISVTX


# -- open files, persistence, offline decrypt, known plaintext ----------------


def test_unlink_open_file_then_read_and_write(mounted: Area) -> None:
    path = mounted.path("doomed")
    data = pattern(2 * BS + 77, seed=3)
    path.write_bytes(data)
    mounted.remount()  # no cached pages: the reads below go to the daemon
    with open(path, "r+b") as f:
        path.unlink()
        assert not path.exists()
        assert os.listdir(mounted.mountpoint) == []
        assert f.read() == data
        os.pwrite(f.fileno(), b"still here", BS)
        os.fsync(f.fileno())
        assert os.pread(f.fileno(), 10, BS) == b"still here"
        assert os.fstat(f.fileno()).st_size == len(data)
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(mounted.backing) == []


def test_persistence_across_remount(mounted: Area) -> None:
    tree = {
        "top.txt": b"top level\n",
        "a/b/c/deep.bin": pattern(3 * BS + 5, seed=11),
        "a/empty": b"",
        "a/b/one-block": pattern(BS, seed=12),
        "names with spaces/ünïcødé ✓": b"unicode name",
    }
    for name, data in tree.items():
        path = mounted.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.chmod(mounted.path("a/b"), 0o711)
    mounted.umount()
    assert not os.path.ismount(mounted.vol.mountpoint)
    assert os.listdir(mounted.vol.mountpoint) == []
    mounted.mount()
    for name, data in tree.items():
        assert mounted.path(name).read_bytes() == data, name
    assert stat.S_IMODE(mounted.path("a/b").stat().st_mode) == 0o711
    found = {
        str(Path(root, f).relative_to(mounted.mountpoint))
        for root, _, files in os.walk(mounted.mountpoint)
        for f in files
    }
    assert found == set(tree)


def test_offline_decrypt_equals_mount(mounted: Area, tmp_path: Path) -> None:
    files = {f"f{size}": pattern(size, seed=size + 100) for size in SIZES + [100_000]}
    mounted.path("sub").mkdir()
    for name, data in files.items():
        mounted.path(f"sub/{name}").write_bytes(data)
    with open(mounted.path("sub/f100000"), "r+b") as f:  # a rewritten, holey file too
        os.pwrite(f.fileno(), b"hole after", 50 * BS)
    files["f100000"] = files["f100000"] + bytes(50 * BS - 100_000) + b"hole after"
    mounted.umount()
    out = tmp_path / "out"
    out.mkdir()
    for name, data in files.items():
        result = run_kmsfs(
            "decrypt",
            mounted.backing_path(f"sub/{name}"),
            out / name,
            "--key-file",
            mounted.key_file,
        )
        assert f"decrypted {len(data)} bytes" in result.stdout
        assert (out / name).read_bytes() == data, name
    # Without --key-file it is refused, naming the option; the key file init recorded is
    # used only when the operator trusts the backing directory.
    bare = run_kmsfs("decrypt", mounted.backing_path("sub/f1"), out / "again", check=False)
    assert bare.returncode == 3 and f"give --key-file {mounted.key_file}" in bare.stderr
    run_kmsfs("decrypt", mounted.backing_path("sub/f1"), out / "again", "--trust-volume-settings")
    assert (out / "again").read_bytes() == files["f1"]
    mounted.mount()
    for name in files:
        assert mounted.path(f"sub/{name}").read_bytes() == (out / name).read_bytes()
    # It refuses to overwrite an existing output.
    refused = run_kmsfs(
        "decrypt", mounted.backing_path("sub/f1"), out / "f1", *mounted.key_args, check=False
    )
    assert refused.returncode != 0 and "exists" in refused.stderr


def test_backing_holds_no_known_plaintext(mounted: Area) -> None:
    marker = b"KNOWN-PLAINTEXT-MARKER-7c1f"
    repetitive = marker * 5000  # identical blocks must not give identical ciphertext
    mounted.path("d").mkdir()
    mounted.path("d/plain.txt").write_bytes(repetitive)
    mounted.path("small.txt").write_bytes(marker)
    with open(mounted.path("appended.txt"), "ab") as f:
        for _ in range(100):
            f.write(marker + b"\n")
            f.flush()
    mounted.umount()
    plain = mounted.backing_path("d/plain.txt")
    seen_blocks: set[bytes] = set()
    for root, _, names in os.walk(mounted.backing):
        for name in names:
            raw = Path(root, name).read_bytes()
            for needle in (marker, marker[:12], marker[-12:]):
                assert needle not in raw, f"{name} holds plaintext"
            if Path(root, name) == plain:
                for start in range(0, len(raw), BS + OVERHEAD):
                    block = raw[start : start + BS + OVERHEAD]
                    assert block not in seen_blocks
                    seen_blocks.add(block)
    assert len(seen_blocks) == -(-len(repetitive) // BS)


# -- keys at mount time ------------------------------------------------------


def test_wrong_key_file_refused(volume: Volume, tmp_path: Path) -> None:
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = make_volume(other_root)
    result = volume.mount("--key-file", str(other.key_file), check=False)
    assert result.returncode == 6, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error:")
    assert "wrong key" in lines[0] and "this volume's key is local:" in lines[0]
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(volume.mountpoint)
    # The right key still mounts afterwards.
    volume.mount("--key-file", str(volume.key_file))
    assert os.path.ismount(volume.mountpoint)
    volume.umount()


def test_missing_key_file_refused(volume: Volume, tmp_path: Path) -> None:
    result = volume.mount("--key-file", str(tmp_path / "nope.key"), check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("kmsfs: error:") and "nope.key" in result.stderr
    assert not os.path.ismount(volume.mountpoint)


def test_passphrase_volume(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, key=False)
    right, wrong = tmp_path / "right.txt", tmp_path / "wrong.txt"
    right.write_text("correct horse battery staple\n")
    wrong.write_text("incorrect horse\n")
    right.chmod(0o600)  # secret files must be private (kmsfs.keys.secrets)
    wrong.chmod(0o600)
    run_kmsfs("init", vol.backing, "--passphrase-file", right)  # encrypted names: the default
    assert "correct horse" not in vol.backing_path(".kmsfs.json").read_text()
    try:
        result = vol.mount("--passphrase-file", str(wrong), check=False)
        assert result.returncode == 6, result.stderr
        assert result.stderr.strip() == "kmsfs: error: wrong passphrase for this volume"
        assert not os.path.ismount(vol.mountpoint)
        vol.mount("--passphrase-file", str(right))
        vol.path("secret").write_bytes(b"behind a passphrase")
        vol.umount()
        vol.mount("--passphrase-file", str(right))
        assert vol.path("secret").read_bytes() == b"behind a passphrase"
        vol.umount()
        out = tmp_path / "out"
        in_volume = ("--volume", vol.backing, "--in-volume", "secret")
        run_kmsfs("decrypt", *in_volume, out, "--passphrase-file", right)
        assert out.read_bytes() == b"behind a passphrase"
        refused = run_kmsfs(
            "decrypt",
            *in_volume,
            tmp_path / "o2",
            "--passphrase-file",
            wrong,
            check=False,
        )
        assert refused.returncode == 6
        assert not (tmp_path / "o2").exists()
    finally:
        from support.fuse import force_unmount

        force_unmount(vol.mountpoint)
    assert "Traceback" not in vol.log_text()


# -- lookup counts and other users -------------------------------------------


def _daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_forget_closes_descriptors_and_entries_come_back(volume: Volume) -> None:
    """The kernel's FORGETs (here forced by dropping dentries) release the daemon's
    per-inode descriptors, and a later lookup finds the entries again."""
    pid = int(volume.mount().stdout.split("daemon pid ")[1].split(")")[0])
    d = volume.path("many")
    d.mkdir()
    for i in range(300):
        (d / f"f{i}").write_bytes(b"%d" % i)
    assert _daemon_fds(pid) > 300
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    deadline = time.monotonic() + 10
    while _daemon_fds(pid) > 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _daemon_fds(pid) < 100
    assert len(os.listdir(d)) == 300
    assert all((d / f"f{i}").read_bytes() == b"%d" % i for i in range(0, 300, 7))


_AS_OTHER_USER = r"""
import errno, json, os, sys
root = int(sys.argv[1])
out = {}
def do(label, func, *args, **kwargs):
    try:
        result = func(*args, **kwargs)
        out[label] = result.decode() if isinstance(result, bytes) else "ok"
        if label.startswith("open") and isinstance(result, int):
            os.close(result)
    except OSError as exc:
        out[label] = errno.errorcode[exc.errno]
do("open_secret", os.open, "secret", os.O_RDONLY, dir_fd=root)
do("stat_secret", os.stat, "secret", dir_fd=root)
do("chmod_secret", os.chmod, "secret", 0o777, dir_fd=root)
do("unlink_root_file_in_sticky_dir", os.unlink, "pub/roots", dir_fd=root)
do("open_create_mine", os.open, "pub/mine", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=root)
do("open_create_suid", os.open, "pub/suid", os.O_CREAT | os.O_WRONLY, 0o4755, dir_fd=root)
fd = os.open("pub/mine", os.O_RDWR, dir_fd=root)
os.write(fd, b"written by nobody")
os.close(fd)
do("mkdir_mine", os.mkdir, "pub/mydir", 0o700, dir_fd=root)
do("symlink_mine", os.symlink, "mine", "pub/mylink", dir_fd=root)
do("open_create_in_setgid_dir", os.open, "sgid/f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=root)
do("create_in_root_dir", os.open, "noentry", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=root)
do("read_mine", lambda: open(os.open("pub/mine", os.O_RDONLY, dir_fd=root), "rb").read())
print(json.dumps(out))
"""


def test_other_user_with_allow_other(volume: Volume) -> None:
    """Permissions are the kernel's (default_permissions); new entries belong to their creator."""
    mounted = volume
    mounted.mount("-o", "allow_other")
    m = mounted.mountpoint
    os.chmod(m, 0o755)
    (m / "secret").write_bytes(b"root only")
    os.chmod(m / "secret", 0o600)
    (m / "pub").mkdir()
    os.chmod(m / "pub", 0o1777)
    (m / "pub/roots").write_bytes(b"r")
    (m / "sgid").mkdir()
    os.chown(m / "sgid", 0, 4321)
    os.chmod(m / "sgid", 0o2777)
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("needs a python3 that user nobody may run")
    fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = subprocess.run(
            [python, "-I", "-c", _AS_OTHER_USER, str(fd)],
            pass_fds=(fd,),
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got == {
        "open_secret": "EACCES",
        "stat_secret": "ok",
        "chmod_secret": "EPERM",
        "unlink_root_file_in_sticky_dir": "EPERM",
        "open_create_mine": "ok",
        "open_create_suid": "ok",
        "mkdir_mine": "ok",
        "symlink_mine": "ok",
        "open_create_in_setgid_dir": "ok",
        "create_in_root_dir": "EACCES",
        "read_mine": "written by nobody",
    }
    for name in ("pub/mine", "pub/mydir", "pub/mylink"):
        st = os.lstat(m / name)
        assert (st.st_uid, st.st_gid) == (65534, 65534), name
        bst = os.lstat(mounted.backing_path(name))
        assert (bst.st_uid, bst.st_gid) == (65534, 65534), name
    assert stat.S_IMODE(os.stat(m / "pub/mine").st_mode) == 0o600
    suid = os.stat(m / "pub/suid")
    assert (suid.st_uid, stat.S_IMODE(suid.st_mode)) == (65534, 0o4755)
    assert (m / "sgid/f").stat().st_gid == 4321
    assert (m / "pub/roots").read_bytes() == b"r"
