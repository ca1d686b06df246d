"""Count the FUSE requests the kernel sends to one mount, whatever daemon serves it.

Uses the kernel's ``fuse:fuse_request_send`` and ``fuse:fuse_request_end``
tracepoints (Linux 6.16 and later) in a tracing instance of its own (so it
does not disturb other tracing), filtered on the mount's connection (the
minor number of its st_dev).  The same count for kmsfs, gocryptfs, securefs
and the floor: nothing in the daemon has to cooperate.  Per opcode it gives
the number of requests, how many were answered with an error, the bytes of
the replies (READ sizes) and the kernel-side latency (send to end, which
includes the time the request waits in the queue).

Needs root and tracefs (mounted at /sys/kernel/tracing if it is not).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("fuse_request_send", "fuse_request_end")
_SEND = re.compile(
    rb"\s(\d+\.\d+): fuse_request_send: connection (\d+) req (\d+) opcode \d+ \((\w+)\) len (\d+)"
)
_END = re.compile(
    rb"\s(\d+\.\d+): fuse_request_end: connection (\d+) req (\d+) len (\d+) error (-?\d+)"
)


def available() -> str | None:
    """None if the tracepoints can be used, else why not."""
    if not (TRACEFS / "events").exists():
        subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, check=False
        )
    if not (TRACEFS / "events" / "fuse" / "fuse_request_send").exists():
        return "no fuse:fuse_request_send tracepoint (Linux 6.16+ with tracefs)"
    return None


@dataclass
class OpStats:
    """Requests of one opcode: count, errors (answered with an error), reply bytes,
    kernel-side latency (total and max, seconds)."""

    count: int = 0
    errors: int = 0
    reply_bytes: int = 0
    latency_total: float = 0.0
    latency_max: float = 0.0


@dataclass
class Trace:
    """What one traced period saw: {opcode name without FUSE_: OpStats}, and events lost
    (the per-CPU buffer overflowed: then counts are low)."""

    ops: dict[str, OpStats] = field(default_factory=dict)
    lost: int = 0

    @property
    def total(self) -> int:
        return sum(s.count for s in self.ops.values())


class FuseTracer:
    """Record the requests of the mount at *mountpoint* between ``start`` and ``stop``."""

    def __init__(self, mountpoint: Path, out: Path, buffer_kb: int = 65536) -> None:
        self.connection = os.minor(os.stat(mountpoint).st_dev)
        self.out = out
        self.buffer_kb = buffer_kb
        self.instance = TRACEFS / "instances" / f"kmsfs-budget-{os.getpid()}"
        self._reader: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.instance.mkdir(exist_ok=True)
        (self.instance / "buffer_size_kb").write_text(f"{self.buffer_kb}\n")
        (self.instance / "trace").write_text("")
        for event in EVENTS:
            base = self.instance / "events" / "fuse" / event
            (base / "filter").write_text(f"connection == {self.connection}\n")
            (base / "enable").write_text("1\n")
        with open(self.out, "wb") as sink:
            self._reader = subprocess.Popen(
                ["cat", str(self.instance / "trace_pipe")], stdout=sink, stdin=subprocess.DEVNULL
            )

    def stop(self) -> Trace:
        for event in EVENTS:
            (self.instance / "events" / "fuse" / event / "enable").write_text("0\n")
        time.sleep(0.5)  # let the reader drain the buffer
        lost = 0
        for line in (self.instance / "per_cpu").glob("cpu*/stats"):
            for stat_line in line.read_text().splitlines():
                if stat_line.startswith("overrun:"):
                    lost += int(stat_line.split()[1])
        self.close()
        trace = parse(self.out.read_bytes())
        trace.lost = lost
        return trace

    def close(self) -> None:
        """Stop the reader and remove the tracing instance (never raises)."""
        if self._reader is not None:
            self._reader.terminate()
            self._reader.wait()
            self._reader = None
        try:
            for event in EVENTS:
                (self.instance / "events" / "fuse" / event / "enable").write_text("0\n")
            self.instance.rmdir()
        except OSError:
            pass


def parse(text: bytes) -> Trace:
    """Per-opcode figures of a trace_pipe text."""
    trace = Trace()
    pending: dict[bytes, tuple[OpStats, float]] = {}
    for line in text.splitlines():
        match = _SEND.search(line)
        if match:
            stamp, _, unique, opcode, _ = match.groups()
            name = opcode.decode().removeprefix("FUSE_")
            stats = trace.ops.setdefault(name, OpStats())
            stats.count += 1
            pending[unique] = (stats, float(stamp))
            continue
        match = _END.search(line)
        if match:
            stamp, _, unique, length, error = match.groups()
            sent = pending.pop(unique, None)
            if sent is None:
                continue
            stats, start = sent
            if int(error):
                stats.errors += 1
            stats.reply_bytes += max(int(length) - 16, 0)  # minus fuse_out_header
            latency = float(stamp) - start
            stats.latency_total += latency
            stats.latency_max = max(stats.latency_max, latency)
    return trace
