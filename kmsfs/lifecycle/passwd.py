"""Changing the passphrase of a local passphrase key (the master key stays the same).

Only ``settings.passphrase`` in the volume config changes (new salt, the
master key wrapped under the new Argon2id key), so no header is touched and
the change is one atomic config write.  The master key itself is unchanged:
someone who had the old passphrase *and* a copy of the old config can still
derive it.  To replace the master key, use ``kmsfs rewrap`` (a new passphrase
key or a new key file), which re-wraps every file key.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.errors import ConfigError, UsageError, WrongKeyError
from kmsfs.format.volume import load_config, save_config
from kmsfs.keys import local
from kmsfs.keys.secrets import Prompt, get_text_secret

_AAD = b"kmsfs/v1/passphrase"


def change_passphrase(
    backing: Path, old_file: str | None, new_file: str | None, prompt: Prompt | None
) -> str:
    """Re-wrap the local master key under a new passphrase; returns its key_ref."""
    config = load_config(backing)
    keys = [k for k in config.keys if k.provider == "local" and "passphrase" in k.settings]
    if not keys:
        raise UsageError(
            "this volume has no passphrase key; to move a key-file volume to a new key file,"
            " run 'kmsfs rewrap BACKING --key-file NEW_KEY_FILE'"
        )
    key = keys[0]
    stored = key.settings["passphrase"]
    try:
        params = {name: int(stored[name]) for name in local.ARGON2_DEFAULTS}
        salt = base64.b64decode(stored["salt"], validate=True)
        wrapped = base64.b64decode(stored["wrapped_master"], validate=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"volume config: passphrase settings are malformed ({exc})") from None
    old = get_text_secret(old_file, "kmsfs-passphrase", "current passphrase", prompt)
    try:
        master = AESGCM(local._argon2(old, salt, params)).decrypt(
            wrapped[: local.NONCE_SIZE], wrapped[local.NONCE_SIZE :], _AAD
        )
    except InvalidTag:
        raise WrongKeyError("wrong passphrase for this volume") from None
    new = get_text_secret(new_file, "kmsfs-new-passphrase", "new passphrase", prompt, True)
    params = dict(local.ARGON2_DEFAULTS)
    new_salt = os.urandom(16)
    nonce = os.urandom(local.NONCE_SIZE)
    rewrapped = nonce + AESGCM(local._argon2(new, new_salt, params)).encrypt(nonce, master, _AAD)
    if local.LocalProvider(master, {}).key_ref != key.key_ref:
        raise WrongKeyError("the passphrase opens a master key that is not this volume's")
    key.settings["passphrase"] = {
        "kdf": "argon2id",
        **params,
        "salt": base64.b64encode(new_salt).decode(),
        "wrapped_master": base64.b64encode(rewrapped).decode(),
    }
    save_config(backing, config)
    return key.key_ref
