"""Helpers for the lifecycle tests: populate a volume offline, fast, and read it back."""

from __future__ import annotations

import os
from pathlib import Path

from kmsfs.format.content import BlockCipher
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.fs.content_file import ContentFile
from kmsfs.keys.provider import wipe
from kmsfs.volume import open_volume


def populate(backing: Path, key_file: Path, count: int, size: int = 100) -> dict[str, bytes]:
    """Create *count* files in a few directories exactly as the daemon would; returns contents."""
    config, keyring = open_volume(backing, {"key_file": str(key_file)})
    contents: dict[str, bytes] = {}
    try:
        for n in range(count):
            rel = f"d{n % 10}/f{n:05d}"
            path = backing / rel
            path.parent.mkdir(exist_ok=True)
            data = os.urandom(size + n % 50)
            file_id, key, entries = keyring.new_file()
            header = FileHeader(config.volume_id, file_id, config.block_size, entries)
            try:
                cipher = BlockCipher.for_file(key, header)
            finally:
                wipe(key)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.setxattr(fd, XATTR_NAME, header.pack())
                content = ContentFile(fd, cipher, 0, lambda rel=rel: rel)
                content.write_empty()
                content.write(0, data)
            finally:
                os.close(fd)
            contents[rel] = data
    finally:
        keyring.close()
    return contents


def entry_refs(path: Path) -> list[str]:
    header = FileHeader.parse(os.getxattr(path, XATTR_NAME))
    return [entry.key_ref for entry in header.entries]
