"""The request budget's parsers (scripts/benchlib/fusetrace.py, budget.py) read what the
kernel's fuse tracepoints and ``strace -c`` print: counts, errors, reply sizes, latency;
and its table gives each daemon's CPU per request."""

from __future__ import annotations

from pathlib import Path

from benchlib import fusetrace
from benchlib.budget import RowBudget, parse_strace, render_budget
from benchlib.systems import Floor, FloorStock
from benchlib.workloads import ROWS

TRACE = b"""\
# tracer: nop
tar-4242 [001] 100.000100: fuse_request_send: connection 57 req 2 opcode 1 (FUSE_LOOKUP) len 52
tar-4242 [001] 100.000150: fuse_request_end: connection 57 req 2 len 16 error -2
tar-4242 [001] 100.000200: fuse_request_send: connection 57 req 4 opcode 35 (FUSE_CREATE) len 70
cat-4243 [000] 100.000250: fuse_request_send: connection 57 req 6 opcode 15 (FUSE_READ) len 80
cat-4243 [000] 100.000300: fuse_request_end: connection 57 req 6 len 4112 error 0
tar-4242 [001] 100.000600: fuse_request_end: connection 57 req 4 len 160 error 0
tar-4242 [001] 100.000700: fuse_request_send: connection 57 req 8 opcode 1 (FUSE_LOOKUP) len 52
tar-4242 [001] 100.000800: fuse_request_end: connection 57 req 8 len 144 error 0
"""


def test_trace_counts_errors_reply_bytes_and_latency_per_opcode() -> None:
    trace = fusetrace.parse(TRACE)
    assert set(trace.ops) == {"LOOKUP", "CREATE", "READ"}
    assert trace.total == 4
    lookup = trace.ops["LOOKUP"]
    assert (lookup.count, lookup.errors) == (2, 1)
    assert abs(lookup.latency_total - 0.000150) < 1e-9
    assert abs(lookup.latency_max - 0.000100) < 1e-9
    assert trace.ops["READ"].reply_bytes == 4096  # reply minus the 16-byte header
    assert abs(trace.ops["CREATE"].latency_max - 0.000400) < 1e-9


def test_a_send_without_its_end_is_counted_without_latency() -> None:
    trace = fusetrace.parse(TRACE.split(b"\n")[3] + b"\n")
    assert trace.ops["CREATE"].count == 1 and trace.ops["CREATE"].latency_total == 0


STRACE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ------------------
 40.00    0.400000          20     20000           epoll_wait
 20.00    0.200000          20     10000           writev
 10.00    0.100000          10     10000      2000 newfstatat
  0.50    0.005000           5      1000      1000 getxattr
------ ----------- ----------- --------- --------- ------------------
100.00    1.000000          25     41000      3000 total
"""


def test_strace_summary_gives_calls_and_errors_per_syscall() -> None:
    calls, errors = parse_strace(STRACE)
    assert calls == {"epoll_wait": 20000, "writev": 10000, "newfstatat": 10000, "getxattr": 1000}
    assert errors == {"newfstatat": 2000, "getxattr": 1000}


def test_budget_gives_each_daemons_cpu_per_traced_request(tmp_path: Path) -> None:
    trace = fusetrace.parse(TRACE)  # 4 requests
    row = next(r for r in ROWS if r.key == "untar")
    budgets = {
        ("untar", "floor"): RowBudget(files=2, trace=trace, cpu=0.000024),
        ("untar", "floor-stock"): RowBudget(files=2, trace=trace, cpu=None),  # daemon gone
    }
    text = render_budget(budgets, [row], [Floor(tmp_path), FloorStock(tmp_path)])
    assert "over the traced requests, with the tracepoints on): floor 6.0." in text


def test_database_rows_are_counted_per_transaction(tmp_path: Path) -> None:
    trace = fusetrace.parse(TRACE)  # 4 requests
    row = next(r for r in ROWS if r.key == "sqlite")
    budgets = {("sqlite", "floor"): RowBudget(files=2, trace=trace, cpu=0.004)}
    text = render_budget(budgets, [row], [Floor(tmp_path)])
    assert "(2 transactions)" in text
    assert "| opcode | floor req/tx | floor µs/req |" in text
    assert "| LOOKUP | 1.00 | 75 |" in text  # 2 LOOKUPs in 2 transactions, 150 µs in all
    assert "Daemon CPU per transaction (ms, same run): floor 2.00." in text


def test_pgbench_budget_names_each_systems_transaction_count(tmp_path: Path) -> None:
    trace = fusetrace.parse(TRACE)
    row = next(r for r in ROWS if r.key == "pgbench")
    budgets = {
        ("pgbench", "floor"): RowBudget(files=400, trace=trace),
        ("pgbench", "floor-stock"): RowBudget(files=300, trace=trace),
    }
    text = render_budget(budgets, [row], [Floor(tmp_path), FloorStock(tmp_path)])
    assert "(floor 400, floor-stock 300 transactions)" in text


def test_budget_counts_the_database_rows_only_when_named() -> None:
    from benchlib.budget import budget_rows
    from benchlib.cli import parse_rows

    assert [r.key for r in budget_rows(parse_rows(None), named=False)] == [
        "untar",
        "ls",
        "readall",
        "rm",
        "create",
        "gitstatus",
    ]
    named = budget_rows(parse_rows("11,12"), named=True)
    assert [r.key for r in named] == ["pgbench", "sqlite", "sqlitewal"]  # not 11b: no requests
