"""The benchmark table's cells for rows that are skipped, rows measured by another row's
run, and targets against one named peer (scripts/benchlib/report.py, cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchlib.cli import main, parse_rows
from benchlib.report import Results, Sample, _target, fmt, skip_notes
from benchlib.workloads import ROWS, Row

PGBENCH = next(r for r in ROWS if r.key == "pgbench")
SQLITE = next(r for r in ROWS if r.key == "sqlite")


def test_a_row_skipped_on_every_repeat_shows_skip_and_its_reason() -> None:
    results = Results()
    for _ in range(3):
        results.add("pgbench", "floor", Sample(skipped="no postgres user"))
        results.add("pgbench", "kmsfs", Sample(value=601.7))
    assert results.cell("pgbench", "floor", "TPS") == "skip"
    assert results.cell("pgbench", "kmsfs", "TPS") == "602"
    assert skip_notes(results) == ["- pgbench/floor: no postgres user"]


def test_a_failure_among_skips_is_a_failure_and_no_row_is_an_empty_cell() -> None:
    results = Results()
    results.add("sqlite", "securefs", Sample(skipped="no WAL"))
    results.add("sqlite", "securefs", Sample(error="disk I/O error"))
    assert results.cell("sqlite", "securefs", "tx/s") == "fail"
    assert results.cell("sqlite", "plain", "tx/s") == "fail"  # as the table always showed


def test_latency_in_ms_keeps_a_decimal() -> None:
    assert fmt(19.46, "ms") == "19.5"
    assert fmt(1234.4, "TPS") == "1,234"


def test_target_against_a_named_peer_says_which_and_the_ratio() -> None:
    assert PGBENCH.versus == "gocryptfs"
    assert _target(PGBENCH, 0.88, None) == ["≥ 1.0× gocryptfs", "MISSED (0.88×)"]
    assert _target(PGBENCH, 1.02, None) == ["≥ 1.0× gocryptfs", "met (1.02×)"]
    assert _target(PGBENCH, None, None) == ["≥ 1.0× gocryptfs", "n/a"]


def test_target_against_the_best_peer_leaves_the_ratio_to_its_column() -> None:
    assert _target(SQLITE, 1.7, None) == ["≥ 1.0× best peer", "met"]
    plain = Row("x", "99", "x", "s", False)
    assert _target(plain, 2.0, 3.0) == ["", ""]


@pytest.mark.parametrize("spec", ["11", "11a", "11b", "pgbench", "pgbench_p99"])
def test_the_latency_row_comes_with_the_run_that_measures_it(spec: str) -> None:
    assert [r.key for r in parse_rows(spec)] == ["pgbench", "pgbench_p99"]


def test_row_group_12_is_both_sqlite_journals() -> None:
    assert [r.key for r in parse_rows("12")] == ["sqlite", "sqlitewal"]
    assert [r.key for r in parse_rows("sqlitewal")] == ["sqlitewal"]


def test_every_row_part_of_another_names_a_row_with_a_run() -> None:
    keys = {r.key for r in ROWS if r.part_of is None}
    assert all(r.part_of in keys for r in ROWS if r.part_of is not None)


def test_a_saved_run_renders_again_with_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--from-results`` runs nothing and renders the table from a run's results.json:
    each system's median and the ratio to the floor, as the run itself would have."""
    saved = {
        "untar/kmsfs": [{"value": v, "cpu": 1.0, "hwm_kb": 50_000} for v in (3.0, 2.0, 9.0)],
        "untar/floor": [{"value": v, "cpu": 0.5} for v in (2.0, 2.5, 1.0)],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved))
    argv = ["--from-results", str(path), "--systems", "kmsfs,floor", "--only", "3"]
    assert main([*argv, "--repeats", "3", "--markdown", str(tmp_path / "t.md")]) == 0
    (line,) = [row for row in capsys.readouterr().out.splitlines() if row.startswith("| 3 ")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[3:6] == ["3.00", "2.00", "1.50×"]
    assert line in (tmp_path / "t.md").read_text()
