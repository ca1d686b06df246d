"""Key lifecycle: rewrap, keys add/remove/list, passwd, rekey, import, headers export/import."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support.cli import BIN, run_kmsfs
from support.fuse import requires_fuse
from support.lifecycle_support import entry_refs, header_of, populate, write_files
from support.volumes import Volume, make_volume

from kmsfs.format.content import Layout
from kmsfs.format.header import FORMAT_1, FORMAT_2
from kmsfs.format.volume_config import load_config


def _key_ref(volume: Volume) -> str:
    return load_config(volume.backing).keys[0].key_ref


def _read_all(vol: Volume, contents: dict[str, bytes]) -> None:
    for rel, data in contents.items():
        assert vol.path(rel).read_bytes() == data, rel


@requires_fuse
def test_rewrap_a_to_b_then_mount_with_b_only(volume: Volume, tmp_path: Path) -> None:
    contents = populate(volume.backing, volume.key_file, 40, size=9000)
    volume.mount()
    volume.path("big").write_bytes(os.urandom(300_000))
    contents["big"] = volume.path("big").read_bytes()
    os.link(volume.path("big"), volume.path("big-link"))
    volume.umount()
    old_ref = _key_ref(volume)
    key_b = tmp_path / "b.key"

    dry = run_kmsfs(
        "rewrap",
        volume.backing,
        "--old-key-file",
        volume.key_file,
        "--key-file",
        key_b,
        "--dry-run",
    )
    assert "dry run: 41 files, 41 would be re-wrapped" in dry.stdout
    assert not key_b.exists() and load_config(volume.backing).keys[0].key_ref == old_ref

    result = run_kmsfs(
        "rewrap", volume.backing, "--old-key-file", volume.key_file, "--key-file", key_b
    )
    assert "rewrap: 41 files, 41 re-wrapped" in result.stdout
    assert "41 old entries removed" in result.stdout
    config = load_config(volume.backing)
    assert len(config.keys) == 1 and config.keys[0].key_ref != old_ref
    new_ref = config.keys[0].key_ref
    assert f"volume now uses {new_ref}; removed {old_ref}" in result.stdout
    for rel in contents:
        assert entry_refs(volume.backing / rel) == [new_ref]

    volume.key_file.rename(tmp_path / "a.key.gone")  # only B is left
    volume.mount("--key-file", key_b)
    _read_all(volume, contents)
    volume.umount()
    # the old key is refused
    wrong = run_kmsfs("fsck", volume.backing, "--key-file", tmp_path / "a.key.gone", check=False)
    assert wrong.returncode == 6
    assert run_kmsfs("fsck", volume.backing, "--key-file", key_b).returncode == 0
    # a second run has nothing to do
    again = run_kmsfs("rewrap", volume.backing, "--old-key-file", key_b, "--key-file", key_b)
    assert "0 re-wrapped" in again.stdout and "41 already had the key" in again.stdout


def test_rewrap_killed_then_resumed(volume: Volume, tmp_path: Path) -> None:
    contents = populate(volume.backing, volume.key_file, 4000, size=10)
    key_b = tmp_path / "b.key"
    journal = volume.backing / ".kmsfs.d" / "rewrap.json"
    process = subprocess.Popen(
        [
            str(BIN),
            "rewrap",
            str(volume.backing),
            "--key-file",
            str(key_b),
            "--quiet",
            "--old-key-file",
            str(volume.key_file),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it in the middle of the cover pass (files are walked in sorted order): after a
    # random number of headers of d0..d4 got their new entry, before d5 is reached.
    target = sorted(contents)[random.randrange(200, 1600)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if len(entry_refs(volume.backing / target)) == 2:
            break
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "rewrap finished before it could be killed"
    assert journal.exists()
    refs = [key.key_ref for key in load_config(volume.backing).keys]
    covered = sum(len(entry_refs(volume.backing / rel)) == 2 for rel in contents)
    assert len(refs) == 2 or covered == 0  # the new key is recorded before any header changes
    # an interrupted rewrap leaves a volume the old key still opens completely
    if len(refs) == 2:
        partial = run_kmsfs(
            "fsck", volume.backing, "--quick", "--json", "--key-file", volume.key_file, check=False
        )
        findings = json.loads(partial.stdout)["findings"]
        assert {f["kind"] for f in findings} <= {"missing-entry"}  # no unwrap failure
        assert len(findings) == 4000 - covered

    result = run_kmsfs(
        "rewrap", volume.backing, "--old-key-file", volume.key_file, "--key-file", key_b, "--json"
    )
    report = json.loads(result.stdout)
    assert report["finished"] is True and report["problems"] == []
    assert report["files"] == 4000
    assert report["rewrapped"] + report["already"] == 4000  # nothing re-wrapped twice
    assert report["already"] == covered
    assert not journal.exists()
    config = load_config(volume.backing)
    if len(refs) == 2:
        assert [k.key_ref for k in config.keys] == [refs[-1]]
    new_ref = config.keys[0].key_ref
    for rel in contents:
        assert entry_refs(volume.backing / rel) == [new_ref]
    check = run_kmsfs("fsck", volume.backing, "--key-file", key_b)
    assert "fsck: 4000 files, 4000 ok" in check.stdout


@requires_fuse
def test_rewrap_while_mounted_with_writes(volume: Volume, tmp_path: Path) -> None:
    contents = populate(volume.backing, volume.key_file, 1500, size=200)
    volume.mount()
    key_b = tmp_path / "b.key"
    written: dict[str, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        n = 0
        try:
            while not stop.is_set():
                data = os.urandom(5000 + n)
                volume.path(f"new{n}").write_bytes(data)
                written[f"new{n}"] = data
                with open(volume.path("d0/f00000"), "ab") as handle:
                    handle.write(b"appended\n")
                contents["d0/f00000"] += b"appended\n"
                n += 1
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        result = run_kmsfs(
            "rewrap", volume.backing, "--old-key-file", volume.key_file, "--key-file", key_b
        )
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert written
    assert "volume is mounted at" in result.stdout
    assert "run the same command again to finish" in result.stdout
    assert len(load_config(volume.backing).keys) == 2  # not switched while mounted
    _read_all(volume, {**contents, **written})  # the mount kept serving
    volume.umount()

    finish = run_kmsfs(
        "rewrap", volume.backing, "--old-key-file", volume.key_file, "--key-file", key_b
    )
    assert "volume now uses" in finish.stdout
    assert len(load_config(volume.backing).keys) == 1
    volume.key_file.unlink()
    volume.mount("--key-file", key_b)
    _read_all(volume, {**contents, **written})
    volume.umount()


@requires_fuse
def test_several_keys_mount_with_either(volume: Volume, tmp_path: Path) -> None:
    contents = populate(volume.backing, volume.key_file, 30)
    key_b = tmp_path / "b.key"
    add = run_kmsfs(
        "keys", "add", volume.backing, "--old-key-file", volume.key_file, "--key-file", key_b
    )
    assert "done: every file is wrapped under local:" in add.stdout
    config = load_config(volume.backing)
    ref_a, ref_b = (key.key_ref for key in config.keys)
    listing = run_kmsfs("keys", "list", volume.backing).stdout.splitlines()
    assert listing[0].startswith(f"0: local {ref_a} (key_file=")
    assert listing[1].startswith(f"1: local {ref_b} (key_file=")
    for rel in contents:
        assert entry_refs(volume.backing / rel) == [ref_a, ref_b]
    again = run_kmsfs(
        "keys",
        "add",
        volume.backing,
        "--old-key-file",
        volume.key_file,
        "--key-file",
        key_b,
        check=False,
    )
    assert again.returncode == 2 and "already a key of this volume" in again.stderr

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for only, other in ((volume.key_file, key_b), (key_b, volume.key_file)):
        other.rename(hidden / other.name)
        volume.mount("--key-file", only)
        _read_all(volume, contents)
        volume.path(f"made-with-{only.name}").write_bytes(b"both keys?")
        volume.umount()
        (hidden / other.name).rename(other)
    # a file made by a daemon that had only one key lacks the other: fsck says so
    check = run_kmsfs("fsck", volume.backing, *volume.key_args, check=False)
    assert check.returncode == 5
    assert f"made-with-master.key: missing-entry: no wrapped key for master key {ref_b}" in (
        check.stdout
    )

    removed = run_kmsfs("keys", "remove", volume.backing, ref_a, *volume.key_args, check=False)
    assert removed.returncode == 1  # made-with-master.key has no entry for any other key
    assert "1 files have no entry for any other key and would become unreadable:" in (
        removed.stderr
    )
    assert "made-with-master.key" in removed.stderr
    (volume.backing / "made-with-master.key").unlink()
    removed = run_kmsfs("keys", "remove", volume.backing, ref_a, *volume.key_args)
    assert f"removed {ref_a}" in removed.stdout
    assert [k.key_ref for k in load_config(volume.backing).keys] == [ref_b]
    for rel in contents:
        assert entry_refs(volume.backing / rel) == [ref_b]
    last = run_kmsfs("keys", "remove", volume.backing, ref_b, *volume.key_args, check=False)
    assert last.returncode == 2 and "only key: refusing" in last.stderr


def test_rewrap_wrong_old_key_is_refused(volume: Volume, tmp_path: Path) -> None:
    populate(volume.backing, volume.key_file, 3)
    other = tmp_path / "other.key"
    (tmp_path / "o2").mkdir()
    run_kmsfs("init", tmp_path / "o2", "--key-file", other)
    result = run_kmsfs(
        "rewrap",
        volume.backing,
        "--key-file",
        tmp_path / "b.key",
        "--old-key-file",
        other,
        check=False,
    )
    assert result.returncode == 6 and "wrong key" in result.stderr


@pytest.mark.slow
def test_rewrap_10000_files_timing(volume: Volume, tmp_path: Path) -> None:
    populate(volume.backing, volume.key_file, 10_000, size=10)
    start = time.monotonic()
    result = run_kmsfs(
        "rewrap",
        volume.backing,
        "--old-key-file",
        volume.key_file,
        "--key-file",
        tmp_path / "b.key",
        timeout=600,
    )
    elapsed = time.monotonic() - start
    assert "rewrap: 10000 files, 10000 re-wrapped" in result.stdout
    print(f"rewrap of 10,000 files local->local: {elapsed:.2f} s")


def _snapshot(backing: Path) -> dict[str, tuple[int, int, int, int, int, bytes]]:
    out = {}
    for path in sorted(backing.rglob("*")):
        rel = str(path.relative_to(backing))
        if rel.startswith(".kmsfs") or not path.is_file() or path.is_symlink():
            continue
        st = path.lstat()
        try:
            tag = os.getxattr(path, "user.tag")
        except OSError:
            tag = b""
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink, tag)
    return out


@requires_fuse
def test_rekey_preserves_content_links_and_metadata(volume: Volume) -> None:
    volume.mount()
    contents = {
        "a": os.urandom(3 * 4096 + 5),
        "dir/b": b"small\n",
        "empty": b"",
        "sparse": bytes(1 << 20) + b"end",
    }
    for rel, data in contents.items():
        volume.path(rel).parent.mkdir(exist_ok=True)
        volume.path(rel).write_bytes(data)
    os.link(volume.path("a"), volume.path("dir/a-link"))
    contents["dir/a-link"] = contents["a"]
    os.setxattr(volume.path("dir/b"), "user.tag", b"kept")
    os.chmod(volume.path("dir/b"), 0o640)
    os.chown(volume.path("dir/b"), 1234, 5678)
    os.utime(volume.path("a"), ns=(1_000_000_000, 1_500_000_000_123))
    os.symlink("dir/b", volume.path("sym"))
    volume.umount()
    before = _snapshot(volume.backing)
    ids = {rel: os.getxattr(volume.backing / rel, "user.kmsfs.header")[28:44] for rel in before}
    dir_mtime = (volume.backing / "dir").stat().st_mtime_ns

    not_due = run_kmsfs("rekey", volume.backing, "--older-than", "1d", *volume.key_args)
    assert "0 re-keyed" in not_due.stdout and "4 not due" in not_due.stdout
    result = run_kmsfs("rekey", volume.backing, *volume.key_args)
    assert "rekey: 4 files, 4 re-keyed" in result.stdout
    after = _snapshot(volume.backing)
    assert after == before  # mode, owner, mtime, link count, user xattrs
    for rel in before:
        assert os.getxattr(volume.backing / rel, "user.kmsfs.header")[28:44] != ids[rel], rel
    assert os.path.samefile(volume.backing / "a", volume.backing / "dir/a-link")
    assert (volume.backing / "dir").stat().st_mtime_ns == dir_mtime
    assert (volume.backing / "sparse").stat().st_blocks * 512 < 100_000  # still sparse
    again = run_kmsfs("rekey", volume.backing, "--older-than", "1h", *volume.key_args)
    assert "0 re-keyed" in again.stdout
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0
    volume.mount()
    _read_all(volume, contents)
    assert os.readlink(volume.path("sym")) == "dir/b"
    volume.umount()


def test_rekey_killed_then_resumed(volume: Volume) -> None:
    contents = populate(volume.backing, volume.key_file, 1500, size=5000)
    for n in range(0, 1500, 100):  # some hard links across directories
        os.link(volume.backing / f"d{n % 10}/f{n:05d}", volume.backing / f"d9/link{n}")
    journal = volume.backing / ".kmsfs.d" / "rekey.json"
    process = subprocess.Popen(
        [str(BIN), "rekey", str(volume.backing), "--quiet", *volume.key_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it in the middle (files are walked in sorted order, each replaced by a copy
    # under a new file ID): once a random file between the 100th and the 1300th was
    # re-keyed, whatever the machine's speed.
    target = volume.backing / sorted(contents)[random.randrange(100, 1300)]
    before = header_of(target).file_id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if header_of(target).file_id != before:
            break
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "rekey finished before it could be killed"
    result = run_kmsfs("rekey", volume.backing, *volume.key_args)
    assert "0 failed" in result.stdout
    done = int(result.stdout.split(" re-keyed")[0].rsplit(" ", 1)[1])
    assert 0 < done < 1500  # the first run did the rest
    assert not journal.exists()
    assert (
        " 0 re-keyed"
        in run_kmsfs("rekey", volume.backing, "--older-than", "1h", *volume.key_args).stdout
    )
    for n in range(0, 1500, 100):
        assert os.path.samefile(
            volume.backing / f"d{n % 10}/f{n:05d}", volume.backing / f"d9/link{n}"
        )
    check = run_kmsfs("fsck", volume.backing, *volume.key_args)
    assert "fsck: 1515 files, 1515 ok" in check.stdout
    out = volume.root / "out"
    for rel in list(contents)[::97]:
        run_kmsfs("decrypt", volume.backing / rel, out, *volume.key_args)
        assert out.read_bytes() == contents[rel]
        out.unlink()


def _plain_tree(tmp_path: Path) -> Path:
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree("/usr/include/linux", plain / "linux", symlinks=True)
    os.link(plain / "linux" / "fs.h", plain / "fs-hardlink.h")
    os.symlink("linux/fs.h", plain / "fs-symlink.h")
    (plain / "empty").write_bytes(b"")
    (plain / "sparse").write_bytes(b"")
    os.truncate(plain / "sparse", 5 << 20)
    os.setxattr(plain / "empty", "user.origin", b"import-test")
    os.chmod(plain / "empty", 0o604)
    os.utime(plain / "empty", ns=(1_000_000_000, 2_000_000_000))
    return plain


def _compare_tree(plain: Path, mountpoint: Path) -> int:
    count = 0
    for path in plain.rglob("*"):
        rel = path.relative_to(plain)
        target = mountpoint / rel
        st, tt = path.lstat(), target.lstat()
        assert st.st_mode == tt.st_mode, rel
        if path.is_symlink():
            assert os.readlink(target) == os.readlink(path)
        elif path.is_file():
            assert target.read_bytes() == path.read_bytes(), rel
            assert st.st_mtime_ns == tt.st_mtime_ns, rel
            count += 1
    return count


@requires_fuse
def test_import_tree_byte_exact(tmp_path: Path) -> None:
    from support.fuse import force_unmount

    plain = _plain_tree(tmp_path)
    before = {p: p.read_bytes() for p in plain.rglob("*") if p.is_file() and not p.is_symlink()}
    vol = make_volume(tmp_path, key=False)
    result = run_kmsfs("import", plain, vol.backing, "--key-file", vol.key_file, timeout=300)
    vol.encrypted_names = True  # import's default
    assert "import:" in result.stdout and "1 hard links" in result.stdout
    after = {p: p.read_bytes() for p in plain.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before  # the plaintext is untouched
    assert run_kmsfs("fsck", vol.backing, *vol.key_args).returncode == 0
    try:
        vol.mount()
        assert _compare_tree(plain, vol.mountpoint) == len(before)
        assert os.getxattr(vol.path("empty"), "user.origin") == b"import-test"
        assert os.stat(vol.path("fs-hardlink.h")).st_nlink == 2
        vol.umount()
    finally:
        force_unmount(vol.mountpoint)
    assert vol.backing_path("sparse").stat().st_blocks * 512 < 100_000
    # every file is written in format 2, with its format marker
    for rel in ("empty", "sparse", "linux/fs.h"):
        assert header_of(vol.backing_path(rel)).version == FORMAT_2, rel
        assert vol.backing_path(rel).stat().st_mode & stat.S_ISVTX, rel


@requires_fuse
def test_rekey_moves_format_1_files_to_format_2(volume: Volume) -> None:
    contents = {"one": os.urandom(5 * 4096 + 7), "two": b"", "three": os.urandom(100)}
    write_files(volume.backing, volume.key_file, contents, FORMAT_1)
    os.chmod(volume.backing / "one", 0o600)
    result = run_kmsfs("rekey", volume.backing, *volume.key_args)
    assert "rekey: 3 files, 3 re-keyed" in result.stdout
    for rel, data in contents.items():
        assert header_of(volume.backing / rel).version == FORMAT_2, rel
        backing = (volume.backing / rel).stat()
        assert backing.st_size == Layout(4096, FORMAT_2).backing_size(len(data)), rel
        assert backing.st_mode & stat.S_ISVTX, rel
    assert stat.S_IMODE((volume.backing / "one").stat().st_mode) == 0o1600
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0
    volume.mount()
    _read_all(volume, contents)
    assert stat.S_IMODE(volume.path("one").stat().st_mode) == 0o600
    volume.umount()


@requires_fuse
def test_import_killed_then_resumed(tmp_path: Path) -> None:
    from support.fuse import force_unmount

    plain = _plain_tree(tmp_path)
    vol = make_volume(tmp_path, key=False)
    journal = vol.backing / ".kmsfs.d" / "import.json"
    process = subprocess.Popen(
        [str(BIN), "import", str(plain), str(vol.backing), "--key-file", str(vol.key_file), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # kill it part-way: once a random number of the tree's files have been written
    total = sum(1 for p in plain.rglob("*") if p.is_file() and not p.is_symlink())
    target = random.randrange(total // 10, total // 2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            done = sum(
                1 for p in vol.backing.rglob("*") if p.is_file() and ".kmsfs.d" not in p.parts
            )
        except FileNotFoundError:  # a directory import was renaming into place: count again
            continue
        if journal.exists() and done >= target:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "import finished before it could be killed"
    other = run_kmsfs("import", tmp_path, vol.backing, "--key-file", vol.key_file, check=False)
    assert other.returncode != 0
    result = run_kmsfs("import", plain, vol.backing, "--key-file", vol.key_file, timeout=300)
    assert "already done" in result.stdout and not journal.exists()
    assert run_kmsfs("fsck", vol.backing, *vol.key_args).returncode == 0
    try:
        vol.mount()
        assert _compare_tree(plain, vol.mountpoint) > 100
        vol.umount()
    finally:
        force_unmount(vol.mountpoint)


def test_headers_export_import(volume: Volume, tmp_path: Path) -> None:
    contents = populate(volume.backing, volume.key_file, 20)
    export = tmp_path / "headers.jsonl"
    result = run_kmsfs("headers", "export", volume.backing, export)
    assert "exported 20 headers" in result.stdout
    lines = export.read_text().splitlines()
    assert json.loads(lines[0])["kmsfs_headers"] == 1 and len(lines) == 21
    for rel in contents:  # a backup tool that drops xattrs and mode bits (cp -r)
        os.removexattr(volume.backing / rel, "user.kmsfs.header")
        os.chmod(volume.backing / rel, 0o644)
    broken = run_kmsfs("fsck", volume.backing, *volume.key_args, check=False)
    assert broken.returncode == 5 and broken.stdout.count("no-header") == 20
    restored = run_kmsfs("headers", "import", volume.backing, export)
    assert "20 restored" in restored.stdout and "20 format markers restored" in restored.stdout
    for rel in contents:
        assert stat.S_IMODE((volume.backing / rel).stat().st_mode) == 0o1644, rel
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0
    assert "20 unchanged" in run_kmsfs("headers", "import", volume.backing, export).stdout


def test_passwd_changes_the_passphrase(tmp_path: Path) -> None:
    old, new = tmp_path / "old.pass", tmp_path / "new.pass"
    old.write_text("correct horse\n")
    new.write_text("battery staple\n")
    old.chmod(0o600)  # secret files must be private (kmsfs.keys.secrets)
    new.chmod(0o600)
    vol = make_volume(tmp_path, key=False)
    run_kmsfs("init", vol.backing, "--passphrase-file", old)
    ref = load_config(vol.backing).keys[0].key_ref
    result = run_kmsfs(
        "passwd", vol.backing, "--old-passphrase-file", new, "--passphrase-file", old, check=False
    )
    assert result.returncode == 6 and "wrong passphrase" in result.stderr
    result = run_kmsfs(
        "passwd", vol.backing, "--old-passphrase-file", old, "--passphrase-file", new
    )
    assert f"passphrase changed for {ref}" in result.stdout
    assert run_kmsfs("fsck", vol.backing, "--passphrase-file", new).returncode == 0
    refused = run_kmsfs("fsck", vol.backing, "--passphrase-file", old, check=False)
    assert refused.returncode == 6
    key_file_vol = run_kmsfs("passwd", tmp_path / "nowhere", check=False)
    assert key_file_vol.returncode == 2


@pytest.mark.parametrize("crash_at", ["before-exchange", "after-exchange"])
def test_rekey_crash_around_the_exchange_is_finished_by_the_next_run(
    volume: Volume, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    """rekey puts the new file in place with one atomic exchange, then drops the old one
    from .kmsfs.d.  A crash on either side of the exchange (simulated by an exception
    out of an in-process run, which leaves the journal and .kmsfs.d as a kill would) is
    finished by the next run: both names of a hard-linked file end on one re-keyed inode."""
    from kmsfs.keys.cache import NullCache
    from kmsfs.lifecycle import rekey
    from kmsfs.volume_open import open_volume

    contents = populate(volume.backing, volume.key_file, 3, size=5000)
    os.link(volume.backing / "d0/f00000", volume.backing / "d2/link")
    old_id = os.getxattr(volume.backing / "d0/f00000", "user.kmsfs.header")[28:44]
    real_exchange = rekey.renameat2

    class Crash(Exception):
        pass

    def exchange(*args: object) -> None:
        if crash_at == "after-exchange":
            real_exchange(*args)  # type: ignore[arg-type]
        raise Crash

    monkeypatch.setattr(rekey, "renameat2", exchange)
    options = {"key_file": str(volume.key_file)}
    config, keyring = open_volume(volume.backing, options, None, NullCache())
    try:
        with pytest.raises(Crash):
            rekey.rekey_volume(volume.backing, config, keyring)
    finally:
        keyring.close()
    monkeypatch.undo()
    assert (volume.backing / ".kmsfs.d/rekey-tmp").exists()  # as a kill would leave it
    result = run_kmsfs("rekey", volume.backing, *volume.key_args)
    assert "0 failed" in result.stdout
    assert not (volume.backing / ".kmsfs.d/rekey-tmp").exists()
    assert os.path.samefile(volume.backing / "d0/f00000", volume.backing / "d2/link")
    assert os.getxattr(volume.backing / "d0/f00000", "user.kmsfs.header")[28:44] != old_id
    assert "fsck: 4 files, 4 ok" in run_kmsfs("fsck", volume.backing, *volume.key_args).stdout
    out = volume.root / "out"
    for rel in ("d0/f00000", "d2/link"):
        run_kmsfs("decrypt", volume.backing / rel, out, *volume.key_args)
        assert out.read_bytes() == contents["d0/f00000"]
        out.unlink()


def test_offline_rekey_selects_by_path_and_master_key(volume: Volume) -> None:
    contents = populate(volume.backing, volume.key_file, 20, size=300)  # d0..d9
    ids = {rel: header_of(volume.backing / rel).file_id for rel in contents}
    result = run_kmsfs("rekey", volume.backing, "--path", "/d3", "--path", "d5/", *volume.key_args)
    assert "rekey: 20 files, 4 re-keyed" in result.stdout and "16 not due" in result.stdout
    changed = {rel for rel in contents if header_of(volume.backing / rel).file_id != ids[rel]}
    assert changed == {rel for rel in contents if rel.startswith(("d3/", "d5/"))}
    other = run_kmsfs("rekey", volume.backing, "--master-key", "local:none", *volume.key_args)
    assert " 0 re-keyed" in other.stdout
    (ref,) = entry_refs(volume.backing / "d0/f00000")
    run_kmsfs("rekey", volume.backing, "--master-key", ref, "--older-than", "0", *volume.key_args)
    assert all(header_of(volume.backing / rel).file_id != ids[rel] for rel in contents)
    bad = run_kmsfs("rekey", volume.backing, "--path", "../etc", *volume.key_args, check=False)
    assert bad.returncode == 2 and "give a path in the volume" in bad.stderr
