"""SharedContentFile in-process: two open file descriptions of one backing file stand
for two daemons (OFD locks conflict between descriptions, also in one process), so
the byte-range locking is exercised without FUSE, in threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from kmsfs.format.content import OVERHEADS, XaesBlockCipher
from kmsfs.format.header import FORMAT_2
from kmsfs.fs.content_file import ContentFile
from kmsfs.fs.shared import (
    LockBusy,
    SharedContentFile,
    check_shared_support,
    ofd_lock,
    ofd_unlock,
)

BS = 4096
KEY = bytes(range(32))
FILE_ID = bytes(16)


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
                files[which].write(block * BS + start, bytes([0x41 + which]) * length)
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


def test_a_held_write_lock_makes_the_other_description_wait(tmp_path: Path) -> None:
    """While another description holds an exclusive lock to the end of the file, a
    read waits for it (the lock is what orders two daemons)."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    SharedContentFile(fd, XaesBlockCipher(KEY, FILE_ID, BS), 0, lambda: "f").write_empty()
    reader = opened(path)
    ofd_lock(fd, True, 0, 0)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (reader.read(0, 10), done.set()))
    thread.start()
    assert not done.wait(0.3)
    ofd_unlock(fd, 0, 0)
    assert done.wait(10)
    thread.join()
    os.close(fd)
    os.close(reader.fd)


def test_run_inline_refuses_at_once_when_another_description_holds_the_range(
    tmp_path: Path,
) -> None:
    """On the event loop a request must not wait: with another description's lock on
    what it needs, run_inline raises LockBusy before reading or writing anything, and
    afterwards the same file waits again (as a worker thread's call must)."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    SharedContentFile(fd, XaesBlockCipher(KEY, FILE_ID, BS), 0, lambda: "f").write_empty()
    first, second = opened(path), opened(path)
    first.write(0, b"a" * (3 * BS))
    before = path.read_bytes()
    ofd_lock(fd, True, 0, 0)
    outcomes: list[BaseException | None] = []

    def inline(call: Callable[[ContentFile], object]) -> None:
        try:
            second.run_inline(call)
            outcomes.append(None)
        except BaseException as exc:  # checked below
            outcomes.append(exc)

    for call in (lambda c: c.write(BS, b"b" * 10), lambda c: c.read(0, 10)):
        thread = threading.Thread(target=inline, args=(call,), daemon=True)
        thread.start()
        thread.join(5)  # one that waits for the lock is still running: the test fails
        assert not thread.is_alive(), "run_inline waited for the lock"
    assert [type(outcome) for outcome in outcomes] == [LockBusy, LockBusy]
    assert path.read_bytes() == before
    done = threading.Event()
    thread = threading.Thread(target=lambda: (second.read(0, 10), done.set()))
    thread.start()
    assert not done.wait(0.3)  # outside run_inline it waits for the lock again
    ofd_unlock(fd, 0, 0)
    assert done.wait(10)
    thread.join()
    # a lock of other blocks does not stand in its way
    ofd_lock(fd, True, 2 * (BS + OVERHEADS[FORMAT_2]), 0)
    assert second.run_inline(lambda content: content.read(0, 10)) == b"a" * 10
    ofd_unlock(fd, 2 * (BS + OVERHEADS[FORMAT_2]), 0)
    for handle in (fd, first.fd, second.fd):
        os.close(handle)


def test_this_filesystem_passes_the_shared_mode_check(tmp_path: Path) -> None:
    check_shared_support(str(tmp_path))
    assert os.listdir(tmp_path) == []
