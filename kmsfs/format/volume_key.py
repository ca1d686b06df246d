"""The volume key's fingerprint and its rotation chain (config format 3).

A host pins a volume by the *fingerprint* of its volume key V, never by V
(docs/FORMAT.md, "Volume key fingerprint and rotation chain")::

    FP(V)      = HKDF(V, info = "kmsfs/v3/volume-key-fingerprint" || volume_id, length 16)
    K_chain(V) = HKDF(V, info = "kmsfs/v3/volume-key-chain" || volume_id, length 32)
    aad(entry) = "kmsfs/v3/volume-key-chain" || volume_id || u64 generation || previous
    sealed     = nonce (12) || AES-256-GCM(K_chain(V_new), nonce, V_previous, aad)

When V is replaced at generation g, the config gains a chain entry
``{generation: g, previous: FP(V_previous), sealed}``: the previous key sealed
under the new one.  The last entry is sealed under the current V, each earlier
one under the key the next entry names.  Walking back from the current V, a
host pinned at an older fingerprint finds it (the rotation was made by someone
holding the key it pinned's successors) or does not (refused).  Nobody without
the current V can add an entry.  Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import ConfigError, ConfigTampered

FINGERPRINT_LABEL = b"kmsfs/v3/volume-key-fingerprint"
CHAIN_LABEL = b"kmsfs/v3/volume-key-chain"
FINGERPRINT_SIZE = 16
VOLUME_KEY_SIZE = 32
NONCE_SIZE = 12
SEALED_SIZE = NONCE_SIZE + VOLUME_KEY_SIZE + 16
MAX_CHAIN = 32  # rotations kept: a host that missed more must be re-pinned
MAX_GENERATION = (1 << 63) - 1
CHAIN_FIELDS = ("generation", "previous", "sealed")


def _hkdf(volume_key: bytes | bytearray, info: bytes, length: int) -> bytes:
    if len(volume_key) != VOLUME_KEY_SIZE:
        raise ValueError(f"volume key of {len(volume_key)} bytes: want {VOLUME_KEY_SIZE}")
    return HKDF(hashes.SHA256(), length, salt=None, info=info).derive(bytes(volume_key))


def fingerprint(volume_key: bytes | bytearray, volume_id: bytes) -> bytes:
    """FP(V): 16 bytes that name the volume key without revealing it."""
    return _hkdf(volume_key, FINGERPRINT_LABEL + volume_id, FINGERPRINT_SIZE)


def show_fingerprint(value: bytes) -> str:
    """The fingerprint as people copy it: eight groups of four hex digits, ``3f2a-91c0-...``."""
    text = value.hex()
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def parse_fingerprint(text: str, where: str = "fingerprint") -> bytes:
    """Bytes of a fingerprint given as 32 hex digits, with or without ``-``, ``:`` or spaces.

    ConfigError naming *where* if it is not one.
    """
    digits = "".join(ch for ch in text if ch not in "-: ").lower()
    try:
        value = bytes.fromhex(digits)
    except ValueError:
        value = b""
    if len(value) != FINGERPRINT_SIZE:
        raise ConfigError(
            f"{where}: {text!r} is not a volume-key fingerprint (32 hex digits, as"
            " 'kmsfs pin show' prints it: 3f2a-91c0-...)"
        )
    return value


def chain_key(volume_key: bytes | bytearray, volume_id: bytes) -> bytes:
    """K_chain(V): the AES-256-GCM key that seals the previous volume key under V."""
    return _hkdf(volume_key, CHAIN_LABEL + volume_id, 32)


def chain_aad(volume_id: bytes, generation: int, previous: bytes) -> bytes:
    """What a chain entry is bound to: the volume, the rotation's generation, FP(V_previous)."""
    return CHAIN_LABEL + volume_id + struct.pack(">Q", generation) + previous


@dataclass(frozen=True)
class ChainEntry:
    """One rotation: at ``generation`` the volume key became the one that seals ``sealed``.

    Attributes: generation (the first config generation under the new key),
    previous (FP of the key it replaced), sealed (nonce || AES-GCM of that key).
    """

    generation: int
    previous: bytes
    sealed: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "previous": self.previous.hex(),
            "sealed": base64.b64encode(self.sealed).decode(),
        }

    @classmethod
    def seal(
        cls,
        new_key: bytes | bytearray,
        previous_key: bytes | bytearray,
        volume_id: bytes,
        generation: int,
        nonce: bytes | None = None,
    ) -> ChainEntry:
        """The entry recording that *new_key* replaced *previous_key* at *generation*."""
        previous = fingerprint(previous_key, volume_id)
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        sealed = AESGCM(chain_key(new_key, volume_id)).encrypt(
            nonce, bytes(previous_key), chain_aad(volume_id, generation, previous)
        )
        return cls(generation, previous, nonce + sealed)

    def open(self, later_key: bytes | bytearray, volume_id: bytes) -> bytearray:
        """The previous volume key, unsealed with the key that replaced it.

        ConfigTampered if the entry does not open under *later_key* or what it
        holds does not have the fingerprint it claims.
        """
        try:
            value = AESGCM(chain_key(later_key, volume_id)).decrypt(
                self.sealed[:NONCE_SIZE],
                self.sealed[NONCE_SIZE:],
                chain_aad(volume_id, self.generation, self.previous),
            )
        except InvalidTag:
            raise ConfigTampered(
                f"the volume-key chain entry of generation {self.generation} does not open"
                " under the key that follows it (damaged, or written by someone else)",
                changed=["chain"],
            ) from None
        if fingerprint(value, volume_id) != self.previous:
            raise ConfigTampered(
                f"the volume-key chain entry of generation {self.generation} holds a key"
                " whose fingerprint is not the one it names",
                changed=["chain"],
            )
        return bytearray(value)


def find_in_chain(
    volume_key: bytes | bytearray, volume_id: bytes, chain: list[ChainEntry], pinned: bytes
) -> ChainEntry | None:
    """Walk back from the current *volume_key*: the entry whose previous key has the
    fingerprint *pinned* (the rotation away from it), or None if no entry has.

    The walk stops (None) at an entry that does not open under the key after it:
    a chain copied from another config under a forged volume key proves nothing.
    """
    current = bytearray(volume_key)
    try:
        for entry in reversed(chain):
            try:
                previous = entry.open(current, volume_id)
            except ConfigTampered:
                return None
            current[:] = previous
            previous[:] = bytes(len(previous))
            if entry.previous == pinned:
                return entry
        return None
    finally:
        current[:] = bytes(len(current))


def parse_chain(raw: Any, generation: int, where: str) -> list[ChainEntry]:
    """The chain of a format-3 config, checked for form: at most MAX_CHAIN entries,
    generations rising and not above the config's; ConfigError naming the entry."""
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: chain must be a list, found {raw!r}")
    if len(raw) > MAX_CHAIN:
        raise ConfigError(f"{where}: chain has {len(raw)} entries; at most {MAX_CHAIN}")
    entries: list[ChainEntry] = []
    for index, item in enumerate(raw):
        at = f"{where}: chain[{index}]"
        if not isinstance(item, dict) or sorted(item) != sorted(CHAIN_FIELDS):
            raise ConfigError(f"{at}: want an object with {', '.join(CHAIN_FIELDS)}")
        number = item["generation"]
        if isinstance(number, bool) or not isinstance(number, int):
            raise ConfigError(f"{at}: generation must be an integer, found {number!r}")
        low = entries[-1].generation + 1 if entries else 2
        if not low <= number <= generation:
            raise ConfigError(
                f"{at}: generation {number} out of order (want {low}..{generation}: rising,"
                " and not above the config's generation)"
            )
        try:
            previous = bytes.fromhex(item["previous"]) if isinstance(item["previous"], str) else b""
        except ValueError:
            previous = b""
        if len(previous) != FINGERPRINT_SIZE:
            raise ConfigError(f"{at}: previous must be 32 hex digits")
        try:
            sealed = base64.b64decode(str(item["sealed"]), validate=True)
        except (binascii.Error, ValueError):
            sealed = b""
        if not isinstance(item["sealed"], str) or len(sealed) != SEALED_SIZE:
            raise ConfigError(f"{at}: sealed must be base64 of {SEALED_SIZE} bytes")
        entries.append(ChainEntry(number, previous, sealed))
    return entries
