"""A pytest plugin that checks the ``mount`` marker against what each test does.

Run the suite with ``pytest -p support.mountcheck``: a thread samples every 20 ms
(and the plugin looks before and after each test's body) the processes this session
started (they inherit the environment variable ``KMSFS_MOUNTCHECK`` set here; the
daemons of ``kmsfs mount`` keep it) and the pytest process itself, looking for one that
holds ``/dev/fuse`` open, which is what serving a FUSE filesystem takes.  A test *mounts* if such a
process started while it ran (or the pytest process serves one); it *uses a mount*
if one ran while it ran (a mount of a module-scoped fixture, say).  At the end of
the session it lists the tests that mounted without the marker, which fails the
session, and the marked tests that used no mount (a skip, a mount refused before
FUSE, or a test that needs no marker: read each one).

Processes started with an environment that drops ``KMSFS_MOUNTCHECK`` are not seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

ENV = "KMSFS_MOUNTCHECK"
INTERVAL = 0.02
TICKS = os.sysconf("SC_CLK_TCK")


def _start_time(pid: str) -> int | None:
    """When process *pid* started, in clock ticks since boot (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _now() -> float:
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0]) * TICKS


def _env_has_token(pid: str, token: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return token in handle.read().split(b"\0")
    except OSError:
        return False


def _holds_fuse_device(pid: str) -> bool:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/fuse":
                return True
        except OSError:
            continue
    return False


class Sampler:
    """Watches this session's processes for a ``/dev/fuse`` descriptor.  ``current`` is
    the node ID of the test running now and ``since`` when it started (clock ticks);
    ``mounting`` and ``using`` collect the IDs seen mounting and using a mount."""

    def __init__(self) -> None:
        self.token = f"{ENV}={os.getpid()}".encode()
        self.current: str | None = None
        self.since = 0.0
        self.mounting: set[str] = set()
        self.using: set[str] = set()
        self._ours: dict[tuple[str, int], bool] = {}  # (pid, start) -> this session's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        os.environ[ENV] = str(os.getpid())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def begin(self, test: str) -> None:
        self.since = _now() - 1  # a tick of slack
        self.current = test

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.scan()

    def scan(self) -> None:
        """One look at the processes, for the test running now."""
        test, since = self.current, self.since
        if test is None or test in self.mounting:
            return
        me = str(os.getpid())
        try:
            pids = [pid for pid in os.listdir("/proc") if pid.isdigit()]
        except OSError:
            return
        for pid in pids:
            start = _start_time(pid)
            if start is None:
                continue
            key = (pid, start)
            if key not in self._ours:
                self._ours[key] = pid == me or _env_has_token(pid, self.token)
            if self._ours[key] and _holds_fuse_device(pid):
                self.using.add(test)
                if pid == me or start >= since:
                    self.mounting.add(test)


_SAMPLER = Sampler()
_ITEMS: list[pytest.Item] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _SAMPLER.start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _SAMPLER.begin(item.nodeid)
    yield
    _SAMPLER.current = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # A test shorter than a sample: look once with its fixtures set up, once at its end.
    _SAMPLER.scan()
    yield
    _SAMPLER.scan()


def _disagreements() -> tuple[list[str], list[str]]:
    """(tests that mounted without the marker, marked tests that used no mount)."""
    marked = {item.nodeid for item in _ITEMS if item.get_closest_marker("mount")}
    return sorted(_SAMPLER.mounting - marked), sorted(marked - _SAMPLER.using)


def pytest_collection_finish(session: pytest.Session) -> None:
    _ITEMS.extend(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    _SAMPLER.stop()
    unmarked, _ = _disagreements()
    if unmarked and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    unmarked, idle = _disagreements()
    terminalreporter.section("mount marker check")
    terminalreporter.write_line(
        f"{len(_SAMPLER.mounting)} tests mounted, {len(unmarked)} of them unmarked; "
        f"{len(idle)} marked tests used no mount"
    )
    for nodeid in unmarked:
        terminalreporter.write_line(f"mounted without the mount marker: {nodeid}")
    for nodeid in idle:
        terminalreporter.write_line(f"marked mount, used no mount: {nodeid}")
