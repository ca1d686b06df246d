"""The figures of a running mount, for ``kmsfs status`` and the metrics endpoint.

``ProviderStats`` is a key-event sink: it counts provider calls and errors per
operation and keeps the latencies of the last ``window`` calls for
percentiles.  Events arrive from worker threads (provider calls run there), so
it takes a lock.  ``snapshot`` reads the operations' counters; call it on the
trio loop thread, which owns them.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from kmsfs.format.volume_key import fingerprint, show_fingerprint
from kmsfs.fs import fuseloop
from kmsfs.keys.events import EventSink, KeyEvent

if TYPE_CHECKING:
    from kmsfs.fs.operations import KmsfsOperations

# Key events that are not calls to the provider.
NOT_PROVIDER_CALLS = frozenset({"cache-hit", "assign", "discard"})
PERCENTILES = (50, 90, 99)
STATUS_VERSION = 1


class ProviderStats:
    """Counts of provider calls.  Attributes: calls and errors ({operation: n}),
    latencies (a deque of the last *window* call latencies, in ms)."""

    def __init__(self, window: int = 4096) -> None:
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.latencies: deque[float] = deque(maxlen=window)
        self.latency_total_ms = 0.0
        self._lock = threading.Lock()

    def record(self, event: KeyEvent) -> None:
        if event.operation in NOT_PROVIDER_CALLS:
            return
        with self._lock:
            self.calls[event.operation] = self.calls.get(event.operation, 0) + 1
            if event.result != "ok":
                self.errors[event.operation] = self.errors.get(event.operation, 0) + 1
            self.latencies.append(event.latency_ms)
            self.latency_total_ms += event.latency_ms

    def chain(self, downstream: EventSink | None) -> EventSink:
        """A sink that records *event* here, then passes it on to *downstream*."""

        def sink(event: KeyEvent) -> None:
            self.record(event)
            if downstream is not None:
                downstream(event)

        return sink

    def summary(self) -> dict[str, Any]:
        with self._lock:
            calls = dict(self.calls)
            errors = dict(self.errors)
            latencies = sorted(self.latencies)
            total_ms = self.latency_total_ms
        return {
            "count": sum(calls.values()),
            "errors": sum(errors.values()),
            "by_operation": {
                op: {"count": n, "errors": errors.get(op, 0)} for op, n in sorted(calls.items())
            },
            "latency_ms": {
                **{f"p{p}": percentile(latencies, p) for p in PERCENTILES},
                "max": latencies[-1] if latencies else None,
                "window": len(latencies),
            },
            "latency_total_ms": round(total_ms, 3),
        }


def percentile(ordered: list[float], pct: float) -> float | None:
    """The *pct*-th percentile of the sorted list *ordered* (nearest rank), or None if empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def open_files(ops: KmsfsOperations) -> int | None:
    """Open file handles of the mount (None if the inode table cannot say)."""
    entries = getattr(ops.inodes, "_entries", None)
    if not isinstance(entries, dict):
        return None
    return sum(getattr(entry, "opens", 0) for entry in list(entries.values()))


def _fingerprint(ops: KmsfsOperations) -> str | None:
    """The served volume key's fingerprint (None for a format-1 volume not migrated)."""
    key = ops.keyring.volume_key
    return None if key is None else show_fingerprint(fingerprint(key, ops.config.volume_id))


def snapshot(
    ops: KmsfsOperations,
    provider_stats: ProviderStats,
    mountpoint: str,
    started: float,
    started_monotonic: float,
) -> dict[str, Any]:
    """Everything ``kmsfs status`` shows, as JSON-ready values (no key material)."""
    keyring = ops.keyring
    cache = keyring.cache
    return {
        "status_version": STATUS_VERSION,
        "mountpoint": mountpoint,
        "backing": ops.backing,
        "volume_id": ops.config.volume_id.hex(),
        "block_size": ops.config.block_size,
        "config_format": ops.config.version,
        "names": "encrypted" if ops.config.encrypted_names else "plain",
        "config_generation": ops.config.generation,
        "volume_key_fingerprint": _fingerprint(ops),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "uptime_seconds": round(time.monotonic() - started_monotonic, 3),
        "providers": [
            {"provider": p.name, "key_ref": p.key_ref, "description": p.describe()}
            for p in keyring.providers
        ],
        "key_cache": {
            "size": len(cache),
            "max_entries": cache.max_entries,
            "max_age_seconds": cache.max_age,
            "hits": cache.stats.hits,
            "misses": cache.stats.misses,
            "evictions": cache.stats.evictions,
        },
        "provider_calls": provider_stats.summary(),
        "open_files": open_files(ops),
        "inodes": len(ops.inodes),
        "bytes_read": ops.bytes_read,
        "bytes_written": ops.bytes_written,
        "errors": ops.errors,
        "requests": ops.requests.summary(),
        # FSYNC and FSYNCDIR: backing syncs run on the loop thread, and in worker threads
        "syncs": {"inline": ops.syncs.inline, "in_thread": ops.syncs.offloaded},
        "policy": ops.access_control.policy.describe(),
        # shared mode: requests waiting for other daemons' locks, and how waits ended
        **({"lock_waits": ops.lock_waits.summary()} if ops.content_access.shared else {}),
        "pyfuse3": fuseloop.status(ops),
        # whether new files' headers fit in the backing inodes (kmsfs/backing/inode_room.py)
        "header_room": ops.contents.header_room.summary(),
    }
