"""Finds provider modules by name and builds providers for init and mount.

Each provider module has ``create(options, prompt)`` (init: find or make the
master key) and ``open_provider(settings, options, prompt)`` (mount).  Modules
that need optional SDKs are imported only when their provider is used.

Host settings and recorded hints (docs/FORMAT.md, "Threat model"): what a
provider loads, contacts or reads as a path (PKCS#11 module, KMS endpoint,
key file) comes from this host's options (command line, TOML volume config).
The settings recorded in the volume config are *hints*: ``open_provider``
passes them to the provider only when the caller says they are trusted
(the config was authenticated, or the operator passed
``--trust-volume-settings``); otherwise a hint that the host must supply is
named in the error, and a host value that differs from a compared hint is
refused with both values.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kmsfs.errors import ConfigError, WrongKeyError

if TYPE_CHECKING:  # the command line reads PROVIDER_NAMES: nothing heavy at import
    from kmsfs.format.volume_config import KeyConfig
    from kmsfs.keys.provider import KeyProvider
    from kmsfs.keys.secrets import Prompt

TRUST_FLAG = "--trust-volume-settings"


@dataclass(frozen=True)
class ProviderInfo:
    """How to load a provider and which of its settings belong to the host.

    Attributes:
        module: the module implementing it.
        extra: the pip extra that installs its SDK (None: no SDK).
        host_settings: recorded hint -> option name giving it on this host.
        required: hints the host must give when hints are not trusted.
        compared: hints refused when the host gives another value.
        names_key: options that, given on this host, name a key of this provider.
        identity: hints naming the key itself; when the host names another key, the
            other hints (CKA_ID, mechanism...) describe a different key and are dropped.
    """

    module: str
    extra: str | None
    host_settings: dict[str, str]
    required: tuple[str, ...]
    compared: tuple[str, ...]
    names_key: tuple[str, ...]
    identity: tuple[str, ...] = ()


PROVIDERS: dict[str, ProviderInfo] = {
    "local": ProviderInfo(
        "kmsfs.keys.local",
        None,
        {"key_file": "key_file"},
        required=("key_file",),
        compared=(),
        names_key=("key_file", "passphrase_file"),
    ),
    "aws-kms": ProviderInfo(
        "kmsfs.keys.aws_kms",
        "aws",
        {
            "key_arn": "kms_key_id",
            "region": "kms_region",
            "endpoint_url": "kms_endpoint_url",
            "profile": "kms_profile",
        },
        required=("key_arn", "endpoint_url"),
        compared=("region", "endpoint_url", "profile"),
        names_key=("kms_key_id",),
    ),
    "pkcs11": ProviderInfo(
        "kmsfs.keys.pkcs11",
        "pkcs11",
        {"module": "pkcs11_module", "token": "pkcs11_token", "key": "pkcs11_key"},
        required=("module", "token", "key"),
        compared=("module",),
        names_key=("pkcs11_module", "pkcs11_token", "pkcs11_key"),
        identity=("token", "key"),
    ),
}
PROVIDER_NAMES = tuple(PROVIDERS)


def provider_info(name: str) -> ProviderInfo:
    """ConfigError naming the known providers if *name* is not one."""
    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ConfigError(f"unknown key provider {name!r} (known: {known})") from None


def provider_module(name: str) -> ModuleType:
    """The module implementing provider *name*; ConfigError if unknown or not installed."""
    info = provider_info(name)
    try:
        return importlib.import_module(info.module)
    except ImportError as exc:
        raise ConfigError(
            f"provider {name} needs a missing package ({exc.name}):"
            f" pip install 'kmsfs[{info.extra}]'"
        ) from None


def create_provider(name: str, options: dict[str, Any], prompt: Prompt | None) -> KeyProvider:
    """A provider for a new volume (may create the master key, as options ask)."""
    provider: KeyProvider = provider_module(name).create(options, prompt)
    return provider


def host_names(key: KeyConfig, options: dict[str, Any]) -> bool:
    """True if this host's options name a key of *key*'s provider (or none is needed:
    a passphrase key is unlocked by the passphrase alone)."""
    info = provider_info(key.provider)
    if any(options.get(name) for name in info.names_key):
        return True
    return key.provider == "local" and "passphrase" in key.settings and not options.get("key_file")


def option_flag(option: str, options: dict[str, Any] | None = None) -> str:
    """The command-line flag giving *option* (tools may rename them: ``flag_names``)."""
    renamed: dict[str, str] = (options or {}).get("flag_names") or {}
    return renamed.get(option) or "--" + option.replace("_", "-")


def host_settings(key: KeyConfig, options: dict[str, Any], trusted: bool) -> dict[str, Any]:
    """The settings to open *key* with.

    Trusted: the recorded hints (this host's options still override them).
    Not trusted: the hints less those the host must give; ConfigError naming
    the option for a required one the host did not give, and for a compared
    one whose host value differs from the recorded one (both values named).
    """
    info = provider_info(key.provider)
    if trusted:
        return dict(key.settings)
    passphrase_key = key.provider == "local" and "passphrase" in key.settings
    for hint, option in info.host_settings.items():
        recorded = key.settings.get(hint)
        given = options.get(option)
        changed = hint in info.compared and given and recorded and given != recorded
        if changed and not options.get("accept_changed_hints"):
            flag = option_flag(option, options)
            raise ConfigError(
                f"{key.describe()}: this host gives {hint} {given!r} ({flag}) but"
                f" the volume records {recorded!r}; if this host is right, record it with"
                f" 'kmsfs keys update BACKING {key.key_ref}' and this host's options"
            )
        missing = hint in info.required and not given and recorded
        if missing and not (passphrase_key and hint == "key_file"):
            raise ConfigError(
                f"{key.describe()}: give {option_flag(option, options)} on the command line or"
                f" in the TOML volume config (the volume records {hint} {recorded!r}: use it"
                f" only if it is this host's); settings read from the backing directory are not"
                f" used to find keys unless you pass {TRUST_FLAG}"
            )
    other_key = any(
        options.get(info.host_settings[hint]) != key.settings.get(hint) for hint in info.identity
    )
    if other_key:
        return {}
    return {name: value for name, value in key.settings.items() if name not in info.host_settings}


def open_provider(
    key: KeyConfig, options: dict[str, Any], prompt: Prompt | None, trusted: bool = False
) -> KeyProvider:
    """The provider for one master key of an existing volume (see ``host_settings``).

    Raises ConfigError as ``host_settings`` says, WrongKeyError if the key the
    options lead to is not the recorded one, and the provider's own errors.
    """
    settings = host_settings(key, options, trusted)
    provider: KeyProvider = provider_module(key.provider).open_provider(settings, options, prompt)
    if provider.key_ref != key.key_ref:
        provider.close()
        raise WrongKeyError(
            f"wrong key: the {key.provider} key given is {provider.key_ref},"
            f" this volume's key is {key.key_ref}"
        )
    return provider
