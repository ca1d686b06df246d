"""File content: fixed-size blocks, each sealed with an AEAD.

Backing file body (see docs/FORMAT.md, "Content"), for file format 1 and 2::

    format 1: block i = nonce (12 random bytes) || AES-256-GCM ciphertext || tag (16)
    format 2: block i = nonce (24 bytes) || XAES-256-GCM ciphertext || tag (16)
    AAD_i    = file ID (16) || i as u64 big-endian (8) || last flag (1: 0x01 if block i
               is the final block of the file, else 0x00)
    key      = HKDF-SHA256(file key, salt = none, info = "kmsfs/v<format>/content" ||
               suite (1) || block size u32 || file ID, length 32)

In format 2 a cipher draws a random 12-byte nonce prefix and uses it for the
next PREFIX_BLOCKS blocks it seals, across calls, and each block has 12 random
bytes of its own: one XAES key derivation per PREFIX_BLOCKS blocks, not per
block or per write (docs/FORMAT.md, "Format-2 nonces" and "How much one file
key may encrypt", for the bound).

Every block but the final one holds exactly ``block_size`` plaintext bytes; the
final one holds 0..block_size bytes.  An empty file is one final block with no
plaintext (28 or 40 bytes), so a backing file is never empty.  A backing block
of all zero bytes that is not the final block is a hole and reads as zeros.

Readers accept a non-final block sealed with last flag 1 (left by an append
that was interrupted before the old final block was re-sealed), but the final
block must carry flag 1: a file truncated at a block boundary fails there.

Which format a backing file has is its header's; without the header (``stat``)
the backing file's mode tells it: FORMAT_MARKER (S_ISVTX) is set on format-2
files (``format_of_mode``).

This module is pure: no FUSE, no I/O.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import IntegrityError
from kmsfs.format.header import FORMAT_1, FORMAT_2, FileHeader
from kmsfs.format.xaes import PREFIX_SIZE, Xaes256Gcm

TAG_SIZE = 16
NONCE_SIZES = {FORMAT_1: 12, FORMAT_2: 24}
OVERHEADS = {version: size + TAG_SIZE for version, size in NONCE_SIZES.items()}
CONTENT_LABELS = {FORMAT_1: b"kmsfs/v1/content", FORMAT_2: b"kmsfs/v2/content"}
FILE_KEY_SIZE = 32
# NIST SP 800-38D 8.3: at most 2**32 invocations of GCM with random 96-bit nonces per key.
MAX_BLOCK_ENCRYPTIONS = 2**32
# Format 2: blocks sealed under one nonce prefix (one derived key) at most.
PREFIX_BLOCKS = 4096
# The backing file's mode bit that says "format 2" (meaningless on a Linux regular file).
FORMAT_MARKER = stat.S_ISVTX

_AAD = struct.Struct(">16sQB")


def format_of_mode(mode: int) -> int:
    """The file format a regular backing file of mode *mode* claims (its marker)."""
    return FORMAT_2 if mode & FORMAT_MARKER else FORMAT_1


def mode_for_format(mode: int, version: int) -> int:
    """The permission bits of *mode* with the marker of file format *version*."""
    bits = stat.S_IMODE(mode) & ~FORMAT_MARKER
    return bits | FORMAT_MARKER if version == FORMAT_2 else bits


def derive_content_key(file_key: bytes | bytearray, header: FileHeader) -> bytes:
    """The content key for the blocks of the file described by *header* (AES-256-GCM's
    in format 1, XAES-256-GCM's in format 2)."""
    if len(file_key) != FILE_KEY_SIZE:
        raise ValueError(f"file key of {len(file_key)} bytes: want {FILE_KEY_SIZE}")
    info = CONTENT_LABELS[header.version] + struct.pack(
        ">BI16s", header.suite, header.block_size, header.file_id
    )
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(bytes(file_key))


class Layout:
    """Maps between plaintext and backing sizes and offsets for one block size and
    file format.  Attributes: block_size, version, overhead (bytes a block adds),
    backing_block (block_size + overhead)."""

    def __init__(self, block_size: int, version: int) -> None:
        self.block_size = block_size
        self.version = version
        self.overhead = OVERHEADS[version]
        self.backing_block = block_size + self.overhead

    def plain_size(self, backing_size: int) -> int:
        """Plaintext size of a backing file of *backing_size* bytes (never raises).

        A malformed size (a final block shorter than its overhead) counts the
        complete blocks only; reading such a file fails in ``check_backing_size``.
        """
        full, rest = divmod(backing_size, self.backing_block)
        return full * self.block_size + max(rest - self.overhead, 0)

    def backing_size(self, plain_size: int) -> int:
        """Backing size of a well-formed file holding *plain_size* bytes."""
        if plain_size == 0:
            return self.overhead
        full, rest = divmod(plain_size, self.block_size)
        return full * self.backing_block + (rest + self.overhead if rest else 0)

    def check_backing_size(self, backing_size: int, what: str) -> None:
        """Raise IntegrityError if no well-formed file has *backing_size* bytes."""
        full, rest = divmod(backing_size, self.backing_block)
        if backing_size == 0:
            raise IntegrityError("backing file is empty (truncated to zero)", where=what)
        if 0 < rest < self.overhead:
            raise IntegrityError(
                f"backing size {backing_size} ends inside a block header", where=what
            )
        if rest == self.overhead and full:
            raise IntegrityError(f"unexpected empty block after block {full - 1}", where=what)

    def final_index(self, plain_size: int) -> int:
        """Index of the final block of a file of *plain_size* bytes."""
        return max(plain_size - 1, 0) // self.block_size


# (gcm nonce, plaintext, aad, output) -> None: AESGCM.encrypt_into / decrypt_into
_Sealer = Callable[[bytes | memoryview, memoryview, bytes, memoryview], object]


def _unkeyed(*args: object) -> None:
    """Stands for a format-2 opener before the first block's prefix chose a key."""
    raise AssertionError("no key chosen for this block")


class BlockCipher:
    """Seals and opens runs of consecutive blocks of one file (``GcmBlockCipher`` for
    format 1, ``XaesBlockCipher`` for format 2; ``for_file`` picks the header's).

    Attributes: version (file format), layout, block_size, max_encryptions (block
    encryptions one file key may make, None when there is no practical limit).
    Thread-safe: worker threads may share one.
    """

    version: int
    max_encryptions: int | None = None
    _last_opened: tuple[bytes, _Sealer] = (b"", _unkeyed)  # format 2: prefix, its opener

    def __init__(self, file_id: bytes, block_size: int) -> None:
        self._file_id = file_id
        self.layout = Layout(block_size, self.version)
        self.block_size = block_size
        self._nonce_size = NONCE_SIZES[self.version]

    @staticmethod
    def for_file(file_key: bytes | bytearray, header: FileHeader) -> BlockCipher:
        """Build the cipher for a file from its unwrapped key and parsed header."""
        kind = CIPHERS.get(header.version)
        if kind is None:
            raise IntegrityError(f"unsupported file format {header.version}")
        return kind(derive_content_key(file_key, header), header.file_id, header.block_size)

    # -- the format's nonces and keys ------------------------------------------

    def _sealing(self, count: int) -> tuple[bytes, bytes, _Sealer]:
        """For a run of *count* blocks: the nonce prefix they share (b"" if none), the
        random rest of each nonce (concatenated), and the AEAD call that seals them."""
        raise NotImplementedError

    def _opener(self, prefix: bytes) -> _Sealer:
        """The AEAD call that opens blocks whose nonce begins with *prefix* (its first
        12 bytes in format 2, b"" in format 1)."""
        raise NotImplementedError

    # -- runs of blocks -----------------------------------------------------------

    def seal(
        self, first_index: int, plaintext: bytes | bytearray | memoryview, final_index: int
    ) -> bytearray:
        """Encrypt *plaintext*, which starts at block *first_index*.

        All blocks but the last of the run must be whole.  A block whose index
        equals *final_index* is sealed with the last flag set.
        """
        bs = self.block_size
        count = max(-(-len(plaintext) // bs), 1)
        overhead = self.layout.overhead
        out = bytearray(len(plaintext) + count * overhead)
        view = memoryview(out)
        source = memoryview(plaintext)
        aad = _AAD.pack
        file_id = self._file_id
        pos = 0
        for start in range(0, count, PREFIX_BLOCKS):
            run = min(count - start, PREFIX_BLOCKS)
            prefix, rests, encrypt_into = self._sealing(run)
            lead = len(prefix)
            size = self._nonce_size - lead  # random bytes of each block's own
            for n in range(start, start + run):
                chunk = source[n * bs : (n + 1) * bs]
                own = rests[(n - start) * size : (n - start + 1) * size]
                if lead:
                    view[pos : pos + lead] = prefix
                body = pos + lead + size
                view[pos + lead : body] = own
                end = body + len(chunk) + TAG_SIZE
                index = first_index + n
                encrypt_into(own, chunk, aad(file_id, index, index == final_index), view[body:end])
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
        overhead = self.layout.overhead
        source = memoryview(sealed)
        total = len(source)
        count = -(-total // bbs)
        out = bytearray(total - count * overhead) if total >= count * overhead else None
        if out is None:
            raise IntegrityError(f"block {first_index + count - 1} is cut short", where=what)
        view = memoryview(out)
        aad = _AAD.pack
        file_id = self._file_id
        nonce_size = self._nonce_size
        lead = nonce_size - 12  # the shared prefix's bytes (format 2), 0 in format 1
        zero_nonce = bytes(nonce_size)
        # the prefix whose key decrypt_into holds (b"" before the first: never equal)
        prefix, decrypt_into = self._last_opened if lead else (b"", self._opener(b""))
        opos = 0
        for n in range(count):
            index = first_index + n
            block = source[n * bbs : (n + 1) * bbs]
            if len(block) < overhead:
                raise IntegrityError(f"block {index} is cut short", where=what)
            plain_len = len(block) - overhead
            nonce = block[:nonce_size]
            body = block[nonce_size:]
            target = view[opos : opos + plain_len]
            is_final = index == final_index
            if nonce == zero_nonce and block == bytes(len(block)):
                if is_final:
                    raise IntegrityError(f"final block {index} is zeroed", where=what)
                target[:] = bytes(plain_len)
                opos += plain_len
                continue
            if lead and nonce[:lead] != prefix:
                prefix = bytes(nonce[:lead])
                decrypt_into = self._opener(prefix)
            own = nonce[lead:] if lead else nonce
            try:
                decrypt_into(own, body, aad(file_id, index, is_final), target)
            except InvalidTag:
                if is_final:
                    raise IntegrityError(
                        f"block {index} (final) failed authentication"
                        " (modified, moved, or the file was truncated)",
                        where=what,
                    ) from None
                try:
                    decrypt_into(own, body, aad(file_id, index, True), target)
                except InvalidTag:
                    raise IntegrityError(
                        f"block {index} failed authentication (modified or moved)",
                        where=what,
                    ) from None
            opos += plain_len
        if lead:
            self._last_opened = (prefix, decrypt_into)  # the next read is likely alike
        return out


class GcmBlockCipher(BlockCipher):
    """File format 1: AES-256-GCM under the content key, a random 96-bit nonce per
    block (at most MAX_BLOCK_ENCRYPTIONS blocks per file key)."""

    version = FORMAT_1
    max_encryptions = MAX_BLOCK_ENCRYPTIONS

    def __init__(self, content_key: bytes, file_id: bytes, block_size: int) -> None:
        super().__init__(file_id, block_size)
        self._aead = AESGCM(content_key)

    def _sealing(self, count: int) -> tuple[bytes, bytes, _Sealer]:
        return b"", os.urandom(12 * count), self._aead.encrypt_into

    def _opener(self, prefix: bytes) -> _Sealer:
        return self._aead.decrypt_into


class XaesBlockCipher(BlockCipher):
    """File format 2: XAES-256-GCM under the content key, 192-bit nonces whose first
    12 bytes are shared by up to PREFIX_BLOCKS blocks sealed in a row (one key
    derivation for them, the derived keys of the last few prefixes kept for
    reading)."""

    version = FORMAT_2

    def __init__(self, content_key: bytes, file_id: bytes, block_size: int) -> None:
        super().__init__(file_id, block_size)
        self._xaes = Xaes256Gcm(content_key)
        self._lock = threading.Lock()
        self._prefix = b""  # the prefix of the blocks sealed now, and how many it sealed
        self._sealed = PREFIX_BLOCKS
        self._encrypt: _Sealer = _unkeyed

    def _sealing(self, count: int) -> tuple[bytes, bytes, _Sealer]:
        with self._lock:
            if self._sealed + count > PREFIX_BLOCKS:
                self._prefix = os.urandom(PREFIX_SIZE)
                self._sealed = 0
                self._encrypt = self._xaes.aead_for(self._prefix).encrypt_into
            self._sealed += count
            prefix, encrypt_into = self._prefix, self._encrypt
        return prefix, os.urandom(12 * count), encrypt_into

    def _opener(self, prefix: bytes) -> _Sealer:
        return self._xaes.aead_for(prefix).decrypt_into


CIPHERS: dict[int, Callable[[bytes, bytes, int], BlockCipher]] = {
    FORMAT_1: GcmBlockCipher,
    FORMAT_2: XaesBlockCipher,
}
