"""Real applications on the mount: SQLite (rollback journal and WAL), git, shared mmap, tar.

Each checks the application's own consistency check (``PRAGMA
integrity_check``, ``git fsck``) and the data after a remount, so what is
verified went through encryption to the backing files and back.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from support.fuse import requires_fuse
from support.volumes import BOTH_NAMES, Volume

pytestmark = [requires_fuse, BOTH_NAMES]

BS = 4096


def fill_database(path: Path, journal_mode: str, transactions: int) -> dict[int, bytes]:
    """Many small transactions, with updates and deletes; returns the expected rows."""
    rng = random.Random(journal_mode)
    expected: dict[int, bytes] = {}
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        mode = db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        assert mode == journal_mode.lower()
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        db.execute("CREATE INDEX t_body ON t (body)")
        next_id = 0
        for _ in range(transactions):
            db.execute("BEGIN")
            for _ in range(rng.randrange(1, 8)):
                body = rng.randbytes(rng.choice([10, 300, 3000, 9000]))
                db.execute("INSERT INTO t VALUES (?, ?)", (next_id, body))
                expected[next_id] = body
                next_id += 1
            if expected and rng.random() < 0.4:
                victim = rng.choice(sorted(expected))
                db.execute("DELETE FROM t WHERE id = ?", (victim,))
                del expected[victim]
            if expected and rng.random() < 0.4:
                target = rng.choice(sorted(expected))
                body = rng.randbytes(500)
                db.execute("UPDATE t SET body = ? WHERE id = ?", (body, target))
                expected[target] = body
            if rng.random() < 0.1:
                db.execute("ROLLBACK")  # undo this transaction in the expected rows too
                expected = dict(db.execute("SELECT id, body FROM t"))
                next_id = max(expected, default=-1) + 1
            else:
                db.execute("COMMIT")
        if journal_mode == "WAL":
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return expected


def check_database(path: Path, expected: dict[int, bytes]) -> None:
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert dict(db.execute("SELECT id, body FROM t")) == expected


@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
def test_sqlite(mounted: Volume, journal_mode: str) -> None:
    path = mounted.path("db.sqlite")
    expected = fill_database(path, journal_mode, transactions=120)
    check_database(path, expected)
    # A second connection in another process sees the same data (WAL uses the
    # shared-memory file, an mmap of db.sqlite-shm on the mount).
    result = subprocess.run(
        ["sqlite3", str(path), "PRAGMA integrity_check; SELECT count(*) FROM t;"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", str(len(expected))]
    mounted.remount()
    check_database(path, expected)
    assert b"SQLite format 3" not in mounted.backing_path("db.sqlite").read_bytes()


def test_sqlite_wal_concurrent_writer_and_reader(mounted: Volume) -> None:
    path = mounted.path("wal.sqlite")
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE log (n INTEGER)")
    writer = subprocess.Popen(
        [
            "sqlite3",
            str(path),
            "PRAGMA busy_timeout=10000;"
            + "".join(f"INSERT INTO log VALUES ({n});" for n in range(300)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = 0
    with closing(sqlite3.connect(path, timeout=10)) as db:
        while writer.poll() is None:
            count = db.execute("SELECT count(*) FROM log").fetchone()[0]
            assert count >= seen  # readers never see committed rows disappear
            seen = count
    _, err = writer.communicate()
    assert writer.returncode == 0, err
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*), sum(n) FROM log").fetchone() == (300, sum(range(300)))
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=kmsfs test", "-c", "user.email=test@kmsfs.invalid", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd.parent)},
    )
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_git(mounted: Volume) -> None:
    repo = mounted.path("repo")
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    rng = random.Random(5)
    files = {}
    for i in range(40):
        name = f"src/pkg{i % 4}/module{i}.txt"
        files[name] = rng.randbytes(rng.randrange(10, 20000))
    files["README"] = b"kmsfs git test\n"
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    os.symlink("README", repo / "link")
    os.chmod(repo / "README", 0o755)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "README").write_bytes(b"changed\n")
    (repo / "src/pkg0/module0.txt").unlink()
    git(repo, "mv", "src/pkg1", "src/renamed")
    git(repo, "commit", "-q", "-a", "-m", "second")
    git(repo, "gc", "-q")  # packs objects: big sequential writes and an mmap of the pack
    git(repo, "fsck", "--full", "--strict")
    log = git(repo, "log", "--format=%s")
    assert log.split() == ["second", "first"]
    mounted.remount()
    git(repo, "fsck", "--full", "--strict")
    assert git(repo, "status", "--porcelain") == ""
    assert (repo / "README").read_bytes() == b"changed\n"
    assert (repo / "src/renamed/module1.txt").read_bytes() == files["src/pkg1/module1.txt"]
    assert git(repo, "show", "HEAD~1:README").encode() == files["README"]
    clone = mounted.path("clone")
    git(mounted.mountpoint, "clone", "-q", str(repo), str(clone))
    git(clone, "fsck", "--full")
    assert (clone / "src/pkg3/module3.txt").read_bytes() == files["src/pkg3/module3.txt"]


def test_shared_writable_mmap(mounted: Volume) -> None:
    path = mounted.path("mapped")
    size = 5 * BS + 123
    original = random.Random(9).randbytes(size)
    path.write_bytes(original)
    expected = bytearray(original)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mm:
        rng = random.Random(10)
        for _ in range(200):
            offset = rng.randrange(0, size)
            data = rng.randbytes(min(rng.randrange(1, 2 * BS), size - offset))
            mm[offset : offset + len(data)] = data
            expected[offset : offset + len(data)] = data
        mm[size - 1 : size] = b"!"
        expected[size - 1 : size] = b"!"
        mm.flush()  # msync(MS_SYNC)
        # A plain read through another descriptor sees what was written through the map.
        with open(path, "rb") as other:
            assert other.read() == bytes(expected)
        assert mm[:] == bytes(expected)
    assert path.stat().st_size == size
    mounted.remount()
    assert path.read_bytes() == bytes(expected)


def test_mmap_write_then_extend_and_read_through_mmap(mounted: Volume) -> None:
    path = mounted.path("grow")
    with open(path, "w+b") as f:
        f.truncate(2 * BS)
        with mmap.mmap(f.fileno(), 2 * BS) as mm:
            mm[BS - 2 : BS + 2] = b"edge"
            mm.flush()
        f.truncate(3 * BS + 7)  # extend after the map: the new part is zeros
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            assert len(mm) == 3 * BS + 7
            assert mm[BS - 2 : BS + 2] == b"edge"
            assert mm[2 * BS :] == bytes(BS + 7)
    mounted.remount()
    want = bytes(BS - 2) + b"edge" + bytes(BS - 2) + bytes(BS + 7)
    assert path.read_bytes() == want


def test_tar_round_trip(mounted: Volume, tmp_path: Path) -> None:
    """Unpack a tree onto the mount with tar, pack it again, and compare with the source."""
    source = tmp_path / "source"
    rng = random.Random(3)
    for i in range(60):
        p = source / f"d{i % 5}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.choice([0, 1, BS, BS + 1, 50_000])))
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    os.symlink("d0/f0", source / "ln")
    archive = tmp_path / "a.tar"
    subprocess.run(
        ["tar", "--format=posix", "-C", str(source), "-cf", str(archive), "."], check=True
    )
    target = mounted.path("unpacked")
    target.mkdir()
    subprocess.run(["tar", "-C", str(target), "-xf", str(archive)], check=True)
    mounted.remount()
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", str(source), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert (target / "d1/f1").stat().st_mtime_ns == 1_600_000_000_000_000_001
    shutil.rmtree(target)
    assert not target.exists()
