"""The backing names ``EncryptedNames`` keeps: a name is encrypted once for the requests
that follow one another on it (LOOKUP then CREATE, a listing then UNLINK), each
directory's names apart, only names that decrypted kept from a listing, and at most
``MAX_ENCRYPTED`` of them.  Real backing directories; the cipher counts its calls."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.backing import encrypted_names
from kmsfs.backing.encrypted_names import EncryptedNames
from kmsfs.backing.names import Dir
from kmsfs.format.names import LONG_NAME_PREFIX, BackingName, NameCipher

DIR_A = bytes(range(16))
DIR_B = bytes(range(16, 32))
LONG = b"L" * 200  # stored as a long name with a sidecar
FLAGS = os.O_RDWR | os.O_CLOEXEC


class CountingCipher(NameCipher):
    """A NameCipher that counts its entry-name encryptions."""

    encryptions = 0

    def encrypt_name(self, dir_id: bytes, name: bytes) -> BackingName:
        self.encryptions += 1
        return super().encrypt_name(dir_id, name)


@pytest.fixture
def cipher() -> CountingCipher:
    return CountingCipher(os.urandom(32), os.urandom(16))


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Dir, Dir]]:
    """Two backing directories with the IDs DIR_A and DIR_B."""
    fds = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        fds.append(os.open(tmp_path / name, os.O_RDONLY | os.O_DIRECTORY))
    try:
        yield Dir(fds[0], DIR_A), Dir(fds[1], DIR_B)
    finally:
        for fd in fds:
            os.close(fd)


def test_lookup_then_create_encrypts_the_name_once(
    cipher: CountingCipher, dirs: tuple[Dir, Dir]
) -> None:
    names = EncryptedNames(cipher)
    a, _ = dirs
    looked_up = names.backing_name(a, b"fmtmsg.h")  # LOOKUP: not there yet
    fd, made = names.open_new(a, b"fmtmsg.h", FLAGS, 0o600)  # CREATE
    os.close(fd)
    assert made == looked_up == cipher.encrypt_name(DIR_A, b"fmtmsg.h").name
    assert os.listdir(a.fd) == [os.fsdecode(made)]
    assert cipher.encryptions == 2  # one for lookup and create, one by this test


def test_a_name_is_kept_per_directory(cipher: CountingCipher, dirs: tuple[Dir, Dir]) -> None:
    names = EncryptedNames(cipher)
    a, b = dirs
    in_a = names.backing_name(a, b"same")
    in_b = names.backing_name(b, b"same")
    assert in_a != in_b
    assert names.backing_name(a, b"same") == in_a
    assert names.backing_name(b, b"same") == in_b
    assert cipher.encryptions == 2


def test_a_listing_keeps_the_names_it_decrypted_for_unlink(
    cipher: CountingCipher, dirs: tuple[Dir, Dir]
) -> None:
    a, _ = dirs
    writer = EncryptedNames(cipher)
    for name in (b"short", LONG):
        fd, _ = writer.open_new(a, name, FLAGS, 0o600)
        os.close(fd)
    assert any(n.endswith(".name") for n in os.listdir(a.fd))  # the long name's sidecar

    remover = EncryptedNames(cipher)  # another daemon: nothing kept yet
    listed = remover.listing(a, lambda: "a")
    assert sorted(entry.name for entry in listed) == sorted([b"short", LONG])
    before = cipher.encryptions
    for entry in listed:
        remover.unlink(a, entry.name)  # rm -rf: a listing, then an UNLINK per name
    assert cipher.encryptions == before
    assert os.listdir(a.fd) == []  # both entries and the sidecar are gone


def test_an_entry_that_does_not_decrypt_is_not_kept(
    cipher: CountingCipher, dirs: tuple[Dir, Dir], tmp_path: Path
) -> None:
    a, b = dirs
    names = EncryptedNames(cipher)
    fd, in_a = names.open_new(a, b"plan", FLAGS, 0o600)
    os.close(fd)
    shutil.copy(tmp_path / "a" / os.fsdecode(in_a), tmp_path / "b" / os.fsdecode(in_a))

    fresh = EncryptedNames(cipher)
    assert fresh.listing(b, lambda: "b") == []  # bound to DIR_A: fails authentication in b
    in_b = fresh.backing_name(b, b"plan")
    assert in_b == cipher.encrypt_name(DIR_B, b"plan").name
    assert in_b != in_a
    with pytest.raises(FileNotFoundError):
        fresh.unlink(b, b"plan")  # the copy is not the name "plan" of b
    assert os.listdir(b.fd) == [os.fsdecode(in_a)]


def test_at_most_max_encrypted_names_are_kept_oldest_dropped_first(
    cipher: CountingCipher, dirs: tuple[Dir, Dir], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encrypted_names, "MAX_ENCRYPTED", 4)
    names = EncryptedNames(cipher)
    a, _ = dirs
    for i in range(5):
        names.backing_name(a, b"n%d" % i)
    assert cipher.encryptions == 5
    names.backing_name(a, b"n4")  # kept
    assert cipher.encryptions == 5
    assert names.backing_name(a, b"n0") == cipher.encrypt_name(DIR_A, b"n0").name  # dropped
    assert cipher.encryptions == 7


def test_a_kept_long_name_still_gets_its_sidecar(
    cipher: CountingCipher, dirs: tuple[Dir, Dir]
) -> None:
    names = EncryptedNames(cipher)
    a, _ = dirs
    looked_up = names.backing_name(a, LONG)
    assert looked_up.startswith(LONG_NAME_PREFIX)
    fd, made = names.open_new(a, LONG, FLAGS, 0o600)
    os.close(fd)
    assert made == looked_up
    assert sorted(os.listdir(a.fd)) == sorted([os.fsdecode(made), os.fsdecode(made) + ".name"])
    assert [entry.name for entry in EncryptedNames(cipher).listing(a, lambda: "a")] == [LONG]
