"""Encrypted names against docs/FORMAT.md: its vectors, checked by kmsfs and by an
implementation written from that text and RFC 5297 (AES-SIV from AES-CMAC and AES-CTR)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from support.format_vectors import load_vectors

from kmsfs.format import names
from kmsfs.format.names import BackingName, NameCipher

V = load_vectors("name-vectors")


def h(name: str) -> bytes:
    return bytes.fromhex(V[name])


def t(name: str) -> bytes:
    return V[name].encode("ascii")


# -- AES-SIV from RFC 5297 ------------------------------------------------------------


def _cmac(key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def _dbl(block: bytes) -> bytes:
    value = int.from_bytes(block, "big") << 1
    if value >> 128:
        value = (value & (1 << 128) - 1) ^ 0x87
    return value.to_bytes(16, "big")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def s2v(key: bytes, components: list[bytes], plaintext: bytes) -> bytes:
    d = _cmac(key, bytes(16))
    for component in components:
        d = _xor(_dbl(d), _cmac(key, component))
    if len(plaintext) >= 16:
        last = plaintext[:-16] + _xor(plaintext[-16:], d)
    else:
        padded = plaintext + b"\x80" + bytes(15 - len(plaintext))
        last = _xor(_dbl(d), padded)
    return _cmac(key, last)


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    counter = int.from_bytes(iv, "big") & ~((1 << 63) | (1 << 31))
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def siv_encrypt(key: bytes, plaintext: bytes, components: list[bytes]) -> bytes:
    half = len(key) // 2
    iv = s2v(key[:half], components, plaintext)
    return iv + _ctr(key[half:], iv, plaintext)


def siv_decrypt(key: bytes, sealed: bytes, components: list[bytes]) -> bytes:
    half = len(key) // 2
    iv, body = sealed[:16], sealed[16:]
    plaintext = _ctr(key[half:], iv, body)
    assert s2v(key[:half], components, plaintext) == iv, "authentication failed"
    return plaintext


def test_spec_aes_siv_gives_rfc5297_appendix_a1() -> None:
    key = bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ad = bytes.fromhex("101112131415161718191a1b1c1d1e1f2021222324252627")
    plaintext = bytes.fromhex("112233445566778899aabbccddee")
    want = "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c"
    assert siv_encrypt(key, plaintext, [ad]).hex() == want


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 48, 272])
def test_spec_aes_siv_agrees_with_cryptography(size: int) -> None:
    """Several components, one of them empty, as the xattr values of symlinks use."""
    key = os.urandom(64)
    components = [b"kmsfs/v1/xattr-value", os.urandom(16), b"", b"user.x", os.urandom(16)]
    plaintext = os.urandom(size)
    sealed = siv_encrypt(key, plaintext, components)
    assert AESSIV(key).encrypt(plaintext, components) == sealed
    assert siv_decrypt(key, sealed, components) == plaintext


# -- the construction, from docs/FORMAT.md -----------------------------------------------


def subkey(label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 64, salt=None, info=label).derive(h("name_secret"))


def pad(data: bytes) -> bytes:
    n = 16 - len(data) % 16
    return data + bytes([n]) * n


def unpad(data: bytes) -> bytes:
    n = data[-1]
    assert 1 <= n <= 16 and data[-n:] == bytes([n]) * n
    return data[:-n]


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def unb64(text: bytes) -> bytes:
    data = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    assert b64(data) == text
    return data


def spec_name(dir_id: bytes, name: bytes) -> tuple[bytes, bytes | None]:
    """(backing name, sidecar content or None)."""
    components = [b"kmsfs/v1/name", h("volume_id"), dir_id]
    encoded = b64(siv_encrypt(subkey(b"kmsfs/v1/name"), pad(name), components))
    if len(encoded) <= 255:
        return encoded, None
    return b".kmsfs-ln." + b64(hashlib.sha256(encoded).digest()), encoded


def spec_unname(dir_id: bytes, backing: bytes, sidecar: bytes | None) -> bytes:
    if backing.startswith(b".kmsfs-ln."):
        assert sidecar is not None and len(sidecar) > 255
        assert backing == b".kmsfs-ln." + b64(hashlib.sha256(sidecar).digest())
        backing = sidecar
    components = [b"kmsfs/v1/name", h("volume_id"), dir_id]
    return unpad(siv_decrypt(subkey(b"kmsfs/v1/name"), unb64(backing), components))


def test_spec_subkeys() -> None:
    for field, label in [
        ("name_key", b"kmsfs/v1/name"),
        ("symlink_key", b"kmsfs/v1/symlink-target"),
        ("xattr_name_key", b"kmsfs/v1/xattr-name"),
        ("xattr_value_key", b"kmsfs/v1/xattr-value"),
    ]:
        assert subkey(label) == h(field), field


def test_spec_names() -> None:
    assert spec_name(h("dir_id"), h("name")) == (t("backing_name"), None)
    assert spec_unname(h("dir_id"), t("backing_name"), None) == h("name")
    assert spec_name(bytes(16), h("root_name")) == (t("root_backing_name"), None)
    assert spec_unname(bytes(16), t("root_backing_name"), None) == h("root_name")
    long_name = h("long_name")
    assert len(long_name) == 255
    with pytest.raises(UnicodeDecodeError):
        long_name.decode()
    assert spec_name(h("dir_id"), long_name) == (t("long_backing_name"), t("long_sidecar"))
    assert spec_unname(h("dir_id"), t("long_backing_name"), t("long_sidecar")) == long_name


def test_spec_symlink_target() -> None:
    nonce = b"\x74" * 16
    key = subkey(b"kmsfs/v1/symlink-target")
    components = [b"kmsfs/v1/symlink-target", h("volume_id"), nonce]
    sealed = siv_encrypt(key, pad(h("symlink_target")), components)
    assert b64(nonce + sealed) == t("stored_symlink")
    data = unb64(t("stored_symlink"))
    assert data[:16] == nonce
    assert unpad(siv_decrypt(key, data[16:], components)) == h("symlink_target")


def test_spec_xattr_name_and_value() -> None:
    name = h("xattr_name")
    assert name.startswith(b"user.")
    components = [b"kmsfs/v1/xattr-name", h("volume_id"), b"user."]
    sealed = siv_encrypt(subkey(b"kmsfs/v1/xattr-name"), pad(name[5:]), components)
    assert b"user." + b64(sealed) == t("backing_xattr_name")

    nonce = b"\x75" * 16
    key = subkey(b"kmsfs/v1/xattr-value")
    components = [b"kmsfs/v1/xattr-value", h("volume_id"), h("file_id"), name, nonce]
    assert nonce + siv_encrypt(key, pad(h("xattr_value")), components) == h("stored_xattr_value")
    stored = h("stored_xattr_value")
    assert unpad(siv_decrypt(key, stored[16:], components)) == h("xattr_value")


# -- kmsfs against the same vectors ---------------------------------------------------------


def test_kmsfs_matches_every_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    cipher = NameCipher(h("name_secret"), h("volume_id"))
    for field, label in [
        ("name_key", names.LABEL_NAME),
        ("symlink_key", names.LABEL_SYMLINK),
        ("xattr_name_key", names.LABEL_XATTR_NAME),
        ("xattr_value_key", names.LABEL_XATTR_VALUE),
    ]:
        assert names.derive_subkey(h("name_secret"), label) == h(field), field
    dir_id = h("dir_id")
    assert cipher.encrypt_name(dir_id, h("name")) == BackingName(t("backing_name"))
    assert cipher.decrypt_name(dir_id, t("backing_name")) == h("name")
    root = names.ROOT_DIR_ID
    assert cipher.encrypt_name(root, h("root_name")) == BackingName(t("root_backing_name"))
    assert cipher.decrypt_name(root, t("root_backing_name")) == h("root_name")
    long = BackingName(t("long_backing_name"), t("long_sidecar"))
    assert cipher.encrypt_name(dir_id, h("long_name")) == long
    assert cipher.decrypt_name(dir_id, long.name, long.sidecar) == h("long_name")

    monkeypatch.setattr(names, "_urandom", lambda n: b"\x74" * n)
    assert cipher.encrypt_symlink(h("symlink_target")) == t("stored_symlink")
    assert cipher.decrypt_symlink(t("stored_symlink")) == h("symlink_target")

    assert cipher.encrypt_xattr_name(h("xattr_name")) == t("backing_xattr_name")
    assert cipher.decrypt_xattr_name(t("backing_xattr_name")) == h("xattr_name")
    monkeypatch.setattr(names, "_urandom", lambda n: b"\x75" * n)
    value = cipher.encrypt_xattr_value(h("file_id"), h("xattr_name"), h("xattr_value"))
    assert value == h("stored_xattr_value")
    stored = h("stored_xattr_value")
    assert cipher.decrypt_xattr_value(h("file_id"), h("xattr_name"), stored) == h("xattr_value")
