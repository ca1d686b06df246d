"""Secret files (key files, passphrase and PIN files) must be private, as ssh wants of a key,
and regular files.

The attacks: a key file or passphrase file that other local users can read (or
write, to swap in a secret they know) used to mount silently; a FIFO (of an
unprivileged user) named as a key file used to hang root's mount forever.  Now
every command that reads one exits 3 with the ``chmod``/``chown`` that fixes it,
or naming what the file is (a FIFO, a pipe, a symbolic link, a directory...).
systemd credentials ($CREDENTIALS_DIRECTORY) are exempt from the mode check:
systemd makes them private to the service.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume, make_volume

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


@pytest.mark.nomount
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


@pytest.mark.nomount
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


@pytest.mark.nomount
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


@pytest.mark.nomount
def test_systemd_credentials_keep_working(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd owns the credential directory's modes; a copy made with another mode still works."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "kmsfs-pin").write_text("5678\n")
    (creds / "kmsfs-pin").chmod(0o644)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert get_text_secret(None, "kmsfs-pin", "PIN", None) == "5678"


@pytest.mark.nomount
def test_a_pipe_is_refused_naming_what_to_use_instead(tmp_path: Path) -> None:
    """``--passphrase-file <(pass show x)`` passes a pipe: refused (a pipe is a FIFO, and a
    FIFO can hang a root process); a file, a systemd credential or the prompt instead."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"from a pipe\n")
    os.close(write_end)
    try:
        with pytest.raises(ConfigError) as info:
            read_secret_file(f"/dev/fd/{read_end}", "passphrase")
    finally:
        os.close(read_end)
    assert str(info.value) == (
        f"passphrase /dev/fd/{read_end} is a pipe, not a regular file: give a file (mode 0600),"
        " a systemd credential ($CREDENTIALS_DIRECTORY), or type it at the prompt"
    )


@pytest.mark.nomount
def test_a_symlink_is_refused_and_its_target_never_read(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    target.write_bytes(b"secret")
    target.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(target)  # the link's own mode (0777) says nothing; O_NOFOLLOW
    before = os.stat(target).st_atime_ns
    with pytest.raises(ConfigError) as info:
        read_secret_file(link, "key file")
    assert str(info.value).startswith(
        f"key file {link} is a symbolic link (to '{target}'), not a regular file"
        " (kmsfs does not follow one here): give a file (mode 0600)"
    )
    assert os.stat(target).st_atime_ns == before
    assert read_secret_file(target, "key file") == b"secret"  # the fix: name the file


# -- secret files that are not regular files ---------------------------------------------


def _fifo_owned_by_nobody(path: Path) -> Path:
    os.mkfifo(path, 0o600)
    os.chown(path, NOBODY, NOBODY)  # an unprivileged user's FIFO, named by root
    return path


@contextmanager
def _unblock_after(fifo: Path, seconds: float) -> Iterator[None]:
    """Without the protection the reader blocks until a writer comes: be that writer after
    *seconds*, so the test fails (too slow) instead of hanging."""
    done = threading.Event()

    def writer() -> None:
        if not done.wait(seconds):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.mark.nomount
@pytest.mark.parametrize(
    "make, kind",
    [
        (_fifo_owned_by_nobody, "a FIFO"),
        (lambda path: path.mkdir(mode=0o700) or path, "a directory"),
        (lambda path: _bound_socket(path), "a socket"),
        (lambda path: path.symlink_to("/dev/null") or path, "a symbolic link (to '/dev/null')"),
    ],
    ids=["fifo", "directory", "socket", "symlink-to-device"],
)
def test_a_secret_that_is_not_a_regular_file_is_refused_at_once(
    tmp_path: Path, make: Callable[[Path], Path], kind: str
) -> None:
    secret = make(tmp_path / "secret")
    started = time.monotonic()
    with _unblock_after(secret, 10), pytest.raises(ConfigError) as info:
        get_text_secret(str(secret), "kmsfs-pin", "PIN of token 'hsm'", None)
    assert time.monotonic() - started < 1.0  # no wait for a writer
    assert str(info.value).startswith(f"PIN of token 'hsm' {secret} is {kind}, not a regular file")


def _bound_socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # the socket file stays
    return path


@pytest.mark.nomount
def test_a_systemd_credential_must_be_a_regular_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    _fifo_owned_by_nobody(creds / "kmsfs-pin")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with _unblock_after(creds / "kmsfs-pin", 10), pytest.raises(ConfigError, match="is a FIFO"):
        get_text_secret(None, "kmsfs-pin", "PIN", None)


@requires_fuse
@pytest.mark.mount
def test_root_mount_and_init_refuse_a_fifo_key_file_of_another_user(
    volume: Volume, tmp_path: Path
) -> None:
    """The attack: an unprivileged user's FIFO where root's mount (or init) reads its key
    file.  Before, the root process blocked forever opening it (no writer ever comes);
    now it exits 3 at once, naming the type."""
    fifo = _fifo_owned_by_nobody(tmp_path / "fifo.key")
    with _unblock_after(fifo, 20):
        result = run_kmsfs(
            "mount", volume.backing, volume.mountpoint, "--key-file", fifo, check=False, timeout=30
        )
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        f"kmsfs: error: key file {fifo} is a FIFO, not a regular file: give a file (mode 0600),"
        " a systemd credential ($CREDENTIALS_DIRECTORY), or type it at the prompt"
    )
    assert not os.path.ismount(volume.mountpoint)
    other = tmp_path / "other"
    other.mkdir()
    with _unblock_after(fifo, 20):
        started = time.monotonic()
        init = run_kmsfs("init", other, "--key-file", fifo, check=False, timeout=30)
        elapsed = time.monotonic() - started
    assert init.returncode == 3 and "is a FIFO, not a regular file" in init.stderr
    assert elapsed < 15  # the CLI's start-up under load, far from the 20 s of the unblocker
    assert not (other / ".kmsfs.json").exists()
