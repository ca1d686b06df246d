"""The sync path of FSYNC and FSYNCDIR (kmsfs.fs.syncs): a sync runs on the loop
thread when nothing else waits and in a worker thread otherwise or after a slow one;
either way the call returns only after the backing sync returned, with its result or
its error."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio

from kmsfs.fs import syncs
from kmsfs.fs.syncs import SyncPath


def _run(path: SyncPath, func, *args):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        return await path.run(func, *args)

    return trio.run(main)


def _synced_on(tmp_path: Path, others: list[bool]) -> tuple[SyncPath, list[int]]:
    threads: list[int] = []
    path = SyncPath(trio.CapacityLimiter(2), lambda: others[0])
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")

        def sync(fd: int) -> int:
            threads.append(threading.get_ident())
            os.fdatasync(fd)
            return fd

        assert _run(path, sync, fd) == fd
    finally:
        os.close(fd)
    return path, threads


def test_a_sync_with_nothing_else_waiting_runs_on_the_loop_thread(tmp_path: Path) -> None:
    path, threads = _synced_on(tmp_path, [False])
    assert threads == [threading.get_ident()]
    assert (path.inline, path.offloaded) == (1, 0)


def test_a_sync_while_another_request_waits_runs_in_a_worker_thread(tmp_path: Path) -> None:
    path, threads = _synced_on(tmp_path, [True])
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert (path.inline, path.offloaded) == (0, 1)


def test_after_a_slow_sync_the_next_runs_in_a_thread_until_one_is_quick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow disk must not stop the loop sync after sync: one sync slower than
    SLOW_SYNC_NS sends the next to a worker thread; a quick one brings them back."""
    monkeypatch.setattr(syncs, "SLOW_SYNC_NS", 1)  # every sync is "slow" ...
    path = SyncPath(trio.CapacityLimiter(2), lambda: False)
    where: list[bool] = []

    def sync() -> None:
        where.append(threading.get_ident() == loop_thread)

    loop_thread = threading.get_ident()
    _run(path, sync)
    _run(path, sync)
    monkeypatch.setattr(syncs, "SLOW_SYNC_NS", 10**12)  # ... and now none is
    _run(path, sync)
    _run(path, sync)
    assert where == [True, False, True, True]


@pytest.mark.parametrize("others", [False, True], ids=["inline", "in a thread"])
def test_an_error_of_the_backing_sync_reaches_the_caller(others: bool) -> None:
    path = SyncPath(trio.CapacityLimiter(2), lambda: others)

    def failing() -> None:
        raise OSError(errno.EIO, "disk gone")

    with pytest.raises(OSError) as info:
        _run(path, failing)
    assert info.value.errno == errno.EIO


@pytest.mark.parametrize("others", [False, True], ids=["inline", "in a thread"])
def test_other_tasks_run_after_an_inline_sync_and_during_one_in_a_thread(others: bool) -> None:
    """What inline means for the rest of the loop: another task runs only once an
    inline sync has returned, but while a sync in a worker thread is still running."""
    path = SyncPath(trio.CapacityLimiter(2), lambda: others)
    release, done = threading.Event(), threading.Event()
    seen_done: list[bool] = []

    def sync() -> None:
        release.wait(10 if others else 0.05)  # inline: nobody can release it
        done.set()

    async def other() -> None:
        seen_done.append(done.is_set())
        release.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await path.run(sync)

    trio.run(main)
    assert seen_done == [not others]


def test_a_sync_that_may_flush_much_runs_in_a_thread() -> None:
    """A sync after many written bytes may take long: it goes to a worker thread
    even when nothing else waits, so that it stops nobody who arrives meanwhile."""
    path = SyncPath(trio.CapacityLimiter(2), lambda: False)
    loop_thread = threading.get_ident()
    where: list[bool] = []

    def sync() -> None:
        where.append(threading.get_ident() == loop_thread)

    _run_unsynced = [syncs.INLINE_SYNC_BYTES - 1, syncs.INLINE_SYNC_BYTES, 0]
    for unsynced in _run_unsynced:

        async def main(unsynced: int = unsynced) -> None:
            await path.run(sync, unsynced=unsynced)

        trio.run(main)
    assert where == [True, False, True]
