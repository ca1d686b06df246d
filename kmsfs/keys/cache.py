"""A bounded, thread-safe cache of unwrapped file keys, keyed by the wrapped key.

Entries expire after ``max_age`` seconds and the least recently used entry is
evicted beyond ``max_entries``.  Evicted keys are overwritten with zeros (the
cached bytearray; copies inside OpenSSL contexts of open files are freed with
them).  Keys live only in memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from kmsfs.keys.provider import wipe

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_AGE = 3600.0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class KeyCache:
    """Maps wrapped-key bytes to the unwrapped key (a bytearray the cache owns)."""

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_age: float = DEFAULT_MAX_AGE
    ) -> None:
        if max_entries < 0 or max_age < 0:
            raise ValueError("cache limits must not be negative")
        self.max_entries = max_entries
        self.max_age = max_age
        self.stats = CacheStats()
        self._entries: OrderedDict[bytes, tuple[float, bytearray]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, wrapped: bytes) -> bytes | None:
        """A copy of the cached key for *wrapped*, or None (counted as a miss)."""
        now = time.monotonic()
        with self._lock:
            item = self._entries.get(wrapped)
            if item is None or now - item[0] > self.max_age:
                if item is not None:
                    self._drop(wrapped)
                self.stats.misses += 1
                return None
            self._entries.move_to_end(wrapped)
            self.stats.hits += 1
            return bytes(item[1])

    def put(self, wrapped: bytes, key: bytes | bytearray) -> None:
        """Cache a copy of *key*; evict the oldest entries beyond the limits."""
        if self.max_entries == 0 or self.max_age == 0:
            return
        with self._lock:
            if wrapped in self._entries:
                self._drop(wrapped)
            self._entries[wrapped] = (time.monotonic(), bytearray(key))
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def expire(self) -> None:
        """Drop every entry older than max_age."""
        now = time.monotonic()
        with self._lock:
            for wrapped in [w for w, (t, _) in self._entries.items() if now - t > self.max_age]:
                self._drop(wrapped)

    def clear(self) -> None:
        with self._lock:
            for wrapped in list(self._entries):
                self._drop(wrapped)

    def _drop(self, wrapped: bytes) -> None:
        _, key = self._entries.pop(wrapped)
        wipe(key)
        self.stats.evictions += 1
