"""Online rekey through real mounts (docs/DESIGN.md "Online rekey"): under a workload,
rate limits, status and metrics, selection, refusal in shared mode, metadata kept.

The crash tests (SIGKILL of the daemon during a rekey) are test_rekey_crash.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.lifecycle_support import entry_refs, header_of, write_files
from support.rekey_support import FINISHED, Workload, rekey_status, wait_job
from support.volumes import Volume

from kmsfs.format.header import FORMAT_1, FORMAT_2

pytestmark = requires_fuse

BS = 4096
MB = 1_000_000


def file_ids(volume: Volume, names: list[str]) -> dict[str, bytes]:
    return {name: header_of(volume.backing_path(name)).file_id for name in names}


def test_rekey_under_a_concurrent_workload(volume: Volume) -> None:
    """Format-1 files re-keyed while writers, appenders, truncators, readers holding
    handles, an mmap writer and a renamer work on them: every byte as the model says,
    through the mount and after a remount, and every file in format 2 under a new key."""
    big = 1_500_000
    contents = {
        "writer": os.urandom(big),
        "appender": os.urandom(big // 2),
        "truncator": os.urandom(big),
        "reader": os.urandom(big),
        "sub/reader2": os.urandom(big // 3),
        "mapped": os.urandom(big),
        "renamed": os.urandom(big),
        "still": os.urandom(big),
    }
    (volume.backing / "sub").mkdir()
    write_files(volume.backing, volume.key_file, contents, FORMAT_1)
    before = file_ids(volume, list(contents))
    volume.mount()
    work = Workload(volume.mountpoint, seed=21)
    for kind in ("writer", "appender", "truncator", "reader", "mapped", "renamed"):
        work.add({"mapped": "mmap", "renamed": "renamer"}.get(kind, kind), kind, contents[kind])
    work.add("reader", "sub/reader2", contents["sub/reader2"])
    work.start()
    try:
        time.sleep(0.5)  # the workload is under way before the rekey starts
        # slow enough that every file is switched while the workload runs
        run_kmsfs("rekey", volume.mountpoint, "--max-mbps", "3")
        job = wait_job(volume, timeout=180)
    finally:
        work.stop()
    assert work.problems == []
    assert all(worker.ops > 10 for worker in work.workers), [(w.kind, w.ops) for w in work.workers]
    assert job["state"] == "done", job
    assert (job["files_done"], job["files_skipped"], job["files_failed"]) == (8, 0, 0), job
    models = {w.name: bytes(w.model) for w in work.workers} | {"still": contents["still"]}
    for name, model in models.items():
        assert volume.path(name).read_bytes() == model, name
    volume.umount()
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0
    for name in models:
        header = header_of(volume.backing_path(name))
        assert header.version == FORMAT_2, name
        original = name.split("/")[-1].removesuffix(".moved")
        original = "sub/reader2" if original == "reader2" else original
        assert header.file_id != before[original], name
    volume.mount()
    for name, model in models.items():
        assert volume.path(name).read_bytes() == model, name


def test_rate_limits_are_honoured(volume: Volume) -> None:
    """--max-mbps and --max-files-per-second, measured from outside: within 20 %."""
    volume.mount()
    volume.path("big").mkdir()
    for n in range(6):
        volume.path(f"big/{n}").write_bytes(os.urandom(2 * MB))
    volume.path("small").mkdir()
    for n in range(40):
        volume.path(f"small/f{n}").write_bytes(b"x" * 100)

    def measured(*args: str) -> tuple[float, dict[str, Any]]:
        run_kmsfs("rekey", volume.mountpoint, *args)
        wait_job(volume, timeout=60, until=("running", *FINISHED))
        started = time.monotonic()
        job = wait_job(volume, timeout=120)
        return time.monotonic() - started, job

    seconds, job = measured("--path", "/big", "--max-mbps", "3")
    rate = job["bytes_done"] / seconds / MB
    print(f"--max-mbps 3: {job['bytes_done']} bytes in {seconds:.2f} s = {rate:.2f} MB/s")
    assert job["files_done"] == 6
    assert 0.8 * 3 <= rate <= 1.2 * 3
    seconds, job = measured("--path", "/small", "--max-files-per-second", "8")
    rate = job["files_done"] / seconds
    print(f"--max-files-per-second 8: {job['files_done']} files in {seconds:.2f} s = {rate:.2f}")
    assert job["files_done"] == 40
    assert 0.8 * 8 <= rate <= 1.2 * 8


def test_status_metrics_pause_resume_cancel(volume: Volume) -> None:
    volume.mount("--metrics-listen", "127.0.0.1:0")
    for n in range(8):
        volume.path(f"f{n}").write_bytes(os.urandom(MB))
    run_kmsfs("rekey", volume.mountpoint, "--max-mbps", "1")
    job = wait_job(volume, timeout=60, until=("running",))
    deadline = time.monotonic() + 30
    while (job["rate_bytes_per_second"] is None or job["eta_seconds"] is None) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
        job = rekey_status(volume)
    assert job["files_total"] == 8 and job["bytes_total"] == 8 * MB
    assert 0 < job["rate_bytes_per_second"] < 2 * MB and 0 < job["eta_seconds"] < 60
    shown = run_kmsfs("status", volume.mountpoint).stdout
    assert "rekey:          running: " in shown and " of 8 files" in shown, shown
    assert "1 MB/s" in shown and "ETA " in shown, shown
    url = json.loads(run_kmsfs("status", volume.mountpoint, "--json").stdout)["metrics_url"]
    with urllib.request.urlopen(url, timeout=10) as answer:
        metrics = answer.read().decode()
    assert 'kmsfs_rekey_state{mountpoint="' in metrics
    assert "kmsfs_rekey_files_total{" in metrics and "kmsfs_rekey_eta_seconds{" in metrics
    running = [line for line in metrics.splitlines() if line.startswith("kmsfs_rekey_state{")]
    assert any('state="running"' in line and line.endswith(" 1.0") for line in running), running

    paused = run_kmsfs("rekey", volume.mountpoint, "--pause").stdout
    assert "rekey:          paused" in paused
    first = rekey_status(volume)["bytes_done"]
    time.sleep(1.5)
    assert rekey_status(volume)["bytes_done"] <= first + 256 * 1024  # a chunk under way
    resumed = run_kmsfs("rekey", volume.mountpoint, "--resume", "--json").stdout
    assert json.loads(resumed)["job"]["state"] == "running"
    again = run_kmsfs("rekey", volume.mountpoint, check=False)
    assert again.returncode == 1 and "a rekey job is running already" in again.stderr
    run_kmsfs("rekey", volume.mountpoint, "--cancel")
    job = wait_job(volume, timeout=30)
    assert job["state"] == "cancelled" and job["files_done"] < 8
    assert not (volume.backing / ".kmsfs.d" / "rekey-online.json").exists()
    assert [n for n in os.listdir(volume.backing / ".kmsfs.d") if n.startswith("rekey")] == []
    nothing = run_kmsfs("rekey", volume.mountpoint, "--pause", check=False)
    assert nothing.returncode == 1 and "no rekey job to pause" in nothing.stderr


def test_selection_by_path_master_key_age_and_sealed_count(volume: Volume, tmp_path: Path) -> None:
    volume.mount()
    for name in ("a/one", "a/two", "b/three"):
        volume.path(name).parent.mkdir(exist_ok=True)
        volume.path(name).write_bytes(os.urandom(3 * BS))
    names = ["a/one", "a/two", "b/three"]

    def rekey(*args: str) -> tuple[dict[str, Any], set[str]]:
        ids = file_ids(volume, names)
        run_kmsfs("rekey", volume.mountpoint, *args)
        job = wait_job(volume, timeout=60)
        return job, {n for n, i in file_ids(volume, names).items() if i != ids[n]}

    job, changed = rekey("--path", "/a", "--wait")
    assert changed == {"a/one", "a/two"} and job["files_done"] == 2
    job, changed = rekey("--older-than", "1d")
    assert changed == set() and job["files_done"] == 0
    job, changed = rekey("--master-key", "local:nothing-like-this")
    assert changed == set()
    (ref,) = entry_refs(volume.backing_path("b/three"))
    job, changed = rekey("--master-key", ref, "--path", "/b")
    assert changed == {"b/three"}
    # each 3-block file has sealed at least 3 blocks (its allocated blocks)
    job, changed = rekey("--sealed-more-than", "1000")
    assert changed == set() and job["files_not_due"] == 3
    job, changed = rekey("--sealed-more-than", "2")
    assert changed == set(names)
    offline = run_kmsfs("rekey", tmp_path, "--sealed-more-than", "2", check=False)
    assert offline.returncode == 2 and "needs the daemon's counts" in offline.stderr


def test_metadata_xattrs_and_acls_are_kept(volume: Volume) -> None:
    """Owner, mode, times, user and trusted xattrs and the POSIX ACL of a file survive
    both rekeys.  The offline rekey used to drop the ACL and trusted.* (it copied user.*
    only): its half of this test fails without that fix."""
    volume.mount()
    path = volume.path("f")
    path.write_bytes(b"content")
    os.chown(path, 1234, 5678)
    os.chmod(path, 0o640)
    os.setxattr(path, "user.tag", b"kept")
    os.setxattr(path, "trusted.tag", b"also kept")
    acl = "u::rw-,u:4321:r--,g::r--,m::r--,o::---"
    subprocess.run(["setfacl", "--set", acl, str(path)], check=True)
    os.utime(path, ns=(1_000_000_000, 1_500_000_000))

    def facts() -> tuple[Any, ...]:
        st = os.stat(path)
        got = subprocess.run(["getfacl", "-cp", str(path)], capture_output=True, text=True)
        return (
            st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns,
            os.getxattr(path, "user.tag"), os.getxattr(path, "trusted.tag"), got.stdout,
        )  # fmt: skip

    want = facts()
    assert "user:4321:r--" in want[-1]
    before = header_of(volume.backing_path("f")).file_id
    run_kmsfs("rekey", volume.mountpoint, "--wait")
    online = header_of(volume.backing_path("f")).file_id
    assert online != before and facts() == want
    volume.umount()
    run_kmsfs("rekey", volume.backing, *volume.key_args)
    assert header_of(volume.backing_path("f")).file_id != online
    volume.mount()
    assert facts() == want
    assert path.read_bytes() == b"content"


def test_shared_mount_refuses_naming_the_daemons(volume: Volume, tmp_path: Path) -> None:
    first, second = volume.mountpoint, tmp_path / "mnt2"
    second.mkdir()
    volume.mount("-o", "shared")
    other = run_kmsfs("mount", volume.backing, second, "-o", "shared", *volume.key_args)
    pid = int(other.stdout.split("daemon pid ")[1].split(")")[0])
    try:
        volume.path("f").write_bytes(b"x")
        refused = run_kmsfs("rekey", first, check=False)
        assert refused.returncode == 7, refused.stderr
        assert "served in shared mode by" in refused.stderr
        assert f"pid {volume.daemon_pid} at {first} (shared)" in refused.stderr
        assert f"pid {pid} at {second} (shared)" in refused.stderr
        assert "does not coordinate with other daemons" in refused.stderr
        assert header_of(volume.backing_path("f")).version == FORMAT_2
    finally:
        run_kmsfs("umount", second)


def test_the_rotation_unit_runs_online_and_offline(volume: Volume) -> None:
    """The ExecStart of systemd/kmsfs-rekey@.service, with %i's config: through the daemon
    while the volume is mounted, offline (with the file's key settings) when it is not;
    --older-than skips what the previous run did."""
    unit = (Path(__file__).parents[2] / "systemd/kmsfs-rekey@.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    config = volume.root / "volume.toml"
    config.write_text(
        f'backing = "{volume.backing}"\nmountpoint = "{volume.mountpoint}"\n'
        f'[provider]\ntype = "local"\nkey_file = "{volume.key_file}"\n'
    )
    args = line.split()[2:]  # after "ExecStart=/usr/local/bin/kmsfs rekey"
    args = [str(config) if a == "/etc/kmsfs/%i.toml" else a for a in args]
    args[args.index("360d")] = "0"  # every key is old enough for this test
    volume.mount()
    volume.path("f").write_bytes(b"rotated yearly")
    first = header_of(volume.backing_path("f")).file_id
    result = run_kmsfs("rekey", *args)
    assert f"rekey started by the daemon of {volume.mountpoint}" in result.stdout
    second = header_of(volume.backing_path("f")).file_id
    assert second != first
    volume.umount()
    result = run_kmsfs("rekey", *args)
    assert "rekey: 1 files, 1 re-keyed" in result.stdout
    assert header_of(volume.backing_path("f")).file_id != second
    args[args.index("0")] = "1d"
    assert " 0 re-keyed" in run_kmsfs("rekey", *args).stdout


@pytest.mark.parametrize(
    "journal",
    [b"not json", b'{"version": 1, "selection": {"paths": [5]}, "cutoff": 1}', b"[1, 2]"],
    ids=["garbage", "wrong-type", "not-an-object"],
)
def test_a_malformed_journal_is_reported_not_resumed(volume: Volume, journal: bytes) -> None:
    """The journal is in the backing directory: whoever can write there can change it.
    A malformed one is named in the log and left alone; the volume mounts and serves,
    and a new job replaces it."""
    state = volume.backing / ".kmsfs.d"
    state.mkdir(exist_ok=True)
    (state / "rekey-online.json").write_bytes(journal)
    volume.mount()
    volume.path("f").write_bytes(b"served")
    log = volume.log_text()
    assert "rekey not resumed:" in log and "rekey-online.json" in log, log[-2000:]
    refused = run_kmsfs("rekey", volume.mountpoint, "--resume", check=False)
    assert refused.returncode == 1 and "no rekey job to resume" in refused.stderr
    run_kmsfs("rekey", volume.mountpoint, "--wait")
    assert header_of(volume.backing_path("f")).version == FORMAT_2
    assert not (state / "rekey-online.json").exists()
    assert volume.path("f").read_bytes() == b"served"


@pytest.mark.parametrize("volume", ["encrypted"], indirect=True)
def test_encrypted_names_selection_and_xattrs_online_and_offline(volume: Volume) -> None:
    """With encrypted names the walks meet backing names: ``--path`` is mapped to them
    (also through a long name), and the encrypted user xattr values, bound to the file
    ID, are sealed again under the new one.  Without the mapping nothing is selected;
    without the re-sealing reading the xattr after the rekey fails (EIO)."""
    volume.mount()
    long_dir = "d" * 200  # stored as a long name with a sidecar
    for name in (f"{long_dir}/f", "other/g"):
        volume.path(name).parent.mkdir(exist_ok=True)
        volume.path(name).write_bytes(name.encode() * 1000)
        os.setxattr(volume.path(name), "user.tag", b"kept " + name.encode())
    names = [f"{long_dir}/f", "other/g"]

    def check() -> None:
        for name in names:
            assert volume.path(name).read_bytes() == name.encode() * 1000
            assert os.getxattr(volume.path(name), "user.tag") == b"kept " + name.encode()

    before = file_ids(volume, names)
    run_kmsfs("rekey", volume.mountpoint, "--path", "/" + long_dir, "--wait")
    job = wait_job(volume, timeout=60)
    after = file_ids(volume, names)
    assert job["files_done"] == 1 and job["files_failed"] == 0
    assert after[names[0]] != before[names[0]] and after[names[1]] == before[names[1]]
    check()
    volume.umount()
    run_kmsfs("rekey", volume.backing, *volume.key_args, "--path", "/other")
    offline = file_ids(volume, names)
    assert offline[names[0]] == after[names[0]] and offline[names[1]] != after[names[1]]
    volume.mount()
    check()
