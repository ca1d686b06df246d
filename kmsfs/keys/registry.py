"""Builds providers for init and mount from the table of providers.

``kmsfs.keys.settings.PROVIDERS`` names each provider's settings and the
module of its SDK part, whose ``ENTRY`` (a ProviderEntry) has ``create``
(init: find or make the master key) and ``open`` (mount); both receive the
provider's typed settings from this host.  Modules that need optional SDKs
are imported only when their provider is used.  Which setting gives which
recorded hint, and which hints are required, compared or name the key, is
declared with each setting (``kmsfs.keys.settings.Setting``).

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
from typing import TYPE_CHECKING, Any

from kmsfs.errors import ConfigError, WrongKeyError
from kmsfs.keys.settings import PROVIDERS, HostOptions, ProviderDecl, ProviderEntry

if TYPE_CHECKING:  # nothing heavy at import
    from kmsfs.format.volume_config import KeyConfig
    from kmsfs.keys.provider import KeyProvider
    from kmsfs.keys.secrets import Prompt

TRUST_FLAG = "--trust-volume-settings"


def provider_info(name: str) -> ProviderDecl:
    """ConfigError naming the known providers if *name* is not one."""
    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ConfigError(f"unknown key provider {name!r} (known: {known})") from None


def provider_entry(name: str) -> ProviderEntry:
    """The SDK part of provider *name*; ConfigError if unknown or not installed."""
    info = provider_info(name)
    try:
        module = importlib.import_module(info.module)
    except ImportError as exc:
        raise ConfigError(
            f"provider {name} needs a missing package ({exc.name}):"
            f" pip install 'kmsfs[{info.extra}]'"
        ) from None
    entry = module.ENTRY
    if not isinstance(entry, ProviderEntry):
        raise TypeError(f"{info.module}.ENTRY is not a ProviderEntry")
    return entry


def create_provider(name: str, options: HostOptions, prompt: Prompt | None) -> KeyProvider:
    """A provider for a new volume (may create the master key, as options ask)."""
    return provider_entry(name).create(options.of(name), prompt)


def host_names(key: KeyConfig, options: HostOptions) -> bool:
    """True if this host's options name a key of *key*'s provider (or none is needed:
    a passphrase key is unlocked by the passphrase alone)."""
    provider_info(key.provider)
    settings = options.of(key.provider)
    if any(value for _, declared, value in settings.given() if declared.names_key):
        return True
    return key.provider == "local" and "passphrase" in key.settings and not settings.key_file


def option_flag(option: str, options: HostOptions | None = None) -> str:
    """The command-line flag giving *option* (tools may rename them: ``flag_names``)."""
    renamed = options.flag_names if options is not None else {}
    return renamed.get(option) or "--" + option.replace("_", "-")


def host_settings(key: KeyConfig, options: HostOptions, trusted: bool) -> dict[str, Any]:
    """The recorded settings to open *key* with.

    Trusted: the recorded hints (this host's options still override them).
    Not trusted: the hints less those the host must give; ConfigError naming
    the option for a required one the host did not give, and for a compared
    one whose host value differs from the recorded one (both values named).
    """
    info = provider_info(key.provider)
    if trusted:
        return dict(key.settings)
    settings = options.of(key.provider)
    passphrase_key = key.provider == "local" and "passphrase" in key.settings
    hinted = [(name, s) for name, s in settings.declared() if s.hint is not None]
    for name, declared in hinted:
        hint = declared.hint
        recorded = key.settings.get(hint)
        given = getattr(settings, name)
        changed = declared.compared and given and recorded and given != recorded
        if changed and not options.accept_changed_hints:
            flag = option_flag(declared.option, options)
            raise ConfigError(
                f"{key.describe()}: this host gives {hint} {given!r} ({flag}) but"
                f" the volume records {recorded!r}; if this host is right, record it with"
                f" 'kmsfs keys update BACKING {key.key_ref}' and this host's options"
            )
        missing = declared.required and not given and recorded
        if missing and not (passphrase_key and hint == "key_file"):
            raise ConfigError(
                f"{key.describe()}: give {option_flag(declared.option, options)} on the command"
                f" line or in the TOML volume config (the volume records {hint} {recorded!r}: use"
                f" it only if it is this host's); settings read from the backing directory are"
                f" not used to find keys unless you pass {TRUST_FLAG}"
            )
    other_key = any(
        getattr(settings, name) != key.settings.get(declared.hint)
        for name, declared in hinted
        if declared.identity
    )
    if other_key:
        return {}
    return {name: value for name, value in key.settings.items() if name not in info.host_settings}


def open_provider(
    key: KeyConfig, options: HostOptions, prompt: Prompt | None, trusted: bool = False
) -> KeyProvider:
    """The provider for one master key of an existing volume (see ``host_settings``).

    Raises ConfigError as ``host_settings`` says, WrongKeyError if the key the
    options lead to is not the recorded one, and the provider's own errors.
    """
    recorded = host_settings(key, options, trusted)
    provider = provider_entry(key.provider).open(recorded, options.of(key.provider), prompt)
    if provider.key_ref != key.key_ref:
        provider.close()
        raise WrongKeyError(
            f"wrong key: the {key.provider} key given is {provider.key_ref},"
            f" this volume's key is {key.key_ref}"
        )
    return provider
