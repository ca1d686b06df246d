"""systemd units, their installer, and mounting through mount(8) and fstab.

The units are verified with ``systemd-analyze verify`` after
``scripts/install-systemd --root`` has installed them under a temporary root
(systemd is not PID 1 in CI, so they are verified, not started).  The mount
tests run the real mount(8): once through ``/sbin/mount.fuse.kmsfs`` and once
through fuse3's ``mount.fuse3`` (which runs ``kmsfs`` from mount's PATH); the
links they need are created for the test and removed after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import BIN
from support.fuse import requires_fuse
from support.volumes import Volume

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "scripts" / "install-systemd"
HELPER = BIN.parent / "mount.fuse.kmsfs"
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of FUSE needs root")


def install(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALLER), "--root", str(root), "--kmsfs", str(BIN), "--no-reload"],
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.mark.nomount
def test_installer_layout(tmp_path: Path) -> None:
    result = install(tmp_path)
    units = tmp_path / "etc/systemd/system"
    service = (units / "kmsfs@.service").read_text()
    assert f"ExecStart={BIN} mount --foreground --config /etc/kmsfs/%i.toml" in service
    assert f"ExecStop=-{BIN} umount --config /etc/kmsfs/%i.toml" in service
    # systemctl reload waits for the daemon's verdict (test_policy_operations.py runs it)
    assert f"ExecReload={BIN} policy reload --config /etc/kmsfs/%i.toml" in service
    assert "/usr/local/bin/kmsfs" not in service
    assert (units / "kmsfs.target").exists()
    rekey = (units / "kmsfs-rekey@.service").read_text()
    assert f"ExecStart={BIN} rekey --config /etc/kmsfs/%i.toml --wait" in rekey
    assert "OnCalendar=yearly" in (units / "kmsfs-rekey@.timer").read_text()
    assert (tmp_path / "usr/local/share/doc/kmsfs/docs/KEYS.md").exists()
    assert os.readlink(tmp_path / "sbin/mount.fuse.kmsfs") == str(HELPER)
    assert oct((tmp_path / "etc/kmsfs").stat().st_mode & 0o777) == "0o750"
    assert "systemctl enable --now kmsfs@NAME" in result.stdout

    subprocess.run([str(INSTALLER), "--root", str(tmp_path), "--uninstall"], check=True)
    assert not (units / "kmsfs@.service").exists()
    assert not (units / "kmsfs-rekey@.timer").exists()
    assert not (tmp_path / "sbin/mount.fuse.kmsfs").is_symlink()
    assert (tmp_path / "etc/kmsfs").is_dir()  # configs are never removed


@pytest.mark.nomount
def test_unit_settings() -> None:
    service = (REPO / "systemd/kmsfs@.service").read_text()
    settings = [line for line in service.splitlines() if line and not line.startswith("#")]
    assert "Type=notify" in settings
    assert "Restart=on-failure" in settings
    assert "RestartPreventExitStatus=8" in settings  # a pin refusal stays refused
    assert "After=network-online.target" in settings
    assert "DeviceAllow=/dev/fuse rw" in settings
    # options that would give the service a private mount namespace hide the mount
    for forbidden in (
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "PrivateMounts=",
        "ReadOnlyPaths=",
        "ProtectKernelTunables=",
    ):
        assert not any(line.startswith(forbidden) for line in settings), forbidden


@pytest.mark.nomount
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    install(tmp_path)
    units = tmp_path / "etc/systemd/system"
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(units / "kmsfs@.service"),
            str(units / "kmsfs.target"),
            str(units / "kmsfs-rekey@.service"),
            str(units / "kmsfs-rekey@.timer"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # verify only warns about unknown keys and bad values: none may mention our units
    ours = [line for line in result.stderr.splitlines() if "kmsfs" in line]
    assert ours == [], "\n".join(ours)


# -- mount(8) ------------------------------------------------------------------


@pytest.fixture
def link() -> Iterator[object]:
    """Create symlinks for one test; remove them after (never touches existing files)."""
    made: list[Path] = []

    def make(path: Path, target: Path) -> None:
        if path.exists() or path.is_symlink():
            if path.is_symlink() and os.readlink(path) == str(target):
                return
            pytest.skip(f"{path} exists and is not ours")
        path.symlink_to(target)
        made.append(path)

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def write_config(volume: Volume) -> Path:
    path = volume.root / "data.toml"
    path.write_text(
        f'backing = "{volume.backing}"\nmountpoint = "{volume.mountpoint}"\n'
        f'log_file = "{volume.log_file}"\n\n'
        f'[provider]\ntype = "local"\nkey_file = "{volume.key_file}"\n'
    )
    return path


def mount_cmd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )


def check_mounted_and_unmount(volume: Volume) -> None:
    assert os.path.ismount(volume.mountpoint)
    fstype = mount_cmd("findmnt", "-n", "-o", "FSTYPE,SOURCE", volume.mountpoint).stdout.split()
    assert fstype == ["fuse.kmsfs", str(volume.backing)]
    (volume.mountpoint / "f").write_text("through mount(8)")
    assert (volume.mountpoint / "f").read_text() == "through mount(8)"
    result = mount_cmd("umount", volume.mountpoint)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(volume.mountpoint)
    assert (volume.backing / "f").exists()  # the encrypted file


@requires_fuse
@requires_root
@pytest.mark.mount
def test_mount_t_fuse_kmsfs_with_helper(volume: Volume, link: object) -> None:
    link(Path("/sbin/mount.fuse.kmsfs"), HELPER)  # type: ignore[operator]
    config = write_config(volume)
    result = mount_cmd(
        "mount", "-t", "fuse.kmsfs", volume.backing, volume.mountpoint,
        "-o", f"config={config},_netdev,nofail",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_mounted_and_unmount(volume)


@requires_fuse
@requires_root
@pytest.mark.mount
def test_mount_through_mount_fuse3(volume: Volume, link: object) -> None:
    if Path("/sbin/mount.fuse.kmsfs").exists():
        pytest.skip("mount.fuse.kmsfs is installed: mount(8) would not use mount.fuse3")
    if shutil.which("mount.fuse3") is None:
        pytest.skip("needs fuse3's mount.fuse3")
    # mount(8) runs helpers with PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:...
    link(Path("/usr/local/bin/kmsfs"), BIN)  # type: ignore[operator]
    config = write_config(volume)
    result = mount_cmd(
        "mount", "-t", "fuse.kmsfs", volume.backing, volume.mountpoint, "-o", f"config={config}"
    )
    assert result.returncode == 0, result.stderr
    check_mounted_and_unmount(volume)


@requires_fuse
@requires_root
@pytest.mark.mount
def test_fstab_line(volume: Volume, link: object, tmp_path: Path) -> None:
    link(Path("/sbin/mount.fuse.kmsfs"), HELPER)  # type: ignore[operator]
    config = write_config(volume)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{volume.backing} {volume.mountpoint} fuse.kmsfs"
        f" config={config},_netdev,nofail,x-systemd.requires=network-online.target 0 0\n"
    )
    result = mount_cmd("mount", "--fstab", fstab, volume.mountpoint)
    assert result.returncode == 0, result.stderr
    check_mounted_and_unmount(volume)
