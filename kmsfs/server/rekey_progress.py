"""The pace and the figures of an online rekey job: rate limits, rate, ETA, counters.

Trio-only (no I/O): used on the loop by ``kmsfs.server.rekey_job``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from kmsfs.lifecycle.selection import Selection, iso_time

RATE_WINDOW = 10.0  # seconds of progress the shown rate is measured over
MAX_LISTED = 20  # files named in the status per kind (skipped, failed)


class RateLimit:
    """At most *rate* units a second over the long run (None: no limit): a token bucket
    holding at most *burst* seconds' worth.

    ``take(n)`` returns at once or sleeps until the units taken so far fit the rate:
    each call is scheduled *n / rate* seconds after the previous one.  Time spent on
    other work (fsyncs, the switch, small files) is saved up for at most *burst*
    seconds, so the rate over a job stays close to the limit; a long pause is not
    saved up beyond that.  The bucket starts empty, so
    no interval of a job takes more than *rate* units a second on average.
    """

    def __init__(self, rate: float | None, burst: float = 1.0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = rate
        self.burst = burst
        self._next: float | None = None  # when what was taken is paid for; None: empty

    async def take(self, amount: float) -> None:
        if self.rate is None:
            return
        now = trio.current_time()
        start = now if self._next is None else max(self._next, now - self.burst)
        self._next = start + amount / self.rate
        if self._next > now:
            await trio.sleep(self._next - now)


@dataclass
class Counters:
    """What a job has done.  Attributes: files_done, bytes_done (the files re-keyed and
    their plaintext bytes: kept across a resume), files_skipped (hard-linked, changed
    meanwhile), files_failed, files_not_due (met but not selected after all: master key,
    sealed count), and the last few skipped and failed files with the reason."""

    files_done: int = 0
    bytes_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_not_due: int = 0
    skipped: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_LISTED))
    failed: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_LISTED))

    @property
    def files_met(self) -> int:
        return self.files_done + self.files_skipped + self.files_failed + self.files_not_due


@dataclass
class JobSettings:
    """What a job was asked to do.  Attributes: selection, cutoff (the birth time before
    which a file is due), max_mbps (plaintext MB/s, or None), max_files_per_second (or
    None), started (when, ISO 8601 UTC)."""

    selection: Selection
    cutoff: float
    max_mbps: float | None = None
    max_files_per_second: float | None = None
    started: str = field(default_factory=iso_time)

    def to_json(self) -> dict[str, Any]:
        return {
            "selection": self.selection.to_json(),
            "cutoff": self.cutoff,
            "max_mbps": self.max_mbps,
            "max_files_per_second": self.max_files_per_second,
            "started": self.started,
        }


class Pace:
    """The measured rate of a job over the last RATE_WINDOW seconds, and its ETA."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self, bytes_done: int, files_met: int) -> None:
        now = time.monotonic()
        self._samples.append((now, bytes_done, files_met))
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW:
            self._samples.popleft()

    def rates(self) -> tuple[float | None, float | None]:
        """(bytes a second, files a second) over the window, None before two samples."""
        if len(self._samples) < 2:
            return None, None
        (t0, b0, f0), (t1, b1, f1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0:
            return None, None
        return (b1 - b0) / (t1 - t0), (f1 - f0) / (t1 - t0)

    def eta(self, bytes_left: int, files_left: int) -> float | None:
        """Seconds to go at the measured rates (the slower estimate), None if unknown."""
        byte_rate, file_rate = self.rates()
        guesses = []
        if byte_rate and bytes_left > 0:
            guesses.append(bytes_left / byte_rate)
        if file_rate and files_left > 0:
            guesses.append(files_left / file_rate)
        if not guesses:
            return 0.0 if bytes_left <= 0 and files_left <= 0 else None
        return max(guesses)


def format_rekey(info: dict[str, Any] | None) -> list[str]:
    """The lines of ``kmsfs status`` (and of ``kmsfs rekey --status``) for a rekey."""
    if not info:
        return []
    job = info.get("job")
    lines = []
    if job:
        total = job["files_total"]
        shown_total = "?" if total is None else total
        lines.append(
            f"rekey:          {job['state']}: {job['files_done']} of {shown_total} files"
            f" ({_mb(job['bytes_done'])} of {_mb(job['bytes_total'])}),"
            f" {job['files_skipped']} skipped, {job['files_failed']} failed,"
            f" {job['files_not_due']} not due; {job['selection']}"
        )
        rate = job["rate_bytes_per_second"]
        files_rate = job["rate_files_per_second"]
        eta = job["eta_seconds"]
        limits = [
            f"{job['max_mbps']:g} MB/s" if job["max_mbps"] else "",
            f"{job['max_files_per_second']:g} files/s" if job["max_files_per_second"] else "",
        ]
        limit = ", ".join(x for x in limits if x) or "no limit"
        lines.append(
            f"  rate {'-' if rate is None else _mb(rate) + '/s'}"
            f" ({'-' if files_rate is None else format(files_rate, '.1f')}"
            f" files/s; {limit}), ETA {'-' if eta is None else f'{eta:.0f} s'},"
            f" started {job['started']}"
        )
        if job.get("current"):
            lines.append(f"  now:          {job['current']}")
        for what in ("skipped", "failed"):
            for line in job.get(f"{what}_files", []):
                lines.append(f"  {what}: {line}")
    auto = info.get("auto_rekey")
    if auto:
        lines.append(
            f"auto rekey:     on; {auto['queued']} queued, {auto['done']} re-keyed,"
            f" {auto['failed']} failed"
        )
    return lines


def _mb(value: float) -> str:
    """Bytes as MB, or GB from 1 GB on (decimal units, as the rate limit's)."""
    return f"{value / 1e9:.1f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"
