"""Local-provider volumes under a temporary directory, made with the real CLI: the
``Volume`` the fixtures hand out, ``make_volume`` to make more, and the names
parametrization (``NAMES``, ``BOTH_NAMES``)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.cli import KEY_FLAGS, run_kmsfs
from support.fuse import wait_exited, wait_unmounted


@dataclass
class Volume:
    """A volume under a temporary directory.  Attributes: root, backing, mountpoint,
    key_file, log_file, init_args (extra init options), mount_args (extra mount options),
    encrypted_names (made with encrypted names: ``backing_path`` maps names then)."""

    root: Path
    backing: Path
    mountpoint: Path
    key_file: Path
    log_file: Path
    mount_args: list[str] = field(default_factory=list)
    mounted: bool = False
    env: dict[str, str] = field(default_factory=dict)  # e.g. SOFTHSM2_CONF, AWS credentials
    daemon_pid: int | None = None
    # The options naming the volume's key on this host (mount and tools need them: the
    # settings recorded in the backing directory are not trusted to find keys).
    key_args: list[str] = field(default_factory=list)
    encrypted_names: bool = False

    def mount(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        named = any(arg in KEY_FLAGS for arg in (*self.mount_args, *extra))
        result = run_kmsfs(
            "mount",
            self.backing,
            self.mountpoint,
            "--log-file",
            self.log_file,
            "--log-level",
            "debug",
            *self.mount_args,
            *extra,
            *([] if named else self.key_args),
            check=check,
            env=self.env,
        )
        if result.returncode == 0:
            self.mounted = True
            if "daemon pid " in result.stdout:
                self.daemon_pid = int(result.stdout.split("daemon pid ")[1].split(")")[0])
        return result

    def umount(self) -> None:
        if self.mounted:
            run_kmsfs("umount", self.mountpoint, env=self.env)
            self.mounted = False
            wait_unmounted(self.mountpoint)
            if self.daemon_pid is not None:  # its log and audit records are complete then
                wait_exited(self.daemon_pid)
                self.daemon_pid = None

    def remount(self, *extra: str) -> None:
        self.umount()
        self.mount(*extra)

    def log_text(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def backing_path(self, name: str) -> Path:
        """The backing entry of *name* (a path in the volume): the same path with plain
        names; with encrypted names, each component encrypted under its directory's
        ID (the directories on the way must exist)."""
        if not self.encrypted_names:
            return self.backing / name
        from support.names_support import backing_path

        return backing_path(self, name)


NAMES = ("plain", "encrypted")  # the names of a volume: parametrize fixtures with these
# a module mark: every test of the module (each takes volume or mounted) runs on both
BOTH_NAMES = pytest.mark.parametrize("volume", NAMES, indirect=True)


def make_volume(
    tmp_path: Path,
    *init_args: str,
    key: bool = True,
    names: str = "plain",
    in_process: bool = False,
) -> Volume:
    """Create (not mount) a local-provider volume under *tmp_path*, with plain names
    unless *names* is "encrypted" (or *init_args* choose).

    ``kmsfs init`` makes it, in a subprocess; with *in_process*, the function that
    command calls (``init_volume``) makes it in this process, without the CLI's start-up
    (the unit tier's way: same config, key file and pin).  *init_args* other than the
    names options need the CLI: ValueError with *in_process*."""
    backing = tmp_path / "backing"
    mountpoint = tmp_path / "mnt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    backing.mkdir()
    mountpoint.mkdir()
    volume = Volume(tmp_path, backing, mountpoint, tmp_path / "master.key", tmp_path / "kmsfs.log")
    volume.key_args = ["--key-file", str(volume.key_file)]
    chosen = {"--plain-names", "--encrypted-names"} & set(init_args)
    volume.encrypted_names = "--encrypted-names" in chosen or (not chosen and names == "encrypted")
    if key and in_process:
        if set(init_args) - chosen:
            raise ValueError(f"make_volume(in_process=True) takes no init options: {init_args}")
        from kmsfs.volume_open import init_volume

        options = {"key_file": str(volume.key_file)}
        init_volume(backing, "local", options, encrypted_names=volume.encrypted_names)
    elif key:
        mode = [] if chosen else [f"--{names}-names"]
        run_kmsfs("init", backing, "--key-file", volume.key_file, *mode, *init_args)
    return volume


def check_log(vol: Volume) -> None:
    """Fail the test if the daemon log of *vol* has a traceback or an unexpected error."""
    text = vol.log_text()
    if "Traceback" in text or "unexpected error" in text:
        pytest.fail(f"daemon log of {vol.root} has an unexpected error:\n{text[-4000:]}")
