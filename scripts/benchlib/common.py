"""Running commands, waiting, and reading a daemon's CPU time and peak RSS from /proc."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
KMSFS = VENV / "bin" / "kmsfs"
# kmsfs on stock pyfuse3 3.5.0 (scripts/test makes it; the *-stock systems use it)
STOCK_VENV = ROOT / ".venv-stock"
BENCHLIB = Path(__file__).resolve().parent
CMD_TIMEOUT = 1800.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
MiB = 1 << 20
# Errors a workload or a system may raise; the run loop records them and goes on.
FAILURES = (RuntimeError, OSError, subprocess.TimeoutExpired)


class Skipped(Exception):
    """A row that cannot run on a system (a tool missing, a feature the filesystem lacks).

    The message is the reason the report gives; unlike a failure, the volume is
    not replaced afterwards."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(
    cmd: list[str] | str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = CMD_TIMEOUT,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (a string runs through bash), in *cwd* if given; RuntimeError with
    its stderr if it fails, subprocess.TimeoutExpired after *timeout* s."""
    shell = isinstance(cmd, str)
    args: list[str] | str = ["bash", "-c", f"set -o pipefail; {cmd}"] if shell else cmd
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )
    if result.returncode != 0:
        shown = cmd if shell else shlex.join(cmd)
        raise RuntimeError(
            f"command failed ({result.returncode}): {shown}\n{result.stderr.strip()[-2000:]}"
        )
    return result


def timed(cmd: list[str] | str, env: Mapping[str, str] | None = None) -> float:
    """Seconds a command takes (RuntimeError if it fails)."""
    start = time.perf_counter()
    run(cmd, env=env)
    return time.perf_counter() - start


def apt_install(packages: list[str]) -> None:
    """Install Debian *packages* with apt-get (RuntimeError with apt's message if it fails)."""
    log(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *packages], env=env)


def mount_points(table: str) -> set[str]:
    """The mount points listed in *table* (the text of /proc/self/mounts: the second
    field of each line, with the kernel's octal escapes such as ``\\040`` undone)."""
    points = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
    return points


def listed_mount(path: Path) -> bool:
    """Whether *path* is a mount point in the kernel's mount table: also a FUSE mount
    whose daemon died (``os.path.ismount`` says False there: stat fails with ENOTCONN)."""
    return str(path) in mount_points(Path("/proc/self/mounts").read_text())


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll *predicate* until it holds; RuntimeError naming *what* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def proc_cpu(pid: int) -> float:
    """utime + stime of *pid* (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm_kb(pid: int) -> int:
    """Peak RSS (VmHWM) of *pid* in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")
