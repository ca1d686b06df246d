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

Before it parks the loop with trio, the adapter keeps asking for the next request for
up to ``SPIN_NS`` (``spin_ns``; on a machine with more than one CPU): a process that
sends one request after another (``stat`` after ``stat``, a database's small reads
and writes) has its next one there within a few microseconds of the answer, and
waking a parked daemon costs far more: the CPU it slept on goes idle, and waking an
idle CPU is an interrupt to another CPU and, on a virtual machine, an exit to the
hypervisor (docs/PERFORMANCE.md, "Waking an idle vCPU, and the spin before
parking").  A spin that finds nothing makes the next ones park at once, twice as
many each time (up to ``SPIN_BACKOFF_MAX``), until one finds a request again: an
idle daemon spins once, and a daemon whose caller shares its CPU (where spinning
only delays the caller) rarely.

``request_queued()`` says whether a request waits unread in /dev/fuse, from the fd
the adapter's loop waits for (either loop): kmsfs/fs/syncs.py runs a backing sync on
the loop thread only when none does.

A pyfuse3 built with kmsfs's patch (scripts/install-pyfuse3, docs/pyfuse3-patch.md)
does this itself, better: ``Operations.enable_read_before_wait`` makes its loop
read the non-blocking session fd first and wait only when nothing is queued (no
read-lock hand-over between its tasks either).  ``configure(ops, on_disconnect)``
uses that when this process's pyfuse3 has it and the adapter otherwise; with the
patched loop and *on_disconnect*, the adapter only watches: its ``wait_readable``
is trio's, followed by the POLLERR check (an idle task of that loop waits there,
so it sees the connection end; a task that reads it first exits the session
instead, which leaves the waiting one to see it).  ``PYFUSE3`` says which of the
patch's hooks this pyfuse3 has, found by probing for them, not by version;
``status(ops)`` is what ``kmsfs status`` shows of them.
"""

from __future__ import annotations

import os
import select
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from kmsfs.fs.inodes import EntryLock

YIELD_EVERY = 32  # requests served without a trip around trio's run loop, at most
SPIN_NS = 50_000  # how long the loop asks for the next request before it parks
SPIN_BACKOFF_MAX = 1024  # parks in a row without spinning after fruitless spins, at most
_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Lowlevel(types.ModuleType):
    """trio.lowlevel, but with a ``wait_readable`` that returns at once when it can."""

    def __init__(
        self,
        on_disconnect: Callable[[], None] | None = None,
        poll_first: bool = True,
        spin_ns: int = 0,
    ) -> None:
        super().__init__("kmsfs.fs.fuseloop.lowlevel")
        self._polls: dict[int, select.poll] = {}
        self._streak = 0
        self._on_disconnect = on_disconnect
        self._poll_first = poll_first
        self.spin_ns = spin_ns
        self._backoff = 1  # parks without spinning after the next fruitless spin
        self._skip = 0  # parks left to make without spinning

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        if (self._poll_first or self.spin_ns) and self._streak < YIELD_EVERY:
            ready = self._poll_briefly(poll)
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

    def _poll_briefly(self, poll: select.poll) -> list[tuple[int, int]]:
        """``poll(0)``, asked again for up to ``spin_ns`` while nothing is there (unless
        earlier spins that found nothing say to park at once)."""
        ready = poll.poll(0)
        if ready or not self.spin_ns:
            return ready
        if self._skip:
            self._skip -= 1
            return ready
        end = time.perf_counter_ns() + self.spin_ns
        while time.perf_counter_ns() < end:
            ready = poll.poll(0)
            if ready:
                self._backoff = 1
                return ready
        self._skip = self._backoff
        self._backoff = min(2 * self._backoff, SPIN_BACKOFF_MAX)
        return ready

    def queued(self) -> bool:
        """Whether a request waits unread in the fd this loop waits for (or the
        connection ended); True before the loop first waited, when the fd is unknown."""
        if not self._polls:
            return True
        return any(poll.poll(0) for poll in self._polls.values())

    def _gone(self) -> None:
        """The kernel ended the connection: call on_disconnect, once."""
        on_disconnect, self._on_disconnect = self._on_disconnect, None
        if on_disconnect is not None:
            on_disconnect()


class _Trio(types.ModuleType):
    """The trio module as pyfuse3 sees it after ``install()``; with *poll_first* False
    (the patched loop, which reads first itself) only the disconnect watch is added."""

    Lock: Any = EntryLock

    def __init__(
        self,
        on_disconnect: Callable[[], None] | None = None,
        poll_first: bool = True,
        spin_ns: int = 0,
    ) -> None:
        super().__init__("kmsfs.fs.fuseloop.trio")
        self.lowlevel = _Lowlevel(on_disconnect, poll_first, spin_ns)
        if not poll_first:
            self.Lock = trio.Lock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(
    on_disconnect: Callable[[], None] | None = None, poll_first: bool = True, spin_ns: int = 0
) -> None:
    """Make pyfuse3's loop use the adapter (call before ``pyfuse3.main``); it calls
    *on_disconnect*, once, when it sees that the kernel ended the connection.  With
    *poll_first* False it only watches for that (for the patched loop), and spins for
    *spin_ns* before it parks (either loop)."""
    pyfuse3.trio = _Trio(on_disconnect, poll_first, spin_ns)  # type: ignore[attr-defined]


def spin_ns_here() -> int:
    """``SPIN_NS`` where this process may run on more than one CPU, else 0 (spinning
    on the only CPU would keep the caller from sending its next request)."""
    return SPIN_NS if len(os.sched_getaffinity(0)) > 1 else 0


def uninstall() -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]


def request_queued() -> bool:
    """Whether a FUSE request waits unread in /dev/fuse (or the connection ended).
    True when the adapter is not installed or its loop has not waited for the fd yet:
    a caller that would make the loop wait must then assume that something waits."""
    lowlevel = getattr(getattr(pyfuse3, "trio", None), "lowlevel", None)
    if not isinstance(lowlevel, _Lowlevel):
        return True
    return lowlevel.queued()


@dataclass(frozen=True)
class Pyfuse3Hooks:
    """The hooks of kmsfs's pyfuse3 patch that a pyfuse3 has.

    Attributes: version (pyfuse3's own), read_before_wait
    (``Operations.enable_read_before_wait``), dont_mask (``Operations.enable_dont_mask``:
    FUSE_DONT_MASK), cache_dir (``FileInfo.cache_readdir``: FOPEN_CACHE_DIR from opendir).
    """

    version: str
    read_before_wait: bool
    dont_mask: bool
    cache_dir: bool

    @property
    def patched(self) -> bool:
        return self.read_before_wait or self.dont_mask or self.cache_dir


def probe() -> Pyfuse3Hooks:
    """The hooks this process's pyfuse3 has (attributes that only the patch adds)."""
    return Pyfuse3Hooks(
        version=getattr(pyfuse3, "__version__", "unknown"),
        read_before_wait=hasattr(pyfuse3.Operations, "enable_read_before_wait"),
        dont_mask=hasattr(pyfuse3.Operations, "enable_dont_mask"),
        cache_dir=hasattr(pyfuse3.FileInfo, "cache_readdir"),
    )


PYFUSE3 = probe()


def configure(ops: pyfuse3.Operations, on_disconnect: Callable[[], None] | None = None) -> str:
    """Before ``pyfuse3.main``: have the loop that serves *ops* take queued requests without
    a trip around trio's loop, and call *on_disconnect*, once, when it sees that the
    kernel ended the connection (either loop), spinning before it parks where
    ``spin_ns_here()`` says.  Returns how: "read_before_wait" (the patched pyfuse3's,
    set on *ops*; the adapter then only watches for the disconnect and spins, if
    either applies) or "adapter" (``install()``)."""
    spin_ns = spin_ns_here()
    if PYFUSE3.read_before_wait:
        ops.enable_read_before_wait = True
        if on_disconnect is not None or spin_ns:
            install(on_disconnect, poll_first=False, spin_ns=spin_ns)
        return "read_before_wait"
    install(on_disconnect, spin_ns=spin_ns)
    return "adapter"


def status(ops: Any) -> dict[str, Any]:
    """pyfuse3 as ``kmsfs status`` shows it: version, patched or not, the patch's hooks
    *ops* uses (``active``), those it has but does not use and why (``off``), and how
    its loop waits for /dev/fuse (``loop``)."""
    active: list[str] = []
    off: dict[str, str] = {}
    if getattr(ops, "enable_read_before_wait", False):
        active.append("read_before_wait")
    if PYFUSE3.dont_mask and getattr(ops, "enable_dont_mask", False):
        active.append("dont_mask")
    access = getattr(ops, "content_access", None)  # kmsfs/fs/content_access.py
    if access is not None and access.cache_listings:
        access_control = getattr(ops, "access_control", None)  # kmsfs/fs/access.py
        if getattr(access_control, "timeout", 0) > 0:
            active.append("cache_dir")
        else:
            off["cache_dir"] = "not where list decisions below differ by requester (access policy)"
    elif PYFUSE3.cache_dir and access is not None and access.shared:
        off["cache_dir"] = "shared mode"
    lowlevel = getattr(getattr(pyfuse3, "trio", None), "lowlevel", None)
    return {
        "spin_us": lowlevel.spin_ns // 1000 if isinstance(lowlevel, _Lowlevel) else 0,
        "version": PYFUSE3.version,
        "patched": PYFUSE3.patched,
        "active": active,
        "off": off,
        "loop": "read_before_wait" if "read_before_wait" in active else "adapter",
    }
