"""Options, set-up and the run loop of ``scripts/bench``.

Workloads run interleaved: for each repeat, each row runs on every system (in
an order rotated per repeat) before the next row starts.  Figures are medians
over the repeats.  Whatever happens (failure, Ctrl-C, SIGTERM), every server a
row started is stopped and every mount this script made is unmounted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from benchlib import postgres
from benchlib.budget import RowBudget, budget_rows, render_budget, run_budget
from benchlib.common import (
    BENCHLIB,
    FAILURES,
    KMSFS,
    ROOT,
    STOCK_VENV,
    VENV_PYTHON,
    MiB,
    Skipped,
    apt_install,
    log,
    pid_alive,
    proc_cpu,
    proc_hwm_kb,
    run,
)
from benchlib.report import Results, Sample, fmt, render
from benchlib.systems import AT_REVISION, DEFAULT_SYSTEMS, SYSTEMS, System, make_system
from benchlib.workloads import FULL, QUICK, ROWS, Bench, Row, Sizes

TREE_ROWS = {"untar", "ls", "readall", "rm"}
GIT_ROWS = {"gitclone", "gitmake", "gitstatus", "gitrm"}


def recreate(s: System) -> None:
    """Replace a volume that cannot be cleaned through its mount with a new one."""
    try:
        s.umount()
    except FAILURES:
        pass
    s.force_cleanup()
    run(["rm", "-rf", str(s.base)])
    s.create()
    s.mount()


def measure(bench: Bench, row: Row, system: System) -> dict[str, Sample]:
    """Prepare, time and clean up one row on one system, with the daemon's CPU and RSS:
    the sample of the row and of each row ``part_of`` it, by row key (the daemon's CPU
    and RSS go with the row's own sample).

    Skipped if the row cannot run here (bench.unavailable, or its prep says why).
    RuntimeError if the system is not mounted when the row starts or its daemon is gone
    when it ends (something else unmounted or killed it): the row would have measured the
    directory under the mount point."""
    if row.key in bench.unavailable:
        raise Skipped(bench.unavailable[row.key])
    if system.fuse and not os.path.ismount(system.mnt):
        raise RuntimeError(f"{system.name} is not mounted at {system.mnt}")
    bench.prepare(row, system)
    pid = system.daemon_pid()
    cpu0 = proc_cpu(pid) if pid else None
    figures = getattr(bench, f"run_{row.key}")(system)
    if pid and not pid_alive(pid):
        raise RuntimeError(f"{system.name}: its daemon (pid {pid}) exited during the row")
    if not isinstance(figures, dict):
        figures = {row.key: figures}
    samples = {key: Sample(value=value) for key, value in figures.items()}
    sample = samples[row.key]
    if pid and cpu0 is not None and pid_alive(pid):
        sample.cpu = proc_cpu(pid) - cpu0
        sample.hwm_kb = proc_hwm_kb(pid)
    post = getattr(bench, f"post_{row.key}", None)
    if post is not None:
        post(system)
    return samples


def ensure_tools(names: list[str], rows: list[Row]) -> None:
    wanted = {"fio": "fio", "fusermount3": "fuse3", "tar": "tar"}
    if "gocryptfs" in names:
        wanted["gocryptfs"] = "gocryptfs"
    if "securefs" in names:
        wanted["securefs"] = "securefs"
    if GIT_ROWS & {r.key for r in rows}:
        wanted |= {"git": "git", "make": "make", "cc": "gcc"}
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if missing:
        apt_install(missing)
    if {"kmsfs", "passthrough", "floor"} & set(names) and not KMSFS.exists():
        log("no .venv yet: running scripts/setup")
        subprocess.run([str(ROOT / "scripts" / "setup")], check=True)
    if any(n.endswith("-stock") for n in names) and not (STOCK_VENV / "bin" / "kmsfs").exists():
        log("no .venv-stock yet: running scripts/setup --stock-pyfuse3 for it")
        env = dict(os.environ, KMSFS_VENV=str(STOCK_VENV))
        subprocess.run([str(ROOT / "scripts" / "setup"), "--stock-pyfuse3"], check=True, env=env)


def ensure_databases(bench: Bench, rows: list[Row]) -> None:
    """Find (or install) PostgreSQL for the pgbench rows and check that this python has
    sqlite3 for the SQLite rows; record in bench.unavailable why a row cannot run."""
    keys = {r.key for r in rows}
    if "pgbench" in keys:
        try:
            bench.pg_bindir = postgres.ensure()
        except Skipped as exc:
            bench.unavailable["pgbench"] = str(exc)
            log(f"pgbench rows skipped: {exc}")
    sqlite_rows = keys & {"sqlite", "sqlitewal"}
    if sqlite_rows:
        check = subprocess.run(
            [sys.executable, "-c", "import sqlite3"], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            why = f"{sys.executable} has no sqlite3 module: {check.stderr.strip()[-300:]}"
            for key in sqlite_rows:
                bench.unavailable[key] = why
            log(f"SQLite rows skipped: {why}")


def raise_fd_limit() -> None:
    """Let every daemon we start keep many descriptors, as on a stock Debian host.

    Daemons inherit our hard limit.  Containers often cap it (20,000 on the
    machine of docs/PERFORMANCE.md), and kmsfs holds one descriptor per inode
    the kernel knows, so row 8 (20,000 files) would fail with EMFILE there.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(int(Path("/proc/sys/fs/nr_open").read_text()), 1_048_576)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))
            log(f"raised the hard descriptor limit from {hard} to {want} for the daemons")
        except (ValueError, OSError) as exc:
            log(f"cannot raise the descriptor limit above {hard}: {exc}")


def parse_rows(spec: str | None) -> list[Row]:
    """The rows named in *spec* by key ("untar"), number ("7a") or group ("7", "10").

    A row and the rows ``part_of`` it come together (one run gives all their figures)."""
    if not spec:
        return list(ROWS)
    chosen = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        matches = [r for r in ROWS if item in (r.key, r.number, r.number.rstrip("abcd"))]
        if not matches:
            keys = ", ".join(f"{r.number}={r.key}" for r in ROWS)
            raise SystemExit(f"bench: unknown row {item!r} (rows: {keys})")
        chosen += [m for m in matches if m not in chosen]
    groups = {r.part_of or r.key for r in chosen}
    return [r for r in ROWS if (r.part_of or r.key) in groups]


def sizes_of(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    changes: dict[str, object] = {}
    for option, name, scale in (
        ("creates", "creates", 1),
        ("seq_mib", "seq_bytes", MiB),
        ("fio_mib", "fio_bytes", MiB),
        ("fio_seconds", "fio_seconds", 1),
        ("tree", "tree_source", None),
        ("procs", "procs", 1),
        ("par_mib", "par_bytes", MiB),
        ("par_creates", "par_creates", 1),
        ("modules", "modules", 1),
        ("pgbench_seconds", "pgbench_seconds", 1),
        ("pgbench_scale", "pgbench_scale", 1),
        ("sqlite_txns", "sqlite_txns", 1),
    ):
        value = getattr(args, option)
        if value is not None:
            changes[name] = value if scale is None else value * scale
    return dataclasses.replace(sizes, **changes)  # type: ignore[arg-type]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: want a number of at least 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench",
        description="Benchmark kmsfs against gocryptfs, securefs, a plain directory and the"
        " in-memory pyfuse3 floor (docs/PERFORMANCE.md).",
    )
    p.add_argument("--workdir", default="/var/tmp/kmsfs-bench", help="where volumes live")
    p.add_argument("--repeats", type=positive, default=3, help="repeats per workload (median)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--only", help="rows to run, e.g. 1,2,7 or seqwrite,untar or 9,10 (default all)")
    p.add_argument(
        "--systems",
        default=DEFAULT_SYSTEMS,
        help=f"comma list of {','.join(SYSTEMS)} (default {DEFAULT_SYSTEMS};"
        " floor = an in-memory pyfuse3 filesystem with trivial handlers;"
        " passthrough = pyfuse3's example, a Python ceiling, not a peer; kmsfs@REV = kmsfs"
        " as of git revision REV, for before/after figures in one run; kmsfs-shared@REV"
        " likewise in shared mode; kmsfs-stock and floor-stock = on stock pyfuse3, in"
        " .venv-stock, made if missing)",
    )
    sizes = p.add_argument_group("sizes (defaults: full sizes, or small ones with --quick)")
    sizes.add_argument(
        "--creates", type=positive, help="files in row 8 (default 20,000; 2,000 with --quick)"
    )
    sizes.add_argument("--seq-mib", type=positive, help="file of rows 1-2 (256; 32)")
    sizes.add_argument("--tree", help="directory tarred for rows 3-6 (/usr/include; its linux/)")
    sizes.add_argument("--fio-mib", type=positive, help="file of row 7 (256; 32)")
    sizes.add_argument("--fio-seconds", type=positive, help="run time of each fio job (5; 2)")
    sizes.add_argument("--procs", type=positive, help="processes in rows 9a-9b (8)")
    sizes.add_argument("--par-mib", type=positive, help="file per process in row 9a (64; 8)")
    sizes.add_argument(
        "--par-creates", type=positive, help="files per process in row 9b (2,000; 250)"
    )
    sizes.add_argument("--modules", type=positive, help="C modules in the row 10 project (48; 16)")
    sizes.add_argument(
        "--pgbench-seconds",
        type=positive,
        help="duration of the timed pgbench run, row 11 (60; 10)",
    )
    sizes.add_argument(
        "--pgbench-scale", type=positive, help="pgbench -i scale factor, row 11 (10; 10)"
    )
    sizes.add_argument(
        "--sqlite-txns", type=positive, help="SQLite transactions in rows 12a, 12b (2,000; 200)"
    )
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument(
        "--budget",
        action="store_true",
        help="instead of timing: count the FUSE requests of the metadata rows (untar, ls -lR,"
        " read all, rm -rf, create + stat, git status) per file, or of the database rows"
        " named with --only (11, 12) per transaction, by opcode, with the kernel's fuse"
        " tracepoints, once per system (needs Linux 6.16+ and tracefs)",
    )
    p.add_argument(
        "--strace",
        action="store_true",
        help="with --budget: also run each row under strace -c -f on the kmsfs daemon"
        " (syscalls per request)",
    )
    p.add_argument("--keep", action="store_true", help="keep the volumes afterwards")
    p.add_argument(
        "--from-results",
        metavar="JSON",
        help="run nothing: render the table again from a run's results.json (in its"
        " --workdir), with the rows, targets and systems as now; give the run's --systems,"
        " --only, --repeats and sizes",
    )
    p.add_argument(
        "--micro",
        action="store_true",
        help="run only the format-layer micro-benchmarks (seal/open per block size, header"
        " pack/parse), with the checkout's .venv; no root needed",
    )
    p.add_argument(
        "--micro-seconds",
        type=float,
        default=None,
        help="time per micro-benchmark measurement (default 0.5; 0.1 with --quick)",
    )
    return p


def run_micro(args: argparse.Namespace) -> int:
    """Run benchlib/micro.py with the .venv's python (it imports kmsfs.format)."""
    if not VENV_PYTHON.exists():
        log("no .venv yet: running scripts/setup")
        subprocess.run([str(ROOT / "scripts" / "setup")], check=True)
    seconds = args.micro_seconds or (0.1 if args.quick else 0.5)
    cmd = [str(VENV_PYTHON), str(BENCHLIB / "micro.py"), "--seconds", str(seconds)]
    if args.markdown:
        cmd += ["--markdown", args.markdown]
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.micro:
        return run_micro(args)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (mounts, drop_caches)")
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    for name in names:
        base, at, rev = name.partition("@")
        if at and base in AT_REVISION:
            check = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                capture_output=True,
                check=False,
            )
            if not rev or check.returncode != 0:
                raise SystemExit(f"bench: {name}: {rev!r} is not a revision of this checkout")
        elif name not in SYSTEMS:
            raise SystemExit(
                f"bench: unknown system {name!r} (known: {', '.join(SYSTEMS)}, kmsfs@REV,"
                " kmsfs-shared@REV)"
            )
    rows = parse_rows(args.only)
    if args.budget:
        from benchlib import fusetrace

        why = fusetrace.available()
        if why is not None:
            raise SystemExit(f"bench: --budget: {why}")
        rows = budget_rows(rows, named=bool(args.only))
    work = Path(args.workdir).resolve()
    sizes = sizes_of(args)

    if args.from_results:
        return render_saved(Path(args.from_results), rows, names, sizes, args)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    ensure_tools(names, rows)
    raise_fd_limit()
    bench = Bench(work, sizes)
    ensure_databases(bench, rows)
    systems = [make_system(n, work) for n in names]
    # A previous run killed hard may have left mounts: clear them before wiping the volumes.
    for s in systems:
        s.force_cleanup()
    for s in systems:
        if s.base.exists():
            run(["rm", "-rf", str(s.base)])
    work.mkdir(parents=True, exist_ok=True)

    results = Results()
    budgets: dict[tuple[str, str], RowBudget] = {}
    keys = {r.key for r in rows}
    try:
        if keys & TREE_ROWS:
            bench.make_tar()
        if keys & GIT_ROWS:
            bench.make_project()
        for s in systems:
            s.create()
            s.mount()
            log(f"{s.name}: ready at {s.mnt}")
        if args.budget:
            budgets = run_budget(bench, rows, systems, work, args.strace)
        else:
            for repeat in range(args.repeats):
                run_repeat(bench, rows, systems, repeat, results)
    except KeyboardInterrupt:
        log("interrupted: unmounting")
        return 130
    finally:
        for s in systems:
            bench.cleanup(s)
        for s in systems:
            try:
                s.umount()
            except FAILURES as exc:
                log(f"{s.name}: unmount failed ({exc}); forcing")
            s.force_cleanup()
        if not args.keep:
            for s in systems:
                if not os.path.ismount(s.mnt):
                    shutil.rmtree(s.base, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        (work / "results.json").write_text(results.dump())

    if args.budget:
        return _emit(render_budget(budgets, rows, systems), args)
    return _emit(render(results, rows, systems, sizes, args.repeats, args.quick, work), args)


def render_saved(
    path: Path, rows: list[Row], names: list[str], sizes: Sizes, args: argparse.Namespace
) -> int:
    """Print (and with --markdown write) the table of the samples saved in *path*."""
    results = Results.load(path.read_text())
    systems = [make_system(n, path.parent) for n in names]
    return _emit(render(results, rows, systems, sizes, args.repeats, args.quick, path.parent), args)


def _emit(table: str, args: argparse.Namespace) -> int:
    """Print *table*, and write it to --markdown's file if given; exit status 0."""
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def run_repeat(
    bench: Bench, rows: list[Row], systems: list[System], repeat: int, results: Results
) -> None:
    """One repeat: every row on every system, systems in an order rotated per repeat."""
    shift = repeat % len(systems)
    order = systems[shift:] + systems[:shift]
    by_key = {r.key: r for r in rows}
    for row in rows:
        if row.part_of is not None:  # measured by the run of the row it is part of
            continue
        keys = [row.key, *(r.key for r in rows if r.part_of == row.key)]
        for s in order:
            try:
                samples = measure(bench, row, s)
            except Skipped as exc:
                samples = {key: Sample(skipped=str(exc)) for key in keys}
                log(f"repeat {repeat + 1} {row.key} {s.name}: skipped: {exc}")
                bench.cleanup(s)
            except FAILURES as exc:
                samples = {key: Sample(error=str(exc)) for key in keys}
                log(f"repeat {repeat + 1} {row.key} {s.name}: FAILED {exc}")
                bench.cleanup(s)
                try:
                    recreate(s)
                except FAILURES as again:
                    log(f"{s.name}: cannot recreate the volume: {again}")
            else:
                for key, sample in samples.items():
                    extra = ""
                    if sample.cpu is not None:
                        extra = f" (daemon cpu {sample.cpu:.1f} s, hwm {sample.hwm_kb} kB)"
                    unit = by_key[key].unit
                    log(
                        f"repeat {repeat + 1} {key:9} {s.name:11}"
                        f" {fmt(sample.value, unit)} {unit}{extra}"
                    )
            for key, sample in samples.items():
                results.add(key, s.name, sample)
    for s in systems:  # leftovers of failed rows or rows not selected
        bench.cleanup(s)
        try:
            for path in bench.leftovers(s):
                if s.mounted and path.exists():
                    run(["rm", "-rf", str(path)])
        except FAILURES as exc:
            log(f"{s.name}: cannot clean up ({exc.__class__.__name__}): new volume")
            recreate(s)


if __name__ == "__main__":
    sys.exit(main())
