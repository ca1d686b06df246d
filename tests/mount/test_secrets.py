"""No key material in the backing directory, logs or audit; no core dumps;
plaintext planted in the backing directory is never served.
"""

from __future__ import annotations

import base64
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.fuse import requires_fuse
from support.reliability_util import mount_pid
from support.volumes import Volume

from kmsfs.format.content import derive_content_key
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.keys.local import LocalProvider, parse_key_file
from kmsfs.keys.provider import KeyContext

pytestmark = requires_fuse

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
        "import ctypes; from kmsfs.backing.syscalls import disable_core_dumps;"
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
