"""The daemon locks its memory (mlockall) so unwrapped keys never reach swap.

Whether the kernel allows it depends on RLIMIT_MEMLOCK and CAP_IPC_LOCK: the
tests run the daemon as root (which has CAP_IPC_LOCK), and under ``prlimit``
and ``setpriv --bounding-set=-ipc_lock`` for the cases of a service without
that capability (the systemd unit's case).  Locked memory shows as VmLck in
/proc/PID/status.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from support.cli import BIN
from support.fuse import requires_fuse
from support.reliability_util import mount_pid
from support.volumes import Volume

pytestmark = requires_fuse

REPO = Path(__file__).resolve().parents[2]
NO_IPC_LOCK = ["setpriv", "--bounding-set=-ipc_lock"]


def vm_locked_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmLck:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1))


def mount_under(volume: Volume, *prefix: str) -> int:
    """Mount *volume* with the kmsfs command run under *prefix*; returns the daemon's pid."""
    result = subprocess.run(
        [*prefix, str(BIN), "mount", str(volume.backing), str(volume.mountpoint)]
        + ["--log-file", str(volume.log_file), "--log-level", "debug"]
        + ["--key-file", str(volume.key_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    volume.mounted = True
    pid = int(re.search(r"daemon pid (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    volume.daemon_pid = pid
    return pid


def warnings(volume: Volume) -> list[str]:
    return [line for line in volume.log_text().splitlines() if "memory not locked" in line]


def test_daemon_memory_is_locked(volume: Volume) -> None:
    pid = mount_pid(volume)
    volume.path("f").write_bytes(b"x" * 100_000)
    assert vm_locked_kib(pid) > 0
    assert warnings(volume) == []
    volume.umount()


def test_without_the_limit_the_daemon_warns_once_and_serves(volume: Volume) -> None:
    pid = mount_under(volume, "prlimit", "--memlock=0", *NO_IPC_LOCK)
    volume.path("f").write_bytes(b"still works")
    assert volume.path("f").read_bytes() == b"still works"
    assert vm_locked_kib(pid) == 0
    volume.umount()
    [line] = warnings(volume)
    assert line.endswith(
        "WARNING kmsfs.server.launch: memory not locked: RLIMIT_MEMLOCK is 0 bytes (needs"
        " unlimited, or CAP_IPC_LOCK), so keys may reach swap: set LimitMEMLOCK=infinity in"
        " the systemd unit (or 'ulimit -l unlimited' before mounting)"
    )


def test_an_unlimited_limit_is_enough_without_the_capability(volume: Volume) -> None:
    """What the systemd unit sets (LimitMEMLOCK=infinity, no CAP_IPC_LOCK)."""
    raise_limit = ["prlimit", "--memlock=unlimited:unlimited"]
    if subprocess.run([*raise_limit, "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not let root raise RLIMIT_MEMLOCK's hard limit")
    pid = mount_under(volume, *raise_limit, *NO_IPC_LOCK)
    assert vm_locked_kib(pid) > 0
    assert warnings(volume) == []
    volume.umount()


@pytest.mark.nomount
def test_systemd_unit_allows_locking() -> None:
    service = (REPO / "systemd/kmsfs@.service").read_text()
    settings = [line for line in service.splitlines() if line and not line.startswith("#")]
    assert "LimitMEMLOCK=infinity" in settings
    bounding = next(line for line in settings if line.startswith("CapabilityBoundingSet="))
    assert "CAP_IPC_LOCK" not in bounding  # so the limit is what allows it
