"""The audit log records every open and create through the mount, not only key operations.

The attack: on a shared mount (allow_other), a local user reads a file while
another process holds it open.  Its key is then already in use, no provider
is called, and the audit log, which recorded key operations only, kept no
trace of the read.  Now each open and create, allowed or refused by kmsfs, is
one record with the requester's uid, gid, pid and executable.

Opens that the kernel refuses itself (permission bits, checked by FUSE's
default_permissions before any request reaches kmsfs) never reach the daemon
and are not in this log: the last test pins that boundary.  Other users are
played by ``setpriv`` under a world-traversable directory in /tmp.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from benchlib.kms import Fault, KmsProxy, MotoServer
from support.cli import run_as, run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.volumes import Volume, check_log

from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.format.volume_config import load_config

pytestmark = requires_fuse

NOBODY = 65534
PYTHON = os.path.realpath(sys.executable)

OPEN_AS = """
import errno, os, sys
flags = {"read": os.O_RDONLY, "write": os.O_WRONLY, "create": os.O_WRONLY | os.O_CREAT | os.O_EXCL}
try:
    fd = os.open(sys.argv[2], flags[sys.argv[1]], 0o644)
    os.close(fd)
    print("OK", os.getpid())
except OSError as exc:
    print(errno.errorcode[exc.errno], os.getpid())
"""


def open_as(uid: int, how: str, path: Path) -> tuple[str, int]:
    """Open *path* once as *uid* ("read", "write" or "create"): (errno name or OK, pid)."""
    result = run_as(uid, sys.executable, "-c", OPEN_AS, how, path)
    assert result.returncode == 0, result.stderr
    answer, pid = result.stdout.split()
    return answer, int(pid)


def new_volume(top: Path, *init_args: str, key_args: tuple[str, ...] = ()) -> Volume:
    """A volume (a local key file unless *init_args* say otherwise), mounted with
    allow_other, an audit log and the options naming its key (*key_args*)."""
    backing, mnt = top / "backing", top / "mnt"
    backing.mkdir()
    mnt.mkdir()
    vol = Volume(top, backing, mnt, top / "master.key", top / "kmsfs.log")
    key_args = key_args or ("--key-file", str(vol.key_file))
    run_kmsfs("init", backing, "--plain-names", *(init_args or key_args))  # backing by name
    backing.chmod(0o755)
    audit = ["--audit-log", str(top / "audit.jsonl")]
    vol.mount_args = ["-o", "allow_other", *audit, *key_args]
    return vol


def records(vol: Volume, **match: object) -> list[dict[str, object]]:
    path = vol.root / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    found = [json.loads(line) for line in lines]
    return [r for r in found if all(r.get(k) == v for k, v in match.items())]


def test_every_open_of_a_file_held_open_is_recorded(shared_dir: Path) -> None:
    vol = new_volume(shared_dir)
    try:
        vol.mount()
        vol.path("shared").write_bytes(b"payroll")
        vol.path("shared").chmod(0o644)
        volume_id = load_config(vol.backing).volume_id.hex()
        file_id = FileHeader.parse(os.getxattr(vol.backing_path("shared"), XATTR_NAME)).file_id
        with open(vol.path("shared"), "rb") as holder:  # its key is in use from now on
            pids = []
            for _ in range(2):
                answer, pid = open_as(NOBODY, "read", vol.path("shared"))
                assert answer == "OK"
                pids.append(pid)
            assert holder.read() == b"payroll"
        vol.umount()
        theirs = records(vol, uid=NOBODY)
        assert len(theirs) == 2, theirs  # one per open, none of them a key operation
        for record, pid in zip(theirs, pids, strict=True):
            assert record["operation"] == "open" and record["result"] == "ok"
            assert record["path"] == "/shared" and record["access"] == "read"
            assert record["gid"] == NOBODY and record["pid"] == pid
            assert record["exe"] == PYTHON and record["process"]
            assert record["volume_id"] == volume_id and record["file_id"] == file_id.hex()
            assert record["error"] == ""
        ours = records(vol, uid=0, operation="open")
        assert [r["access"] for r in ours][-1] == "read"  # the holder
        creates = records(vol, operation="create")
        assert [(r["path"], r["result"], r["uid"]) for r in creates] == [("/shared", "ok", 0)]
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)


def test_creates_writes_and_refused_opens_are_recorded(shared_dir: Path) -> None:
    vol = new_volume(shared_dir)
    try:
        vol.mount()
        vol.path("pub").mkdir()
        vol.path("pub").chmod(0o777)
        assert open_as(NOBODY, "create", vol.path("pub/mine"))[0] == "OK"
        assert open_as(NOBODY, "write", vol.path("pub/mine"))[0] == "OK"
        vol.path("broken").write_bytes(b"x" * 100)
        vol.path("broken").chmod(0o666)
        header = FileHeader.parse(os.getxattr(vol.backing_path("broken"), XATTR_NAME))
        vol.umount()
        forged = FileHeader(header.volume_id, os.urandom(16), header.block_size, header.entries)
        os.setxattr(vol.backing_path("broken"), XATTR_NAME, forged.pack())
        vol.mount()
        answer, pid = open_as(NOBODY, "read", vol.path("broken"))
        assert answer == "EIO"
        vol.umount()
        theirs = [r for r in records(vol, uid=NOBODY) if r["operation"] in ("open", "create")]
        assert [(r["operation"], r["path"], r["access"], r["result"]) for r in theirs] == [
            ("create", "/pub/mine", "write", "ok"),
            ("open", "/pub/mine", "write", "ok"),
            ("open", "/broken", "read", "EIO"),
        ]
        refused = theirs[-1]
        assert refused["pid"] == pid and refused["exe"] == PYTHON
        assert "cannot unwrap" in str(refused["error"]) and refused["file_id"] is None
        assert records(vol, uid=NOBODY, operation="unwrap")[0]["result"] == "WrongKeyError"
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)


@pytest.mark.aws
def test_open_refused_by_the_key_provider_is_recorded_as_eacces(
    shared_dir: Path, moto: MotoServer, proxy: KmsProxy, aws_env: None
) -> None:
    """moto enforces no key policy: the proxy answers AccessDeniedException in its place."""
    arn = moto.create_key()
    kms = ("--kms-key-id", arn, "--kms-endpoint-url", proxy.url)
    vol = new_volume(shared_dir, "--provider", "aws-kms", *kms, key_args=kms)
    try:
        vol.mount()
        vol.path("f").write_bytes(b"data")
        vol.path("f").chmod(0o644)
        vol.remount()  # the key is no longer cached
        proxy.inject("Decrypt", Fault("AccessDeniedException", message="not for you"))
        answer, pid = open_as(NOBODY, "read", vol.path("f"))
        assert answer == "EACCES"
        proxy.clear_faults()
        assert open_as(NOBODY, "read", vol.path("f"))[0] == "OK"
        vol.umount()
        opens = records(vol, uid=NOBODY, operation="open")
        assert [(r["result"], r["path"]) for r in opens] == [("EACCES", "/f"), ("ok", "/f")]
        assert opens[0]["pid"] == pid and "AccessDeniedException" in str(opens[0]["error"])
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)


def test_opens_the_kernel_refuses_never_reach_the_log(shared_dir: Path) -> None:
    """With default_permissions the kernel checks modes itself: such an EACCES is not
    kmsfs's to record (auditd sees it); README says so."""
    vol = new_volume(shared_dir)
    try:
        vol.mount()
        vol.path("private").write_bytes(b"root only")
        vol.path("private").chmod(0o600)
        assert open_as(NOBODY, "read", vol.path("private"))[0] == "EACCES"
        vol.umount()
        assert records(vol, uid=NOBODY) == []
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)
