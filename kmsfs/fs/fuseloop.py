"""How pyfuse3's request loop waits for /dev/fuse: not at all while requests are queued.

pyfuse3 reads each request after ``async with read_lock`` and
``await trio.lowlevel.wait_readable(fd)``.  Both always yield to trio's
scheduler, even when a request is already queued: two trips around the run
loop, an ``epoll_ctl`` and two ``epoll_wait`` per request, which on the
machines we measured cost more than a kmsfs handler (docs/PERFORMANCE.md).

``install()`` swaps the trio module pyfuse3 uses for its loop (``pyfuse3.trio``,
the hook pyfuse3's own ``pyfuse3.asyncio.enable()`` uses) for an adapter that
is trio except for two things:

- ``Lock`` takes a free lock without yielding (``EntryLock``);
- ``lowlevel.wait_readable(fd)`` first asks ``poll`` with a zero timeout and
  returns at once when a request is queued; only when none is, or after
  ``YIELD_EVERY`` requests in a row (so that worker-thread results, the status
  socket and signals are served), does it wait with trio.

A request that vanishes between the poll and the read (its process was
interrupted) makes the blocking read wait for the next request, as it can with
pyfuse3's own loop, where that window is wider.  ``uninstall()`` restores trio.

``install(on_disconnect)`` also tells the daemon when the kernel ended the
connection (the file system was unmounted; ``/dev/fuse`` then polls POLLERR):
pyfuse3's loop ends only once every request being handled has finished, so
requests waiting for another daemon's lock must be told to stop waiting.
"""

from __future__ import annotations

import select
import types
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from kmsfs.fs.inodes import EntryLock

YIELD_EVERY = 32  # requests served without a trip around trio's run loop, at most
_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Lowlevel(types.ModuleType):
    """trio.lowlevel, but with a ``wait_readable`` that returns at once when it can."""

    def __init__(self, on_disconnect: Callable[[], None] | None = None) -> None:
        super().__init__("kmsfs.fs.fuseloop.lowlevel")
        self._polls: dict[int, select.poll] = {}
        self._streak = 0
        self._on_disconnect = on_disconnect

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        if self._streak < YIELD_EVERY:
            ready = poll.poll(0)
            if ready:
                self._streak += 1
                if ready[0][1] & _GONE:
                    self._gone()
                return
        self._streak = 0
        await trio.lowlevel.wait_readable(fd)
        if self._on_disconnect is not None:
            ready = poll.poll(0)
            if ready and ready[0][1] & _GONE:
                self._gone()

    def _gone(self) -> None:
        """The kernel ended the connection: call on_disconnect, once."""
        on_disconnect, self._on_disconnect = self._on_disconnect, None
        if on_disconnect is not None:
            on_disconnect()


class _Trio(types.ModuleType):
    """The trio module as pyfuse3 sees it after ``install()``."""

    Lock = EntryLock

    def __init__(self, on_disconnect: Callable[[], None] | None = None) -> None:
        super().__init__("kmsfs.fs.fuseloop.trio")
        self.lowlevel = _Lowlevel(on_disconnect)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(on_disconnect: Callable[[], None] | None = None) -> None:
    """Make pyfuse3's loop use the adapter (call before ``pyfuse3.main``); it calls
    *on_disconnect*, once, when it sees that the kernel ended the connection."""
    pyfuse3.trio = _Trio(on_disconnect)  # type: ignore[attr-defined]


def uninstall() -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]
