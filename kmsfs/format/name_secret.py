"""The name secret of a volume with encrypted names, sealed under the volume key.

Config format 4 is format 3 with one more tagged field (docs/FORMAT.md, "The
name secret in the volume config")::

    "names": {"mode": "encrypted", "sealed": "<base64 of 60 bytes>"}

    K_names(V) = HKDF(V, info = "kmsfs/v4/name-secret" || volume_id, length 32)
    aad        = "kmsfs/v4/name-secret" || volume_id
    sealed     = nonce (12 random) || AES-256-GCM(K_names(V), nonce, S, aad)

The secret S (kmsfs/format/names.py) never changes; when the volume key is
replaced, S is unsealed with the old key and sealed again under the new one
(``resealed``), so every name stays readable.  Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import ConfigError, ConfigTampered
from kmsfs.format.names import NAME_SECRET_SIZE
from kmsfs.format.volume_key import VOLUME_KEY_SIZE

NAME_SECRET_LABEL = b"kmsfs/v4/name-secret"
MODE_ENCRYPTED = "encrypted"
NONCE_SIZE = 12
SEALED_SIZE = NONCE_SIZE + NAME_SECRET_SIZE + 16
NAMES_FIELDS = ("mode", "sealed")


def name_secret_key(volume_key: bytes | bytearray, volume_id: bytes) -> bytes:
    """K_names(V): the AES-256-GCM key that seals the name secret under the volume key."""
    if len(volume_key) != VOLUME_KEY_SIZE:
        raise ValueError(f"volume key of {len(volume_key)} bytes: want {VOLUME_KEY_SIZE}")
    return HKDF(hashes.SHA256(), 32, salt=None, info=NAME_SECRET_LABEL + volume_id).derive(
        bytes(volume_key)
    )


def name_secret_aad(volume_id: bytes) -> bytes:
    """What the sealed secret is bound to: the label and the volume ID."""
    return NAME_SECRET_LABEL + volume_id


@dataclass(frozen=True)
class SealedNameSecret:
    """The ``names`` field of a format-4 config: the name secret sealed under V.

    Attributes: sealed (nonce || AES-256-GCM ciphertext and tag, 60 bytes).
    """

    sealed: bytes

    @classmethod
    def seal(
        cls,
        name_secret: bytes | bytearray,
        volume_key: bytes | bytearray,
        volume_id: bytes,
        nonce: bytes | None = None,
    ) -> SealedNameSecret:
        """*name_secret* sealed under *volume_key* (a random nonce unless one is given)."""
        if len(name_secret) != NAME_SECRET_SIZE:
            raise ValueError(f"name secret of {len(name_secret)} bytes: want {NAME_SECRET_SIZE}")
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        sealed = AESGCM(name_secret_key(volume_key, volume_id)).encrypt(
            nonce, bytes(name_secret), name_secret_aad(volume_id)
        )
        return cls(nonce + sealed)

    def open(self, volume_key: bytes | bytearray, volume_id: bytes) -> bytearray:
        """The name secret (the caller wipes it).

        ConfigTampered if it does not open under *volume_key*: the field was
        copied from another volume or another volume key's config, or damaged.
        (A config whose tags verify under the same key never gets here with a
        field that fails: the field is tagged.)
        """
        try:
            value = AESGCM(name_secret_key(volume_key, volume_id)).decrypt(
                self.sealed[:NONCE_SIZE], self.sealed[NONCE_SIZE:], name_secret_aad(volume_id)
            )
        except InvalidTag:
            raise ConfigTampered(
                "names: the sealed name secret does not open under the volume key (copied"
                " from another volume or config, or damaged)",
                changed=["names"],
            ) from None
        return bytearray(value)

    def resealed(
        self, old_key: bytes | bytearray, new_key: bytes | bytearray, volume_id: bytes
    ) -> SealedNameSecret:
        """The same name secret sealed under *new_key* (a volume-key rotation).

        ConfigTampered if it does not open under *old_key*.
        """
        secret = self.open(old_key, volume_id)
        try:
            return SealedNameSecret.seal(secret, new_key, volume_id)
        finally:
            secret[:] = bytes(len(secret))

    def to_json(self) -> dict[str, Any]:
        return {"mode": MODE_ENCRYPTED, "sealed": base64.b64encode(self.sealed).decode()}

    @classmethod
    def parse(cls, raw: Any, where: str) -> SealedNameSecret:
        """The ``names`` field, checked for form; ConfigError naming what is wrong."""
        if not isinstance(raw, dict) or sorted(raw) != sorted(NAMES_FIELDS):
            raise ConfigError(f"{where}: names must be an object with mode and sealed")
        if raw["mode"] != MODE_ENCRYPTED:
            raise ConfigError(
                f"{where}: names.mode is {raw['mode']!r}, this kmsfs knows {MODE_ENCRYPTED!r}"
            )
        text = raw["sealed"]
        try:
            sealed = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
        except (binascii.Error, ValueError):
            sealed = b""
        if len(sealed) != SEALED_SIZE:
            raise ConfigError(f"{where}: names.sealed must be base64 of {SEALED_SIZE} bytes")
        return cls(sealed)
