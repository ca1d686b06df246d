"""Shared fixtures: volumes created with the real CLI and mounted with real FUSE.

Every mount made here is unmounted at teardown whatever happened
(``fusermount3 -u``, then a lazy unmount), and the daemon's log is checked
for tracebacks, which fail the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from benchlib.kms import KmsProxy, MotoServer

BIN = Path(sys.executable).parent / "kmsfs"
KEY_FLAGS = {
    "--key-file",
    "--passphrase-file",
    "--kms-key-id",
    "--pkcs11-module",
    "--trust-volume-settings",
}


@pytest.fixture(scope="session", autouse=True)
def host_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This host's kmsfs state (the volume pins) for the session, in a private temporary
    directory (``KMSFS_STATE_DIR``), so no test reads or writes /var/lib/kmsfs.  A test
    that plays a second host gives its commands another one (``other_host``)."""
    path = tmp_path_factory.mktemp("host-state")
    path.chmod(0o700)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KMSFS_STATE_DIR", str(path))
        yield path


def other_host(tmp_path: Path, name: str = "host-b") -> dict[str, str]:
    """The environment of kmsfs commands run as another host: a state directory (pins)
    of its own under *tmp_path*."""
    path = tmp_path / f"{name}-state"
    path.mkdir(mode=0o700, exist_ok=True)
    return {"KMSFS_STATE_DIR": str(path)}


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")


def run_kmsfs(
    *args: str | os.PathLike[str],
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the kmsfs CLI; with check=True a non-zero exit fails the test with its stderr."""
    result = subprocess.run(
        [str(BIN), *map(str, args)],
        capture_output=True,
        text=True,
        input=input,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"kmsfs {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}")
    return result


def force_unmount(mountpoint: Path) -> None:
    """Unmount whatever is at *mountpoint*, stale or busy; never raises."""
    for command in (["fusermount3", "-u", "-q"], ["fusermount3", "-uz", "-q"], ["umount", "-l"]):
        if not os.path.ismount(mountpoint) and not _is_stale(mountpoint):
            return
        subprocess.run([*command, str(mountpoint)], capture_output=True, check=False)


def _is_stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == 107  # ENOTCONN
    return False


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
            _wait_unmounted(self.mountpoint)
            if self.daemon_pid is not None:  # its log and audit records are complete then
                _wait_exited(self.daemon_pid)
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


def _wait_unmounted(mountpoint: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_exited(pid: int, timeout: float = 30) -> bool:
    """Wait until process *pid* is gone (or a zombie): the daemon outlives its mount briefly.
    False if it still runs after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def run_as(uid: int, *command: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run *command* as user and group *uid*, without supplementary groups (setpriv)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *map(str, command)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 0755 directory in /tmp, so that other uids (``run_as``) can reach mounts under
    it (pytest's own tmp directory is 0700).  Mounts at ``mnt*`` in it are unmounted
    at teardown."""
    path = Path(tempfile.mkdtemp(prefix="kmsfs-shared-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mountpoint in path.glob("mnt*"):
            force_unmount(mountpoint)
        shutil.rmtree(path, ignore_errors=True)


NAMES = ("plain", "encrypted")  # the names of a volume: parametrize fixtures with these
# a module mark: every test of the module (each takes volume or mounted) runs on both
BOTH_NAMES = pytest.mark.parametrize("volume", NAMES, indirect=True)


def make_volume(
    tmp_path: Path, *init_args: str, key: bool = True, names: str = "plain"
) -> Volume:
    """Create (not mount) a local-provider volume under *tmp_path*, with plain names
    unless *names* is "encrypted" (or *init_args* choose)."""
    backing = tmp_path / "backing"
    mountpoint = tmp_path / "mnt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    backing.mkdir()
    mountpoint.mkdir()
    volume = Volume(tmp_path, backing, mountpoint, tmp_path / "master.key", tmp_path / "kmsfs.log")
    volume.key_args = ["--key-file", str(volume.key_file)]
    chosen = {"--plain-names", "--encrypted-names"} & set(init_args)
    volume.encrypted_names = "--encrypted-names" in chosen or (
        not chosen and names == "encrypted"
    )
    if key:
        mode = [] if chosen else [f"--{names}-names"]
        run_kmsfs("init", backing, "--key-file", volume.key_file, *mode, *init_args)
    return volume


@pytest.fixture
def volume(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    """A local-provider volume (key file), created but not mounted; with plain names,
    or the names a module asks for with ``BOTH_NAMES`` (``request.param``)."""
    vol = make_volume(tmp_path, names=getattr(request, "param", "plain"))
    try:
        yield vol
    finally:
        force_unmount(vol.mountpoint)
        _check_log(vol)


@pytest.fixture
def mounted(volume: Volume) -> Iterator[Volume]:
    """A mounted local-provider volume."""
    if not fuse_available():
        pytest.skip("needs /dev/fuse")
    volume.mount()
    yield volume
    if volume.mounted and os.path.ismount(volume.mountpoint):
        volume.umount()


def _check_log(vol: Volume) -> None:
    text = vol.log_text()
    if "Traceback" in text or "unexpected error" in text:
        pytest.fail(f"daemon log of {vol.root} has an unexpected error:\n{text[-4000:]}")


# -- AWS KMS on moto's server (scripts/benchlib/kms.py), shared by the KMS test modules --


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's KMS server on 127.0.0.1, one per test module."""
    from benchlib.kms import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[KmsProxy]:
    """A counting, fault-injecting proxy in front of moto."""
    from benchlib.kms import KmsProxy

    kms_proxy = KmsProxy(moto.url)
    yield kms_proxy
    kms_proxy.close()


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for the kmsfs subprocesses, and nothing from this machine's AWS setup."""
    from benchlib.kms import aws_environment

    for name in ("AWS_PROFILE", "AWS_REGION", "HTTP_PROXY", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_environment(tmp_path).items():
        monkeypatch.setenv(name, value)
