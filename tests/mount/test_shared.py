"""Shared-storage mode: several daemons serving one backing directory.

"Several hosts" are several daemons, each at its own mount point with its own page
cache, inode table and state, as separate hosts would have.  Every test on a
``cluster`` runs three times:

- on one local directory (the OFD locks the daemons take on the backing files are
  the ones NFSv4 and GlusterFS carry between clients);
- on GlusterFS, a real distributed filesystem: one single-node volume mounted twice
  through its FUSE client, each daemon through its own client, as two hosts
  (tests/support/gluster.py; skips, saying why, only where GlusterFS cannot be
  installed or started);
- over NFS 4.2 (each daemon through its own NFS mount of one export, named by
  $KMSFS_TEST_NFS_MOUNTS), which skips where the kernel has no NFS, saying so.

Every concurrent test runs for a bounded time (a few seconds).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.cluster import Cluster, Mount, cluster_on
from support.fuse import force_unmount, requires_fuse, wait_exited
from support.volumes import make_volume

from kmsfs.backing.shared import ofd_lock, ofd_unlock
from kmsfs.format.content import Layout
from kmsfs.format.header import FORMAT_2, XATTR_NAME

pytestmark = requires_fuse

BS = 4096  # the volumes' block size (init's default)
CELL = 64  # writers write whole cells; a cell is all zeros or one writer's record


@pytest.fixture(params=["local", "glusterfs", "nfs-4.2"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """The shared-mode suite's volume: on one local directory; on a GlusterFS volume
    that each daemon reaches through its own GlusterFS client; and (where NFS 4.2 is
    set up) on an NFS export that each daemon reaches through its own NFS mount.  With
    plain names: the suite reaches backing files by name (encrypted names in shared
    mode: test_encrypted_names.py)."""
    with cluster_on(request, request.param, tmp_path) as group:
        yield group


def read_fresh(cluster: Cluster, name: str) -> bytes:
    """The file's plaintext as a daemon that never saw it reads it (a new exclusive mount)."""
    cluster.mount(name="check")
    mount = cluster.mounts[-1]
    try:
        return mount.path(name).read_bytes()
    finally:
        cluster.umount(mount)


def run_for(seconds: float, workers: list[Callable[[threading.Event], None]]) -> None:
    """Run each worker in a thread until *seconds* pass; re-raise the first failure."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(work: Callable[[threading.Event], None]) -> None:
        try:
            work(stop)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guard, args=(work,)) for work in workers]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a worker hung (a lock never released?)"
    if errors:
        raise errors[0]


def record(writer: int, seq: int) -> bytes:
    """One cell: the writer's number and a sequence number, each repeated."""
    return bytes([writer]) * 32 + seq.to_bytes(4, "big") * 8


def check_cells(data: bytes, where: str) -> None:
    """Every cell of *data* is zeros or one whole record (never a mix of two writes)."""
    for start in range(0, len(data) - len(data) % CELL, CELL):
        cell = data[start : start + CELL]
        if cell == bytes(CELL):
            continue
        head, tail = cell[:32], cell[32:]
        assert head == head[:1] * 32 and tail == tail[:4] * 8 and head[0], (
            f"{where}: cell at {start} mixes two writes: {cell.hex()}"
        )


def serving_pids(backing: Path, expected: list[int], timeout: float = 10) -> list[int]:
    """The pids of the registered live daemons, polled until they are *expected* (or
    *timeout*): a killed daemon's lock is released when its last thread has exited, a
    moment after its main thread became a zombie."""
    from kmsfs.backing.volume_lock import daemons_serving

    deadline = time.monotonic() + timeout
    while True:
        pids = sorted(daemon.pid for daemon in daemons_serving(backing))
        if pids == sorted(expected) or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


# -- the gocryptfs failure: disjoint ranges of one block from two mounts ----------


def test_disjoint_ranges_of_one_block_written_from_two_mounts_are_both_kept(
    cluster: Cluster,
) -> None:
    """Two mounts write disjoint 100-byte ranges of the same new block at the same
    moment, block after block (so each pair also races on extending the file).  A
    read-modify-write without the byte-range lock, a final block taken from a
    daemon's cache, or whole pages written back by a writeback cache each lose one
    of the two writes; here both are in every block and every block authenticates."""
    first, second = cluster.shared(2)
    name = "disjoint"
    first.path(name).write_bytes(b"")
    time.sleep(1.2)  # the second mount's negative entry expires (shared timeout 1 s)
    fds = [os.open(m.path(name), os.O_RDWR) for m in (first, second)]
    rounds = 300
    barrier = threading.Barrier(2)
    ranges = [(0, 100), (2000, 100)]

    def writer(which: int) -> None:
        start, length = ranges[which]
        for block in range(rounds):
            barrier.wait(timeout=30)
            payload = bytes([0x41 + which]) * (length - 4) + block.to_bytes(4, "big")
            os.pwrite(fds[which], payload, block * BS + start)
        os.fsync(fds[which])

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for fd in fds:
        os.close(fd)
    cluster.umount_all()
    cluster.fsck_clean()
    data = read_fresh(cluster, name)
    assert len(data) == (rounds - 1) * BS + 2100
    lost = []
    for block in range(rounds):
        for which, (start, length) in enumerate(ranges):
            want = bytes([0x41 + which]) * (length - 4) + block.to_bytes(4, "big")
            if data[block * BS + start : block * BS + start + length] != want:
                lost.append((block, "AB"[which]))
    assert not lost, f"{len(lost)} writes lost, first: {lost[:5]}"


# -- writers, appenders, truncators and readers on three mounts -------------------


def test_three_mounts_writing_appending_truncating_and_reading_one_file(
    cluster: Cluster,
) -> None:
    """Random cell-aligned writes to the same blocks, appends and truncations from two
    mounts, reads and truncations from a third, for a bounded time: no request fails,
    no read returns a cell mixed from two writes, and afterwards every block
    authenticates (fsck clean) and every cell holds zeros or one writer's whole record."""
    mounts = cluster.shared(3)
    name = "busy"
    mounts[0].path(name).write_bytes(b"")
    time.sleep(1.2)

    def writer(index: int) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            rng = random.Random(index)
            fd = os.open(mounts[index].path(name), os.O_RDWR)
            seq = 0
            try:
                while not stop.is_set():
                    seq += 1
                    cells = rng.randint(1, 8)
                    offset = rng.randrange(0, 3 * BS // CELL) * CELL
                    os.pwrite(fd, record(index + 1, seq) * cells, offset)
            finally:
                os.close(fd)

        return work

    def appender(stop: threading.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            with open(mounts[seq % 2].path(name), "ab") as handle:
                handle.write(record(9, seq) * 3)

    def truncator(stop: threading.Event) -> None:
        rng = random.Random(7)
        while not stop.is_set():
            os.truncate(
                mounts[rng.randrange(3)].path(name), rng.randrange(0, 4 * BS // CELL) * CELL
            )
            time.sleep(0.02)

    def reader(index: int) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            rng = random.Random(100 + index)
            while not stop.is_set():
                fd = os.open(mounts[index].path(name), os.O_RDONLY)  # open drops the cache
                try:
                    data = os.pread(fd, rng.randint(1, 3) * BS, rng.randrange(0, 3) * BS)
                finally:
                    os.close(fd)
                check_cells(data, f"read through {mounts[index].mountpoint}")

        return work

    # Readers on the mount where nothing writes: on one mount, the kernel copies a
    # write into a cached page while a read may copy out of it (no page lock for
    # that), so a read there can see half a write on any filesystem; between mounts
    # there is no such page to share, which is what this test is about.
    workers = [writer(0), writer(1), appender, truncator, reader(2), reader(2)]
    run_for(4.0, workers)
    cluster.umount_all()
    cluster.fsck_clean()
    check_cells(read_fresh(cluster, name), "after the run")


def test_a_size_is_never_read_while_another_daemon_extends_the_file(cluster: Cluster) -> None:
    """A daemon extending a file holds an exclusive lock from its final block to the end
    while the backing size grows page by page; a stat on another mount waits for that
    lock and reports the size after, never one in between (which the kernel would cache
    and use as the offset of an O_APPEND write: the torn cells this suite once saw)."""
    first, second = cluster.shared(2)
    first.path("growing").write_bytes(b"g" * 5000)
    first.path("elsewhere").mkdir()
    assert second.path("elsewhere").is_dir()  # its entry is cached by the kernel
    layout = Layout(BS, FORMAT_2)
    backing = cluster.volume.backing / "growing"
    good_size = os.stat(backing).st_size
    assert layout.plain_size(good_size) == 5000
    fd = os.open(backing, os.O_RDWR)
    try:
        final_start = layout.final_index(5000) * layout.backing_block
        ofd_lock(fd, True, final_start, 0)  # as the extending daemon holds it
        os.pwrite(fd, b"\0" * 700, good_size)  # its write, half done
        seen: list[int] = []
        stat_thread = threading.Thread(
            target=lambda: seen.append(os.stat(second.path("growing")).st_size)
        )
        stat_thread.start()
        stat_thread.join(timeout=0.5)
        assert stat_thread.is_alive(), f"stat did not wait for the lock: {seen}"
        # the wait is off the daemon's event loop: the same mount answers a lookup in
        # another directory (one in the same directory waits too, on this kernel)
        answered: list[bool] = []

        def lookup_absent() -> None:
            answered.append(not os.path.exists(second.path("elsewhere/absent")))

        other = threading.Thread(target=lookup_absent)
        other.start()
        other.join(timeout=10)
        assert answered == [True], "the mount stopped answering while one stat waited"
        assert stat_thread.is_alive()
        os.ftruncate(fd, good_size)  # the "write" ends where it began
        ofd_unlock(fd, final_start, 0)
        stat_thread.join(timeout=10)
    finally:
        os.close(fd)
    assert seen == [5000]
    cluster.umount_all()
    cluster.fsck_clean()


def test_a_read_waits_for_another_daemons_block_write_off_the_event_loop(
    cluster: Cluster,
) -> None:
    """Reads and writes are tried on the daemon's event loop without waiting; when
    another daemon holds the blocks a read needs (here: block 1, as while it writes
    it), the read waits for that lock in a worker thread and then returns whole
    blocks, and the same mount answers other requests meanwhile."""
    first, second = cluster.shared(2)
    first.path("blocks").write_bytes(b"a" * (3 * BS))
    first.path("elsewhere").mkdir()
    assert second.path("elsewhere").is_dir()  # its entry is cached by the kernel
    bbs = Layout(BS, FORMAT_2).backing_block
    # opened before the lock is taken: an open waits for a file being written too
    writing = os.open(first.path("blocks"), os.O_RDWR)
    reading = os.open(second.path("blocks"), os.O_RDONLY)
    fd = os.open(cluster.volume.backing / "blocks", os.O_RDWR)
    seen: list[bytes] = []
    try:
        ofd_lock(fd, True, bbs, bbs)  # block 1, as the writing daemon holds it
        writer = threading.Thread(target=lambda: os.pwrite(writing, b"b" * BS, BS))
        writer.start()
        reader = threading.Thread(target=lambda: seen.append(os.pread(reading, 3 * BS, 0)))
        reader.start()
        reader.join(timeout=0.5)
        assert reader.is_alive(), f"the read did not wait for the lock: {seen}"
        answered: list[bool] = []
        lookup = threading.Thread(
            target=lambda: answered.append(not second.path("elsewhere/absent").exists())
        )
        lookup.start()
        lookup.join(timeout=10)
        assert answered == [True], "the mount stopped answering while a read waited"
        ofd_unlock(fd, bbs, bbs)
        writer.join(timeout=10)
        reader.join(timeout=10)
    finally:
        for handle in (fd, writing, reading):
            os.close(handle)
    new = b"a" * BS + b"b" * BS + b"a" * BS
    assert seen in ([b"a" * (3 * BS)], [new])  # one version or the other, never a mix
    assert second.path("blocks").read_bytes() == new
    cluster.umount_all()
    cluster.fsck_clean()


def test_blocks_are_read_from_the_backing_not_from_pages_its_cache_keeps(
    cluster: Cluster,
) -> None:
    """A daemon reads blocks another host has rewritten, never an old copy that its own
    host's page cache of the backing file still holds.  GlusterFS's FUSE client keeps
    such pages (a lock does not make them coherent), and dropping them under the lock
    is not enough: the kernel keeps a page that is mapped (here: another process on the
    first host maps the backing file), read in flight by readahead or being copied by
    another reader.  From such pages a read returned the old block (it authenticates)
    or half of each (EIO, "failed authentication"), and a write's read-modify-write
    sealed the old bytes back over the other host's write."""
    first, second = cluster.shared(2)
    first.path("mapped").write_bytes(b"a" * (3 * BS))
    cluster.map_backing("mapped")  # through the first daemon's client, until teardown
    with open(second.path("mapped"), "r+b") as handle:  # the other host rewrites block 1
        handle.seek(BS)
        handle.write(b"b" * BS)
        handle.flush()
        os.fsync(handle.fileno())
    assert first.path("mapped").read_bytes() == b"a" * BS + b"b" * BS + b"a" * BS
    with open(first.path("mapped"), "r+b") as handle:  # a read-modify-write of block 1
        handle.seek(BS + 10)
        handle.write(b"c" * 100)
    new = b"a" * BS + b"b" * 10 + b"c" * 100 + b"b" * (BS - 110) + b"a" * BS
    assert second.path("mapped").read_bytes() == new
    assert first.path("mapped").read_bytes() == new
    cluster.umount_all()
    cluster.fsck_clean()


def test_a_write_and_fsync_on_one_mount_is_seen_by_the_other_within_the_timeout(
    cluster: Cluster,
) -> None:
    """Close-to-open: after a write and fsync through A, a reader on B that opens the
    file sees the new size and bytes once the shared timeout (0.5 s here) has passed."""
    first, second = cluster.shared(2, "shared_timeout=0.5")
    first.path("seen").write_bytes(b"one")
    time.sleep(0.6)
    assert second.path("seen").read_bytes() == b"one"
    with open(first.path("seen"), "r+b") as handle:
        handle.write(b"TWO and more")
        handle.flush()
        os.fsync(handle.fileno())
    time.sleep(0.6)
    assert os.stat(second.path("seen")).st_size == 12
    assert second.path("seen").read_bytes() == b"TWO and more"


def test_open_drops_the_page_cache_so_a_change_is_seen_before_the_timeout(
    cluster: Cluster,
) -> None:
    """With a long shared timeout (5 s), A reads a file (its pages are cached), B
    rewrites it at the same size and fsyncs; A's next open sees B's bytes at once,
    before any timeout: close-to-open holds.  (Shared mode answers opens without
    keep_cache for this; on this kernel the test also passes with keep_cache, so it
    does not prove that flag alone.)"""
    first, second = cluster.shared(2, "shared_timeout=5")
    first.path("page").write_bytes(b"a" * BS)
    time.sleep(0.1)
    assert first.path("page").read_bytes() == b"a" * BS
    assert second.path("page").read_bytes() == b"a" * BS
    with open(second.path("page"), "r+b") as handle:
        handle.write(b"b" * BS)
        handle.flush()
        os.fsync(handle.fileno())
    assert first.path("page").read_bytes() == b"b" * BS


# -- names: creating, renaming, deleting from two mounts --------------------------


def test_two_mounts_creating_one_name_at_once_one_gets_eexist(cluster: Cluster) -> None:
    """O_CREAT|O_EXCL of the same name from two mounts at the same moment: exactly one
    wins, the other gets EEXIST, and the file is the winner's (never a file with the
    other's header); O_CREAT alone from both opens one file that both write."""
    mounts = cluster.shared(2)
    barrier = threading.Barrier(2)
    outcome: dict[tuple[int, int], object] = {}

    def create(index: int) -> None:
        for n in range(40):
            barrier.wait(timeout=30)
            try:
                fd = os.open(
                    mounts[index].path(f"excl{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644
                )
            except OSError as exc:
                outcome[index, n] = exc.errno
                continue
            os.write(fd, f"made by {index}".encode())
            os.close(fd)
            outcome[index, n] = "won"

    threads = [threading.Thread(target=create, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for n in range(40):
        results = sorted(map(str, (outcome[0, n], outcome[1, n])))
        assert results == sorted([str(errno.EEXIST), "won"]), (n, results)
    time.sleep(1.2)
    for n in range(40):
        winner = 0 if outcome[0, n] == "won" else 1
        for mount in mounts:
            assert mount.path(f"excl{n}").read_bytes() == f"made by {winner}".encode()

    errors: list[BaseException] = []

    def open_create(index: int) -> None:
        try:
            for n in range(40):
                barrier.wait(timeout=30)
                fd = os.open(mounts[index].path(f"plain{n}"), os.O_CREAT | os.O_WRONLY, 0o644)
                os.pwrite(fd, bytes([0x61 + index]), index)
                os.close(fd)
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=open_create, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    time.sleep(1.2)
    for n in range(40):
        assert mounts[0].path(f"plain{n}").read_bytes() == b"ab"
    cluster.umount_all()
    cluster.fsck_clean()


def test_a_file_seen_while_another_daemon_creates_it_is_waited_for(cluster: Cluster) -> None:
    """A daemon that opens a name another daemon has just created with O_EXCL, before
    that one set its header and first block, waits and then opens it, instead of
    calling it corrupt (EIO).  The creating daemon is played by this test, which makes
    the backing file as ``create`` does, step by step with pauses in between (no
    daemon can be paused between those syscalls on demand); the header and the empty
    final block come from a file just created through a mount (a file's blocks are
    bound to its file ID, not to its name)."""
    (mount,) = cluster.shared(1)
    mount.path("model").write_bytes(b"")
    backing = cluster.volume.backing
    fd = os.open(backing / "pending", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    result: list[object] = []

    def reader() -> None:
        try:
            result.append(mount.path("pending").read_bytes())
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)
    os.setxattr(fd, XATTR_NAME, os.getxattr(backing / "model", XATTR_NAME))
    time.sleep(0.3)
    os.write(fd, (backing / "model").read_bytes())
    os.close(fd)
    thread.join(timeout=30)
    assert result == [b""]


def test_renames_over_each_other_and_deletes_while_the_other_reads(cluster: Cluster) -> None:
    """Two mounts replace one name by rename, over and over, while both read it: every
    read is one complete version; a file deleted through one mount stays readable to
    the reader that has it open on the other.  (This found a daemon that stat'ed a
    name, then opened it: with the name replaced in between, its entry held another
    inode than its number's, and a reused number showed a reader a stale size 0.)"""
    mounts = cluster.shared(2)
    # On a distributed filesystem (GlusterFS, NFS) a file replaced through one client is
    # gone for every other at once (no open-unlinked file across clients): an open on
    # the other mount that races the rename gets ESTALE from the backing, and so does
    # the kernel's one retry when the name was replaced again meanwhile.
    distributed = cluster.distributed
    versions = {i: bytes([0x30 + i]) * (3 * BS + 100) for i in range(2)}
    mounts[0].path("target").write_bytes(versions[0])
    time.sleep(1.2)

    def replacer(index: int) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                tmp = mounts[index].path(f"tmp{index}-{n}")
                tmp.write_bytes(versions[index])
                os.rename(tmp, mounts[index].path("target"))

        return work

    def reader(index: int) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            while not stop.is_set():
                try:
                    data = mounts[index].path("target").read_bytes()
                except FileNotFoundError:
                    continue  # looked up just as it was replaced on the other mount
                except OSError as exc:
                    if exc.errno != errno.ESTALE or not distributed:
                        raise
                    continue  # see below
                assert data in versions.values(), f"torn or mixed version: {data[:8]!r}"

        return work

    run_for(3.0, [replacer(0), replacer(1), reader(0), reader(1)])

    payload = os.urandom(5 * BS)
    mounts[0].path("doomed").write_bytes(payload)
    time.sleep(1.2)
    with open(mounts[1].path("doomed"), "rb") as handle:
        first = handle.read(BS)
        os.unlink(mounts[0].path("doomed"))
        rest = handle.read()
    assert first + rest == payload
    time.sleep(1.2)
    assert not mounts[1].path("doomed").exists()
    cluster.umount_all()
    cluster.fsck_clean()


# -- an fsx-style exerciser against a model -------------------------------------------


FSX_OPS = 700
FSX_MAX_SIZE = 5 * BS + 300


def test_fsx_style_operations_through_both_mounts_match_a_model(cluster: Cluster) -> None:
    """fsx on two mounts: random writes, appends, truncations (by path and by a handle),
    reads, and stats of one file, each through a mount chosen at random and each on a
    fresh open (close-to-open; shared_timeout=0, so neither kernel caches attributes).
    Every read and size equals the model's, and a handle kept open on each mount reads
    the model too after the other mount changed the file.  The seed is in the message."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    mounts = cluster.shared(2, "shared_timeout=0")
    name = "fsx"
    model = bytearray()
    mounts[0].path(name).write_bytes(b"")
    kept = [os.open(mount.path(name), os.O_RDONLY) for mount in mounts]
    log: list[str] = []

    def where(op: str, mount: int) -> str:
        return f"seed {seed}, op {len(log)} ({op} through mount {mount}); last ops: {log[-6:]}"

    try:
        for _ in range(FSX_OPS):
            m = rng.randrange(2)
            path = mounts[m].path(name)
            op = rng.choice(["write", "write", "append", "truncate", "ftruncate", "read", "read"])
            if op == "write":
                offset = rng.randrange(0, FSX_MAX_SIZE - 1)
                data = rng.randbytes(rng.randint(1, min(2 * BS + 50, FSX_MAX_SIZE - offset)))
                fd = os.open(path, os.O_WRONLY)
                try:
                    assert os.pwrite(fd, data, offset) == len(data)
                finally:
                    os.close(fd)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
                log.append(f"write {offset}+{len(data)}@{m}")
            elif op == "append":
                data = rng.randbytes(rng.randint(1, 700))
                if len(model) + len(data) > FSX_MAX_SIZE:
                    continue
                with open(path, "ab") as handle:
                    handle.write(data)
                model.extend(data)
                log.append(f"append {len(data)}@{m}")
            elif op in ("truncate", "ftruncate"):
                size = rng.randrange(0, FSX_MAX_SIZE)
                if op == "truncate":
                    os.truncate(path, size)
                else:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
                log.append(f"{op} {size}@{m}")
            else:
                offset = rng.randrange(0, FSX_MAX_SIZE)
                length = rng.randint(1, 2 * BS)
                fd = os.open(path, os.O_RDONLY)
                try:
                    data = os.pread(fd, length, offset)
                finally:
                    os.close(fd)
                assert data == bytes(model[offset : offset + length]), where("read", m)
                log.append(f"read {offset}+{length}@{m}")
            assert os.stat(mounts[rng.randrange(2)].path(name)).st_size == len(model), where(
                "stat", m
            )
            if rng.random() < 0.05:  # a handle kept open sees the change too
                k = rng.randrange(2)
                data = os.pread(kept[k], FSX_MAX_SIZE, 0)
                assert data == bytes(model), where("read of the kept handle", k)
    finally:
        for fd in kept:
            os.close(fd)
    cluster.umount_all()
    cluster.fsck_clean()
    assert read_fresh(cluster, name) == bytes(model), f"seed {seed}: after unmounting"


# -- a daemon killed -----------------------------------------------------------------


def test_sigkill_of_one_daemon_loses_nothing_fsynced_and_leaves_nothing_unreadable(
    cluster: Cluster,
) -> None:
    """Both mounts append fsynced records to one file and each to its own; one daemon
    is SIGKILLed mid-run while the other keeps writing.  Every record fsynced before
    the kill (and all of the survivor's) is there, fsck is clean, and the dead
    daemon's registration is gone from what the tools see."""
    victim, survivor = cluster.shared(2)
    for mount in (victim, survivor):
        mount.path(f"own{mount.pid}").write_bytes(b"")
    time.sleep(1.2)
    synced: dict[int, int] = {victim.pid: 0, survivor.pid: 0}

    def appender(mount: Mount) -> Callable[[threading.Event], None]:
        def work(stop: threading.Event) -> None:
            fd = os.open(mount.path(f"own{mount.pid}"), os.O_WRONLY | os.O_APPEND)
            try:
                n = 0
                while not stop.is_set():
                    os.write(fd, record(1, n))
                    os.fsync(fd)
                    n += 1
                    synced[mount.pid] = n
            except OSError as exc:
                if mount is survivor or exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                    raise
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass

        return work

    def killer(stop: threading.Event) -> None:
        time.sleep(1.0)
        os.kill(victim.pid, signal.SIGKILL)

    run_for(2.5, [appender(victim), appender(survivor), killer])
    force_unmount(victim.mountpoint)
    wait_exited(victim.pid)
    cluster.mounts.remove(victim)
    assert serving_pids(cluster.volume.backing, [survivor.pid]) == [survivor.pid]
    survivor_file = survivor.path(f"own{survivor.pid}").read_bytes()
    assert len(survivor_file) == synced[survivor.pid] * CELL
    cluster.umount_all()
    cluster.fsck_clean()
    data = read_fresh(cluster, f"own{victim.pid}")
    assert len(data) >= synced[victim.pid] * CELL > 0
    for n in range(synced[victim.pid]):
        assert data[n * CELL : (n + 1) * CELL] == record(1, n)


# -- registration and refusals -------------------------------------------------------


def test_registrations_name_the_daemons_and_refuse_the_wrong_mode(cluster: Cluster) -> None:
    """Shared daemons register one file each; an exclusive mount, rekey and keys remove
    refuse naming every one of them; with an exclusive daemon serving, a shared mount
    refuses naming it; a dead daemon's registration is removed."""
    from kmsfs.backing.volume_lock import DAEMONS_DIR, daemons_serving, volume_in_use

    backing = cluster.volume.backing
    first, second = cluster.shared(2)
    registered = os.listdir(backing / ".kmsfs.d" / DAEMONS_DIR)
    assert len(registered) == 2
    assert sorted(d.pid for d in daemons_serving(backing)) == sorted([first.pid, second.pid])
    assert volume_in_use(backing)

    refused = cluster.mount(name="mntx", check=False)
    assert refused.returncode == 7
    assert "served in shared mode by" in refused.stderr
    for mount in (first, second):
        assert f"pid {mount.pid} at {mount.mountpoint} (shared)" in refused.stderr
    for tool in (
        ["rekey", backing],
        ["rewrap", backing, "--provider", "local", "--key-file", cluster.volume.root / "new.key"],
        ["keys", "remove", backing, "whatever"],
    ):
        result = run_kmsfs(*tool, *cluster.volume.key_args, check=False)
        assert result.returncode == 7, (tool, result.stderr)
        assert f"pid {first.pid} at {first.mountpoint}" in result.stderr, (tool, result.stderr)
        assert f"pid {second.pid} at {second.mountpoint}" in result.stderr, (tool, result.stderr)

    os.kill(second.pid, signal.SIGKILL)  # its registration stays on disk, unlocked
    wait_exited(second.pid)
    force_unmount(second.mountpoint)
    cluster.mounts.remove(second)
    assert serving_pids(backing, [first.pid]) == [first.pid]
    assert len(os.listdir(backing / ".kmsfs.d" / DAEMONS_DIR)) == 1
    cluster.umount_all()
    assert not volume_in_use(backing)
    assert os.listdir(backing / ".kmsfs.d" / DAEMONS_DIR) == []

    cluster.mount(name="mntx")
    exclusive = cluster.mounts[-1]
    refused = cluster.mount("-o", "shared", name="mnty", check=False)
    assert refused.returncode == 7
    assert "served by an exclusive daemon" in refused.stderr
    assert f"pid {exclusive.pid} at {exclusive.mountpoint} (exclusive)" in refused.stderr
    assert "-o shared" in refused.stderr


def test_shared_options_are_checked(cluster: Cluster) -> None:
    """shared_timeout or shared_lock_timeout without shared, or out of range, is a usage
    error (exit 2)."""
    for options, message in (
        ("shared_timeout=1", "applies to shared mode only"),
        ("shared,shared_timeout=999", "give seconds from 0 to 60"),
        ("shared,shared_timeout=soon", "give seconds from 0 to 60"),
        ("shared_lock_timeout=5", "-o shared_lock_timeout applies to shared mode only"),
        ("shared,shared_lock_timeout=0", "give seconds from 0.1 to 600"),
        ("shared,shared_lock_timeout=forever", "give seconds from 0.1 to 600"),
    ):
        result = cluster.mount("-o", options, check=False)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr


def test_a_backing_filesystem_without_user_xattrs_is_refused(tmp_path: Path) -> None:
    """ramfs has no user extended attributes: init refuses it, naming the feature, and
    so does mount -o shared of a volume copied there."""
    where = tmp_path / "ramfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "none", str(where)], check=True)
    try:
        result = run_kmsfs("init", where / "backing", "--key-file", tmp_path / "k", check=False)
        assert result.returncode == 3
        assert "no user extended attributes" in result.stderr
        (tmp_path / "v").mkdir()
        volume = make_volume(tmp_path / "v")
        subprocess.run(["cp", "-a", str(volume.backing), str(where / "copy")], check=True)
        (tmp_path / "m").mkdir()
        result = run_kmsfs(
            "mount", where / "copy", tmp_path / "m", *volume.key_args, "-o", "shared", check=False
        )
        assert result.returncode == 3, result.stderr
        assert "no user extended attributes" in result.stderr
    finally:
        force_unmount(tmp_path / "m")
        subprocess.run(["umount", str(where)], check=False)


def test_default_mode_is_unchanged_by_shared_mode(tmp_path: Path) -> None:
    """Without -o shared, the daemon registers (so tools can name it) but serves as
    before, exclusively (and says nothing of shared mode)."""
    from kmsfs.backing.volume_lock import daemons_serving

    volume = make_volume(tmp_path)
    group = Cluster(volume)
    try:
        group.mount()
        daemons = daemons_serving(volume.backing)
        assert len(daemons) == 1 and not daemons[0].shared
        group.mounts[0].path("x").write_bytes(b"abc")
        assert "shared mode" not in group.mounts[0].log_text()
    finally:
        group.umount_all()


@pytest.mark.nomount
def test_the_config_file_says_shared_and_its_timeouts(tmp_path: Path) -> None:
    """``shared = true``, ``shared_timeout`` and ``shared_lock_timeout`` in
    /etc/kmsfs/NAME.toml give the shared mode the mount options ``shared``,
    ``shared_timeout=S`` and ``shared_lock_timeout=S`` give (the command line wins); a
    timeout without shared, or out of its range, is refused."""
    from kmsfs.cli.mountspec import shared_mode
    from kmsfs.errors import ConfigError
    from kmsfs.server.config import parse_server_config
    from kmsfs.server.spec import SharedMode

    where = tmp_path / "data.toml"
    config = parse_server_config({"shared": True, "shared_timeout": 0.5}, where)
    assert config.mount_options == ()
    assert shared_mode([], config) == ([], SharedMode(0.5, 10.0))
    assert shared_mode(["shared_timeout=2"], config) == ([], SharedMode(2.0, 10.0))
    config = parse_server_config({"shared": True, "shared_lock_timeout": 30}, where)
    assert shared_mode(["ro"], config) == (["ro"], SharedMode(1.0, 30.0))
    assert shared_mode([], parse_server_config({"shared": False}, where)) == ([], None)
    with pytest.raises(ConfigError, match="shared_timeout is set but shared is not true"):
        parse_server_config({"shared_timeout": 2}, where)
    with pytest.raises(ConfigError, match="shared_lock_timeout is set but shared is not"):
        parse_server_config({"shared_lock_timeout": 2}, where)
    with pytest.raises(ConfigError, match="shared_timeout = 999: give seconds from 0 to 60"):
        parse_server_config({"shared": True, "shared_timeout": 999}, where)
    with pytest.raises(ConfigError, match="shared must be true or false"):
        parse_server_config({"shared": "yes"}, where)


def test_a_planted_registration_is_only_displayed_and_a_dead_one_removed(tmp_path: Path) -> None:
    """Registrations are written by whoever can write the backing directory: one that
    no process holds is removed, control characters in a held one are not echoed,
    and a symlink or directory among them is ignored."""
    import fcntl

    from kmsfs.backing.volume_lock import DAEMONS_DIR, daemons_serving

    volume = make_volume(tmp_path)
    daemons = volume.backing / ".kmsfs.d" / DAEMONS_DIR
    daemons.mkdir(parents=True, exist_ok=True)
    (daemons / "dead-1-00").write_text(
        '{"host": "x", "pid": 1, "mountpoint": "/m", "shared": true}'
    )
    (daemons / "link").symlink_to("/etc/passwd")
    (daemons / "dir").mkdir()
    held = daemons / "evil-2-00"
    held.write_text('{"host": "h\\u001b[2J", "pid": 2, "mountpoint": "/m\\n", "shared": "yes"}')
    with open(held) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        found = daemons_serving(volume.backing)
    assert [(d.host, d.pid, d.mountpoint, d.shared) for d in found] == [("h?[2J", 2, "/m?", False)]
    assert sorted(os.listdir(daemons)) == ["dir", "evil-2-00", "link"]


# -- a lock another host holds for ever ------------------------------------------------


def lock_waits(mount: Mount) -> dict[str, float]:
    """The daemon's lock-wait figures (``kmsfs status --json``)."""
    info = json.loads(run_kmsfs("status", mount.mountpoint, "--json").stdout)
    figures: dict[str, float] = info["lock_waits"]
    return figures


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def answered_within(seconds: float, request: Callable[[], object]) -> object:
    """*request()*'s result, failing the test if it takes longer than *seconds* (it
    runs in a daemon thread: one that never returns does not hang the test)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(request()), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert result, f"no answer within {seconds} s (after {time.monotonic() - start:.1f} s)"
    return result[0]


def outcomes(process: subprocess.Popen[str], timeout: float) -> list[dict[str, object]]:
    """The JSON lines tests/support/lock_waiters.py printed, once it ended."""
    out, _ = process.communicate(timeout=timeout)
    return [json.loads(line) for line in out.splitlines()]


LOCK_TIMEOUT = 15  # the deadline of these tests' waits, seconds


def test_a_lock_another_host_holds_for_ever_never_wedges_the_mount(cluster: Cluster) -> None:
    """Another host holds an exclusive lock on all of one backing file and never lets go;
    80 threads open and read that file through the mount and 40 stat it.  Meanwhile the
    mount answers everything else (stat, read of another file, ls) within seconds;
    every reader and stat gets EIO, none later than the deadline and a bit; the log
    names the backing file, the lock and the deadline.  (Before: the waits for the lock
    took every request task of the daemon, and the whole mount hung for as long as the
    lock was held, its callers unkillable.)"""
    [mount] = cluster.shared(1, f"shared_lock_timeout={LOCK_TIMEOUT}")
    mount.path("held").write_bytes(os.urandom(3 * BS))
    mount.path("other").write_bytes(b"other bytes")
    mount.path("dir").mkdir()
    mount.path("dir/inside").write_bytes(b"")
    cluster.hold_lock("held")
    start = time.monotonic()
    waiters = cluster.waiters(mount.path("held"), readers=80, stats=40)
    wait_for("requests waiting for the lock", lambda: lock_waits(mount)["waiting"] > 0)

    assert answered_within(3, lambda: os.stat(mount.path("other")).st_size) == 11
    assert answered_within(3, lambda: mount.path("other").read_bytes()) == b"other bytes"
    assert answered_within(3, lambda: sorted(os.listdir(mount.path("dir")))) == ["inside"]
    assert answered_within(3, lambda: sorted(os.listdir(mount.mountpoint))) == [
        "dir",
        "held",
        "other",
    ]
    figures = lock_waits(mount)  # the waits were still under way meanwhile
    assert 0 < figures["waiting"] <= figures["limit"] == 32, figures
    assert time.monotonic() - start < LOCK_TIMEOUT

    results = outcomes(waiters, timeout=LOCK_TIMEOUT * 3 + 30)
    assert len(results) == 120
    assert {r["outcome"] for r in results} == {"EIO"}, results
    longest = max(float(str(r["seconds"])) for r in results)
    assert LOCK_TIMEOUT - 1 <= longest < 2 * LOCK_TIMEOUT + 5, results
    backing = cluster.backings[0].resolve() / "held"
    log = mount.log_text()
    assert (f"{backing}: gave up after {LOCK_TIMEOUT} s waiting for a shared lock of bytes") in log
    assert "another daemon holds a conflicting lock; shared_lock_timeout)" in log
    figures = lock_waits(mount)
    assert figures["waiting"] == 0 and figures["timed_out"] > 0
    assert answered_within(3, lambda: mount.path("other").read_bytes()) == b"other bytes"


def test_killed_callers_stop_waiting_and_give_their_places_back(cluster: Cluster) -> None:
    """8 threads stat a file (by 8 names) whose end another host keeps locked, and wait
    (deadline 60 s).  SIGKILL of their process ends their waits at once: it is reaped within
    seconds, the daemon counts no waiting request and 8 interrupted ones.  Then 32
    waits (the most that may) can start again, and more are refused at once.
    (Before: a killed caller stayed in D state until the lock was released, and its
    request kept its place in the daemon.)"""
    [mount] = cluster.shared(1, "shared_lock_timeout=60", "shared_timeout=0")
    mount.path("held").write_bytes(os.urandom(3 * BS))
    for n in range(40):  # a name per stat: the kernel makes lookups of one name queue
        os.link(mount.path("held"), mount.path(f"held.{n}"))
    cluster.hold_lock("held")
    waiters = cluster.waiters(mount.path("held"), readers=0, stats=8, links=True)
    wait_for("8 stats waiting", lambda: lock_waits(mount)["waiting"] == 8)
    start = time.monotonic()
    waiters.kill()
    waiters.communicate(timeout=10)  # reaped: every thread's request was answered
    assert time.monotonic() - start < 5
    wait_for("no request waiting", lambda: lock_waits(mount)["waiting"] == 0, timeout=3)
    assert lock_waits(mount)["interrupted"] == 8
    assert "was interrupted" in mount.log_text()

    more = cluster.waiters(mount.path("held"), readers=0, stats=33, links=True)
    wait_for("32 waiting, more refused", lambda: lock_waits(mount)["refused"] > 0, timeout=30)
    figures = lock_waits(mount)
    assert figures["waiting"] == 32, figures
    assert "32 requests wait for other daemons already, the most that may" in mount.log_text()
    more.kill()
    more.communicate(timeout=10)
    wait_for("no request waiting", lambda: lock_waits(mount)["waiting"] == 0, timeout=3)


def test_sigterm_ends_the_daemon_at_once_while_requests_wait(cluster: Cluster) -> None:
    """SIGTERM while 10 reads and 10 stats wait for a lock another host holds (deadline
    60 s): the waits give up, the daemon unmounts and exits within seconds, and the
    waiting threads get an error.  (Before: SIGTERM was never acted on while a wait was
    under way.)"""
    [mount] = cluster.shared(1, "shared_lock_timeout=60")
    mount.path("held").write_bytes(os.urandom(3 * BS))
    cluster.hold_lock("held")
    waiters = cluster.waiters(mount.path("held"), readers=10, stats=10)
    wait_for("requests waiting", lambda: lock_waits(mount)["waiting"] > 0)
    os.kill(mount.pid, signal.SIGTERM)
    assert wait_exited(mount.pid, 10), "the daemon did not exit after SIGTERM"
    results = outcomes(waiters, timeout=10)
    assert len(results) == 20
    assert {r["outcome"] for r in results} <= {"EIO", "ENOTCONN", "ECONNABORTED"}, results
    cluster.mounts.remove(mount)
    force_unmount(mount.mountpoint)


def test_unmount_ends_the_daemon_at_once_while_a_killed_readers_read_waits(
    cluster: Cluster,
) -> None:
    """Another host locks block 0 of a file; a reader of it waits in a READ request,
    which the kernel sends on behalf of the page cache, with no caller the daemon could
    ask about (pyfuse3 gives read handlers none).  SIGKILL ends the reader at once;
    ``kmsfs umount`` succeeds, and the daemon, whose READ still waits (deadline 60 s),
    stops waiting and exits within seconds.  (Before: it waited for the lock for ever
    after the unmount.)  One reader only: while that READ holds page 0 locked, every
    other open of the file on this host waits for the page lock in the kernel
    (shared mode's open drops the page cache), unkillable, until the READ ends: at most
    the deadline, which is what bounds it."""
    [mount] = cluster.shared(1, "shared_lock_timeout=60")
    mount.path("held").write_bytes(os.urandom(3 * BS))
    cluster.hold_lock("held", 0, Layout(BS, FORMAT_2).backing_block)
    reader = cluster.waiters(mount.path("held"), readers=1, stats=0)
    wait_for("the read waiting", lambda: lock_waits(mount)["waiting"] == 1)
    start = time.monotonic()
    reader.kill()
    reader.communicate(timeout=10)
    assert time.monotonic() - start < 5
    assert lock_waits(mount)["waiting"] == 1  # the READ the page cache asked for
    answered_within(10, lambda: run_kmsfs("umount", mount.mountpoint))
    assert wait_exited(mount.pid, 10), "the daemon did not exit after the unmount"
    cluster.mounts.remove(mount)
    assert "gave up waiting for a shared lock of bytes 0" in mount.log_text()
    assert "the daemon is stopping" in mount.log_text()
