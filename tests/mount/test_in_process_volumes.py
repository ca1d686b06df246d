"""The unit tier makes its volumes in process (``make_volume(in_process=True)``): they
must be what ``kmsfs init`` makes, or the in-process tests would test another volume.
``kmsfs init`` runs as a command, a process of its own; nothing is mounted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.volumes import make_volume

from kmsfs.format.volume_config import load_config
from kmsfs.pins import read_pin
from kmsfs.volume_open import open_volume

pytestmark = pytest.mark.nomount


@pytest.mark.parametrize("names", ["plain", "encrypted"])
def test_a_volume_made_in_process_is_what_kmsfs_init_makes(tmp_path: Path, names: str) -> None:
    made = {
        how: make_volume(tmp_path / how, names=names, in_process=how == "in-process")
        for how in ("cli", "in-process")
    }
    configs = {how: load_config(vol.backing) for how, vol in made.items()}
    shape = {
        how: (
            c.version,
            c.suite,
            c.block_size,
            c.generation,
            c.encrypted_names,
            [(k.provider, k.key_ref.split(":")[0]) for k in c.keys],  # its own key's ID
            sorted(c.tags),
            len(c.chain),
            sorted(os.listdir(made[how].backing)),
            stat.S_IMODE(os.stat(made[how].backing).st_mode),
            stat.S_IMODE(os.stat(made[how].key_file).st_mode),
            read_pin(made[how].backing) is not None,
        )
        for how, c in configs.items()
    }
    assert shape["in-process"][4] is (names == "encrypted")
    assert shape["in-process"][5] == [("local", "local")]
    assert shape["in-process"] == shape["cli"]
    config, keyring = open_volume(
        made["in-process"].backing, {"key_file": str(made["in-process"].key_file)}
    )
    keyring.close()
    assert config.volume_id == configs["in-process"].volume_id
