"""Helpers shared by the reliability tests (crash, fuzz, load, faults, access).

``scale()`` reads ``KMSFS_RELIABILITY_SCALE`` (default 1): CI runs the small
counts written in the tests, ``scripts/reliability`` multiplies them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from support.fuse import force_unmount
from support.volumes import Volume

SCALE_VARIABLE = "KMSFS_RELIABILITY_SCALE"


def scale() -> float:
    """The multiplier for iteration counts and durations (>= 0.1)."""
    try:
        return max(float(os.environ.get(SCALE_VARIABLE, "1")), 0.1)
    except ValueError:
        return 1.0


def scaled(count: int | float, minimum: int = 1) -> int:
    return max(int(count * scale()), minimum)


def env_int(name: str, default: int) -> int:
    """An explicit count from the environment (scripts/reliability sets these)."""
    value = os.environ.get(name)
    return int(value) if value else default


def mount_pid(volume: Volume, *extra: str) -> int:
    """Mount *volume* and return the daemon's pid (from "daemon pid N")."""
    result = volume.mount(*extra)
    match = re.search(r"daemon pid (\d+)", result.stdout)
    assert match, f"no daemon pid in {result.stdout!r}"
    return int(match.group(1))


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of *pid* in KiB (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_daemon(volume: Volume, pid: int) -> None:
    """SIGKILL the daemon, wait for it to go, and clear the dead mount (fusermount3 -uz)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(pid), f"daemon {pid} survived SIGKILL"
    subprocess.run(["fusermount3", "-uz", str(volume.mountpoint)], capture_output=True)
    force_unmount(volume.mountpoint)
    volume.mounted = False


def drop_file_cache(path: Path) -> None:
    """Write back and drop the kernel's cached pages of one file on the mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
