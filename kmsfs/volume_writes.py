"""Writing a volume config: every write raises its generation and moves this host's pin.

- ``save_volume_config``: keys add and update, the add step of rewrap;
- ``rotate_volume_key``: a new volume key, whenever the set of keys that can
  open the volume shrinks or changes (keys remove, the key switch of rewrap,
  passwd), with the old one sealed under it in the config's chain
  (kmsfs/format/volume_key.py) so other hosts pinned at it can follow;
- ``migrate_format1`` / ``upgrade_format2``: the migrations to format 3 that
  mount and the writing tools make (kmsfs/volume_open.py, ``open_volume``).

The pin is host state (kmsfs/pins.py): a write by this host's tools is
trusted, as the config was checked against the pin when it was opened.
"""

from __future__ import annotations

import logging
import os

from kmsfs.backing.durable import write_durably
from kmsfs.errors import ConfigError
from kmsfs.format.volume_config import KeyConfig, VolumeConfig, config_path
from kmsfs.format.volume_key import MAX_CHAIN, VOLUME_KEY_SIZE, ChainEntry
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import KeyContext, KeyProvider, wipe
from kmsfs.trust import record_pin

log = logging.getLogger("kmsfs.volume_open")


def new_key_config(
    provider: KeyProvider, volume_id: bytes, volume_key: bytes | bytearray
) -> KeyConfig:
    """The config entry of *provider*: its hints and the volume key wrapped as its check."""
    check = provider.wrap(volume_key, KeyContext.key_check(volume_id))
    return KeyConfig(provider.name, provider.key_ref, provider.settings(), check.blob)


def warn_public_wrap(provider: KeyProvider) -> None:
    """Log what a key that others can wrap under means for a volume (init, keys add)."""
    who = provider.public_wrap()
    if who is not None:
        log.warning(
            "%s. A volume config made with such a wrap passes this key's check, so a host"
            " trusts this volume through its pin only: at the first mount on each new host,"
            " give --expect-fingerprint (see 'kmsfs pin show BACKING' here; docs/KEYS.md)",
            who,
        )


def migrate_format1(
    backing: str | os.PathLike[str], config: VolumeConfig, providers: dict[int, KeyProvider]
) -> bytearray | None:
    """Rewrite a format-1 config as format 3 with a new volume key; None (and a warning)
    unless every key opened."""
    missing = [config.keys[i].describe() for i in range(len(config.keys)) if i not in providers]
    if missing:
        log.warning(
            "volume config stays at format 1 (unauthenticated) because %s could not be opened;"
            " give every key's options once to migrate it",
            ", ".join(missing),
        )
        return None
    volume_key = bytearray(os.urandom(VOLUME_KEY_SIZE))
    for index, provider in providers.items():
        key = config.keys[index]
        fresh = new_key_config(provider, config.volume_id, volume_key)
        key.check = fresh.check
    config.seal(volume_key)
    save_config(backing, config)
    log.warning(
        "migrated the volume config of %s from format 1 to format 3 (authenticated)", backing
    )
    record_pin(backing, config, volume_key, "migrated from format 1")
    return volume_key


def upgrade_format2(
    backing: str | os.PathLike[str], config: VolumeConfig, volume_key: bytearray
) -> None:
    """Rewrite a format-2 config as format 3 (generation 1, an empty chain), same volume key."""
    config.seal(volume_key)
    save_config(backing, config)
    log.warning(
        "migrated the volume config of %s from format 2 to format 3 (generation counter,"
        " volume-key chain)",
        backing,
    )
    record_pin(backing, config, volume_key, "migrated from format 2")


def save_volume_config(
    backing: str | os.PathLike[str], config: VolumeConfig, keyring: Keyring
) -> None:
    """Raise the generation, seal *config* under the keyring's volume key, write it
    and update this host's pin.

    ConfigError if the volume is still at format 1 (not every key could be
    opened to migrate it).
    """
    volume_key = _current_key(keyring)
    config.generation = max(config.generation, 1) + 1  # format 2 (0) counts as migrated (1)
    config.seal(volume_key)
    save_config(backing, config)
    record_pin(backing, config, volume_key, "written by this host")


def _current_key(keyring: Keyring) -> bytearray:
    if keyring.volume_key is None:
        raise ConfigError(
            "this volume's config is still format 1 (unauthenticated): open it once with"
            " every key available (for example 'kmsfs keys list' then the same command with"
            " every key's options) so it is migrated, then run this command again"
        )
    return keyring.volume_key


def rotate_volume_key(
    backing: str | os.PathLike[str], config: VolumeConfig, keyring: Keyring
) -> None:
    """Replace the volume key: every key of *config* wraps a new one as its check, the
    old one is sealed under it in the chain (the last MAX_CHAIN kept), the
    generation is raised, the tags recomputed, the config written and this
    host's pin (and ``keyring.volume_key``) moved to the new key.

    For a change of the set of keys that can open the volume (keys remove, the
    key switch of rewrap, passwd): a removed key's holder, who could unwrap the
    old key, cannot unwrap the new one.  A volume with encrypted names keeps its
    name secret, sealed again under the new key (names never change; what a
    former holder still reads: docs/FORMAT.md, "Who can read names").
    ConfigError naming the keys this host could not open (each must wrap the new
    key) or if the volume is at format 1; the provider's errors for a wrap that
    fails.  Nothing is written then.
    """
    old = _current_key(keyring)
    by_ref = {provider.key_ref: provider for provider in keyring.providers}
    missing = [key.describe() for key in config.keys if key.key_ref not in by_ref]
    if missing:
        raise ConfigError(
            f"replacing the volume key needs every remaining key of the volume, and"
            f" {', '.join(missing)} could not be opened on this host: give its options too"
            " (or make sure its recorded settings reach it), then run the same command again"
        )
    new = bytearray(os.urandom(VOLUME_KEY_SIZE))
    try:
        wrap = KeyContext.key_check(config.volume_id)
        checks = [by_ref[key.key_ref].wrap(new, wrap).blob for key in config.keys]
        for key, check in zip(config.keys, checks, strict=True):
            key.check = check
        config.generation = max(config.generation, 1) + 1
        entry = ChainEntry.seal(new, old, config.volume_id, config.generation)
        config.chain = [*config.chain, entry][-MAX_CHAIN:]
        if config.names is not None:  # the same name secret, under the new key
            config.names = config.names.resealed(old, new, config.volume_id)
        config.seal(new)
        save_config(backing, config)
        old[:] = new
        record_pin(backing, config, new, "volume key replaced by this host")
    finally:
        wipe(new)


def save_config(backing: str | os.PathLike[str], config: VolumeConfig) -> None:
    """Write the config atomically (temporary file, fsync, rename, fsync directory).

    The caller seals the config first (``VolumeConfig.seal``).
    """
    write_durably(config_path(backing), config.dumps().encode())
