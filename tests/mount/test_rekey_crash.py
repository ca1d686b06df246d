"""SIGKILL of the daemon during an online rekey, then remount (docs/DESIGN.md "Online
rekey", "Crash safety and resume"): every file reads with its old or its new key, what
was fsynced is there, fsck is clean, and the journalled job resumes by itself (paused if
it was) and finishes without doing again what was done.

The kills are real: ``kill_daemon`` sends SIGKILL and clears the dead mount.  Where the
kill lands is chosen by what the job shows (a file half copied, a paused job) or, for
the random kills under the crash harness's writer, by a seeded delay.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any

import pytest
from support.cli import run_kmsfs
from support.crash_harness import check, start_writer
from support.fuse import requires_fuse
from support.lifecycle_support import header_of
from support.rekey_support import rekey_status, wait_job
from support.reliability_util import env_int, kill_daemon, mount_pid, scaled
from support.volumes import Volume

from kmsfs.errors import MountError
from kmsfs.server.status import query

pytestmark = requires_fuse

MB = 1_000_000
TMP = ".kmsfs.d/rekey-online-tmp"
JOURNAL = ".kmsfs.d/rekey-online.json"


def wait_for(volume: Volume, predicate: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = rekey_status(volume)
        if predicate(job):
            return job
        time.sleep(0.02)
    pytest.fail(f"the job never got there in {timeout} s: {rekey_status(volume)}")


def fill(volume: Volume, count: int, size: int) -> dict[str, bytes]:
    contents = {f"f{n:02d}": os.urandom(size + n) for n in range(count)}
    for name, data in contents.items():
        volume.path(name).write_bytes(data)
    return contents


def test_killed_mid_copy_resumes_at_mount_and_redoes_nothing(volume: Volume) -> None:
    mount_pid_ = mount_pid(volume)
    contents = fill(volume, 6, 2 * MB)
    ids = {name: header_of(volume.backing_path(name)).file_id for name in contents}
    run_kmsfs("rekey", volume.mountpoint, "--max-mbps", "4")
    # the third file half copied: two files done and switched, one mirrored
    job = wait_for(volume, lambda j: j["files_done"] == 2 and (j["bytes_done"] or 0) > 4.5 * MB)
    kill_daemon(volume, mount_pid_)
    assert (volume.backing / TMP).exists()  # the new file of the one half copied
    assert (volume.backing / JOURNAL).exists()
    done = {n for n in contents if header_of(volume.backing_path(n)).file_id != ids[n]}
    assert len(done) == 2, done
    done_ids = {n: header_of(volume.backing_path(n)).file_id for n in done}

    mount_pid(volume)  # the job resumes by itself
    job = wait_job(volume, timeout=120)
    # 4 re-keyed now; the 2 done before count if the journal's counters (written every
    # 2 s) had them
    assert job["state"] == "done" and 4 <= job["files_done"] <= 6, job
    assert job["files_done"] == job["files_total"], job
    assert not (volume.backing / TMP).exists() and not (volume.backing / JOURNAL).exists()
    for name, data in contents.items():
        assert volume.path(name).read_bytes() == data, name
        if name in done:  # not re-keyed again: born after the job's cutoff
            assert header_of(volume.backing_path(name)).file_id == done_ids[name], name
        else:
            assert header_of(volume.backing_path(name)).file_id != ids[name], name
    assert "resuming the rekey journalled in" in volume.log_text()
    volume.umount()
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0


def test_killed_while_paused_stays_paused_until_resumed(volume: Volume) -> None:
    pid = mount_pid(volume)
    contents = fill(volume, 4, MB)
    run_kmsfs("rekey", volume.mountpoint, "--max-mbps", "2")
    wait_for(volume, lambda j: j["files_done"] >= 1)
    run_kmsfs("rekey", volume.mountpoint, "--pause")
    kill_daemon(volume, pid)
    assert json.loads((volume.backing / JOURNAL).read_text())["paused"] is True
    mount_pid(volume)
    job = wait_for(volume, lambda j: j.get("state") == "paused")
    time.sleep(1)
    assert rekey_status(volume)["files_done"] == job["files_done"]  # paused: nothing moves
    run_kmsfs("rekey", volume.mountpoint, "--resume")
    assert wait_job(volume, timeout=60)["files_done"] == 4
    for name, data in contents.items():
        assert volume.path(name).read_bytes() == data


@pytest.mark.slow
def test_sigkill_at_random_points_of_rekeys_under_a_writer(volume: Volume) -> None:
    """Jobs started one after the other re-key the files of the crash harness's writer
    (creates, writes, truncates, renames, fsyncs, atomic replaces) and static files,
    while the daemon is killed at seeded random moments; after each remount the
    harness's checker holds (nothing fsynced lost, no EIO but where FORMAT.md admits
    it, no byte from nowhere) and the static files read back exactly."""
    iterations = env_int("KMSFS_REKEY_CRASH_ITERATIONS", scaled(6))
    base_seed = env_int("KMSFS_CRASH_SEED", 2100)
    pid = mount_pid(volume)
    static = fill(volume, 20, 300_000)
    seen = {"new file left": 0, "nothing left": 0}
    for i in range(iterations):
        seed = base_seed + i
        rng = random.Random(seed)
        directory = volume.path(f"it{i}")
        directory.mkdir()
        journal = volume.root / f"journal-{seed}"
        writer = start_writer(directory, journal, seed)
        stop = threading.Event()
        starter = threading.Thread(target=_keep_rekeying, args=(volume, stop))
        starter.start()
        time.sleep(rng.uniform(0.3, 2.0))
        kill_daemon(volume, pid)
        stop.set()
        starter.join(timeout=30)
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, f"seed {seed}: writer failed: {err}"
        seen["new file left" if (volume.backing / TMP).exists() else "nothing left"] += 1

        pid = mount_pid(volume)  # recovers, and resumes the job if one was journalled
        result = check(directory, journal, seed, volume.log_text)
        assert not result.problems, f"seed {seed} (journal {journal}):\n" + "\n".join(
            result.problems
        )
        for name in result.eio:
            os.unlink(directory / name)
        for name, data in static.items():
            assert volume.path(name).read_bytes() == data, (seed, name)
    print(f"rekey crash iterations: {iterations}, where the kills left the rekey: {seen}")
    try:
        run_kmsfs("rekey", volume.mountpoint, "--cancel", check=False)
        # the last kill may have left no journal (the job had ended, or none had
        # started): then the remount resumes nothing and the daemon reports no job
        wait_job(volume, timeout=60, or_none_without=volume.backing / JOURNAL)
    finally:
        volume.umount()
    assert not (volume.backing / TMP).exists()
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0


def _keep_rekeying(volume: Volume, stop: threading.Event) -> None:
    """Start a rekey job whenever none runs, until *stop* or the daemon is gone."""
    while not stop.is_set():
        try:
            job = rekey_status(volume)
            if job.get("state") in (None, "done", "cancelled", "failed"):
                query(str(volume.mountpoint), "rekey-start {}")
        except (MountError, OSError, ValueError):
            return
        time.sleep(0.05)
