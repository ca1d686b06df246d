"""Creating a volume and opening one: config, providers, authentication, keyring.

Used by the daemon and by every offline command; no FUSE here.

Opening (docs/FORMAT.md, "Threat model"): the keys this host names (its
options: command line or TOML volume config) are opened first with this
host's settings only; their key-check values give the volume key, which
verifies the config's tags.  Only then are the other key entries opened with
the settings the config records (now authenticated).  Between the two, the
config is compared with this host's pin of the backing path (kmsfs/trust.py):
the host, not the backing directory, is the trust anchor.  A format-1 config
has no tags: it is migrated to format 3 by the tools that write (mount
included) once every key opens, and until then only keys named by this host
are used; a format-2 config is migrated to format 3 by the same tools.

Every config write raises the generation (``save_volume_config``); when the
set of keys that can open the volume shrinks or changes, the volume key is
replaced (``rotate_volume_key``) and the old one sealed under the new in the
config's chain, so other hosts pinned at the old key can follow.
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kmsfs.backing.names import check_case_sensitive
from kmsfs.errors import ConfigError, ConfigTampered, KmsfsError, ProviderError, WrongKeyError
from kmsfs.format.header import check_block_size
from kmsfs.format.name_secret import SealedNameSecret
from kmsfs.format.names import new_name_secret
from kmsfs.format.volume_config import (
    CONFIG_NAME,
    DEFAULT_BLOCK_SIZE,
    KeyConfig,
    VolumeConfig,
    config_path,
    load_config,
)
from kmsfs.format.volume_key import VOLUME_KEY_SIZE, parse_fingerprint
from kmsfs.keys.cache import KeyCache
from kmsfs.keys.events import EventSink
from kmsfs.keys.keyring import Keyring, unwrap_check
from kmsfs.keys.provider import KeyProvider, wipe
from kmsfs.keys.registry import (
    TRUST_FLAG,
    create_provider,
    host_names,
    open_provider,
    option_flag,
    provider_info,
)
from kmsfs.keys.secrets import Prompt
from kmsfs.keys.settings import HostOptions, host_options
from kmsfs.trust import enforce_pin, record_pin
from kmsfs.volume_writes import (
    migrate_format1,
    new_key_config,
    save_config,
    upgrade_format2,
    warn_public_wrap,
)

log = logging.getLogger(__name__)
XATTR_PROBE = "user.kmsfs.probe"
BACKING_MODE = 0o700


def check_backing_dir(backing: Path) -> None:
    """ConfigError unless *backing* is an empty directory on a filesystem with user xattrs."""
    if not backing.is_dir():
        raise ConfigError(f"{backing} is not a directory")
    if config_path(backing).exists():
        raise ConfigError(f"{backing} is already a kmsfs volume ({CONFIG_NAME} exists)")
    if any(backing.iterdir()):
        raise ConfigError(
            f"{backing} is not empty: init needs an empty directory"
            " (to encrypt existing files, use 'kmsfs import')"
        )
    probe = backing / ".kmsfs-xattr-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.setxattr(fd, XATTR_PROBE, b"1")
        finally:
            os.close(fd)
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
    options: HostOptions | Mapping[str, Any],
    prompt: Prompt | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    encrypted_names: bool = True,
) -> VolumeConfig:
    """Create a volume in the empty (or absent) directory *backing*; returns its config.

    The backing root is made 0700: its subdirectories are owned by the users
    who create them through the mount, and only root may reach them, so no
    local user can swap a symlink into the tree the root tools walk.  With
    *encrypted_names* (format 4) a new name secret is sealed under the volume
    key; ConfigError if the backing filesystem folds case there (encrypted names
    differ in case only: ``check_case_sensitive``).
    """
    path = Path(backing)
    try:
        check_block_size(block_size)
    except KmsfsError as exc:
        raise ConfigError(str(exc)) from None
    if not path.exists():
        try:
            path.mkdir(mode=BACKING_MODE)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    check_backing_dir(path)
    if encrypted_names:
        check_case_sensitive(path)
    os.chmod(path, BACKING_MODE)
    provider = create_provider(provider_name, host_options(options), prompt)
    warn_public_wrap(provider)
    volume_key = bytearray(os.urandom(VOLUME_KEY_SIZE))
    name_secret = new_name_secret()
    try:
        volume_id = os.urandom(16)
        config = VolumeConfig(
            volume_id=volume_id,
            block_size=block_size,
            keys=[new_key_config(provider, volume_id, volume_key)],
        )
        if encrypted_names:
            config.names = SealedNameSecret.seal(name_secret, volume_key, volume_id)
        config.seal(volume_key)
        save_config(path, config)
        record_pin(path, config, volume_key, "init")
    finally:
        wipe(volume_key)
        wipe(name_secret)
        provider.close()
    return config


def host_options_hint(key: KeyConfig) -> str:
    """The options that name *key* on a host, from its hints: '--key-file /k (local key ...)'.

    The hints are not verified here: callers say so where it matters.
    """
    info = provider_info(key.provider)
    wanted = [
        f"{option_flag(option)} {key.settings[hint]}"
        for hint, option in info.host_settings.items()
        if hint in info.hints("required") and isinstance(key.settings.get(hint), str)
    ]
    return f"{' '.join(wanted) or 'its options'} ({key.describe()})"


def _open_named(
    config: VolumeConfig, options: HostOptions, prompt: Prompt | None, trusted: bool
) -> tuple[dict[int, KeyProvider], dict[int, HostOptions], list[KmsfsError]]:
    """Open the keys this host names; the others wait until the config is verified.

    Returns the opened providers, the deferred entries with the options to open
    them with later, and the errors.  An entry of a named provider that this
    host's key is not (another key file, say) is deferred without the host's
    key options, so its own authenticated hints find it.  Trusted
    (``--trust-volume-settings``): the first key, in configured order, that
    opens with its recorded settings; the others are deferred too.
    """
    opened: dict[int, KeyProvider] = {}
    deferred: dict[int, HostOptions] = {}
    errors: list[KmsfsError] = []
    wrong: list[KmsfsError] = []  # the host's key is not this entry's
    for index, key in enumerate(config.keys):
        wanted = not opened if trusted else host_names(key, options)
        if not wanted:
            deferred[index] = options
            continue
        try:
            opened[index] = open_provider(key, options, prompt, trusted)
        except WrongKeyError as exc:
            deferred[index] = options.without_hints(key.provider)
            wrong.append(exc)
        except (ConfigError, ProviderError) as exc:
            errors.append(exc)
    if not opened:  # say why the named key did not open: a wrong key first
        errors = wrong + errors
    return opened, deferred, errors


def _nothing_named(config: VolumeConfig) -> ConfigError:
    keys = "; or ".join(host_options_hint(key) for key in config.keys)
    return ConfigError(
        f"no key of this volume is named on this host: give {keys}, on the command line or in"
        " the TOML volume config ([provider]) (these values are read from the volume config,"
        f" not yet verified: use them only if they are this host's); or pass {TRUST_FLAG} to"
        " use the settings recorded in the backing directory (only if nobody else can write it)"
    )


def open_volume(
    backing: str | os.PathLike[str],
    options: HostOptions | Mapping[str, Any],
    prompt: Prompt | None = None,
    cache: KeyCache | None = None,
    on_event: EventSink | None = None,
    *,
    migrate: bool = False,
) -> tuple[VolumeConfig, Keyring]:
    """Load and authenticate the config; a keyring whose keys passed their key check.

    *options* (a mapping is read as ``HostOptions.parse``): its
    ``trust_volume_settings`` uses the recorded settings to find keys the host
    does not name; its ``expect_fingerprint`` is the volume-key fingerprint an
    unpinned volume must have to be pinned.  With
    *migrate*, a format-1 config is rewritten as format 3 when every key opens,
    and a format-2 one at once.  Raises ConfigError (no key named, host and
    recorded settings differ), ConfigTampered (tags do not verify), PinMismatch
    (the config is not what this host pinned: kmsfs/trust.py), WrongKeyError
    and other ProviderErrors.
    """
    options = host_options(options)
    config = load_config(backing)
    trusted = options.trust_volume_settings
    opened, deferred, errors = _open_named(config, options, prompt, trusted)
    if not opened:
        raise errors[0] if errors else _nothing_named(config)
    checks: dict[int, bytearray] = {}
    providers = dict(opened)
    try:
        _check_named(backing, config, opened, checks, on_event)
        enforce_pin(
            backing,
            config,
            checks[min(checks)] if config.authenticated_format else None,
            _expected(options),
            _key_flags(options),
        )
        for index, later_options in deferred.items():
            key = config.keys[index]
            if not config.authenticated_format and not trusted:
                log.warning(
                    "%s not used: this format-1 volume config is not authenticated, so its"
                    " recorded settings are not trusted; give this key's options too (or %s)",
                    key.describe(),
                    TRUST_FLAG,
                )
                continue
            try:
                providers[index] = open_provider(key, later_options, prompt, trusted=True)
                checks[index] = unwrap_check(
                    providers[index], key, config.volume_id, on_event, config.version
                )
            except (ConfigError, ProviderError) as exc:
                failed = providers.pop(index, None)
                if failed is not None:
                    failed.close()
                errors.append(exc)
        for error in errors:
            log.warning("master key unavailable, using the others: %s", error)
        volume_key = _volume_key(config, checks)
        if volume_key is None and migrate:
            volume_key = migrate_format1(backing, config, providers)
        elif volume_key is not None and migrate and config.version < 3:
            upgrade_format2(backing, config, volume_key)
        ordered = [providers[index] for index in sorted(providers)]
        keyring = Keyring(config.volume_id, ordered, cache, on_event)
        keyring.volume_key = volume_key
    except BaseException:
        for provider in providers.values():
            provider.close()
        raise
    finally:
        for value in checks.values():
            wipe(value)
    return config, keyring


def _check_named(
    backing: str | os.PathLike[str],
    config: VolumeConfig,
    opened: dict[int, KeyProvider],
    checks: dict[int, bytearray],
    on_event: EventSink | None,
) -> None:
    """Unwrap the check values of the keys this host named (into *checks*, which the
    caller wipes) and verify the config's tags with the first (format 2 and 3)."""
    for index, provider in opened.items():
        checks[index] = unwrap_check(
            provider, config.keys[index], config.volume_id, on_event, config.version
        )
    if config.authenticated_format:
        config.verify(checks[min(checks)], str(config_path(backing)))


def _expected(options: HostOptions) -> bytes | None:
    text = options.expect_fingerprint
    return parse_fingerprint(text, "--expect-fingerprint") if text else None


def _key_flags(options: HostOptions) -> str:
    """The command-line flags for the key options this host gave (for ``kmsfs pin set``)."""
    flags = [
        declared.flag if value is True else f"{declared.flag} {shlex.quote(str(value))}"
        for declared, value in options.given()
    ]
    if options.trust_volume_settings:
        flags.append(TRUST_FLAG)
    return " ".join(flags)


def authenticate_volume(
    backing: str | os.PathLike[str],
    options: HostOptions | Mapping[str, Any],
    prompt: Prompt | None = None,
) -> tuple[VolumeConfig, bytearray]:
    """The config, authenticated with the keys this host names, and its volume key (the
    caller wipes it); no other key is opened and the host pin is not consulted.

    For ``kmsfs pin set``.  Raises what ``open_volume`` raises before its pin
    check, and ConfigError for a format-1 config (it has no volume key).
    """
    options = host_options(options)
    config = load_config(backing)
    if not config.authenticated_format:
        raise ConfigError(
            f"{backing}: the volume config is format 1 (no volume key to pin): mount it once"
            " with every key so that it is migrated"
        )
    opened, _, errors = _open_named(config, options, prompt, options.trust_volume_settings)
    if not opened:
        raise errors[0] if errors else _nothing_named(config)
    checks: dict[int, bytearray] = {}
    try:
        _check_named(backing, config, opened, checks, None)
        return config, bytearray(checks[min(checks)])
    finally:
        for provider in opened.values():
            provider.close()
        for value in checks.values():
            wipe(value)


def _volume_key(config: VolumeConfig, checks: dict[int, bytearray]) -> bytearray | None:
    """The volume key (a copy); ConfigTampered if two checks disagree.  None for format 1."""
    if not config.authenticated_format:
        return None
    first = checks[min(checks)]
    for index, value in checks.items():
        if not hmac.compare_digest(bytes(value), bytes(first)):
            raise ConfigTampered(
                f"{CONFIG_NAME}: keys[{index}] ({config.keys[index].describe()}) wraps another"
                " volume key than the others: the config was assembled from other volumes",
                changed=[f"keys[{index}]"],
            )
    return bytearray(first)


def find_volume_root(path: str | os.PathLike[str]) -> Path:
    """The nearest directory at or above *path* holding a volume config."""
    current = Path(path).absolute()
    if not current.is_dir():
        current = current.parent
    for candidate in [current, *current.parents]:
        if config_path(candidate).exists():
            return candidate
    raise ConfigError(f"{path} is not inside a kmsfs volume (no {CONFIG_NAME} above it)")
