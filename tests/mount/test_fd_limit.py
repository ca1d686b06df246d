"""A daemon with few descriptors serves directories with many more files than that.

The inode table holds one descriptor per inode the kernel knows; past its
high-water mark the daemon asks the kernel to forget the oldest entries
(docs/DESIGN.md).  Here the daemon runs under RLIMIT_NOFILE = 400, and the
directory holds 1,500 files.
"""

from __future__ import annotations

import os
import shutil

import pytest
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume

LIMIT = 400
FILES = 1500


@requires_fuse
@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_more_files_than_descriptors(volume: Volume) -> None:
    env_prefix = ["prlimit", f"--nofile={LIMIT}:{LIMIT}"]
    import subprocess

    from support.cli import BIN

    mount = subprocess.run(
        [
            *env_prefix,
            str(BIN),
            "mount",
            str(volume.backing),
            str(volume.mountpoint),
            "--log-level",
            "debug",
            "--log-file",
            str(volume.log_file),
            *volume.key_args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert mount.returncode == 0, mount.stderr
    volume.mounted = True
    pid = int(mount.stdout.split("daemon pid ")[1].rstrip(")\n"))
    with open(f"/proc/{pid}/limits") as limits:
        assert any(
            line.startswith("Max open files") and line.split()[3] == str(LIMIT) for line in limits
        )

    directory = volume.path("many")
    directory.mkdir()
    for n in range(FILES):
        (directory / f"f{n:05d}").write_bytes(b"%d" % n)
    assert len(os.listdir(directory)) == FILES
    for n in range(FILES):
        assert (directory / f"f{n:05d}").stat().st_size == len(b"%d" % n)
    for n in range(0, FILES, 7):
        assert (directory / f"f{n:05d}").read_bytes() == b"%d" % n
    assert len(os.listdir(f"/proc/{pid}/fd")) < LIMIT
    shutil.rmtree(directory)
    assert not directory.exists()
    volume.umount()
    assert "Too many open files" not in volume.log_text()
    assert run_kmsfs("fsck", volume.backing, "--key-file", volume.key_file).returncode == 0
