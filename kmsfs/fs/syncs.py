"""Where the backing fsync of an FSYNC or FSYNCDIR request runs: on the loop thread
when no other request waits, else in a worker thread.

A worker thread costs each sync two wake-ups (the worker's, then the loop's through
its socket), 0.4-0.55 ms on the machines we measured, where a woken worker waited
about 0.4 ms for a CPU (docs/PERFORMANCE.md, "What would close the gap").  A sync on
the loop thread costs neither, but stops every other request for as long as the disk
takes.  So ``SyncPath.run`` syncs inline only when that stops nobody and is
likely quick: no other request is being handled, none waits unread in /dev/fuse,
less than ``INLINE_SYNC_BYTES`` were written since the file's last sync, and the
last sync was quick (under ``SLOW_SYNC_NS``: a slow disk sends the syncs to
threads until one is quick again).  A request that arrives during an inline sync waits for it, as a
request waits for any handler that does not await.

What is synced, and when the request is answered, is the same either way: the
call returns only after *func* returned, and an OSError from it (EIO from the
disk) reaches the caller unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import Any, TypeVar

import trio

T = TypeVar("T")

SLOW_SYNC_NS = 10_000_000  # a sync that took longer sends the next one to a thread
INLINE_SYNC_BYTES = 256 * 1024  # a sync that may flush more goes to a thread


class SyncPath:
    """Runs backing syncs inline or in a worker thread of *limiter*.

    *others_waiting()* says whether another request is being handled or waits to be
    read (the caller's own request excluded).  Attributes: inline, offloaded (syncs
    run each way so far), last_ns (how long the last sync took, either way).
    """

    def __init__(self, limiter: trio.CapacityLimiter, others_waiting: Callable[[], bool]):
        self._limiter = limiter
        self._others_waiting = others_waiting
        self.inline = 0
        self.offloaded = 0
        self.last_ns = 0

    async def run(self, func: Callable[..., T], *args: Any, unsynced: int = 0) -> T:
        """*func(*args)*: inline if that stops nobody and is likely quick (*unsynced*:
        the bytes written since the last sync), else in a worker thread; its result,
        or its exception.  Cancelled while in a thread, it still waits for *func* to
        return (trio's ``to_thread`` default)."""
        if (
            unsynced < INLINE_SYNC_BYTES
            and self.last_ns < SLOW_SYNC_NS
            and not self._others_waiting()
        ):
            self.inline += 1
            return self._timed(func, *args)
        self.offloaded += 1
        return await trio.to_thread.run_sync(self._timed, func, *args, limiter=self._limiter)

    def _timed(self, func: Callable[..., T], *args: Any) -> T:
        start = perf_counter_ns()
        try:
            return func(*args)
        finally:
            self.last_ns = perf_counter_ns() - start
