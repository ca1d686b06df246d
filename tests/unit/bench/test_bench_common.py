"""The harness's reading of the kernel's mount table (scripts/benchlib/common.py)."""

from __future__ import annotations

from benchlib.common import mount_points

MOUNTS = r"""proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/var/tmp/w/kmsfs/backing /var/tmp/w/kmsfs/mnt fuse.kmsfs rw,allow_other 0 0
floor /var/tmp/a\040dir/floor/mnt fuse.floor rw 0 0
"""


def test_mount_points_are_the_second_field_with_escapes_undone() -> None:
    assert mount_points(MOUNTS) == {"/proc", "/var/tmp/w/kmsfs/mnt", "/var/tmp/a dir/floor/mnt"}


def test_a_mount_point_is_not_its_source_and_blank_lines_are_ignored() -> None:
    points = mount_points("\n" + MOUNTS + "\n")
    assert "/var/tmp/w/kmsfs/backing" not in points
    assert "floor" not in points
