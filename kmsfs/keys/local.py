"""The local key provider: a 256-bit master key from a key file or a passphrase.

Key file: one line ``kmsfs-local-key-v1 <base64 of 32 bytes>``, mode 0600.
Passphrase: the master key is random and stored in the volume config wrapped
under Argon2id(passphrase) (see docs/FORMAT.md, "Local provider").

Wrapped data key (61 bytes)::

    0x01 || nonce (12) || AES-256-GCM(K_wrap, nonce, data key, AAD = context.aad())
    K_wrap = HKDF-SHA256(master, info="kmsfs/v1/local-wrap", length 32)
    key_ref = "local:" + hex(HKDF-SHA256(master, info="kmsfs/v1/local-key-id", length 8))
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import ConfigError, WrongKeyError
from kmsfs.format.header import WrappedKey
from kmsfs.keys.provider import DATA_KEY_SIZE, KeyContext, KeyProvider
from kmsfs.keys.secrets import Prompt, get_text_secret, read_secret_file
from kmsfs.keys.settings import LocalSettings, ProviderEntry

KEY_FILE_TAG = "kmsfs-local-key-v1"
BLOB_VERSION = 1
NONCE_SIZE = 12
ARGON2_DEFAULTS = {"memory_kib": 65536, "iterations": 3, "lanes": 4}
# Bounds on parameters read from the (not yet authenticated) volume config: a planted
# config must not make mount allocate or compute without limit.
ARGON2_LIMITS = {"memory_kib": (8, 4 * 1024 * 1024), "iterations": (1, 64), "lanes": (1, 64)}
SALT_SIZES = (16, 64)
PASSPHRASE_AAD = b"kmsfs/v1/passphrase"


def _hkdf(master: bytes, label: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=label).derive(master)


def format_key_file(master: bytes) -> bytes:
    return f"{KEY_FILE_TAG} {base64.b64encode(master).decode()}\n".encode()


def parse_key_file(data: bytes, where: str) -> bytes:
    """The master key in key-file bytes; ConfigError saying what is wrong."""
    try:
        tag, encoded = data.decode("ascii").split()
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(
            f"{where}: not a kmsfs key file (want '{KEY_FILE_TAG} <base64>')"
        ) from None
    if tag != KEY_FILE_TAG:
        raise ConfigError(f"{where}: key file tag {tag!r}, want {KEY_FILE_TAG!r}")
    try:
        master = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ConfigError(f"{where}: key is not valid base64") from None
    if len(master) != DATA_KEY_SIZE:
        raise ConfigError(f"{where}: key is {len(master)} bytes, want {DATA_KEY_SIZE}")
    return master


def write_new_key_file(path: Path) -> bytes:
    """Create *path* (0600, must not exist) holding a fresh random master key."""
    master = os.urandom(DATA_KEY_SIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        os.write(fd, format_key_file(master))
        os.fsync(fd)
    finally:
        os.close(fd)
    return master


def _argon2(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    return Argon2id(
        salt=salt,
        length=32,
        iterations=params["iterations"],
        lanes=params["lanes"],
        memory_cost=params["memory_kib"],
    ).derive(passphrase.encode())


class LocalProvider(KeyProvider):
    """Wraps data keys under a master key held in this process's memory."""

    name = "local"
    inline = True

    def __init__(self, master: bytes, settings: dict[str, Any]) -> None:
        self._wrap_aead = AESGCM(_hkdf(master, b"kmsfs/v1/local-wrap"))
        self._key_ref = "local:" + _hkdf(master, b"kmsfs/v1/local-key-id", 8).hex()
        self._settings = settings

    @property
    def key_ref(self) -> str:
        return self._key_ref

    def settings(self) -> dict[str, Any]:
        return self._settings

    def _generate(self, context: KeyContext) -> tuple[bytes, bytes]:
        plaintext = os.urandom(DATA_KEY_SIZE)
        return plaintext, self._wrap(plaintext, context)

    def _wrap(self, plaintext: bytes, context: KeyContext) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return (
            bytes([BLOB_VERSION]) + nonce + self._wrap_aead.encrypt(nonce, plaintext, context.aad())
        )

    def _unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        blob = wrapped.blob
        if len(blob) != 1 + NONCE_SIZE + DATA_KEY_SIZE + 16 or blob[0] != BLOB_VERSION:
            raise WrongKeyError(f"local wrapped key of {len(blob)} bytes is malformed")
        try:
            return self._wrap_aead.decrypt(blob[1:13], blob[13:], context.aad())
        except InvalidTag:
            raise WrongKeyError(
                f"{self.describe()} cannot unwrap this key: other master key or other volume/file"
            ) from None


def wrap_master(master: bytes, passphrase: str) -> dict[str, Any]:
    """``settings.passphrase``: *master* wrapped under Argon2id(*passphrase*, new salt)."""
    salt = os.urandom(16)
    params = dict(ARGON2_DEFAULTS)
    nonce = os.urandom(NONCE_SIZE)
    wrapped = nonce + AESGCM(_argon2(passphrase, salt, params)).encrypt(
        nonce, master, PASSPHRASE_AAD
    )
    return {
        "kdf": "argon2id",
        **params,
        "salt": base64.b64encode(salt).decode(),
        "wrapped_master": base64.b64encode(wrapped).decode(),
    }


def unlock_master(stored: Any, passphrase: str) -> bytes:
    """The master key in ``settings.passphrase`` *stored*.

    Raises ConfigError if the settings are malformed or their cost parameters
    are out of bounds (ARGON2_LIMITS), WrongKeyError for a wrong passphrase.
    """
    where = "volume config: passphrase settings"
    if not isinstance(stored, dict) or stored.get("kdf") != "argon2id":
        raise ConfigError(f"{where} are malformed (want kdf argon2id)")
    params: dict[str, int] = {}
    for name, (low, high) in ARGON2_LIMITS.items():
        value = stored.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{where}: {name} is {value!r}, want an integer {low}..{high}")
        params[name] = value
    if params["memory_kib"] < 8 * params["lanes"]:
        raise ConfigError(f"{where}: memory_kib must be at least 8 x lanes")
    try:
        salt = base64.b64decode(stored["salt"], validate=True)
        wrapped = base64.b64decode(stored["wrapped_master"], validate=True)
    except (KeyError, ValueError, TypeError, binascii.Error) as exc:
        raise ConfigError(f"{where} are malformed ({exc})") from None
    if not SALT_SIZES[0] <= len(salt) <= SALT_SIZES[1]:
        raise ConfigError(f"{where}: salt of {len(salt)} bytes, want 16..64")
    if len(wrapped) != NONCE_SIZE + DATA_KEY_SIZE + 16:
        raise ConfigError(f"{where}: wrapped_master of {len(wrapped)} bytes, want 60")
    try:
        kek = AESGCM(_argon2(passphrase, salt, params))
        return kek.decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], PASSPHRASE_AAD)
    except InvalidTag:
        raise WrongKeyError("wrong passphrase for this volume") from None


def create(host: LocalSettings, prompt: Prompt | None) -> LocalProvider:
    """The master key for a new volume: an existing or new key file, or a passphrase."""
    key_file = host.key_file
    if key_file and host.passphrase_file:
        key_flag, passphrase_flag = host.flag_of("key_file"), host.flag_of("passphrase_file")
        raise ConfigError(f"give either {key_flag} or {passphrase_flag}, not both")
    if key_file:
        path = Path(key_file).absolute()
        if path.exists():
            master = parse_key_file(read_secret_file(path, "key file"), str(path))
        else:
            master = write_new_key_file(path)
        return LocalProvider(master, {"key_file": str(path)})
    passphrase = get_text_secret(
        host.passphrase_file, "kmsfs-passphrase", "passphrase", prompt, confirm=True
    )
    master = os.urandom(DATA_KEY_SIZE)
    return LocalProvider(master, {"passphrase": wrap_master(master, passphrase)})


def open_provider(
    settings: dict[str, Any], host: LocalSettings, prompt: Prompt | None
) -> LocalProvider:
    """The provider for an existing volume: --key-file, else a recorded (trusted) key file
    in *settings*, else the passphrase (--passphrase-file, credential or prompt)."""
    key_file = host.key_file
    if not key_file and not host.passphrase_file:
        key_file = settings.get("key_file")
    if key_file:
        master = parse_key_file(read_secret_file(key_file, "key file"), str(key_file))
        return LocalProvider(master, {**settings, "key_file": str(Path(key_file).absolute())})
    stored = settings.get("passphrase")
    if stored is None:
        raise ConfigError(f"this volume's local key is a key file: give {host.flag_of('key_file')}")
    passphrase = get_text_secret(host.passphrase_file, "kmsfs-passphrase", "passphrase", prompt)
    return LocalProvider(unlock_master(stored, passphrase), settings)


ENTRY = ProviderEntry(create=create, open=open_provider)
