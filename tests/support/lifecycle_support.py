"""Helpers for the lifecycle tests: populate a volume offline, fast, and read it back."""

from __future__ import annotations

import os
from pathlib import Path

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.header_xattr import write_new_header
from kmsfs.format.content import BlockCipher
from kmsfs.format.header import NEW_FILE_FORMAT, XATTR_NAME, FileHeader
from kmsfs.format.volume_config import VolumeConfig
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import wipe
from kmsfs.volume_open import open_volume


def populate(backing: Path, key_file: Path, count: int, size: int = 100) -> dict[str, bytes]:
    """Create *count* files in a few directories exactly as the daemon would; returns contents."""
    config, keyring = open_volume(backing, {"key_file": str(key_file)})
    contents: dict[str, bytes] = {}
    try:
        for n in range(count):
            rel = f"d{n % 10}/f{n:05d}"
            (backing / rel).parent.mkdir(exist_ok=True)
            contents[rel] = os.urandom(size + n % 50)
            write_file(backing / rel, config, keyring, contents[rel])
    finally:
        keyring.close()
    return contents


def write_file(
    path: Path,
    config: VolumeConfig,
    keyring: Keyring,
    data: bytes,
    version: int = NEW_FILE_FORMAT,
) -> None:
    """Create the backing file *path* holding *data*, encrypted as the daemon writes it, in
    file format *version* (format 1: as kmsfs before format 2 wrote it)."""
    header, cipher = keyring.new_file_cipher(config.block_size, version=version)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_new_header(fd, header)
        content = ContentFile(fd, cipher, 0, lambda: str(path))
        content.write_empty()
        content.write(0, data)
    finally:
        os.close(fd)


def write_files(
    backing: Path, key_file: Path, files: dict[str, bytes], version: int = NEW_FILE_FORMAT
) -> None:
    """``write_file`` for each name of *files* (relative to the unmounted *backing*)."""
    config, keyring = open_volume(backing, {"key_file": str(key_file)})
    try:
        for rel, data in files.items():
            write_file(backing / rel, config, keyring, data, version)
    finally:
        keyring.close()


def header_of(path: Path) -> FileHeader:
    """The parsed header of the backing file *path*."""
    return FileHeader.parse(os.getxattr(path, XATTR_NAME))


def entry_refs(path: Path) -> list[str]:
    return [entry.key_ref for entry in header_of(path).entries]


def read_file(path: Path, keyring: Keyring) -> bytes:
    """The plaintext of the backing file *path* (test side: no hostile tree here)."""
    header = header_of(path)
    return _read(path, keyring.cipher_for(header, str(path)))


def read_file_with_any_key(path: Path, key_files: list[Path]) -> bytes:
    """The plaintext of the backing file *path*, unwrapped by whichever of the local
    key files opens one of its header's entries (AssertionError if none does)."""
    from kmsfs.keys import local
    from kmsfs.keys.provider import KeyContext
    from kmsfs.keys.settings import LocalSettings

    header = header_of(path)
    context = KeyContext(header.volume_id, header.file_id)
    for key_file in key_files:
        provider = local.open_provider({}, LocalSettings(key_file=str(key_file)), None)
        for entry in header.entries:
            if provider.accepts(entry):
                key = provider.unwrap(entry, context)
                try:
                    return _read(path, BlockCipher.for_file(key, header))
                finally:
                    wipe(key)
    raise AssertionError(f"{path}: no key file opens any entry of its header")


def _read(path: Path, cipher: BlockCipher) -> bytes:
    with open(path, "rb") as handle:
        content = ContentFile.open(handle.fileno(), cipher, lambda: str(path))
        return bytes(content.read(0, content.size))
