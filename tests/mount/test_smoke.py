"""A first end-to-end check: create, write, read back, remount."""

import os

from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume


@requires_fuse
def test_write_read_remount(mounted: Volume) -> None:
    data = bytes(range(256)) * 1000
    mounted.path("f.bin").write_bytes(data)
    assert mounted.path("f.bin").read_bytes() == data
    mounted.remount()
    assert mounted.path("f.bin").read_bytes() == data
    assert data[:4096] not in mounted.backing_path("f.bin").read_bytes()


@requires_fuse
def test_second_mount_of_a_volume_is_refused(mounted: Volume) -> None:
    other = mounted.root / "mnt2"
    other.mkdir()
    result = run_kmsfs("mount", mounted.backing, other, *mounted.key_args, check=False)
    assert result.returncode == 7
    assert "in use by another kmsfs process" in result.stderr
    assert not os.path.ismount(other)
    assert mounted.path(".").exists()
