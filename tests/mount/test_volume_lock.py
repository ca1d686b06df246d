"""The volume lock when someone moves it aside: the kernel's mount table still answers.

The attack: whoever can write the backing directory moves ``.kmsfs.d/lock`` and the
daemon registrations (``.kmsfs.d/daemons``) aside; a tool then found the volume free
and ran against the live daemon (rekey re-encrypting files the daemon was serving).
Now every tool also reads the kernel's mount table (a ``fuse.kmsfs`` mount whose
source is this directory, compared by identity) and refuses naming the mount point,
and the daemon rechecks its lock and registration (every few seconds, and before
answering ``kmsfs status``), making them again so that tools see it.  (Which of the
two stops a tool in the first test depends on when the daemon last looked; the last
test takes the mount table alone.)
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume

from kmsfs.backing.volume_lock import RECHECK_INTERVAL, daemons_serving, volume_in_use

pytestmark = requires_fuse
NOBODY = 65534


def _move_aside(backing: Path, suffix: str = ".aside") -> None:
    state = backing / ".kmsfs.d"
    os.rename(state / "lock", state / f"lock{suffix}")
    os.rename(state / "daemons", state / f"daemons{suffix}")


def _lock_is_held(backing: Path) -> bool:
    try:
        fd = os.open(backing / ".kmsfs.d" / "lock", os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_tools_refuse_a_mount_whose_lock_and_registrations_were_moved_aside(
    mounted: Volume, tmp_path: Path
) -> None:
    mounted.path("f").write_bytes(b"served by the daemon")
    _move_aside(mounted.backing)
    # rekey finds the mount all the same and hands the job to its daemon (never runs
    # offline beside it)
    rekey = run_kmsfs("rekey", mounted.backing, "--wait", *mounted.key_args, check=False)
    assert rekey.returncode == 0, rekey.stdout + rekey.stderr
    assert f"rekey started by the daemon of {mounted.mountpoint}" in rekey.stdout
    remove = run_kmsfs("keys", "remove", mounted.backing, "local:x", check=False)
    assert remove.returncode == 7, remove.stdout + remove.stderr
    assert f"is mounted at {mounted.mountpoint}" in remove.stderr
    second = tmp_path / "mnt2"
    second.mkdir()
    again = run_kmsfs("mount", mounted.backing, second, *mounted.key_args, check=False)
    assert again.returncode == 7, again.stderr
    assert f"at {mounted.mountpoint}" in again.stderr and str(second) not in again.stderr
    assert not os.path.ismount(second)
    assert mounted.path("f").read_bytes() == b"served by the daemon"


def test_the_daemon_makes_its_lock_and_registration_again(mounted: Volume) -> None:
    """Before answering ``kmsfs status``, and every few seconds without one."""
    assert mounted.daemon_pid is not None
    _move_aside(mounted.backing)
    assert not _lock_is_held(mounted.backing)
    status = run_kmsfs("status", mounted.mountpoint)
    lock = f"{mounted.backing}/.kmsfs.d/lock"
    assert (
        f"volume lock:    the volume lock {lock} was moved aside, removed or replaced: made"
        " again and locked, so tools see this mount"
    ) in status.stdout
    assert _lock_is_held(mounted.backing)
    assert [d.pid for d in daemons_serving(mounted.backing)] == [mounted.daemon_pid]
    assert "volume lock:    held" in run_kmsfs("status", mounted.mountpoint).stdout

    # replaced by another file this time, and nobody asks: the periodic check
    _move_aside(mounted.backing, ".aside2")
    (mounted.backing / ".kmsfs.d" / "lock").write_bytes(b"")
    deadline = time.monotonic() + 4 * RECHECK_INTERVAL
    while not (_lock_is_held(mounted.backing) and daemons_serving(mounted.backing)):
        assert time.monotonic() < deadline, "the daemon did not take its lock again"
        time.sleep(0.1)
    mounted.umount()
    assert not volume_in_use(mounted.backing)
    errors = [line for line in mounted.log_text().splitlines() if " ERROR " in line]
    assert len([line for line in errors if "the volume lock" in line]) == 2, errors
    assert len([line for line in errors if "registration" in line]) == 2, errors


@contextmanager
def _fake_kmsfs_mount(source: Path, mountpoint: Path, owner: int) -> Iterator[None]:
    """A ``fuse.kmsfs`` mount of *source* made as by *owner* (``user_id=``), with no daemon
    behind it: its /dev/fuse descriptor is closed at once, so any access fails
    (ENOTCONN) rather than waits."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        options = f"fd={fd},rootmode=40000,user_id={owner},group_id={owner}"
        subprocess.run(
            ["mount", "-i", "-t", "fuse.kmsfs", "-o", options, str(source), str(mountpoint)],
            pass_fds=(fd,),
            check=True,
            timeout=30,
        )
    finally:
        os.close(fd)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_the_mount_table_is_read_by_identity_and_only_for_root_or_the_owner(
    volume: Volume, tmp_path: Path
) -> None:
    """A root mount naming the directory by another spelling (a symlink) counts; a mount
    another user made naming it (fusermount3 lets anyone choose the source) does not,
    and is never touched."""
    volume.mount()
    volume.path("f").write_bytes(b"plain")
    volume.umount()
    fake = tmp_path / "fake"
    fake.mkdir()
    with _fake_kmsfs_mount(volume.backing, fake, NOBODY):
        assert not volume_in_use(volume.backing)
        rekey = run_kmsfs("rekey", volume.backing, "-q", *volume.key_args, check=False)
        assert rekey.returncode == 0, rekey.stderr
    link = tmp_path / "link"
    link.symlink_to(volume.backing)
    with _fake_kmsfs_mount(link, fake, 0):
        assert volume_in_use(volume.backing)
        rekey = run_kmsfs("rekey", volume.backing, *volume.key_args, check=False)
        assert rekey.returncode == 7, rekey.stdout + rekey.stderr
        assert f"is mounted at {fake}" in rekey.stderr
    assert not volume_in_use(volume.backing)
