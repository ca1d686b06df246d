"""Encrypted names: entry names, symlink targets, and user/trusted xattr names and values.

The format of volumes with encrypted names (docs/FORMAT.md, "Encrypted names").
All ciphers are AES-256-SIV (RFC 5297) under subkeys of one random 32-byte *name
secret* per volume; every associated data vector starts with the purpose label
(also the subkey's HKDF label) and the volume ID::

    K_purpose   = HKDF-SHA256(name secret, info = label, length 64)
    pad(x)      = x || n bytes of value n, n = 16 - len(x) mod 16 (PKCS#7; 1..16 bytes)
    b64(x)      = base64url of x, no '=' padding (canonical: re-encoding gives the same text)

    entry name  = b64(SIV(K_name, pad(name), [label, volume ID, directory ID]))
                  longer than 255 bytes (names of 160..255 bytes): the entry is
                  ".kmsfs-ln." || b64(SHA-256(that text)), and its sidecar
                  "<entry>.name" holds the text
    symlink     = b64(nonce || SIV(K_symlink, pad(target), [label, volume ID, nonce]))
    xattr name  = ns || b64(SIV(K_xattr_name, pad(suffix), [label, volume ID, ns]))
                  for ns = "user." or "trusted." and the plaintext name ns || suffix
    xattr value = nonce || SIV(K_xattr_value, pad(value),
                               [label, volume ID, object ID, plaintext xattr name, nonce])

SIV(...) is the RFC 5297 output, synthetic IV (16) || ciphertext; nonces are 16
random bytes.  Names are deterministic, so a lookup is one ``openat`` of the
encrypted name; the directory ID (16 random bytes in the directory's
``user.kmsfs.dirid`` xattr; the root's is 16 zero bytes) makes the same name
differ between directories and fail to decrypt in another one.

Nothing read from the backing directory is trusted: every decode checks the
canonical encoding, the lengths, the authentication tag, the padding and the
plaintext's validity, and raises ``EncryptedNameError`` naming the backing bytes
and what failed.  Plaintext the caller passes that a volume cannot store raises
``PlaintextTooLong`` (the operations layer answers ENAMETOOLONG, ERANGE or E2BIG);
plaintext the kernel never sends (a name with '/', an empty target) raises
ValueError.

This module is pure: no FUSE, no trio, no I/O.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import os
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import EncryptedNameError, FormatError, PlaintextTooLong
from kmsfs.format.header import ID_SIZE

NAME_SECRET_SIZE = 32
SUBKEY_SIZE = 64  # AES-256-SIV: 32 bytes for S2V (CMAC), 32 for CTR
LABEL_NAME = b"kmsfs/v1/name"
LABEL_SYMLINK = b"kmsfs/v1/symlink-target"
LABEL_XATTR_NAME = b"kmsfs/v1/xattr-name"
LABEL_XATTR_VALUE = b"kmsfs/v1/xattr-value"

PAD_SIZE = 16
SIV_SIZE = 16
NONCE_SIZE = 16

DIR_ID_XATTR = "user.kmsfs.dirid"
ROOT_DIR_ID = bytes(ID_SIZE)

NAME_MAX = 255  # the kernel's limit on a name, and ext4/xfs/btrfs's on a backing name
MAX_SHORT_NAME = 159  # longest plaintext name whose encrypted name fits in NAME_MAX
LONG_NAME_PREFIX = b".kmsfs-ln."
SIDECAR_SUFFIX = b".name"
LONG_NAME_SIZE = len(LONG_NAME_PREFIX) + 43  # base64url of a SHA-256 digest: 43 characters
MAX_SIDECAR_SIZE = 363  # base64url of 16 + pad(255 bytes) = 272 bytes
OWN_PREFIX = b"."  # encrypted names never start with '.': every such entry is kmsfs's own

SYMLINK_MAX = 4095  # PATH_MAX 4096 less the NUL: the longest target symlink(2) stores
MAX_SYMLINK_TARGET = 3023  # longest plaintext target whose encrypted form fits SYMLINK_MAX

XATTR_NAMESPACES = (b"user.", b"trusted.")
XATTR_NAME_MAX = 255
MAX_XATTR_NAME_SUFFIX = 159  # longest plaintext name after "user."/"trusted."
XATTR_SIZE_MAX = 65536  # the kernel's limit on one xattr value
MAX_XATTR_VALUE = 65503  # longest plaintext value whose stored form fits XATTR_SIZE_MAX
OWN_XATTR_PREFIX = b"user.kmsfs."  # the header, the directory ID (encrypted names have no '.')
CLEAR_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")

_B64_ALPHABET = re.compile(rb"[A-Za-z0-9_-]*")
_TO_URL = bytes.maketrans(b"+/", b"-_")
_FROM_URL = bytes.maketrans(b"-_", b"+/")

# Nonces come from here; the test vectors replace it to fix the randomness.
_urandom = os.urandom


class EntryKind(enum.Enum):
    """What a backing directory entry of a volume with encrypted names is."""

    NAME = "encrypted name"  # base64url text (it may still fail to decode)
    LONG_NAME = "long name"  # .kmsfs-ln.<hash>: the entry; its encrypted name is in the sidecar
    SIDECAR = "long-name sidecar"  # .kmsfs-ln.<hash>.name: the encrypted name of that entry
    OWN = "kmsfs's own"  # any other name starting with '.': config, state, temporary files


class XattrKind(enum.Enum):
    """What a backing extended attribute of a volume with encrypted names is."""

    ENCRYPTED = "encrypted"  # user.<b64>, trusted.<b64>
    CLEAR = "clear"  # the POSIX ACLs, which the kernel reads
    OWN = "kmsfs's own"  # user.kmsfs.*: the file header, the directory ID
    OTHER = "other"  # security.* and anything else: not shown through the mount


@dataclass(frozen=True)
class BackingName:
    """Where a plaintext name is stored in its backing directory.

    Attributes:
        name: the backing entry's name.
        sidecar: for a long name, the bytes of its sidecar file ``sidecar_name``
            (the full encrypted name); None for a name stored as itself.
    """

    name: bytes
    sidecar: bytes | None = None

    @property
    def sidecar_name(self) -> bytes | None:
        """The sidecar file's name beside a long name, else None."""
        return None if self.sidecar is None else sidecar_name_of(self.name)


def new_name_secret() -> bytearray:
    """A fresh random name secret (32 bytes) for a new volume; the caller seals and wipes it."""
    return bytearray(os.urandom(NAME_SECRET_SIZE))


def derive_subkey(name_secret: bytes | bytearray, label: bytes) -> bytes:
    """The 64-byte AES-256-SIV key for one purpose: HKDF-SHA256(secret, info = label)."""
    if len(name_secret) != NAME_SECRET_SIZE:
        raise ValueError(f"name secret of {len(name_secret)} bytes: want {NAME_SECRET_SIZE}")
    return HKDF(hashes.SHA256(), SUBKEY_SIZE, salt=None, info=label).derive(bytes(name_secret))


def new_dir_id() -> bytes:
    """A fresh random directory ID (16 bytes, never the root's all-zero ID)."""
    while True:
        dir_id = os.urandom(ID_SIZE)
        if dir_id != ROOT_DIR_ID:
            return dir_id


def parse_dir_id(value: bytes) -> bytes:
    """The directory ID stored in a directory's ``user.kmsfs.dirid`` xattr.

    Raises FormatError if *value* is not 16 bytes or is all zeros (the root's
    ID, which is never stored: a copy of it elsewhere is refused).
    """
    if len(value) != ID_SIZE:
        raise FormatError(f"directory ID of {len(value)} bytes: want {ID_SIZE}")
    if value == ROOT_DIR_ID:
        raise FormatError("directory ID is all zeros (reserved for the root)")
    return value


def entry_kind(backing_name: bytes) -> EntryKind:
    """Classify a backing entry's name (by its form only; decoding checks the rest).

    Encrypted names are base64url and never start with '.', so in a volume with
    encrypted names every backing name that starts with '.' is kmsfs's own: a
    long name, its sidecar, or a reserved name (``.kmsfs.json``, ``.kmsfs.d``,
    temporary names of the tools).
    """
    if not backing_name.startswith(OWN_PREFIX):
        return EntryKind.NAME
    if backing_name.startswith(LONG_NAME_PREFIX):
        if backing_name.endswith(SIDECAR_SUFFIX):
            return EntryKind.SIDECAR
        return EntryKind.LONG_NAME
    return EntryKind.OWN


def sidecar_name_of(long_name: bytes) -> bytes:
    """The sidecar file's name beside the long-name entry *long_name*."""
    return long_name + SIDECAR_SUFFIX


def long_name_of_sidecar(sidecar_name: bytes) -> bytes:
    """The long-name entry a sidecar file named *sidecar_name* belongs to."""
    if entry_kind(sidecar_name) is not EntryKind.SIDECAR:
        raise ValueError(f"{_show(sidecar_name)} is not a long-name sidecar")
    return sidecar_name[: -len(SIDECAR_SUFFIX)]


def long_name_of(encoded: bytes) -> bytes:
    """The fixed-length backing name of the encrypted name *encoded* (its SHA-256)."""
    return LONG_NAME_PREFIX + _b64encode(hashlib.sha256(encoded).digest())


def xattr_kind(backing_name: bytes) -> XattrKind:
    """Classify a backing extended attribute's name."""
    if backing_name.startswith(OWN_XATTR_PREFIX):
        return XattrKind.OWN
    if backing_name in CLEAR_XATTRS:
        return XattrKind.CLEAR
    if backing_name.startswith(XATTR_NAMESPACES):
        return XattrKind.ENCRYPTED
    return XattrKind.OTHER


def stored_name_size(name_size: int) -> int:
    """Bytes of the encrypted name of a *name_size*-byte name (over 255: a long name)."""
    return _b64_size(SIV_SIZE + _padded_size(name_size))


def stored_symlink_size(target_size: int) -> int:
    """Bytes of the stored form of a *target_size*-byte symlink target."""
    return _b64_size(NONCE_SIZE + SIV_SIZE + _padded_size(target_size))


def stored_xattr_value_size(value_size: int) -> int:
    """Bytes of the stored form of a *value_size*-byte xattr value (33..48 more)."""
    return NONCE_SIZE + SIV_SIZE + _padded_size(value_size)


class NameCipher:
    """Encrypts and decrypts the names of one volume with encrypted names.

    Build one per volume (at mount, or in a tool): it derives the four subkeys
    and keeps one AES-SIV object per purpose, so each name costs one AES-SIV
    call.  Holds no mutable state: worker threads may share it.  It keeps no
    copy of the name secret; the subkeys live in the AES-SIV objects.

    Attributes:
        volume_id: the volume's ID, bound into every ciphertext.
    """

    def __init__(self, name_secret: bytes | bytearray, volume_id: bytes) -> None:
        if len(volume_id) != ID_SIZE:
            raise ValueError(f"volume ID of {len(volume_id)} bytes: want {ID_SIZE}")
        self.volume_id = volume_id
        self._name = AESSIV(derive_subkey(name_secret, LABEL_NAME))
        self._symlink = AESSIV(derive_subkey(name_secret, LABEL_SYMLINK))
        self._xattr_name = AESSIV(derive_subkey(name_secret, LABEL_XATTR_NAME))
        self._xattr_value = AESSIV(derive_subkey(name_secret, LABEL_XATTR_VALUE))

    # -- entry names ------------------------------------------------------------

    def encrypt_name(self, dir_id: bytes, name: bytes) -> BackingName:
        """Where plaintext *name* is stored in the directory whose ID is *dir_id*.

        Raises ValueError for a name the kernel never sends (empty, over 255
        bytes, containing '/' or NUL, "." or "..").
        """
        _check_name(name)
        _check_id(dir_id, "directory ID")
        sealed = self._name.encrypt(_pad(name), [LABEL_NAME, self.volume_id, dir_id])
        encoded = _b64encode(sealed)
        if len(encoded) <= NAME_MAX:
            return BackingName(encoded)
        return BackingName(long_name_of(encoded), encoded)

    def decrypt_name(
        self, dir_id: bytes, backing_name: bytes, sidecar: bytes | None = None
    ) -> bytes:
        """The plaintext name of the entry *backing_name* in the directory *dir_id*.

        For a long name (``entry_kind`` LONG_NAME) *sidecar* is the content of
        its sidecar file (None if there is none).  Raises EncryptedNameError,
        naming the backing name and the cause, for: text that is not canonical
        base64url, a ciphertext of impossible length, a missing, oversized or
        mismatched (hash) sidecar, a long form holding a name that fits in the
        short form, failed authentication (edited, or moved from another
        directory or volume), or bad padding or an invalid name inside.  Raises
        ValueError for a sidecar or one of kmsfs's own names, which are not names.
        """
        _check_id(dir_id, "directory ID")
        kind = entry_kind(backing_name)
        if kind is EntryKind.NAME:
            if sidecar is not None:
                raise ValueError(f"{_show(backing_name)} is not a long name: it has no sidecar")
        elif kind is not EntryKind.LONG_NAME:
            raise ValueError(f"{_show(backing_name)} is {kind.value}, not an entry name")
        try:
            if kind is EntryKind.NAME:
                if len(backing_name) > NAME_MAX:
                    raise _Malformed(f"{len(backing_name)} bytes, want at most {NAME_MAX}")
                encoded = backing_name
            else:
                encoded = _check_sidecar(backing_name, sidecar)
            associated = [LABEL_NAME, self.volume_id, dir_id]
            name = _unseal(self._name, _b64decode(encoded), associated)
            _check_decrypted_name(name)
        except _Malformed as exc:
            raise EncryptedNameError(f"{kind.value} {_show(backing_name)}: {exc}") from None
        return name

    # -- symbolic links -------------------------------------------------------------

    def encrypt_symlink(self, target: bytes) -> bytes:
        """The backing symlink's target for the plaintext *target* (random each time).

        Raises PlaintextTooLong for a target over 3023 bytes (the operations
        layer answers ENAMETOOLONG), ValueError for an empty one or one with NUL.
        """
        if not target or b"\0" in target:
            raise ValueError("a symlink target is 1..4095 bytes without NUL")
        if len(target) > MAX_SYMLINK_TARGET:
            raise PlaintextTooLong(
                f"symlink target of {len(target)} bytes: a volume with encrypted names"
                f" stores at most {MAX_SYMLINK_TARGET}"
            )
        nonce = _urandom(NONCE_SIZE)
        sealed = self._symlink.encrypt(_pad(target), [LABEL_SYMLINK, self.volume_id, nonce])
        return _b64encode(nonce + sealed)

    def decrypt_symlink(self, stored: bytes) -> bytes:
        """The plaintext target of a backing symlink whose target is *stored*.

        Raises EncryptedNameError naming the stored text and the cause (encoding,
        length, authentication, padding, an empty target or a NUL inside).
        """
        try:
            if len(stored) > SYMLINK_MAX:
                raise _Malformed(f"{len(stored)} bytes, want at most {SYMLINK_MAX}")
            target = _unseal_random(
                self._symlink, _b64decode(stored), [LABEL_SYMLINK, self.volume_id]
            )
            if not target or b"\0" in target:
                raise _Malformed("decrypts to an empty target or one with NUL")
        except _Malformed as exc:
            raise EncryptedNameError(f"symlink target {_show(stored)}: {exc}") from None
        return target

    # -- extended attributes -----------------------------------------------------

    def encrypt_xattr_name(self, name: bytes) -> bytes:
        """The backing name of the plaintext xattr *name* (``user.*`` or ``trusted.*``).

        Deterministic within the volume and namespace, so a get is one
        ``getxattr``.  Raises PlaintextTooLong when the part after the namespace
        is over 159 bytes (the operations layer answers ERANGE), ValueError for
        another namespace, an empty suffix or a NUL.
        """
        namespace, suffix = _split_xattr_name(name)
        if len(suffix) > MAX_XATTR_NAME_SUFFIX:
            raise PlaintextTooLong(
                f"xattr name of {len(name)} bytes: a volume with encrypted names stores at"
                f" most {MAX_XATTR_NAME_SUFFIX} bytes after {namespace.decode()!r}"
            )
        sealed = self._xattr_name.encrypt(
            _pad(suffix), [LABEL_XATTR_NAME, self.volume_id, namespace]
        )
        return namespace + _b64encode(sealed)

    def decrypt_xattr_name(self, backing_name: bytes) -> bytes:
        """The plaintext name of the backing xattr *backing_name* (``xattr_kind`` ENCRYPTED).

        Raises EncryptedNameError naming it and the cause; ValueError if it is not
        in an encrypted namespace.
        """
        if xattr_kind(backing_name) is not XattrKind.ENCRYPTED:
            raise ValueError(f"xattr {_show(backing_name)} is not an encrypted one")
        namespace = next(ns for ns in XATTR_NAMESPACES if backing_name.startswith(ns))
        try:
            if len(backing_name) > XATTR_NAME_MAX:
                raise _Malformed(f"{len(backing_name)} bytes, want at most {XATTR_NAME_MAX}")
            sealed = _b64decode(backing_name[len(namespace) :])
            associated = [LABEL_XATTR_NAME, self.volume_id, namespace]
            suffix = _unseal(self._xattr_name, sealed, associated)
            if not suffix or b"\0" in suffix:
                raise _Malformed("decrypts to an empty name or one with NUL")
        except _Malformed as exc:
            raise EncryptedNameError(f"encrypted xattr name {_show(backing_name)}: {exc}") from None
        return namespace + suffix

    def encrypt_xattr_value(self, object_id: bytes, name: bytes, value: bytes) -> bytes:
        """The stored form of *value* for the plaintext xattr *name* (random each time).

        *object_id* is the file ID of a regular file, the directory ID of a
        directory (``ROOT_DIR_ID`` for the root), and b"" for other objects
        (which carry only ``trusted.*`` attributes).  Raises PlaintextTooLong for
        a value over 65503 bytes (the operations layer answers E2BIG; the
        backing filesystem may refuse smaller ones, with its own error).
        """
        _split_xattr_name(name)
        _check_object_id(object_id)
        if len(value) > MAX_XATTR_VALUE:
            raise PlaintextTooLong(
                f"xattr value of {len(value)} bytes: a volume with encrypted names stores"
                f" at most {MAX_XATTR_VALUE}"
            )
        nonce = _urandom(NONCE_SIZE)
        sealed = self._xattr_value.encrypt(
            _pad(value), [LABEL_XATTR_VALUE, self.volume_id, object_id, name, nonce]
        )
        return nonce + sealed

    def decrypt_xattr_value(self, object_id: bytes, name: bytes, stored: bytes) -> bytes:
        """The plaintext value of the xattr *name* of the object *object_id*.

        Raises EncryptedNameError for a stored value of impossible length, or one
        that fails authentication: edited, or copied from another attribute or
        another file, directory or volume.
        """
        _split_xattr_name(name)
        _check_object_id(object_id)
        try:
            associated = [LABEL_XATTR_VALUE, self.volume_id, object_id, name]
            return _unseal_random(self._xattr_value, stored, associated)
        except _Malformed as exc:
            raise EncryptedNameError(f"value of xattr {_show(name)}: {exc}") from None


# -- helpers -----------------------------------------------------------------------


class _Malformed(Exception):
    """Why backing bytes do not decode; the public method names the bytes."""


def _show(data: bytes) -> str:
    """Backing bytes as text for a message, quoted: ASCII, anything else as \\xNN."""
    return repr(data)[1:]


def _b64_size(size: int) -> int:
    return (4 * size + 2) // 3


def _padded_size(size: int) -> int:
    return (size // PAD_SIZE + 1) * PAD_SIZE


def _b64encode(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL).rstrip(b"=")


def _b64decode(text: bytes) -> bytes:
    """Decode canonical unpadded base64url, or raise _Malformed saying why not."""
    if not _B64_ALPHABET.fullmatch(text):
        bad = next(i for i, c in enumerate(text) if not _B64_ALPHABET.fullmatch(bytes((c,))))
        raise _Malformed(f"not base64url (byte {text[bad]:#04x} at offset {bad})")
    try:
        data = binascii.a2b_base64(text.translate(_FROM_URL) + b"==", strict_mode=False)
    except binascii.Error:
        raise _Malformed(f"not base64url ({len(text)} characters)") from None
    if _b64encode(data) != text:
        raise _Malformed("not canonical base64url (unused bits set)")
    return data


def _unseal(aead: AESSIV, sealed: bytes, associated: list[bytes]) -> bytes:
    """Authenticate and decrypt SIV || ciphertext, and remove the padding."""
    if len(sealed) < SIV_SIZE + PAD_SIZE or (len(sealed) - SIV_SIZE) % PAD_SIZE:
        raise _Malformed(f"ciphertext of {len(sealed)} bytes, want 16 + a multiple of 16")
    try:
        padded = aead.decrypt(sealed, associated)
    except InvalidTag:
        raise _Malformed(
            "failed authentication (edited, or moved from another directory, object or volume)"
        ) from None
    count = padded[-1]
    if not 1 <= count <= PAD_SIZE or padded[-count:] != bytes((count,)) * count:
        raise _Malformed("bad padding after decryption")
    return padded[:-count]


def _unseal_random(aead: AESSIV, data: bytes, associated: list[bytes]) -> bytes:
    """``_unseal`` of nonce || SIV || ciphertext, with the nonce last in the associated data."""
    return _unseal(aead, data[NONCE_SIZE:], [*associated, data[:NONCE_SIZE]])


def _pad(data: bytes) -> bytes:
    count = PAD_SIZE - len(data) % PAD_SIZE
    return data + bytes((count,)) * count


def _check_sidecar(long_name: bytes, sidecar: bytes | None) -> bytes:
    """The encrypted name in *sidecar*, checked against the hash in *long_name*."""
    if len(long_name) != LONG_NAME_SIZE:
        raise _Malformed(f"{len(long_name)} bytes, want {LONG_NAME_SIZE}")
    if sidecar is None:
        raise _Malformed(f"its sidecar {_show(sidecar_name_of(long_name))} is missing")
    if len(sidecar) > MAX_SIDECAR_SIZE:
        raise _Malformed(f"sidecar of {len(sidecar)} bytes, want at most {MAX_SIDECAR_SIZE}")
    if len(sidecar) <= NAME_MAX:
        raise _Malformed(
            f"sidecar holds {len(sidecar)} bytes: a name that is stored without a long name"
        )
    if long_name_of(sidecar) != long_name:
        raise _Malformed("the sidecar's SHA-256 does not match the name (edited or swapped)")
    return sidecar


def _check_name(name: bytes) -> None:
    if not 1 <= len(name) <= NAME_MAX:
        raise ValueError(f"a name of {len(name)} bytes: want 1..{NAME_MAX}")
    if b"/" in name or b"\0" in name:
        raise ValueError("a name contains '/' or NUL")
    if name in (b".", b".."):
        raise ValueError(f"{name!r} is not a name")


def _check_decrypted_name(name: bytes) -> None:
    try:
        _check_name(name)
    except ValueError as exc:
        raise _Malformed(f"decrypts to an invalid name ({exc})") from None


def _check_id(value: bytes, what: str) -> None:
    if len(value) != ID_SIZE:
        raise ValueError(f"{what} of {len(value)} bytes: want {ID_SIZE}")


def _check_object_id(object_id: bytes) -> None:
    if object_id and len(object_id) != ID_SIZE:
        raise ValueError(f"object ID of {len(object_id)} bytes: want {ID_SIZE} or none")


def _split_xattr_name(name: bytes) -> tuple[bytes, bytes]:
    """(namespace, suffix) of a plaintext xattr name in an encrypted namespace."""
    namespace = next((ns for ns in XATTR_NAMESPACES if name.startswith(ns)), None)
    if namespace is None:
        raise ValueError(f"xattr {_show(name)} is not in an encrypted namespace (user., trusted.)")
    suffix = name[len(namespace) :]
    if not suffix or b"\0" in suffix:
        raise ValueError(f"xattr {_show(name)}: empty after the namespace, or contains NUL")
    return namespace, suffix
