"""Creating a volume and opening one (config + providers + verified keyring).

Used by the daemon and by every offline command; no FUSE here.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

from kmsfs.errors import ConfigError, KmsfsError, ProviderError
from kmsfs.format.header import check_block_size
from kmsfs.format.volume import (
    CONFIG_NAME,
    DEFAULT_BLOCK_SIZE,
    KeyConfig,
    VolumeConfig,
    config_path,
    load_config,
    save_config,
)
from kmsfs.keys.cache import KeyCache
from kmsfs.keys.keyring import EventSink, Keyring, open_keyring
from kmsfs.keys.provider import KeyContext, KeyProvider, random_key, wipe
from kmsfs.keys.registry import create_provider, open_provider
from kmsfs.keys.secrets import Prompt

log = logging.getLogger("kmsfs.volume")
XATTR_PROBE = "user.kmsfs.probe"


def check_backing_dir(backing: Path) -> None:
    """ConfigError unless *backing* is an empty directory on a filesystem with user xattrs."""
    if not backing.is_dir():
        raise ConfigError(f"{backing} is not a directory")
    if config_path(backing).exists():
        raise ConfigError(f"{backing} is already a kmsfs volume ({CONFIG_NAME} exists)")
    if any(backing.iterdir()):
        raise ConfigError(
            f"{backing} is not empty: init needs an empty directory"
            " (to encrypt existing files, copy them in through the mount)"
        )
    probe = backing / ".kmsfs-xattr-probe"
    try:
        probe.touch()
        os.setxattr(probe, XATTR_PROBE, b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise ConfigError(
                f"the filesystem of {backing} does not support user extended attributes,"
                " which hold each file's key header (use ext4, xfs or btrfs, or mount with"
                " user_xattr)"
            ) from None
        raise ConfigError(f"cannot write in {backing}: {exc.strerror}") from None
    finally:
        probe.unlink(missing_ok=True)


def init_volume(
    backing: str | os.PathLike[str],
    provider_name: str,
    options: dict[str, Any],
    prompt: Prompt | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> VolumeConfig:
    """Create a volume in the empty directory *backing*; returns its config."""
    path = Path(backing)
    try:
        check_block_size(block_size)
    except KmsfsError as exc:
        raise ConfigError(str(exc)) from None
    check_backing_dir(path)
    provider = create_provider(provider_name, options, prompt)
    try:
        volume_id = os.urandom(16)
        check_key = random_key()
        try:
            check = provider.wrap(check_key, KeyContext.key_check(volume_id))
        finally:
            wipe(check_key)
        config = VolumeConfig(
            volume_id=volume_id,
            block_size=block_size,
            keys=[KeyConfig(provider.name, provider.key_ref, provider.settings(), check.blob)],
        )
        save_config(path, config)
    finally:
        provider.close()
    return config


def open_providers(
    config: VolumeConfig, options: dict[str, Any], prompt: Prompt | None
) -> list[KeyProvider]:
    """Open each master key that can be opened, in configured order.

    Raises the first error if none can; logs the others.
    """
    providers: list[KeyProvider] = []
    errors: list[KmsfsError] = []
    for key in config.keys:
        try:
            providers.append(open_provider(key, options, prompt))
        except (ConfigError, ProviderError) as exc:
            errors.append(exc)
    if not providers:
        raise errors[0]
    for exc in errors:
        log.warning("master key unavailable, using the others: %s", exc)
    return providers


def open_volume(
    backing: str | os.PathLike[str],
    options: dict[str, Any],
    prompt: Prompt | None = None,
    cache: KeyCache | None = None,
    on_event: EventSink | None = None,
) -> tuple[VolumeConfig, Keyring]:
    """Load the config and a keyring whose keys passed their key check."""
    config = load_config(backing)
    providers = open_providers(config, options, prompt)
    try:
        keyring = open_keyring(config, providers, cache, on_event)
    except BaseException:
        for provider in providers:
            provider.close()
        raise
    return config, keyring


def find_volume_root(path: str | os.PathLike[str]) -> Path:
    """The nearest directory at or above *path* holding a volume config."""
    current = Path(path).absolute()
    if not current.is_dir():
        current = current.parent
    for candidate in [current, *current.parents]:
        if config_path(candidate).exists():
            return candidate
    raise ConfigError(f"{path} is not inside a kmsfs volume (no {CONFIG_NAME} above it)")
