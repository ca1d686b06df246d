"""Encrypted names (kmsfs.format.names): round trips, bindings, tampering, limits."""

from __future__ import annotations

import base64
import hashlib
import os
import re

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given
from hypothesis import strategies as st
from support.properties import examples

from kmsfs.errors import EncryptedNameError, FormatError, PlaintextTooLong
from kmsfs.format import names
from kmsfs.format.names import (
    LABEL_NAME,
    MAX_SHORT_NAME,
    MAX_SYMLINK_TARGET,
    MAX_XATTR_NAME_SUFFIX,
    MAX_XATTR_VALUE,
    ROOT_DIR_ID,
    BackingName,
    EntryKind,
    NameCipher,
    XattrKind,
    derive_subkey,
    entry_kind,
    long_name_of,
    long_name_of_sidecar,
    new_dir_id,
    new_name_secret,
    parse_dir_id,
    sidecar_name_of,
    stored_name_size,
    stored_symlink_size,
    stored_xattr_value_size,
    xattr_kind,
)

SECRET = bytes(range(0xA0, 0xC0))
VOLUME = bytes(range(0x10, 0x20))
DIR = bytes(range(0x30, 0x40))
OTHER_DIR = bytes(range(0x40, 0x50))
FILE_ID = bytes(range(0x20, 0x30))
B64URL = re.compile(rb"[A-Za-z0-9_-]+")
NAME_BYTES = [b for b in range(1, 256) if b != ord("/")]

names_strategy = st.binary(min_size=1, max_size=255).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)


@pytest.fixture(scope="module")
def cipher() -> NameCipher:
    return NameCipher(SECRET, VOLUME)


def stored(cipher: NameCipher, dir_id: bytes, name: bytes) -> BackingName:
    backing = cipher.encrypt_name(dir_id, name)
    assert cipher.decrypt_name(dir_id, backing.name, backing.sidecar) == name
    return backing


def encoded_of(backing: BackingName) -> bytes:
    return backing.sidecar if backing.sidecar is not None else backing.name


def reencode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def decode(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


# -- round trips ---------------------------------------------------------------------


def test_every_length_round_trips(cipher: NameCipher) -> None:
    for length in range(1, 256):
        name = bytes(NAME_BYTES[(length * 7 + i) % len(NAME_BYTES)] for i in range(length))
        backing = stored(cipher, DIR, name)
        assert name not in backing.name and name not in (backing.sidecar or b"")
        if length <= MAX_SHORT_NAME:
            assert backing.sidecar is None and backing.sidecar_name is None, length
            assert entry_kind(backing.name) is EntryKind.NAME
            assert len(backing.name) == stored_name_size(length) <= 255
            assert B64URL.fullmatch(backing.name)
        else:
            assert entry_kind(backing.name) is EntryKind.LONG_NAME, length
            assert backing.sidecar is not None and len(backing.name) == names.LONG_NAME_SIZE
            assert backing.sidecar_name == sidecar_name_of(backing.name) == backing.name + b".name"
            assert entry_kind(backing.sidecar_name) is EntryKind.SIDECAR
            assert len(backing.sidecar) == stored_name_size(length) > 255
            assert B64URL.fullmatch(backing.sidecar)


def test_every_allowed_byte_round_trips(cipher: NameCipher) -> None:
    for byte in NAME_BYTES:
        for name in (bytes((byte,)), bytes((byte,)) * 3, bytes((byte,)) * 255):
            if name not in (b".", b".."):
                stored(cipher, DIR, name)


@pytest.mark.parametrize(
    "name",
    [b"\xff", b"\xc3\x28", b"caf\xe9", b"\xed\xa0\x80surrogate", b"\x01\x7f\x80", "ü".encode()],
)
def test_non_utf8_and_control_bytes_round_trip(cipher: NameCipher, name: bytes) -> None:
    stored(cipher, DIR, name)
    stored(cipher, ROOT_DIR_ID, name)


@examples(300)
@given(name=names_strategy, dir_id=st.binary(min_size=16, max_size=16))
def test_random_names_round_trip(cipher: NameCipher, name: bytes, dir_id: bytes) -> None:
    stored(cipher, dir_id, name)


def test_names_are_deterministic_per_directory(cipher: NameCipher) -> None:
    for name in (b"salaries-2026.xlsx", b"L" * 200):
        here = cipher.encrypt_name(DIR, name)
        assert cipher.encrypt_name(DIR, name) == here
        assert NameCipher(SECRET, VOLUME).encrypt_name(DIR, name) == here
        assert cipher.encrypt_name(OTHER_DIR, name).name != here.name
        assert cipher.encrypt_name(ROOT_DIR_ID, name).name != here.name


def test_same_length_names_have_same_length_names(cipher: NameCipher) -> None:
    """Padding: names of 1..15 bytes all give 43 characters, 16..31 give 64."""
    assert {len(cipher.encrypt_name(DIR, b"a" * n).name) for n in range(1, 16)} == {43}
    assert {len(cipher.encrypt_name(DIR, b"a" * n).name) for n in range(16, 32)} == {64}


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"x" * 256])
def test_names_the_kernel_never_sends_are_refused(cipher: NameCipher, bad: bytes) -> None:
    with pytest.raises(ValueError):
        cipher.encrypt_name(DIR, bad)


# -- bindings: directory, volume, key ------------------------------------------------


@pytest.mark.parametrize("name", [b"salaries-2026.xlsx", b"q" * 255])
def test_name_moved_to_another_directory_or_volume_fails(cipher: NameCipher, name: bytes) -> None:
    backing = cipher.encrypt_name(DIR, name)
    for other, dir_id in [
        (cipher, OTHER_DIR),
        (cipher, ROOT_DIR_ID),
        (NameCipher(SECRET, bytes(16)), DIR),  # same secret, other volume ID
        (NameCipher(bytes(32), VOLUME), DIR),  # other volume's secret
    ]:
        with pytest.raises(EncryptedNameError, match="failed authentication"):
            other.decrypt_name(dir_id, backing.name, backing.sidecar)


def test_a_name_is_not_an_xattr_name_or_a_symlink_target(cipher: NameCipher) -> None:
    """One key, one purpose: a name's ciphertext fails under every other purpose."""
    encoded = cipher.encrypt_name(DIR, b"comment").name
    with pytest.raises(EncryptedNameError, match="failed authentication"):
        cipher.decrypt_xattr_name(b"user." + encoded)
    with pytest.raises(EncryptedNameError):
        cipher.decrypt_symlink(encoded)


# -- tampering ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"a", b"salaries-2026.xlsx", b"m" * 159, b"q" * 255])
def test_every_bit_flip_of_the_ciphertext_fails(cipher: NameCipher, name: bytes) -> None:
    backing = cipher.encrypt_name(DIR, name)
    sealed = decode(encoded_of(backing))
    for offset in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[offset] ^= 1 << (offset % 8)
        text = reencode(bytes(flipped))
        with pytest.raises(EncryptedNameError, match="failed authentication"):
            if backing.sidecar is None:
                cipher.decrypt_name(DIR, text)
            else:
                cipher.decrypt_name(DIR, long_name_of(text), text)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t[:-1], "not canonical base64url|ciphertext of 31 bytes"),
        (lambda t: t[:-4], "not canonical base64url|ciphertext of 29 bytes"),
        (lambda t: reencode(decode(t)[:16]), "ciphertext of 16 bytes"),
        (lambda t: reencode(decode(t) + bytes(16)), "failed authentication"),  # valid length
        (lambda t: t + b"A", "ciphertext of 33 bytes"),
        (lambda t: t + b"AA", "not base64url \\(45 characters\\)"),
        (lambda t: t + b"==", "byte 0x3d at offset 43"),
        (lambda t: t[:10] + b"." + t[11:], "byte 0x2e at offset 10"),
        (lambda t: t[:10] + b"+" + t[11:], "byte 0x2b at offset 10"),
        (lambda t: t[:10] + b"/" + t[11:], "byte 0x2f at offset 10"),
        (lambda t: t[:-1] + b"B", "not canonical base64url"),  # an unused low bit set
        (lambda t: b"A" * 256, "256 bytes, want at most 255"),
        (lambda t: b"A" * 42, "ciphertext of 31 bytes"),
        (lambda t: b"", "ciphertext of 0 bytes"),
    ],
)
def test_malformed_names_are_refused_with_the_cause(
    cipher: NameCipher, edit: object, message: str
) -> None:
    text = cipher.encrypt_name(DIR, b"salaries.xlsx").name
    assert len(text) == 43  # 32 bytes: the last character carries 2 unused bits
    bad = edit(text)  # type: ignore[operator]
    with pytest.raises(EncryptedNameError, match=message) as caught:
        cipher.decrypt_name(DIR, bad)
    assert str(caught.value).startswith(f"encrypted name {bad.decode()!r}: ")


def test_a_non_ascii_backing_name_is_shown_escaped(cipher: NameCipher) -> None:
    with pytest.raises(EncryptedNameError) as caught:
        cipher.decrypt_name(DIR, b"caf\xe9.txt")
    assert str(caught.value) == (
        "encrypted name 'caf\\xe9.txt': not base64url (byte 0xe9 at offset 3)"
    )


def test_decrypted_bytes_are_checked_after_authentication(cipher: NameCipher) -> None:
    """A correctly sealed ciphertext of something that is not a name (only a holder of
    the name secret could make one) is refused, never returned."""
    raw = AESSIV(derive_subkey(SECRET, LABEL_NAME))
    associated = [LABEL_NAME, VOLUME, DIR]
    for plaintext, message in [
        (b"a/b" + b"\x0d" * 13, "invalid name"),
        (b".." + b"\x0e" * 14, "invalid name"),
        (b"abc" + b"\x00" * 13, "bad padding"),
        (b"abc" + b"\x11" * 13, "bad padding"),
        (b"\x10" * 16, "invalid name"),  # the empty name, padded
        (b"x" * 256 + b"\x10" * 16, "sidecar of 384 bytes"),  # a 256-byte name
    ]:
        text = reencode(raw.encrypt(plaintext, associated))
        with pytest.raises(EncryptedNameError, match=message):
            if len(text) <= 255:
                cipher.decrypt_name(DIR, text)
            else:
                cipher.decrypt_name(DIR, long_name_of(text), text)


# -- long names ------------------------------------------------------------------------


def test_long_name_with_another_entrys_sidecar_fails(cipher: NameCipher) -> None:
    one = cipher.encrypt_name(DIR, b"1" * 200)
    two = cipher.encrypt_name(DIR, b"2" * 200)
    with pytest.raises(EncryptedNameError, match="SHA-256 does not match"):
        cipher.decrypt_name(DIR, one.name, two.sidecar)


def test_long_name_with_edited_sidecar_fails(cipher: NameCipher) -> None:
    backing = cipher.encrypt_name(DIR, b"1" * 200)
    assert backing.sidecar is not None
    edited = backing.sidecar[:-5] + (b"A" if backing.sidecar[-5:-4] != b"A" else b"B")
    edited += backing.sidecar[-4:]
    with pytest.raises(EncryptedNameError, match="SHA-256 does not match"):
        cipher.decrypt_name(DIR, backing.name, edited)
    # an attacker who also renames the entry to the hash of the edit fails authentication
    with pytest.raises(EncryptedNameError, match="failed authentication"):
        cipher.decrypt_name(DIR, long_name_of(edited), edited)


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        (None, "sidecar '.kmsfs-ln.[^']*.name' is missing"),
        (b"A" * 364, "sidecar of 364 bytes, want at most 363"),
        (b"", "sidecar holds 0 bytes"),
    ],
)
def test_long_name_sidecar_problems(
    cipher: NameCipher, sidecar: bytes | None, message: str
) -> None:
    backing = cipher.encrypt_name(DIR, b"1" * 200)
    with pytest.raises(EncryptedNameError, match=message) as caught:
        cipher.decrypt_name(DIR, backing.name, sidecar)
    assert f"long name '{backing.name.decode()}'" in str(caught.value)


def test_a_short_name_in_the_long_form_is_refused(cipher: NameCipher) -> None:
    """Each name has exactly one backing name: a name that fits the short form and is
    found under a long name (which a lookup would never find) is refused."""
    short = cipher.encrypt_name(DIR, b"short").name
    with pytest.raises(EncryptedNameError, match="stored without a long name"):
        cipher.decrypt_name(DIR, long_name_of(short), short)


def test_long_name_of_wrong_length_is_refused(cipher: NameCipher) -> None:
    backing = cipher.encrypt_name(DIR, b"1" * 200)
    with pytest.raises(EncryptedNameError, match="54 bytes, want 53"):
        cipher.decrypt_name(DIR, backing.name + b"A", backing.sidecar)


def test_long_name_is_sha256_of_the_encoded_name(cipher: NameCipher) -> None:
    backing = cipher.encrypt_name(DIR, b"\xe9" * 255)
    assert backing.sidecar is not None
    digest = hashlib.sha256(backing.sidecar).digest()
    assert backing.name == b".kmsfs-ln." + base64.urlsafe_b64encode(digest).rstrip(b"=")
    assert long_name_of_sidecar(sidecar_name_of(backing.name)) == backing.name


# -- classifying backing names --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (b"AAAA", EntryKind.NAME),
        (b"not base64!", EntryKind.NAME),  # decoding says why it is not a name
        (b".kmsfs-ln.abc", EntryKind.LONG_NAME),  # decoding says it has the wrong length
        (b".kmsfs-ln.abc.name", EntryKind.SIDECAR),
        (b".kmsfs.json", EntryKind.OWN),
        (b".kmsfs.d", EntryKind.OWN),
        (b".kmsfs-tmp.123", EntryKind.OWN),
        (b".hidden", EntryKind.OWN),
    ],
)
def test_entry_kind(name: bytes, kind: EntryKind) -> None:
    assert entry_kind(name) is kind


@pytest.mark.parametrize("name", [b".kmsfs.json", b".kmsfs-ln.abc.name", b".x"])
def test_kmsfs_own_entries_are_not_names(cipher: NameCipher, name: bytes) -> None:
    with pytest.raises(ValueError, match="not an entry name"):
        cipher.decrypt_name(DIR, name)
    with pytest.raises(ValueError, match="not a long-name sidecar"):
        long_name_of_sidecar(b".kmsfs-ln.abc")


def test_a_short_name_has_no_sidecar(cipher: NameCipher) -> None:
    backing = cipher.encrypt_name(DIR, b"short")
    with pytest.raises(ValueError, match="has no sidecar"):
        cipher.decrypt_name(DIR, backing.name, backing.name)


# -- directory IDs ---------------------------------------------------------------------


def test_directory_ids() -> None:
    ids = {new_dir_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 and i != ROOT_DIR_ID for i in ids)
    assert parse_dir_id(DIR) == DIR
    with pytest.raises(FormatError, match="directory ID of 15 bytes: want 16"):
        parse_dir_id(DIR[:15])
    with pytest.raises(FormatError, match="all zeros"):
        parse_dir_id(bytes(16))
    with pytest.raises(ValueError, match="directory ID of 3 bytes"):
        NameCipher(SECRET, VOLUME).encrypt_name(b"abc", b"x")


def test_name_secret_and_cipher_arguments() -> None:
    secret = new_name_secret()
    assert isinstance(secret, bytearray) and len(secret) == 32
    with pytest.raises(ValueError, match="name secret of 16 bytes"):
        NameCipher(bytes(16), VOLUME)
    with pytest.raises(ValueError, match="volume ID of 8 bytes"):
        NameCipher(SECRET, bytes(8))


# -- symbolic links ------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 256, 1000, 4095 - 1072, MAX_SYMLINK_TARGET])
def test_symlink_targets_round_trip(cipher: NameCipher, length: int) -> None:
    target = bytes(NAME_BYTES[i % len(NAME_BYTES)] for i in range(length - 1)) + b"/"
    stored_target = cipher.encrypt_symlink(target)
    assert len(stored_target) == stored_symlink_size(length) <= 4095
    assert B64URL.fullmatch(stored_target)
    assert cipher.decrypt_symlink(stored_target) == target


@examples(200)
@given(target=st.binary(min_size=1, max_size=MAX_SYMLINK_TARGET).filter(lambda t: b"\0" not in t))
def test_random_symlink_targets_round_trip(cipher: NameCipher, target: bytes) -> None:
    assert cipher.decrypt_symlink(cipher.encrypt_symlink(target)) == target


def test_symlink_targets_are_not_deterministic(cipher: NameCipher) -> None:
    target = b"../customers/ACME-Corp/contract.pdf"
    made = {cipher.encrypt_symlink(target) for _ in range(20)}
    assert len(made) == 20


def test_symlink_target_limits(cipher: NameCipher) -> None:
    with pytest.raises(PlaintextTooLong, match="symlink target of 3024 bytes.*at most 3023"):
        cipher.encrypt_symlink(b"t" * (MAX_SYMLINK_TARGET + 1))
    for bad in (b"", b"a\0b"):
        with pytest.raises(ValueError):
            cipher.encrypt_symlink(bad)


def test_tampered_or_foreign_symlink_target_fails(cipher: NameCipher) -> None:
    stored_target = cipher.encrypt_symlink(b"../salaries/2026.xlsx")
    data = decode(stored_target)
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 0x80
        with pytest.raises(EncryptedNameError, match="failed authentication"):
            cipher.decrypt_symlink(reencode(bytes(flipped)))
    with pytest.raises(EncryptedNameError, match="failed authentication"):
        NameCipher(SECRET, bytes(16)).decrypt_symlink(stored_target)
    with pytest.raises(EncryptedNameError, match="symlink target .*not base64url"):
        cipher.decrypt_symlink(b"../salaries/2026.xlsx")  # a plain target planted
    with pytest.raises(EncryptedNameError, match="4096 bytes, want at most 4095"):
        cipher.decrypt_symlink(b"A" * 4096)
    with pytest.raises(EncryptedNameError, match="ciphertext of 16 bytes"):
        cipher.decrypt_symlink(reencode(data[:32]))


# -- extended attributes ---------------------------------------------------------------


@pytest.mark.parametrize("namespace", [b"user.", b"trusted."])
@pytest.mark.parametrize("length", [1, 15, 16, 100, MAX_XATTR_NAME_SUFFIX])
def test_xattr_names_round_trip(cipher: NameCipher, namespace: bytes, length: int) -> None:
    name = namespace + bytes(NAME_BYTES[i % len(NAME_BYTES)] for i in range(length))
    backing = cipher.encrypt_xattr_name(name)
    assert backing.startswith(namespace) and len(backing) <= 255
    assert B64URL.fullmatch(backing[len(namespace) :])
    assert xattr_kind(backing) is XattrKind.ENCRYPTED
    assert cipher.encrypt_xattr_name(name) == backing  # deterministic: one getxattr
    assert cipher.decrypt_xattr_name(backing) == name


def test_xattr_name_limits_and_namespaces(cipher: NameCipher) -> None:
    with pytest.raises(PlaintextTooLong, match="at most 159 bytes after 'user.'"):
        cipher.encrypt_xattr_name(b"user." + b"n" * 160)
    for bad in (b"security.selinux", b"system.posix_acl_access", b"user.", b"user.a\0b", b"x"):
        with pytest.raises(ValueError):
            cipher.encrypt_xattr_name(bad)
    for not_encrypted in (b"user.kmsfs.header", b"system.posix_acl_default", b"security.x"):
        with pytest.raises(ValueError, match="not an encrypted one"):
            cipher.decrypt_xattr_name(not_encrypted)


def test_xattr_name_moved_to_another_namespace_or_volume_fails(cipher: NameCipher) -> None:
    backing = cipher.encrypt_xattr_name(b"user.comment")
    moved = b"trusted." + backing[len(b"user.") :]
    with pytest.raises(EncryptedNameError, match="encrypted xattr name.*failed authentication"):
        cipher.decrypt_xattr_name(moved)
    with pytest.raises(EncryptedNameError, match="failed authentication"):
        NameCipher(SECRET, bytes(16)).decrypt_xattr_name(backing)
    with pytest.raises(EncryptedNameError, match="not canonical|not base64url|ciphertext"):
        cipher.decrypt_xattr_name(backing[:-1])
    with pytest.raises(EncryptedNameError, match="256 bytes, want at most 255"):
        cipher.decrypt_xattr_name(b"user." + b"A" * 251)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (b"user.kmsfs.header", XattrKind.OWN),
        (b"user.kmsfs.dirid", XattrKind.OWN),
        (b"user.kmsfsAAAA", XattrKind.ENCRYPTED),  # base64url may begin so: no dot follows
        (b"trusted.AAAA", XattrKind.ENCRYPTED),
        (b"system.posix_acl_access", XattrKind.CLEAR),
        (b"system.posix_acl_default", XattrKind.CLEAR),
        (b"security.selinux", XattrKind.OTHER),
        (b"system.other", XattrKind.OTHER),
    ],
)
def test_xattr_kind(name: bytes, kind: XattrKind) -> None:
    assert xattr_kind(name) is kind


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 4000, MAX_XATTR_VALUE])
def test_xattr_values_round_trip(cipher: NameCipher, length: int) -> None:
    value = os.urandom(length)
    sealed = cipher.encrypt_xattr_value(FILE_ID, b"user.comment", value)
    assert len(sealed) == stored_xattr_value_size(length) <= 65536
    assert cipher.decrypt_xattr_value(FILE_ID, b"user.comment", sealed) == value
    assert cipher.encrypt_xattr_value(FILE_ID, b"user.comment", value) != sealed  # random


def test_xattr_value_limit(cipher: NameCipher) -> None:
    with pytest.raises(PlaintextTooLong, match="65504 bytes.*at most 65503"):
        cipher.encrypt_xattr_value(FILE_ID, b"user.x", bytes(MAX_XATTR_VALUE + 1))


def test_xattr_value_is_bound_to_object_name_and_volume(cipher: NameCipher) -> None:
    sealed = cipher.encrypt_xattr_value(FILE_ID, b"user.comment", b"contains SSNs")
    for other, object_id, name in [
        (cipher, DIR, b"user.comment"),  # copied to another file or directory
        (cipher, b"", b"user.comment"),  # to a symlink or device
        (cipher, FILE_ID, b"user.note"),  # to another attribute of the same file
        (cipher, FILE_ID, b"trusted.comment"),
        (NameCipher(SECRET, bytes(16)), FILE_ID, b"user.comment"),  # to another volume
    ]:
        with pytest.raises(EncryptedNameError, match="failed authentication"):
            other.decrypt_xattr_value(object_id, name, sealed)
    on_symlink = cipher.encrypt_xattr_value(b"", b"trusted.x", b"v")
    assert cipher.decrypt_xattr_value(b"", b"trusted.x", on_symlink) == b"v"
    with pytest.raises(EncryptedNameError, match="failed authentication"):
        cipher.decrypt_xattr_value(ROOT_DIR_ID, b"trusted.x", on_symlink)


def test_tampered_xattr_value_fails(cipher: NameCipher) -> None:
    sealed = cipher.encrypt_xattr_value(FILE_ID, b"user.comment", b"contains SSNs")
    for offset in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[offset] ^= 0x04
        with pytest.raises(EncryptedNameError, match="value of xattr 'user.comment'"):
            cipher.decrypt_xattr_value(FILE_ID, b"user.comment", bytes(flipped))
    for cut in (sealed[:-1], sealed[:-16], sealed[:31], b""):
        with pytest.raises(EncryptedNameError, match="ciphertext of|failed authentication"):
            cipher.decrypt_xattr_value(FILE_ID, b"user.comment", cut)
    with pytest.raises(EncryptedNameError, match="failed authentication"):
        cipher.decrypt_xattr_value(FILE_ID, b"user.comment", b"contains SSNs" + bytes(35))
    with pytest.raises(ValueError, match="object ID of 4 bytes"):
        cipher.decrypt_xattr_value(b"abcd", b"user.comment", sealed)


# -- limits, computed from the layout ---------------------------------------------------


def test_limits_follow_from_the_layout() -> None:
    def b64(n: int) -> int:
        return len(base64.urlsafe_b64encode(bytes(n)).rstrip(b"="))

    def padded(n: int) -> int:
        return n + 16 - n % 16

    assert max(n for n in range(1, 256) if b64(16 + padded(n)) <= 255) == MAX_SHORT_NAME == 159
    assert b64(16 + padded(255)) == names.MAX_SIDECAR_SIZE == 363
    assert b64(32) == 43 and len(b".kmsfs-ln.") + 43 == names.LONG_NAME_SIZE
    assert max(n for n in range(1, 4096) if b64(32 + padded(n)) <= 4095) == MAX_SYMLINK_TARGET
    for namespace in (b"user.", b"trusted."):
        fits = [n for n in range(1, 256) if len(namespace) + b64(16 + padded(n)) <= 255]
        assert max(fits) == MAX_XATTR_NAME_SUFFIX == 159
    assert max(n for n in range(65537) if 32 + padded(n) <= 65536) == MAX_XATTR_VALUE
    for n in (0, 1, 15, 16, 255):
        assert stored_xattr_value_size(n) == 32 + padded(n)
        assert stored_name_size(max(n, 1)) == b64(16 + padded(max(n, 1)))
