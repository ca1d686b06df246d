"""Several daemons serving one volume, as several hosts would (the shared-mode tests):
``Cluster`` mounts them and their helper processes, ``cluster_on`` makes a volume on a
local directory, on GlusterFS (the ``gluster_mounts`` fixture) or over NFS 4.2
(``nfs_mounts``), and removes all of it after."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.cli import run_kmsfs
from support.fuse import force_unmount, wait_exited, wait_unmounted
from support.volumes import Volume, make_volume


@dataclass
class Mount:
    """One daemon serving the volume at *mountpoint*."""

    mountpoint: Path
    log_file: Path
    pid: int = 0

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def log_text(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


class Cluster:
    """A volume and the daemons serving it (all unmounted at teardown).

    *backings*: the paths each daemon serves the volume from, in turn (over NFS, the
    same directory through two NFS mounts, as two hosts see it); by default the
    volume's own backing directory for every daemon.
    """

    def __init__(self, volume: Volume, backings: list[Path] | None = None) -> None:
        self.volume = volume
        self.backings = backings or [volume.backing]
        self.mounts: list[Mount] = []
        self.helpers: list[subprocess.Popen[str]] = []  # killed at teardown, first
        self.distributed = backings is not None  # two clients of a shared filesystem

    def hold_lock(self, name: str, start: int = 0, length: int = 0) -> subprocess.Popen[str]:
        """A process of another host holding an exclusive OFD lock on bytes [start,
        start + length) (length 0: to the end) of backing file *name* and never releasing
        it (as a hostile process or a dead NFS client's lock would), through the last of
        ``backings``: over a shared filesystem, another client than the first daemon's."""
        code = (
            "import os, sys, time\n"
            "from kmsfs.backing.shared import ofd_lock\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "ofd_lock(fd, True, int(sys.argv[2]), int(sys.argv[3]))\n"
            "print('held', flush=True)\n"
            "time.sleep(3600)\n"
        )
        path = self.backings[-1] / name
        return self._helper(["-c", code, str(path), str(start), str(length)], "held")

    def map_backing(self, name: str) -> subprocess.Popen[str]:
        """A process of the first daemon's host keeping backing file *name* mapped (all
        of it, every page read once, through the first of ``backings``): over a FUSE
        filesystem its cached pages stay while it lives, whatever another host writes."""
        code = (
            "import mmap, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "view = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)\n"
            "sum(view[i] for i in range(0, len(view), mmap.PAGESIZE))\n"
            "print('mapped', flush=True)\n"
            "time.sleep(3600)\n"
        )
        return self._helper(["-c", code, str(self.backings[0] / name)], "mapped")

    def waiters(
        self, path: Path, readers: int, stats: int, links: bool = False
    ) -> subprocess.Popen[str]:
        """tests/support/lock_waiters.py on *path*, once all its threads have started."""
        script = Path(__file__).parent / "lock_waiters.py"
        extra = ["links"] if links else []
        return self._helper([str(script), str(path), str(readers), str(stats), *extra], "started")

    def _helper(self, args: list[str], ready: str) -> subprocess.Popen[str]:
        """A Python process (killed at teardown) that has printed the line *ready*."""
        process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
        self.helpers.append(process)
        assert process.stdout is not None and process.stdout.readline() == ready + "\n"
        return process

    def mount(
        self, *options: str, name: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        index = len(self.mounts)
        mountpoint = self.volume.root / (name or f"mnt{index}")
        mountpoint.mkdir(exist_ok=True)
        mount = Mount(mountpoint, self.volume.root / f"daemon{index}.log")
        result = run_kmsfs(
            "mount",
            self.backings[index % len(self.backings)],
            mountpoint,
            "--log-file",
            mount.log_file,
            "--log-level",
            "debug",
            *self.volume.key_args,
            *options,
            check=check,
        )
        if result.returncode == 0:
            mount.pid = int(result.stdout.split("daemon pid ")[1].split(")")[0])
            self.mounts.append(mount)
        return result

    def shared(self, count: int, *options: str) -> list[Mount]:
        for _ in range(count):
            self.mount("-o", ",".join(("shared", *options)))
        return self.mounts

    def umount(self, mount: Mount) -> None:
        run_kmsfs("umount", mount.mountpoint)
        wait_unmounted(mount.mountpoint)
        wait_exited(mount.pid)
        self.mounts.remove(mount)
        self.check_log(mount)

    def umount_all(self) -> None:
        for mount in list(self.mounts):
            self.umount(mount)

    @staticmethod
    def check_log(mount: Mount) -> None:
        text = mount.log_text()
        for bad in ("Traceback", "unexpected error", "authentication failed", "ERROR"):
            assert bad not in text, f"{mount.log_file}: {bad}:\n{text[-3000:]}"

    def fsck_clean(self) -> None:
        result = run_kmsfs("fsck", self.volume.backing, *self.volume.key_args, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "clean" in result.stdout


NFS_MOUNTS = "KMSFS_TEST_NFS_MOUNTS"


def nfs_mounts() -> tuple[Path, Path]:
    """Two NFS 4.2 mounts of one export (two "hosts"), named by $KMSFS_TEST_NFS_MOUNTS
    ("/mnt/a,/mnt/b"); skips, saying why, where there are none."""
    with open("/proc/filesystems") as handle:
        kinds = handle.read().split()
    if "nfs" not in kinds and "nfs4" not in kinds:
        pytest.skip(
            "no NFS on this machine (/proc/filesystems lists no nfs, and no module can be"
            " loaded): the shared-mode suite ran on a local directory and on GlusterFS only"
        )
    value = os.environ.get(NFS_MOUNTS, "")
    if not value:
        pytest.skip(
            f"NFS is available but {NFS_MOUNTS} is not set: to run the shared-mode suite"
            " over NFS 4.2, mount one export twice (vers=4.2, no_root_squash) and give both"
            " mount points, comma-separated"
        )
    first, second = (Path(part) for part in value.split(","))
    with open("/proc/mounts") as handle:
        mounts = {fields[1]: fields for fields in (line.split() for line in handle)}
    for path in (first, second):
        fields = mounts.get(str(path))
        assert fields is not None and fields[2] == "nfs4" and "vers=4.2" in fields[3], (
            f"{NFS_MOUNTS}: {path} is not an NFS 4.2 mount: {fields}"
        )
    return first, second


@contextmanager
def cluster_on(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path, names: str = "plain"
) -> Iterator[Cluster]:
    """A new volume (with *names*) for several daemons on *kind* ("local", "glusterfs",
    "nfs-4.2": see ``cluster``); its daemons, helpers and shared directory are gone
    after."""
    shared_dir: Path | None = None
    if kind == "local":
        group = Cluster(make_volume(tmp_path, names=names))
    else:
        if kind == "glusterfs":
            first, second = request.getfixturevalue("gluster_mounts")
        else:
            first, second = nfs_mounts()
        name = f"kmsfs-test-{os.getpid()}-{os.urandom(4).hex()}"
        shared_dir = first / name
        volume = make_volume(tmp_path, key=False)
        volume.backing = shared_dir / "backing"
        volume.backing.mkdir(parents=True)
        run_kmsfs("init", volume.backing, f"--{names}-names", "--key-file", volume.key_file)
        volume.encrypted_names = names == "encrypted"
        group = Cluster(volume, [volume.backing, second / name / "backing"])
    try:
        yield group
    finally:
        for helper in group.helpers:
            helper.kill()
            helper.communicate()
        for mount in group.mounts:
            force_unmount(mount.mountpoint)
            wait_exited(mount.pid)
        if shared_dir is not None:
            shutil.rmtree(shared_dir, ignore_errors=True)
