"""Encrypted names in tests: where a path of a volume lives in its backing directory.

The mapping is kmsfs's own (``EncryptedNames.backing_path``, what ``kmsfs path``
prints), computed in-process with the volume's key file; the tests that check the
construction itself are tests/unit/format/test_names*.py.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from kmsfs.backing.encrypted_names import names_for
from kmsfs.backing.names import PlainNames
from kmsfs.backing.tree import open_root
from kmsfs.volume_open import open_volume

if TYPE_CHECKING:
    from support.volumes import Volume


@cache
def _names(backing: str, key_file: str) -> PlainNames:
    config, keyring = open_volume(backing, {"key_file": key_file})
    try:
        return names_for(config.names, keyring.volume_key, config.volume_id)
    finally:
        keyring.close()


def names_of(volume: Volume) -> PlainNames:
    """The names of *volume* (opened once per backing directory and key file)."""
    return _names(str(volume.backing), str(volume.key_file))


def backing_path(volume: Volume, name: str) -> Path:
    """The backing entry of the path *name* of *volume*."""
    root = open_root(volume.backing)
    try:
        rel = names_of(volume).backing_path(root, os.fsencode(name))
    finally:
        os.close(root)
    return volume.backing / os.fsdecode(rel)
