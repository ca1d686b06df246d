"""A bounded, thread-safe cache of unwrapped file keys, keyed by context and wrapped key.

The key of an entry is the whole question a provider answered: the context
(volume ID, file ID, purpose) *and* the wrapped key (provider, master key,
blob).  A header whose file ID was edited but whose wrapped key was copied
from another file therefore misses the cache and goes to the provider, which
refuses the blob for that context, exactly as with a cold cache.

Entries expire after ``max_age`` seconds and the least recently used entry is
evicted beyond ``max_entries``.  Evicted keys are overwritten with zeros (the
cached bytearray; copies inside OpenSSL contexts of open files are freed with
them).  ``get`` hands out a bytearray copy the caller wipes.  Keys live only
in memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from kmsfs.format.header import WrappedKey
from kmsfs.keys.provider import KeyContext, wipe

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_AGE = 3600.0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


CacheKey = tuple[KeyContext, WrappedKey]


class KeyCache:
    """Maps (context, wrapped key) to the unwrapped key (a bytearray the cache owns)."""

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_age: float = DEFAULT_MAX_AGE
    ) -> None:
        if max_entries < 0 or max_age < 0:
            raise ValueError("cache limits must not be negative")
        self.max_entries = max_entries
        self.max_age = max_age
        self.stats = CacheStats()
        self._entries: OrderedDict[CacheKey, tuple[float, bytearray]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, context: KeyContext, wrapped: WrappedKey) -> bytearray | None:
        """A copy (the caller's to wipe) of the key *wrapped* unwraps to for *context*,
        or None (counted as a miss)."""
        entry = (context, wrapped)
        now = time.monotonic()
        with self._lock:
            item = self._entries.get(entry)
            if item is None or now - item[0] > self.max_age:
                if item is not None:
                    self._drop(entry)
                self.stats.misses += 1
                return None
            self._entries.move_to_end(entry)
            self.stats.hits += 1
            return bytearray(item[1])

    def put(self, context: KeyContext, wrapped: WrappedKey, key: bytes | bytearray) -> None:
        """Cache a copy of *key*, which a provider unwrapped from *wrapped* for *context*
        (or generated and wrapped so); evict the oldest entries beyond the limits."""
        if self.max_entries == 0 or self.max_age == 0:
            return  # a zero limit from the command line: nothing is kept
        entry = (context, wrapped)
        with self._lock:
            if entry in self._entries:
                self._drop(entry)
            self._entries[entry] = (time.monotonic(), bytearray(key))
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def expire(self) -> None:
        """Drop every entry older than max_age."""
        now = time.monotonic()
        with self._lock:
            for entry in [e for e, (t, _) in self._entries.items() if now - t > self.max_age]:
                self._drop(entry)

    def clear(self) -> None:
        with self._lock:
            for entry in list(self._entries):
                self._drop(entry)

    def _drop(self, entry: CacheKey) -> None:
        _, key = self._entries.pop(entry)
        wipe(key)
        self.stats.evictions += 1


class NullCache(KeyCache):
    """A cache that keeps nothing: every ``get`` is a miss (offline tools, ``--cache-max-entries
    0``).  Unwrapped keys then live only as long as the caller holds them."""

    def __init__(self) -> None:
        super().__init__(0, 0)

    def get(self, context: KeyContext, wrapped: WrappedKey) -> bytearray | None:
        self.stats.misses += 1
        return None

    def put(self, context: KeyContext, wrapped: WrappedKey, key: bytes | bytearray) -> None:
        return None
