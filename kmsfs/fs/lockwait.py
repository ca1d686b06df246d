"""Waiting for what another daemon holds (shared mode) without ever wedging the mount.

Another daemon's byte-range lock may be held for a millisecond (one request of a
live daemon) or forever (a dead NFS client, a hostile local process).  A blocking
``F_OFD_SETLKW`` in a worker thread can be neither timed out nor cancelled, and each
such wait used to hold one of pyfuse3's request tasks: enough readers of one locked
file held them all, and every other request of the mount hung.  So
(docs/DESIGN.md, "Shared storage"):

- every attempt is non-blocking (kmsfs/backing/shared.py raises LockBusy before doing
  anything); a refused request sleeps on the event loop and tries again after
  1 ms, then twice as long each time up to 50 ms.  The sleep is cancellable and
  has a deadline; no thread and no inode lock is held meanwhile.  Requests that
  wait for the same bytes of a file take turns: one tries, the others wait for
  its try and try only once it succeeded;
- at most ``limit`` requests wait at once (half of the daemon's request tasks,
  ``REQUEST_TASKS``); one more is answered at once, so the other tasks keep
  serving other files and metadata;
- after ``timeout`` seconds (``-o shared_lock_timeout``) the request gives up.
  For as long again, a request that needs an overlapping range of the same file
  and finds it still held gives up at once: the kernel retries a failed
  readahead page by page, each page under its page lock, and every reader of the
  page would otherwise wait the whole deadline again, one after the other;
- a request whose caller is interrupted gives up.  pyfuse3 3.5 never tells a
  handler about FUSE_INTERRUPT: libfuse 3.14 marks the request interrupted, but
  pyfuse3 registers no interrupt callback and exposes no ``fuse_req_interrupted``.
  So the caller's pending signals are read from ``/proc/PID/status`` at every
  retry: a signal pending on its thread and not blocked (the kernel sent the
  INTERRUPT then), or SIGKILL.  pyfuse3 gives read and write handlers no caller,
  so those wait until the deadline;
- ``close()`` (SIGTERM, unmount) ends every wait at once and refuses new ones.

Everything here runs on the trio loop thread.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from kmsfs.backing.shared import DEFAULT_LOCK_TIMEOUT, LockBusy
from kmsfs.errors import KmsfsError
from kmsfs.fs.served import REQUEST_TASKS

T = TypeVar("T")

FIRST_DELAY = 0.001  # seconds before the first retry; doubled up to MAX_DELAY
MAX_DELAY = 0.05
MAX_LOCK_WAITERS = REQUEST_TASKS // 2  # the other half keeps serving other requests
STUCK_ENTRIES = 1024  # files remembered as stuck (a timed-out wait), at most
_SIGKILL = 1 << (signal.SIGKILL - 1)


class LockWaitFailed(KmsfsError):
    """A request gave up waiting for what another daemon holds: too many requests
    were waiting already, or the daemon is stopping (the operations layer answers
    EIO and logs the message, which names the backing file and the lock)."""


class LockWaitTimeout(LockWaitFailed):
    """A request waited ``timeout`` seconds for another daemon's lock and gave up (or
    gave up at once: an overlapping wait on the same file timed out just before)."""


class LockWaitInterrupted(KmsfsError):
    """The caller of a waiting request was interrupted (a signal pending) or killed:
    nobody waits for the answer any more (the operations layer answers EINTR)."""


@dataclass
class _Stuck:
    """A timed-out wait: which backing bytes (end None: to the end), and until when
    overlapping waits on the same file give up at once."""

    until: float
    start: int
    end: int | None

    def overlaps(self, busy: LockBusy) -> bool:
        return (busy.end is None or busy.end > self.start) and (
            self.end is None or busy.start < self.end
        )


@dataclass
class _Turn:
    """One try for the bytes some requests wait for: one of them sleeps and tries, the
    others wait for its try (``done``) and try themselves only if it got them
    (``free``), so that a hundred readers of one locked file cost one try per retry,
    not a hundred (each an open, fstat and fcntl: RPCs on a network filesystem)."""

    done: trio.Event = field(default_factory=trio.Event)
    free: bool = False


class LockWaits:
    """The requests of one mount that wait for other daemons.

    Attributes: timeout (seconds a request waits at most), limit (requests waiting
    at once, at most), waiting (requests waiting now), closed (``close()`` was
    called), and the counts timed_out, refused (over the limit), interrupted (the
    caller had a signal) and abandoned (the daemon was stopping).
    """

    def __init__(
        self, timeout: float = DEFAULT_LOCK_TIMEOUT, limit: int = MAX_LOCK_WAITERS
    ) -> None:
        self.timeout = timeout
        self.limit = limit
        self.waiting = 0
        self.timed_out = 0
        self.refused = 0
        self.interrupted = 0
        self.abandoned = 0
        self.closed = False
        self._scopes: set[trio.CancelScope] = set()
        self._stuck: dict[Hashable, _Stuck] = {}
        self._turns: dict[Hashable, _Turn] = {}

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        busy: LockBusy | None = None,
        caller: int = 0,
        key: Hashable | None = None,
        give_up_after: float | None = None,
    ) -> T:
        """``await attempt()`` until it does not raise LockBusy (first at once, unless
        *busy* says a first attempt was just refused), then its result.

        *caller*: the pid of the process whose request this is (0: unknown), checked
        for a pending signal at every retry.  *key*: the file (a request that finds
        bytes of it still held that an earlier wait on *key* timed out on gives up at
        once).  *give_up_after*: seconds, instead of ``self.timeout``.

        Raises what *attempt* raises; LockWaitTimeout after the deadline;
        LockWaitFailed if ``limit`` requests wait already or the daemon is stopping;
        LockWaitInterrupted if the caller has a signal pending.  Cancellation (of an
        enclosing scope) propagates.
        """
        if busy is None:
            try:
                return await attempt()
            except LockBusy as exc:
                busy = exc
        timeout = self.timeout if give_up_after is None else give_up_after
        now = trio.current_time()
        self._refuse_at_once(busy, key, now)
        self.waiting += 1
        scope = trio.CancelScope(deadline=now + timeout)
        self._scopes.add(scope)
        delay = FIRST_DELAY
        try:
            with scope:
                while True:
                    turn_key = (key, busy.path, busy.needed)
                    turn = self._turns.get(turn_key)
                    if turn is not None:  # another request tries for these bytes: wait for it
                        await turn.done.wait()
                        self._check_caller(caller, busy)
                        if not turn.free:
                            continue
                        try:
                            return await attempt()
                        except LockBusy as exc:
                            busy = exc
                        continue
                    turn = self._turns[turn_key] = _Turn()  # this request tries for all
                    try:
                        await trio.sleep(delay)
                        self._check_caller(caller, busy)
                        result = await attempt()
                        turn.free = True
                        return result
                    except LockBusy as exc:
                        busy = exc
                    finally:
                        if self._turns.get(turn_key) is turn:
                            del self._turns[turn_key]
                        turn.done.set()
                    delay = min(delay * 2, MAX_DELAY)
        finally:
            self.waiting -= 1
            self._scopes.discard(scope)
        if self.closed:
            self.abandoned += 1
            raise LockWaitFailed(
                f"gave up waiting for {busy.needed}: the daemon is stopping", where=busy.path
            )
        self.timed_out += 1
        if key is not None:
            self._remember_stuck(key, busy, trio.current_time() + timeout)
        raise LockWaitTimeout(
            f"gave up after {timeout:g} s waiting for {busy.needed} (another daemon holds"
            " a conflicting lock; shared_lock_timeout)",
            where=busy.path,
        )

    async def call(
        self,
        func: Callable[..., T],
        *args: Any,
        busy: LockBusy | None = None,
        caller: int = 0,
        key: Hashable | None = None,
        give_up_after: float | None = None,
    ) -> T:
        """``run`` with the attempt ``func(*args)``, called on the loop."""

        async def attempt() -> T:
            return func(*args)

        return await self.run(
            attempt, busy=busy, caller=caller, key=key, give_up_after=give_up_after
        )

    def _check_caller(self, caller: int, busy: LockBusy) -> None:
        """LockWaitInterrupted if *caller* (a pid; 0: unknown) has a signal pending."""
        if caller and caller_interrupted(caller):
            self.interrupted += 1
            raise LockWaitInterrupted(
                f"gave up waiting for {busy.needed}: its caller (pid {caller}) was interrupted",
                where=busy.path,
            )

    def _refuse_at_once(self, busy: LockBusy, key: Hashable | None, now: float) -> None:
        """Raise if the request must not wait: the daemon is stopping, a wait for these
        bytes of *key* timed out just before, or ``limit`` requests wait already."""
        if self.closed:
            self.abandoned += 1
            raise LockWaitFailed(
                f"not waiting for {busy.needed}: the daemon is stopping", where=busy.path
            )
        stuck = self._stuck.get(key) if key is not None else None
        if stuck is not None and stuck.until > now and stuck.overlaps(busy):
            self.timed_out += 1
            raise LockWaitTimeout(
                f"gave up at once waiting for {busy.needed}: another daemon still holds"
                f" the conflicting lock that a request waited {self.timeout:g} s for"
                " (shared_lock_timeout)",
                where=busy.path,
            )
        if self.waiting >= self.limit:
            self.refused += 1
            raise LockWaitFailed(
                f"gave up at once waiting for {busy.needed} (another daemon holds a"
                f" conflicting lock): {self.limit} requests wait for other daemons already,"
                " the most that may",
                where=busy.path,
            )

    def _remember_stuck(self, key: Hashable, busy: LockBusy, until: float) -> None:
        if key not in self._stuck and len(self._stuck) >= STUCK_ENTRIES:
            now = trio.current_time()
            self._stuck = {k: v for k, v in self._stuck.items() if v.until > now}
            if len(self._stuck) >= STUCK_ENTRIES:
                del self._stuck[next(iter(self._stuck))]  # the oldest
        self._stuck[key] = _Stuck(until, busy.start, busy.end)

    def close(self) -> None:
        """End every wait now (each request gives up: LockWaitFailed) and refuse new
        ones: the daemon is stopping (SIGTERM, unmount)."""
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()

    def summary(self) -> dict[str, Any]:
        """The figures ``kmsfs status`` shows."""
        return {
            "waiting": self.waiting,
            "limit": self.limit,
            "timeout_seconds": self.timeout,
            "timed_out": self.timed_out,
            "refused": self.refused,
            "interrupted": self.interrupted,
            "abandoned": self.abandoned,
        }


def caller_interrupted(pid: int) -> bool:
    """True if thread *pid* (a FUSE request's caller, in the daemon's pid namespace) has
    a signal pending that interrupts it: SIGKILL, a signal pending on the thread and
    not blocked, or one pending on its process if it has no other thread to take it.
    That is when the kernel sends FUSE_INTERRUPT, which pyfuse3 does not pass on.
    False if it cannot be told (no such process: another /proc, say)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            text = handle.read()
    except OSError:
        return False
    fields: dict[bytes, bytes] = {}
    for line in text.splitlines():
        name, _, value = line.partition(b":")
        fields[name] = value.strip()
    try:
        own = int(fields[b"SigPnd"], 16)
        process = int(fields[b"ShdPnd"], 16)
        blocked = int(fields[b"SigBlk"], 16)
        threads = int(fields[b"Threads"])
    except (KeyError, ValueError):
        return False
    if (own | process) & _SIGKILL:
        return True
    return bool((own | (process if threads == 1 else 0)) & ~blocked)
