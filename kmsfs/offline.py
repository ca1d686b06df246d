"""Offline tools on backing files: inspect a header, decrypt a file.  No FUSE."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from kmsfs.errors import FormatError, KmsfsError
from kmsfs.format.content import BlockCipher, Layout
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.fs.content_file import ContentFile
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import wipe

CHUNK_BLOCKS = 256


def read_header(path: str | os.PathLike[str]) -> FileHeader:
    """The parsed header of a backing file; FormatError if absent or malformed."""
    try:
        raw = os.getxattr(path, XATTR_NAME, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise FormatError(f"{path}: no kmsfs header ({XATTR_NAME} is missing)") from None
        raise
    try:
        return FileHeader.parse(raw)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of *path* and its sizes, without any key."""
    header = read_header(path)
    backing_size = os.stat(path).st_size
    return {
        "path": str(path),
        "format_version": header.version,
        "suite": header.suite,
        "block_size": header.block_size,
        "volume_id": header.volume_id.hex(),
        "file_id": header.file_id.hex(),
        "backing_size": backing_size,
        "plaintext_size": Layout(header.block_size).plain_size(backing_size),
        "entries": [
            {"provider": e.provider, "key_ref": e.key_ref, "wrapped_key_bytes": len(e.blob)}
            for e in header.entries
        ],
    }


def decrypt_file(
    backing_file: str | os.PathLike[str], output: str | os.PathLike[str], keyring: Keyring
) -> int:
    """Decrypt one backing file into *output* (which must not exist); returns the size.

    The output is written to a temporary name and renamed only when every
    block has authenticated, so a failure leaves no partial plaintext behind.
    """
    out_path = Path(output)
    if out_path.exists() or out_path.is_symlink():
        raise KmsfsError(f"{output} exists: refusing to overwrite it")
    header = read_header(backing_file)
    key = keyring.unwrap(header, str(backing_file))
    try:
        cipher = BlockCipher.for_file(key, header)
    finally:
        wipe(key)
    temp = out_path.with_name(f".{out_path.name}.kmsfs-partial")
    with open(backing_file, "rb") as source:
        content = ContentFile.open(source.fileno(), cipher, lambda: str(backing_file))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            chunk = CHUNK_BLOCKS * header.block_size
            for offset in range(0, content.size, chunk):
                os.write(fd, content.read(offset, chunk))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
    os.rename(temp, out_path)
    return content.size
