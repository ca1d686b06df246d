"""The volume config: ``.kmsfs.json`` at the root of the backing directory.

JSON, UTF-8, one object (see docs/FORMAT.md, "Volume config")::

    {"kmsfs_volume": 1, "volume_id": "<32 hex>", "suite": "AES-256-GCM/HKDF-SHA256",
     "block_size": 4096, "created": "<ISO 8601>",
     "keys": [{"provider": "local", "key_ref": "...", "settings": {...},
               "check": "<base64 wrapped key-check key>"}, ...]}

``settings`` holds what a provider needs to find its master key, never a
secret in the clear.  ``check`` is a random key wrapped by that master key for
the key-check context; unwrapping it at mount proves the key is the right one.
Names starting with ``.kmsfs`` at the backing root are reserved for kmsfs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.errors import ConfigError, FormatError
from kmsfs.format.header import ID_SIZE, check_block_size

CONFIG_NAME = ".kmsfs.json"
STATE_DIR_NAME = ".kmsfs.d"
RESERVED_PREFIX = ".kmsfs"
CONFIG_VERSION = 1
SUITE_NAME = "AES-256-GCM/HKDF-SHA256"
DEFAULT_BLOCK_SIZE = 4096
MAX_CONFIG_SIZE = 1 << 20


@dataclass
class KeyConfig:
    """One master key of the volume: its provider, identity, settings and check value."""

    provider: str
    key_ref: str
    settings: dict[str, Any]
    check: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "key_ref": self.key_ref,
            "settings": self.settings,
            "check": base64.b64encode(self.check).decode(),
        }


@dataclass
class VolumeConfig:
    """The parsed volume config."""

    volume_id: bytes
    block_size: int
    keys: list[KeyConfig]
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    suite: str = SUITE_NAME

    def to_json(self) -> dict[str, Any]:
        return {
            "kmsfs_volume": CONFIG_VERSION,
            "volume_id": self.volume_id.hex(),
            "suite": self.suite,
            "block_size": self.block_size,
            "created": self.created,
            "keys": [key.to_json() for key in self.keys],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def loads(cls, text: str, where: str = CONFIG_NAME) -> VolumeConfig:
        """Parse config text; raise ConfigError naming the field and the problem."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number; nesting too deep
            raise ConfigError(f"{where}: not acceptable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: want a JSON object")
        version = data.get("kmsfs_volume")
        if version != CONFIG_VERSION:
            raise ConfigError(f"{where}: kmsfs_volume is {version!r}, this kmsfs reads 1")
        suite = _field(data, "suite", str, where)
        if suite != SUITE_NAME:
            raise ConfigError(f"{where}: suite {suite!r} is not supported (want {SUITE_NAME})")
        try:
            volume_id = bytes.fromhex(_field(data, "volume_id", str, where))
            if len(volume_id) != ID_SIZE:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{where}: volume_id must be 32 hex digits") from None
        try:
            block_size = check_block_size(_field(data, "block_size", int, where))
        except FormatError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        raw_keys = _field(data, "keys", list, where)
        if not raw_keys:
            raise ConfigError(f"{where}: keys is empty; a volume needs at least one master key")
        keys = [_parse_key(raw, f"{where}: keys[{i}]") for i, raw in enumerate(raw_keys)]
        created = data.get("created", "")
        return cls(volume_id, block_size, keys, str(created), suite)


def _field(data: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {name} must be a {kind.__name__}, found {value!r}")
    return value


def _parse_key(raw: Any, where: str) -> KeyConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: want an object")
    try:
        check = base64.b64decode(_field(raw, "check", str, where), validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ConfigError(f"{where}: check is not valid base64") from None
    return KeyConfig(
        provider=_field(raw, "provider", str, where),
        key_ref=_field(raw, "key_ref", str, where),
        settings=_field(raw, "settings", dict, where),
        check=check,
    )


def config_path(backing: str | os.PathLike[str]) -> Path:
    return Path(backing) / CONFIG_NAME


def load_config(backing: str | os.PathLike[str]) -> VolumeConfig:
    """Read the volume config of *backing*; ConfigError if absent or malformed."""
    path = config_path(backing)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{backing} is not a kmsfs volume (no {CONFIG_NAME}; create one with 'kmsfs init')"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return VolumeConfig.loads(text, str(path))


def save_config(backing: str | os.PathLike[str], config: VolumeConfig) -> None:
    """Write the config atomically (temporary file, fsync, rename, fsync directory)."""
    path = config_path(backing)
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, config.dumps().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
