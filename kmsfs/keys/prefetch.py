"""A pool of fresh data keys made ahead of need, so creating a file skips the KMS round trip.

Background threads (at most ``workers`` calls in flight) keep up to
``target`` keys ready, each generated for its own random file ID and context (volume ID,
file ID).  ``take`` hands out each key exactly once and never waits: an empty
pool returns None and the caller generates the key itself, and doubles
``target`` (from ``INITIAL_TARGET`` up to ``size``: a volume that creates a
few files costs a few spare keys, a busy one gets a deep pool), so a failing
provider surfaces as that direct call's clean error.  While the provider
fails, the workers back off (jittered, doubling up to ``MAX_BACKOFF``
seconds).  Keys older than ``max_age`` are dropped instead of used.  Keys live
only in memory: ``close`` wipes every unused key and reports each one to
``on_discard``; nothing is ever persisted.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kmsfs.format.header import ID_SIZE, WrappedKey
from kmsfs.keys.provider import KeyContext, wipe

log = logging.getLogger("kmsfs.keys.prefetch")

DEFAULT_SIZE = 64
INITIAL_TARGET = 4
DEFAULT_WORKERS = 4
DEFAULT_MAX_AGE = 600.0
MAX_BACKOFF = 5.0

Generate = Callable[[KeyContext], tuple[bytearray, WrappedKey]]
Discard = Callable[[KeyContext], None]


@dataclass
class PooledKey:
    """A data key not yet given to any file.  Attributes: context (volume and
    file ID it is bound to), key (plaintext, owned by whoever takes it),
    wrapped (the header entry), made (time.monotonic() when generated)."""

    context: KeyContext
    key: bytearray
    wrapped: WrappedKey
    made: float


class KeyPool:
    """Fresh data keys for new files of one volume.  Thread-safe.

    Attributes: volume_id, size (most keys kept ready), target (keys kept ready
    now), workers, max_age, generated, taken, discarded, misses (counters),
    failures (consecutive generate failures).
    """

    def __init__(
        self,
        volume_id: bytes,
        generate: Generate,
        size: int = DEFAULT_SIZE,
        workers: int = DEFAULT_WORKERS,
        max_age: float = DEFAULT_MAX_AGE,
        on_discard: Discard | None = None,
    ) -> None:
        if size < 1 or workers < 1:
            raise ValueError("a key pool needs size >= 1 and workers >= 1")
        self.volume_id = volume_id
        self.size = size
        self.workers = workers
        self.max_age = max_age
        self.target = min(size, INITIAL_TARGET)
        self.generated = self.taken = self.discarded = self.misses = self.failures = 0
        self._generate = generate
        self._on_discard = on_discard
        self._ready: deque[PooledKey] = deque()
        self._in_flight = 0
        self._retry_at = 0.0
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._ready)

    def start(self) -> None:
        """Start the workers (once; later calls do nothing)."""
        with self._cond:
            if self._threads or self._closed:
                return
            for index in range(self.workers):
                thread = threading.Thread(
                    target=self._work, name=f"kmsfs-prefetch-{index}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def take(self) -> PooledKey | None:
        """A fresh key for one new file, or None at once if none is ready."""
        stale: list[PooledKey] = []
        pooled = None
        now = time.monotonic()
        with self._cond:
            while self._ready:
                candidate = self._ready.popleft()
                if now - candidate.made <= self.max_age:
                    pooled = candidate
                    self.taken += 1
                    break
                stale.append(candidate)
            if pooled is None and self._threads:
                self.misses += 1
                self.target = min(self.size, self.target * 2)
            self._cond.notify_all()
        self._drop(stale)
        return pooled

    def close(self, timeout: float = 15.0) -> None:
        """Stop the workers and wipe every unused key (reported to on_discard).

        Waits up to *timeout* seconds (more than one bounded provider call) for
        workers still inside a provider call, so that each key they get is
        wiped and reported before the process exits: every GenerateDataKey in
        CloudTrail then has its audit record.
        """
        with self._cond:
            self._closed = True
            unused = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        self._drop(unused)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.generated:
            log.info(
                "key pool closed: %d keys generated, %d used, %d discarded",
                self.generated,
                self.taken,
                self.discarded,
            )

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                    len(self._ready) + self._in_flight >= self.target
                    or time.monotonic() < self._retry_at
                ):
                    wait = self._retry_at - time.monotonic()
                    self._cond.wait(wait if wait > 0 else None)
                if self._closed:
                    return
                self._in_flight += 1
            context = KeyContext(self.volume_id, os.urandom(ID_SIZE))
            try:
                key, wrapped = self._generate(context)
            except Exception as exc:  # the provider's error; the direct call will report it
                with self._cond:
                    self._in_flight -= 1
                    self.failures += 1
                    backoff = min(MAX_BACKOFF, 0.1 * 2**self.failures)
                    self._retry_at = time.monotonic() + backoff * (0.5 + random.random() / 2)
                    first = self.failures == 1
                if first:
                    log.warning("key pool: generating a data key failed, backing off: %s", exc)
                continue
            pooled = PooledKey(context, key, wrapped, time.monotonic())
            with self._cond:
                self._in_flight -= 1
                self.generated += 1
                if self.failures:
                    log.info("key pool: generating data keys works again")
                self.failures = 0
                closed = self._closed
                if not closed:
                    self._ready.append(pooled)
            if closed:
                self._drop([pooled])
                return

    def _drop(self, keys: list[PooledKey]) -> None:
        for pooled in keys:
            wipe(pooled.key)
            with self._cond:
                self.discarded += 1
            if self._on_discard is not None:
                try:
                    self._on_discard(pooled.context)
                except Exception:  # reporting must not stop the wiping
                    log.exception("key pool: reporting a discarded key failed")
