"""The offline tools on a hostile backing tree, attacked as the attacker would.

The attacker is an unprivileged local user (uid 65534 here) who owns a directory of the
backing tree: the daemon chowns backing entries to the users who create them, so every
user of a mount owns the backing copies of their own directories.  While root runs a
kmsfs tool, the attacker exchanges their directory ``alice/sub`` with a symlink to a
root-only directory outside the tree (``renameat2(RENAME_EXCHANGE)``, atomically, in a
tight loop, so the name is a directory half of the time and a symlink the other half).
The root-only directory holds a plaintext canary and, under the names of the attacker's
files, root-only copies of files of the volume with a secret in them.

Afterwards nothing in the root-only directory was created, changed or read: its names,
and for each entry (and the directory itself) owner, mode, size, bytes, xattrs, mtime,
ctime and atime are as before.  The atimes are set to 0 first, so on this ``relatime``
filesystem any read of a file's content or listing of the directory moves them.

Also here: a header replacement racing a rename on the mounted volume (made
deterministic by swapping the two files from inside the KMS proxy while the tool waits
for its Encrypt call), and the volume lock (a second daemon, or a tool, is refused after
the config was replaced by rename and through other spellings of the backing path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.lifecycle_support import read_file, read_file_with_any_key, write_file
from support.volumes import Volume

from kmsfs.backing.syscalls import RENAME_EXCHANGE, renameat2
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.format.volume_config import load_config
from kmsfs.volume_open import open_volume

NOBODY = 65534
ATTACK_SECONDS = 3.0
SECRET = b"root-only secret: must never leave the root-only directory\n" * 40
CANARY = b"root-only canary\n" * 100
# uid 65534 cannot run this venv's interpreter (it lives under /root): the system one
ATTACKER_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable

# The attacker: exchange two names of a directory it owns until SIGTERM, then print the
# count.  It pauses a random 0-400 us after each exchange: on a busy machine a tight loop
# flips the name thousands of times per time slice and then not at all while the tool
# runs, so the tool would see one state throughout; the pauses spread the flips out.
SWAPPER = r"""
import ctypes, os, random, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd, a, b = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].encode()
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", os.getuid(), os.getgid(), os.getgroups(), flush=True)
count = 0
while not stop:
    if libc.renameat2(fd, a, fd, b, 2) != 0:
        sys.exit("renameat2: " + os.strerror(ctypes.get_errno()))
    count += 1
    time.sleep(random.uniform(0, 0.0004))
print(count, flush=True)
"""


# -- the root-only directory ---------------------------------------------------------


def _stat_tuple(path: Path) -> tuple[int, ...]:
    st = os.lstat(path)
    return (
        st.st_ino,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


@dataclass
class RootOnly:
    """A root-only directory outside the backing tree, frozen so any access shows."""

    path: Path
    names: list[str] = field(default_factory=list)
    data: dict[str, tuple[bytes, dict[str, bytes]]] = field(default_factory=dict)
    meta: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def make(cls, path: Path, files: dict[str, bytes | Callable[[Path], None]]) -> RootOnly:
        path.mkdir(mode=0o700)
        for name, content in files.items():
            if isinstance(content, bytes):
                (path / name).write_bytes(content)
            else:
                content(path / name)
            os.chmod(path / name, 0o600)
        self = cls(path)
        self.names = sorted(os.listdir(path))
        self.data = self._read()
        for name in [*self.names, "."]:  # atime 0: a read (relatime) moves it
            os.utime(path / name, ns=(0, os.lstat(path / name).st_mtime_ns))
        self.meta = self._meta()
        return self

    def _read(self) -> dict[str, tuple[bytes, dict[str, bytes]]]:
        return {
            name: (
                (self.path / name).read_bytes(),
                {x: os.getxattr(self.path / name, x) for x in os.listxattr(self.path / name)},
            )
            for name in self.names
        }

    def _meta(self) -> dict[str, tuple[int, ...]]:
        return {name: _stat_tuple(self.path / name) for name in [*self.names, "."]}

    def assert_untouched(self) -> None:
        """Nothing was created, changed or read (metadata first: our own reads move atime)."""
        assert self._meta() == self.meta, "the root-only directory was read or changed"
        assert sorted(os.listdir(self.path)) == self.names, "a file was created in it"
        assert self._read() == self.data


# -- the attacker ----------------------------------------------------------------------


@dataclass
class Attacker:
    """uid 65534's directory ``parent/name`` and its symlink ``parent/.name.swap``."""

    parent: Path
    name: str
    swaps: int = 0

    @property
    def other(self) -> str:
        return f".{self.name}.swap"

    def plant(self, target: Path) -> None:
        os.symlink(target, self.parent / self.other)
        os.lchown(self.parent / self.other, NOBODY, NOBODY)

    def _restore(self) -> None:
        """Put the directory back under its name (the swapper may stop either way round)."""
        if (self.parent / self.name).is_symlink():
            fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                renameat2(fd, self.name.encode(), fd, self.other.encode(), RENAME_EXCHANGE)
            finally:
                os.close(fd)
        assert (self.parent / self.name).is_dir() and not (self.parent / self.name).is_symlink()

    def race(
        self,
        run_once: Callable[[int], Any],
        seconds: float = ATTACK_SECONDS,
        until: Callable[[], bool] = lambda: True,
    ) -> int:
        """Run *run_once(n)* (as root) again and again for *seconds* while swapping, and
        on (up to 20 times as long) until *until()*: a test that needs the race to have
        gone each way at least once does not depend on how busy the machine is."""
        # The attacker holds a descriptor of their own directory (as a shell's cwd would):
        # the test's temporary directories above it are root-only.
        fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            process = subprocess.Popen(
                [ATTACKER_PYTHON, "-I", "-c", SWAPPER, str(fd), self.name, self.other],
                pass_fds=(fd,),
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        finally:
            os.close(fd)
        runs = 0
        try:
            assert process.stdout is not None
            ready = process.stdout.readline()
            assert ready.split()[:3] == ["ready", str(NOBODY), str(NOBODY)], ready
            started = time.monotonic()
            while runs == 0 or time.monotonic() < started + seconds or not until():
                if time.monotonic() > started + 20 * seconds:
                    break  # the test's own assertion then says what never happened
                run_once(runs)
                runs += 1
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
            self._restore()
        assert process.returncode == 0, err
        self.swaps += int(out.split()[-1])
        assert self.swaps > 500, "the attacker barely ran"
        return runs


# -- a volume with an attacker's directory --------------------------------------------


@dataclass
class Hostile:
    volume: Volume
    attacker: Attacker
    rootonly: RootOnly
    contents: dict[str, bytes]  # rel -> plaintext of every file of the volume
    secret_ids: set[bytes]  # file IDs of the root-only copies

    @property
    def backing(self) -> Path:
        return self.volume.backing

    def assert_files_intact(self, key_file: Path | None = None) -> None:
        """fsck is clean and every file of the volume decrypts to its own bytes."""
        key = key_file or self.volume.key_file
        assert run_kmsfs("fsck", self.backing, "--key-file", key, "-q").returncode == 0
        config, keyring = open_volume(self.backing, {"key_file": str(key)})
        try:
            for rel, data in self.contents.items():
                assert read_file(self.backing / rel, keyring) == data, rel
        finally:
            keyring.close()


@pytest.fixture
def hostile(volume: Volume, tmp_path: Path) -> Iterator[Hostile]:
    backing = volume.backing
    config, keyring = open_volume(backing, {"key_file": str(volume.key_file)})
    contents: dict[str, bytes] = {}
    try:
        for rel in ("alice", "alice/sub", "root"):
            (backing / rel).mkdir()
        for n in range(30):
            for rel in (f"alice/sub/f{n:02d}", f"root/r{n:02d}"):
                contents[rel] = os.urandom(3000 + 100 * n)
                write_file(backing / rel, config, keyring, contents[rel])
        for path in (backing / "alice", backing / "alice/sub", *(backing / "alice/sub").iterdir()):
            os.chown(path, NOBODY, NOBODY)  # as the daemon does for files alice creates
        secrets: dict[str, bytes | Callable[[Path], None]] = {
            f"f{n:02d}": lambda p: write_file(p, config, keyring, SECRET) for n in range(30)
        }
        rootonly = RootOnly.make(tmp_path / "rootonly", {"canary": CANARY, **secrets})
    finally:
        keyring.close()
    secret_ids = {
        FileHeader.parse(xattrs[XATTR_NAME]).file_id
        for _, xattrs in rootonly.data.values()
        if XATTR_NAME in xattrs
    }
    attacker = Attacker(backing / "alice", "sub")
    attacker.plant(rootonly.path)
    yield Hostile(volume, attacker, rootonly, contents, secret_ids)


# -- the symlink race, one tool at a time ------------------------------------------------


def test_rekey_never_follows_a_swapped_directory(hostile: Hostile) -> None:
    codes: set[int] = set()
    hostile.attacker.race(
        lambda n: codes.add(
            run_kmsfs(
                "rekey", hostile.backing, "-q", *hostile.volume.key_args, check=False
            ).returncode
        ),
        until=lambda: 1 in codes,
    )
    hostile.rootonly.assert_untouched()
    assert codes == {0, 1} or codes == {1}, codes  # 1: files that changed are listed, untouched
    # the attacker stopped: a rekey finishes and every file holds its own bytes
    assert " 0 failed" in run_kmsfs("rekey", hostile.backing, "-q", *hostile.volume.key_args).stdout
    hostile.assert_files_intact()
    assert all(p.stat().st_uid == NOBODY for p in (hostile.backing / "alice/sub").iterdir())


def _attackers(rel: str) -> bool:
    """True for the attacker's directory and what is in it: a walk reports ``alice``
    itself when a subdirectory hid behind the symlink while alice was listed (its link
    count then names more subdirectories than were listed)."""
    return rel == "alice" or rel.startswith("alice/")


def test_rewrap_and_keys_add_never_follow_a_swapped_directory(
    hostile: Hostile, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    # the tools name the volume's current key on this host: track which one it is
    state: dict[str, Any] = {"rewrap": 0, "extra": None, "current": hostile.volume.key_file}
    failed: dict[str, str] = {}  # file named in a FAILED line -> the line

    def run(*args: Any, current: str = "--old-key-file") -> subprocess.CompletedProcess[str]:
        # exit 1 while files move under it, naming each: the keys are not switched then
        result = run_kmsfs(*args, "-q", current, state["current"], check=False)
        assert result.returncode in (0, 1), result.stderr
        for line in result.stderr.splitlines():
            if line.startswith("FAILED "):
                failed[line.split()[1].rstrip(":")] = line
        return result

    def key_ref(key_file: Path) -> str:
        from kmsfs.keys.local import LocalProvider, parse_key_file

        return LocalProvider(parse_key_file(key_file.read_bytes(), "k"), {}).key_ref

    def rewrap(n: int) -> None:  # rewrap to a new key each time one finished
        key = keys / f"k{state['rewrap']}.key"
        result = run("rewrap", hostile.backing, "--key-file", key)
        # the switch may have happened even when stripping an old entry failed (exit 1)
        refs = [k.key_ref for k in load_config(hostile.backing).keys]
        if key.exists() and refs == [key_ref(key)]:
            state["current"] = key
        if result.returncode == 0:
            state["rewrap"] += 1

    def add_remove(n: int) -> None:  # keys add an extra key, then keys remove it
        if state["extra"] is None:
            add = run("keys", "add", hostile.backing, "--key-file", keys / "extra.key")
            if "done:" in add.stdout:
                state["extra"] = load_config(hostile.backing).keys[-1].key_ref
        else:
            remove = ("keys", "remove", hostile.backing, state["extra"], "--force")
            if run(*remove, current="--key-file").returncode == 0:
                state["extra"] = None

    def step(n: int) -> None:
        if n % 3 == 2 or state["extra"] is not None:
            add_remove(n)
        else:
            rewrap(n)

    hostile.attacker.race(step, seconds=2 * ATTACK_SECONDS, until=lambda: bool(failed))
    hostile.rootonly.assert_untouched()
    # every file it could not re-wrap is the attacker's (the attacker can stall a
    # rotation while they keep swapping, and is named; other files are not affected)
    assert failed
    assert [line for rel, line in failed.items() if not _attackers(rel)] == []
    # The attacker stopped: finish what is pending.  A file its owner kept out of the
    # tree for a whole cover pass (its directory behind the symlink under both names
    # while the walk listed them: as good as moved away) was not covered and may have
    # been left with retired keys only, which then stalls later rewraps (listed, exit
    # 1).  Only the attacker's files can be such; every file still holds its own bytes
    # under a key it was wrapped with; the volume's keys open every other file.
    journal = hostile.backing / ".kmsfs.d/rewrap.json"
    if journal.exists() and json.loads(journal.read_text())["operation"] == "rewrap":
        run("rewrap", hostile.backing, "--key-file", keys / f"k{state['rewrap']}.key")
    elif journal.exists():
        run("keys", "add", hostile.backing, "--key-file", keys / "extra.key")
    assert [line for rel, line in failed.items() if not _attackers(rel)] == []
    key_files = [hostile.volume.key_file, *keys.iterdir()]
    for rel, data in hostile.contents.items():
        assert read_file_with_any_key(hostile.backing / rel, key_files) == data, rel
    # the key files the config names (written by root: the attacker owns only alice/)
    config, keyring = open_volume(hostile.backing, {"trust_volume_settings": True})
    try:
        for rel, data in hostile.contents.items():
            if rel.startswith("root/"):
                assert read_file(hostile.backing / rel, keyring) == data, rel
    finally:
        keyring.close()


def test_fsck_never_follows_a_swapped_directory(hostile: Hostile) -> None:
    reports: list[dict[str, Any]] = []

    def fsck(n: int) -> None:
        result = run_kmsfs("fsck", hostile.backing, "--json", *hostile.volume.key_args, check=False)
        assert result.returncode in (0, 5), result.stderr
        reports.append(json.loads(result.stdout))

    hostile.attacker.race(fsck)
    hostile.rootonly.assert_untouched()
    for report in reports:
        for finding in report["findings"]:
            assert "canary" not in finding["path"], finding  # a root-only name was listed
    hostile.assert_files_intact()


def test_headers_export_and_import_never_follow_a_swapped_directory(
    hostile: Hostile, tmp_path: Path
) -> None:
    good = tmp_path / "good.jsonl"
    run_kmsfs("headers", "export", hostile.backing, good)
    exports = tmp_path / "exports"
    exports.mkdir()

    def export_import(n: int) -> None:
        run_kmsfs("headers", "export", hostile.backing, exports / f"{n}.jsonl", check=False)
        run_kmsfs("headers", "import", hostile.backing, good, "--force", check=False)

    hostile.attacker.race(export_import)
    hostile.rootonly.assert_untouched()
    for export in exports.iterdir():
        for line in export.read_text().splitlines()[1:]:
            record = json.loads(line)
            assert "canary" not in record["path"], record
            assert bytes.fromhex(record["file_id"]) not in hostile.secret_ids, record
    hostile.assert_files_intact()


def test_decrypt_and_inspect_never_follow_a_swapped_directory(
    hostile: Hostile, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = hostile.backing / "alice/sub/f00"
    inspected: list[str] = []

    refused: list[str] = []

    def decrypt(n: int) -> None:
        result = run_kmsfs("decrypt", target, out / str(n), *hostile.volume.key_args, check=False)
        if result.returncode != 0:
            refused.append(result.stderr)
        result = run_kmsfs("inspect", target, "--json", check=False)
        if result.returncode == 0:
            inspected.append(json.loads(result.stdout)["file_id"])
        else:
            refused.append(result.stderr)

    hostile.attacker.race(decrypt, until=lambda: bool(inspected and refused))
    hostile.rootonly.assert_untouched()
    for path in out.iterdir():
        assert path.read_bytes() == hostile.contents["alice/sub/f00"], path
    assert not {bytes.fromhex(i) for i in inspected} & hostile.secret_ids
    assert inspected  # the attacker's own file is still inspected when it is a directory
    assert refused and all("not followed" in text for text in refused), refused


def test_import_never_follows_a_swapped_source_directory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    sub = plain / "alice" / "sub"
    sub.mkdir(parents=True)
    (plain / "top").write_bytes(b"top\n")
    files = {f"f{n:02d}": os.urandom(2000 + n) for n in range(10)}
    for name, data in files.items():
        (sub / name).write_bytes(data)
    for path in (plain / "alice", sub, *sub.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    rootonly = RootOnly.make(tmp_path / "rootonly", {"canary": CANARY, "f00": SECRET})
    attacker = Attacker(plain / "alice", "sub")
    attacker.plant(rootonly.path)
    key = tmp_path / "import.key"
    volumes = tmp_path / "volumes"
    volumes.mkdir()

    def import_(n: int) -> None:
        run_kmsfs(
            "import", plain, volumes / str(n), "--plain-names", "--key-file", key, "-q",
            check=False,
        )  # fmt: skip

    attacker.race(import_)
    rootonly.assert_untouched()
    for volume in volumes.iterdir():
        for _, _, names in os.walk(volume):  # never follows symlinks
            assert "canary" not in names
    # without the attacker the same import is complete and byte-exact
    final = tmp_path / "final"
    run_kmsfs("import", plain, final, "--plain-names", "--key-file", key, "-q")
    config, keyring = open_volume(final, {"key_file": str(key)})
    try:
        for name, data in files.items():
            assert read_file(final / "alice/sub" / name, keyring) == data
            assert (final / "alice/sub" / name).stat().st_uid == NOBODY
    finally:
        keyring.close()
    # a symlink in the source is recreated as a symlink, also one to a directory
    assert os.readlink(final / "alice" / ".sub.swap") == str(rootonly.path)


# -- header replacement is compare-and-swap on the same inode ---------------------------


@requires_fuse
@pytest.mark.aws
def test_keys_add_racing_a_rename_keeps_every_header_on_its_file(
    volume: Volume, tmp_path: Path, moto: Any, proxy: Any, aws_env: None
) -> None:
    """The review's finding: a rename between the tool's read of a header and its write
    put one file's header on another.  Here the two files are swapped (through the mount,
    as any user of it can) while the tool waits for KMS to wrap the first file's key."""
    volume.mount()
    data = {"a": os.urandom(9000), "b": os.urandom(7000)}
    for name, content in data.items():
        volume.path(name).write_bytes(content)
    swapped: list[str] = []

    def swap_during_first_file_wrap(operation: str, request: dict[str, Any]) -> None:
        context = request.get("EncryptionContext", {})
        if operation == "Encrypt" and "kmsfs:purpose" not in context and not swapped:
            os.rename(volume.path("a"), volume.path("tmp"))
            os.rename(volume.path("b"), volume.path("a"))
            os.rename(volume.path("tmp"), volume.path("b"))
            swapped.append(context["kmsfs:file-id"])

    proxy.before = swap_during_first_file_wrap
    arn = moto.create_key()
    kms = ("--provider", "aws-kms", "--kms-key-id", arn, "--kms-endpoint-url", proxy.url)
    result = run_kmsfs("keys", "add", volume.backing, *kms, "-q", "--old-key-file", volume.key_file)
    proxy.before = None
    assert swapped, "the tool never asked KMS to wrap a file key"
    assert "volume is mounted at" in result.stdout
    volume.umount()
    check = run_kmsfs(
        "fsck",
        volume.backing,
        "--key-file",
        volume.key_file,
        "--kms-endpoint-url",
        proxy.url,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    volume.mount()
    assert volume.path("a").read_bytes() == data["b"]  # each file kept its own bytes
    assert volume.path("b").read_bytes() == data["a"]
    volume.umount()


# -- the volume lock ----------------------------------------------------------------------


@requires_fuse
def test_second_mount_is_refused_after_the_config_was_replaced_by_rename(
    mounted: Volume,
) -> None:
    config = mounted.backing / ".kmsfs.json"
    temp = mounted.backing / ".kmsfs.json.tmp"
    temp.write_bytes(config.read_bytes())
    os.replace(temp, config)  # as every tool that updates the config does
    other = mounted.root / "mnt2"
    other.mkdir()
    try:
        result = run_kmsfs("mount", mounted.backing, other, check=False)
        assert result.returncode == 7, result.stderr
        assert "in use by another kmsfs process" in result.stderr
        assert not os.path.ismount(other)
    finally:
        force_unmount(other)
    assert mounted.path(".").exists()


@requires_fuse
def test_tools_see_the_mount_through_other_spellings_of_the_backing_path(
    mounted: Volume, tmp_path: Path
) -> None:
    link = tmp_path / "link-to-backing"
    link.symlink_to(mounted.backing)
    bind = tmp_path / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(mounted.backing), str(bind)], check=True)
    try:
        for spelling in (link, bind):  # rekey hands the job to the daemon of that mount
            rekey = run_kmsfs("rekey", spelling, "--wait", check=False)
            assert rekey.returncode == 0, rekey.stdout + rekey.stderr
            assert f"rekey started by the daemon of {mounted.mountpoint}" in rekey.stdout
            remove = run_kmsfs("keys", "remove", spelling, "local:x", check=False)
            assert remove.returncode == 7, remove.stdout + remove.stderr
        # rewrap covers a mounted volume but never switches its keys while a daemon runs
        rewrap = run_kmsfs(
            "rewrap", link, "--key-file", tmp_path / "b.key", "--old-key-file", mounted.key_file
        )
        assert f"volume is mounted at {mounted.mountpoint}" in rewrap.stdout
        assert len(load_config(mounted.backing).keys) == 2
    finally:
        subprocess.run(["umount", str(bind)], check=False)


def test_volume_lock_is_exclusive_and_survives_config_replacement(volume: Volume) -> None:
    from kmsfs.backing.volume_lock import lock_volume, volume_in_use
    from kmsfs.errors import MountError

    assert not volume_in_use(volume.backing)
    fd = lock_volume(volume.backing)
    try:
        assert volume_in_use(volume.backing)
        config = volume.backing / ".kmsfs.json"
        temp = volume.backing / "replacement"
        temp.write_bytes(config.read_bytes())
        os.replace(temp, config)
        with pytest.raises(MountError, match=f"volume {volume.backing} is in use"):
            lock_volume(volume.backing)
        assert volume_in_use(volume.root / ".." / volume.root.name / "backing")
    finally:
        os.close(fd)
    assert not volume_in_use(volume.backing)
    lock = volume.backing / ".kmsfs.d" / "lock"
    assert lock.stat().st_mode & 0o777 == 0o600
    assert (volume.backing / ".kmsfs.d").stat().st_mode & 0o777 == 0o700


def test_volume_lock_never_follows_a_planted_symlink(volume: Volume, tmp_path: Path) -> None:
    from kmsfs.backing.volume_lock import lock_volume
    from kmsfs.errors import KmsfsError

    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    before = _stat_tuple(victim)
    (volume.backing / ".kmsfs.d").mkdir(mode=0o700, exist_ok=True)
    (volume.backing / ".kmsfs.d" / "lock").symlink_to(victim)
    with pytest.raises(KmsfsError, match="lock"):
        os.close(lock_volume(volume.backing))
    assert _stat_tuple(victim) == before
    os.unlink(volume.backing / ".kmsfs.d" / "lock")
    os.rmdir(volume.backing / ".kmsfs.d")
    (volume.backing / ".kmsfs.d").symlink_to(tmp_path)
    with pytest.raises(KmsfsError, match="kmsfs.d"):
        os.close(lock_volume(volume.backing))
    assert not (tmp_path / "lock").exists()


def test_volume_lock_on_a_read_only_backing_filesystem(volume: Volume, tmp_path: Path) -> None:
    """A snapshot mounted read-only, with no lock file yet: the backing root itself is
    locked (a daemon can still serve it, one at a time)."""
    from kmsfs.backing.volume_lock import lock_volume, volume_in_use
    from kmsfs.errors import MountError

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    subprocess.run(["mount", "--bind", str(volume.backing), str(readonly)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(readonly)], check=True)
        assert not volume_in_use(readonly)
        fd = lock_volume(readonly)
        try:
            assert volume_in_use(readonly)
            with pytest.raises(MountError, match="in use by another kmsfs process"):
                lock_volume(readonly)
        finally:
            os.close(fd)
        assert not (volume.backing / ".kmsfs.d").exists()
    finally:
        subprocess.run(["umount", str(readonly)], check=False)
