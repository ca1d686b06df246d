"""The CLI's messages, as a new user meets them: each error once, in words to act on."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume, make_volume


@pytest.mark.nomount
def test_umount_of_a_directory_that_is_not_mounted(tmp_path: Path) -> None:
    result = run_kmsfs("umount", tmp_path, check=False)
    assert result.returncode == 7
    assert result.stderr == f"kmsfs: error: {tmp_path} is not mounted (nothing to unmount)\n"
    missing = run_kmsfs("umount", tmp_path / "nowhere", check=False)
    assert missing.returncode == 7
    assert missing.stderr == (
        f"kmsfs: error: cannot unmount {tmp_path / 'nowhere'}: no such directory\n"
    )


@requires_fuse
def test_a_refused_key_file_is_reported_once(volume: Volume, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_text("not a key file\n")
    loose.chmod(0o600)
    result = volume.mount("--key-file", str(loose), check=False)
    assert result.returncode == 3
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), result.stderr
    assert str(loose) in lines[0]


@requires_fuse
def test_mount_without_a_key_is_reported_once(tmp_path: Path) -> None:
    vol = make_volume(tmp_path)
    result = run_kmsfs("mount", vol.backing, vol.mountpoint, check=False)
    assert result.returncode == 3
    assert result.stderr.count("kmsfs: error:") == 1 and len(result.stderr.splitlines()) == 1
    assert result.stdout == ""
