"""Key lifecycle: rewrap, keys add/remove/list, passwd, rekey, import, headers export/import."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, Volume, requires_fuse, run_kmsfs
from lifecycle_support import entry_refs, populate

from kmsfs.format.volume import load_config


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

    dry = run_kmsfs("rewrap", volume.backing, "--key-file", key_b, "--dry-run")
    assert "dry run: 41 files, 41 would be re-wrapped" in dry.stdout
    assert not key_b.exists() and load_config(volume.backing).keys[0].key_ref == old_ref

    result = run_kmsfs("rewrap", volume.backing, "--key-file", key_b)
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
    again = run_kmsfs("rewrap", volume.backing, "--key-file", key_b)
    assert "0 re-wrapped" in again.stdout and "41 already had the key" in again.stdout


def test_rewrap_killed_then_resumed(volume: Volume, tmp_path: Path) -> None:
    contents = populate(volume.backing, volume.key_file, 4000, size=10)
    key_b = tmp_path / "b.key"
    journal = volume.backing / ".kmsfs.d" / "rewrap.json"
    process = subprocess.Popen(
        [str(BIN), "rewrap", str(volume.backing), "--key-file", str(key_b), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not journal.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    time.sleep(random.uniform(0.05, 0.4))
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

    result = run_kmsfs("rewrap", volume.backing, "--key-file", key_b, "--json")
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
        result = run_kmsfs("rewrap", volume.backing, "--key-file", key_b)
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

    finish = run_kmsfs("rewrap", volume.backing, "--key-file", key_b)
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
    add = run_kmsfs("keys", "add", volume.backing, "--key-file", key_b)
    assert "done: every file is wrapped under local:" in add.stdout
    config = load_config(volume.backing)
    ref_a, ref_b = (key.key_ref for key in config.keys)
    listing = run_kmsfs("keys", "list", volume.backing).stdout.splitlines()
    assert listing[0].startswith(f"0: local {ref_a} (key_file=")
    assert listing[1].startswith(f"1: local {ref_b} (key_file=")
    for rel in contents:
        assert entry_refs(volume.backing / rel) == [ref_a, ref_b]
    again = run_kmsfs("keys", "add", volume.backing, "--key-file", key_b, check=False)
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
    check = run_kmsfs("fsck", volume.backing, check=False)
    assert check.returncode == 5
    assert f"made-with-master.key: missing-entry: no wrapped key for master key {ref_b}" in (
        check.stdout
    )

    removed = run_kmsfs("keys", "remove", volume.backing, ref_a, check=False)
    assert removed.returncode == 1  # made-with-master.key has no entry for any other key
    assert "1 files have no entry for any other key and would become unreadable:" in (
        removed.stderr
    )
    assert "made-with-master.key" in removed.stderr
    (volume.backing / "made-with-master.key").unlink()
    removed = run_kmsfs("keys", "remove", volume.backing, ref_a)
    assert f"removed {ref_a}" in removed.stdout
    assert [k.key_ref for k in load_config(volume.backing).keys] == [ref_b]
    for rel in contents:
        assert entry_refs(volume.backing / rel) == [ref_b]
    last = run_kmsfs("keys", "remove", volume.backing, ref_b, check=False)
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
    result = run_kmsfs("rewrap", volume.backing, "--key-file", tmp_path / "b.key", timeout=600)
    elapsed = time.monotonic() - start
    assert "rewrap: 10000 files, 10000 re-wrapped" in result.stdout
    print(f"rewrap of 10,000 files local->local: {elapsed:.2f} s")
