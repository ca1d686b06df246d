"""Recording this host's settings as a key's hints in the volume config (``kmsfs keys update``).

The hints are what ``keys list`` shows and what mount compares with the
host's options; when a key file moves or a KMS endpoint changes, the operator
records the new values here.  The key is opened with the host's options
first, so only settings that reach that very key are recorded, and the config
is re-tagged under the volume key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from kmsfs.errors import UsageError
from kmsfs.keys.cache import NullCache
from kmsfs.keys.secrets import Prompt
from kmsfs.keys.settings import HostOptions, host_options
from kmsfs.volume_open import open_volume
from kmsfs.volume_writes import save_volume_config


def update_hints(
    backing: str | os.PathLike[str],
    key_ref: str,
    options: HostOptions | Mapping[str, Any],
    prompt: Prompt | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace *key_ref*'s recorded settings by what this host's *options* lead to.

    The volume is opened (authenticated) with the trusted recorded settings of
    its other keys only after one key named by *options* verified it.  Returns
    (old settings, new settings).  Raises UsageError if *key_ref* is not a key
    of the volume, and the errors of ``open_volume`` and ``open_provider``.
    """
    accepting = dataclasses.replace(host_options(options), accept_changed_hints=True)
    config, keyring = open_volume(backing, accepting, prompt, NullCache(), migrate=True)
    try:
        key = next((k for k in config.keys if k.key_ref == key_ref), None)
        if key is None:
            refs = ", ".join(k.key_ref for k in config.keys)
            raise UsageError(f"{key_ref} is not a key of this volume (keys: {refs})")
        provider = next((p for p in keyring.providers if p.key_ref == key_ref), None)
        if provider is None:
            raise UsageError(f"this host's options do not open {key_ref}: give that key's options")
        old, new = dict(key.settings), provider.settings()
        key.settings = new
        save_volume_config(backing, config, keyring)
    finally:
        keyring.close()
    return old, new
