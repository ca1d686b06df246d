"""Access control, secrets, and POSIX edge cases not in tests/test_posix.py.

Other users are played by ``setpriv --reuid=N --regid=N --clear-groups`` with
uids 65534 (nobody) and 65533.  These volumes live under a world-traversable
directory (pytest's own tmp directory is 0700 and would deny other users
before the mount is reached, hiding what is tested here).
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Volume, _check_log, force_unmount, make_volume, requires_fuse, run_as
from reliability_util import mount_pid

from kmsfs.format.content import derive_content_key
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.keys.local import LocalProvider, parse_key_file
from kmsfs.keys.provider import KeyContext

pytestmark = [requires_fuse, pytest.mark.mount]

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
        _check_log(vol)
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


# -- secrets ------------------------------------------------------------------------


def _key_forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]


def test_no_key_material_in_backing_logs_or_audit(volume: Volume, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    mount_pid(volume, "--audit-log", str(audit))
    for i in range(5):
        volume.path(f"f{i}").write_bytes(os.urandom(5000))
    (volume.path("d")).mkdir()
    volume.path("d/g").write_bytes(b"nested")
    volume.remount("--audit-log", str(audit))
    for i in range(5):
        volume.path(f"f{i}").read_bytes()
    volume.umount()

    master = parse_key_file(volume.key_file.read_bytes(), "key")
    provider = LocalProvider(master, {})
    secrets = _key_forms(master)
    config_text = volume.backing_path(".kmsfs.json").read_text()
    for path in volume.backing.rglob("*"):
        if not path.is_file() or path.relative_to(volume.backing).parts[0].startswith(".kmsfs"):
            continue
        header = FileHeader.parse(os.getxattr(path, XATTR_NAME))
        file_key = bytes(
            provider.unwrap(header.entries[0], KeyContext(header.volume_id, header.file_id))
        )
        secrets += _key_forms(file_key) + _key_forms(derive_content_key(file_key, header))
    assert len(secrets) == 4 * (1 + 2 * 6)
    haystacks = {"config": config_text.encode(), "log": volume.log_file.read_bytes()}
    haystacks["audit"] = audit.read_bytes()
    assert haystacks["audit"], "the audit log recorded nothing"
    for path in volume.backing.rglob("*"):
        haystacks[str(path)] = path.read_bytes() if path.is_file() else b""
        for name in os.listxattr(path, follow_symlinks=False):
            haystacks[f"{path} xattr {name}"] = os.getxattr(path, name, follow_symlinks=False)
    for where, data in haystacks.items():
        for secret in secrets:
            assert secret not in data, f"key material found in {where}"


def test_core_dumps_disabled(volume: Volume) -> None:
    pid = mount_pid(volume)
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    # PR_GET_DUMPABLE of a process that ran the daemon's start-up call (root can read any
    # process's memory whatever the flag, so the flag is checked from inside).
    code = (
        "import ctypes; from kmsfs.fs.syscalls import disable_core_dumps;"
        "disable_core_dumps(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "0", result.stderr


def test_stray_plaintext_file_is_not_served(mounted: Volume) -> None:
    mounted.path("real").write_bytes(b"encrypted content")
    mounted.backing_path("stray.txt").write_bytes(b"plain text planted in the backing dir\n")
    forged = mounted.backing_path("forged.txt")
    forged.write_bytes(b"x" * 100)
    os.setxattr(forged, XATTR_NAME, os.getxattr(mounted.backing_path("real"), XATTR_NAME))
    for name in ("stray.txt", "forged.txt"):
        with pytest.raises(OSError) as info:
            mounted.path(name).read_bytes()
        assert info.value.errno == errno.EIO
        assert f"/{name}" in mounted.log_text()
    assert mounted.path("real").read_bytes() == b"encrypted content"


# -- POSIX edge cases -----------------------------------------------------------


def test_name_lengths(mounted: Volume) -> None:
    longest = "n" * 255
    mounted.path(longest).write_bytes(b"long")
    (mounted.path("d" * 255)).mkdir()
    os.symlink("t" * 255, mounted.path("s" + "x" * 254))
    with pytest.raises(OSError) as info:
        mounted.path("n" * 256).write_bytes(b"")
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        mounted.path("d" * 256).mkdir()
    assert info.value.errno == errno.ENAMETOOLONG
    mounted.remount()
    assert mounted.path(longest).read_bytes() == b"long"
    assert sorted(os.listdir(mounted.mountpoint)) == sorted(["n" * 255, "d" * 255, "s" + "x" * 254])
    assert os.readlink(mounted.path("s" + "x" * 254)) == "t" * 255
    name = "é" * 127  # 254 bytes of UTF-8
    mounted.path(name).write_bytes(b"utf8")
    assert mounted.path(name).read_bytes() == b"utf8"


def test_deep_paths_beyond_path_max(mounted: Volume) -> None:
    depth, part = 50, "p" * 100  # 5,050 bytes of path: beyond PATH_MAX (4096)
    fd = os.open(mounted.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(part, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)
    mounted.remount()
    fd = os.open(mounted.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 10) == b"deep"
        os.close(leaf)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        os.stat(mounted.mountpoint / "/".join([part] * depth) / "leaf")
    assert info.value.errno == errno.ENAMETOOLONG


def test_nanosecond_timestamps(mounted: Volume) -> None:
    path = mounted.path("t")
    path.write_bytes(b"t")
    (mounted.path("d")).mkdir()
    os.symlink("t", mounted.path("l"))
    times = (1_234_567_890_123_456_789, 1_600_000_000_987_654_321)
    for target in (path, mounted.path("d")):
        os.utime(target, ns=times)
    os.utime(mounted.path("l"), ns=times, follow_symlinks=False)
    mounted.remount()
    for target in ("t", "d", "l"):
        st = os.stat(mounted.path(target), follow_symlinks=False)
        assert (st.st_atime_ns, st.st_mtime_ns) == times, target
    st = os.stat(mounted.backing_path("t"))
    assert (st.st_atime_ns, st.st_mtime_ns) == times


def test_o_excl_and_o_nofollow(mounted: Volume) -> None:
    path = mounted.path("f")
    path.write_bytes(b"f")
    os.symlink("f", mounted.path("link"))
    os.symlink("nowhere", mounted.path("dangling"))
    for name in ("f", "link", "dangling"):
        with pytest.raises(OSError) as info:
            os.open(mounted.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        assert info.value.errno == errno.EEXIST, name
    assert not mounted.backing_path("nowhere").exists()  # O_EXCL did not follow it
    with pytest.raises(OSError) as info:
        os.open(mounted.path("link"), os.O_RDONLY | os.O_NOFOLLOW)
    assert info.value.errno == errno.ELOOP
    fd = os.open(mounted.path("link"), os.O_PATH | os.O_NOFOLLOW)
    os.close(fd)
    fd = os.open(mounted.path("f"), os.O_RDONLY | os.O_NOFOLLOW)
    assert os.read(fd, 5) == b"f"
    os.close(fd)


def test_rename_over_an_open_file(mounted: Volume) -> None:
    old, new = mounted.path("target"), mounted.path("incoming")
    old.write_bytes(b"old content " * 1000)
    new.write_bytes(b"new content " * 500)
    mounted.remount()  # reads below reach the daemon
    with open(old, "rb") as handle:
        os.rename(new, old)
        assert handle.read() == b"old content " * 1000  # the open file keeps its inode
        assert os.fstat(handle.fileno()).st_nlink == 0
        assert old.read_bytes() == b"new content " * 500
    assert sorted(os.listdir(mounted.backing)) == [".kmsfs.d", ".kmsfs.json", "target"]
    # the daemon's volume lock and its registration (kmsfs/lock.py)
    assert sorted(os.listdir(mounted.backing / ".kmsfs.d")) == ["daemons", "lock"]
    mounted.remount()
    assert old.read_bytes() == b"new content " * 500


def test_hard_link_to_an_open_file(mounted: Volume) -> None:
    a, b = mounted.path("a"), mounted.path("b")
    a.write_bytes(b"0" * 10000)
    fd = os.open(a, os.O_RDWR)
    try:
        os.link(a, b)
        os.pwrite(fd, b"through a", 4090)
        os.fsync(fd)
        assert b.read_bytes()[4090:4099] == b"through a"
        a.unlink()
        os.pwrite(fd, b"after unlink", 9995)
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    mounted.remount()
    data = b.read_bytes()
    assert len(data) == 10007 and data[4090:4099] == b"through a" and data.endswith(b"after unlink")
    assert b.stat().st_nlink == 1


def test_two_descriptors_on_unlinked_file(mounted: Volume) -> None:
    path = mounted.path("u")
    path.write_bytes(b"x" * 5000)
    first = os.open(path, os.O_RDWR)
    second = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        os.pwrite(first, b"y" * 3000, 4000)
        os.close(first)
        first = -1
        assert os.pread(second, 10000, 0) == b"x" * 4000 + b"y" * 3000
    finally:
        if first >= 0:
            os.close(first)
        os.close(second)
    assert os.listdir(mounted.mountpoint) == []
