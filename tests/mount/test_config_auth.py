"""The volume config is authenticated, and nothing in it is loaded, contacted or read as a
key file before it is (docs/FORMAT.md "Threat model").

Each test is an attack by someone who can write the backing directory but holds
no master key: they edit ``.kmsfs.json`` with values they computed themselves
(a key-check value made with their own key for the victim's volume ID), and the
test checks that mount and the tools refuse, name what changed, and never load
the planted module, contact the planted endpoint or use the planted key.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.planted import Listener, build_planted_module
from support.saved_volume import check_saved_plaintext, restore_saved_volume
from support.volumes import Volume, make_volume

from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.format.volume_config import load_config
from kmsfs.keys.local import LocalProvider, write_new_key_file
from kmsfs.keys.provider import KeyContext


def config_of(volume: Volume) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((volume.backing / ".kmsfs.json").read_text())
    return data


def write_config(volume: Volume, data: dict[str, Any]) -> None:
    (volume.backing / ".kmsfs.json").write_text(json.dumps(data, indent=2))


def attacker_entry(volume: Volume, tmp_path: Path, **settings: Any) -> dict[str, Any]:
    """A local key entry the attacker made with their own key, with a valid key check."""
    key_file = tmp_path / "attacker.key"
    master = write_new_key_file(key_file)
    provider = LocalProvider(master, {})
    volume_id = bytes.fromhex(config_of(volume)["volume_id"])
    check = provider.wrap(os.urandom(32), KeyContext.key_check(volume_id))
    return {
        "provider": "local",
        "key_ref": provider.key_ref,
        "settings": {"key_file": str(key_file), **settings},
        "check": base64.b64encode(check.blob).decode(),
    }


@pytest.fixture
def planted_module(tmp_path: Path) -> tuple[Path, Path]:
    return build_planted_module(tmp_path)


@pytest.fixture
def listener() -> Iterator[Listener]:
    planted = Listener()
    yield planted
    planted.close()


def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 5, result.stderr
    assert "was changed by someone without a master key" in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# -- the attacks of the review ------------------------------------------------


@requires_fuse
def test_added_local_key_with_a_valid_check_is_refused(volume: Volume, tmp_path: Path) -> None:
    data = config_of(volume)
    data["keys"].append(attacker_entry(volume, tmp_path))
    write_config(volume, data)
    refused(volume.mount(check=False), "keys[1]", "added or edited")
    assert not volume.mounted
    # and with the attacker's recorded key file trusted, still refused: the tags fail
    refused(volume.mount("--trust-volume-settings", check=False), "keys[1]")


@requires_fuse
def test_added_pkcs11_entry_module_is_never_loaded(
    volume: Volume, tmp_path: Path, planted_module: tuple[Path, Path]
) -> None:
    library, marker = planted_module
    data = config_of(volume)
    entry = attacker_entry(volume, tmp_path)
    entry.update(
        provider="pkcs11",
        key_ref="pkcs11:token=t;object=k;id=%01;type=secret-key",
        settings={"module": str(library), "token": "t", "key": "k"},
    )
    data["keys"].append(entry)
    write_config(volume, data)
    pin = tmp_path / "pin"
    pin.write_text("1234")
    pin.chmod(0o600)
    result = volume.mount("--key-file", str(volume.key_file), "--pkcs11-pin-file", str(pin),
                          check=False)  # fmt: skip
    assert not marker.exists(), "the planted PKCS#11 module was loaded"
    refused(result, "keys[1]")
    for tool in (["fsck", volume.backing], ["keys", "remove", volume.backing, entry["key_ref"]]):
        result = run_kmsfs(*tool, *volume.key_args, "--pkcs11-pin-file", pin, check=False)
        refused(result, "keys[1]")
    assert not marker.exists(), "the planted PKCS#11 module was loaded"


@requires_fuse
def test_added_kms_entry_endpoint_is_never_contacted(
    volume: Volume, tmp_path: Path, listener: Listener
) -> None:
    data = config_of(volume)
    entry = attacker_entry(volume, tmp_path)
    arn = "arn:aws:kms:us-east-1:111122223333:key/0000aaaa-0000-0000-0000-000000000000"
    entry.update(
        provider="aws-kms",
        key_ref=arn,
        settings={"key_arn": arn, "region": "us-east-1", "endpoint_url": listener.url},
    )
    data["keys"].append(entry)
    write_config(volume, data)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    volume.env = env
    result = volume.mount(check=False)
    assert listener.connections == 0, "the planted KMS endpoint was contacted"
    refused(result, "keys[1]")
    refused(volume.mount("--trust-volume-settings", check=False), "keys[1]")
    result = run_kmsfs("fsck", volume.backing, *volume.key_args, env=env, check=False)
    refused(result, "keys[1]")
    assert listener.connections == 0, "the planted KMS endpoint was contacted"


@requires_fuse
def test_edited_block_size_is_refused(volume: Volume) -> None:
    volume.mount()
    volume.path("f").write_bytes(b"x" * 10_000)
    volume.umount()
    data = config_of(volume)
    data["block_size"] = 8192
    write_config(volume, data)
    refused(volume.mount(check=False), "block_size (now 8192)")
    result = run_kmsfs("decrypt", volume.backing / "f", volume.root / "out", *volume.key_args,
                       check=False)  # fmt: skip
    refused(result, "block_size")


@requires_fuse
def test_removed_or_reordered_key_entry_is_refused(volume: Volume, tmp_path: Path) -> None:
    second = tmp_path / "second.key"
    run_kmsfs("keys", "add", volume.backing, "--key-file", second, "--old-key-file",
              volume.key_file, "--quiet")  # fmt: skip
    good = config_of(volume)
    reordered = dict(good, keys=list(reversed(good["keys"])))
    write_config(volume, reordered)
    refused(volume.mount(check=False), "order")
    removed = dict(good, keys=good["keys"][:1])
    write_config(volume, removed)
    refused(volume.mount(check=False), "removed")
    write_config(volume, good)
    volume.mount()


@requires_fuse
def test_downgrade_to_format_1_is_refused(volume: Volume) -> None:
    """Without tags a format-1 config is not authenticated: a format-2 one must not pass as one."""
    data = config_of(volume)
    data["kmsfs_volume"] = 1
    data.pop("tags")
    for key in data["keys"]:
        key.pop("tag")
    data["block_size"] = 8192
    write_config(volume, data)
    result = volume.mount(check=False)
    assert result.returncode in (5, 6), result.stderr
    assert "not this volume's key" in result.stderr or "downgrade" in result.stderr
    assert not volume.mounted


@pytest.mark.nomount
def test_passphrase_cost_parameters_are_bounded(tmp_path: Path) -> None:
    """A planted config cannot make mount allocate 4 TiB for Argon2."""
    vol = make_volume(tmp_path, key=False)
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse")
    passphrase.chmod(0o600)
    run_kmsfs("init", vol.backing, "--passphrase-file", passphrase)
    data = config_of(vol)
    data["keys"][0]["settings"]["passphrase"]["memory_kib"] = 1 << 32
    write_config(vol, data)
    result = run_kmsfs("fsck", vol.backing, "--passphrase-file", passphrase, check=False)
    assert result.returncode == 3
    assert "memory_kib is 4294967296, want an integer 8..4194304" in result.stderr


# -- where keys are found: this host, not the backing directory ---------------


@requires_fuse
def test_recorded_key_file_is_not_used_without_the_host_naming_it(volume: Volume) -> None:
    result = volume.mount(check=False)  # with the key_args this host gives
    assert result.returncode == 0
    volume.umount()
    bare = run_kmsfs("mount", volume.backing, volume.mountpoint, check=False)
    assert bare.returncode == 3
    assert bare.stderr.count("\n") == 1  # one line, printed once
    assert f"give --key-file {volume.key_file}" in bare.stderr
    assert "--trust-volume-settings" in bare.stderr
    # the convenient path: one flag, for a backing directory nobody else can write
    trusted = run_kmsfs("mount", volume.backing, volume.mountpoint, "--trust-volume-settings")
    assert trusted.returncode == 0
    volume.mounted = True


@pytest.mark.nomount
@requires_fuse
def test_host_setting_that_differs_from_the_recorded_one_is_refused(
    tmp_path: Path, listener: Listener
) -> None:
    """Compared hints (KMS endpoint, PKCS#11 module): both values named, and keys update
    records the host's after checking that they open the same key."""
    from kmsfs.format.volume_config import KeyConfig
    from kmsfs.keys.registry import host_settings
    from kmsfs.keys.settings import HostOptions

    key = KeyConfig("aws-kms", "arn:x", {"key_arn": "arn:x", "endpoint_url": "http://a"}, b"")
    with pytest.raises(Exception, match=r"gives endpoint_url 'http://b' .* records 'http://a'"):
        host_settings(
            key, HostOptions.parse({"kms_key_id": "arn:x", "kms_endpoint_url": "http://b"}), False
        )
    with pytest.raises(
        Exception, match=r"give --kms-endpoint-url .* records endpoint_url 'http://a'"
    ):
        host_settings(key, HostOptions.parse({"kms_key_id": "arn:x"}), False)
    same = HostOptions.parse({"kms_key_id": "arn:x", "kms_endpoint_url": "http://a"})
    assert host_settings(key, same, False) == {}


@requires_fuse
def test_keys_update_records_a_moved_key_file(volume: Volume, tmp_path: Path) -> None:
    moved = tmp_path / "moved.key"
    moved.write_bytes(volume.key_file.read_bytes())
    moved.chmod(0o600)
    volume.key_file.unlink()
    ref = load_config(volume.backing).keys[0].key_ref
    result = run_kmsfs("keys", "update", volume.backing, ref, "--key-file", moved)
    assert f"key_file: '{volume.key_file}' -> '{moved}'" in result.stdout
    assert load_config(volume.backing).keys[0].settings["key_file"] == str(moved)
    trusted = run_kmsfs("mount", volume.backing, volume.mountpoint, "--trust-volume-settings")
    assert trusted.returncode == 0
    volume.mounted = True


def test_toml_config_writable_by_others_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "vol.toml"
    toml.write_text('backing = "/srv/enc"\n')
    toml.chmod(0o666)
    result = run_kmsfs("mount", "--config", toml, check=False)
    assert result.returncode == 3
    assert f"config file {toml} is writable by group or others (mode 666)" in result.stderr
    assert f"chmod go-w {toml}" in result.stderr


@pytest.mark.nomount
def test_init_makes_the_backing_root_0700(tmp_path: Path) -> None:
    backing = tmp_path / "new-backing"
    run_kmsfs("init", backing, "--key-file", tmp_path / "k.key")
    assert backing.stat().st_mode & 0o777 == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    run_kmsfs("init", existing, "--key-file", tmp_path / "k2.key")
    assert existing.stat().st_mode & 0o777 == 0o700


# -- formats 1 and 2: saved volumes of earlier versions keep mounting, migrate, get pinned --


SAVED = ["format1-local", "format1-passphrase", "format2-local", "format2-passphrase"]


@requires_fuse
@pytest.mark.parametrize("name", SAVED)
def test_saved_volume_mounts_migrates_and_is_pinned(name: str, tmp_path: Path) -> None:
    """Volumes written by earlier versions (config formats 1 and 2) open as they are with
    read-only tools, are migrated to format 3 by mount, pinned, and pass fsck."""
    from kmsfs.pins import read_pin

    vol, saved, args = restore_saved_volume(name, tmp_path)
    version = saved["format"]
    assert load_config(vol.backing).version == version
    # read-only tools open it as it is (no migration); a format-2 volume is pinned then
    out = tmp_path / "hello.out"
    result = run_kmsfs("decrypt", vol.backing / "hello.txt", out, *args)
    assert out.read_bytes() == base64.b64decode(saved["plaintext"]["hello.txt"])
    assert load_config(vol.backing).version == version
    before = read_pin(vol.backing)
    if version == 1:
        assert before is None  # no volume key to pin yet
    else:
        assert before is not None and (before.format, before.generation) == (2, 0)
        assert "pinned volume" in result.stderr and "on first use" in result.stderr
    try:
        vol.mount()
        check_saved_plaintext(vol, saved)
        assert f"from format {version} to format 3" in vol.log_text()
        config = load_config(vol.backing)
        assert (config.version, config.generation, config.chain) == (3, 1, [])
        assert config.tags
        pin = read_pin(vol.backing)
        assert pin is not None and (pin.format, pin.generation) == (3, 1)
        assert pin.volume_id == config.volume_id
        if before is not None:  # the same volume key: migration keeps the fingerprint
            assert pin.fingerprint == before.fingerprint
        vol.path("new.txt").write_bytes(b"written after migration")
        vol.remount()
        check_saved_plaintext(vol, saved)
        assert vol.path("new.txt").read_bytes() == b"written after migration"
    finally:
        vol.umount()
    header = FileHeader.parse(os.getxattr(vol.backing / "hello.txt", XATTR_NAME))
    assert header.volume_id == config.volume_id  # headers untouched by the migration
    assert run_kmsfs("fsck", vol.backing, *args).returncode == 0
