"""File content: fixed-size blocks, each sealed with AES-256-GCM.

Backing file body (see docs/FORMAT.md, "Content")::

    block i  = nonce (12 random bytes) || ciphertext (len(plaintext_i)) || tag (16)
    AAD_i    = file ID (16) || i as u64 big-endian (8) || last flag (1: 0x01 if block i
               is the final block of the file, else 0x00)
    key      = HKDF-SHA256(file key, salt = none, info = "kmsfs/v1/content" || suite (1)
               || block size u32 || file ID, length 32)

Every block but the final one holds exactly ``block_size`` plaintext bytes; the
final one holds 0..block_size bytes.  An empty file is one final block with no
plaintext (28 bytes), so a backing file is never empty.  A backing block of all
zero bytes that is not the final block is a hole and reads as zeros.

Readers accept a non-final block sealed with last flag 1 (left by an append
that was interrupted before the old final block was re-sealed), but the final
block must carry flag 1: a file truncated at a block boundary fails there.

This module is pure: no FUSE, no I/O.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import IntegrityError
from kmsfs.format.header import SUITE_AES256GCM_HKDF, FileHeader

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
CONTENT_LABEL = b"kmsfs/v1/content"
FILE_KEY_SIZE = 32
# NIST SP 800-38D 8.3: at most 2**32 invocations of GCM with random 96-bit nonces per key.
MAX_BLOCK_ENCRYPTIONS = 2**32

_AAD = struct.Struct(">16sQB")
_ZERO_NONCE = bytes(NONCE_SIZE)


def derive_content_key(file_key: bytes | bytearray, header: FileHeader) -> bytes:
    """The AES-256-GCM key for the blocks of the file described by *header*."""
    if len(file_key) != FILE_KEY_SIZE:
        raise ValueError(f"file key of {len(file_key)} bytes: want {FILE_KEY_SIZE}")
    info = CONTENT_LABEL + struct.pack(">BI16s", header.suite, header.block_size, header.file_id)
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(bytes(file_key))


class Layout:
    """Maps between plaintext and backing sizes and offsets for one block size."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.backing_block = block_size + OVERHEAD

    def plain_size(self, backing_size: int) -> int:
        """Plaintext size of a backing file of *backing_size* bytes (never raises).

        A malformed size (a final block shorter than its overhead) counts the
        complete blocks only; reading such a file fails in ``check_backing_size``.
        """
        full, rest = divmod(backing_size, self.backing_block)
        return full * self.block_size + max(rest - OVERHEAD, 0)

    def backing_size(self, plain_size: int) -> int:
        """Backing size of a well-formed file holding *plain_size* bytes."""
        if plain_size == 0:
            return OVERHEAD
        full, rest = divmod(plain_size, self.block_size)
        return full * self.backing_block + (rest + OVERHEAD if rest else 0)

    def check_backing_size(self, backing_size: int, what: str) -> None:
        """Raise IntegrityError if no well-formed file has *backing_size* bytes."""
        full, rest = divmod(backing_size, self.backing_block)
        if backing_size == 0:
            raise IntegrityError("backing file is empty (truncated to zero)", where=what)
        if 0 < rest < OVERHEAD:
            raise IntegrityError(
                f"backing size {backing_size} ends inside a block header", where=what
            )
        if rest == OVERHEAD and full:
            raise IntegrityError(f"unexpected empty block after block {full - 1}", where=what)

    def final_index(self, plain_size: int) -> int:
        """Index of the final block of a file of *plain_size* bytes."""
        return max(plain_size - 1, 0) // self.block_size


class BlockCipher:
    """Seals and opens runs of consecutive blocks of one file.

    Thread-safe: holds no mutable state, so worker threads may share it.
    """

    def __init__(self, content_key: bytes, file_id: bytes, block_size: int) -> None:
        self._aead = AESGCM(content_key)
        self._file_id = file_id
        self.layout = Layout(block_size)
        self.block_size = block_size

    @classmethod
    def for_file(cls, file_key: bytes | bytearray, header: FileHeader) -> BlockCipher:
        """Build the cipher for a file from its unwrapped key and parsed header."""
        if header.suite != SUITE_AES256GCM_HKDF:
            raise IntegrityError(f"unsupported suite {header.suite}")
        return cls(derive_content_key(file_key, header), header.file_id, header.block_size)

    def seal(
        self, first_index: int, plaintext: bytes | bytearray | memoryview, final_index: int
    ) -> bytearray:
        """Encrypt *plaintext*, which starts at block *first_index*.

        All blocks but the last of the run must be whole.  A block whose index
        equals *final_index* is sealed with the last flag set.
        """
        bs = self.block_size
        count = max(-(-len(plaintext) // bs), 1)
        out = bytearray(len(plaintext) + count * OVERHEAD)
        view = memoryview(out)
        source = memoryview(plaintext)
        nonces = os.urandom(NONCE_SIZE * count)
        pos = 0
        aad = _AAD.pack
        file_id = self._file_id
        encrypt_into = self._aead.encrypt_into
        for n in range(count):
            index = first_index + n
            chunk = source[n * bs : (n + 1) * bs]
            nonce = nonces[n * NONCE_SIZE : (n + 1) * NONCE_SIZE]
            view[pos : pos + NONCE_SIZE] = nonce
            end = pos + NONCE_SIZE + len(chunk) + TAG_SIZE
            encrypt_into(
                nonce,
                chunk,
                aad(file_id, index, index == final_index),
                view[pos + NONCE_SIZE : end],
            )
            pos = end
        return out

    def open(
        self, first_index: int, sealed: bytes | bytearray | memoryview, final_index: int, what: str
    ) -> bytearray:
        """Decrypt a run of sealed blocks starting at block *first_index*.

        Holes (all-zero blocks other than the final block) read as zeros.
        Raises IntegrityError naming *what* and the block index if a block
        fails authentication or the run ends inside a block header.
        """
        bbs = self.layout.backing_block
        source = memoryview(sealed)
        total = len(source)
        count = -(-total // bbs)
        out = bytearray(total - count * OVERHEAD) if total >= count * OVERHEAD else None
        if out is None:
            raise IntegrityError(f"block {first_index + count - 1} is cut short", where=what)
        view = memoryview(out)
        aad = _AAD.pack
        file_id = self._file_id
        decrypt_into = self._aead.decrypt_into
        pos = 0
        opos = 0
        for n in range(count):
            index = first_index + n
            block = source[n * bbs : (n + 1) * bbs]
            if len(block) < OVERHEAD:
                raise IntegrityError(f"block {index} is cut short", where=what)
            plain_len = len(block) - OVERHEAD
            nonce = block[:NONCE_SIZE]
            body = block[NONCE_SIZE:]
            target = view[opos : opos + plain_len]
            is_final = index == final_index
            if nonce == _ZERO_NONCE and block == bytes(len(block)):
                if is_final:
                    raise IntegrityError(f"final block {index} is zeroed", where=what)
                target[:] = bytes(plain_len)
            else:
                try:
                    decrypt_into(nonce, body, aad(file_id, index, is_final), target)
                except InvalidTag:
                    if is_final:
                        raise IntegrityError(
                            f"block {index} (final) failed authentication"
                            " (modified, moved, or the file was truncated)",
                            where=what,
                        ) from None
                    try:
                        decrypt_into(nonce, body, aad(file_id, index, True), target)
                    except InvalidTag:
                        raise IntegrityError(
                            f"block {index} failed authentication (modified or moved)",
                            where=what,
                        ) from None
            pos += len(block)
            opos += plain_len
        return out
