"""Finds provider modules by name and builds providers for init and mount.

Each provider module has ``create(options, prompt)`` (init: find or make the
master key) and ``open_provider(settings, options, prompt)`` (mount).  Modules
that need optional SDKs are imported only when their provider is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from kmsfs.errors import ConfigError, WrongKeyError
from kmsfs.format.volume import KeyConfig
from kmsfs.keys.provider import KeyProvider
from kmsfs.keys.secrets import Prompt

PROVIDER_MODULES = {
    "local": ("kmsfs.keys.local", None),
    "aws-kms": ("kmsfs.keys.aws_kms", "aws"),
    "pkcs11": ("kmsfs.keys.pkcs11", "pkcs11"),
}


def provider_module(name: str) -> ModuleType:
    """The module implementing provider *name*; ConfigError if unknown or not installed."""
    try:
        module_name, extra = PROVIDER_MODULES[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDER_MODULES))
        raise ConfigError(f"unknown key provider {name!r} (known: {known})") from None
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"provider {name} needs a missing package ({exc.name}): pip install 'kmsfs[{extra}]'"
        ) from None


def create_provider(name: str, options: dict[str, Any], prompt: Prompt | None) -> KeyProvider:
    """A provider for a new volume (may create the master key, as options ask)."""
    provider: KeyProvider = provider_module(name).create(options, prompt)
    return provider


def open_provider(key: KeyConfig, options: dict[str, Any], prompt: Prompt | None) -> KeyProvider:
    """The provider for one master key of an existing volume.

    Raises WrongKeyError if the key the options lead to is not the recorded one.
    """
    provider: KeyProvider = provider_module(key.provider).open_provider(
        key.settings, options, prompt
    )
    if provider.key_ref != key.key_ref:
        provider.close()
        raise WrongKeyError(
            f"wrong key: the {key.provider} key given is {provider.key_ref},"
            f" this volume's key is {key.key_ref}"
        )
    return provider
