"""The rows: what each workload does on one system, and the sizes it uses.

Each row ``key`` has ``Bench.prep_<key>`` (untimed set-up), ``Bench.run_<key>``
(returns the figure) and optionally ``Bench.post_<key>`` (untimed clean-up).
Rows 3-6 share the untarred tree, and each prep makes what its row needs if
an earlier row did not, so any subset of rows can run alone.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.common import MB, MiB, log, run, timed
from benchlib.systems import System


@dataclass
class Sizes:
    """How big each workload is.  Attributes (rows): seq_bytes (1, 2), tree_source (3-6),
    fio_bytes and fio_seconds (7), creates (8)."""

    seq_bytes: int
    tree_source: str
    fio_bytes: int
    fio_seconds: int
    creates: int


FULL = Sizes(256 * MiB, "/usr/include", 256 * MiB, 5, 20_000)
QUICK = Sizes(32 * MiB, "/usr/include/linux", 32 * MiB, 2, 2_000)


@dataclass(frozen=True)
class Row:
    """One line of the table: kmsfs / best peer must reach ``target`` (throughput: at
    least, time: at most)."""

    key: str
    number: str
    label: str
    unit: str
    higher_better: bool
    target: float


ROWS = [
    Row("seqwrite", "1", "sequential write (dd bs=128k, fsync)", "MB/s", True, 1.0),
    Row("seqread", "2", "cold sequential read (dd bs=128k)", "MB/s", True, 1.0),
    Row("untar", "3", "untar", "s", False, 1.0),
    Row("ls", "4", "`ls -lR`, cold", "s", False, 1.0),
    Row("readall", "5", "read all (`find -type f` + `xargs cat`), cold", "s", False, 1.0),
    Row("rm", "6", "`rm -rf`", "s", False, 1.0),
    Row("randread", "7a", "fio random 4 KiB read, cold", "IOPS", True, 0.8),
    Row("randwrite", "7b", "fio random 4 KiB write (+ end fsync)", "IOPS", True, 0.8),
    Row("create", "8", "create + stat of empty files in one dir", "s", False, 1.0),
]

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


class Bench:
    """The workloads; each run_* method returns one figure for one system."""

    def __init__(self, work: Path, sizes: Sizes) -> None:
        self.work = work
        self.sizes = sizes
        self.tar = work / "tree.tar"

    def make_tar(self) -> None:
        source = Path(self.sizes.tree_source)
        run(["tar", "-C", str(source.parent), "-cf", str(self.tar), source.name])
        count = int(run(f"tar -tf {shlex.quote(str(self.tar))} | grep -vc '/$'").stdout)
        log(f"tar of {source}: {count} files, {self.tar.stat().st_size / MB:.0f} MB")

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

    def leftovers(self, s: System) -> list[Path]:
        """Everything a row may leave on a volume."""
        return [
            self.seq(s),
            self.tree(s),
            self.fio_file(s),
            self.many(s),
        ]

    def _dd_write(self, path: Path) -> str:
        count = self.sizes.seq_bytes // (128 * 1024)
        target = shlex.quote(str(path))
        return f"dd if=/dev/zero of={target} bs=128k count={count} conv=fsync status=none"

    def _untar(self, s: System) -> str:
        tree = shlex.quote(str(self.tree(s)))
        return f"mkdir {tree} && tar -C {tree} -xf {shlex.quote(str(self.tar))}"

    # 1
    def prep_seqwrite(self, s: System) -> None:
        self.seq(s).unlink(missing_ok=True)

    def run_seqwrite(self, s: System) -> float:
        return self.sizes.seq_bytes / MB / timed(self._dd_write(self.seq(s)))

    # 2
    def prep_seqread(self, s: System) -> None:
        if not self.seq(s).exists():
            run(self._dd_write(self.seq(s)))
        s.remount_cold()

    def run_seqread(self, s: System) -> float:
        path = shlex.quote(str(self.seq(s)))
        seconds = timed(f"dd if={path} of=/dev/null bs=128k status=none")
        return self.sizes.seq_bytes / MB / seconds

    def post_seqread(self, s: System) -> None:
        self.seq(s).unlink(missing_ok=True)

    # 3
    def prep_untar(self, s: System) -> None:
        if self.tree(s).exists():
            run(["rm", "-rf", str(self.tree(s))])

    def run_untar(self, s: System) -> float:
        return timed(self._untar(s))

    # 4, 5, 6
    def _ensure_tree(self, s: System) -> None:
        if not self.tree(s).exists():
            run(self._untar(s))

    def prep_ls(self, s: System) -> None:
        self._ensure_tree(s)
        s.remount_cold()

    def run_ls(self, s: System) -> float:
        return timed(f"ls -lR {shlex.quote(str(self.tree(s)))} > /dev/null")

    def prep_readall(self, s: System) -> None:
        self._ensure_tree(s)
        s.remount_cold()

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
        s.remount_cold()

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
