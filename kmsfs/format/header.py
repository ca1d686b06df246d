"""The per-file header, stored in the backing file's ``user.kmsfs.header`` xattr.

Byte layout (all integers big-endian; see docs/FORMAT.md, "File header")::

    offset  size  field
    0       4     magic b"KMFH"
    4       1     file format version (1 or 2)
    5       1     cipher suite, the version's own: 1 = AES-256-GCM blocks (format 1),
                  2 = XAES-256-GCM blocks (format 2), both with an HKDF-SHA256 content key
    6       2     flags (0; any set bit is refused)
    8       4     plaintext block size in bytes (power of two, 512..1 MiB)
    12      16    volume ID
    28      16    file ID (random)
    44      1     number of wrapped-key entries n (1..16)
    45      ...   n entries, each:
                    1  provider name length p (1..32), then p bytes ASCII
                    2  key reference length r (1..2048), then r bytes UTF-8
                    2  wrapped key length w (1..4096), then w bytes

Nothing may follow the last entry.  The header is not itself encrypted or
MACed: every field that matters is bound elsewhere (the file and volume IDs in
each wrapped key's context, the version (in its label), suite, block size and
file ID in the content subkey and block AAD), so a modified header makes
unwrap or decryption fail.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kmsfs.errors import FormatError

XATTR_NAME = "user.kmsfs.header"
RESERVED_XATTR_PREFIX = "user.kmsfs"

MAGIC = b"KMFH"
FORMAT_1 = 1  # AES-256-GCM blocks, 96-bit random nonces
FORMAT_2 = 2  # XAES-256-GCM blocks, 192-bit nonces
NEW_FILE_FORMAT = FORMAT_2  # what new files are written in
SUITE_AES256GCM_HKDF = 1
SUITE_XAES256GCM_HKDF = 2
SUITES = {FORMAT_1: SUITE_AES256GCM_HKDF, FORMAT_2: SUITE_XAES256GCM_HKDF}
ID_SIZE = 16
MAX_ENTRIES = 16
MAX_PROVIDER_LEN = 32
MAX_KEY_REF_LEN = 2048
MAX_WRAPPED_LEN = 4096
MAX_HEADER_SIZE = 45 + MAX_ENTRIES * (
    1 + MAX_PROVIDER_LEN + 2 + MAX_KEY_REF_LEN + 2 + MAX_WRAPPED_LEN
)
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20

_FIXED = struct.Struct(">4sBBHI16s16sB")


@dataclass(frozen=True)
class WrappedKey:
    """A file key wrapped by one master key.

    Attributes:
        provider: provider name ("local", "aws-kms", "pkcs11").
        key_ref: which master key wrapped it, as the provider names it.
        blob: the provider's wrapped key bytes (opaque to the format).
    """

    provider: str
    key_ref: str
    blob: bytes

    def __post_init__(self) -> None:
        if not 1 <= len(self.provider) <= MAX_PROVIDER_LEN or not self.provider.isascii():
            raise FormatError(f"provider name {self.provider!r}: want 1..32 ASCII characters")
        if not 1 <= len(self.key_ref.encode()) <= MAX_KEY_REF_LEN:
            raise FormatError(f"key reference of {len(self.key_ref)} characters: want 1..2048")
        if not 1 <= len(self.blob) <= MAX_WRAPPED_LEN:
            raise FormatError(f"wrapped key of {len(self.blob)} bytes: want 1..4096")


def check_block_size(block_size: int) -> int:
    """Return *block_size* if it is a power of two in 512..1 MiB, else raise FormatError."""
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise FormatError(f"block size {block_size}: want a power of two from 512 to 1048576")
    return block_size


def check_version(version: int, suite: int) -> None:
    """FormatError unless *version* is a file format this kmsfs reads and *suite* is
    that format's cipher suite."""
    want = SUITES.get(version)
    if want is None:
        known = " and ".join(map(str, SUITES))
        raise FormatError(f"header version {version}: this kmsfs reads versions {known}")
    if suite != want:
        raise FormatError(f"cipher suite {suite}: file format {version} uses suite {want}")


@dataclass(frozen=True)
class FileHeader:
    """The parsed per-file header (see the module docstring for the bytes).

    ``version`` is the file format (FORMAT_1 or FORMAT_2; by default the one new
    files get) and ``suite`` must be its suite (``SUITES``); FormatError otherwise.
    """

    volume_id: bytes
    file_id: bytes
    block_size: int
    entries: tuple[WrappedKey, ...]
    suite: int = SUITES[NEW_FILE_FORMAT]
    version: int = NEW_FILE_FORMAT
    flags: int = 0
    _packed: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.volume_id) != ID_SIZE or len(self.file_id) != ID_SIZE:
            raise FormatError("volume and file IDs must be 16 bytes")
        check_version(self.version, self.suite)
        check_block_size(self.block_size)
        if not 1 <= len(self.entries) <= MAX_ENTRIES:
            raise FormatError(f"{len(self.entries)} wrapped-key entries: want 1..{MAX_ENTRIES}")

    @classmethod
    def new(
        cls,
        volume_id: bytes,
        file_id: bytes,
        block_size: int,
        entries: tuple[WrappedKey, ...],
        version: int = NEW_FILE_FORMAT,
    ) -> FileHeader:
        """The header of a new file in file format *version* (with its suite)."""
        return cls(volume_id, file_id, block_size, entries, SUITES.get(version, 0), version)

    def pack(self) -> bytes:
        """Serialise to the exact bytes stored in the xattr."""
        parts = [
            _FIXED.pack(
                MAGIC,
                self.version,
                self.suite,
                self.flags,
                self.block_size,
                self.volume_id,
                self.file_id,
                len(self.entries),
            )
        ]
        for entry in self.entries:
            provider = entry.provider.encode("ascii")
            key_ref = entry.key_ref.encode("utf-8")
            parts += [
                struct.pack(">B", len(provider)),
                provider,
                struct.pack(">H", len(key_ref)),
                key_ref,
                struct.pack(">H", len(entry.blob)),
                entry.blob,
            ]
        return b"".join(parts)

    def with_entries(self, entries: tuple[WrappedKey, ...]) -> FileHeader:
        """The same header with another list of wrapped keys (re-wrapping)."""
        return FileHeader(
            self.volume_id, self.file_id, self.block_size, entries, self.suite, self.version
        )

    @classmethod
    def parse(cls, data: bytes) -> FileHeader:
        """Parse header bytes.

        Raises FormatError naming what was expected and what was found, for a
        wrong magic, unknown version, suite or flags, a bad block size, an
        entry that runs past the end, trailing bytes, or oversized input.
        """
        if len(data) > MAX_HEADER_SIZE:
            raise FormatError(f"header of {len(data)} bytes: want at most {MAX_HEADER_SIZE}")
        if len(data) < _FIXED.size:
            raise FormatError(f"header of {len(data)} bytes: want at least {_FIXED.size}")
        magic, version, suite, flags, block_size, volume_id, file_id, count = _FIXED.unpack_from(
            data
        )
        if magic != MAGIC:
            raise FormatError(f"header magic {magic!r}: want {MAGIC!r}")
        check_version(version, suite)
        if flags:
            raise FormatError(
                f"header flags {flags:#06x}: no flags are defined in version {version}"
            )
        if not 1 <= count <= MAX_ENTRIES:
            raise FormatError(f"{count} wrapped-key entries: want 1..{MAX_ENTRIES}")
        pos = _FIXED.size
        entries = []
        for index in range(count):
            provider, pos = _take(data, pos, 1, f"entry {index} provider")
            key_ref, pos = _take(data, pos, 2, f"entry {index} key reference")
            blob, pos = _take(data, pos, 2, f"entry {index} wrapped key")
            try:
                entries.append(WrappedKey(provider.decode("ascii"), key_ref.decode("utf-8"), blob))
            except UnicodeDecodeError as exc:
                raise FormatError(f"entry {index}: undecodable text ({exc.reason})") from None
        if pos != len(data):
            raise FormatError(f"{len(data) - pos} unexpected bytes after the last header entry")
        return cls(volume_id, file_id, block_size, tuple(entries), suite, version, flags, data)


def _take(data: bytes, pos: int, len_size: int, what: str) -> tuple[bytes, int]:
    """Read a length-prefixed field at *pos*; raise FormatError if it runs past the end."""
    if pos + len_size > len(data):
        raise FormatError(f"header ends inside the length of {what}")
    length = int.from_bytes(data[pos : pos + len_size], "big")
    pos += len_size
    if length == 0:
        raise FormatError(f"{what} is empty")
    if pos + length > len(data):
        raise FormatError(f"{what} needs {length} bytes, header has {len(data) - pos} left")
    return data[pos : pos + length], pos + length
