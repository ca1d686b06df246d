"""Crash consistency: SIGKILL the daemon under a writer workload, remount, check.

The contract (what may survive) is written in tests/support/crash_harness.py.  CI runs
KMSFS_CRASH_ITERATIONS (default 10 x KMSFS_RELIABILITY_SCALE) kills;
``scripts/reliability --crash-iterations N`` runs more.  Each iteration is
seeded (base seed KMSFS_CRASH_SEED, default 1000): a failure prints the seed
and the journal, and re-running with that seed repeats the workload (the kill
time is seeded too, so the kill point is repeated approximately).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.crash_harness import check, start_writer
from support.fuse import force_unmount, requires_fuse
from support.reliability_util import drop_file_cache, env_int, kill_daemon, mount_pid, scaled
from support.volumes import Volume, make_volume

pytestmark = requires_fuse

BS = 4096
BBS = BS + 40  # files made through the mount are format 2


@pytest.mark.slow
def test_sigkill_during_writes(volume: Volume) -> None:
    iterations = env_int("KMSFS_CRASH_ITERATIONS", scaled(10))
    base_seed = env_int("KMSFS_CRASH_SEED", 1000)
    verified: dict[Path, bytes] = {}
    totals = {"ops": 0, "files": 0, "exact": 0, "changed": 0, "eio": 0, "torn": 0}
    pid = mount_pid(volume)
    for i in range(iterations):
        seed = base_seed + i
        directory = volume.path(f"it{i}")
        directory.mkdir()
        journal = volume.root / f"journal-{seed}"
        writer = start_writer(directory, journal, seed)
        time.sleep(random.Random(seed).uniform(0.1, 1.5))
        kill_daemon(volume, pid)
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, f"seed {seed}: writer failed: {err}"
        totals["ops"] += int(out or 0)

        pid = mount_pid(volume)  # the volume must always mount again
        result = check(directory, journal, seed, volume.log_text)
        assert not result.problems, f"seed {seed} (journal {journal}):\n" + "\n".join(
            result.problems
        )
        for key in ("files", "exact", "changed"):
            totals[key] += getattr(result, key)
        totals["eio"] += len(result.eio)
        totals["torn"] += sum(len(blocks) for blocks in result.torn.values())
        # Nothing that earlier iterations left (and we read back) may change.
        for path, content in verified.items():
            assert path.read_bytes() == content, f"{path} changed after a later kill"
        for name, content in result.contents.items():
            verified[directory / name] = content
        for name in result.eio:
            os.unlink(directory / name)  # keep the volume readable for the next rounds
    print(f"crash iterations: {iterations}, totals: {totals}")
    assert totals["ops"] > iterations  # the writer really ran


def _write_and_sync(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, content, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "block, half",
    [(1, "first"), (1, "second"), (3, "first"), (3, "second"), (0, "sector")],
    ids=["middle-first-half", "middle-second-half", "final-first", "final-second", "sector"],
)
def test_torn_block_write_is_eio_naming_the_file(volume: Volume, block: int, half: str) -> None:
    """A block half old, half new (a torn write at power loss) is EIO, never mixed bytes."""
    size = 3 * BS + 100  # blocks 0..2 whole, block 3 partial and final
    old = random.Random(1).randbytes(size)
    new = bytearray(old)
    new[block * BS : block * BS + 50] = random.Random(2).randbytes(50)  # same block, new version
    mount_pid(volume)
    path = volume.path("torn")
    other = volume.path("bystander")
    _write_and_sync(path, old)
    _write_and_sync(other, old)
    backing = volume.backing_path("torn")
    start = block * BBS
    length = min(BBS, backing.stat().st_size - start)
    old_sealed = backing.read_bytes()[start : start + length]
    _write_and_sync(path, bytes(new))
    new_sealed = backing.read_bytes()[start : start + length]
    assert new_sealed != old_sealed
    volume.umount()

    cut = 512 if half == "sector" else length // 2
    torn = (
        new_sealed[:cut] + old_sealed[cut:]
        if half != "second"
        else (old_sealed[:cut] + new_sealed[cut:])
    )
    with open(backing, "r+b") as handle:
        handle.seek(start)
        handle.write(torn)

    mount_pid(volume)
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == errno.EIO
    # Blocks other than the torn one still read (the reader is not stuck on the file).
    with open(path, "rb") as handle:
        for index in range(4):
            if index == block:
                continue
            handle.seek(index * BS)
            assert handle.read(BS) == bytes(new[index * BS : (index + 1) * BS])
    assert other.read_bytes() == old
    log = volume.log_text()
    assert "/torn" in log and f"block {block}" in log, log[-2000:]
    drop_file_cache(other)


@pytest.mark.nomount
def test_checker_rejects_stale_and_foreign_bytes() -> None:
    """The checker itself: bytes from before the last fsync, or from nowhere, fail."""
    from support.crash_harness import FileModel, allowed_bytes_check

    synced = b"A" * 100
    model = FileModel(1, versions=[synced, b"B" * 100, b"B" * 50], changed=True)
    assert allowed_bytes_check(b"A" * 50 + b"B" * 50, model) is None
    assert allowed_bytes_check(b"B" * 50, model) is None
    assert allowed_bytes_check(b"A" * 60 + b"\0" * 40, model) is None  # past the end of "B"*50
    assert allowed_bytes_check(b"C" + b"A" * 99, model) is not None
    assert allowed_bytes_check(b"\0" + b"A" * 99, model) is not None  # never past an end there
    assert allowed_bytes_check(b"A" * 70, model) is not None  # no state had 70 bytes
    exact = FileModel(2, versions=[synced])
    assert allowed_bytes_check(synced, exact) is None
    assert allowed_bytes_check(b"A" * 99 + b"B", exact) is not None


@pytest.mark.nomount
def test_checker_admits_what_a_kill_can_leave_and_nothing_more(tmp_path: Path) -> None:
    """The checker: a growing write half written back ends at a page boundary; a kill
    can tear a block written since the last fsync (EIO there), no other block."""
    from support.crash_harness import FileModel, Model, _eio_problem, allowed_size

    model = Model(seed=7)
    model.apply(0, {"op": "create", "name": "f"})
    model.apply(1, {"op": "write", "name": "f", "off": 0, "len": 7783})
    model.apply(2, {"op": "fsync", "name": "f"})
    model.apply(3, {"op": "write", "name": "f", "off": 7783, "len": 10464 - 7783})
    grown = model.names["f"]
    assert allowed_size(8192, grown)  # pages up to 8192 written back, the third not
    assert allowed_size(7783, grown) and allowed_size(10464, grown)
    assert not allowed_size(8000, grown)  # not a page boundary
    assert not allowed_size(12288, grown)  # beyond every state
    assert not allowed_size(4096, grown)  # below the fsync'ed size
    assert grown.touched_blocks == {1, 2}  # the old partial final block and the new one
    model.apply(5, {"op": "create", "name": "long"})
    model.apply(6, {"op": "write", "name": "long", "off": 0, "len": 100})
    model.apply(7, {"op": "fsync", "name": "long"})
    model.apply(8, {"op": "write", "name": "long", "off": 100, "len": 20000})
    assert allowed_size(8192, model.names["long"])  # any page boundary of a growing write
    assert allowed_size(16384, model.names["long"])

    (tmp_path / "f").touch()
    log = f"ERROR block 1 of /{tmp_path.name}/f failed authentication"
    assert _eio_problem(tmp_path, "f", grown, {1}, lambda: log) is None
    assert "no write since the last fsync" in (
        _eio_problem(tmp_path, "f", grown, {0}, lambda: log) or ""
    )
    assert "does not name it" in (_eio_problem(tmp_path, "f", grown, {2}, lambda: "") or "")
    assert "promises a readable file" in (
        _eio_problem(tmp_path, "f", grown, None, lambda: log) or ""
    )
    model.apply(4, {"op": "fsync", "name": "f"})
    synced = model.names["f"]
    assert not synced.touched_blocks and not synced.growths
    assert "no write since the last fsync" in (
        _eio_problem(tmp_path, "f", synced, {2}, lambda: log) or ""
    )
    # A growing truncate in flight (seed 3174): the old final block padded first.
    model.apply(6, {"op": "truncate", "name": "f", "size": 20000}, in_flight=True)
    assert allowed_size(12288, model.names["f"])
    assert not allowed_size(12000, model.names["f"])
    assert not allowed_size(16384, model.names["f"])  # only the old final block is padded
    shrinking = FileModel(2, versions=[bytes(9000)], changed=True)
    model.names["g"] = shrinking
    model.apply(5, {"op": "truncate", "name": "g", "size": 5000})
    assert shrinking.touched_blocks == {1, 2}


@pytest.mark.parametrize("seed, chunk, free", [(1, 3000, 6000), (2, 20000, 30000), (3, 4096, 4096)])
def test_enospc_never_corrupts_the_file(tmp_path: Path, seed: int, chunk: int, free: int) -> None:
    """A full backing filesystem fails writes with ENOSPC; the file keeps its fsync'ed state.

    Found by this test: a short backing write left a partial final block and the
    whole file gave EIO from then on.  Fixed by preallocating (ContentFile.write).
    """
    volume = make_volume(tmp_path, key=False)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(volume.backing)])
    try:
        run_kmsfs("init", volume.backing, "--key-file", volume.key_file)
        mount_pid(volume)
        rng = random.Random(seed)
        path = volume.path("f")
        synced = rng.randbytes(10000)
        _write_and_sync(path, synced)
        filler = volume.backing / ".kmsfs.d" / "filler"
        filler.parent.mkdir(exist_ok=True)
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        os.truncate(filler, filler.stat().st_size - free)
        fd = os.open(path, os.O_WRONLY)
        pending = synced
        with pytest.raises(OSError) as info:
            for _ in range(200):
                data = rng.randbytes(chunk)
                off = rng.choice([len(pending), rng.randrange(len(pending))])
                os.pwrite(fd, data, off)
                grown = pending.ljust(off, b"\0")
                pending = grown[:off] + data + grown[off + len(data) :]
                os.fsync(fd)
                synced = pending
        assert info.value.errno == errno.ENOSPC
        try:
            os.close(fd)
        except OSError:
            pass  # the close may report the failed write-back again
        volume.umount()
        mount_pid(volume)
        assert path.read_bytes() == synced
        filler.unlink()
        path.write_bytes(b"space again")
        assert path.read_bytes() == b"space again"
        volume.umount()
    finally:
        force_unmount(volume.mountpoint)
        subprocess.run(["umount", "-l", str(volume.backing)], capture_output=True)
