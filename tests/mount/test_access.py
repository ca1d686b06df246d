"""Who may reach the mount: other users without and with allow_other, sticky directories
(secrets: test_secrets.py; POSIX edge cases: test_posix_edges.py).

Other users are played by ``setpriv --reuid=N --regid=N --clear-groups`` with
uids 65534 (nobody) and 65533.  These volumes live under a world-traversable
directory (pytest's own tmp directory is 0700 and would deny other users
before the mount is reached, hiding what is tested here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import run_as
from support.fuse import force_unmount, requires_fuse
from support.reliability_util import mount_pid
from support.volumes import Volume, check_log, make_volume

pytestmark = requires_fuse

NOBODY = 65534
OTHER = 65533


as_user = run_as


def py_as_user(uid: int, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python *code* as *uid*; it prints an errno name or OK."""
    return as_user(uid, sys.executable, "-c", code, *args)


TRY = """
import errno, os, sys
op, *args = sys.argv[1:]
try:
    if op == "read":
        print(open(args[0], "rb").read().decode(errors="replace"), end="")
    elif op == "write":
        open(args[0], "ab").write(b"x")
    elif op == "create":
        open(args[0], "xb").write(b"mine")
    elif op == "unlink":
        os.unlink(args[0])
    elif op == "rename":
        os.rename(args[0], args[1])
    elif op == "chmod":
        os.chmod(args[0], 0o777)
    elif op == "chown":
        os.chown(args[0], 0, 0)
    elif op == "listdir":
        print(",".join(sorted(os.listdir(args[0]))), end="")
    else:
        raise SystemExit("unknown op")
except OSError as exc:
    print(errno.errorcode[exc.errno], end="")
"""


def attempt(uid: int, op: str, *paths: Path) -> str:
    result = py_as_user(uid, TRY, op, *map(str, paths))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def open_volume() -> Iterator[Volume]:
    """A volume under a 0755 directory in /tmp, so that other uids can reach the mount."""
    top = Path(tempfile.mkdtemp(prefix="kmsfs-access-", dir="/tmp"))
    top.chmod(0o755)
    vol = make_volume(top)
    try:
        yield vol
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)
        shutil.rmtree(top, ignore_errors=True)


# -- who may reach the mount ----------------------------------------------------


def test_without_allow_other_other_users_get_eacces(open_volume: Volume) -> None:
    mount_pid(open_volume)
    path = open_volume.path("f")
    path.write_bytes(b"secret")
    path.chmod(0o644)
    assert open_volume.path("f").read_bytes() == b"secret"  # the owner (root) reads
    assert attempt(NOBODY, "read", path) == "EACCES"
    assert attempt(NOBODY, "listdir", open_volume.mountpoint) == "EACCES"
    assert attempt(NOBODY, "create", open_volume.path("g")) == "EACCES"


def open_root_to_others(volume: Volume) -> None:
    """kmsfs init makes the backing root (so the mount's root) 0700; a shared mount opens it."""
    volume.mountpoint.chmod(0o755)


def test_with_allow_other_kernel_permission_checks_apply(open_volume: Volume) -> None:
    mount_pid(open_volume, "-o", "allow_other")
    open_root_to_others(open_volume)
    private, public = open_volume.path("private"), open_volume.path("public")
    private.write_bytes(b"root only")
    private.chmod(0o600)
    public.write_bytes(b"everyone")
    public.chmod(0o644)
    assert attempt(NOBODY, "read", private) == "EACCES"
    assert attempt(NOBODY, "read", public) == "everyone"
    assert attempt(NOBODY, "write", public) == "EACCES"
    assert attempt(NOBODY, "create", open_volume.path("new")) == "EACCES"  # root dir 0755
    assert attempt(NOBODY, "unlink", public) == "EACCES"
    assert attempt(NOBODY, "chmod", public) == "EPERM"
    assert attempt(NOBODY, "chown", public) == "EPERM"
    # A world-writable directory: nobody's files are nobody's, in the mount and the backing.
    shared = open_volume.path("shared")
    shared.mkdir()
    shared.chmod(0o777)
    assert attempt(NOBODY, "create", shared / "n") == ""
    assert (shared / "n").stat().st_uid == NOBODY
    assert open_volume.backing_path("shared/n").stat().st_uid == NOBODY
    assert attempt(NOBODY, "read", shared / "n") == "mine"
    assert attempt(NOBODY, "chmod", shared / "n") == ""
    assert attempt(NOBODY, "chown", shared / "n") == "EPERM"  # not to root
    # Root bypasses modes, as on ext4.
    private.chmod(0)
    assert private.read_bytes() == b"root only"


def test_sticky_directory(open_volume: Volume) -> None:
    mount_pid(open_volume, "-o", "allow_other")
    open_root_to_others(open_volume)
    sticky = open_volume.path("tmp")
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert attempt(OTHER, "create", sticky / "theirs") == ""
    assert attempt(NOBODY, "create", sticky / "mine") == ""
    assert attempt(NOBODY, "unlink", sticky / "theirs") == "EPERM"
    assert attempt(NOBODY, "rename", sticky / "theirs", sticky / "stolen") == "EPERM"
    assert attempt(NOBODY, "rename", sticky / "mine", sticky / "theirs") == "EPERM"
    assert attempt(NOBODY, "unlink", sticky / "mine") == ""
    assert attempt(OTHER, "unlink", sticky / "theirs") == ""
    assert os.listdir(sticky) == []
    assert stat_mode(open_volume.backing_path("tmp")) == 0o1777


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777
