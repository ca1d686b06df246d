"""The aws-kms provider against moto's KMS server over real HTTP, through a counting proxy.

moto (started here, on 127.0.0.1) does real envelope encryption: a wrong or
missing encryption context really fails with InvalidCiphertextException.  It
never returns some errors AWS does (disabled key, throttling, 5xx, access
denied by policy): for those the proxy answers in moto's place with the AWS
error code (``KmsProxy.inject``), and the error mapping of every code is
checked in-process with botocore's Stubber; each such test says so.

Dummy credentials reach the kmsfs processes through the environment
(monkeypatch), never the command line.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from benchlib.kms import REGION, Fault, KmsProxy, MotoServer
from botocore.stub import Stubber
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.volumes import Volume, make_volume

from kmsfs.errors import KeyAccessDenied, KeyUnavailable, ProviderError, WrongKeyError
from kmsfs.format.header import XATTR_NAME, FileHeader, WrappedKey
from kmsfs.format.volume_config import load_config
from kmsfs.keys.aws_kms import AwsKmsProvider
from kmsfs.keys.provider import KeyContext

pytestmark = pytest.mark.aws

# One KMS call never takes longer than this, whatever the endpoint does
# (aws_kms: 3 attempts x 2 s read timeout + jittered backoff), plus FUSE slack.
KMS_CALL_BOUND = 12.0


@dataclass
class KmsVolume:
    """A Volume on an aws-kms key.  Attributes: vol, arn, proxy, audit (path)."""

    vol: Volume
    arn: str
    proxy: KmsProxy
    audit: Path

    @property
    def volume_id(self) -> str:
        return load_config(self.vol.backing).volume_id.hex()

    def header(self, name: str) -> FileHeader:
        return FileHeader.parse(os.getxattr(self.vol.backing_path(name), XATTR_NAME))

    def audit_records(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


def _init(vol: Volume, key_id: str, proxy: KmsProxy, *extra: str) -> None:
    run_kmsfs(
        "init",
        vol.backing,
        "--plain-names",  # the tests find backing files by name
        "--provider",
        "aws-kms",
        "--kms-key-id",
        key_id,
        "--kms-endpoint-url",
        proxy.url,
        *extra,
    )


@pytest.fixture
def kms_volume(
    tmp_path: Path, moto: MotoServer, proxy: KmsProxy, aws_env: None
) -> Iterator[KmsVolume]:
    """An aws-kms volume (moto key, endpoint = the proxy), created but not mounted."""
    arn = moto.create_key()
    vol = make_volume(tmp_path, key=False)
    _init(vol, arn, proxy)
    vol.key_args = ["--kms-key-id", arn, "--kms-endpoint-url", proxy.url]
    audit = tmp_path / "audit.jsonl"
    vol.mount_args = ["--audit-log", str(audit)]
    proxy.reset_calls()
    try:
        yield KmsVolume(vol, arn, proxy, audit)
    finally:
        force_unmount(vol.mountpoint)
        log = vol.log_text()
        assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


def _errno_of(func: object, *args: object) -> int:
    try:
        func(*args)  # type: ignore[operator]
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    raise AssertionError(f"{func} did not fail")


# -- init -----------------------------------------------------------------------


@pytest.mark.nomount
def test_init_resolves_alias_and_records_no_credentials(
    tmp_path: Path, moto: MotoServer, proxy: KmsProxy, aws_env: None
) -> None:
    arn = moto.create_key(alias="alias/kmsfs-init")
    vol = make_volume(tmp_path, key=False)
    result = run_kmsfs(
        "init",
        vol.backing,
        "--provider",
        "aws-kms",
        "--kms-key-id",
        "alias/kmsfs-init",
        "--kms-region",
        REGION,
        "--kms-endpoint-url",
        proxy.url,
    )
    assert f"master key: aws-kms {arn}" in result.stdout
    config = load_config(vol.backing)
    (key,) = config.keys
    assert (key.provider, key.key_ref) == ("aws-kms", arn)
    assert key.settings == {"key_arn": arn, "region": REGION, "endpoint_url": proxy.url}
    text = (vol.backing / ".kmsfs.json").read_text()
    assert "testing" not in text  # the dummy access key, secret and token
    assert [c.operation for c in proxy.calls] == ["DescribeKey", "GenerateDataKey", "Encrypt"]
    describe, test_generate, check = proxy.calls
    assert describe.request["KeyId"] == "alias/kmsfs-init"
    assert test_generate.request["KeyId"] == arn
    assert test_generate.request["KeySpec"] == "AES_256"
    assert test_generate.context["kmsfs:purpose"] == "init-test"
    assert check.context == {
        "kmsfs:volume-id": config.volume_id.hex(),
        "kmsfs:file-id": "0" * 32,
        "kmsfs:purpose": "volume-key",  # format 2: the volume key is the check value
    }


@pytest.mark.nomount
def test_init_unknown_key_is_refused(tmp_path: Path, proxy: KmsProxy, aws_env: None) -> None:
    vol = make_volume(tmp_path, key=False)
    missing = f"arn:aws:kms:{REGION}:123456789012:key/00000000-0000-0000-0000-000000000000"
    result = run_kmsfs(
        "init", vol.backing, "--provider", "aws-kms", "--kms-key-id", missing,
        "--kms-endpoint-url", proxy.url, check=False,
    )  # fmt: skip
    assert result.returncode == 6
    assert "NotFoundException" in result.stderr and missing in result.stderr
    assert not (vol.backing / ".kmsfs.json").exists()


def test_missing_credentials_at_init_and_mount(
    kms_volume: KmsVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    result = kms_volume.vol.mount(check=False)
    assert result.returncode == 3, result.stderr
    assert "no AWS credentials" in result.stderr and kms_volume.arn in result.stderr
    (tmp_path / "other").mkdir()
    other = make_volume(tmp_path / "other", key=False)
    result = run_kmsfs(
        "init", other.backing, "--plain-names", "--provider", "aws-kms", "--kms-key-id",
        kms_volume.arn,
        "--kms-endpoint-url", kms_volume.proxy.url, check=False,
    )  # fmt: skip
    assert result.returncode == 3 and "no AWS credentials" in result.stderr
    assert kms_volume.proxy.calls == []


def test_unreachable_endpoint_at_mount_fails_in_bounded_time(kms_volume: KmsVolume) -> None:
    kms_volume.proxy.stop()
    start = time.monotonic()
    result = kms_volume.vol.mount(check=False)
    assert time.monotonic() - start < KMS_CALL_BOUND
    assert result.returncode == 6, result.stderr
    assert "unreachable" in result.stderr and kms_volume.arn in result.stderr


# -- the main path: create, read, remount, counts ---------------------------------


@requires_fuse
def test_create_read_remount_one_kms_call_per_file(kms_volume: KmsVolume) -> None:
    vol, proxy = kms_volume.vol, kms_volume.proxy
    volume_id = kms_volume.volume_id
    files = {f"topdir/secret-name-{i}.bin": os.urandom(1000 + i * 997) for i in range(20)}
    vol.mount()
    (vol.mountpoint / "topdir").mkdir()
    for name, data in files.items():
        vol.path(name).write_bytes(data)
    for _ in range(2):
        for name, data in files.items():
            assert vol.path(name).read_bytes() == data
    vol.umount()
    first = list(proxy.calls)

    # Every created file's header entry is the CiphertextBlob of exactly one
    # GenerateDataKey, made for that file's context: volume ID and file ID, no path.
    generated = {c.blob("CiphertextBlob"): c for c in first if c.operation == "GenerateDataKey"}
    assert all(c.status == 200 for c in generated.values())
    headers = {name: kms_volume.header(name) for name in files}
    assert len({h.file_id for h in headers.values()}) == len(files)
    for header in headers.values():
        (entry,) = header.entries
        assert (entry.provider, entry.key_ref) == ("aws-kms", kms_volume.arn)
        call = generated[entry.blob]
        assert call.request["KeyId"] == kms_volume.arn
        assert call.request["KeySpec"] == "AES_256"
        assert call.context == {"kmsfs:volume-id": volume_id, "kmsfs:file-id": header.file_id.hex()}
    for call in first:
        body = json.dumps(call.request)
        assert "secret-name" not in body and "topdir" not in body

    # Keys generated = keys given to files + prefetched keys dropped unused at
    # unmount, each accounted for in the audit log by file ID.
    records = kms_volume.audit_records()
    ops = Counter(r["operation"] for r in records)
    assert ops["generate"] + ops["assign"] == len(files)
    assert ops["generate"] + ops["prefetch"] == len(generated)
    assert ops["prefetch"] == ops["assign"] + ops["discard"]
    used = {r["file_id"] for r in records if r["operation"] in ("generate", "assign")}
    assert used == {h.file_id.hex() for h in headers.values()}
    made = {c.context["kmsfs:file-id"] for c in generated.values()}
    discarded = {r["file_id"] for r in records if r["operation"] == "discard"}
    assert made == used | discarded and not used & discarded

    # Reading back in the same mount: no Decrypt beyond the mount's key check.
    assert Counter(c.operation for c in first)["Decrypt"] == 1

    # After a remount: one Decrypt per file, whatever the number of reads.
    proxy.reset_calls()
    vol.mount()
    for _ in range(3):
        for name, data in files.items():
            assert vol.path(name).read_bytes() == data
    assert sorted(os.listdir(vol.path("topdir"))) == sorted(n.split("/")[1] for n in files)
    vol.umount()
    decrypts = proxy.ops("Decrypt")
    assert len(decrypts) == 1 + len(files)  # the key check, then one per file
    assert proxy.count("GenerateDataKey") == 0  # no create: the pool never started
    by_file = Counter(c.context["kmsfs:file-id"] for c in decrypts[1:])
    assert set(by_file.values()) == {1}
    for call in decrypts:
        assert call.request["KeyId"] == kms_volume.arn
        assert call.response["KeyId"] == kms_volume.arn

    # The audit trail: who, what, which file; never key material.
    records = kms_volume.audit_records()
    unwraps = [r for r in records if r["operation"] == "unwrap" and r["file_id"] != "volume-key"]
    assert len(unwraps) == len(files)
    for record in unwraps:
        assert record["path"] in {f"/{n}" for n in files}
        assert record["uid"] == os.getuid() and record["pid"] and record["process"]
        assert record["result"] == "ok" and isinstance(record["latency_ms"], float)
        assert record["key_ref"] == kms_volume.arn and record["volume_id"] == volume_id
    created = [r for r in records if r["operation"] in ("assign", "generate") and r.get("path")]
    assert sorted(r["path"] for r in created) == sorted(f"/{n}" for n in files)
    hits = [r for r in records if r["operation"] == "cache-hit"]
    assert len(hits) >= 2 * len(files)
    audit_text = kms_volume.audit.read_text() + vol.log_text()
    for call in first + decrypts:
        plaintext = call.response.get("Plaintext")
        if plaintext:
            assert plaintext not in audit_text
            assert base64.b64decode(plaintext).hex() not in audit_text


@requires_fuse
def test_foreign_and_mismatched_headers_give_eio(
    kms_volume: KmsVolume, tmp_path: Path, proxy: KmsProxy
) -> None:
    vol = kms_volume.vol
    (tmp_path / "other").mkdir()
    other = make_volume(tmp_path / "other", key=False)
    _init(other, kms_volume.arn, proxy)  # same KMS key, another volume
    other.key_args = vol.key_args
    try:
        other.mount()
        other.path("theirs").write_bytes(b"their secret")
        other.umount()
    finally:
        force_unmount(other.mountpoint)
    vol.mount()
    for name in ("swapped", "context", "truncated", "good"):
        vol.path(name).write_bytes(name.encode() * 100)
    vol.umount()

    def set_header(name: str, header: FileHeader | bytes) -> None:
        raw = header if isinstance(header, bytes) else header.pack()
        os.setxattr(vol.backing_path(name), XATTR_NAME, raw)

    # A header from another volume (same KMS key): refused before any KMS call.
    set_header("swapped", os.getxattr(other.backing_path("theirs"), XATTR_NAME))
    # This volume's wrapped key for "context", presented as another file: KMS
    # refuses it (the encryption context is the AAD): InvalidCiphertextException.
    good = kms_volume.header("good")
    ctx = kms_volume.header("context")
    set_header("context", FileHeader(good.volume_id, good.file_id, good.block_size, ctx.entries))
    # A truncated CiphertextBlob.
    trunc = kms_volume.header("truncated")
    entry = trunc.entries[0]
    short = WrappedKey(entry.provider, entry.key_ref, entry.blob[:40])
    set_header("truncated", FileHeader(trunc.volume_id, trunc.file_id, trunc.block_size, (short,)))

    proxy.reset_calls()
    vol.mount()
    for name in ("swapped", "context", "truncated"):
        assert _errno_of(vol.path(name).read_bytes) == errno.EIO, name
    assert vol.path("good").read_bytes() == b"good" * 100
    vol.umount()
    log = vol.log_text()
    assert "/swapped: header belongs to volume" in log
    assert "/context:" in log and "InvalidCiphertextException" in log
    assert "/truncated:" in log
    failed = [c for c in proxy.ops("Decrypt") if c.status != 200]
    assert [c.response["__type"] for c in failed] == ["InvalidCiphertextException"] * 2
    # Nothing was written to the refused files.
    for name in ("context", "truncated"):
        assert len(vol.backing_path(name).read_bytes()) > 0


# -- outages and faults ---------------------------------------------------------------


@requires_fuse
def test_endpoint_down_cached_files_read_creates_fail_then_recover(kms_volume: KmsVolume) -> None:
    vol, proxy = kms_volume.vol, kms_volume.proxy
    vol.mount()
    vol.path("old").write_bytes(b"before the mount")
    vol.remount()
    vol.path("cached").write_bytes(b"x" * 10000)
    assert vol.path("cached").read_bytes() == b"x" * 10000

    proxy.stop()
    assert vol.path("cached").read_bytes() == b"x" * 10000  # key cache
    start = time.monotonic()
    assert _errno_of(vol.path("old").read_bytes) == errno.EIO  # never unwrapped in this mount
    assert time.monotonic() - start < KMS_CALL_BOUND
    # Creates use prefetched keys while there are some (they were made by KMS
    # before the outage), then fail with EIO, each in bounded time.
    created = 0
    for index in range(200):
        start = time.monotonic()
        try:
            vol.path(f"new-{index}").write_bytes(b"new")
        except OSError as exc:
            assert exc.errno == errno.EIO
            assert time.monotonic() - start < KMS_CALL_BOUND
            break
        created += 1
    else:
        pytest.fail("creates kept succeeding with the KMS endpoint down")
    assert created <= 64  # the pool's size
    assert not vol.path(f"new-{created}").exists()

    proxy.start()
    vol.path("after").write_bytes(b"KMS is back")
    assert vol.path("after").read_bytes() == b"KMS is back"
    assert vol.path("old").read_bytes() == b"before the mount"
    for index in range(created):
        assert vol.path(f"new-{index}").read_bytes() == b"new"
    vol.umount()
    assert "unreachable" in vol.log_text()


@requires_fuse
def test_hung_endpoint_fails_in_bounded_time(kms_volume: KmsVolume) -> None:
    vol, proxy = kms_volume.vol, kms_volume.proxy
    vol.mount()
    vol.path("f").write_bytes(b"data")
    vol.remount()
    proxy.hang()  # accepts and never answers: only the read timeout ends the wait
    start = time.monotonic()
    assert _errno_of(vol.path("f").read_bytes) == errno.EIO
    elapsed = time.monotonic() - start
    assert elapsed < KMS_CALL_BOUND
    proxy.unhang()
    assert vol.path("f").read_bytes() == b"data"
    vol.umount()
    assert "ReadTimeoutError" in vol.log_text()


@requires_fuse
def test_disabled_key_and_access_denied_give_eacces(kms_volume: KmsVolume) -> None:
    """moto decrypts under a disabled key and enforces no key policy: the proxy
    answers DisabledException / AccessDeniedException in its place."""
    vol, proxy = kms_volume.vol, kms_volume.proxy
    vol.mount()
    vol.path("f").write_bytes(b"data")
    vol.remount()
    proxy.inject("Decrypt", Fault("DisabledException", message="key is disabled"))
    assert _errno_of(vol.path("f").read_bytes) == errno.EACCES
    proxy.clear_faults()
    proxy.inject("GenerateDataKey", Fault("AccessDeniedException", message="not allowed"))
    assert _errno_of(vol.path("g").write_bytes, b"x") == errno.EACCES
    assert not vol.path("g").exists()
    proxy.clear_faults()
    assert vol.path("f").read_bytes() == b"data"
    vol.umount()
    log = vol.log_text()
    assert f"/f: aws-kms key {kms_volume.arn}: Decrypt failed: DisabledException" in log
    assert f"aws-kms key {kms_volume.arn}: GenerateDataKey failed: AccessDeniedException" in log
    denied = [r for r in kms_volume.audit_records() if r["result"] == "KeyAccessDenied"]
    assert {r["operation"] for r in denied} >= {"unwrap", "generate"}


@requires_fuse
def test_throttling_and_5xx_are_retried(kms_volume: KmsVolume) -> None:
    """moto never throttles or fails: the proxy answers ThrottlingException and
    KMSInternalException (HTTP 500) in its place.  botocore retries them with
    jittered backoff; a persistent one becomes EIO in bounded time."""
    vol, proxy = kms_volume.vol, kms_volume.proxy
    vol.mount()
    vol.path("a").write_bytes(b"a")
    vol.path("b").write_bytes(b"b")
    vol.path("c").write_bytes(b"c")
    vol.remount()
    proxy.reset_calls()
    proxy.inject("Decrypt", Fault("ThrottlingException", message="Rate exceeded"), times=2)
    assert vol.path("a").read_bytes() == b"a"
    assert [c.status for c in proxy.ops("Decrypt")] == [400, 400, 200]
    proxy.inject("Decrypt", Fault("KMSInternalException", status=500), times=1)
    assert vol.path("b").read_bytes() == b"b"
    proxy.inject("Decrypt", Fault("ThrottlingException", message="Rate exceeded"))
    start = time.monotonic()
    assert _errno_of(vol.path("c").read_bytes) == errno.EIO
    assert time.monotonic() - start < KMS_CALL_BOUND
    proxy.clear_faults()
    assert vol.path("c").read_bytes() == b"c"
    vol.umount()
    assert f"/c: aws-kms key {kms_volume.arn}: Decrypt failed: ThrottlingException" in (
        vol.log_text()
    )


# -- error mapping of every code (in-process, Stubber) -------------------------------

ARN = f"arn:aws:kms:{REGION}:111122223333:key/11111111-2222-3333-4444-555555555555"
CONTEXT = KeyContext(bytes(range(16)), bytes(range(16, 32)))


@pytest.mark.nomount
@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("AccessDeniedException", 400, KeyAccessDenied),
        ("DisabledException", 400, KeyAccessDenied),
        ("KMSInvalidStateException", 400, KeyAccessDenied),
        ("NotFoundException", 400, KeyAccessDenied),
        ("InvalidCiphertextException", 400, WrongKeyError),
        ("IncorrectKeyException", 400, WrongKeyError),
        ("ThrottlingException", 400, KeyUnavailable),
        ("KMSInternalException", 500, KeyUnavailable),
        ("DependencyTimeoutException", 503, KeyUnavailable),
        ("SomethingNewException", 400, ProviderError),
    ],
)
def test_error_mapping(code: str, status: int, error: type[ProviderError]) -> None:
    """Most of these codes moto never returns: botocore's Stubber answers instead."""
    client = boto3.client(
        "kms", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    provider = AwsKmsProvider(client, ARN, REGION)
    wrapped = WrappedKey("aws-kms", ARN, b"\x01" * 96)
    with Stubber(client) as stub:
        stub.add_client_error("decrypt", service_error_code=code, http_status_code=status)
        with pytest.raises(error) as info:
            provider.unwrap(wrapped, CONTEXT)
    assert type(info.value) is error
    assert info.value.code == code
    assert ARN in str(info.value) and code in str(info.value)
    assert info.value.temporary == (error is KeyUnavailable)
    provider.close()


@pytest.mark.nomount
def test_decrypt_answer_for_another_key_is_refused() -> None:
    """AWS never answers for another key when KeyId is pinned; the check is
    defence in depth, so the answer is made with Stubber."""
    client = boto3.client(
        "kms", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    provider = AwsKmsProvider(client, ARN, REGION)
    other = ARN.replace("11111111", "99999999")
    with Stubber(client) as stub:
        stub.add_response(
            "decrypt",
            {"KeyId": other, "Plaintext": bytes(32), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
            {
                "CiphertextBlob": b"\x01" * 96,
                "KeyId": ARN,
                "EncryptionContext": CONTEXT.as_dict(),
            },
        )
        with pytest.raises(WrongKeyError, match="answered for key"):
            provider.unwrap(WrappedKey("aws-kms", ARN, b"\x01" * 96), CONTEXT)
    provider.close()
