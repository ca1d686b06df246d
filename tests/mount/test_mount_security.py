"""Attacks on the mount itself: FUSE options smuggled in through the backing path.

libfuse splits ``-o`` strings at commas and reads backslash escapes, and the
backing path is passed as ``fsname=<path>``: a backing directory named
``x,allow_other`` used to mount with allow_other, opening every file to every
local user.  Other users are played by ``setpriv`` (uid 65534), under a
world-traversable directory in /tmp (pytest's own tmp directory is 0700).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support.cli import run_as, run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.volumes import Volume, check_log

pytestmark = requires_fuse

NOBODY = 65534


def volume_at(top: Path, backing_name: str, index: int = 0) -> Volume:
    backing = top / backing_name
    mountpoint = top / f"mnt{index}"
    backing.mkdir()
    mountpoint.mkdir()
    vol = Volume(top, backing, mountpoint, top / f"key{index}", top / f"log{index}")
    run_kmsfs("init", backing, "--key-file", vol.key_file)
    backing.chmod(0o755)  # the mount's root: traversable by others, as a shared volume is
    vol.mount_args = ["--key-file", str(vol.key_file)]
    return vol


def unescape(field: str) -> str:
    """A /proc/self/mountinfo field with its octal escapes (\\040, \\134, ...) decoded."""
    raw = bytearray()
    i = 0
    data = field.encode()
    while i < len(data):
        if data[i] == 0x5C and len(data[i + 1 : i + 4]) == 3 and data[i + 1 : i + 4].isdigit():
            raw.append(int(data[i + 1 : i + 4], 8))
            i += 4
        else:
            raw.append(data[i])
            i += 1
    return os.fsdecode(bytes(raw))


def mount_entry(mountpoint: Path) -> tuple[str, list[str]]:
    """(source, superblock options) of the mount at *mountpoint*."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if unescape(fields[4]) != str(mountpoint):
            continue
        after = fields[fields.index("-") + 1 :]  # fstype, source, super options
        return unescape(after[1]), after[2].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


def listdir_as(uid: int, path: Path) -> str:
    """os.listdir(path) as *uid*: the errno name, or OK."""
    code = (
        "import errno, os, sys\n"
        "try:\n    os.listdir(sys.argv[1]); print('OK')\n"
        "except OSError as exc:\n    print(errno.errorcode[exc.errno])\n"
    )
    result = run_as(uid, sys.executable, "-c", code, path)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(
    "name",
    [
        "vol,allow_other",
        "vol\\,allow_other",
        "vol\\\\,allow_other",
        "a,allow_other,default_permissions",
    ],
)
def test_comma_in_backing_path_cannot_add_allow_other(shared_dir: Path, name: str) -> None:
    vol = volume_at(shared_dir, name)
    try:
        vol.mount()
        vol.path("secret").write_bytes(b"root's data")
        vol.path("secret").chmod(0o644)
        source, options = mount_entry(vol.mountpoint)
        assert "allow_other" not in options, options
        assert source == str(vol.backing)  # the whole path, nothing split off
        assert listdir_as(NOBODY, vol.mountpoint) == "EACCES"  # FUSE: owner only
        vol.umount()
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)


def test_backing_path_with_escapes_spaces_and_utf8_mounts_as_itself(shared_dir: Path) -> None:
    """Every byte of the path reaches the mount source unchanged (libfuse's own escapes
    included), so tools that find a volume's mount by its source keep finding it."""
    vol = volume_at(shared_dir, "b\\054x \t\\134 é")
    try:
        vol.mount()
        vol.path("f").write_bytes(b"data")
        assert vol.path("f").read_bytes() == b"data"
        source, options = mount_entry(vol.mountpoint)
        assert source == str(vol.backing)
        assert "allow_other" not in options
        vol.umount()
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)


def test_allow_other_still_works_when_asked_for(shared_dir: Path) -> None:
    vol = volume_at(shared_dir, "plain")
    try:
        vol.mount("-o", "allow_other")
        vol.path("f").write_bytes(b"shared")
        _, options = mount_entry(vol.mountpoint)
        assert "allow_other" in options
        assert listdir_as(NOBODY, vol.mountpoint) == "OK"
        vol.umount()
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)
