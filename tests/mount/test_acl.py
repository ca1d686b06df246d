"""POSIX ACLs and the xattr namespaces through a real mount.

The kernel enforces ACLs (FUSE_POSIX_ACL with default_permissions); kmsfs stores
them on the backing files, where the backing filesystem inherits default ACLs.
``trusted.*`` is root's (CAP_SYS_ADMIN in the initial user namespace), as on ext4.
Other users are real uids (setpriv) on an ``allow_other`` mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import BIN, run_as
from support.fuse import requires_fuse
from support.volumes import Volume, make_volume

from kmsfs.format.content import mode_for_format
from kmsfs.format.header import FORMAT_2
from kmsfs.fs.fuseloop import PYFUSE3

pytestmark = requires_fuse
NOBODY = 65534


@pytest.fixture
def shared_volume(shared_dir: Path) -> Iterator[Volume]:
    vol = make_volume(shared_dir)
    vol.mountpoint.rename(shared_dir / "mnt")
    vol.mountpoint = shared_dir / "mnt"
    vol.mount("-o", "allow_other")
    vol.mountpoint.chmod(0o755)  # the backing root is 0700; a shared mount opens its root
    yield vol
    vol.umount()


def acl(*args: str | os.PathLike[str]) -> str:
    return subprocess.run(
        [*map(str, args)], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def test_an_acl_grants_another_user_read_on_a_0600_file(shared_volume: Volume) -> None:
    secret = shared_volume.path("secret")
    secret.write_bytes(b"for nobody too\n")
    secret.chmod(0o600)
    denied = run_as(NOBODY, "cat", secret)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    acl("setfacl", "-m", f"u:{NOBODY}:r", secret)
    assert f"user:{NOBODY}:r--" in acl("getfacl", "-n", secret)
    allowed = run_as(NOBODY, "cat", secret)
    assert allowed.returncode == 0 and allowed.stdout == "for nobody too\n"
    # stored on the backing file, so it survives a remount
    shared_volume.umount()
    shared_volume.mount("-o", "allow_other")
    assert run_as(NOBODY, "cat", secret).stdout == "for nobody too\n"
    acl("setfacl", "-x", f"u:{NOBODY}", secret)
    assert run_as(NOBODY, "cat", secret).returncode != 0


def test_a_default_acl_is_inherited(shared_volume: Volume) -> None:
    project = shared_volume.path("project")
    project.mkdir(mode=0o700)
    acl("setfacl", "-m", f"u:{NOBODY}:rx", project)
    acl("setfacl", "-d", "-m", f"u:{NOBODY}:rw", project)
    (project / "new.txt").write_bytes(b"inherited\n")
    (project / "sub").mkdir()
    text = acl("getfacl", "-n", project / "new.txt")
    assert f"user:{NOBODY}:rw-" in text
    assert f"default:user:{NOBODY}:rw-" in acl("getfacl", "-n", project / "sub")
    assert run_as(NOBODY, "cat", project / "new.txt").stdout == "inherited\n"


@pytest.mark.skipif(
    not PYFUSE3.dont_mask,
    reason="stock pyfuse3 cannot ask for FUSE_DONT_MASK, so the kernel applies the umask"
    " before kmsfs sees the mode (docs/pyfuse3-patch.md): build the patched one with"
    " scripts/setup",
)
def test_a_default_acl_is_not_narrowed_by_the_umask(shared_volume: Volume) -> None:
    # POSIX: under a default ACL the umask does not apply; the new entry's ACL is the
    # default one narrowed only by the mode the creator asked for (0666, 0777).
    project = shared_volume.path("project")
    project.mkdir(mode=0o755)
    acl("setfacl", "-m", f"u:{NOBODY}:rwx", project)
    acl("setfacl", "-d", "-m", f"u:{NOBODY}:rw", project)
    subprocess.run(["sh", "-c", "umask 022 && echo owner > f && mkdir d"], cwd=project, check=True)
    text = acl("getfacl", "-n", project / "f")
    assert f"user:{NOBODY}:rw-\n" in text and "mask::rw-" in text, text
    assert stat.S_IMODE(os.stat(project / "f").st_mode) == 0o664
    assert stat.S_IMODE(os.stat(project / "d").st_mode) == 0o775
    backing_mode = stat.S_IMODE(os.stat(shared_volume.backing_path("project/f")).st_mode)
    assert backing_mode == mode_for_format(0o664, FORMAT_2)  # and the format marker
    appended = run_as(NOBODY, "sh", "-c", f"echo nobody >> {project / 'f'}")
    assert appended.returncode == 0, appended.stderr
    assert (project / "f").read_text() == "owner\nnobody\n"


def test_the_umask_applies_where_no_default_acl_rules(shared_volume: Volume) -> None:
    plain = shared_volume.path("plain")
    plain.mkdir()
    made = "umask 027 && echo x > f && mkdir d && mkfifo p"
    subprocess.run(["sh", "-c", made], cwd=plain, check=True)
    modes = {name: stat.S_IMODE(os.stat(plain / name).st_mode) for name in ("f", "d", "p")}
    assert modes == {"f": 0o640, "d": 0o750, "p": 0o640}
    backing = shared_volume.backing_path("plain")
    on_backing = {**modes, "f": mode_for_format(0o640, FORMAT_2)}  # a file: its format marker
    assert {n: stat.S_IMODE(os.stat(backing / n).st_mode) for n in modes} == on_backing


def test_cp_a_and_rsync_keep_acls_and_xattrs(shared_volume: Volume, tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.fail("rsync is missing: scripts/setup --test installs it")
    plain = tmp_path / "plain"
    plain.mkdir()
    f = plain / "f"
    f.write_bytes(b"data\n")
    f.chmod(0o640)
    acl("setfacl", "-m", f"u:{NOBODY}:r", f)
    os.setxattr(f, "user.origin", b"plain")
    copied = shared_volume.path("copied")
    subprocess.run(["cp", "-a", plain, copied], check=True)
    assert f"user:{NOBODY}:r--" in acl("getfacl", "-n", copied / "f")
    assert os.getxattr(copied / "f", "user.origin") == b"plain"
    back = tmp_path / "back"
    subprocess.run(["rsync", "-aAX", f"{copied}/", f"{back}/"], check=True, timeout=60)
    assert (back / "f").read_bytes() == b"data\n"
    assert f"user:{NOBODY}:r--" in acl("getfacl", "-n", back / "f")
    assert os.getxattr(back / "f", "user.origin") == b"plain"


def _file_labelled_by_root(vol: Volume) -> Path:
    """A file anyone may open, with a ``trusted.label`` root set and sees."""
    f = vol.path("t")
    f.write_bytes(b"x")
    f.chmod(0o666)
    os.setxattr(f, "trusted.label", b"root's")
    assert os.getxattr(f, "trusted.label") == b"root's"
    assert "trusted.label" in os.listxattr(f)
    return f


def test_trusted_xattrs_are_roots(shared_volume: Volume) -> None:
    f = _file_labelled_by_root(shared_volume)
    as_nobody = run_as(NOBODY, "setfattr", "-n", "trusted.other", "-v", "1", f)
    assert as_nobody.returncode != 0 and "Operation not permitted" in as_nobody.stderr
    read = run_as(NOBODY, "getfattr", "-n", "trusted.label", f)
    assert read.returncode != 0  # ext4: a non-admin neither reads nor lists trusted.*
    listed = run_as(NOBODY, "getfattr", "-d", "-m", "-", f)
    assert "trusted.label" not in listed.stdout


LIST_XATTRS = """
import errno, os, sys
print(" ".join(sorted(os.listxattr(sys.argv[1]))))
try:
    os.getxattr(sys.argv[1], "trusted.label")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def test_trusted_xattrs_are_hidden_from_root_of_a_user_namespace(shared_volume: Volume) -> None:
    """The attack: an unprivileged user makes a user namespace (``unshare -Ur``), where
    it is root with every capability in its effective set, and lists ``trusted.*``
    names.  ext4 shows them only for CAP_SYS_ADMIN in the initial user namespace, and
    so does the mount now (the kernel itself refuses the values: ENODATA)."""
    f = _file_labelled_by_root(shared_volume)
    os.setxattr(f, "user.visible", b"to all")
    result = run_as(NOBODY, "unshare", "-Ur", "/usr/bin/python3", "-c", LIST_XATTRS, f)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["user.visible", "ENODATA"]


UNIT_CAPABILITIES = "-all,+sys_admin,+dac_override,+dac_read_search,+fowner,+fsetid,+chown"
UNIT_CAPABILITIES += ",+mknod,+setfcap"  # systemd/kmsfs@.service's CapabilityBoundingSet=


def test_trusted_xattrs_under_the_units_capabilities(shared_dir: Path) -> None:
    """Under the unit's bounding set (no CAP_SYS_PTRACE) the daemon may not read the
    namespace link of a requester with more capabilities (a root shell): host root
    still sees ``trusted.*`` (told by its uid_map), root of a user namespace not."""
    vol = make_volume(shared_dir)
    vol.mountpoint.rename(shared_dir / "mnt")
    vol.mountpoint = shared_dir / "mnt"
    subprocess.run(
        ["setpriv", f"--bounding-set={UNIT_CAPABILITIES}", str(BIN), "mount", vol.backing]
        + [vol.mountpoint, "-o", "allow_other", "--key-file", vol.key_file]
        + ["--log-file", vol.log_file],
        check=True,
        capture_output=True,
        timeout=60,
    )
    vol.mounted = True
    try:
        vol.mountpoint.chmod(0o755)
        f = _file_labelled_by_root(vol)  # root: told by its uid_map
        result = run_as(NOBODY, "unshare", "-Ur", "/usr/bin/python3", "-c", LIST_XATTRS, f)
        assert result.stdout.split("\n")[:2] == ["", "ENODATA"], result.stderr
    finally:
        vol.umount()


def test_security_xattrs_are_not_stored(shared_volume: Volume) -> None:
    f = shared_volume.path("s")
    f.write_bytes(b"x")
    with pytest.raises(OSError) as info:
        os.setxattr(f, "security.label", b"x")
    assert info.value.errno == errno.EOPNOTSUPP
    assert not any(n.startswith("user.kmsfs") for n in os.listxattr(f))
