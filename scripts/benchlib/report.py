"""Samples, medians, ratios and the markdown table ``scripts/bench`` prints."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import postgres
from benchlib.common import KMSFS, STOCK_VENV, VENV, MiB, run
from benchlib.systems import System
from benchlib.workloads import RTT_REQUESTS, Row, Sizes
from kmsfs.backing.inode_room import header_room_at

RSS_TARGET_MB = 150


@dataclass
class Sample:
    """One measurement: the figure, the error or why the row was skipped, and the
    daemon's CPU s and peak RSS."""

    value: float | None = None
    error: str | None = None
    skipped: str | None = None
    cpu: float | None = None
    hwm_kb: int | None = None


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, row: str, system: str, sample: Sample) -> None:
        self.samples.setdefault((row, system), []).append(sample)

    def dump(self) -> str:
        """The samples as JSON, keyed "row/system" (a run's results.json)."""
        raw = {f"{r}/{n}": [vars(x) for x in v] for (r, n), v in self.samples.items()}
        return json.dumps(raw, indent=1)

    @classmethod
    def load(cls, text: str) -> Results:
        """The samples of a ``dump``."""
        results = cls()
        for key, samples in json.loads(text).items():
            row, _, system = key.partition("/")
            for sample in samples:
                results.add(row, system, Sample(**sample))
        return results

    def median(self, row: str, system: str) -> float | None:
        values = [s.value for s in self.samples.get((row, system), []) if s.value is not None]
        return statistics.median(values) if values else None

    def cpu(self, row: str, system: str) -> float | None:
        values = [s.cpu for s in self.samples.get((row, system), []) if s.cpu is not None]
        return statistics.median(values) if values else None

    def cell(self, row: str, system: str, unit: str) -> str:
        """The median as the table shows it; "skip" if every sample was skipped."""
        samples = self.samples.get((row, system), [])
        value = self.median(row, system)
        if value is None and samples and all(s.skipped for s in samples):
            return "skip"
        return fmt(value, unit)

    def hwm(self, row: str, system: str) -> int | None:
        values = [s.hwm_kb for s in self.samples.get((row, system), []) if s.hwm_kb is not None]
        return max(values) if values else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "fail"
    if unit == "s":
        return f"{value:.2f}"
    if unit in ("µs", "ms"):
        return f"{value:.1f}"
    return f"{value:,.0f}"


def machine_info(work: Path) -> list[str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    df = run(["df", "-T", str(work)]).stdout.splitlines()[-1].split()
    device, fstype = df[0], df[1]
    disk = ""
    try:
        name = Path(device).name
        model = Path(f"/sys/class/block/{name}/device/model")
        rotational = Path(f"/sys/class/block/{name}/queue/rotational").read_text().strip()
        disk = f", {'rotational' if rotational == '1' else 'non-rotational'}"
        if model.exists():
            disk += f", model {model.read_text().strip()}"
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    room = header_room_at(str(work))  # a kmsfs header in the inode, or a block of its own
    disk += "" if room is None else f", {room} bytes of xattr room per inode"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))})",
        f"- memory: {mem:.0f} GiB; kernel: {platform.release()}",
        f"- work dir: {work} on {device} ({fstype}{disk})",
    ]


def versions(names: list[str], keys: set[str] | None = None) -> str:
    """The versions of the systems *names*, pyfuse3 and fio, and of PostgreSQL and SQLite
    when the row *keys* include theirs; a version that cannot be read is left out."""
    keys = keys or set()
    parts = []
    for venv in (VENV, STOCK_VENV):
        python = venv / "bin" / "python"
        if python.exists():
            out = run([str(python), "-c", "import pyfuse3; print(pyfuse3.__version__)"]).stdout
            parts.append(f"pyfuse3 {out.strip()} ({venv.name})")
    for name in names:
        try:
            if name == "kmsfs":
                out = run([str(KMSFS), "--version"]).stdout.strip()
            elif name == "gocryptfs":
                out = run(["gocryptfs", "-version"]).stdout.split(";")[0].strip()
            elif name == "securefs":
                out = (
                    "securefs "
                    + run(["dpkg-query", "-W", "-f=${Version}", "securefs"]).stdout.strip()
                )
            else:
                continue
            parts.append(out)
        except (RuntimeError, OSError):
            pass
    if "pgbench" in keys and (bindir := postgres.bindir()) is not None:
        try:
            out = run([str(bindir / "postgres"), "--version"]).stdout.strip()
            parts.append(f"PostgreSQL {out.removeprefix('postgres (PostgreSQL) ')}")
        except (RuntimeError, OSError):
            pass
    if keys & {"sqlite", "sqlitewal"}:
        try:
            import sqlite3

            parts.append(f"SQLite {sqlite3.sqlite_version} (python {platform.python_version()})")
        except ImportError:
            pass
    fio = run(["fio", "--version"]).stdout.strip()
    return ", ".join(parts + [fio])


def _target(row: Row, peer_ratio: float | None, floor_ratio: float | None) -> list[str]:
    """The target and met cells of *row* (empty when the row has no target); *peer_ratio*
    is kmsfs over the best peer, or over ``row.versus`` if the row names one."""
    if row.peer_target is not None:
        goal, ratio, of = row.peer_target, peer_ratio, row.versus or "best peer"
    elif row.floor_target is not None:
        goal, ratio, of = row.floor_target, floor_ratio, "floor"
    else:
        return ["", ""]
    higher = row.higher_better
    digits = f"{goal:.2f}".rstrip("0")
    target = f"{'≥' if higher else '≤'} {digits}{'0' if digits.endswith('.') else ''}× {of}"
    if ratio is None:
        return [target, "n/a"]
    met = "met" if (ratio >= goal if higher else ratio <= goal) else "MISSED"
    if row.versus is not None:  # no other column shows this ratio
        met += f" ({ratio:.2f}×)"
    return [target, met]


def render(
    results: Results,
    rows: list[Row],
    systems: list[System],
    sizes: Sizes,
    repeats: int,
    quick: bool,
    work: Path,
) -> str:
    names = [s.name for s in systems]
    peers = [s.name for s in systems if s.peer]
    ours = "kmsfs" in names
    floor = "floor" in names
    lines = [
        f"kmsfs benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}: medians of {repeats}"
        f" repeat(s){' (quick sizes)' if quick else ''}",
        "",
        *machine_info(work),
        f"- versions: {versions(names, {r.key for r in rows})}",
        "",
    ]
    baselines = [n for n in names if n.startswith("kmsfs@")]
    header = ["#", "workload", "unit", *names]
    if ours:
        header += [f"kmsfs / {n}" for n in baselines]
    if ours and peers:
        header.append("kmsfs / best peer")
    if ours and floor:
        header.append("kmsfs / floor")
    above_disk = ours and floor and "plain" in names
    if above_disk:
        header.append("(kmsfs − plain) / floor")
    if ours and (peers or floor):
        header += ["target", "met"]
    if ours:
        header += ["kmsfs CPU s", "kmsfs VmHWM MB"]
    if floor:
        header.append("floor CPU s")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    peak = 0
    for row in rows:
        unit = row.unit + (" (higher is better)" if row.higher_better else " (lower is better)")
        cells = [row.number, row.label.format(procs=sizes.procs), unit]
        cells += [results.cell(row.key, n, row.unit) for n in names]
        mine = results.median(row.key, "kmsfs")
        peer_ratio = floor_ratio = None
        if ours:
            for n in baselines:
                before = results.median(row.key, n)
                ratio = mine / before if mine is not None and before else None
                cells.append("n/a" if ratio is None else f"{ratio:.2f}×")
        if ours and peers:
            theirs = [v for p in peers if (v := results.median(row.key, p)) is not None]
            if mine is not None and theirs:
                best = max(theirs) if row.higher_better else min(theirs)
                peer_ratio = mine / best
            cells.append("n/a" if peer_ratio is None else f"{peer_ratio:.2f}×")
        if ours and floor:
            base = results.median(row.key, "floor")
            if mine is not None and base:
                floor_ratio = mine / base
            cells.append("n/a" if floor_ratio is None else f"{floor_ratio:.2f}×")
        if above_disk:
            base = results.median(row.key, "floor")
            plain = results.median(row.key, "plain")
            above = None
            if row.unit == "s" and mine is not None and base and plain is not None:
                above = (mine - plain) / base
            cells.append("" if above is None else f"{above:.2f}×")
        target_ratio = peer_ratio
        if row.versus is not None:
            theirs_v = results.median(row.key, row.versus)
            target_ratio = mine / theirs_v if mine is not None and theirs_v else None
        if ours and (peers or floor):
            cells += _target(row, target_ratio if peers else None, floor_ratio)
        if ours:
            cpu = results.cpu(row.key, "kmsfs")
            hwm = results.hwm(row.key, "kmsfs")
            peak = max(peak, hwm or 0)
            cells += [
                "" if cpu is None else f"{cpu:.1f}",
                "" if hwm is None else f"{hwm / 1024:.0f}",
            ]
        if floor:
            cpu = results.cpu(row.key, "floor")
            cells.append("" if cpu is None else f"{cpu:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    daemons = [n for n in names if any(results.cpu(r.key, n) is not None for r in rows)]
    if set(daemons) - {"kmsfs", "floor"}:  # the table has only those two CPU columns
        lines += ["Daemon CPU s (utime+stime during the timed part, median):", ""]
        lines.append("| # | workload | " + " | ".join(daemons) + " |")
        lines.append("|" + "|".join("---" for _ in range(len(daemons) + 2)) + "|")
        for row in rows:
            cpus = [results.cpu(row.key, n) for n in daemons]
            cells = ["" if c is None else f"{c:.2f}" for c in cpus]
            lines.append(
                f"| {row.number} | {row.label.format(procs=sizes.procs)} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    per_request = [
        f"{n} {cpu / RTT_REQUESTS * 1e6:.1f}"
        for n in names
        if any(r.key == "rtt" for r in rows) and (cpu := results.cpu("rtt", n)) is not None
    ]
    if per_request:
        lines += [
            f"Daemon CPU per request in row 0 (µs: utime+stime over its {RTT_REQUESTS:,}"
            f" requests, median): {', '.join(per_request)}.",
            "",
        ]
    if ours and peak:
        rss_met = "met" if peak / 1024 < RSS_TARGET_MB else "MISSED"
        lines.append(
            f"kmsfs daemon peak RSS (VmHWM) over the suite: {peak / 1024:.0f} MB"
            f" (target < {RSS_TARGET_MB} MB: {rss_met})."
        )
    lines.append(
        f"Sizes: sequential file {sizes.seq_bytes // MiB} MiB; tree = tar of {sizes.tree_source};"
        f" fio file {sizes.fio_bytes // MiB} MiB, {sizes.fio_seconds} s per job;"
        f" {sizes.creates:,} creates; {sizes.procs} processes ×"
        f" {sizes.par_bytes // MiB} MiB (9a) and × {sizes.par_creates:,} files (9b);"
        f" C project of {sizes.modules} modules (10);"
        f" pgbench scale {sizes.pgbench_scale}, {postgres.CLIENTS} clients on"
        f" {postgres.THREADS} threads for {sizes.pgbench_seconds} s (11);"
        f" {sizes.sqlite_txns:,} SQLite transactions (12a, 12b)."
        " MB = 10^6 bytes. Ratios: throughput and IOPS kmsfs/best (higher is better),"
        " times kmsfs/best (lower is better); kmsfs / floor likewise against the in-memory"
        " pyfuse3 floor; (kmsfs − plain) / floor, for times: kmsfs's time above what the"
        " backing disk costs a plain directory, over the floor's (which has no disk)."
        " CPU s = daemon utime+stime during the timed part (median);"
        " VmHWM = daemon peak RSS after the workload (max over repeats)."
    )
    failures = [
        f"- {row}/{system}: {s.error.splitlines()[-1].strip()}"
        for (row, system), samples in results.samples.items()
        for s in samples
        if s.error
    ]
    if failures:
        lines += ["", "Failures:", *failures]
    skips = skip_notes(results)
    if skips:
        lines += ["", "Skipped:", *skips]
    return "\n".join(lines) + "\n"


def skip_notes(results: Results) -> list[str]:
    """One line per row and system that was skipped, with each distinct reason once."""
    return sorted(
        {
            f"- {row}/{system}: {s.skipped}"
            for (row, system), samples in results.samples.items()
            for s in samples
            if s.skipped
        }
    )
