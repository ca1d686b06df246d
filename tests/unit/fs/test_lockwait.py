"""Waits for what another daemon holds (kmsfs.fs.lockwait), in-process under trio: the
deadline, the limit on waiting requests, the quick refusal after a timed-out wait, the
end of every wait on close(), and the caller's pending signals read from /proc.

The waits run on trio's virtual clock (``run``: a MockClock that jumps to the next
deadline whenever every task waits), so a lock held for a second costs no real second;
the durations asserted are that clock's, which lockwait reads for every sleep and
deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import trio
from trio.testing import MockClock

from kmsfs.backing.shared import LockBusy
from kmsfs.fs.lockwait import (
    LockWaitFailed,
    LockWaitInterrupted,
    LockWaits,
    LockWaitTimeout,
    caller_interrupted,
)

NEEDED = "an exclusive lock of bytes 0 to the end"
T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(main)`` on a virtual clock."""
    return trio.run(main, clock=MockClock(autojump_threshold=0))


def held(start: int = 0, end: int | None = None) -> Callable[[], Awaitable[str]]:
    """An attempt that always finds the bytes held by another daemon."""

    async def attempt() -> str:
        raise LockBusy("/backing/file", NEEDED, start, end)

    return attempt


def released_after(tries: int) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """An attempt that finds the bytes held *tries* times, then succeeds."""
    count = [0]

    async def attempt() -> str:
        count[0] += 1
        if count[0] <= tries:
            raise LockBusy("/backing/file", NEEDED)
        return "done"

    return attempt, count


def test_a_wait_that_ends_returns_what_the_attempt_returns() -> None:
    waits = LockWaits(timeout=5)
    attempt, count = released_after(4)

    async def main() -> str:
        return await waits.run(attempt)

    assert run(main) == "done"
    assert count[0] == 5 and waits.waiting == 0 and waits.timed_out == 0


def test_a_lock_held_for_ever_fails_after_the_deadline_naming_file_and_lock() -> None:
    waits = LockWaits(timeout=0.3)

    async def main() -> float:
        start = trio.current_time()
        with pytest.raises(LockWaitTimeout) as info:
            await waits.run(held(), key=1)
        assert str(info.value) == (
            f"/backing/file: gave up after 0.3 s waiting for {NEEDED} (another daemon"
            " holds a conflicting lock; shared_lock_timeout)"
        )
        return trio.current_time() - start

    elapsed = run(main)
    assert 0.3 <= elapsed < 1.5
    assert waits.summary() == {
        "waiting": 0,
        "limit": waits.limit,
        "timeout_seconds": 0.3,
        "timed_out": 1,
        "refused": 0,
        "interrupted": 0,
        "abandoned": 0,
    }


def test_after_a_timeout_overlapping_waits_on_the_same_file_give_up_at_once() -> None:
    """The kernel retries a failed readahead page by page, each page under its lock:
    a request for bytes of a file whose wait just timed out gives up at once while they
    are still held; other bytes of it, and other files, wait as usual; once the bytes
    are free the first attempt succeeds."""
    waits = LockWaits(timeout=0.2)

    async def main() -> None:
        with pytest.raises(LockWaitTimeout):
            await waits.run(held(0, 8192), key="f")
        start = trio.current_time()
        with pytest.raises(LockWaitTimeout, match="that a request waited 0.2 s for"):
            await waits.run(held(4096, 4097), key="f")
        assert trio.current_time() - start < 0.05
        start = trio.current_time()
        with pytest.raises(LockWaitTimeout, match="gave up after 0.2 s"):
            await waits.run(held(8192, None), key="f")  # not overlapping: waits
        with pytest.raises(LockWaitTimeout, match="gave up after 0.2 s"):
            await waits.run(held(0, 8192), key="g")  # another file: waits
        assert trio.current_time() - start >= 0.4
        attempt, _ = released_after(0)
        assert await waits.run(attempt, key="f") == "done"

    run(main)


def test_requests_waiting_for_the_same_bytes_take_turns_trying() -> None:
    """Thirty requests wait for the same bytes, held for a second: one tries at each
    retry and the others only once it got them (each try is an open, fstat and fcntl,
    RPCs on a network filesystem, on the event loop).  Every request succeeds; trying
    each on its own would have cost 30 times the tries."""
    waits = LockWaits(timeout=10)
    tries = [0]
    released = [False]

    async def attempt() -> str:
        tries[0] += 1
        if not released[0]:
            raise LockBusy("/backing/file", NEEDED)
        return "done"

    results: list[str] = []

    async def one() -> None:
        results.append(await waits.run(attempt, key="f"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(one)
            await trio.sleep(1)
            released[0] = True

    run(main)
    assert results == ["done"] * 30
    # 30 first tries, one per retry (about 26 in a second: 1, 2, 4 ... 50 ms), 30 last
    assert tries[0] < 30 + 40 + 30, tries[0]


def test_no_more_than_limit_requests_wait_and_one_more_is_refused_at_once() -> None:
    """Waiters must never take every request task: with *limit* waiting, the next
    request is refused at once (EIO), and once they end, waits start again."""
    waits = LockWaits(timeout=0.5, limit=3)
    outcomes: list[tuple[str, float]] = []

    async def one(start: float) -> None:
        try:
            await waits.run(held())
        except LockWaitTimeout:
            outcomes.append(("timed out", trio.current_time() - start))
        except LockWaitFailed as exc:
            outcomes.append((str(exc), trio.current_time() - start))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one, trio.current_time())
            await trio.sleep(0.1)
            assert waits.waiting == 3
        assert waits.waiting == 0
        attempt, _ = released_after(2)
        assert await waits.run(attempt) == "done"  # a slot is free again

    run(main)
    assert [what for what, _ in outcomes].count("timed out") == 3
    [(refusal, after)] = [(what, t) for what, t in outcomes if what != "timed out"]
    assert after < 0.05
    assert refusal == (
        f"/backing/file: gave up at once waiting for {NEEDED} (another daemon holds a"
        " conflicting lock): 3 requests wait for other daemons already, the most that may"
    )
    assert waits.refused == 1


def test_close_ends_every_wait_at_once_and_refuses_new_ones() -> None:
    waits = LockWaits(timeout=60)
    ended: list[str] = []

    async def one() -> None:
        stopping = "gave up waiting for .*: the daemon is stopping"
        with pytest.raises(LockWaitFailed, match=stopping) as info:
            await waits.run(held())
        assert not isinstance(info.value, LockWaitTimeout)
        ended.append("ended")

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
            await trio.sleep(0.05)
            start = trio.current_time()
            waits.close()
        return trio.current_time() - start

    assert run(main) < 0.5
    assert ended == ["ended"] * 5 and waits.waiting == 0 and waits.abandoned == 5

    async def later() -> None:
        with pytest.raises(LockWaitFailed, match="not waiting for"):
            await waits.run(held())

    run(later)


@pytest.fixture
def stopped_child() -> Iterator[subprocess.Popen[bytes]]:
    """A process that blocks SIGUSR2, then stops: signals sent to it stay pending, as
    they do for a caller blocked in a FUSE request."""
    code = (
        "import os, signal\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
        "os.kill(os.getpid(), signal.SIGSTOP)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{child.pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.01)
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_caller_with_a_signal_pending_is_interrupted_but_not_for_a_blocked_one(
    stopped_child: subprocess.Popen[bytes],
) -> None:
    """What the kernel sends FUSE_INTERRUPT for, read from /proc/PID/status (pyfuse3
    does not pass the INTERRUPT on): a pending signal the thread does not block."""
    pid = stopped_child.pid
    assert not caller_interrupted(pid)
    os.kill(pid, signal.SIGUSR2)  # blocked: it does not interrupt
    assert not caller_interrupted(pid)
    os.kill(pid, signal.SIGUSR1)  # not blocked: pending on a stopped process
    assert caller_interrupted(pid)
    assert not caller_interrupted(2**22 + 1)  # no such process: cannot tell


def test_a_wait_whose_caller_has_a_signal_pending_gives_up(
    stopped_child: subprocess.Popen[bytes],
) -> None:
    waits = LockWaits(timeout=60)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def one() -> None:
                with pytest.raises(LockWaitInterrupted, match=f"pid {stopped_child.pid}"):
                    await waits.run(held(), caller=stopped_child.pid)

            nursery.start_soon(one)
            await trio.sleep(0.2)
            assert waits.waiting == 1
            os.kill(stopped_child.pid, signal.SIGUSR1)
            await trio.sleep(0.5)  # within the next retry (50 ms at most)
            assert waits.waiting == 0

    run(main)
    assert waits.interrupted == 1
