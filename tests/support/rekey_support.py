"""For the online rekey tests: the job's state as the daemon reports it (``rekey_status``,
``wait_job``), and a concurrent workload on a mount, each worker with an in-memory model
of its file: writers, appenders, truncators, readers holding a handle open, an mmap
writer and a renamer, all until told to stop.

Each worker owns one file (no two workers share one), so its model is exact: after
``stop()`` every file must read back as its model, through the mount and after a
remount.  A worker that sees an error or a byte that differs from its model records it
in ``problems`` and stops.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kmsfs.server.status import query
from support.volumes import Volume

BS = 4096
FINISHED = ("done", "cancelled", "failed")


def rekey_status(volume: Volume) -> dict[str, Any]:
    """The job of the daemon of *volume*, as ``kmsfs rekey --status --json`` shows it."""
    info = query(str(volume.mountpoint), "rekey-status")["rekey"] or {}
    return dict(info.get("job") or {})


def wait_job(
    volume: Volume,
    timeout: float,
    until: tuple[str, ...] = FINISHED,
    or_none_without: Path | None = None,
) -> dict[str, Any]:
    """Poll the job until its state is one of *until* (or, given *or_none_without*, until
    there is no job and no file there: nothing journalled to resume); fail after
    *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = rekey_status(volume)
        if job.get("state") in until:
            return job
        if or_none_without is not None and not job and not or_none_without.exists():
            return job
        time.sleep(0.05)
    pytest.fail(f"rekey job not {until} after {timeout} s: {rekey_status(volume)}")


@dataclass
class Worker:
    """One thread and its file.  Attributes: kind, name (the file's current name, relative
    to the mount), model (its content), ops (operations done)."""

    kind: str
    name: str
    model: bytearray
    ops: int = 0
    thread: threading.Thread | None = None


@dataclass
class Workload:
    root: Path
    seed: int
    workers: list[Worker] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def add(self, kind: str, name: str, content: bytes) -> None:
        """A worker of *kind* for the file *name*, which holds *content* already."""
        self.workers.append(Worker(kind, name, bytearray(content)))

    def start(self) -> None:
        for index, worker in enumerate(self.workers):
            run = getattr(self, f"_{worker.kind}")
            rng = random.Random(f"{self.seed}:{index}")
            worker.thread = threading.Thread(target=self._guard, args=(run, worker, rng))
            worker.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for worker in self.workers:
            assert worker.thread is not None
            worker.thread.join(timeout=60)
            assert not worker.thread.is_alive(), f"{worker.kind} worker hangs"

    def _guard(self, run: Callable[[Worker, random.Random], None], worker: Worker,
               rng: random.Random) -> None:  # fmt: skip
        try:
            run(worker, rng)
        except Exception as exc:  # recorded, then the test fails on it
            self.problems.append(f"{worker.kind} {worker.name}: {type(exc).__name__}: {exc}")

    def _check(self, worker: Worker, fd: int, rng: random.Random) -> None:
        """Read a random range through the open handle *fd*: it must be the model's."""
        model = worker.model
        off = rng.randrange(0, len(model) + 1)
        length = rng.randrange(1, 3 * BS)
        got = os.pread(fd, length, off)
        want = bytes(model[off : off + length])
        if got != want:
            raise AssertionError(f"read {length} at {off}: {len(got)} bytes differ from model")

    def _write(self, worker: Worker, fd: int, rng: random.Random, off: int, most: int) -> None:
        """Write 1 to *most* random bytes at *off* through *fd*, then read a range back."""
        data = rng.randbytes(rng.randrange(1, most))
        os.pwrite(fd, data, off)
        _patch(worker.model, off, data)
        self._check(worker, fd, rng)
        worker.ops += 1

    def _writer(self, worker: Worker, rng: random.Random) -> None:
        fd = os.open(self.root / worker.name, os.O_RDWR)
        try:
            while not self.stopping.is_set():
                self._write(worker, fd, rng, rng.randrange(0, len(worker.model) + BS), 3 * BS)
                if rng.random() < 0.1:
                    os.fsync(fd)
        finally:
            os.close(fd)

    def _appender(self, worker: Worker, rng: random.Random) -> None:
        fd = os.open(self.root / worker.name, os.O_WRONLY | os.O_APPEND)
        reader = os.open(self.root / worker.name, os.O_RDONLY)
        try:
            while not self.stopping.is_set():
                data = rng.randbytes(rng.randrange(1, 2 * BS))
                os.write(fd, data)
                worker.model.extend(data)
                self._check(worker, reader, rng)
                worker.ops += 1
        finally:
            os.close(fd)
            os.close(reader)

    def _truncator(self, worker: Worker, rng: random.Random) -> None:
        fd = os.open(self.root / worker.name, os.O_RDWR)
        try:
            while not self.stopping.is_set():
                if rng.random() < 0.5:
                    size = rng.randrange(0, len(worker.model) + 1)
                else:
                    size = len(worker.model) + rng.randrange(1, 4 * BS)
                os.ftruncate(fd, size)
                del worker.model[size:]
                worker.model.extend(bytes(size - len(worker.model)))
                self._write(worker, fd, rng, rng.randrange(0, size + 1), BS)
        finally:
            os.close(fd)

    def _reader(self, worker: Worker, rng: random.Random) -> None:
        fd = os.open(self.root / worker.name, os.O_RDONLY)  # held open across the switch
        try:
            while not self.stopping.is_set():
                self._check(worker, fd, rng)
                worker.ops += 1
        finally:
            os.close(fd)

    def _mmap(self, worker: Worker, rng: random.Random) -> None:
        fd = os.open(self.root / worker.name, os.O_RDWR)
        try:
            with mmap.mmap(fd, len(worker.model)) as mapped:
                while not self.stopping.is_set():
                    off = rng.randrange(0, len(worker.model))
                    data = rng.randbytes(min(rng.randrange(1, 2 * BS), len(worker.model) - off))
                    mapped[off : off + len(data)] = data
                    _patch(worker.model, off, data)
                    if rng.random() < 0.2:
                        mapped.flush()  # msync: the pages go to the daemon as WRITEs
                    if mapped[off : off + len(data)] != data:
                        raise AssertionError(f"mapping at {off} does not hold what was put")
                    worker.ops += 1
                mapped.flush()
        finally:
            os.close(fd)

    def _renamer(self, worker: Worker, rng: random.Random) -> None:
        """Writes through one handle while renaming the file between names and directories."""
        fd = os.open(self.root / worker.name, os.O_RDWR)
        names = [worker.name, worker.name + ".moved", "sub/" + worker.name]
        try:
            while not self.stopping.is_set():
                target = rng.choice([n for n in names if n != worker.name])
                os.rename(self.root / worker.name, self.root / target)
                worker.name = target
                self._write(worker, fd, rng, rng.randrange(0, len(worker.model) + 1), BS)
        finally:
            os.close(fd)


def _patch(model: bytearray, off: int, data: bytes) -> None:
    if len(model) < off:
        model.extend(bytes(off - len(model)))
    model[off : off + len(data)] = data
