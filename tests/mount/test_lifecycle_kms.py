"""Key lifecycle across providers: rewrap local <-> aws-kms (moto over HTTP), KMS key rotation."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchlib.kms import KmsProxy, MotoServer
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.lifecycle_support import entry_refs, populate
from support.volumes import Volume, make_volume

from kmsfs.format.volume_config import load_config

pytestmark = pytest.mark.aws


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Volume]:
    volume = make_volume(tmp_path, key=False)
    try:
        yield volume
    finally:
        force_unmount(volume.mountpoint)


def _read_all(vol: Volume, contents: dict[str, bytes]) -> None:
    for rel, data in contents.items():
        assert vol.path(rel).read_bytes() == data, rel


@requires_fuse
def test_rewrap_local_to_aws_kms_and_back(
    vol: Volume, tmp_path: Path, moto: MotoServer, proxy: KmsProxy, aws_env: None
) -> None:
    run_kmsfs("init", vol.backing, "--plain-names", "--key-file", vol.key_file)
    local_ref = load_config(vol.backing).keys[0].key_ref
    contents = populate(vol.backing, vol.key_file, 30, size=5000)
    arn = moto.create_key()

    start = time.monotonic()
    result = run_kmsfs(
        "rewrap",
        vol.backing,
        "--provider",
        "aws-kms",
        "--kms-key-id",
        arn,
        "--kms-endpoint-url",
        proxy.url,
        "--old-key-file",
        vol.key_file,
        "-q",
    )
    elapsed = time.monotonic() - start
    assert "rewrap: 30 files, 30 re-wrapped" in result.stdout, result.stdout
    config = load_config(vol.backing)
    assert [(k.provider, k.key_ref) for k in config.keys] == [("aws-kms", arn)]
    for rel in contents:
        assert entry_refs(vol.backing / rel) == [arn]
    # rewrap made one Encrypt per file (the data keys stay the same) plus the key check
    assert proxy.count("Encrypt") >= 30
    print(f"rewrap local -> aws-kms of 30 files: {elapsed:.1f} s")

    vol.key_file.rename(tmp_path / "old.key")  # the local key is gone: KMS only
    vol.key_args = ["--kms-key-id", arn, "--kms-endpoint-url", proxy.url]
    proxy.reset_calls()
    vol.mount()
    _read_all(vol, contents)
    vol.umount()
    assert proxy.count("Decrypt") == 1 + len(contents)  # key check, then one per file

    # and back to a new local key file: afterwards KMS is never contacted
    new_key = tmp_path / "new.key"
    result = run_kmsfs(
        "rewrap", vol.backing, "--key-file", new_key, "--old-kms-key-id", arn,
        "--kms-endpoint-url", proxy.url, "-q",
    )  # fmt: skip
    assert "rewrap: 30 files, 30 re-wrapped" in result.stdout, result.stdout
    config = load_config(vol.backing)
    assert [k.provider for k in config.keys] == ["local"]
    assert config.keys[0].key_ref != local_ref
    proxy.reset_calls()
    vol.mount("--key-file", str(new_key))
    _read_all(vol, contents)
    vol.umount()
    assert proxy.calls == []


@requires_fuse
def test_files_survive_kms_key_rotation(
    vol: Volume, moto: MotoServer, proxy: KmsProxy, aws_env: None
) -> None:
    """KMS automatic or on-demand rotation keeps the key ARN: nothing to do in kmsfs.

    (moto records the rotation but does not change key material, see
    ENVIRONMENT.md; on AWS, old ciphertexts keep decrypting by design.)
    """
    arn = moto.create_key()
    run_kmsfs(
        "init",
        vol.backing,
        "--plain-names",  # the test finds backing files by name
        "--provider",
        "aws-kms",
        "--kms-key-id",
        arn,
        "--kms-endpoint-url",
        proxy.url,
    )
    vol.key_args = ["--kms-key-id", arn, "--kms-endpoint-url", proxy.url]
    vol.mount()
    contents = {f"f{n}": os.urandom(7000 + n) for n in range(5)}
    for rel, data in contents.items():
        vol.path(rel).write_bytes(data)
    vol.umount()

    client = moto.client()
    client.enable_key_rotation(KeyId=arn)
    client.rotate_key_on_demand(KeyId=arn)
    rotations = client.list_key_rotations(KeyId=arn)["Rotations"]
    assert len(rotations) == 1

    vol.mount()
    _read_all(vol, contents)
    vol.path("after").write_bytes(b"written after rotation")
    vol.umount()
    vol.mount()
    assert vol.path("after").read_bytes() == b"written after rotation"
    _read_all(vol, contents)
    vol.umount()
    assert entry_refs(vol.backing / "after") == [arn]
