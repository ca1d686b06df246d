"""Counts of the FUSE requests a mount answers: per opcode, how many, how many
failed, and how long the handler took (total, maximum, and a histogram).

Cheap enough to stay on: every handler runs on the one trio thread, so the
counters are plain integers with no lock, and recording one request is two
clock reads and a few additions (about 0.3 µs, against the 30-100 µs a request
costs in pyfuse3 and trio).  The time is the handler's (from the call to the
answer, including any wait for a worker thread or a lock), not the kernel's
round trip; requests the kernel answers itself (cached attributes and entries,
ACLs, negative lookups) never reach the daemon and are not counted.

Read the figures (``summary``) on the loop thread.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Upper bounds of the histogram buckets, in nanoseconds (the last bucket is +Inf).
BUCKET_BOUNDS_NS = (
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
)

# FUSE opcode of each pyfuse3 handler (pyfuse3 always answers READDIRPLUS,
# and FORGET and BATCH_FORGET both reach ``forget``).
OPCODES = {
    "lookup": "LOOKUP",
    "forget": "FORGET",
    "getattr": "GETATTR",
    "setattr": "SETATTR",
    "readlink": "READLINK",
    "mknod": "MKNOD",
    "mkdir": "MKDIR",
    "symlink": "SYMLINK",
    "unlink": "UNLINK",
    "rmdir": "RMDIR",
    "rename": "RENAME",
    "link": "LINK",
    "opendir": "OPENDIR",
    "readdir": "READDIRPLUS",
    "releasedir": "RELEASEDIR",
    "fsyncdir": "FSYNCDIR",
    "statfs": "STATFS",
    "create": "CREATE",
    "open": "OPEN",
    "read": "READ",
    "write": "WRITE",
    "flush": "FLUSH",
    "release": "RELEASE",
    "fsync": "FSYNC",
    "setxattr": "SETXATTR",
    "getxattr": "GETXATTR",
    "listxattr": "LISTXATTR",
    "removexattr": "REMOVEXATTR",
}


class OpCounter:
    """One opcode's figures.  Attributes: count, errors (answered with an errno),
    total_ns, max_ns, buckets (requests per histogram bucket, not cumulative)."""

    __slots__ = ("buckets", "count", "errors", "max_ns", "total_ns")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total_ns = 0
        self.max_ns = 0
        self.buckets = [0] * (len(BUCKET_BOUNDS_NS) + 1)

    def add(self, elapsed_ns: int) -> None:
        self.count += 1
        self.total_ns += elapsed_ns
        if elapsed_ns > self.max_ns:
            self.max_ns = elapsed_ns
        self.buckets[bisect_left(BUCKET_BOUNDS_NS, elapsed_ns)] += 1


class RequestStats:
    """An OpCounter per opcode (``by_opcode``), all created up front, and in_flight:
    the requests whose handler has started and not yet answered."""

    def __init__(self) -> None:
        self.by_opcode = {opcode: OpCounter() for opcode in OPCODES.values()}
        self.in_flight = 0

    def counter(self, handler: str) -> OpCounter:
        """The counter of pyfuse3 handler *handler* (KeyError for an unknown one)."""
        return self.by_opcode[OPCODES[handler]]

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of the opcodes that were seen: count, errors, total and
        max ms, and the histogram as cumulative counts per upper bound in seconds."""
        by_opcode: dict[str, Any] = {}
        for opcode, counter in sorted(self.by_opcode.items()):
            if not counter.count:
                continue
            cumulative, buckets = 0, {}
            for bound, n in zip((*BUCKET_BOUNDS_NS, None), counter.buckets, strict=True):
                cumulative += n
                buckets["+Inf" if bound is None else f"{bound / 1e9:g}"] = cumulative
            by_opcode[opcode] = {
                "count": counter.count,
                "errors": counter.errors,
                "time_total_ms": round(counter.total_ns / 1e6, 3),
                "time_max_ms": round(counter.max_ns / 1e6, 3),
                "buckets": buckets,
            }
        return {
            "count": sum(c.count for c in self.by_opcode.values()),
            "errors": sum(c.errors for c in self.by_opcode.values()),
            "by_opcode": by_opcode,
        }
