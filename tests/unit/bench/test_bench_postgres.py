"""The pgbench rows' parsers (scripts/benchlib/postgres.py): TPS and the transaction count
from pgbench's report, the p99 latency from its per-transaction log."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchlib.postgres import (
    parse_summary,
    parse_transaction_log,
    percentile,
    read_transaction_logs,
)

# What pgbench 15.18 (Debian 12) printed for a 2 s run, verbatim.
REPORT_15 = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 1
query mode: simple
number of clients: 2
number of threads: 2
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 934
number of failed transactions: 0 (0.000%)
latency average = 4.283 ms
initial connection time = 9.408 ms
tps = 466.936263 (without initial connection time)
"""

# PostgreSQL 13 and before: two tps lines, no failed transactions.
REPORT_13 = """\
number of transactions actually processed: 120
latency average = 8.333 ms
tps = 119.000000 (including connections establishing)
tps = 120.500000 (excluding connections establishing)
"""


def test_summary_of_pgbench_15() -> None:
    summary = parse_summary(REPORT_15)
    assert (summary.tps, summary.processed, summary.failed) == (466.936263, 934, 0)


def test_summary_takes_the_tps_without_connection_time_in_old_pgbench() -> None:
    summary = parse_summary(REPORT_13)
    assert (summary.tps, summary.processed, summary.failed) == (120.5, 120, 0)


def test_summary_counts_failed_transactions() -> None:
    report = REPORT_15.replace("failed transactions: 0 (0.000%)", "failed transactions: 7 (0.7%)")
    assert parse_summary(report).failed == 7


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("tps = ", "no 'tps = N"),
        ("number of transactions actually processed", "actually processed"),
    ],
)
def test_summary_without_a_line_names_it(drop: str, message: str) -> None:
    report = "\n".join(line for line in REPORT_15.splitlines() if drop not in line)
    with pytest.raises(ValueError, match=message):
        parse_summary(report)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 50) == 50
    assert percentile([5], 99) == 5
    assert percentile(list(range(1, 1001)), 99) == 990


@pytest.mark.parametrize("q", [0, -1, 100.5])
def test_percentile_out_of_range_is_refused(q: float) -> None:
    with pytest.raises(ValueError, match="want 0 < q <= 100"):
        percentile([1, 2], q)


def test_percentile_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 99)


def test_transaction_log_gives_count_failures_and_p99_in_ms() -> None:
    # 100 transactions of 1..100 ms, in shuffled order, one failed, one skipped, a blank line.
    lines = [f"{i % 4} {i} {((i * 37) % 100 + 1) * 1000} 0 1796336995 {i}" for i in range(100)]
    lines += ["1 101 failed 0 1796336996 5", "2 102 skipped 0 1796336996 6 17", ""]
    latencies = parse_transaction_log(lines)
    assert (latencies.count, latencies.failed) == (100, 2)
    assert latencies.p99_ms == 99.0


def test_transaction_log_with_lag_and_retries_columns() -> None:
    latencies = parse_transaction_log(["0 1 2500 0 1796336995 347023 120 0"])
    assert (latencies.count, latencies.p99_ms) == (1, 2.5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 1 10685 0 1796336995", "line 2: not pgbench's format"),
        ("tps = 5.0 (without initial connection time)", "line 2: not pgbench's format"),
        ("0 1 12.5 0 1796336995 347023", "line 2: latency '12.5' is no number"),
    ],
)
def test_transaction_log_line_of_another_shape_is_named(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_transaction_log(["0 1 10685 0 1796336995 347023", line])


def test_transaction_log_without_a_completed_transaction_is_refused() -> None:
    with pytest.raises(ValueError, match="no completed transaction"):
        parse_transaction_log(["0 1 failed 0 1796336995 347023"])


def test_transaction_logs_of_all_threads_are_read(tmp_path: Path) -> None:
    # pgbench -j 2 --log-prefix=P writes P.PID (thread 0) and P.PID.1 (thread 1).
    (tmp_path / "tx.15735").write_text("0 1 1000 0 1796336995 1\n0 2 3000 0 1796336995 2\n")
    (tmp_path / "tx.15735.1").write_text("1 1 2000 0 1796336995 1\n")
    latencies = read_transaction_logs(tmp_path.glob("tx.*"))
    assert (latencies.count, latencies.failed, latencies.p99_ms) == (3, 0, 3.0)
