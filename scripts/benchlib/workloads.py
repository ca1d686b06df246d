"""The rows: what each workload does on one system, and the sizes it uses.

Each row ``key`` has ``Bench.prep_<key>`` (untimed set-up), ``Bench.run_<key>``
(returns the figure) and optionally ``Bench.post_<key>`` (untimed clean-up).
``Bench.prepare`` runs the prep and, for a ``cold`` row, then remounts the system
and drops the kernel's caches, right before the timed run: the drop is global, so
a row that read state an earlier row left would otherwise meet it cold or warm
depending on which system ran last (rows run interleaved across systems).
Rows that share state run in order (3-6 share the untarred tree, 10a-10d the
clone), and each prep makes what its row needs if an earlier row did not, so
any subset of rows can run alone.  A row measured by another row's run (11b, the
latency of the pgbench run of 11a) names it in ``part_of``: that run returns a
figure per row key.  ``Bench.cleanup`` stops whatever a row left running (the
pgbench row's server) after a failure or an interruption.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import postgres
from benchlib.common import CMD_TIMEOUT, MB, MiB, Skipped, log, run, timed
from benchlib.cproject import git_env, make_project
from benchlib.systems import System


@dataclass
class Sizes:
    """How big each workload is.  Attributes (rows): seq_bytes (1, 2), tree_source (3-6),
    fio_bytes and fio_seconds (7), creates (8), procs (9a, 9b), par_bytes (9a, per
    process), par_creates (9b, per process), modules (10, C modules in the project),
    pgbench_seconds and pgbench_scale (11: the timed run, ``pgbench -i -s``),
    sqlite_txns (12a, 12b: transactions)."""

    seq_bytes: int
    tree_source: str
    fio_bytes: int
    fio_seconds: int
    creates: int
    procs: int = 8
    par_bytes: int = 64 * MiB
    par_creates: int = 2_000
    modules: int = 48
    pgbench_seconds: int = 60
    pgbench_scale: int = 10
    sqlite_txns: int = 2_000


FULL = Sizes(256 * MiB, "/usr/include", 256 * MiB, 5, 20_000)
QUICK = Sizes(
    32 * MiB,
    "/usr/include/linux",
    32 * MiB,
    2,
    2_000,
    par_bytes=8 * MiB,
    par_creates=250,
    modules=16,
    pgbench_seconds=10,
    sqlite_txns=200,
)


@dataclass(frozen=True)
class Row:
    """One line of the table.  ``peer_target``: kmsfs / best peer must reach it (throughput:
    at least, time: at most), or kmsfs / ``versus`` if that names a peer;
    ``floor_target``: kmsfs / floor must stay within it; ``part_of``: the key of the
    row whose run also gives this row's figure (this row has no methods of its own);
    ``cold``: the system is remounted and the kernel's caches dropped right before the
    timed run (``Bench.prepare``), and the label says "cold"."""

    key: str
    number: str
    label: str
    unit: str
    higher_better: bool
    peer_target: float | None = None
    floor_target: float | None = None
    versus: str | None = None
    part_of: str | None = None
    cold: bool = False


# Targets: data rows against the best peer, metadata rows against the floor; the third
# round's (docs/PERFORMANCE.md, "Where each workload stands") where it set one, the
# second round's otherwise (sequential I/O, read all, git status).
ROWS = [
    Row("rtt", "0", "request round trip (uncached getxattr)", "µs", False),
    Row("seqwrite", "1", "sequential write (dd bs=128k, fsync)", "MB/s", True, 0.9),
    Row("seqread", "2", "cold sequential read (dd bs=128k)", "MB/s", True, 1.0, cold=True),
    Row("untar", "3", "untar", "s", False, floor_target=1.15),
    Row("ls", "4", "`ls -lR`, cold", "s", False, floor_target=1.15, cold=True),
    Row(
        "readall",
        "5",
        "read all (`find -type f` + `xargs cat`), cold",
        "s",
        False,
        floor_target=1.25,
        cold=True,
    ),
    Row("rm", "6", "`rm -rf`, cold", "s", False, floor_target=1.15, cold=True),
    Row("randread", "7a", "fio random 4 KiB read, cold", "IOPS", True, 0.8, cold=True),
    Row(
        "randwrite",
        "7b",
        "fio random 4 KiB write (+ end fsync), cold",
        "IOPS",
        True,
        0.8,
        cold=True,
    ),
    Row("create", "8", "create + stat of empty files in one dir", "s", False, floor_target=1.15),
    Row(
        "parrw",
        "9a",
        "{procs} processes at once, each writes (fsync) then reads its own file",
        "MB/s",
        True,
        0.8,
    ),
    Row(
        "parcreate",
        "9b",
        "{procs} processes at once, each creates files in its own dir",
        "files/s",
        True,
        0.8,
    ),
    Row("gitclone", "10a", "C project: `git clone` (file://)", "s", False),
    Row("gitmake", "10b", "C project: `make -j2`", "s", False),
    Row("gitstatus", "10c", "C project: `git status` ×3", "s", False, floor_target=1.25),
    Row("gitrm", "10d", "C project: `rm -rf` of the clone", "s", False),
    # Real workloads: pgbench TPS at least gocryptfs's, SQLite at least the best peer's.
    Row(
        "pgbench",
        "11a",
        f"PostgreSQL `pgbench` TPC-B-like, {postgres.CLIENTS} clients, fsync on: throughput",
        "TPS",
        True,
        1.0,
        versus="gocryptfs",
    ),
    Row(
        "pgbench_p99",
        "11b",
        "PostgreSQL `pgbench`: latency p99 (same run)",
        "ms",
        False,
        part_of="pgbench",
    ),
    Row(
        "sqlite",
        "12a",
        "SQLite: one insert per transaction, synchronous FULL, rollback journal (DELETE)",
        "tx/s",
        True,
        1.0,
    ),
    Row(
        "sqlitewal",
        "12b",
        "SQLite: one insert per transaction, synchronous FULL, write-ahead log (WAL)",
        "tx/s",
        True,
        1.0,
    ),
]

# Row 0: one process asks for an extended attribute the file does not have, which
# the kernel never caches, so each call is one FUSE round trip; best of 5 rounds.
RTT_CALLS, RTT_ROUNDS = 20_000, 5  # row 0: getxattr calls per round, rounds (best of)
RTT_REQUESTS = RTT_CALLS * RTT_ROUNDS  # what the daemon answers during row 0
ROUND_TRIPS = """
import os, sys, time
path, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
best = None
for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(n):
        try:
            os.getxattr(path, "user.kmsfs-bench-absent")
        except OSError:
            pass
    seconds = time.perf_counter() - start
    best = seconds if best is None else min(best, seconds)
print(best / n * 1e6)
"""

CREATE_AND_STAT = """
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
names = [os.path.join(d, "f%06d" % i) for i in range(n)]
flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
for p in names:
    os.close(os.open(p, flags, 0o644))
for p in names:
    os.stat(p)
"""

# One process of row 9b: says it is ready, waits for the go, creates, prints its end time.
CREATE_ON_GO = """
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
names = [os.path.join(d, "f%06d" % i) for i in range(n)]
flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
print("ready", flush=True)
sys.stdin.readline()
for p in names:
    os.close(os.open(p, flags, 0o644))
print(time.monotonic(), flush=True)
"""

# Rows 12a, 12b: SQLite with synchronous FULL, so each COMMIT returns once durable.
# DELETE (SQLite's default journal): the journal file is created, written and synced
# (with its directory), the database page written and synced, the journal deleted.
# WAL: the commit appends to the -wal file and syncs it; the -shm index is a shared
# mmap.  The journal mode is set when the database is made (WAL stays set in the file)
# and checked again by the timed script.  Exit status 3: the mode could not be set.
SQLITE_SCHEMA = """
import sqlite3, sys
path, journal = sys.argv[1], sys.argv[2]
db = sqlite3.connect(path, isolation_level=None)
mode = db.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
if mode != journal.lower():
    print(f"PRAGMA journal_mode={journal} left it {mode}", file=sys.stderr)
    sys.exit(3)
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
db.close()
"""

SQLITE_TRANSACTIONS = """
import os, sqlite3, sys
path, journal, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = sqlite3.connect(path, isolation_level=None)
mode = db.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
if mode != journal.lower():
    sys.exit(f"journal_mode is {mode}, not {journal}")
db.execute("PRAGMA synchronous=FULL")
payload = os.urandom(100)
for _ in range(n):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
    db.execute("COMMIT")
db.close()
"""
SQLITE_JOURNALS = {"sqlite": "DELETE", "sqlitewal": "WAL"}


class Bench:
    """The workloads; each run_* method returns one figure for one system, or a figure
    per row key for a row that others are ``part_of``.

    Attributes: unavailable (row key -> why it is skipped on every system, e.g. no
    PostgreSQL), pg_bindir (PostgreSQL's programs, set when a pgbench row runs),
    servers (system name -> the PostgreSQL server running on it), pgbench_processed
    (system name -> transactions its last pgbench run completed)."""

    def __init__(self, work: Path, sizes: Sizes) -> None:
        self.work = work
        self.sizes = sizes
        self.tar = work / "tree.tar"
        self.project: Path | None = None
        self.unavailable: dict[str, str] = {}
        self.pg_bindir: Path | None = None
        self.servers: dict[str, postgres.Server] = {}
        self.pgbench_processed: dict[str, int] = {}

    def make_tar(self) -> None:
        source = Path(self.sizes.tree_source)
        run(["tar", "-C", str(source.parent), "-cf", str(self.tar), source.name])
        count = int(run(f"tar -tf {shlex.quote(str(self.tar))} | grep -vc '/$'").stdout)
        log(f"tar of {source}: {count} files, {self.tar.stat().st_size / MB:.0f} MB")

    def make_project(self) -> None:
        self.project = make_project(self.work, self.sizes.modules)
        log(f"C project: {self.sizes.modules} modules, git history in {self.project}")

    # paths
    @staticmethod
    def seq(s: System) -> Path:
        return s.mnt / "seq.bin"

    @staticmethod
    def tree(s: System) -> Path:
        return s.mnt / "tree"

    @staticmethod
    def fio_file(s: System) -> Path:
        return s.mnt / "fio.bin"

    @staticmethod
    def many(s: System) -> Path:
        return s.mnt / "many"

    @staticmethod
    def par(s: System) -> Path:
        return s.mnt / "par"

    @staticmethod
    def clone(s: System) -> Path:
        return s.mnt / "cproject"

    @staticmethod
    def pgdata(s: System) -> Path:
        return s.mnt / "pgdata"

    @staticmethod
    def sqlite_db(s: System) -> Path:
        return s.mnt / "sqlite" / "bench.db"

    def leftovers(self, s: System) -> list[Path]:
        """Everything a row may leave on a volume."""
        return [
            self.rtt_file(s),
            self.seq(s),
            self.tree(s),
            self.fio_file(s),
            self.many(s),
            self.par(s),
            self.clone(s),
            self.pgdata(s),
            self.sqlite_db(s).parent,
        ]

    def cleanup(self, s: System) -> None:
        """Stop whatever a row left running on *s* (the pgbench row's server), so that
        it can be unmounted; never raises."""
        server = self.servers.pop(s.name, None)
        if server is not None:
            server.stop()

    def prepare(self, row: Row, s: System) -> None:
        """The untimed set-up of *row* on *s*: its prep, then for a cold row a remount
        of *s* and a drop of the kernel's caches, so that nothing runs between the drop
        and the timed run."""
        getattr(self, f"prep_{row.key}")(s)
        if row.cold:
            s.remount_cold()

    def _dd_write(self, path: Path) -> str:
        count = self.sizes.seq_bytes // (128 * 1024)
        target = shlex.quote(str(path))
        return f"dd if=/dev/zero of={target} bs=128k count={count} conv=fsync status=none"

    def _untar(self, s: System) -> str:
        tree = shlex.quote(str(self.tree(s)))
        return f"mkdir {tree} && tar -C {tree} -xf {shlex.quote(str(self.tar))}"

    # 0
    @staticmethod
    def rtt_file(s: System) -> Path:
        return s.mnt / "rtt"

    def prep_rtt(self, s: System) -> None:
        self.rtt_file(s).write_bytes(b"")

    def run_rtt(self, s: System) -> float:
        path, calls, rounds = str(self.rtt_file(s)), str(RTT_CALLS), str(RTT_ROUNDS)
        out = run([sys.executable, "-c", ROUND_TRIPS, path, calls, rounds]).stdout
        return float(out)

    def post_rtt(self, s: System) -> None:
        self.rtt_file(s).unlink(missing_ok=True)

    # 1
    def prep_seqwrite(self, s: System) -> None:
        self.seq(s).unlink(missing_ok=True)

    def run_seqwrite(self, s: System) -> float:
        return self.sizes.seq_bytes / MB / timed(self._dd_write(self.seq(s)))

    # 2
    def prep_seqread(self, s: System) -> None:
        if not self.seq(s).exists():
            run(self._dd_write(self.seq(s)))

    def run_seqread(self, s: System) -> float:
        path = shlex.quote(str(self.seq(s)))
        seconds = timed(f"dd if={path} of=/dev/null bs=128k status=none")
        return self.sizes.seq_bytes / MB / seconds

    def post_seqread(self, s: System) -> None:
        self.seq(s).unlink(missing_ok=True)

    # 3
    def prep_untar(self, s: System) -> None:
        """No tree on the mount, and the tar read once: every system untars it from the
        page cache (a cold row dropped it, and only the first untar after would read
        the disk)."""
        if self.tree(s).exists():
            run(["rm", "-rf", str(self.tree(s))])
        run(f"cat {shlex.quote(str(self.tar))} > /dev/null")

    def run_untar(self, s: System) -> float:
        return timed(self._untar(s))

    # 4, 5, 6
    def _ensure_tree(self, s: System) -> None:
        if not self.tree(s).exists():
            run(self._untar(s))

    def prep_ls(self, s: System) -> None:
        self._ensure_tree(s)

    def run_ls(self, s: System) -> float:
        return timed(f"ls -lR {shlex.quote(str(self.tree(s)))} > /dev/null")

    def prep_readall(self, s: System) -> None:
        self._ensure_tree(s)

    def run_readall(self, s: System) -> float:
        tree = shlex.quote(str(self.tree(s)))
        return timed(f"find {tree} -type f -print0 | xargs -0 cat > /dev/null")

    def prep_rm(self, s: System) -> None:
        self._ensure_tree(s)

    def run_rm(self, s: System) -> float:
        return timed(["rm", "-rf", str(self.tree(s))])

    # 7
    def _fio(self, s: System, rw: str, extra: list[str]) -> dict[str, object]:
        out = run(
            [
                "fio",
                f"--name={rw}",
                f"--filename={self.fio_file(s)}",
                f"--size={self.sizes.fio_bytes}",
                f"--rw={rw}",
                "--bs=4k",
                "--direct=0",
                "--ioengine=psync",
                "--numjobs=1",
                f"--runtime={self.sizes.fio_seconds}",
                "--time_based",
                "--output-format=json",
                *extra,
            ]
        ).stdout
        return json.loads(out[out.index("{") :])["jobs"][0]  # type: ignore[no-any-return]

    def prep_randread(self, s: System) -> None:
        path = self.fio_file(s)
        if not path.exists() or path.stat().st_size != self.sizes.fio_bytes:
            count = self.sizes.fio_bytes // (1024 * 1024)
            run(
                f"dd if=/dev/urandom of={shlex.quote(str(path))} bs=1M count={count}"
                " conv=fsync status=none"
            )

    def run_randread(self, s: System) -> float:
        return float(self._fio(s, "randread", [])["read"]["iops"])  # type: ignore[index]

    def prep_randwrite(self, s: System) -> None:
        self.prep_randread(s)

    def run_randwrite(self, s: System) -> float:
        """Writes for the run time, then fsync: IOPS over the wall time including the fsync.

        Without the fsync a writeback-cache filesystem would be measured writing to RAM.
        """
        start = time.perf_counter()
        job = self._fio(s, "randwrite", ["--end_fsync=1"])
        seconds = time.perf_counter() - start
        return float(job["write"]["total_ios"]) / seconds  # type: ignore[index]

    def post_randwrite(self, s: System) -> None:
        self.fio_file(s).unlink(missing_ok=True)

    # 8
    def prep_create(self, s: System) -> None:
        if self.many(s).exists():
            run(["rm", "-rf", str(self.many(s))])
        self.many(s).mkdir()

    def run_create(self, s: System) -> float:
        return timed(
            [sys.executable, "-c", CREATE_AND_STAT, str(self.many(s)), str(self.sizes.creates)]
        )

    def post_create(self, s: System) -> None:
        run(["rm", "-rf", str(self.many(s))])

    # 9a, 9b
    def _fresh_par(self, s: System) -> None:
        if self.par(s).exists():
            run(["rm", "-rf", str(self.par(s))])
        self.par(s).mkdir()

    def prep_parrw(self, s: System) -> None:
        self._fresh_par(s)

    def run_parrw(self, s: System) -> float:
        """Every process: dd write + fsync, drop the file's cached pages, dd read.

        Dropping the pages (``dd iflag=nocache count=0``: POSIX_FADV_DONTNEED) makes
        the read reach the filesystem, which a read right after the write would not
        (the writeback cache keeps the pages).  MB/s = bytes written + bytes read,
        over the wall time of all processes.
        """
        count = self.sizes.par_bytes // (128 * 1024)
        script = (
            'pids=(); for i in $(seq 1 "$1"); do f="$2/f$i"; ('
            f' dd if=/dev/zero of="$f" bs=128k count={count} conv=fsync status=none'
            ' && dd if="$f" iflag=nocache count=0 status=none'
            ' && dd if="$f" of=/dev/null bs=128k status=none'
            ') & pids+=($!); done; for p in "${pids[@]}"; do wait "$p" || exit 1; done'
        )
        seconds = timed(["bash", "-c", script, "par", str(self.sizes.procs), str(self.par(s))])
        return 2 * self.sizes.procs * count * 128 * 1024 / MB / seconds

    def post_parrw(self, s: System) -> None:
        run(["rm", "-rf", str(self.par(s))])

    def prep_parcreate(self, s: System) -> None:
        self._fresh_par(s)
        for i in range(self.sizes.procs):
            (self.par(s) / f"d{i}").mkdir()

    def run_parcreate(self, s: System) -> float:
        """All processes start creating at one moment, once every one has started
        (a barrier on their pipes); files/s = all files over the time from that
        moment to the end of the last one."""
        n = self.sizes.par_creates
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CREATE_ON_GO, str(self.par(s) / f"d{i}"), str(n)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(self.sizes.procs)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    proc.kill()
                    err = proc.stdout.read().strip()[-500:]
                    raise RuntimeError(f"a creating process did not start: {err}")
            start = time.monotonic()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            ends, failed = [], []
            for proc in procs:
                out = proc.communicate(timeout=max(start + CMD_TIMEOUT - time.monotonic(), 1))[0]
                if proc.returncode:
                    failed.append(out.strip()[-500:])
                else:
                    ends.append(float(out))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if failed:
            raise RuntimeError(f"{len(failed)} creating process(es) failed: {failed[0]}")
        return self.sizes.procs * n / (max(ends) - start)

    def post_parcreate(self, s: System) -> None:
        run(["rm", "-rf", str(self.par(s))])

    # 10a-10d
    def _clone_now(self, s: System) -> None:
        if self.project is None:
            raise RuntimeError("no C project (Bench.make_project was not called)")
        run(["git", "clone", "-q", f"file://{self.project}", str(self.clone(s))], env=git_env())

    def _ensure_built(self, s: System) -> None:
        if not self.clone(s).exists():
            self._clone_now(s)
        if not (self.clone(s) / "app").exists():
            run(["make", "-C", str(self.clone(s)), "-j2", "-s"])

    def prep_gitclone(self, s: System) -> None:
        """No clone on the mount, and the project read once: every system clones it from
        the page cache (as the tar in prep_untar)."""
        if self.clone(s).exists():
            run(["rm", "-rf", str(self.clone(s))])
        if self.project is not None:
            run(f"find {shlex.quote(str(self.project))} -type f -exec cat {{}} + > /dev/null")

    def run_gitclone(self, s: System) -> float:
        start = time.perf_counter()
        self._clone_now(s)
        return time.perf_counter() - start

    def prep_gitmake(self, s: System) -> None:
        if self.clone(s).exists():  # from row 10a; else (row run alone) clone now
            run(["git", "-C", str(self.clone(s)), "clean", "-q", "-fdx"], env=git_env())
        else:
            self._clone_now(s)

    def run_gitmake(self, s: System) -> float:
        return timed(["make", "-C", str(self.clone(s)), "-j2", "-s"])

    def prep_gitstatus(self, s: System) -> None:
        self._ensure_built(s)

    def run_gitstatus(self, s: System) -> float:
        """Three ``git status`` right after the build (warm: as a developer runs it)."""
        clone = shlex.quote(str(self.clone(s)))
        return timed(f"for i in 1 2 3; do git -C {clone} status > /dev/null; done", env=git_env())

    def prep_gitrm(self, s: System) -> None:
        self._ensure_built(s)

    def run_gitrm(self, s: System) -> float:
        return timed(["rm", "-rf", str(self.clone(s))])

    # 11a, 11b
    def prep_pgbench(self, s: System) -> None:
        """A new cluster on the mount, started, ``pgbench -i``, checkpointed."""
        if self.pg_bindir is None:
            raise Skipped("PostgreSQL was not looked for (Bench.pg_bindir unset)")
        self.cleanup(s)
        if self.pgdata(s).exists():
            run(["rm", "-rf", str(self.pgdata(s))])
        server = postgres.Server(self.pg_bindir, self.pgdata(s))
        self.servers[s.name] = server
        server.create()
        server.start()
        server.initialise(self.sizes.pgbench_scale)

    def run_pgbench(self, s: System) -> dict[str, float]:
        """TPS as pgbench reports it, and the p99 latency (ms) from its transaction log."""
        summary, latencies = self.servers[s.name].pgbench(self.sizes.pgbench_seconds)
        self.pgbench_processed[s.name] = summary.processed
        return {"pgbench": summary.tps, "pgbench_p99": latencies.p99_ms}

    def post_pgbench(self, s: System) -> None:
        self.cleanup(s)
        run(["rm", "-rf", str(self.pgdata(s))])

    # 12a, 12b
    def _sqlite_prep(self, s: System, journal: str) -> None:
        """A new database in its own directory, its journal mode set.

        Skipped if SQLite cannot set that journal mode on the filesystem (the reason
        is SQLite's); RuntimeError if making the database fails otherwise."""
        folder = self.sqlite_db(s).parent
        if folder.exists():
            run(["rm", "-rf", str(folder)])
        folder.mkdir()
        made = subprocess.run(
            [sys.executable, "-c", SQLITE_SCHEMA, str(self.sqlite_db(s)), journal],
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT,
            check=False,
        )
        why = made.stderr.strip().splitlines()[-1:] or [f"exit status {made.returncode}"]
        if made.returncode == 3:
            raise Skipped(f"SQLite cannot use journal mode {journal} here: {why[0]}")
        if made.returncode != 0:
            raise RuntimeError(f"making the SQLite database ({journal}) failed: {why[0]}")

    def _sqlite_run(self, s: System, journal: str) -> float:
        """Transactions per second of one process (start-up included) doing them all."""
        n = self.sizes.sqlite_txns
        return n / timed(
            [sys.executable, "-c", SQLITE_TRANSACTIONS, str(self.sqlite_db(s)), journal, str(n)]
        )

    def prep_sqlite(self, s: System) -> None:
        self._sqlite_prep(s, SQLITE_JOURNALS["sqlite"])

    def run_sqlite(self, s: System) -> float:
        return self._sqlite_run(s, SQLITE_JOURNALS["sqlite"])

    def post_sqlite(self, s: System) -> None:
        run(["rm", "-rf", str(self.sqlite_db(s).parent)])

    def prep_sqlitewal(self, s: System) -> None:
        self._sqlite_prep(s, SQLITE_JOURNALS["sqlitewal"])

    def run_sqlitewal(self, s: System) -> float:
        return self._sqlite_run(s, SQLITE_JOURNALS["sqlitewal"])

    def post_sqlitewal(self, s: System) -> None:
        self.post_sqlite(s)
