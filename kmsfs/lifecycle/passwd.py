"""Changing the passphrase of a local passphrase key (the master key stays the same).

Only the volume config changes: ``settings.passphrase`` (new salt, the master
key wrapped under the new Argon2id key) and the volume key, replaced as for
any change of who can open the volume (``rotate_volume_key``: every key of
the volume wraps the new one, so all of them must open on this host).  No
header is touched and the change is one atomic config write.  The master key
itself is unchanged: someone who had the old passphrase *and* a copy of the
old config can still derive it, and with it unwrap the new volume key.  To
replace the master key, use ``kmsfs rewrap`` (a new passphrase key or a new
key file), which re-wraps every file key.
"""

from __future__ import annotations

from pathlib import Path

from kmsfs.errors import UsageError, WrongKeyError
from kmsfs.format.volume_config import load_config
from kmsfs.keys import local
from kmsfs.keys.secrets import Prompt, get_text_secret
from kmsfs.keys.settings import HostOptions
from kmsfs.volume_open import open_volume
from kmsfs.volume_writes import rotate_volume_key


def change_passphrase(
    backing: Path, old_file: str | None, new_file: str | None, prompt: Prompt | None
) -> str:
    """Re-wrap the local master key under a new passphrase; returns its key_ref.

    Raises UsageError for a volume without a passphrase key, WrongKeyError for
    a wrong passphrase, ConfigTampered if the volume config fails authentication,
    PinMismatch if it is not what this host pinned, ConfigError if another key of
    the volume cannot be opened to wrap the new volume key.
    """
    keys = [
        k for k in load_config(backing).keys if k.provider == "local" and "passphrase" in k.settings
    ]
    if not keys:
        raise UsageError(
            "this volume has no passphrase key; to move a key-file volume to a new key file,"
            " run 'kmsfs rewrap BACKING --key-file NEW_KEY_FILE'"
        )
    old = get_text_secret(old_file, "kmsfs-passphrase", "current passphrase", prompt)
    master = local.unlock_master(keys[0].settings["passphrase"], old)
    ref = local.LocalProvider(master, {}).key_ref
    config, keyring = open_volume(
        backing,
        HostOptions.parse({"passphrase_file": old_file}),
        lambda _text, _confirm: old,
        migrate=True,
    )
    try:
        key = next((k for k in config.keys if k.key_ref == ref), None)
        if key is None:
            raise WrongKeyError("the passphrase opens a master key that is not this volume's")
        new = get_text_secret(new_file, "kmsfs-new-passphrase", "new passphrase", prompt, True)
        key.settings["passphrase"] = local.wrap_master(master, new)
        rotate_volume_key(backing, config, keyring)
    finally:
        keyring.close()
    return key.key_ref
