"""The inode table's descriptors: forgotten entries' descriptors are closed off the
request path, all of them, in order, and never more than a bounded number wait.  What
a deferred entry does when the process is out of descriptors is tested in a child
process that uses them up: tests/mount/test_fd_limit.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kmsfs.fs.inodes import ROOT_INODE, Closer, InodeTable


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_closer_closes_every_descriptor_it_is_given() -> None:
    closer = Closer(max_pending=1000)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]
    for fd in fds:
        closer.close(fd)
    closer.stop()
    assert not any(is_open(fd) for fd in fds)


def test_closer_closes_at_once_when_too_many_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    closer = Closer(max_pending=2)
    release = threading.Event()
    real_close = os.close

    def slow_close(fd: int) -> None:
        if threading.current_thread().name == "kmsfs-closer":
            release.wait(10)  # hold the thread: the queue fills up
        real_close(fd)

    monkeypatch.setattr(os, "close", slow_close)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(6)]
    for fd in fds:
        closer.close(fd)
    # one in the thread's hands, two waiting: the other three were closed by the caller
    closed_now = [fd for fd in fds if not is_open(fd)]
    assert len(closed_now) >= 3
    release.set()
    closer.stop()
    assert not any(is_open(fd) for fd in fds)


def test_entry_lock_excludes_a_second_task_until_released() -> None:
    import trio

    from kmsfs.fs.inodes import EntryLock

    order: list[str] = []

    async def main() -> None:
        lock = EntryLock()

        async def holder() -> None:
            async with lock:
                order.append("holder in")
                await trio.sleep(0.05)  # as a task waiting for a worker thread
                order.append("holder out")

        async def second() -> None:
            await trio.sleep(0.01)
            assert lock.locked()
            async with lock:
                order.append("second in")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            nursery.start_soon(second)
        assert not lock.locked()

    trio.run(main)
    assert order == ["holder in", "holder out", "second in"]


def test_an_entry_holds_the_inode_its_number_names_when_the_name_was_replaced(
    tmp_path: Path,
) -> None:
    """Lookup stats a name, then opens it: if another daemon renamed a new file over the
    name in between, the entry is the new inode's (number, descriptor and attributes
    agree).  An entry numbered after the old inode but holding the new one let the old
    number be reused by a later file while the kernel still cached the old attributes:
    a reader on the other mount read an empty file."""
    (tmp_path / "target").write_bytes(b"old")
    root = os.open(tmp_path, os.O_PATH)
    table = InodeTable(root)
    try:
        stale = os.stat(tmp_path / "target")
        keep_old_alive = os.open(tmp_path / "target", os.O_RDONLY)  # its number stays taken
        (tmp_path / "new").write_bytes(b"new file")
        os.rename(tmp_path / "new", tmp_path / "target")
        new_ino = os.stat(tmp_path / "target").st_ino
        assert new_ino != stale.st_ino

        entry, st = table.remember(stale, ROOT_INODE, b"target")

        assert entry.ino == new_ino
        assert os.fstat(entry.fd).st_ino == new_ino
        assert st.st_ino == new_ino and st.st_size == len(b"new file")
        assert table.get(stale.st_ino) is None
        os.close(keep_old_alive)
    finally:
        table.close_all()
