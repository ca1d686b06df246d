"""Rewrap between two AWS KMS keys with KMS ReEncrypt: the file keys never leave KMS.

Against moto's KMS server over HTTP, through the counting proxy
(scripts/benchlib/kms.py): the proxy's records show which KMS operations ran,
with which key IDs and encryption contexts.
"""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest
from benchlib.kms import REGION, Fault, KmsProxy, MotoServer
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.lifecycle_support import entry_refs
from support.volumes import Volume, make_volume

from kmsfs.errors import KeyAccessDenied, WrongKeyError
from kmsfs.format.header import WrappedKey
from kmsfs.format.volume_config import load_config
from kmsfs.keys.aws_kms import AwsKmsProvider, client_config
from kmsfs.keys.cache import NullCache
from kmsfs.keys.events import KeyEvent
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import KeyContext, wipe

pytestmark = pytest.mark.aws

CONTEXT = KeyContext(bytes(range(16)), bytes(range(16, 32)))


def provider(proxy: KmsProxy, arn: str) -> AwsKmsProvider:
    client = boto3.client("kms", endpoint_url=proxy.url, region_name=REGION, config=client_config())
    return AwsKmsProvider(client, arn, REGION, proxy.url)


def test_reencrypt_moves_a_key_inside_kms(moto: MotoServer, proxy: KmsProxy, aws_env: None) -> None:
    old, new = provider(proxy, moto.create_key()), provider(proxy, moto.create_key())
    key, wrapped = old.generate_data_key(CONTEXT)
    proxy.reset_calls()
    events: list[KeyEvent] = []
    ring = Keyring(CONTEXT.volume_id, [new], NullCache(), events.append)
    moved = ring.reencrypt(new, wrapped, CONTEXT)
    assert (moved.provider, moved.key_ref) == ("aws-kms", new.key_arn)
    [call] = proxy.calls
    assert call.operation == "ReEncrypt" and "Plaintext" not in call.response
    assert call.request["SourceKeyId"] == old.key_arn
    assert call.request["DestinationKeyId"] == new.key_arn
    assert call.request["SourceEncryptionContext"] == CONTEXT.as_dict()
    assert call.request["DestinationEncryptionContext"] == CONTEXT.as_dict()
    assert [(e.operation, e.provider, e.key_ref, e.result) for e in events] == [
        ("reencrypt", "aws-kms", new.key_arn, "ok")
    ]
    assert new.unwrap(moved, CONTEXT) == key  # the same data key, now under the new key
    with pytest.raises(WrongKeyError):  # bound to the same context as before
        new.unwrap(moved, KeyContext(CONTEXT.volume_id, bytes(16)))
    wipe(key)
    for p in (old, new, ring):
        p.close()


def test_reencrypt_refuses_what_the_header_cannot_vouch_for(
    moto: MotoServer, proxy: KmsProxy, aws_env: None
) -> None:
    old, new = provider(proxy, moto.create_key()), provider(proxy, moto.create_key())
    key, wrapped = old.generate_data_key(CONTEXT)
    wipe(key)
    proxy.reset_calls()
    # another file ID: KMS refuses the blob for that context
    with pytest.raises(WrongKeyError, match="InvalidCiphertextException"):
        new.reencrypt(wrapped, KeyContext(CONTEXT.volume_id, os.urandom(16)))
    # a key reference planted in a header: another account's key, an alias, another provider
    account = old.key_arn.split(":")[4]
    foreign = old.key_arn.replace(f":{account}:", ":999999999999:")
    for planted in (
        WrappedKey("aws-kms", foreign, wrapped.blob),
        WrappedKey("aws-kms", "alias/attacker", wrapped.blob),
        WrappedKey("local", old.key_arn, wrapped.blob),
    ):
        with pytest.raises(WrongKeyError):
            new.reencrypt(planted, CONTEXT)
    assert proxy.count("ReEncrypt") == 1  # only the first reached KMS
    proxy.inject("ReEncrypt", Fault("AccessDeniedException", message="no ReEncryptFrom"))
    with pytest.raises(KeyAccessDenied, match="ReEncrypt failed: AccessDeniedException"):
        new.reencrypt(wrapped, CONTEXT)
    old.close()
    new.close()


@requires_fuse
@pytest.mark.mount
def test_rewrap_between_kms_keys_uses_reencrypt_and_no_decrypt(
    tmp_path: Path, moto: MotoServer, proxy: KmsProxy, aws_env: None
) -> None:
    vol = make_volume(tmp_path, key=False)
    try:
        rewrap_and_read(vol, moto, proxy)
    finally:
        force_unmount(vol.mountpoint)


def rewrap_and_read(vol: Volume, moto: MotoServer, proxy: KmsProxy) -> None:
    old_arn, new_arn = moto.create_key(), moto.create_key()
    kms = ("--kms-endpoint-url", proxy.url)
    run_kmsfs(
        "init", vol.backing, "--plain-names", "--provider", "aws-kms", "--kms-key-id", old_arn, *kms
    )
    vol.mount("--kms-key-id", old_arn, *kms)
    contents = {f"d/f{n}": os.urandom(3000 + n) for n in range(12)}
    vol.path("d").mkdir()
    for rel, data in contents.items():
        vol.path(rel).write_bytes(data)
    vol.umount()

    proxy.reset_calls()
    result = run_kmsfs(
        "rewrap", vol.backing, "--provider", "aws-kms", "--kms-key-id", new_arn, *kms, "-q",
        "--old-kms-key-id", old_arn,
    )  # fmt: skip
    assert "12 re-wrapped (12 by the provider's re-encrypt)" in result.stdout, result.stdout
    assert proxy.count("ReEncrypt") == len(contents)
    file_decrypts = [c for c in proxy.ops("Decrypt") if "kmsfs:purpose" not in c.context]
    assert file_decrypts == []  # only the old key's key check was decrypted
    # no file key was made or wrapped anew (the new key's own checks aside)
    for operation in ("GenerateDataKey", "Encrypt"):
        assert [c for c in proxy.ops(operation) if "kmsfs:purpose" not in c.context] == []
    for call in proxy.ops("ReEncrypt"):
        assert call.request["SourceKeyId"] == old_arn
        assert call.response["KeyId"] == new_arn and "Plaintext" not in call.response

    config = load_config(vol.backing)
    assert [k.key_ref for k in config.keys] == [new_arn]  # the old key is gone
    for rel in contents:
        assert entry_refs(vol.backing / rel) == [new_arn]
    proxy.reset_calls()
    vol.mount("--kms-key-id", new_arn, *kms)
    for rel, data in contents.items():
        assert vol.path(rel).read_bytes() == data
    vol.umount()
    assert {c.request["KeyId"] for c in proxy.ops("Decrypt")} == {new_arn}
    assert all(old_arn not in str(c.request) for c in proxy.calls)
