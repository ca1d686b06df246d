"""``scripts/bench --budget``: the FUSE requests each row costs, per file (or transaction)
and opcode.

For every system, each row of the budget (untar, ``ls -lR``, read all,
``rm -rf``, create + stat, ``git status``; and the database rows, pgbench and
SQLite, per transaction) runs once with the kernel's FUSE tracepoints on
(``fusetrace``): requests per file or transaction by opcode, and the mean
kernel-side round trip of each opcode (send to answer, queueing included).
For kmsfs the daemon's own counters (``kmsfs status --json``, the time in
its handlers) are read too, and with ``--strace`` each row runs once more on
kmsfs under ``strace -c -f`` attached to the daemon: backing syscalls per
request.  Timings under tracing are not the benchmark's: only counts and
per-request times are reported.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import fusetrace
from benchlib.common import KMSFS, log, pid_alive, proc_cpu, run
from benchlib.cproject import git_env
from benchlib.systems import System
from benchlib.workloads import Bench, Row

BUDGET_ROWS = (
    "untar",
    "ls",
    "readall",
    "rm",
    "create",
    "gitstatus",
    "pgbench",
    "sqlite",
    "sqlitewal",
)
# Rows counted per transaction, not per file.
TRANSACTION_ROWS = ("pgbench", "sqlite", "sqlitewal")


def budget_rows(rows: list[Row], named: bool) -> list[Row]:
    """The rows of *rows* the budget can count: the metadata rows, and the database rows
    (long, and PostgreSQL to install) only if *named* (chosen with ``--only``)."""
    return [r for r in rows if r.key in BUDGET_ROWS and (named or r.key not in TRANSACTION_ROWS)]


def unit_of(row: Row) -> str:
    """What a row's requests are counted per: "tx" (database rows) or "file"."""
    return "tx" if row.key in TRANSACTION_ROWS else "file"


@dataclass
class RowBudget:
    """One row on one system: files it touches, the kernel's view, the daemon's CPU,
    kmsfs's counters ({opcode: (count, handler ms)}), strace's ({syscall: calls}) and
    the requests the daemon answered meanwhile."""

    files: int = 0
    trace: fusetrace.Trace | None = None
    cpu: float | None = None  # the daemon's utime+stime over the traced run, s
    counters: dict[str, tuple[int, float]] = field(default_factory=dict)
    syscalls: dict[str, int] = field(default_factory=dict)
    syscall_errors: dict[str, int] = field(default_factory=dict)
    strace_requests: int = 0


def files_of(bench: Bench, row: Row, s: System) -> int:
    """The number of files a row works on (the divisor of "per file"), or of transactions
    it committed (database rows; pgbench's only once it has run)."""
    if row.key in ("sqlite", "sqlitewal"):
        return bench.sizes.sqlite_txns
    if row.key == "pgbench":
        return bench.pgbench_processed.get(s.name, 0)
    if row.key in ("untar", "ls", "readall", "rm"):
        out = run(f"tar -tf {shlex.quote(str(bench.tar))} | grep -vc '/$'").stdout
        return int(out)
    if row.key == "create":
        return bench.sizes.creates
    if row.key == "gitstatus":
        out = run(["git", "-C", str(bench.clone(s)), "ls-files"], env=git_env()).stdout
        return 3 * len(out.splitlines())  # three git status, each over every tracked file
    raise ValueError(row.key)


def kmsfs_counters(s: System) -> dict[str, tuple[int, float]]:
    info = json.loads(run([str(KMSFS), "status", str(s.mnt), "--json"]).stdout)
    return {op: (f["count"], f["time_total_ms"]) for op, f in info["requests"]["by_opcode"].items()}


def _diff(
    after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    out = {}
    for op, (count, ms) in after.items():
        count0, ms0 = before.get(op, (0, 0.0))
        if count > count0:
            out[op] = (count - count0, ms - ms0)
    return out


_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)\s*$")


def parse_strace(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """({syscall: calls}, {syscall: errors}) of an ``strace -c`` summary."""
    calls, errors = {}, {}
    for line in text.splitlines():
        match = _STRACE_LINE.match(line)
        if match and match.group(3) != "total":
            calls[match.group(3)] = int(match.group(1))
            if match.group(2):
                errors[match.group(3)] = int(match.group(2))
    return calls, errors


def measure_row(bench: Bench, row: Row, s: System, work: Path) -> RowBudget:
    bench.prepare(row, s)
    late = row.key in ("gitstatus", "pgbench")  # counted after the run
    budget = RowBudget(files=0 if late else files_of(bench, row, s))
    before = kmsfs_counters(s) if s.name == "kmsfs" else {}
    tracer = fusetrace.FuseTracer(s.mnt, work / f"trace-{s.name}-{row.key}.txt")
    pid = s.daemon_pid()
    tracer.start()
    try:
        cpu0 = proc_cpu(pid) if pid else None
        getattr(bench, f"run_{row.key}")(s)
        time.sleep(1.0)  # releases and forgets that follow the command
        if pid and cpu0 is not None and pid_alive(pid):
            budget.cpu = proc_cpu(pid) - cpu0
        budget.trace = tracer.stop()
    finally:
        tracer.close()
    if s.name == "kmsfs":
        budget.counters = _diff(kmsfs_counters(s), before)
    if late:
        budget.files = files_of(bench, row, s)
    if budget.trace.lost:
        log(f"budget {row.key} {s.name}: {budget.trace.lost} trace events lost (counts low)")
    post = getattr(bench, f"post_{row.key}", None)
    if post is not None:
        post(s)
    return budget


def strace_row(bench: Bench, row: Row, s: System, work: Path, budget: RowBudget) -> None:
    """Run *row* again on kmsfs with strace counting the daemon's syscalls."""
    pid = s.daemon_pid()
    if pid is None:
        return
    bench.prepare(row, s)
    pid = s.daemon_pid()  # a cold row remounts: a new daemon
    assert pid is not None
    before = kmsfs_counters(s)
    out = work / f"strace-{row.key}.txt"
    proc = subprocess.Popen(
        ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attach to every thread
    try:
        getattr(bench, f"run_{row.key}")(s)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    after = kmsfs_counters(s)
    budget.strace_requests = sum(c for c, _ in _diff(after, before).values())
    budget.syscalls, budget.syscall_errors = parse_strace(out.read_text())
    post = getattr(bench, f"post_{row.key}", None)
    if post is not None:
        post(s)


def run_budget(
    bench: Bench, rows: list[Row], systems: list[System], work: Path, strace: bool
) -> dict[tuple[str, str], RowBudget]:
    budgets: dict[tuple[str, str], RowBudget] = {}
    for row in rows:
        for s in systems:
            if not s.fuse:
                continue
            budgets[row.key, s.name] = measure_row(bench, row, s, work)
            trace = budgets[row.key, s.name].trace
            log(f"budget {row.key:9} {s.name:11} {trace.total if trace else 0} requests")
            if strace and s.name == "kmsfs":
                strace_row(bench, row, s, work, budgets[row.key, s.name])
    return budgets


def render_budget(
    budgets: dict[tuple[str, str], RowBudget], rows: list[Row], systems: list[System]
) -> str:
    names = [s.name for s in systems if s.fuse]
    lines = [
        "req/file (req/tx): FUSE requests per file (per committed transaction) (kernel"
        " tracepoints; FORGET is not traced, its count is kmsfs's own); µs/req: mean kernel"
        " round trip, send to answer, queueing included; kmsfs handler µs/req: time in"
        " kmsfs's handler (its request counters).",
        "",
    ]
    for row in rows:
        present = [n for n in names if (row.key, n) in budgets]
        if not present:
            continue
        files = budgets[row.key, present[0]].files
        unit = unit_of(row)
        counted = f"{files:,} files" if unit == "file" else f"{files:,} transactions"
        if row.key == "pgbench":  # a timed run: each system commits its own number
            counted = ", ".join(f"{n} {budgets[row.key, n].files:,}" for n in present)
            counted += " transactions"
        lines += [f"#### {row.number} {row.label} ({counted})", ""]
        opcodes: list[str] = []
        for n in present:
            trace = budgets[row.key, n].trace
            assert trace is not None
            for op, stats in sorted(trace.ops.items(), key=lambda kv: -kv[1].count):
                if op not in opcodes and stats.count:
                    opcodes.append(op)
        kmsfs_only = budgets.get((row.key, "kmsfs"))
        if kmsfs_only is not None:  # FORGET: no tracepoint, only the daemon counts it
            opcodes += [op for op in kmsfs_only.counters if op not in opcodes]
        header = ["opcode", *(f"{n} req/{unit}" for n in present)]
        header += [f"{n} µs/req" for n in present]
        kmsfs = budgets.get((row.key, "kmsfs"))
        if kmsfs is not None and kmsfs.counters:
            header.append("kmsfs handler µs/req")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for op in [*opcodes, "total"]:
            cells = [op if op != "total" else "**total**"]
            per_file, per_req = [], []
            for n in present:
                b = budgets[row.key, n]
                assert b.trace is not None
                if op == "total":
                    count = b.trace.total
                    lat = sum(s.latency_total for s in b.trace.ops.values())
                else:
                    stats = b.trace.ops.get(op)
                    count = stats.count if stats else 0
                    lat = stats.latency_total if stats else 0.0
                if op == "FORGET":  # not traced: the daemon's count, where there is one
                    cells_forget = b.counters.get(op, (0, 0.0))[0] if b.counters else None
                    per_file.append("" if cells_forget is None else f"{cells_forget / b.files:.2f}")
                    per_req.append("")
                    continue
                per_file.append(f"{count / b.files:.2f}" if b.files else "")
                per_req.append(f"{lat / count * 1e6:.0f}" if count else "")
            cells += per_file + per_req
            if kmsfs is not None and kmsfs.counters:
                key = op
                if op == "total":  # as the trace's: without FORGET
                    counted = [v for o, v in kmsfs.counters.items() if o != "FORGET"]
                    count = sum(c for c, _ in counted)
                    ms = sum(m for _, m in counted)
                else:
                    count, ms = kmsfs.counters.get(key, (0, 0.0))
                cells.append(f"{ms * 1000 / count:.0f}" if count else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        cpu = [
            f"{n} {b.cpu / b.trace.total * 1e6:.1f}"
            for n in present
            if (b := budgets[row.key, n]).cpu is not None and b.trace and b.trace.total
        ]
        if cpu:
            lines += [
                "Daemon CPU per request (µs: utime+stime over the traced requests, with the"
                f" tracepoints on): {', '.join(cpu)}.",
                "",
            ]
        per_tx = [
            f"{n} {b.cpu / b.files * 1e3:.2f}"
            for n in present
            if (b := budgets[row.key, n]).cpu is not None and b.files and unit == "tx"
        ]
        if per_tx:
            lines += [f"Daemon CPU per transaction (ms, same run): {', '.join(per_tx)}.", ""]
        if kmsfs is not None and kmsfs.syscalls and kmsfs.strace_requests:
            total = sum(kmsfs.syscalls.values())
            top = sorted(kmsfs.syscalls.items(), key=lambda kv: -kv[1])[:12]
            shown = ", ".join(
                f"{name} {calls / kmsfs.strace_requests:.2f}"
                + (
                    f" ({kmsfs.syscall_errors[name] / kmsfs.strace_requests:.2f} failing)"
                    if kmsfs.syscall_errors.get(name)
                    else ""
                )
                for name, calls in top
            )
            lines += [
                f"kmsfs daemon syscalls per request (strace -c -f, {kmsfs.strace_requests:,}"
                f" requests): {total / kmsfs.strace_requests:.2f} in all; {shown}.",
                "",
            ]
    return "\n".join(lines)
