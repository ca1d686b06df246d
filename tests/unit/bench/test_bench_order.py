"""The run loop of ``scripts/bench`` (scripts/benchlib/cli.py) gives every system the
same cache state at each row: the caches are dropped for the whole machine, so a row
that reads what an earlier row left would otherwise meet it cold on one system and
warm on another, depending on which system ran last."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchlib.cli import parse_rows, run_repeat
from benchlib.report import Results
from benchlib.systems import System
from benchlib.workloads import QUICK, ROWS, Bench

# Rows whose timed run works on what an earlier row left on the same system (the
# untarred tree, the clone): their figure depends on what is cached.  The other rows
# start from nothing on the mount (untar, clone) or make their own file.
READS_EARLIER_STATE = {"ls", "readall", "rm", "gitmake", "gitstatus", "gitrm"}

Event = tuple[str, str, str]  # ("drop", system, "") or ("run", system, row key)


class RecordingSystem(System):
    """A system that mounts nothing and records each drop of the kernel's caches."""

    fuse = False

    def __init__(self, name: str, work: Path, events: list[Event]) -> None:
        self.name = name
        super().__init__(work)
        self.events = events
        self.mounted = True

    def mount(self) -> None:
        self.mounted = True

    def umount(self) -> None:
        self.mounted = False

    def remount_cold(self) -> None:
        self.events.append(("drop", self.name, ""))


class RecordingBench(Bench):
    """The real Bench (its prepare) with every row's prep, run and post doing nothing but
    recording the timed run."""

    def __init__(self, work: Path, events: list[Event]) -> None:
        super().__init__(work, QUICK)
        self.events = events

    def leftovers(self, s: System) -> list[Path]:
        return []


def _record(key: str) -> None:
    def prep(self: RecordingBench, s: System) -> None:
        pass

    def run(self: RecordingBench, s: System) -> float:
        self.events.append(("run", s.name, key))
        return 1.0

    setattr(RecordingBench, f"prep_{key}", prep)
    setattr(RecordingBench, f"run_{key}", run)
    setattr(RecordingBench, f"post_{key}", prep)


for _row in ROWS:
    if _row.part_of is None:
        _record(_row.key)


def cache_states(events: list[Event]) -> dict[tuple[str, str], list[str]]:
    """(row key, system) -> "cold" or "warm" per timed run: cold if the caches were
    dropped (by any system) since that system's previous timed run."""
    dropped: dict[str, bool] = {}
    states: dict[tuple[str, str], list[str]] = {}
    for kind, system, key in events:
        if kind == "drop":
            dropped = dict.fromkeys(dropped, True) | {system: True}
        else:
            states.setdefault((key, system), []).append("cold" if dropped.get(system) else "warm")
            dropped[system] = False
    return states


@pytest.mark.parametrize("spec", ["3,4,6,10", "2,3,4,5,6,7,10"])
@pytest.mark.parametrize("count", [2, 3])
def test_every_system_meets_each_row_in_the_same_cache_state(
    tmp_path: Path, spec: str, count: int
) -> None:
    events: list[Event] = []
    bench = RecordingBench(tmp_path, events)
    systems: list[System] = [RecordingSystem(f"s{i}", tmp_path, events) for i in range(count)]
    rows = parse_rows(spec)
    results = Results()
    for repeat in range(5):
        run_repeat(bench, rows, systems, repeat, results)
    states = cache_states(events)
    checked = {r.key for r in rows} & READS_EARLIER_STATE
    assert checked
    for key in checked:
        per_system = {s.name: states[key, s.name] for s in systems}
        assert len({tuple(v) for v in per_system.values()}) == 1, (key, per_system)
    for row in rows:
        if row.cold:
            for s in systems:
                assert states[row.key, s.name] == ["cold"] * 5, (row.key, s.name)


def test_the_table_says_which_rows_are_cold() -> None:
    for row in ROWS:
        assert ("cold" in row.label) == row.cold, row.label
