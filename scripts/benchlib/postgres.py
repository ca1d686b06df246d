"""PostgreSQL for the pgbench rows: find or install it, run a private server whose data
directory is on a system's mount, run ``pgbench``, and read its figures.

The server runs as the ``postgres`` user (initdb and postgres refuse root), so the
mount must let that user in: every FUSE system is mounted with ``allow_other``
(systems.py) and the data directory is given to that user.  The server listens on
no TCP port (``listen_addresses=''``); its Unix socket is in a private directory
under /tmp (a socket's path must stay under 108 bytes, which a work directory
might not), so the port only names the socket and two runs never meet.  The
clients (pgbench, psql) run as root and connect through that socket as the
database user ``postgres`` (trust authentication: no password anywhere).
Everything else is PostgreSQL's default, fsync and synchronous commit included.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from benchlib.common import FAILURES, Skipped, apt_install, log, pid_alive, run, wait_for

PG_USER = "postgres"  # the system user the server runs as, and the database user
DATABASE = "postgres"
PORT = 54329  # names the socket only: the server listens on no TCP port
PACKAGE = "postgresql-15"  # Debian 12's PostgreSQL (server, initdb, pg_ctl, pgbench, psql)
TOOLS = ("initdb", "pg_ctl", "postgres", "pgbench", "psql")
CLIENTS, THREADS = 4, 2  # pgbench -c, -j
START_SECONDS = 120  # pg_ctl -t: how long a start or a stop may take


def bindir() -> Path | None:
    """The bin directory of the newest PostgreSQL under /usr/lib/postgresql (Debian's
    layout) that has all of TOOLS; None if there is none."""
    found = [
        (int(d.parent.name), d)
        for d in Path("/usr/lib/postgresql").glob("*/bin")
        if d.parent.name.isdigit() and all((d / tool).exists() for tool in TOOLS)
    ]
    return max(found)[1] if found else None


def ensure() -> Path:
    """PostgreSQL's bin directory, installing PACKAGE with apt-get if there is none.

    Skipped (with the reason the pgbench rows are skipped) if PostgreSQL cannot be
    installed, or if there is no ``postgres`` user or no ``runuser`` to run it as."""
    if shutil.which("runuser") is None:
        raise Skipped(f"no runuser (util-linux) to run PostgreSQL as the {PG_USER} user")
    found = bindir()
    if found is None:
        try:
            apt_install([PACKAGE])
        except FAILURES as exc:
            why = str(exc).strip().splitlines()[-1]
            raise Skipped(
                f"PostgreSQL is not installed and apt-get cannot install it: {why}"
            ) from None
        found = bindir()
        if found is None:
            raise Skipped(f"{PACKAGE} installed, but no {'/'.join(TOOLS)} in one directory")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise Skipped(f"no {PG_USER} user to run PostgreSQL as (it refuses root)") from None
    return found


@dataclass(frozen=True)
class Summary:
    """What pgbench prints at the end of a run.  Attributes: tps (transactions per
    second, without the initial connection time), processed (transactions that
    completed), failed (transactions that failed; 0 before PostgreSQL 15)."""

    tps: float
    processed: int
    failed: int


_TPS = re.compile(
    r"^tps = ([0-9]+(?:\.[0-9]+)?) "
    r"\((?:without initial connection time|excluding connections establishing)\)$",
    re.MULTILINE,
)
_PROCESSED = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: ([0-9]+)", re.MULTILINE)


def parse_summary(stdout: str) -> Summary:
    """The figures of pgbench's report *stdout* (PostgreSQL 14+ says "without initial
    connection time", 13 and before "excluding connections establishing").

    ValueError naming the line it did not find."""
    tps = _TPS.search(stdout)
    if tps is None:
        raise ValueError(f"no 'tps = N (without initial connection time)' line in: {stdout!r}")
    processed = _PROCESSED.search(stdout)
    if processed is None:
        raise ValueError(f"no 'number of transactions actually processed' line in: {stdout!r}")
    failed = _FAILED.search(stdout)
    return Summary(
        float(tps.group(1)), int(processed.group(1)), int(failed.group(1)) if failed else 0
    )


@dataclass(frozen=True)
class Latencies:
    """Per-transaction latencies of a pgbench transaction log.  Attributes: count
    (transactions that completed), failed (lines saying ``failed`` or ``skipped``
    instead of a latency), p99_ms (99th percentile of the completed ones, ms)."""

    count: int
    failed: int
    p99_ms: float


def percentile(ordered: list[int], q: float) -> int:
    """The *q*-th percentile (0 < q <= 100) of the ascending list *ordered* by the
    nearest-rank method: the smallest value with at least q % of the values at or
    below it.  ValueError for an empty list or q out of range."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q}: want 0 < q <= 100")
    return ordered[math.ceil(q / 100 * len(ordered)) - 1]


def parse_transaction_log(lines: Iterable[str]) -> Latencies:
    """Read pgbench's per-transaction log (``--log``): one line per transaction,
    ``client_id transaction_no time script_no time_epoch time_us [lag] [retries]``,
    where time is the transaction's latency in µs, or ``failed`` / ``skipped``.

    ValueError naming the line for a line of another shape, or if no transaction
    completed."""
    latencies: list[int] = []
    failed = 0
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 6 or not all(f.isdigit() for f in (fields[0], fields[1], *fields[3:6])):
            raise ValueError(f"transaction log line {number}: not pgbench's format: {line!r}")
        if fields[2] in ("failed", "skipped"):
            failed += 1
        elif fields[2].isdigit():
            latencies.append(int(fields[2]))
        else:
            raise ValueError(f"transaction log line {number}: latency {fields[2]!r} is no number")
    if not latencies:
        raise ValueError("the transaction log holds no completed transaction")
    latencies.sort()
    return Latencies(len(latencies), failed, percentile(latencies, 99) / 1000)


def read_transaction_logs(paths: Iterable[Path]) -> Latencies:
    """parse_transaction_log over the files pgbench wrote (one per thread), in order."""

    def lines() -> Iterable[str]:
        for path in sorted(paths):
            with path.open() as f:
                yield from f

    return parse_transaction_log(lines())


class Server:
    """One PostgreSQL server run as PG_USER, its data directory on a mount.

    Attributes: bindir (PostgreSQL's programs), data (the data directory, made by
    create), rundir (private, made by create: the socket, the server's log and
    pgbench's transaction logs), pid (the postmaster's, once started)."""

    def __init__(self, bindir: Path, data: Path) -> None:
        self.bindir = bindir
        self.data = data
        self.rundir: Path | None = None
        self.pid: int | None = None

    def _as_user(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *cmd]

    def _run_dir(self) -> Path:
        if self.rundir is None:
            raise RuntimeError("PostgreSQL server used before create()")
        return self.rundir

    def client(self, tool: str, *args: str) -> list[str]:
        """The command line of client *tool* (pgbench, psql) with *args*, as root,
        connected through the private socket to DATABASE."""
        rundir = self._run_dir()
        socket = ["-h", str(rundir), "-p", str(PORT), "-U", PG_USER]
        return [str(self.bindir / tool), *socket, *args, DATABASE]

    def create(self) -> None:
        """Make the run directory and the data directory (owned by PG_USER, 0700),
        and initdb it.

        Skipped if the filesystem does not let PG_USER own and enter the data
        directory (PostgreSQL refuses one it does not own); RuntimeError with
        initdb's message if initdb fails."""
        user = pwd.getpwnam(PG_USER)
        self.rundir = Path(tempfile.mkdtemp(prefix="kmsfs-bench-pg."))
        os.chown(self.rundir, user.pw_uid, user.pw_gid)
        self.data.mkdir()
        try:
            os.chown(self.data, user.pw_uid, user.pw_gid)
            os.chmod(self.data, 0o700)
        except OSError as exc:
            raise Skipped(f"cannot give {self.data} to the {PG_USER} user: {exc}") from exc
        if self.data.stat().st_uid != user.pw_uid:
            raise Skipped(
                f"{self.data} does not keep its owner after chown: PostgreSQL refuses a"
                " data directory its user does not own"
            )
        try:
            run(self._as_user("test", "-w", str(self.data), "-a", "-x", str(self.data)))
        except RuntimeError:
            raise Skipped(
                f"the {PG_USER} user cannot enter {self.data} (a FUSE mount needs"
                " allow_other, and every directory above it must let others pass)"
            ) from None
        initdb = str(self.bindir / "initdb")
        run(
            self._as_user(
                initdb,
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                PG_USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            ),
            cwd=self.rundir,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections; RuntimeError with
        the end of the server's log if it does not."""
        rundir = self._run_dir()
        options = f"-c listen_addresses='' -c unix_socket_directories='{rundir}' -p {PORT}"
        try:
            run(
                self._as_user(
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(rundir / "server.log"),
                    "-w",
                    "-t",
                    str(START_SECONDS),
                    "-o",
                    options,
                    "start",
                ),
                cwd=rundir,
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nserver log: {self.log_tail()}") from exc
        finally:
            self.pid = self._read_pid()  # also after a failure: stop() ends what started

    def log_tail(self) -> str:
        """The end of the server's log ("" if there is none)."""
        try:
            return (self._run_dir() / "server.log").read_text(errors="replace")[-1500:]
        except (OSError, RuntimeError):
            return ""

    def initialise(self, scale: int) -> None:
        """``pgbench -i -s SCALE``, then a checkpoint, so that the timed run does not
        write back what the initialisation left dirty."""
        run(self.client("pgbench", "-i", "-s", str(scale), "-q"), cwd=self._run_dir())
        run(self.client("psql", "-X", "-q", "-c", "CHECKPOINT"), cwd=self._run_dir())

    def pgbench(self, seconds: int) -> tuple[Summary, Latencies]:
        """The TPC-B-like run: CLIENTS clients on THREADS threads for *seconds*, each
        transaction logged; its summary and latencies.

        RuntimeError if pgbench fails, if its summary or its log cannot be read, or if
        they disagree on how many transactions completed."""
        rundir = self._run_dir()
        for old in rundir.glob("tx.*"):
            old.unlink()
        out = run(
            self.client(
                "pgbench",
                "-c",
                str(CLIENTS),
                "-j",
                str(THREADS),
                "-T",
                str(seconds),
                "--log",
                f"--log-prefix={rundir / 'tx'}",
            ),
            cwd=rundir,
        ).stdout
        try:
            summary = parse_summary(out)
            latencies = read_transaction_logs(rundir.glob("tx.*"))
        except ValueError as exc:
            raise RuntimeError(f"cannot read pgbench's results: {exc}") from exc
        if latencies.count != summary.processed:
            raise RuntimeError(
                f"pgbench processed {summary.processed} transactions but logged {latencies.count}"
            )
        return summary, latencies

    def _read_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _alive(self) -> bool:
        """Whether the postmaster we started still runs (its pid not reused)."""
        if self.pid is None or not pid_alive(self.pid):
            return False
        try:
            return Path(f"/proc/{self.pid}/comm").read_text().strip() == "postgres"
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (a fast shutdown, then an immediate one, then SIGKILL of
        the postmaster) and remove the run directory.  Never raises: it runs on
        failures and on Ctrl-C."""
        if self.rundir is None:
            return
        if self.pid is None:
            self.pid = self._read_pid()
        pg_ctl = str(self.bindir / "pg_ctl")
        for mode in ("fast", "immediate"):
            if not self._alive():
                break
            try:
                run(
                    self._as_user(
                        pg_ctl,
                        "-D",
                        str(self.data),
                        "-m",
                        mode,
                        "-w",
                        "-t",
                        str(START_SECONDS),
                        "stop",
                    ),
                    cwd=self.rundir,
                    timeout=START_SECONDS + 30,
                )
            except FAILURES as exc:
                log(f"PostgreSQL at {self.data}: pg_ctl stop -m {mode} failed: {exc}")
        if self._alive():
            assert self.pid is not None
            log(f"PostgreSQL at {self.data}: killing postmaster {self.pid}")
            try:
                os.kill(self.pid, signal.SIGKILL)
                wait_for(lambda: not self._alive(), f"postmaster {self.pid} to exit")
            except (OSError, RuntimeError) as exc:
                log(f"PostgreSQL at {self.data}: {exc}")
        shutil.rmtree(self.rundir, ignore_errors=True)
        self.rundir = None
        self.pid = None
