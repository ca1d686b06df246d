"""Secret files (key files, passphrase and PIN files) must be private, as ssh wants of a key.

The attack: a key file or passphrase file that other local users can read (or
write, to swap in a secret they know) used to mount silently.  Now every
command that reads one exits 3 with the ``chmod``/``chown`` that fixes it.
systemd credentials ($CREDENTIALS_DIRECTORY) are exempt: systemd makes them
private to the service.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Volume, make_volume, requires_fuse, run_kmsfs

from kmsfs.errors import ConfigError
from kmsfs.keys.secrets import get_text_secret, read_secret_file

NOBODY = 65534


@requires_fuse
@pytest.mark.mount
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660], ids=oct)
def test_mount_refuses_a_key_file_others_can_read_or_write(volume: Volume, mode: int) -> None:
    volume.key_file.chmod(mode)
    result = volume.mount(check=False)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        f"kmsfs: error: key file {volume.key_file} is accessible by group or others"
        f" (mode {mode:04o}): run 'chmod 600 {volume.key_file}'"
    )
    assert not os.path.ismount(volume.mountpoint)
    volume.key_file.chmod(0o600)  # the fix the message gives
    volume.mount()
    volume.path("f").write_bytes(b"mounted")
    volume.umount()


@requires_fuse
@pytest.mark.mount
def test_mount_refuses_a_key_file_owned_by_another_user(volume: Volume) -> None:
    os.chown(volume.key_file, NOBODY, -1)  # 0600, but its owner may replace it at will
    result = volume.mount(check=False)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        f"kmsfs: error: key file {volume.key_file} belongs to uid {NOBODY}, not to root or to"
        f" you (root): run 'chown root {volume.key_file}'"
    )
    assert not os.path.ismount(volume.mountpoint)


def test_init_refuses_an_existing_world_readable_key_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_volume(tmp_path / "a")  # makes a 0600 key file
    first.key_file.chmod(0o644)
    second = make_volume(tmp_path / "b", key=False)
    result = run_kmsfs("init", second.backing, "--key-file", first.key_file, check=False)
    assert result.returncode == 3
    assert f"run 'chmod 600 {first.key_file}'" in result.stderr
    assert not (second.backing / ".kmsfs.json").exists()


def test_passphrase_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    vol = make_volume(tmp_path, key=False)
    secret = tmp_path / "pass"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o644)
    result = run_kmsfs("init", vol.backing, "--passphrase-file", secret, check=False)
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"kmsfs: error: passphrase {secret} is accessible by group or others (mode 0644):"
        f" run 'chmod 600 {secret}'"
    )
    secret.chmod(0o600)
    run_kmsfs("init", vol.backing, "--passphrase-file", secret)
    secret.chmod(0o640)
    refused = run_kmsfs("fsck", vol.backing, "--passphrase-file", secret, check=False)
    assert refused.returncode == 3 and "chmod 600" in refused.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666], ids=oct)
def test_pin_file_not_private_is_refused(tmp_path: Path, mode: int) -> None:
    pin = tmp_path / "user.pin"
    pin.write_text("1234\n")
    pin.chmod(mode)
    with pytest.raises(ConfigError) as info:
        get_text_secret(str(pin), "kmsfs-pin", "PIN of token 'hsm'", None)
    assert str(info.value) == (
        f"PIN of token 'hsm' {pin} is accessible by group or others (mode {mode:04o}):"
        f" run 'chmod 600 {pin}'"
    )
    pin.chmod(0o400)
    assert get_text_secret(str(pin), "kmsfs-pin", "PIN of token 'hsm'", None) == "1234"


def test_systemd_credentials_keep_working(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd owns the credential directory's modes; a copy made with another mode still works."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "kmsfs-pin").write_text("5678\n")
    (creds / "kmsfs-pin").chmod(0o644)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert get_text_secret(None, "kmsfs-pin", "PIN", None) == "5678"


def test_a_pipe_is_read_as_it_is(tmp_path: Path) -> None:
    """``--passphrase-file <(pass show x)`` passes a pipe: nothing stored, nothing to check."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"from a pipe\n")
    os.close(write_end)
    try:
        assert read_secret_file(f"/dev/fd/{read_end}", "passphrase") == b"from a pipe\n"
    finally:
        os.close(read_end)


def test_symlink_to_a_private_file_is_accepted_and_its_target_checked(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    target.write_bytes(b"secret")
    target.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(target)  # the link's own mode (0777) says nothing
    assert read_secret_file(link, "key file") == b"secret"
    target.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        read_secret_file(link, "key file")
