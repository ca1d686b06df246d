"""The host pin store and the pin checks of ``open_volume``, in-process (no mount).

A "host" is a state directory (``KMSFS_STATE_DIR``); volumes are real backing
directories with local key files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.volumes import make_volume

from kmsfs.errors import ConfigError, ConfigTampered, PinMismatch
from kmsfs.format.volume_config import load_config
from kmsfs.format.volume_key import MAX_CHAIN, fingerprint
from kmsfs.keys.keyring import Keyring
from kmsfs.pins import ROOT_STATE_DIR, Pin, pins_dir, read_pin, state_dir
from kmsfs.volume_open import open_volume
from kmsfs.volume_writes import rotate_volume_key, save_volume_config


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state = tmp_path / "host-a"
    monkeypatch.setenv("KMSFS_STATE_DIR", str(state))
    yield state


def test_state_dir_by_user_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMSFS_STATE_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert state_dir() == ROOT_STATE_DIR
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert state_dir() == Path("/home/u/.state/kmsfs")
    monkeypatch.setenv("XDG_STATE_HOME", "relative")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", "/home/u")
    assert state_dir() == Path("/home/u/.local/state/kmsfs")
    monkeypatch.setenv("KMSFS_STATE_DIR", "/srv/state")
    assert pins_dir() == Path("/srv/state/pins")


def test_pins_are_private_files_named_by_the_real_path(tmp_path: Path, host: Path) -> None:
    vol = make_volume(tmp_path, in_process=True)  # init pins it in this host's state directory
    pin = read_pin(vol.backing)
    assert pin is not None and pin.pinned_by == "init"
    assert (host.stat().st_mode & 0o777, (host / "pins").stat().st_mode & 0o777) == (0o700, 0o700)
    (path,) = (host / "pins").iterdir()
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data["backing"] == str(vol.backing.resolve())
    assert "volume_key" not in path.read_text() and len(data["fingerprint"]) == 32
    link = tmp_path / "link"
    link.symlink_to(vol.backing)
    assert read_pin(link) == pin  # the same backing directory, however it is spelled
    for damage, message in [
        ("{", "damaged"),
        (json.dumps({**data, "generation": -1}), "generation must be an integer"),
        (json.dumps({**data, "pinned_by": "magic"}), "pinned_by"),
        (json.dumps({**data, "backing": "/elsewhere"}), "is for /elsewhere"),
    ]:
        path.write_text(damage)
        with pytest.raises(ConfigError, match=message):
            read_pin(vol.backing)


def open_and_close(backing: Path, key_file: Path, **options: str) -> None:
    _, keyring = open_volume(backing, {"key_file": str(key_file), **options})
    keyring.close()


def test_rotations_are_followed_as_far_as_the_chain_goes(
    tmp_path: Path, host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = make_volume(tmp_path, in_process=True)
    open_and_close(vol.backing, vol.key_file)  # host A pins
    host_b, host_c = tmp_path / "host-b", tmp_path / "host-c"
    for other in (host_b, host_c):
        monkeypatch.setenv("KMSFS_STATE_DIR", str(other))
        open_and_close(vol.backing, vol.key_file)  # first use: generation 1
    monkeypatch.setenv("KMSFS_STATE_DIR", str(host))
    config, keyring = open_volume(vol.backing, {"key_file": str(vol.key_file)})
    try:
        rotate_volume_key(vol.backing, config, keyring)
        monkeypatch.setenv("KMSFS_STATE_DIR", str(host_c))
        open_and_close(vol.backing, vol.key_file)  # host C follows the first rotation
        monkeypatch.setenv("KMSFS_STATE_DIR", str(host))
        for _ in range(MAX_CHAIN):
            rotate_volume_key(vol.backing, config, keyring)
        save_volume_config(vol.backing, config, keyring)
        assert keyring.volume_key is not None
        now = fingerprint(keyring.volume_key, config.volume_id)
    finally:
        keyring.close()
    stored = load_config(vol.backing)
    assert (stored.generation, len(stored.chain)) == (2 + MAX_CHAIN + 1, MAX_CHAIN)
    pin_a = read_pin(vol.backing)
    assert pin_a is not None and (pin_a.fingerprint, pin_a.generation) == (now, stored.generation)
    # host C pinned the key of generation 2: its rotation away is the oldest kept
    monkeypatch.setenv("KMSFS_STATE_DIR", str(host_c))
    open_and_close(vol.backing, vol.key_file)
    followed = read_pin(vol.backing)
    assert followed is not None and followed.fingerprint == now
    assert followed.updated_by == "followed a volume-key rotation"
    # host B pinned generation 1: that rotation is no longer in the chain
    monkeypatch.setenv("KMSFS_STATE_DIR", str(host_b))
    with pytest.raises(PinMismatch, match="no volume-key rotation recorded") as info:
        open_and_close(vol.backing, vol.key_file)
    assert f"kmsfs pin set {vol.backing.resolve()} --key-file {vol.key_file}" in str(info.value)


def test_a_history_that_disagrees_with_the_pin_is_refused(tmp_path: Path, host: Path) -> None:
    """The key this host pinned was replaced at generation g (says the chain), but this host
    saw it at generation g or later: a former holder of that key made one of the two."""
    vol = make_volume(tmp_path, in_process=True)
    config, keyring = open_volume(vol.backing, {"key_file": str(vol.key_file)})
    try:
        for _ in range(3):
            save_volume_config(vol.backing, config, keyring)  # generation 4, same key
        before = read_pin(vol.backing)
        assert before is not None and before.generation == 4
        rotate_volume_key(vol.backing, config, keyring)  # generation 5
    finally:
        keyring.close()
    assert before is not None
    store = host / "pins"
    (path,) = store.iterdir()
    forked = Pin(**{**before.__dict__, "generation": 5})
    path.write_text(json.dumps(forked.to_json()))
    with pytest.raises(PinMismatch, match="replaced at generation 5, but this host pinned it at"):
        open_and_close(vol.backing, vol.key_file)


def test_keyring_volume_key_follows_the_rotation(tmp_path: Path, host: Path) -> None:
    vol = make_volume(tmp_path, in_process=True)
    config, keyring = open_volume(vol.backing, {"key_file": str(vol.key_file)})
    try:
        assert isinstance(keyring, Keyring) and keyring.volume_key is not None
        old = bytes(keyring.volume_key)
        rotate_volume_key(vol.backing, config, keyring)
        assert bytes(keyring.volume_key) != old
        load_config(vol.backing).verify(keyring.volume_key)  # tagged with the new key
        with pytest.raises(ConfigTampered, match="keys"):
            load_config(vol.backing).verify(old)
    finally:
        keyring.close()
