"""The volume key's fingerprint, its rotation chain, and config format 3 (no I/O)."""

from __future__ import annotations

import base64
import json
import os

import pytest

from kmsfs.errors import ConfigError, ConfigTampered
from kmsfs.format.volume_config import KeyConfig, VolumeConfig
from kmsfs.format.volume_key import (
    MAX_CHAIN,
    ChainEntry,
    find_in_chain,
    fingerprint,
    parse_chain,
    parse_fingerprint,
    show_fingerprint,
)

VOLUME_ID = bytes(range(16))


def keys(count: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(count)]


def flip_last(data: bytes) -> bytes:
    """*data* with one bit of its last byte changed (whatever that byte is)."""
    return data[:-1] + bytes([data[-1] ^ 1])


def chain_of(volume_keys: list[bytes], first_generation: int = 2) -> list[ChainEntry]:
    """The chain of a volume whose key was volume_keys[0], then [1], ... (one rotation each)."""
    return [
        ChainEntry.seal(new, old, VOLUME_ID, first_generation + index)
        for index, (old, new) in enumerate(zip(volume_keys, volume_keys[1:], strict=False))
    ]


def test_fingerprint_names_the_key_and_the_volume() -> None:
    key = os.urandom(32)
    value = fingerprint(key, VOLUME_ID)
    assert len(value) == 16 and fingerprint(key, VOLUME_ID) == value
    assert fingerprint(key, bytes(16)) != value  # bound to the volume
    shown = show_fingerprint(value)
    assert len(shown) == 39 and shown.count("-") == 7
    assert parse_fingerprint(shown) == value
    assert parse_fingerprint(shown.replace("-", ":").upper()) == value
    assert parse_fingerprint(value.hex()) == value
    for bad in ("", "12ab", value.hex() + "00", "zz" * 16):
        with pytest.raises(ConfigError, match="not a volume-key fingerprint"):
            parse_fingerprint(bad, "--expect-fingerprint")


def test_chain_entry_opens_only_under_the_next_key_and_its_own_binding() -> None:
    old, new = keys(2)
    entry = ChainEntry.seal(new, old, VOLUME_ID, 5)
    assert bytes(entry.open(new, VOLUME_ID)) == old
    assert entry.previous == fingerprint(old, VOLUME_ID)
    bad = [
        (os.urandom(32), entry),  # another key
        (new, ChainEntry(6, entry.previous, entry.sealed)),  # another generation
        (new, ChainEntry(5, fingerprint(new, VOLUME_ID), entry.sealed)),  # another fingerprint
        (new, ChainEntry(5, entry.previous, flip_last(entry.sealed))),  # a flipped byte
    ]
    for later, changed in bad:
        with pytest.raises(ConfigTampered, match="generation"):
            changed.open(later, VOLUME_ID)
    with pytest.raises(ConfigTampered):
        entry.open(new, bytes(16))  # another volume


def test_walking_the_chain_finds_every_earlier_key_and_nothing_else() -> None:
    history = keys(5)
    chain = chain_of(history)
    current = history[-1]
    for index, earlier in enumerate(history[:-1]):
        found = find_in_chain(current, VOLUME_ID, chain, fingerprint(earlier, VOLUME_ID))
        assert found is chain[index]  # the rotation away from that key
    assert find_in_chain(current, VOLUME_ID, chain, fingerprint(os.urandom(32), VOLUME_ID)) is None
    # a chain copied under a volume key the attacker drew proves nothing
    forged = os.urandom(32)
    assert find_in_chain(forged, VOLUME_ID, chain, fingerprint(history[0], VOLUME_ID)) is None
    # nor does one whose last entry seals a key they chose
    chain_b = [*chain[:-1], ChainEntry.seal(current, os.urandom(32), VOLUME_ID, 9)]
    assert find_in_chain(current, VOLUME_ID, chain_b, fingerprint(history[0], VOLUME_ID)) is None


def test_parse_chain_checks_the_form() -> None:
    chain = [entry.to_json() for entry in chain_of(keys(3))]  # generations 2, 3
    assert [e.generation for e in parse_chain(chain, 3, "c")] == [2, 3]
    sealed = chain[0]["sealed"]
    cases = [
        ({}, "chain must be a list"),
        ([chain[1], chain[0]], r"chain\[1\]: generation 2 out of order"),
        (chain, None),
        ([{**chain[0], "extra": 1}], r"chain\[0\]: want an object"),
        ([{**chain[0], "generation": True}], "must be an integer"),
        ([{**chain[0], "previous": "00"}], "previous must be 32 hex digits"),
        ([{**chain[0], "sealed": sealed[:-8]}], "sealed must be base64 of 60 bytes"),
        ([{**chain[0], "sealed": 5}], "sealed must be base64"),
    ]
    for raw, message in cases:
        if message is None:
            with pytest.raises(ConfigError, match="not above the config's generation"):
                parse_chain(raw, 2, "c")
            continue
        with pytest.raises(ConfigError, match=message):
            parse_chain(raw, 9, "c")
    many = [{**chain[0], "generation": n} for n in range(2, MAX_CHAIN + 3)]
    with pytest.raises(ConfigError, match=f"at most {MAX_CHAIN}"):
        parse_chain(many, 100, "c")


def sealed_config(volume_key: bytes, generation: int, chain: list[ChainEntry]) -> VolumeConfig:
    config = VolumeConfig(VOLUME_ID, 4096, [KeyConfig("local", "local:00", {}, b"chk")])
    config.generation, config.chain = generation, chain
    config.seal(volume_key)
    return config


def test_format3_fields_are_tagged() -> None:
    history = keys(3)
    config = sealed_config(history[-1], 7, chain_of(history))
    again = VolumeConfig.loads(config.dumps())
    assert (again.version, again.generation, again.chain) == (3, 7, config.chain)
    again.verify(history[-1])
    data = json.loads(config.dumps())
    edits = {
        "generation (now 9)": lambda d: d.update(generation=9),
        "chain (now [])": lambda d: d.update(chain=[]),
        "kmsfs_volume (now 2)": lambda d: d.update(kmsfs_volume=2, generation=None),
    }
    for changed, edit in edits.items():
        edited = json.loads(json.dumps(data))
        edit(edited)
        if edited.get("generation") is None:
            edited.pop("generation")
            edited.pop("chain")
            edited["tags"].pop("generation")
            edited["tags"].pop("chain")
        with pytest.raises(ConfigTampered, match=changed.split(" (")[0]) as info:
            VolumeConfig.loads(json.dumps(edited)).verify(history[-1])
        assert any(item.startswith(changed.split(" ")[0]) for item in info.value.changed)
    # a tag removed is named too
    untagged = json.loads(json.dumps(data))
    untagged["tags"].pop("chain")
    with pytest.raises(ConfigTampered, match="chain"):
        VolumeConfig.loads(json.dumps(untagged)).verify(history[-1])
    # format 2 knows no generation
    older = json.loads(json.dumps(data))
    older["kmsfs_volume"] = 2
    with pytest.raises(ConfigError, match="unknown fields chain, generation"):
        VolumeConfig.loads(json.dumps(older))


def test_format2_config_becomes_format3_at_generation_1_when_sealed() -> None:
    key = os.urandom(32)
    config = sealed_config(key, 1, [])
    data = json.loads(config.dumps())
    for name in ("generation", "chain"):
        data.pop(name)
        data["tags"].pop(name)
    data["kmsfs_volume"] = 2
    two = VolumeConfig.loads(json.dumps(data))
    assert (two.version, two.generation, two.chain) == (2, 0, [])
    two.seal(key)
    assert (two.version, two.generation) == (3, 1)
    VolumeConfig.loads(two.dumps()).verify(key)
    assert base64.b64decode(json.loads(two.dumps())["tags"]["generation"])
