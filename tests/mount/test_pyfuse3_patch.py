"""kmsfs on the patched pyfuse3 (docs/pyfuse3-patch.md) and on the stock one.

The patch's hooks, as kmsfs uses them: the kernel keeps directory listings
(FOPEN_CACHE_DIR) until the directory changes through the mount, and the loop
that reads the next request before it waits still answers everything, under
load with worker threads, when requesters are killed mid-request, and when the
daemon is told to stop while requests queue.  (FUSE_DONT_MASK: test_acl.py.)
Tests of a hook skip, saying so, on a pyfuse3 without it; the loop tests run on
either (the stock one waits through kmsfs's adapter).

The stock build's smoke test runs the kmsfs of a second venv, made by
scripts/test with stock pyfuse3 3.5.0 (``KMSFS_STOCK_VENV``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse, wait_exited
from support.volumes import Volume, make_volume

from kmsfs.fs.fuseloop import PYFUSE3, spin_ns_here

pytestmark = requires_fuse

STOCK_VENV = os.environ.get("KMSFS_STOCK_VENV")

# Uncached requests, one after the other, until killed: getxattr of an absent user.
# name always reaches the daemon; the stat and read mostly do not.
HAMMER = """
import os, sys
path = sys.argv[1]
while True:
    try:
        os.getxattr(path, "user.absent")
    except OSError:
        pass
    os.stat(path)
    with open(path, "rb") as f:
        f.read()
"""


@contextlib.contextmanager
def hammering(path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Four processes running HAMMER on *path* for the duration; killed at the end."""
    hammers = [subprocess.Popen([sys.executable, "-c", HAMMER, str(path)]) for _ in range(4)]
    try:
        yield hammers
    finally:
        for hammer in hammers:
            hammer.kill()
        for hammer in hammers:
            hammer.wait()


def readdirs(volume: Volume) -> int:
    """READDIRPLUS requests the daemon has answered so far."""
    info = json.loads(run_kmsfs("status", volume.mountpoint, "--json").stdout)
    return int(info["requests"]["by_opcode"].get("READDIRPLUS", {}).get("count", 0))


def answers(path: Path, timeout: float = 20) -> bool:
    """True if a stat and a read of *path* come back within *timeout* (another process,
    so that a hung daemon fails the test instead of hanging it)."""
    check = f"import os; os.stat({str(path)!r}); open({str(path)!r}, 'rb').read()"
    try:
        subprocess.run([sys.executable, "-c", check], check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_status_says_which_pyfuse3_and_which_hooks(mounted: Volume) -> None:
    info = json.loads(run_kmsfs("status", mounted.mountpoint, "--json").stdout)["pyfuse3"]
    text = run_kmsfs("status", mounted.mountpoint).stdout
    spin_us = spin_ns_here() // 1000  # the daemon may use the CPUs this test may
    assert info["spin_us"] == spin_us, info
    spins = f"spins {spin_us} µs before it waits" if spin_us else "waits without spinning"
    if PYFUSE3.patched:
        assert info["active"] == ["read_before_wait", "dont_mask", "cache_dir"], info
        hooks = "read_before_wait, dont_mask, cache_dir"
        line = f"pyfuse3:        {PYFUSE3.version}: {hooks}; loop {spins}\n"
    else:
        assert info["active"] == [] and info["loop"] == "adapter", info
        line = f"pyfuse3:        stock {PYFUSE3.version}: "
    assert info["version"] == PYFUSE3.version and info["patched"] is PYFUSE3.patched
    assert line in text, text
    assert f"pyfuse3 {line[16:].strip()}" in mounted.log_text()  # and the daemon's log


@pytest.mark.skipif(
    not PYFUSE3.cache_dir,
    reason="stock pyfuse3 cannot ask the kernel to cache listings (FOPEN_CACHE_DIR):"
    " build the patched one with scripts/setup (docs/pyfuse3-patch.md)",
)
def test_an_unchanged_directory_is_listed_from_the_kernels_cache(mounted: Volume) -> None:
    d = mounted.path("d")
    d.mkdir()
    for name in ("a", "b", "c"):
        (d / name).write_bytes(b"")
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    first = readdirs(mounted)
    assert sorted(os.listdir(d)) == ["a", "b", "c"]  # another open, another listing
    assert readdirs(mounted) == first
    # a change through the mount drops the kept listing: the next one asks again
    (d / "new").write_bytes(b"")
    (d / "a").unlink()
    assert sorted(os.listdir(d)) == ["b", "c", "new"]
    assert readdirs(mounted) > first


def test_shared_mode_asks_for_every_listing(volume: Volume) -> None:
    # other daemons change the backing directory: the kernel must not keep listings
    volume.mount("-o", "shared")
    try:
        d = volume.path("d")
        d.mkdir()
        (d / "a").write_bytes(b"")
        assert os.listdir(d) == ["a"]
        first = readdirs(volume)
        assert os.listdir(d) == ["a"]
        assert readdirs(volume) > first
        info = json.loads(run_kmsfs("status", volume.mountpoint, "--json").stdout)["pyfuse3"]
        assert "cache_dir" not in info["active"]
    finally:
        volume.umount()


def test_requests_from_many_processes_and_worker_threads_are_all_answered(
    mounted: Volume,
) -> None:
    # While four processes keep requests queued, 1 MiB writes (sealed in worker
    # threads) and an fsync must still finish: the loop yields to trio regularly.
    target = mounted.path("small")
    target.write_bytes(b"small file\n")
    data = os.urandom(1 << 20) * 16
    big = mounted.path("big")
    with hammering(target) as hammers:
        writer = subprocess.run(
            [sys.executable, "-c", WRITE_AND_FSYNC, str(big)], input=data, timeout=60
        )
        assert writer.returncode == 0
        assert all(h.poll() is None for h in hammers), "a requester failed"
    assert big.read_bytes() == data
    assert target.read_bytes() == b"small file\n"


WRITE_AND_FSYNC = """
import os, sys
data = sys.stdin.buffer.read()
with open(sys.argv[1], "wb") as f:
    for i in range(0, len(data), 1 << 20):
        f.write(data[i:i + (1 << 20)])
    f.flush()
    os.fsync(f.fileno())
"""


def test_requesters_killed_mid_request_leave_the_loop_serving(mounted: Volume) -> None:
    # A requester killed while its request is queued takes the request back: the loop
    # that was told the fd is readable must not then block on an empty queue.
    target = mounted.path("f")
    target.write_bytes(b"still here\n")
    for _ in range(10):
        with hammering(target):
            time.sleep(0.05)
        assert answers(target), "the mount stopped answering after requesters were killed"
    assert target.read_bytes() == b"still here\n"


def test_sigterm_while_requests_queue_unmounts(volume: Volume) -> None:
    volume.mount()
    pid = volume.daemon_pid
    assert pid is not None
    target = volume.path("f")
    target.write_bytes(b"x")
    with hammering(target):
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        wait_exited(pid)
    volume.mounted = False
    assert not os.path.ismount(volume.mountpoint)
    assert "unmounted" in volume.log_text()  # its last line: the loop ended, then unmount


@pytest.mark.skipif(
    STOCK_VENV is None,
    reason="KMSFS_STOCK_VENV is not set: scripts/test makes .venv-stock (kmsfs on stock"
    " pyfuse3) and sets it",
)
def test_kmsfs_runs_on_stock_pyfuse3(tmp_path: Path) -> None:
    assert STOCK_VENV is not None
    kmsfs = Path(STOCK_VENV) / "bin" / "kmsfs"
    assert kmsfs.exists(), f"{kmsfs} is missing: run KMSFS_VENV={STOCK_VENV} scripts/setup"
    vol = make_volume(tmp_path, key=False)

    def stock(*args: str | Path) -> str:
        done = subprocess.run(
            [str(kmsfs), *map(str, args)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"kmsfs {args[0]} on stock pyfuse3: {done.stderr}"
        return done.stdout

    stock("init", vol.backing, "--key-file", vol.key_file)
    stock("mount", vol.backing, vol.mountpoint, "--key-file", vol.key_file)
    try:
        data = os.urandom(100_000)
        vol.path("f").write_bytes(data)
        os.sync()
        assert vol.path("f").read_bytes() == data
        # the default names are encrypted: look for the plaintext in every backing file
        stored = [p for p in vol.backing.rglob("*") if p.is_file()]
        assert stored and not any(data[:4096] in p.read_bytes() for p in stored)
        assert not (vol.backing / "f").exists()
        info = json.loads(stock("status", vol.mountpoint, "--json"))["pyfuse3"]
        assert info["patched"] is False and info["active"] == [], info
        assert "pyfuse3:        stock " in stock("status", vol.mountpoint)
        stock("umount", vol.mountpoint)
        assert not os.path.ismount(vol.mountpoint)
    finally:
        force_unmount(vol.mountpoint)
