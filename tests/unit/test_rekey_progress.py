"""The online rekey's pace (kmsfs/server/rekey_progress.py): the rate limit's token
bucket on trio's mock clock, and the ETA."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kmsfs.server.rekey_progress import Pace, RateLimit


def elapsed(takes: list[tuple[float, float]], limit: RateLimit) -> list[float]:
    """Run ``limit.take(n)`` after an idle time, for each (idle, n); the times they return."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    times: list[float] = []

    async def main() -> None:
        for idle, amount in takes:
            await trio.sleep(idle)
            await limit.take(amount)
            times.append(trio.current_time())

    trio.run(main, clock=clock)
    return times


def test_a_rate_limit_is_never_exceeded_from_the_start() -> None:
    """The bucket starts empty: ten takes of 10 units at 10 a second end at 10 s, not
    before (no burst at the start)."""
    times = elapsed([(0, 10)] * 10, RateLimit(10))
    assert times[-1] == pytest.approx(10.0)
    assert [b - a for a, b in zip(times, times[1:], strict=False)] == pytest.approx([1.0] * 9)


def test_time_spent_elsewhere_is_made_up_for_one_second_at_most() -> None:
    limit = RateLimit(10, burst=1.0)
    times = elapsed([(0, 10), (0.5, 10), (5, 10), (0, 10)], limit)
    # 1 s for the first; the next owes 1 s, of which 0.5 s passed idle; after 5 s idle
    # only 1 s is saved: that take and the next are paid from it and 1 s more
    assert times == pytest.approx([1.0, 2.0, 7.0, 8.0])


def test_no_limit_never_waits() -> None:
    assert elapsed([(0, 10**9)] * 3, RateLimit(None)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        RateLimit(0)


def test_eta_is_the_slower_of_bytes_and_files() -> None:
    pace = Pace()
    assert pace.rates() == (None, None) and pace.eta(100, 1) is None
    pace._samples.extend([(0.0, 0, 0), (10.0, 1000, 5)])
    assert pace.rates() == (100.0, 0.5)
    assert pace.eta(2000, 5) == 20.0  # bytes: 20 s, files: 10 s
    assert pace.eta(0, 0) == 0.0
