"""The host pin is the trust anchor of a volume (docs/FORMAT.md, "Host pin").

Each attack test is written as the attacker does it: someone who can write the
backing directory, and knows what such a person can know (a public wrapping
key, a master key removed from the volume, an old config from a backup, the
config of another volume of the same key).  The host then runs the command it
always runs; without the pin it accepted the config and the attacker's key
was used for every new file.  The assertions check the refusal (exit 8, both
values named, the re-pin command) and that nothing the attacker wanted happened.

A second host is played by a second state directory (``other_host``): pins are
host state, kept outside the backing directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from support import softhsm
from support.cli import other_host, run_kmsfs
from support.fuse import requires_fuse
from support.saved_volume import restore_saved_volume
from support.volumes import Volume, make_volume

from kmsfs.format.header import XATTR_NAME, FileHeader, WrappedKey
from kmsfs.format.volume_config import KeyConfig, VolumeConfig
from kmsfs.keys.local import LocalProvider, parse_key_file, write_new_key_file
from kmsfs.keys.provider import KeyContext

TOKEN = "kmsfs-pin-test"
PIN_MISMATCH = 8


# -- what an attacker does to the backing directory ---------------------------


def read_config(vol: Volume) -> VolumeConfig:
    return VolumeConfig.loads((vol.backing / ".kmsfs.json").read_text())


def write_config(vol: Volume, text: str) -> None:
    (vol.backing / ".kmsfs.json").write_text(text)


def key_refs_in_headers(vol: Volume) -> set[str]:
    """Every master key that wraps some file key of the volume (read from the headers)."""
    refs: set[str] = set()
    for dirpath, _, names in os.walk(vol.backing):
        if ".kmsfs.d" in Path(dirpath).relative_to(vol.backing).parts:
            continue
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or name.startswith(".kmsfs"):
                continue
            try:
                raw = os.getxattr(path, XATTR_NAME)
            except OSError:
                continue
            refs |= {entry.key_ref for entry in FileHeader.parse(raw).entries}
    return refs


def attacker_key(tmp_path: Path, name: str = "attacker.key") -> tuple[Path, LocalProvider]:
    path = tmp_path / name
    master = write_new_key_file(path)
    return path, LocalProvider(master, {"key_file": str(path)})


def local_entry(provider: LocalProvider, path: Path, volume_id: bytes, volume_key: bytes) -> Any:
    check = provider.wrap(volume_key, KeyContext.key_check(volume_id))
    return KeyConfig("local", provider.key_ref, {"key_file": str(path)}, check.blob)


def reseal(config: VolumeConfig, volume_key: bytes, generation: int) -> str:
    """The attacker's config, tagged with a volume key they know, at a generation above the
    host's (an older kmsfs has no generation: the attribute is then ignored)."""
    config.generation = generation
    config.seal(volume_key)
    return config.dumps()


def mount_and_create(vol: Volume, name: str = "after-attack") -> subprocess.CompletedProcess[str]:
    """Mount as the host always does; if it mounts, a user creates a file (what the attacker
    waits for: its key is wrapped under every key of the config)."""
    result = vol.mount(check=False)
    if result.returncode == 0:
        vol.path(name).write_bytes(b"new data")
        vol.umount()
    return result


def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == PIN_MISMATCH, (result.returncode, result.stderr)
    for word in words:
        assert word in result.stderr, result.stderr


def pin_json(vol: Volume, env: dict[str, str] | None = None) -> dict[str, Any]:
    shown = run_kmsfs("pin", "show", vol.backing, "--json", env=env)
    data: dict[str, Any] = json.loads(shown.stdout)
    return data


# -- class 1: a config authenticated by a volume key the attacker chose -------


@pytest.fixture(scope="module")
def rsa_hsm(tmp_path_factory: pytest.TempPathFactory) -> softhsm.SoftHSM:
    if not softhsm.available():
        pytest.skip("needs SoftHSM2 and python-pkcs11")
    store = softhsm.SoftHSM.create(tmp_path_factory.mktemp("softhsm-pin"))
    store.init_token(TOKEN)
    return store


def rsa_volume(tmp_path: Path, hsm: softhsm.SoftHSM) -> Volume:
    """A PKCS#11 volume whose master key is an RSA key pair (wrapping is public)."""
    label = f"rsa-{uuid.uuid4().hex[:8]}"
    hsm.tool("rsa", TOKEN, softhsm.USER_PIN, label)
    vol = make_volume(tmp_path, key=False)
    vol.env = dict(hsm.env)
    vol.key_args = [
        "--pkcs11-module", softhsm.MODULE, "--pkcs11-token", TOKEN, "--pkcs11-key", label,
        "--pkcs11-pin-file", str(hsm.pin_file()),
    ]  # fmt: skip
    run_kmsfs("init", vol.backing, "--provider", "pkcs11", *vol.key_args, env=vol.env)
    return vol


def test_init_and_keys_add_warn_about_a_key_others_can_wrap_under(
    tmp_path: Path, rsa_hsm: softhsm.SoftHSM
) -> None:
    label = f"rsa-{uuid.uuid4().hex[:8]}"
    rsa_hsm.tool("rsa", TOKEN, softhsm.USER_PIN, label)
    p11 = ["--pkcs11-module", softhsm.MODULE, "--pkcs11-token", TOKEN, "--pkcs11-key", label,
           "--pkcs11-pin-file", str(rsa_hsm.pin_file())]  # fmt: skip
    vol = make_volume(tmp_path)
    result = run_kmsfs("keys", "add", vol.backing, "--provider", "pkcs11", *p11,
                       "--old-key-file", vol.key_file, "-q", env=rsa_hsm.env)  # fmt: skip
    assert "anyone who can read the token's public key (no PIN needed)" in result.stderr
    assert "give --expect-fingerprint" in result.stderr
    (tmp_path / "rsa").mkdir()
    other = make_volume(tmp_path / "rsa", key=False)
    init = run_kmsfs("init", other.backing, "--provider", "pkcs11", *p11, env=rsa_hsm.env)
    assert "anyone who can read the token's public key" in init.stderr
    fingerprint = pin_json(other)["pin"]["fingerprint"]
    assert f"volume-key fingerprint: {fingerprint} (pinned on this host;" in init.stdout


def forge_with_public_key(vol: Volume, hsm: softhsm.SoftHSM, tmp_path: Path) -> LocalProvider:
    """The attack of the review: read the host's RSA public key (no PIN), draw a volume key,
    wrap it under that public key as the host key's check, put the attacker's own local key
    first, and tag the whole config with the attacker's volume key."""
    label = vol.key_args[vol.key_args.index("--pkcs11-key") + 1]
    modulus, exponent = hsm.tool("pubkey", TOKEN, "-", label).split()
    public = RSAPublicNumbers(int(exponent, 16), int(modulus, 16)).public_key()
    config = read_config(vol)
    chosen = os.urandom(32)
    context = KeyContext.key_check(config.volume_id)
    binding = hashlib.sha256(context.aad()).digest()
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    host_entry = config.keys[0]
    host_entry.check = b"\x04" + public.encrypt(chosen + binding, oaep)
    path, attacker = attacker_key(tmp_path)
    config.keys = [local_entry(attacker, path, config.volume_id, chosen), host_entry]
    write_config(vol, reseal(config, chosen, getattr(config, "generation", 0) + 1))
    return attacker


@requires_fuse
def test_config_forged_with_the_public_rsa_key_is_refused(
    tmp_path: Path, rsa_hsm: softhsm.SoftHSM
) -> None:
    vol = rsa_volume(tmp_path, rsa_hsm)  # init pinned it on this host
    vol.mount()
    vol.path("before").write_bytes(b"old data")
    vol.umount()
    attacker = forge_with_public_key(vol, rsa_hsm, tmp_path)
    result = mount_and_create(vol)
    assert attacker.key_ref not in key_refs_in_headers(vol), "a file key was wrapped for them"
    refused(result, "no volume-key rotation recorded in the config leads from it", "pin set")
    assert not vol.path("after-attack").exists()
    fsck = run_kmsfs("fsck", vol.backing, *vol.key_args, env=vol.env, check=False)
    refused(fsck)
    # the operator who runs the printed command without checking is still stopped
    command = result.stderr.split("run: ")[-1].split()
    assert command[:3] == ["kmsfs", "pin", "set"]
    wrong = [*command[1:-1], "0" * 32]  # a fingerprint the operator has from the other host
    attempt = run_kmsfs(*wrong, env=vol.env, check=False)
    refused(attempt, "nothing was pinned")
    assert attacker.key_ref not in key_refs_in_headers(vol)


# -- class 2: the volume key is replaced when the set of keys shrinks ---------


def add_key(vol: Volume, tmp_path: Path, name: str) -> tuple[Path, str]:
    path = tmp_path / name
    run_kmsfs("keys", "add", vol.backing, "--key-file", path, "--old-key-file", vol.key_file,
              "-q")  # fmt: skip
    ref = LocalProvider(parse_key_file(path.read_bytes(), name), {}).key_ref
    return path, ref


@requires_fuse
def test_old_config_restored_after_keys_remove_is_refused(volume: Volume, tmp_path: Path) -> None:
    """Remove key A, then restore the config of before: A must not come back."""
    _, a_ref = add_key(volume, tmp_path, "a.key")
    before_remove = (volume.backing / ".kmsfs.json").read_text()
    run_kmsfs("keys", "remove", volume.backing, a_ref, *volume.key_args, "-q")
    write_config(volume, before_remove)  # from a backup, a snapshot, or kept by A's holder
    result = mount_and_create(volume)
    assert a_ref not in key_refs_in_headers(volume), "the removed key got new file keys"
    refused(result, "older than generation", "rollback", "kmsfs pin set")


@requires_fuse
def test_former_key_holder_cannot_forge_a_config_after_the_rotation(
    volume: Volume, tmp_path: Path
) -> None:
    """A's holder kept the config of when A was a key: A's check gives them that volume
    key.  After keys remove A, a config they tag with it (at any generation, with any
    keys) is refused, and so is one whose chain claims their key was replaced by theirs."""
    a_path, a_ref = add_key(volume, tmp_path, "a.key")
    known = read_config(volume)
    a_master = parse_key_file(a_path.read_bytes(), "a.key")
    entry = next(k for k in known.keys if k.key_ref == a_ref)
    context = KeyContext.key_check(known.volume_id)
    old_key = bytes(LocalProvider(a_master, {}).unwrap(WrappedKey("local", a_ref, entry.check),
                                                        context))  # fmt: skip
    run_kmsfs("keys", "remove", volume.backing, a_ref, *volume.key_args, "-q")
    current = read_config(volume)
    write_config(volume, reseal(known, old_key, getattr(current, "generation", 0) + 10))
    result = mount_and_create(volume)
    assert a_ref not in key_refs_in_headers(volume), "the removed key got new file keys"
    refused(result, "no volume-key rotation recorded in the config leads from it")
    assert len(current.chain) == 1, "keys remove did not replace the volume key"
    # and the host's own keys still open the volume
    write_config(volume, current.dumps())
    volume.mount()


@requires_fuse
def test_key_switch_of_rewrap_and_passwd_replace_the_volume_key(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, key=False)
    phrase, new_phrase = tmp_path / "pass", tmp_path / "pass2"
    phrase.write_text("first passphrase")
    new_phrase.write_text("second passphrase")
    for path in (phrase, new_phrase):
        path.chmod(0o600)
    run_kmsfs("init", vol.backing, "--passphrase-file", phrase)
    first = pin_json(vol)["pin"]
    run_kmsfs("passwd", vol.backing, "--old-passphrase-file", phrase,
              "--passphrase-file", new_phrase)  # fmt: skip
    second = pin_json(vol)["pin"]
    assert second["fingerprint"] != first["fingerprint"]
    assert second["generation"] == first["generation"] + 1
    run_kmsfs("rewrap", vol.backing, "--old-passphrase-file", new_phrase, "--key-file",
              vol.key_file, "-q")  # fmt: skip
    third = pin_json(vol)["pin"]
    assert third["fingerprint"] != second["fingerprint"]
    config = read_config(vol)
    assert [e.generation for e in config.chain] == [second["generation"], third["generation"]]
    vol.key_args = ["--key-file", str(vol.key_file)]
    run_kmsfs("fsck", vol.backing, *vol.key_args)


# -- class 3: rollback and downgrade ------------------------------------------


@requires_fuse
def test_older_generation_is_refused(volume: Volume, tmp_path: Path) -> None:
    """Any config write raises the generation; an older config (same volume key) is refused."""
    backup = (volume.backing / ".kmsfs.json").read_text()
    moved = tmp_path / "moved.key"
    shutil.copy(volume.key_file, moved)
    ref = read_config(volume).keys[0].key_ref
    run_kmsfs("keys", "update", volume.backing, ref, "--key-file", moved)
    write_config(volume, backup)
    result = volume.mount(check=False)
    refused(result, "generation 1, older than generation 2 that this host pinned")
    assert not volume.mounted


@requires_fuse
@pytest.mark.parametrize("name", ["format1-local", "format2-local"])
def test_older_format_restored_over_a_migrated_volume_is_refused(name: str, tmp_path: Path) -> None:
    vol, saved, _ = restore_saved_volume(name, tmp_path)
    old_text = (vol.backing / ".kmsfs.json").read_text()
    vol.mount()  # migrates it to format 3 and pins it
    vol.umount()
    old = json.loads(old_text)
    if saved["format"] == 1:
        old["block_size"] = 8192  # not authenticated in format 1: the attacker's to choose
    write_config(vol, json.dumps(old))
    result = mount_and_create(vol)
    refused(result, f"format {saved['format']}, but this host pinned format 3", "downgrade")
    assert not vol.path("after-attack").exists()


# -- class 4: another volume's config -----------------------------------------


@requires_fuse
def test_config_of_another_volume_with_the_same_key_is_refused(tmp_path: Path) -> None:
    """Two volumes share a key file; the second has an extra key.  Its config, copied into
    the first volume's backing directory, must not be taken for the first's."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = make_volume(tmp_path / "one")
    second = make_volume(tmp_path / "two", key=False)
    second.key_file = first.key_file
    second.key_args = first.key_args
    run_kmsfs("init", second.backing, *second.key_args)
    _, extra_ref = add_key(second, tmp_path, "extra.key")
    first.mount()
    first.path("mine").write_bytes(b"first volume")
    first.umount()
    shutil.copy(second.backing / ".kmsfs.json", first.backing / ".kmsfs.json")
    result = mount_and_create(first)
    assert extra_ref not in key_refs_in_headers(first), "the other volume's key got file keys"
    one, two = read_config(second).volume_id.hex(), pin_json(first)["pin"]["volume_id"]
    refused(result, f"this host pinned volume {two} at this path", f"is of volume {one}")


# -- trust on first use, expected fingerprints, re-pinning ---------------------


@requires_fuse
def test_first_use_pins_with_a_log_line(volume: Volume, tmp_path: Path) -> None:
    fingerprint = pin_json(volume)["pin"]["fingerprint"]
    host_b = other_host(tmp_path)
    volume.env = host_b
    volume.mount()
    log = volume.log_text()
    assert "on first use: volume-key fingerprint " + fingerprint in log
    assert pin_json(volume, host_b)["pin"]["pinned_by"] == "first use"
    volume.umount()
    # a read-only tool pins too, and says so on stderr
    host_c = other_host(tmp_path, "host-c")
    fsck = run_kmsfs("fsck", volume.backing, *volume.key_args, env=host_c)
    assert f"on first use: volume-key fingerprint {fingerprint}" in fsck.stderr
    status_fields = pin_json(volume, host_c)
    assert status_fields["pin"]["fingerprint"] == fingerprint


@requires_fuse
def test_expected_fingerprint_at_first_use(volume: Volume, tmp_path: Path) -> None:
    fingerprint = pin_json(volume)["pin"]["fingerprint"]
    host_b = other_host(tmp_path)
    volume.env = host_b
    wrong = "00ff-" * 7 + "00ff"
    result = volume.mount("--expect-fingerprint", wrong, check=False)
    refused(result, f"fingerprint {fingerprint}, not {wrong} as expected", "nothing was pinned")
    assert pin_json(volume, host_b)["pin"] is None
    malformed = volume.mount("--expect-fingerprint", "12ab", check=False)
    assert malformed.returncode == 3 and "not a volume-key fingerprint" in malformed.stderr
    volume.mount("--expect-fingerprint", fingerprint.replace("-", "").upper())
    assert pin_json(volume, host_b)["pin"]["pinned_by"] == "expected fingerprint"
    volume.umount()
    # from the TOML file, as a provisioned host gives it
    host_c = other_host(tmp_path, "host-c")
    toml = tmp_path / "vol.toml"
    toml.write_text(
        f'backing = "{volume.backing}"\nmountpoint = "{volume.mountpoint}"\n'
        f'expect_fingerprint = "{wrong}"\n[provider]\ntype = "local"\n'
        f'key_file = "{volume.key_file}"\n'
    )
    toml.chmod(0o600)
    result = run_kmsfs("mount", "--config", toml, env=host_c, check=False)
    refused(result, f"not {wrong} as expected")
    toml.write_text(toml.read_text().replace(wrong, "xyz"))
    result = run_kmsfs("mount", "--config", toml, env=host_c, check=False)
    assert result.returncode == 3 and f"{toml}: expect_fingerprint" in result.stderr


def test_rewrap_and_keys_add_open_the_volume_with_their_control_flags(
    volume: Volume, tmp_path: Path
) -> None:
    """rewrap's and keys add's --expect-fingerprint and --trust-volume-settings are
    about opening the volume with its current key.  They once went to the new key's
    options and did nothing: a host that had not pinned the volume pinned whatever
    config it found (trust on first use) although the operator gave the fingerprint
    it must have."""
    fingerprint = pin_json(volume)["pin"]["fingerprint"]
    host_b = other_host(tmp_path)
    wrong = "00ff-" * 7 + "00ff"
    for n, command in enumerate((["rewrap"], ["keys", "add"])):
        result = run_kmsfs(
            *command, volume.backing, "--key-file", tmp_path / f"new{n}.key",
            "--old-key-file", volume.key_file, "--expect-fingerprint", wrong, "-q",
            env=host_b, check=False,
        )  # fmt: skip
        refused(result, f"fingerprint {fingerprint}, not {wrong} as expected", "nothing was pinned")
        assert pin_json(volume, host_b)["pin"] is None
    assert len(read_config(volume).keys) == 1
    run_kmsfs(
        "keys", "add", volume.backing, "--key-file", tmp_path / "added.key",
        "--old-key-file", volume.key_file, "--expect-fingerprint", fingerprint, "-q", env=host_b,
    )  # fmt: skip
    assert pin_json(volume, host_b)["pin"]["pinned_by"] == "expected fingerprint"
    assert len(read_config(volume).keys) == 2
    # the current keys from the volume's recorded settings, as the flag says
    run_kmsfs(
        "keys", "add", volume.backing, "--key-file", tmp_path / "third.key",
        "--trust-volume-settings", "-q", env=host_b,
    )  # fmt: skip
    assert len(read_config(volume).keys) == 3


@requires_fuse
def test_repin_after_a_deliberate_restore(volume: Volume, tmp_path: Path) -> None:
    backup = (volume.backing / ".kmsfs.json").read_text()
    add_key(volume, tmp_path, "second.key")
    write_config(volume, backup)  # the operator restores last week's backup on purpose
    result = volume.mount(check=False)
    refused(result, "If you restored it on purpose, accept it with: kmsfs pin set")
    command = result.stderr.strip().split("accept it with: ")[1].split()
    fingerprint = command[-1]
    assert command == [
        "kmsfs", "pin", "set", str(volume.backing.resolve()), "--key-file", str(volume.key_file),
        "--expect-fingerprint", fingerprint,
    ]  # fmt: skip
    unconfirmed = run_kmsfs(*command[1:-2], check=False)
    assert unconfirmed.returncode == 2, unconfirmed.stderr
    assert "generation:  2 -> 1   (changes)" in unconfirmed.stdout
    assert f"fingerprint: {fingerprint} -> {fingerprint}\n" in unconfirmed.stdout
    assert f"--expect-fingerprint {fingerprint}" in unconfirmed.stderr
    done = run_kmsfs(*command[1:])
    assert f"pinned {volume.backing.resolve()} at fingerprint {fingerprint}" in done.stdout
    assert pin_json(volume)["pin"]["pinned_by"] == "re-pin"
    volume.mount()
    status = json.loads(run_kmsfs("status", volume.mountpoint, "--json").stdout)
    assert (status["volume_key_fingerprint"], status["config_generation"]) == (fingerprint, 1)
    volume.path("f").write_bytes(b"x")
    inspect = run_kmsfs("inspect", volume.backing / "f").stdout
    assert "volume config: format 3, generation 1, plain names (not verified)" in inspect
    assert f"host pin: volume-key fingerprint {fingerprint}, generation 1" in inspect


def test_pin_store_open_to_others_is_refused(volume: Volume, tmp_path: Path) -> None:
    host_b = other_host(tmp_path)
    run_kmsfs("fsck", volume.backing, *volume.key_args, "--quick", env=host_b)
    pins = Path(host_b["KMSFS_STATE_DIR"]) / "pins"
    pins.chmod(0o755)
    result = run_kmsfs("fsck", volume.backing, *volume.key_args, env=host_b, check=False)
    assert result.returncode == 3 and f"run chmod 700 {pins}" in result.stderr
    pins.chmod(0o700)
    (pin_file,) = pins.iterdir()
    pin_file.chmod(0o644)
    result = run_kmsfs("fsck", volume.backing, *volume.key_args, env=host_b, check=False)
    assert result.returncode == 3 and f"run chmod 600 {pin_file}" in result.stderr
    pin_file.chmod(0o600)
    os.chown(pin_file, 65534, 65534)
    result = run_kmsfs("fsck", volume.backing, *volume.key_args, env=host_b, check=False)
    assert result.returncode == 3 and f"run chown 0: {pin_file}" in result.stderr
    os.chown(pin_file, 0, 0)
    pin_file.unlink()
    pin_file.symlink_to(tmp_path / "elsewhere.json")
    result = run_kmsfs("fsck", volume.backing, *volume.key_args, env=host_b, check=False)
    assert result.returncode == 3 and "cannot read the pin" in result.stderr


# -- two hosts: a rotation is followed, forgeries are not ---------------------


@pytest.fixture
def two_hosts(tmp_path: Path, rsa_hsm: softhsm.SoftHSM) -> Iterator[tuple[Volume, Volume]]:
    """One RSA-keyed volume served in shared mode by host A and host B (two state dirs)."""
    a = rsa_volume(tmp_path, rsa_hsm)
    a.mount_args = ["-o", "shared"]
    b = Volume(tmp_path, a.backing, tmp_path / "mnt-b", a.key_file, tmp_path / "kmsfs-b.log")
    b.mountpoint.mkdir()
    b.env = {**a.env, **other_host(tmp_path)}
    b.key_args, b.mount_args = a.key_args, a.mount_args
    try:
        yield a, b
    finally:
        for vol in (a, b):
            if vol.mounted:
                vol.umount()


@requires_fuse
def test_a_peer_follows_rotations_and_refuses_forgeries(
    two_hosts: tuple[Volume, Volume], tmp_path: Path, rsa_hsm: softhsm.SoftHSM
) -> None:
    a, b = two_hosts
    a.mount()
    b.mount()  # first use on host B
    a.path("shared").write_bytes(b"written on A")
    assert b.path("shared").read_bytes() == b"written on A"
    a.umount()
    b.umount()
    pinned_b = pin_json(b, b.env)["pin"]
    # host A: a key joins, A's holder is let go, then the other key leaves too
    extra, gone = tmp_path / "extra.key", tmp_path / "gone.key"
    for path in (extra, gone):
        run_kmsfs("keys", "add", a.backing, "--key-file", path, *old_flags(a), "-q", env=a.env)
    extra_ref = LocalProvider(parse_key_file(extra.read_bytes(), "x"), {}).key_ref
    gone_ref = LocalProvider(parse_key_file(gone.read_bytes(), "g"), {}).key_ref
    known_to_gone = read_config(a)  # what the removed key's holder keeps
    run_kmsfs("keys", "remove", a.backing, gone_ref, *a.key_args, "-q", env=a.env)
    run_kmsfs("keys", "remove", a.backing, extra_ref, *a.key_args, "-q", env=a.env)
    pinned_a = pin_json(a, a.env)["pin"]
    assert pinned_a["fingerprint"] != pinned_b["fingerprint"]
    assert len(read_config(a).chain) == 2
    # host B follows both rotations through the chain
    b.mount()
    assert (
        f"followed a volume-key rotation from {pinned_b['fingerprint']} to"
        f" {pinned_a['fingerprint']}" in b.log_text()
    )
    assert b.path("shared").read_bytes() == b"written on A"
    b.umount()
    assert pin_json(b, b.env)["pin"]["fingerprint"] == pinned_a["fingerprint"]
    current = (a.backing / ".kmsfs.json").read_text()
    # an outsider's config (their own volume key, wrapped with the public RSA key): refused
    attacker = forge_with_public_key(b, rsa_hsm, tmp_path)
    result = mount_and_create(b)
    assert attacker.key_ref not in key_refs_in_headers(b)
    refused(result, "no volume-key rotation recorded in the config leads from it")
    # the removed key's holder, with the volume key of their time: refused on both hosts
    master = parse_key_file(gone.read_bytes(), "g")
    entry = next(k for k in known_to_gone.keys if k.key_ref == gone_ref)
    context = KeyContext.key_check(known_to_gone.volume_id)
    old_key = bytes(LocalProvider(master, {}).unwrap(WrappedKey("local", gone_ref, entry.check),
                                                      context))  # fmt: skip
    write_config(b, reseal(known_to_gone, old_key, pinned_a["generation"] + 5))
    for host in (b, a):
        result = mount_and_create(host)
        assert gone_ref not in key_refs_in_headers(host), "the removed key got new file keys"
        refused(result, "no volume-key rotation recorded in the config leads from it")
    write_config(a, current)
    a.mount()  # the real config still opens


def old_flags(vol: Volume) -> list[str]:
    """The host's key options as the --old-* options of keys add."""
    flags = []
    for arg in vol.key_args:
        flags.append("--old-" + arg[2:] if arg.startswith("--pkcs11") else arg)
    return flags
