"""The PKCS#11 provider on SoftHSM2: a fresh token store per test session.

CLI tests run ``kmsfs`` in subprocesses with ``SOFTHSM2_CONF`` passed through
``run_kmsfs(..., env=...)``; provider tests load the module in this process
(the session fixture points ``SOFTHSM2_CONF`` at the same store first, before
anything loads the module).  Every test uses its own key label.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.softhsm import MODULE, USER_PIN, SoftHSM, available
from support.volumes import Volume, make_volume

from kmsfs.format.header import XATTR_NAME, FileHeader, WrappedKey

pytestmark = [
    pytest.mark.pkcs11,
    pytest.mark.skipif(not available(), reason="needs SoftHSM2 and python-pkcs11"),
]

TOKEN = "kmsfs-test"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    store = SoftHSM.create(tmp_path_factory.mktemp("softhsm"))
    store.init_token(TOKEN)
    store.init_token("kmsfs-spare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(store.conf))  # for the in-process provider tests
        yield store


@pytest.fixture
def label() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def p11_args(hsm: SoftHSM, key: str, pin_file: Path | None = None) -> list[str]:
    return [
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token",
        TOKEN,
        "--pkcs11-key",
        key,
        "--pkcs11-pin-file",
        str(pin_file or hsm.pin_file()),
    ]


def init(vol: Volume, hsm: SoftHSM, key: str, *extra: str, check: bool = True):  # type: ignore[no-untyped-def]
    vol.key_args = p11_args(hsm, key)  # what this host gives to find the key at mount
    return run_kmsfs(
        "init", vol.backing, "--plain-names", "--provider", "pkcs11", *p11_args(hsm, key),
        *extra, env=hsm.env, check=check,
    )  # fmt: skip


def mount(vol: Volume, hsm: SoftHSM, *extra: str, check: bool = True):  # type: ignore[no-untyped-def]
    """Mount with this host's module, token, key and PIN file (``vol.key_args``) unless
    *extra* names them."""
    named = "--pkcs11-module" in extra or "--trust-volume-settings" in extra
    host = [] if named else vol.key_args
    result = run_kmsfs(
        "mount", vol.backing, vol.mountpoint, "--log-file", vol.log_file, "--log-level", "debug",
        *host, *extra, env=hsm.env, check=check,
    )  # fmt: skip
    if result.returncode == 0:
        vol.mounted = True
    return result


def remount(vol: Volume, hsm: SoftHSM, *extra: str) -> None:
    vol.umount()
    mount(vol, hsm, *extra)


@pytest.fixture
def p11vol(tmp_path: Path, hsm: SoftHSM) -> Iterator[Volume]:
    """A directory pair for a pkcs11 volume (not initialised); unmounted and log-checked."""
    vol = make_volume(tmp_path, key=False)
    try:
        yield vol
    finally:
        force_unmount(vol.mountpoint)
        text = vol.log_text()
        if "Traceback" in text or "unexpected error" in text:
            pytest.fail(f"daemon log has an unexpected error:\n{text[-4000:]}")


def payloads() -> dict[str, bytes]:
    return {
        "empty": b"",
        "one": b"x",
        "block": os.urandom(4096),
        "big.bin": os.urandom(300_001),
        "dir/nested.txt": b"hello from the HSM\n" * 100,
    }


def write_all(vol: Volume, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        vol.path(name).parent.mkdir(exist_ok=True)
        vol.path(name).write_bytes(data)


def check_all(vol: Volume, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert vol.path(name).read_bytes() == data, name


# -- end to end -------------------------------------------------------------


@requires_fuse
def test_init_create_key_mount_remount_decrypt(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    result = init(p11vol, hsm, label, "--pkcs11-create-key")
    assert f"master key: pkcs11 pkcs11:token={TOKEN};object={label};id=%" in result.stdout
    assert result.stdout.rstrip().endswith(";type=secret-key")
    config = json.loads((p11vol.backing / ".kmsfs.json").read_text())
    settings = config["keys"][0]["settings"]
    assert settings["module"] == MODULE and settings["token"] == TOKEN
    assert settings["key"] == label and settings["key_type"] == "aes"
    assert settings["mechanism"] == "aes-gcm" and len(settings["key_id"]) == 32
    assert not [key for key in _keys_of(config) if "pin" in key.lower()]
    assert not [text for text in _strings_of(config) if text == USER_PIN or "user.pin" in text]

    mount(p11vol, hsm)
    files = payloads()
    write_all(p11vol, files)
    check_all(p11vol, files)
    remount(p11vol, hsm)
    check_all(p11vol, files)
    info = json.loads(run_kmsfs("inspect", "--json", p11vol.backing_path("big.bin")).stdout)
    assert [e["provider"] for e in info["entries"]] == ["pkcs11"]
    assert info["entries"][0]["wrapped_key_bytes"] == 61  # 0x01 || nonce || key || tag
    assert files["dir/nested.txt"][:64] not in p11vol.backing_path("dir/nested.txt").read_bytes()
    p11vol.umount()

    out = p11vol.root / "decrypted.bin"
    result = run_kmsfs(
        "decrypt", p11vol.backing_path("big.bin"), out, *p11vol.key_args,
        env=hsm.env,
    )  # fmt: skip
    assert result.stdout.strip() == f"decrypted {len(files['big.bin'])} bytes to {out}"
    assert out.read_bytes() == files["big.bin"]


def test_init_finds_existing_key(tmp_path: Path, hsm: SoftHSM, label: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = make_volume(tmp_path / "a", key=False), make_volume(tmp_path / "b", key=False)
    created = init(first, hsm, label, "--pkcs11-create-key").stdout.splitlines()[-1]
    found = init(second, hsm, label).stdout.splitlines()[-1]
    assert created == found  # same key_ref: the same key, found by label


@requires_fuse
def test_rsa_oaep_volume(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    key_id = hsm.tool("rsa", TOKEN, USER_PIN, label).strip()
    result = init(p11vol, hsm, label)
    pct_id = "".join(f"%{key_id[i : i + 2]}" for i in range(0, len(key_id), 2))
    assert result.stdout.rstrip().endswith(f"object={label};id={pct_id};type=private-key")
    settings = json.loads((p11vol.backing / ".kmsfs.json").read_text())["keys"][0]["settings"]
    assert (settings["key_type"], settings["mechanism"]) == ("rsa", "rsa-oaep-sha1")
    mount(p11vol, hsm)
    files = payloads()
    write_all(p11vol, files)
    remount(p11vol, hsm)
    check_all(p11vol, files)
    info = json.loads(run_kmsfs("inspect", "--json", p11vol.backing_path("one")).stdout)
    assert info["entries"][0]["wrapped_key_bytes"] == 1 + 256  # 0x04 || RSA-2048 OAEP
    p11vol.umount()
    out = p11vol.root / "one.out"
    run_kmsfs(
        "decrypt", p11vol.backing_path("block"), out, *p11vol.key_args,
        env=hsm.env,
    )  # fmt: skip
    assert out.read_bytes() == files["block"]


@requires_fuse
def test_aes_key_wrap_volume(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    """An HSM with only AES key wrap (RFC 5649): the mechanism chosen at init, then the CLI."""
    from kmsfs.volume_open import init_volume

    options = {
        "pkcs11_module": MODULE,
        "pkcs11_token": TOKEN,
        "pkcs11_key": label,
        "pkcs11_pin_file": str(hsm.pin_file()),
        "pkcs11_create_key": True,
        "pkcs11_mechanism": "aes-kwp",
    }
    config = init_volume(p11vol.backing, "pkcs11", options, encrypted_names=False)
    p11vol.key_args = p11_args(hsm, label)
    assert config.keys[0].settings["mechanism"] == "aes-kwp"
    mount(p11vol, hsm)
    files = payloads()
    write_all(p11vol, files)
    remount(p11vol, hsm)
    check_all(p11vol, files)
    info = json.loads(run_kmsfs("inspect", "--json", p11vol.backing_path("one")).stdout)
    assert info["entries"][0]["wrapped_key_bytes"] == 73  # 0x02 || KWP(key || SHA-256(ctx))


# -- refusals at init and mount ---------------------------------------------


@requires_fuse
def test_wrong_pin_refused(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    bad = hsm.pin_file("0000", "bad.pin")
    result = run_kmsfs(
        "init", p11vol.backing, "--provider", "pkcs11", *p11_args(hsm, label, bad),
        "--pkcs11-create-key", env=hsm.env, check=False,
    )  # fmt: skip
    assert result.returncode == 6
    assert result.stderr.strip() == (
        f"kmsfs: error: wrong PIN for token '{TOKEN}'"
        " (not retried: repeated failures can lock the token)"
    )
    assert not (p11vol.backing / ".kmsfs.json").exists()

    init(p11vol, hsm, label, "--pkcs11-create-key")
    result = run_kmsfs(
        "mount", p11vol.backing, p11vol.mountpoint, *p11_args(hsm, label, bad),
        env=hsm.env, check=False,
    )  # fmt: skip
    assert result.returncode == 6
    assert f"wrong PIN for token '{TOKEN}'" in result.stderr
    assert not os.path.ismount(p11vol.mountpoint)
    # The right PIN still works: the token was not locked.
    mount(p11vol, hsm)


def test_no_pin_source_refused(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    args = p11_args(hsm, label)[:-2]  # no --pkcs11-pin-file, no terminal, no credential
    result = run_kmsfs(
        "init", p11vol.backing, "--provider", "pkcs11", *args, env=hsm.env, check=False,
        input="",
    )  # fmt: skip
    assert result.returncode == 3
    assert "PIN of token" in result.stderr and "no terminal" in result.stderr


def test_pin_from_systemd_credential(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    creds = p11vol.root / "creds"
    creds.mkdir()
    (creds / "kmsfs-pin").write_text(USER_PIN + "\n")
    args = p11_args(hsm, label)[:-2]
    env = {**hsm.env, "CREDENTIALS_DIRECTORY": str(creds)}
    run_kmsfs("init", p11vol.backing, "--provider", "pkcs11", *args, "--pkcs11-create-key", env=env)


def test_missing_key_refused(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    result = init(p11vol, hsm, label, check=False)
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"kmsfs: error: no key '{label}' on token '{TOKEN}'"
        " (init --pkcs11-create-key creates an AES-256 key)"
    )


@requires_fuse
def test_deleted_key_refused_at_mount(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    key_id = hsm.tool("aes", TOKEN, USER_PIN, label).strip()
    init(p11vol, hsm, label)
    hsm.tool("delete", TOKEN, USER_PIN, label)
    result = mount(p11vol, hsm, check=False)
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"kmsfs: error: no key '{label}' (CKA_ID {key_id}) on token '{TOKEN}'"
    )
    assert not os.path.ismount(p11vol.mountpoint)


@requires_fuse
def test_recreated_key_same_label_refused(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    """A new key under the old label has another CKA_ID: mount says which key is missing."""
    init(p11vol, hsm, label, "--pkcs11-create-key")
    hsm.tool("delete", TOKEN, USER_PIN, label)
    hsm.tool("aes", TOKEN, USER_PIN, label)
    result = mount(p11vol, hsm, check=False)
    assert result.returncode == 3 and f"no key '{label}' (CKA_ID " in result.stderr


def test_token_not_found(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    result = run_kmsfs(
        "init", p11vol.backing, "--provider", "pkcs11", "--pkcs11-module", MODULE,
        "--pkcs11-token", "no-such-token", "--pkcs11-key", label,
        "--pkcs11-pin-file", hsm.pin_file(), env=hsm.env, check=False,
    )  # fmt: skip
    assert result.returncode == 6
    assert result.stderr.strip().startswith(
        f"kmsfs: error: no PKCS#11 token labelled 'no-such-token' in {MODULE} (tokens present: "
    )
    assert f"'{TOKEN}'" in result.stderr


def test_module_not_found(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    result = run_kmsfs(
        "init", p11vol.backing, "--provider", "pkcs11", "--pkcs11-module", "/nope/lib.so",
        "--pkcs11-token", TOKEN, "--pkcs11-key", label, "--pkcs11-pin-file", hsm.pin_file(),
        env=hsm.env, check=False,
    )  # fmt: skip
    assert result.returncode == 3
    assert result.stderr.strip() == "kmsfs: error: PKCS#11 module /nope/lib.so does not exist"


def test_wrong_key_type_refused(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    hsm.tool("generic", TOKEN, USER_PIN, label)
    result = init(p11vol, hsm, label, check=False)
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"kmsfs: error: key '{label}' on token '{TOKEN}' is a GENERIC_SECRET secret key:"
        " want an AES key or an RSA key pair"
    )


def test_mechanism_unsupported_refused(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    hsm.tool("aes", TOKEN, USER_PIN, label, "--no-use")
    result = init(p11vol, hsm, label, check=False)
    assert result.returncode == 3
    assert "mechanism unsupported" in result.stderr
    assert "CKM_AES_GCM" in result.stderr and "CKM_AES_KEY_WRAP_PAD" in result.stderr


@requires_fuse
def test_other_volume_key_at_mount_refused(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    init(p11vol, hsm, label, "--pkcs11-create-key")
    result = run_kmsfs(
        "mount", p11vol.backing, p11vol.mountpoint, *p11_args(hsm, label + "-other"),
        env=hsm.env, check=False,
    )  # fmt: skip
    assert result.returncode == 3  # the other label does not exist on the token
    hsm.tool("aes", TOKEN, USER_PIN, label + "-other")
    result = run_kmsfs(
        "mount", p11vol.backing, p11vol.mountpoint, *p11_args(hsm, label + "-other"),
        env=hsm.env, check=False,
    )  # fmt: skip
    assert result.returncode == 6
    assert "wrong key: the pkcs11 key given is pkcs11:token=" in result.stderr


# -- a header from another token --------------------------------------------


@requires_fuse
def test_header_from_other_token_is_eio(
    p11vol: Volume, hsm: SoftHSM, label: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Same token label, key label and CKA_ID on another token: same key_ref, other key."""
    other = SoftHSM.create(tmp_path_factory.mktemp("other-softhsm"))
    other.init_token(TOKEN)
    key_id = os.urandom(8).hex()
    hsm.tool("aes", TOKEN, USER_PIN, label, "--id", key_id)
    other.tool("aes", TOKEN, USER_PIN, label, "--id", key_id)
    init(p11vol, hsm, label)

    mount(p11vol, hsm)
    p11vol.path("victim").write_bytes(b"secret " * 1000)
    p11vol.path("kept").write_bytes(b"fine")
    p11vol.umount()

    backing = p11vol.backing_path("victim")
    header = FileHeader.parse(os.getxattr(backing, XATTR_NAME))
    blob_hex = other.tool(
        "wrap", TOKEN, USER_PIN, label, header.volume_id.hex(), header.file_id.hex()
    ).strip()
    entry = header.entries[0]
    forged = WrappedKey(entry.provider, entry.key_ref, bytes.fromhex(blob_hex))
    assert forged.key_ref == entry.key_ref and forged.blob != entry.blob
    os.setxattr(backing, XATTR_NAME, header.with_entries((forged,)).pack())

    mount(p11vol, hsm)
    with pytest.raises(OSError) as info:
        p11vol.path("victim").read_bytes()
    assert info.value.errno == 5  # EIO
    assert p11vol.path("kept").read_bytes() == b"fine"
    p11vol.umount()
    assert "cannot unwrap this key: other master key or other volume/file" in p11vol.log_text()

    result = run_kmsfs(
        "decrypt", backing, p11vol.root / "x", *p11vol.key_args,
        env=hsm.env, check=False,
    )  # fmt: skip
    assert result.returncode == 6 and "cannot unwrap this key" in result.stderr
    assert not (p11vol.root / "x").exists()


# -- concurrency: several processes through the serialised HSM path ---------

WRITER = r"""
import hashlib, os, random, sys
root, index, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(index)
for n in range(count):
    data = rng.randbytes(rng.randrange(0, 70_000))
    path = os.path.join(root, f"w{index}-{n}.bin")
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        assert f.read() == data, path
print("ok")
"""

READER = r"""
import hashlib, os, sys
root = sys.argv[1]
for name in sys.argv[2:]:
    with open(os.path.join(root, name), "rb") as f:
        print(name, hashlib.sha256(f.read()).hexdigest())
"""


def _finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    """Wait for every process (killing the rest if one hangs); (exit code, stdout, stderr)."""
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return results


@requires_fuse
def test_concurrent_writers(p11vol: Volume, hsm: SoftHSM, label: str) -> None:
    import hashlib
    import random

    init(p11vol, hsm, label, "--pkcs11-create-key")
    mount(p11vol, hsm, "--cache-max-entries", "0")  # every open unwraps on the token
    writers, count = 6, 20
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(p11vol.mountpoint), str(i), str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(writers)
    ]
    results = _finish(procs)
    for code, out, err in results:
        assert code == 0 and out.strip() == "ok", err

    expected = {}
    for i in range(writers):
        rng = random.Random(i)
        for n in range(count):
            data = rng.randbytes(rng.randrange(0, 70_000))
            expected[f"w{i}-{n}.bin"] = hashlib.sha256(data).hexdigest()
    remount(p11vol, hsm, "--cache-max-entries", "0")
    names = sorted(expected)
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(p11vol.mountpoint), *names[i::4]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    got = {}
    for code, out, err in _finish(readers):
        assert code == 0, err
        got.update(line.split() for line in out.splitlines())
    assert got == expected
    assert sorted(os.listdir(p11vol.mountpoint)) == names
    p11vol.umount()
    assert "ERROR" not in p11vol.log_text()


# -- the provider in this process ---------------------------------------------


def _provider(hsm: SoftHSM, label: str, **options: object):  # type: ignore[no-untyped-def]
    from kmsfs.keys import pkcs11 as p11
    from kmsfs.keys.settings import HostOptions

    given = {
        "pkcs11_module": MODULE,
        "pkcs11_token": TOKEN,
        "pkcs11_key": label,
        "pkcs11_pin_file": str(hsm.pin_file()),
        "pkcs11_create_key": True,
        **options,
    }
    return p11.create(HostOptions.parse(given).of("pkcs11"), None)


def _context():  # type: ignore[no-untyped-def]
    from kmsfs.keys.provider import KeyContext

    return KeyContext(os.urandom(16), os.urandom(16))


@pytest.mark.parametrize(
    ("mechanism", "size", "first"),
    [("aes-gcm", 61, 0x01), ("aes-kwp", 73, 0x02), ("aes-kw", 73, 0x03)],
)
def test_provider_aes_mechanisms(
    hsm: SoftHSM, label: str, mechanism: str, size: int, first: int
) -> None:
    from kmsfs.errors import WrongKeyError
    from kmsfs.keys.provider import KeyContext

    provider = _provider(hsm, label, pkcs11_mechanism=mechanism)
    try:
        context = _context()
        key, wrapped = provider.generate_data_key(context)
        assert (len(wrapped.blob), wrapped.blob[0]) == (size, first)
        assert provider.unwrap(wrapped, context) == key
        again = provider.wrap(key, context)
        assert provider.unwrap(again, context) == key
        for other in (
            KeyContext(context.volume_id, os.urandom(16)),
            KeyContext(os.urandom(16), context.file_id),
            KeyContext.key_check(context.volume_id),
        ):
            with pytest.raises(WrongKeyError, match="cannot unwrap this key"):
                provider.unwrap(wrapped, other)
        tampered = bytearray(wrapped.blob)
        tampered[-1] ^= 1
        with pytest.raises(WrongKeyError):
            provider.unwrap(WrappedKey("pkcs11", wrapped.key_ref, bytes(tampered)), context)
    finally:
        provider.close()


@pytest.mark.parametrize("mechanism", ["aes-gcm", "aes-kwp", "aes-kw"])
def test_blob_format_independent_decoder(hsm: SoftHSM, label: str, mechanism: str) -> None:
    """docs/PROVIDERS-PKCS11.md to the byte: blobs of a known (imported) AES key, opened
    with the cryptography package instead of the token."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.keywrap import (
        aes_key_unwrap,
        aes_key_unwrap_with_padding,
    )

    master = bytes(range(32))
    hsm.tool("aes", TOKEN, USER_PIN, label, "--value", master.hex())
    provider = _provider(hsm, label, pkcs11_mechanism=mechanism, pkcs11_create_key=False)
    try:
        context = _context()
        key, wrapped = provider.generate_data_key(context)
    finally:
        provider.close()
    blob = wrapped.blob
    bound = bytes(key) + hashlib.sha256(context.aad()).digest()
    if mechanism == "aes-gcm":
        assert blob[0] == 0x01 and len(blob) == 61
        assert AESGCM(master).decrypt(blob[1:13], blob[13:], context.aad()) == key
    elif mechanism == "aes-kwp":
        assert blob[0] == 0x02 and len(blob) == 73
        assert aes_key_unwrap_with_padding(master, blob[1:]) == bound
    else:
        assert blob[0] == 0x03 and len(blob) == 73
        assert aes_key_unwrap(master, blob[1:]) == bound


def test_provider_unwraps_every_aes_mechanism(hsm: SoftHSM, label: str) -> None:
    """Unwrap dispatches on the blob's first byte: a volume can change mechanism."""
    providers = [_provider(hsm, label, pkcs11_mechanism=m) for m in ("aes-kw", "aes-gcm")]
    try:
        context = _context()
        key, wrapped = providers[0].generate_data_key(context)
        assert providers[1].unwrap(wrapped, context) == key
    finally:
        for provider in providers:
            provider.close()


def test_provider_recovers_lost_session(hsm: SoftHSM, label: str) -> None:
    provider = _provider(hsm, label)
    try:
        context = _context()
        key, wrapped = provider.generate_data_key(context)
        with provider_lock():
            provider._session.close()  # the session (and its login) is gone behind its back
        assert provider.unwrap(wrapped, context) == key
        key2, _ = provider.generate_data_key(context)
        assert len(key2) == 32
    finally:
        provider.close()


def test_provider_gives_up_after_bounded_reopens(
    hsm: SoftHSM, label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsfs.errors import KeyUnavailable
    from kmsfs.keys import pkcs11 as p11

    monkeypatch.setattr(p11, "REOPEN_DELAYS", (0.0, 0.0, 0.0))
    provider = _provider(hsm, label)
    try:
        context = _context()
        key, wrapped = provider.generate_data_key(context)
        connects = []
        real_connect = provider._connect

        def token_gone(**kwargs: object) -> None:
            connects.append(1)
            raise KeyUnavailable("token removed (simulated)")

        monkeypatch.setattr(provider, "_connect", token_gone)
        with provider_lock():
            provider._session.close()
        with pytest.raises(KeyUnavailable, match="token unreachable after 3 re-opens"):
            provider.unwrap(wrapped, context)
        assert len(connects) == p11.MAX_REOPEN
        start = time.monotonic()
        with pytest.raises(KeyUnavailable, match="re-open failed moments ago"):
            provider.unwrap(wrapped, context)
        assert time.monotonic() - start < 0.5 and len(connects) == p11.MAX_REOPEN

        monkeypatch.setattr(provider, "_connect", real_connect)  # the token is back
        provider._down_until = 0.0
        assert provider.unwrap(wrapped, context) == key
    finally:
        provider.close()


def test_provider_wrong_pin_not_retried(
    hsm: SoftHSM, label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsfs.errors import KeyAccessDenied

    provider = _provider(hsm, label)
    try:
        context = _context()
        _, wrapped = provider.generate_data_key(context)
        with provider_lock():
            provider._drop()  # logs out: the re-open must log in again
        provider._pin = "0000"
        logins = []
        real_open = provider._open_session
        monkeypatch.setattr(
            provider, "_open_session", lambda *a, **k: logins.append(1) or real_open(*a, **k)
        )
        for _ in range(3):
            with pytest.raises(KeyAccessDenied, match="wrong PIN"):
                provider.unwrap(wrapped, context)
        assert len(logins) == 1
    finally:
        provider.close()


@pytest.mark.parametrize("mechanism", ["aes-gcm", "aes-kwp"])
def test_provider_many_threads(hsm: SoftHSM, label: str, mechanism: str) -> None:
    """Worker threads at once: every call is serialised, so SoftHSM2 does not crash.

    (Without the lock this segfaults the test process with aes-gcm and returns
    GeneralError with aes-kwp, measured here.)
    """
    provider = _provider(hsm, label, pkcs11_mechanism=mechanism)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(150):
                context = _context()
                key, wrapped = provider.generate_data_key(context)
                assert provider.unwrap(wrapped, context) == key
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
    finally:
        provider.close()


def provider_lock():  # type: ignore[no-untyped-def]
    from kmsfs.keys import pkcs11 as p11

    return p11._LOCK


# -- the helper script -------------------------------------------------------


def test_softhsm_token_script(tmp_path: Path) -> None:
    store = tmp_path / "hsm"
    result = subprocess.run(
        [str(ROOT / "scripts" / "softhsm-token"), "--dir", str(store), "--label", "try-me"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"export SOFTHSM2_CONF={store}/softhsm2.conf" in result.stdout
    assert "kmsfs init" in result.stdout and "--pkcs11-create-key" in result.stdout
    assert (store / "user.pin").stat().st_mode & 0o077 == 0
    listing = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        env={**os.environ, "SOFTHSM2_CONF": str(store / "softhsm2.conf")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "try-me" in listing.stdout
    again = subprocess.run(
        [str(ROOT / "scripts" / "softhsm-token"), "--dir", str(store), "--label", "try-me"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode != 0 and "already" in again.stderr


# -- the volume config names the module: never loaded unless authenticated --


@requires_fuse
def test_changed_module_in_the_volume_config_is_never_loaded(
    p11vol: Volume, hsm: SoftHSM, label: str, tmp_path: Path
) -> None:
    """The attacker edits the recorded module path; the operator mounts as before."""
    from support.planted import build_planted_module

    init(p11vol, hsm, label, "--pkcs11-create-key")
    library, marker = build_planted_module(tmp_path)
    config_file = p11vol.backing / ".kmsfs.json"
    data = json.loads(config_file.read_text())
    data["keys"][0]["settings"]["module"] = str(library)
    config_file.write_text(json.dumps(data))
    # the PIN alone (kmsfs 0.1 took the module from the volume config): refused, nothing loaded
    pin_only = run_kmsfs(
        "mount", p11vol.backing, p11vol.mountpoint, "--pkcs11-pin-file", hsm.pin_file(),
        env=hsm.env, check=False,
    )  # fmt: skip
    assert not marker.exists(), "the planted PKCS#11 module was loaded"
    assert pin_only.returncode == 3, pin_only.stderr
    assert "give --pkcs11-module" in pin_only.stderr and "not yet verified" in pin_only.stderr
    # this host's module: refused because it differs from the recorded one, both named
    host = mount(p11vol, hsm, check=False)
    assert not marker.exists(), "the planted PKCS#11 module was loaded"
    assert host.returncode == 3, host.stderr
    assert f"gives module '{MODULE}'" in host.stderr and str(library) in host.stderr
    # even when told to accept this host's value, the edit fails authentication
    for tool in (["fsck", p11vol.backing], ["keys", "update", p11vol.backing, "x"]):
        result = run_kmsfs(*tool, *p11vol.key_args, env=hsm.env, check=False)
        assert not marker.exists(), "the planted PKCS#11 module was loaded"
        assert result.returncode in (3, 5), result.stderr
    update = run_kmsfs("keys", "update", p11vol.backing, "x", *p11vol.key_args, env=hsm.env,
                       check=False)  # fmt: skip
    assert update.returncode == 5 and "keys[0]" in update.stderr
    assert not marker.exists()


def _keys_of(tree: Any) -> list[str]:
    """Every key of every mapping in a JSON document (the config's names, not its
    random MACs and ids, which may spell anything)."""
    if isinstance(tree, dict):
        return [*tree, *(key for value in tree.values() for key in _keys_of(value))]
    if isinstance(tree, list):
        return [key for value in tree for key in _keys_of(value)]
    return []


def _strings_of(tree: Any) -> list[str]:
    """Every string value in a JSON document."""
    if isinstance(tree, dict):
        return [text for value in tree.values() for text in _strings_of(value)]
    if isinstance(tree, list):
        return [text for value in tree for text in _strings_of(value)]
    return [tree] if isinstance(tree, str) else []
