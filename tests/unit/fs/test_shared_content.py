"""SharedContentFile in-process: two open file descriptions of one backing file stand
for two daemons (OFD locks conflict between descriptions, also in one process), so
the byte-range locking is exercised without FUSE, in threads."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.shared import (
    LockBusy,
    SharedContentFile,
    backing_fs_type,
    check_created,
    check_direct_io,
    check_shared_support,
    ofd_lock,
    ofd_unlock,
)
from kmsfs.errors import ConfigError
from kmsfs.format.content import OVERHEADS, XaesBlockCipher
from kmsfs.format.header import FORMAT_2

BS = 4096
KEY = bytes(range(32))
FILE_ID = bytes(16)
T = TypeVar("T")


def retrying(call: Callable[[], T]) -> T:
    """*call()* again until another description no longer holds what it needs (what
    the operations layer does on the event loop, kmsfs/fs/lockwait.py)."""
    while True:
        try:
            return call()
        except LockBusy:
            time.sleep(0.0002)


def opened(path: Path) -> SharedContentFile:
    fd = os.open(path, os.O_RDWR)
    return SharedContentFile.open(fd, XaesBlockCipher(KEY, FILE_ID, BS), lambda: str(path))


def test_two_descriptions_writing_disjoint_bytes_of_new_blocks_keep_both(tmp_path: Path) -> None:
    """Like two daemons: each writes its own 100 bytes of the same new block, block
    after block, at the same moment.  Both writes are in every block afterwards, and
    every block authenticates (read back through a third description)."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    SharedContentFile(fd, XaesBlockCipher(KEY, FILE_ID, BS), 0, lambda: "f").write_empty()
    os.close(fd)
    files = [opened(path), opened(path)]
    barrier = threading.Barrier(2)
    ranges = [(0, 100), (2000, 100)]

    errors: list[BaseException] = []

    def writer(which: int) -> None:
        start, length = ranges[which]
        try:
            for block in range(200):
                barrier.wait(timeout=30)
                offset, data = block * BS + start, bytes([0x41 + which]) * length
                retrying(functools.partial(files[which].write, offset, data))
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    check = opened(path)
    data = check.read(0, 200 * BS)
    for block in range(200):
        for which, (start, length) in enumerate(ranges):
            got = data[block * BS + start : block * BS + start + length]
            assert got == bytes([0x41 + which]) * length, (block, which)
    for content in (*files, check):
        os.close(content.fd)


def test_size_is_taken_from_the_backing_file_not_from_memory(tmp_path: Path) -> None:
    """A description that saw a short file reads and extends what another grew since."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    SharedContentFile(fd, XaesBlockCipher(KEY, FILE_ID, BS), 0, lambda: "f").write_empty()
    os.close(fd)
    first, second = opened(path), opened(path)
    first.write(0, b"a" * 5000)
    assert second.read(0, 10_000) == b"a" * 5000
    second.write(5000, b"b" * 10)
    assert first.read(4990, 100) == b"a" * 10 + b"b" * 10
    first.truncate(3)
    assert second.read(0, 100) == b"aaa"
    os.close(first.fd)
    os.close(second.fd)


def test_a_held_lock_makes_the_other_description_refuse_at_once_and_do_nothing(
    tmp_path: Path,
) -> None:
    """A SharedContentFile never waits (a lock may be held forever: the operations
    layer decides how long to wait): with another description's lock on what a read
    or write needs, it raises LockBusy at once, naming the backing file and the lock
    it needed, before reading or writing anything; a lock of other blocks does not
    stand in its way; once the lock is released the same calls succeed."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    SharedContentFile(fd, XaesBlockCipher(KEY, FILE_ID, BS), 0, lambda: "f").write_empty()
    first, second = opened(path), opened(path)
    first.write(0, b"a" * (3 * BS))
    before = path.read_bytes()
    ofd_lock(fd, True, 0, 0)
    outcomes: list[BaseException | None] = []

    def attempt(call: Callable[[ContentFile], object]) -> None:
        try:
            call(second)
            outcomes.append(None)
        except BaseException as exc:  # checked below
            outcomes.append(exc)

    for call in (lambda c: c.write(BS, b"b" * 10), lambda c: c.read(0, 10)):
        thread = threading.Thread(target=attempt, args=(call,), daemon=True)
        thread.start()
        thread.join(5)  # one that waits for the lock is still running: the test fails
        assert not thread.is_alive(), "a SharedContentFile call waited for the lock"
    assert [type(outcome) for outcome in outcomes] == [LockBusy, LockBusy]
    write_busy, read_busy = outcomes
    assert isinstance(write_busy, LockBusy) and isinstance(read_busy, LockBusy)
    assert write_busy.path == read_busy.path == str(path)
    bbs = BS + OVERHEADS[FORMAT_2]
    assert write_busy.needed == f"an exclusive lock of bytes {bbs}-{2 * bbs - 1}"
    assert read_busy.needed == f"a shared lock of bytes 0-{bbs - 1}"
    assert path.read_bytes() == before
    ofd_unlock(fd, 0, 0)
    ofd_lock(fd, True, 2 * bbs, 0)  # the final block only: blocks 0 and 1 are free
    assert second.read(0, 10) == b"a" * 10
    second.write(BS, b"b" * 10)
    ofd_unlock(fd, 2 * bbs, 0)
    assert first.read(BS, 12) == b"b" * 10 + b"aa"
    for handle in (fd, first.fd, second.fd):
        os.close(handle)


def test_a_file_without_its_first_block_is_being_created_until_it_has_one(
    tmp_path: Path,
) -> None:
    """check_created: a backing file with no content (another daemon between its O_EXCL
    open and its first block) is LockBusy; with its block, it is done (no lock taken,
    so a lock another daemon holds on it does not matter)."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    with pytest.raises(LockBusy, match="another daemon may be creating it"):
        check_created(str(path), lambda: True)
    content = SharedContentFile(fd, XaesBlockCipher(KEY, FILE_ID, BS), 0, lambda: "f")
    content.write_empty()
    with pytest.raises(LockBusy):
        check_created(str(path), lambda: False)  # no header
    ofd_lock(fd, True, 0, 0)
    other = os.open(path, os.O_RDONLY)
    try:
        check_created(f"/proc/self/fd/{other}", lambda: True)
    finally:
        os.close(other)
        os.close(fd)


def test_this_filesystem_passes_the_shared_mode_check(tmp_path: Path) -> None:
    check_shared_support(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_filesystem_refusing_unaligned_direct_io_is_named(tmp_path: Path) -> None:
    """The check shared mode makes at mount on a FUSE backing (whose page cache locks do
    not make coherent: blocks are read with O_DIRECT there), on a filesystem that refuses
    unaligned O_DIRECT writes (ext4, XFS: EINVAL off a sector boundary): ConfigError
    naming the backing, its type and the cause; the scratch file is removed."""
    kind = backing_fs_type(str(tmp_path))
    if kind not in ("ext4", "xfs"):
        pytest.skip(f"the temporary directory is on {kind or 'an unknown filesystem'}")
    with pytest.raises(ConfigError) as refused:
        check_direct_io(str(tmp_path))
    assert str(refused.value) == (
        f"{tmp_path}: the backing filesystem ({kind}) refuses unaligned O_DIRECT reads"
        " and writes (Invalid argument): shared mode needs them there to read blocks past"
        " this host's page cache, which byte-range locks do not make coherent (see"
        " docs/DESIGN.md, 'Shared storage')"
    )
    assert os.listdir(tmp_path) == []
