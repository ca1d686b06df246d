"""FUSE on this machine: whether tests can mount, and getting rid of a mount and of
its daemon whatever state they are in."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")


def force_unmount(mountpoint: Path) -> None:
    """Unmount whatever is at *mountpoint*, stale or busy; never raises."""
    for command in (["fusermount3", "-u", "-q"], ["fusermount3", "-uz", "-q"], ["umount", "-l"]):
        if not os.path.ismount(mountpoint) and not is_stale(mountpoint):
            return
        subprocess.run([*command, str(mountpoint)], capture_output=True, check=False)


def is_stale(path: Path) -> bool:
    """True if *path* is a mount whose daemon is gone (stat fails with ENOTCONN)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == 107  # ENOTCONN
    return False


def wait_unmounted(mountpoint: Path, timeout: float = 10) -> None:
    """Wait until *mountpoint* is no mount any more, at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_exited(pid: int, timeout: float = 30) -> bool:
    """Wait until process *pid* is gone (or a zombie): the daemon outlives its mount briefly.
    False if it still runs after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False
