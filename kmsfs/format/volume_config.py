"""The volume config: ``.kmsfs.json`` at the root of the backing directory.

JSON, UTF-8, one object (see docs/FORMAT.md, "Volume config")::

    {"kmsfs_volume": 3, "volume_id": "<32 hex>", "suite": "AES-256-GCM/HKDF-SHA256",
     "block_size": 4096, "created": "<ISO 8601>", "generation": 7,
     "chain": [{"generation": 5, "previous": "<32 hex>", "sealed": "<base64>"}, ...],
     "names": {"mode": "encrypted", "sealed": "<base64>"},    (format 4 only)
     "keys": [{"provider": "local", "key_ref": "...", "settings": {...},
               "check": "<base64>", "tag": "<base64>"}, ...],
     "tags": {"kmsfs_volume": "<base64>", "volume_id": ..., "suite": ..., "block_size": ...,
              "created": ..., "generation": ..., "chain": ..., "keys": ..., "names": ...}}

Formats 2 and 3 are **authenticated**: every master key's ``check`` wraps the
same random 32-byte *volume key*, and ``tags`` / ``keys[i].tag`` are
HMAC-SHA256 tags under a key derived from it (``config_mac_key``).  Whoever
lacks a master key cannot add, remove, reorder or edit a key entry, nor change
the block size or suite, without ``verify`` naming what changed.  Format 3
adds the tagged ``generation`` (raised by every config write, so a host that
remembers it sees a rollback) and ``chain`` (the previous volume keys, each
sealed under the next: kmsfs/format/volume_key.py).  Format 4 is format 3 of a
volume with encrypted names: the tagged ``names`` field holds the name secret
sealed under the volume key (kmsfs/format/name_secret.py); the format number,
tagged too, is what stops anyone without the volume key from removing that
field (and its tag) to pass the volume off as one with plain names.  Format 1
(no tags, one independent check value per key) and format 2 are still read;
``kmsfs`` migrates them.

``settings`` are *hints* (docs/FORMAT.md): what init used to find each key.
They are shown by ``keys list`` and compared at mount; code paths, endpoints
and key-file paths in them are used only once the config is authenticated, or
when the operator says to trust them.  Names starting with ``.kmsfs`` at the
backing root are reserved for kmsfs.  Nothing here imports FUSE or an SDK.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import ConfigError, ConfigTampered, FormatError
from kmsfs.format.header import ID_SIZE, check_block_size
from kmsfs.format.name_secret import SealedNameSecret
from kmsfs.format.volume_key import MAX_GENERATION, VOLUME_KEY_SIZE, ChainEntry, parse_chain

CONFIG_NAME = ".kmsfs.json"
STATE_DIR_NAME = ".kmsfs.d"
RESERVED_PREFIX = ".kmsfs"
CONFIG_VERSION = 3  # plain names
NAMES_VERSION = 4  # format 3 with the tagged names field: encrypted names
READABLE_VERSIONS = (1, 2, 3, 4)
SUITE_NAME = "AES-256-GCM/HKDF-SHA256"
DEFAULT_BLOCK_SIZE = 4096
MAX_CONFIG_SIZE = 1 << 20
MAX_KEYS = 64
TAG_SIZE = 32
MAC_LABEL = b"kmsfs/v2/config-mac"
TOP_FIELDS = ("kmsfs_volume", "volume_id", "suite", "block_size", "created", "keys")
GENERATION_FIELDS = ("generation", "chain")  # format 3
NAMES_FIELDS = ("names",)  # format 4
KEY_FIELDS = ("provider", "key_ref", "settings", "check")


def canonical_json(value: Any) -> bytes:
    """RFC 8785 form for the strings, integers, lists and objects a config holds."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_mac_key(volume_key: bytes | bytearray, volume_id: bytes) -> bytes:
    """The HMAC key of a format-2 or 3 config: HKDF-SHA256(volume key, info = label || ID)."""
    if len(volume_key) != VOLUME_KEY_SIZE:
        raise ValueError(f"volume key of {len(volume_key)} bytes: want {VOLUME_KEY_SIZE}")
    return HKDF(hashes.SHA256(), 32, salt=None, info=MAC_LABEL + volume_id).derive(
        bytes(volume_key)
    )


def _mac(mac_key: bytes, kind: bytes, *parts: bytes) -> bytes:
    return hmac.new(mac_key, kind + b"\0" + b"".join(parts), hashlib.sha256).digest()


@dataclass
class KeyConfig:
    """One master key of the volume: provider, identity, hints, check value, tag.

    ``tag`` is None in a format-1 config and in an entry not yet tagged.
    """

    provider: str
    key_ref: str
    settings: dict[str, Any]
    check: bytes
    tag: bytes | None = None

    def body(self) -> dict[str, Any]:
        """The tagged fields, as JSON."""
        return {
            "provider": self.provider,
            "key_ref": self.key_ref,
            "settings": self.settings,
            "check": base64.b64encode(self.check).decode(),
        }

    def to_json(self) -> dict[str, Any]:
        data = self.body()
        if self.tag is not None:
            data["tag"] = base64.b64encode(self.tag).decode()
        return data

    def describe(self) -> str:
        return f"{self.provider} key {self.key_ref}"


@dataclass
class VolumeConfig:
    """The parsed volume config.  ``tags`` is empty in format 1 (unauthenticated).

    ``generation`` counts the config's writes (format 3; 0 stands for a format-1
    or format-2 config, which has none); ``chain`` lists the previous volume
    keys, oldest first (format 3).  ``names`` is the name secret sealed under the
    volume key for a volume with encrypted names (format 4), None for plain names.
    """

    volume_id: bytes
    block_size: int
    keys: list[KeyConfig]
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    suite: str = SUITE_NAME
    version: int = CONFIG_VERSION
    tags: dict[str, bytes] = field(default_factory=dict)
    generation: int = 1
    chain: list[ChainEntry] = field(default_factory=list)
    names: SealedNameSecret | None = None

    @property
    def encrypted_names(self) -> bool:
        """True for a volume with encrypted names (format 4, with its ``names`` field)."""
        return self.names is not None

    @property
    def authenticated_format(self) -> bool:
        """True for formats 2 and 3 (tags present); False for a format-1 config."""
        return self.version >= 2

    def field_values(self) -> dict[str, Any]:
        """The top-level fields, as JSON, keys excluded."""
        values: dict[str, Any] = {
            "kmsfs_volume": self.version,
            "volume_id": self.volume_id.hex(),
            "suite": self.suite,
            "block_size": self.block_size,
            "created": self.created,
        }
        if self.version >= 3:
            values["generation"] = self.generation
            values["chain"] = [entry.to_json() for entry in self.chain]
        if self.version >= NAMES_VERSION and self.names is not None:
            values["names"] = self.names.to_json()
        return values

    def to_json(self) -> dict[str, Any]:
        data = {**self.field_values(), "keys": [key.to_json() for key in self.keys]}
        if self.tags:
            data["tags"] = {name: base64.b64encode(tag).decode() for name, tag in self.tags.items()}
        return data

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    # -- authentication (formats 2 and 3) ------------------------------------

    def seal(self, volume_key: bytes | bytearray) -> None:
        """Make this a format-3 config (format 4 with encrypted names) and (re)compute
        every tag under *volume_key*.

        The generation is the caller's to raise (``kmsfs.volume_open``); a config that
        had none (format 1 or 2) starts at 1.  The ``names`` field must be sealed
        under *volume_key* already (``SealedNameSecret.resealed`` on a rotation).
        """
        if self.version < 3:
            self.generation = max(self.generation, 1)
        self.version = NAMES_VERSION if self.names is not None else CONFIG_VERSION
        mac_key = config_mac_key(volume_key, self.volume_id)
        for key in self.keys:
            key.tag = _mac(mac_key, b"key", canonical_json(key.body()))
        self.tags = _field_tags(mac_key, self)

    def verify(self, volume_key: bytes | bytearray, where: str = CONFIG_NAME) -> None:
        """ConfigTampered naming every field and key entry whose tag does not match.

        Also raised for a format-1 config (nothing to verify): callers check
        ``authenticated_format`` first and migrate.
        """
        if not self.authenticated_format:
            raise ConfigTampered(f"{where}: format 1 has no tags to verify")
        mac_key = config_mac_key(volume_key, self.volume_id)
        changed = [
            f"{name} (now {value!r})"
            for name, value in self.field_values().items()
            if not _tag_ok(
                self.tags.get(name),
                _mac(mac_key, b"field", name.encode(), b"\0", canonical_json(value)),
            )
        ]
        for index, key in enumerate(self.keys):
            if not _tag_ok(key.tag, _mac(mac_key, b"key", canonical_json(key.body()))):
                changed.append(f"keys[{index}] ({key.describe()}: added or edited)")
        if not _tag_ok(self.tags.get("keys"), _keys_tag(mac_key, self.keys)) and not any(
            item.startswith("keys[") for item in changed
        ):
            changed.append("keys (an entry was removed or the order changed)")
        if changed:
            raise ConfigTampered(
                f"{where} was changed by someone without a master key of this volume (or is"
                f" damaged): {'; '.join(changed)}. Restore it from a backup, or ask who edited"
                " it; keys are added and removed with 'kmsfs keys', never by hand",
                changed=changed,
            )

    @classmethod
    def loads(cls, text: str, where: str = CONFIG_NAME) -> VolumeConfig:
        """Parse config text; raise ConfigError naming the field and the problem.

        Parsing checks form only: a format-2 or 3 config must still be verified
        (``verify``) with the volume key before anything in it is trusted.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number; nesting too deep
            raise ConfigError(f"{where}: not acceptable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: want a JSON object")
        version = data.get("kmsfs_volume")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ConfigError(
                f"{where}: kmsfs_volume is {version!r}, this kmsfs reads"
                f" {', '.join(map(str, READABLE_VERSIONS[:-1]))} and {READABLE_VERSIONS[-1]}"
            )
        if version >= 2:
            known = {*TOP_FIELDS, "tags", *(GENERATION_FIELDS if version >= 3 else ())}
            known |= set(NAMES_FIELDS if version >= NAMES_VERSION else ())
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigError(f"{where}: unknown fields {', '.join(unknown)}")
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
        if len(raw_keys) > MAX_KEYS:
            raise ConfigError(f"{where}: {len(raw_keys)} keys; at most {MAX_KEYS}")
        keys = [_parse_key(raw, f"{where}: keys[{i}]", version) for i, raw in enumerate(raw_keys)]
        created = data.get("created", "")
        if not isinstance(created, str):
            raise ConfigError(f"{where}: created must be a str, found {created!r}")
        tags: dict[str, bytes] = {}
        if version >= 2:
            raw_tags = data.get("tags") or {}
            if not isinstance(raw_tags, dict):
                raise ConfigError(f"{where}: tags must be an object, found {raw_tags!r}")
            # verify names a missing one
            for name in (*TOP_FIELDS, *GENERATION_FIELDS, *NAMES_FIELDS):
                if raw_tags.get(name) is not None:
                    tags[name] = _b64(raw_tags[name], f"{where}: tags.{name}", TAG_SIZE)
        generation, chain = 0, []
        if version >= 3:
            generation = _field(data, "generation", int, where)
            if not 1 <= generation <= MAX_GENERATION:
                raise ConfigError(f"{where}: generation {generation} out of range (1..2^63-1)")
            chain = parse_chain(data.get("chain"), generation, where)
        names = None
        if version >= NAMES_VERSION:  # required: format 4 is format 3 with this field
            names = SealedNameSecret.parse(data.get("names"), where)
        return cls(
            volume_id, block_size, keys, created, suite, version, tags, generation, chain, names
        )


def _field_tags(mac_key: bytes, config: VolumeConfig) -> dict[str, bytes]:
    tags = {
        name: _mac(mac_key, b"field", name.encode(), b"\0", canonical_json(value))
        for name, value in config.field_values().items()
    }
    tags["keys"] = _keys_tag(mac_key, config.keys)
    return tags


def _keys_tag(mac_key: bytes, keys: list[KeyConfig]) -> bytes:
    return _mac(mac_key, b"keys", *[key.tag or bytes(TAG_SIZE) for key in keys])


def _tag_ok(have: bytes | None, want: bytes) -> bool:
    return have is not None and hmac.compare_digest(have, want)


def _field(data: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {name} must be a {kind.__name__}, found {value!r}")
    return value


def _b64(value: Any, where: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: want a base64 string, found {value!r}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ConfigError(f"{where}: not valid base64") from None
    if size is not None and len(raw) != size:
        raise ConfigError(f"{where}: {len(raw)} bytes, want {size}")
    return raw


def _parse_key(raw: Any, where: str, version: int) -> KeyConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: want an object")
    if version >= 2:
        unknown = sorted(set(raw) - set(KEY_FIELDS) - {"tag"})
        if unknown:
            raise ConfigError(f"{where}: unknown fields {', '.join(unknown)}")
    check = _b64(raw.get("check"), f"{where}: check")
    tag = None  # absent: an entry added without a master key; verify names it
    if version >= 2 and raw.get("tag") is not None:
        tag = _b64(raw["tag"], f"{where}: tag", TAG_SIZE)
    return KeyConfig(
        provider=_field(raw, "provider", str, where),
        key_ref=_field(raw, "key_ref", str, where),
        settings=_field(raw, "settings", dict, where),
        check=check,
        tag=tag,
    )


def config_path(backing: str | os.PathLike[str]) -> Path:
    return Path(backing) / CONFIG_NAME


def load_config(backing: str | os.PathLike[str]) -> VolumeConfig:
    """Read the volume config of *backing* (never through a symlink); ConfigError if absent
    or malformed.  The result is not yet verified: see ``VolumeConfig.verify``."""
    path = config_path(backing)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(
            f"{backing} is not a kmsfs volume (no {CONFIG_NAME}; create one with 'kmsfs init')"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigError(f"{path}: not a regular file")
            raw = handle.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return VolumeConfig.loads(text, str(path))
