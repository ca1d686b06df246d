"""The filesystems under test: how each is created, mounted, unmounted and cleaned up.

Every system keeps its volume under ``WORKDIR/<name>/`` and is reachable at
``self.mnt`` once mounted, so all systems share one disk.  Every FUSE system is
mounted with ``allow_other`` (the pgbench rows run PostgreSQL as the ``postgres``
user; without it only root could enter the mount) and its root is open to other
users (mode 0755 or 0711).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
from pathlib import Path

from benchlib.common import (
    BENCHLIB,
    KMSFS,
    ROOT,
    STOCK_VENV,
    VENV,
    VENV_PYTHON,
    drop_caches,
    listed_mount,
    pid_alive,
    run,
    wait_for,
)


class System:
    """One filesystem under test: a volume in base/, reachable at self.mnt once mounted."""

    name = ""
    peer = False
    fuse = True

    def __init__(self, work: Path) -> None:
        self.base = work / self.name
        self.mnt = self.base / "mnt"
        self.mounted = False

    def create(self) -> None:
        self.mnt.mkdir(parents=True)

    def mount(self) -> None:
        raise NotImplementedError

    def umount(self) -> None:
        if self.mounted:
            run(["umount", str(self.mnt)])
            wait_for(lambda: not os.path.ismount(self.mnt), f"unmount of {self.mnt}")
            self.mounted = False

    def remount_cold(self) -> None:
        """Unmount, mount again and drop the kernel's caches: the next access is cold."""
        self.umount()
        self.mount()
        drop_caches()

    def daemon_pid(self) -> int | None:
        """The pid whose RSS and CPU are reported (kmsfs, floor and passthrough)."""
        return None

    def force_cleanup(self) -> None:
        """Last-resort teardown (never raises); also clears a mount whose daemon died."""
        if listed_mount(self.mnt):
            for cmd in (["umount", str(self.mnt)], ["umount", "-l", str(self.mnt)]):
                if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                    break
        self.mounted = False

    def _wait_mounted(self) -> None:
        wait_for(lambda: os.path.ismount(self.mnt), f"{self.name} mount at {self.mnt}")
        self.mounted = True


class Plain(System):
    """A directory on the work disk: what the hardware and kernel give without FUSE."""

    name = "plain"
    fuse = False

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.mnt = self.base / "dir"

    def mount(self) -> None:
        self.mounted = True

    def umount(self) -> None:
        self.mounted = False

    def remount_cold(self) -> None:
        drop_caches()


class Kmsfs(System):
    """kmsfs from the checkout's .venv, local key file provider, started by ``kmsfs mount``
    (encrypted names: init's default)."""

    name = "kmsfs"
    options: tuple[str, ...] = ()
    init_options: tuple[str, ...] = ()
    cli = KMSFS  # the kmsfs executable (its venv's pyfuse3 serves the mount)

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.pid: int | None = None

    def create(self) -> None:
        super().create()
        (self.base / "backing").mkdir()
        key = str(self.base / "key")
        run(
            [
                str(self.cli),
                "init",
                str(self.base / "backing"),
                "--key-file",
                key,
                *self.init_options,
            ]
        )
        # init makes the backing root 0700, and the mount's root has its mode: let other
        # users (PostgreSQL's) pass through it, as the peers' roots (0755) do.
        os.chmod(self.base / "backing", 0o711)

    def mount(self) -> None:
        out = run(
            [
                str(self.cli),
                "mount",
                str(self.base / "backing"),
                str(self.mnt),
                "--key-file",
                str(self.base / "key"),
                "--log-file",
                str(self.base / "kmsfs.log"),
                "--log-level",
                "warning",
                "-o",
                "allow_other",
                *self.options,
            ],
            env=self.env(),
        ).stdout
        self.pid = int(out.rsplit("daemon pid", 1)[1].strip(" )\n"))
        self._wait_mounted()

    def umount(self) -> None:
        if not self.mounted:
            return
        run([str(self.cli), "umount", str(self.mnt)])
        self.mounted = False
        if self.pid is not None:
            pid = self.pid
            wait_for(lambda: not pid_alive(pid), f"kmsfs daemon {pid} to exit")
            self.pid = None

    def env(self) -> dict[str, str] | None:
        """The environment of ``kmsfs mount`` (None: ours)."""
        return None

    def daemon_pid(self) -> int | None:
        return self.pid

    def force_cleanup(self) -> None:
        super().force_cleanup()
        if self.pid is not None and pid_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass
        self.pid = None


class KmsfsPlainNames(Kmsfs):
    """The checkout's kmsfs on a volume with plain names (``init --plain-names``): the
    row to compare the cost of encrypted names with."""

    name = "kmsfs-plain-names"
    init_options = ("--plain-names",)


class KmsfsStock(Kmsfs):
    """The checkout's kmsfs on stock pyfuse3 3.5.0 (``.venv-stock``, kmsfs's loop adapter,
    none of the patch's hooks): what the pyfuse3 patch buys kmsfs (docs/pyfuse3-patch.md)."""

    name = "kmsfs-stock"
    cli = STOCK_VENV / "bin" / "kmsfs"


class KmsfsAt(Kmsfs):
    """kmsfs as of a git revision of this checkout (``kmsfs@REV``, or
    ``kmsfs-shared@REV`` in shared mode), for before/after figures in one run:
    ``git archive REV kmsfs`` is unpacked in the work directory and put first on
    PYTHONPATH of the same .venv (dependencies as checked out)."""

    def __init__(self, work: Path, rev: str, shared: bool = False) -> None:
        self.name = f"{'kmsfs-shared' if shared else 'kmsfs'}@{rev}"
        self.options = KmsfsShared.options if shared else ()
        super().__init__(work)
        self.rev = rev
        self.source = self.base / "source"

    def create(self) -> None:
        super().create()
        self.source.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", self.rev, "kmsfs"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(self.source)], input=archive, check=True)

    def env(self) -> dict[str, str] | None:
        return {**os.environ, "PYTHONPATH": str(self.source)}


class Gocryptfs(System):
    """gocryptfs (Debian package), password file, default options."""

    name = "gocryptfs"
    peer = True

    def create(self) -> None:
        super().create()
        (self.base / "cipher").mkdir()
        (self.base / "pass").write_text("bench-password\n")
        run(
            [
                "gocryptfs",
                "-init",
                "-q",
                "-passfile",
                str(self.base / "pass"),
                str(self.base / "cipher"),
            ]
        )

    def mount(self) -> None:
        run(
            [
                "gocryptfs",
                "-q",
                "-allow_other",
                "-passfile",
                str(self.base / "pass"),
                str(self.base / "cipher"),
                str(self.mnt),
            ]
        )
        self._wait_mounted()


class Securefs(System):
    """securefs (Debian package), key file, default options, in the background (-b)."""

    name = "securefs"
    peer = True

    def create(self) -> None:
        super().create()
        (self.base / "cipher").mkdir()
        (self.base / "keyfile").write_bytes(os.urandom(32))
        run(
            [
                "securefs",
                "create",
                "--keyfile",
                str(self.base / "keyfile"),
                str(self.base / "cipher"),
            ]
        )

    def mount(self) -> None:
        run(
            [
                "securefs",
                "mount",
                "-b",
                "-o",
                "allow_other",
                "--log",
                str(self.base / "securefs.log"),
                "--keyfile",
                str(self.base / "keyfile"),
                str(self.base / "cipher"),
                str(self.mnt),
            ]
        )
        self._wait_mounted()


class ForegroundDaemon(System):
    """A Python FUSE daemon this script starts in the foreground and stops with fusermount3."""

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def mount(self) -> None:
        with open(self.base / f"{self.name}.log", "ab") as log_file:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
            )
        proc = self.proc
        wait_for(
            lambda: os.path.ismount(self.mnt) or proc.poll() is not None,
            f"{self.name} mount at {self.mnt}",
        )
        if proc.poll() is not None:
            self.proc = None
            tail = (self.base / f"{self.name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} daemon exited with {proc.returncode}:\n{tail}")
        self.mounted = True

    def umount(self) -> None:
        if not self.mounted:
            return
        run(["fusermount3", "-u", str(self.mnt)])
        self.mounted = False
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.proc = None

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def force_cleanup(self) -> None:
        super().force_cleanup()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


class Passthrough(ForegroundDaemon):
    """pyfuse3's examples/passthroughfs.py: no encryption, a ceiling for Python (not a peer).

    The example takes no mount options, so it is mounted without allow_other: the
    pgbench rows skip it (the ``postgres`` user cannot enter the mount)."""

    name = "passthrough"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.script = work / "passthroughfs.py"

    def create(self) -> None:
        super().create()
        (self.base / "source").mkdir()
        if self.script.exists():
            return
        version = run(
            [str(VENV_PYTHON), "-c", "import pyfuse3; print(pyfuse3.__version__)"]
        ).stdout.strip()
        version = version.split("+")[0]  # the release a patched build was made from
        fetch = self.base / "sdist"
        run(
            [
                str(VENV / "bin" / "pip"),
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(fetch),
                f"pyfuse3=={version}",
            ]
        )
        with tarfile.open(next(fetch.glob("pyfuse3-*.tar.gz"))) as sdist:
            member = sdist.extractfile(f"pyfuse3-{version}/examples/passthroughfs.py")
            assert member is not None
            self.script.write_bytes(member.read())

    def command(self) -> list[str]:
        return [str(VENV_PYTHON), str(self.script), str(self.base / "source"), str(self.mnt)]


class Floor(ForegroundDaemon):
    """benchlib/floorfs.py: an in-memory pyfuse3 filesystem with trivial handlers.

    The floor of kmsfs's stack (pyfuse3 + trio with kmsfs's settings, no backing
    I/O, no crypto).  Its data lives in the daemon's memory, so a "cold" access
    cannot remount it: remount_cold only drops the kernel's caches (as for
    plain), and the next access goes to the daemon again.
    """

    name = "floor"

    def command(self) -> list[str]:
        return [str(VENV_PYTHON), str(BENCHLIB / "floorfs.py"), "--allow-other", str(self.mnt)]

    def remount_cold(self) -> None:
        drop_caches()


class KmsfsShared(Kmsfs):
    """kmsfs in shared-storage mode (``-o shared``: byte-range locks, no writeback cache,
    1 s timeouts), one daemon: the cost of the mode without a second host's traffic."""

    name = "kmsfs-shared"
    options = ("-o", "shared")


class FloorStock(Floor):
    """The floor on stock pyfuse3 3.5.0 (``.venv-stock``: kmsfs's loop adapter, no kept
    listings), as before the pyfuse3 patch: the floor's side of what the patch buys."""

    name = "floor-stock"

    def command(self) -> list[str]:
        return [str(STOCK_VENV / "bin" / "python"), *super().command()[1:]]


class FloorPyfuse3Loop(Floor):
    """The floor with pyfuse3's own wait for /dev/fuse (two trio scheduling rounds per
    request), as every pyfuse3 filesystem and kmsfs before its loop adapter (not a default; on the
    patched pyfuse3 its read-before-wait is off, listings are still kept)."""

    name = "floor-pyfuse3loop"

    def command(self) -> list[str]:
        return [*super().command()[:-1], "--pyfuse3-loop", str(self.mnt)]


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (
        Kmsfs,
        KmsfsPlainNames,
        KmsfsShared,
        KmsfsStock,
        Gocryptfs,
        Securefs,
        Plain,
        Floor,
        FloorStock,
        FloorPyfuse3Loop,
        Passthrough,
    )
}


def make_system(name: str, work: Path) -> System:
    """The system called *name*: one of SYSTEMS, or ``kmsfs@REV`` or
    ``kmsfs-shared@REV`` (KmsfsAt)."""
    base, _, rev = name.partition("@")
    if rev and base in AT_REVISION:
        return KmsfsAt(work, rev, shared=base == "kmsfs-shared")
    return SYSTEMS[name](work)


AT_REVISION = ("kmsfs", "kmsfs-shared")  # the systems that can be run as of a revision
DEFAULT_SYSTEMS = "kmsfs,gocryptfs,securefs,plain,floor"
