"""A single-node GlusterFS volume mounted twice through GlusterFS's FUSE client, each
mount a client of its own with its own caches, as two hosts would be: the real
distributed filesystem the shared-mode suite runs on (this machine's kernel has no
NFS).  Debian's glusterfs-server and glusterfs-client (``scripts/setup --test``).

``gluster_volume(workdir)`` starts ``glusterd --no-daemon`` unless one answers
already, creates and starts a volume ``gv<random>`` with its brick in *workdir*,
mounts it at *workdir*/a and *workdir*/b, and undoes all of it afterwards: unmounts,
stops and deletes the volume, and ends the brick process and the glusterd it
started, by PID.  GlusterUnavailable (with the reason) if that cannot be done.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

# What kmsfs's shared mode needs of GlusterFS (docs/DESIGN.md, "Shared storage"): no
# client-side cache that a byte-range lock does not make coherent.  The volume's
# db-workload group turns write-behind, read-ahead, io-cache, quick-read and
# stat-prefetch off; the client's timeouts 0 keep the kernel from answering a stat or
# a lookup from its cache; kmsfs reads blocks with O_DIRECT itself (past the kernel's
# cache, not GlusterFS's).  With the volume's defaults nine tests of the suite fail, with
# the client's six (blocks fail authentication, sizes are old, a name created on one
# client is not seen on the other).
VOLUME_OPTIONS = (("group", "db-workload"),)
MOUNT_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0"


class GlusterUnavailable(Exception):
    """GlusterFS cannot be installed, started or mounted here (the message says why)."""


def _gluster(*args: str, check: bool = True, timeout: float = 60) -> str:
    result = subprocess.run(
        ["gluster", "--mode=script", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise GlusterUnavailable(
            f"gluster {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


def _glusterd_answers() -> bool:
    try:
        _gluster("volume", "list", timeout=10)
    except (GlusterUnavailable, subprocess.TimeoutExpired):
        return False
    return True


def _start_glusterd(log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        daemon = subprocess.Popen(["glusterd", "--no-daemon"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not _glusterd_answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            _end(daemon.pid)
            raise GlusterUnavailable(
                f"glusterd --no-daemon did not start (exit {daemon.poll()}; log: {log})"
            )
        time.sleep(0.2)
    return daemon


def _brick_pid(name: str) -> int | None:
    """The PID of the volume's brick process (glusterfsd), from ``volume status``."""
    try:
        status = ElementTree.fromstring(_gluster("volume", "status", name, "--xml"))
    except (GlusterUnavailable, ElementTree.ParseError):
        return None
    pid = status.findtext(".//node/pid")
    return int(pid) if pid and pid.isdigit() and int(pid) > 0 else None


def _end(pid: int, timeout: float = 10) -> None:
    """SIGTERM process *pid*, then SIGKILL if it is still there after *timeout*."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # our child (glusterd): reap it
            except ChildProcessError:
                pass
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)


def _wait_for_hooks(name: str, timeout: float = 20) -> None:
    """Wait until no process runs for volume *name* (glusterd runs hook scripts, such as
    glusterfind's, after a delete; they ask glusterd, so they must end before it)."""
    marker = f"--volname={name}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = False
        for entry in Path("/proc").iterdir():
            try:
                running = running or marker in (entry / "cmdline").read_bytes()
            except OSError:
                continue
        if not running:
            return
        time.sleep(0.2)


def _umount(path: Path) -> None:
    for command in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not os.path.ismount(path):
            return
        subprocess.run(command, capture_output=True, check=False)


@contextmanager
def gluster_volume(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """The volume's two mount points (two clients); see the module docstring."""
    for tool in ("glusterd", "gluster", "mount.glusterfs"):
        if shutil.which(tool) is None:
            raise GlusterUnavailable(
                f"{tool} is not installed (Debian's glusterfs-server and glusterfs-client:"
                " scripts/setup --test installs them)"
            )
    started = None if _glusterd_answers() else _start_glusterd(workdir / "glusterd.log")
    host = socket.gethostname()
    name = f"gv{os.urandom(4).hex()}"
    brick = workdir / "brick"
    brick.mkdir()
    mounts = (workdir / "a", workdir / "b")
    brick_pid = None
    created = False
    try:
        _gluster("volume", "create", name, f"{host}:{brick}", "force")
        created = True
        for option, value in VOLUME_OPTIONS:
            _gluster("volume", "set", name, option, value)
        _gluster("volume", "start", name)
        brick_pid = _brick_pid(name)
        for mount in mounts:
            mount.mkdir()
            result = subprocess.run(
                ["mount", "-t", "glusterfs", "-o", MOUNT_OPTIONS, f"{host}:/{name}", str(mount)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if result.returncode != 0 or not os.path.ismount(mount):
                raise GlusterUnavailable(
                    f"mount -t glusterfs {host}:/{name} {mount} failed: {result.stderr.strip()}"
                )
        yield mounts
    finally:
        for mount in mounts:
            _umount(mount)
        if created:
            _gluster("volume", "stop", name, "force", check=False)
            _gluster("volume", "delete", name, check=False)
            _wait_for_hooks(name)
        if brick_pid is not None:
            _end(brick_pid)
        if started is not None:
            started.terminate()
            try:
                started.wait(timeout=10)
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait()
