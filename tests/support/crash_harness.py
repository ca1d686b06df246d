"""Crash-consistency harness: a seeded writer on the mount, and the checker that
decides whether what survives a SIGKILL of the daemon is allowed.

The writer (``python tests/support/crash_harness.py DIR JOURNAL SEED``) works in one
directory of the mount: creates, writes inside and across blocks and beyond
the end (holes), appends, truncates up and down, renames (also over existing
files), unlinks, fsyncs, and atomic replaces (write a temporary file, fsync,
rename over).  Before each operation it appends ``S <n> <json>`` to the
journal, after it ``D <n>``; the json holds every parameter (written bytes
come from ``data(seed, n, length)``), so the checker replays the journal into
a model without re-running the generator.  When the daemon dies, the next
operation fails (ENOTCONN) and the writer exits.

What the checker allows (the contract tested by tests/mount/test_crash.py)
-------------------------------------------------------------------
The mount uses the kernel's writeback cache, so a write that returned may sit
in kernel pages and reach the daemon later, page by page, in any order; a
SIGKILL loses whatever did not arrive.  That is the POSIX contract of ext4
too.  So, for each file (an identity that follows renames):

* **Namespace**: renames, creates and unlinks are synchronous; the directory
  lists exactly the names after the last completed operation, or after the
  one in flight at the kill.
* **fsync'ed and untouched since**: a file with no operation after its last
  completed fsync (or create, for a file never written) reads back
  byte-exact.  No EIO.
* **Changed after its last fsync**: let V_k be the state at the last fsync
  and V_k+1 .. V_m the states produced by later operations (including the
  one in flight).  The size read back is the size of one of V_k..V_m (for a
  write in flight, anything between its before and after sizes; for a write
  that grew the file, also a page boundary between them: the kernel wrote
  back the pages up to there and not the rest; for a growing truncate in
  flight, also the block boundary after its before size: growing a file
  first pads its final block), and each byte at offset p
  equals V_j[p] for some j in k..m, or is zero if p was past the end of some
  V_j (a page the kernel never wrote back is a hole).  Bytes from before the
  last fsync, or from nowhere, fail the check.
* **EIO**: never for an fsync'ed-and-untouched file.  For a changed file
  only where docs/FORMAT.md admits it (a shrinking truncate in flight, a
  create in flight: the whole file; a block some write or truncate touched
  since the last fsync: that block alone, torn when the kill stopped the
  daemon's backing write between two kernel pages), and the daemon's log must
  name the file.  The file is read block by block, so the other blocks are
  still checked.  Anything else is a failure.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 4096  # the volume's block size and the kernel's page size here
MAX_FILES = 6


def data(seed: int, n: int, length: int) -> bytes:
    return random.Random(f"{seed}:{n}").randbytes(length)


# -- the writer ----------------------------------------------------------------


def _choose(rng: random.Random, names: dict[str, int], counter: list[int]) -> dict[str, Any]:
    """The next operation given the current names and sizes (the writer's own view)."""
    existing = sorted(names)
    roll = rng.random()
    if not existing or (roll < 0.08 and len(existing) < MAX_FILES):
        counter[0] += 1
        return {"op": "create", "name": f"f{counter[0]}"}
    name = rng.choice(existing)
    size = names[name]
    if roll < 0.35:
        kind = rng.random()
        if kind < 0.4:  # inside the file
            off = rng.randrange(0, size + 1)
        elif kind < 0.8:  # across a block boundary
            boundary = BLOCK * rng.randrange(1, 6)
            off = max(boundary - rng.randrange(1, 300), 0)
        else:  # beyond the end: a hole
            off = size + rng.randrange(1, 3 * BLOCK)
        return {"op": "write", "name": name, "off": off, "len": rng.randrange(1, 3 * BLOCK)}
    if roll < 0.50:
        return {"op": "write", "name": name, "off": size, "len": rng.randrange(1, 2 * BLOCK)}
    if roll < 0.62:
        if rng.random() < 0.6:
            new = rng.randrange(0, size + 1)
        else:
            new = size + rng.randrange(1, 2 * BLOCK)
        return {"op": "truncate", "name": name, "size": new}
    if roll < 0.80:
        return {"op": "fsync", "name": name}
    if roll < 0.88:
        target = rng.choice(existing + [f"r{rng.randrange(100)}"])
        if target == name:
            return {"op": "fsync", "name": name}
        return {"op": "rename", "name": name, "to": target}
    if roll < 0.96:
        return {"op": "replace", "name": name, "len": rng.randrange(0, 3 * BLOCK)}
    if len(existing) > 1:
        return {"op": "unlink", "name": name}
    return {"op": "fsync", "name": name}


def _expand(op: dict[str, Any]) -> list[dict[str, Any]]:
    """An atomic replace is four journaled steps."""
    if op["op"] != "replace":
        return [op]
    tmp = op["name"] + ".tmp"
    return [
        {"op": "create", "name": tmp},
        {"op": "write", "name": tmp, "off": 0, "len": op["len"]},
        {"op": "fsync", "name": tmp},
        {"op": "rename", "name": tmp, "to": op["name"]},
    ]


def _apply_fs(root: Path, seed: int, n: int, op: dict[str, Any]) -> None:
    path = root / op["name"]
    kind = op["op"]
    if kind == "create":
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    elif kind == "write":
        fd = os.open(path, os.O_WRONLY)
        try:
            payload = data(seed, n, op["len"])
            done = 0
            while done < len(payload):
                done += os.pwrite(fd, payload[done:], op["off"] + done)
        finally:
            os.close(fd)
    elif kind == "truncate":
        os.truncate(path, op["size"])
    elif kind == "fsync":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elif kind == "rename":
        os.rename(path, root / op["to"])
    elif kind == "unlink":
        os.unlink(path)
    else:
        raise ValueError(kind)


def _apply_names(names: dict[str, int], op: dict[str, Any]) -> None:
    kind, name = op["op"], op["name"]
    if kind == "create":
        names[name] = 0
    elif kind == "write":
        names[name] = max(names[name], op["off"] + op["len"])
    elif kind == "truncate":
        names[name] = op["size"]
    elif kind == "rename":
        names[op["to"]] = names.pop(name)
    elif kind == "unlink":
        del names[name]


def writer(root: Path, journal: Path, seed: int, limit: int = 1_000_000) -> int:
    """Run operations until one fails (the daemon died) or *limit*; returns the count."""
    rng = random.Random(seed)
    names: dict[str, int] = {}
    counter = [0]
    n = 0
    with open(journal, "w", buffering=1) as out:
        while n < limit:
            for op in _expand(_choose(rng, names, counter)):
                out.write(f"S {n} {json.dumps(op)}\n")
                try:
                    _apply_fs(root, seed, n, op)
                except OSError as exc:
                    out.write(f"E {n} {exc.errno}\n")
                    return n
                out.write(f"D {n}\n")
                _apply_names(names, op)
                n += 1
    return n


def start_writer(root: Path, journal: Path, seed: int) -> subprocess.Popen[str]:
    """Run ``writer`` in a process of its own on the directory *root* of a mount (so
    that a SIGKILL of the daemon stops it at an operation, which it journals)."""
    return subprocess.Popen(
        [sys.executable, __file__, str(root), str(journal), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- the checker -----------------------------------------------------------------


@dataclass
class FileModel:
    """One file identity: its state at the last fsync and the states after it."""

    ident: int
    versions: list[bytes] = field(default_factory=lambda: [b""])
    # Extra sizes allowed because of the operation in flight (a partial write).
    size_ranges: list[tuple[int, int]] = field(default_factory=list)
    # Writes that grew the file since the last fsync: a page boundary between
    # their before and after sizes is allowed (written back up to there).
    growths: list[tuple[int, int]] = field(default_factory=list)
    # Blocks written since the last fsync: a kill may have torn one (EIO).
    touched_blocks: set[int] = field(default_factory=set)
    eio_allowed: bool = False
    changed: bool = False  # any operation after the last fsync (or the create)

    @property
    def current(self) -> bytes:
        return self.versions[-1]


@dataclass
class Model:
    seed: int
    names: dict[str, FileModel] = field(default_factory=dict)
    next_ident: int = 0

    def copy_names(self) -> dict[str, FileModel]:
        return dict(self.names)

    def apply(self, n: int, op: dict[str, Any], in_flight: bool = False) -> None:
        kind, name = op["op"], op["name"]
        if kind == "create":
            self.next_ident += 1
            model = FileModel(self.next_ident, eio_allowed=in_flight, changed=in_flight)
            self.names[name] = model
            return
        model = self.names[name]
        if kind in ("write", "truncate"):
            before = model.current
            if kind == "write":
                off, payload = op["off"], data(self.seed, n, op["len"])
                grown = before.ljust(off + len(payload), b"\0")
                after = grown[:off] + payload + grown[off + len(payload) :]
                if in_flight:
                    model.size_ranges.append((len(before), len(after)))
                if len(after) > len(before):
                    model.growths.append((len(before), len(after)))
                first = min(off, len(before))
            else:
                after = before[: op["size"]].ljust(op["size"], b"\0")
                if in_flight and op["size"] < len(before):
                    model.eio_allowed = True  # FORMAT.md: the shrinking-truncate window
                if in_flight and op["size"] > len(before):
                    # FORMAT.md, growing a file: its first step pads the old final
                    # block with zeros to the block boundary
                    padded = -(-len(before) // BLOCK) * BLOCK
                    model.growths.append((len(before), min(padded + 1, len(after))))
                first = min(len(before), len(after))
            last = max(len(before), len(after), first + 1) - 1
            model.touched_blocks.update(range(first // BLOCK, last // BLOCK + 1))
            model.versions.append(after)
            model.changed = True
        elif kind == "fsync":
            if not in_flight:
                model.versions = [model.current]
                model.size_ranges = []
                model.growths = []
                model.touched_blocks = set()
                model.changed = False
        elif kind == "rename":
            self.names[op["to"]] = self.names.pop(name)
        elif kind == "unlink":
            del self.names[name]


def parse_journal(journal: Path) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any] | None]:
    """(completed operations in order, the operation in flight or None)."""
    started: dict[int, dict[str, Any]] = {}
    done: list[tuple[int, dict[str, Any]]] = []
    pending: dict[str, Any] | None = None
    for line in journal.read_text().splitlines():
        tag, rest = line[0], line[2:]
        if tag == "S":
            n_text, op_text = rest.split(" ", 1)
            started[int(n_text)] = json.loads(op_text)
            pending = {"n": int(n_text), **started[int(n_text)]}
        elif tag == "D":
            n = int(rest)
            done.append((n, started[n]))
            pending = None
        # "E": the operation failed: it may or may not have been applied; it stays pending
    return done, pending


def allowed_size(size: int, model: FileModel) -> bool:
    """Whether a file of *model* may have *size* after the kill (see the module doc)."""
    if size in {len(v) for v in model.versions}:
        return True
    if any(lo <= size <= hi for lo, hi in model.size_ranges):
        return True
    return size % BLOCK == 0 and any(lo < size < hi for lo, hi in model.growths)


def allowed_bytes_check(
    got: bytes, model: FileModel, torn_blocks: frozenset[int] = frozenset()
) -> str | None:
    """None if *got* is an allowed content for *model*, else a description of why not.

    The blocks in *torn_blocks* read EIO; their bytes in *got* are not checked.
    """
    versions = model.versions
    sizes = {len(v) for v in versions}
    size_ok = allowed_size(len(got), model)
    if not model.changed:
        if got != versions[0]:
            return _first_diff("fsync'ed content differs", got, versions[0])
        return None
    if not size_ok:
        return f"size {len(got)} is none of the sizes since the last fsync {sorted(sizes)}"
    # A zero may stand where some version ended before that offset.
    zero_from = min(len(v) for v in versions)
    chunk = 512
    for start in range(0, len(got), chunk):
        if start // BLOCK in torn_blocks:
            continue
        piece = got[start : start + chunk]
        if any(v[start : start + chunk] == piece for v in versions):
            continue
        for p in range(start, start + len(piece)):
            value = got[p]
            if value == 0 and p >= zero_from:
                continue
            if any(p < len(v) and v[p] == value for v in versions):
                continue
            return (
                f"byte {p} is {value:#04x}: no state since the last fsync has it there"
                f" ({len(versions)} states, sizes {sorted(sizes)})"
            )
    return None


def _first_diff(what: str, got: bytes, want: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    return f"{what}: got {len(got)} bytes, want {len(want)}, first difference at {at}"


@dataclass
class CheckResult:
    files: int = 0
    exact: int = 0
    changed: int = 0
    eio: list[str] = field(default_factory=list)
    torn: dict[str, list[int]] = field(default_factory=dict)  # blocks that read EIO
    problems: list[str] = field(default_factory=list)
    contents: dict[str, bytes] = field(default_factory=dict)


def check(root: Path, journal: Path, seed: int, log_text: Callable[[], str]) -> CheckResult:
    """Compare the directory *root* (remounted after the kill) with the journal.

    *log_text* returns the daemon's log (read after the reads that fail).
    """
    done, pending = parse_journal(journal)
    model = Model(seed)
    for n, op in done:
        model.apply(n, op)
    result = CheckResult()
    candidates = [model.copy_names()]
    if pending is not None:
        n = pending.pop("n")
        model.apply(n, pending, in_flight=True)
        candidates.append(model.copy_names())
    listed = set(os.listdir(root))
    matching = [c for c in candidates if set(c) == listed]
    if not matching:
        result.problems.append(
            f"{root}: names {sorted(listed)} are none of {[sorted(c) for c in candidates]}"
        )
        return result
    names = matching[-1]
    for name, file_model in sorted(names.items()):
        result.files += 1
        path = root / name
        try:
            got, torn = read_by_blocks(path)
        except OSError as exc:
            if exc.errno != errno.EIO:
                result.problems.append(f"{name}: {exc}")
                continue
            got, torn = b"", None
        if torn is None or torn:
            result.eio.append(name)
            if torn:
                result.torn[name] = sorted(torn)
            problem = _eio_problem(root, name, file_model, torn, log_text)
            if problem:
                result.problems.append(f"{name}: {problem}")
            if torn is None:
                continue
        else:
            result.contents[name] = got
        if file_model.changed:
            result.changed += 1
        else:
            result.exact += 1
        problem = allowed_bytes_check(got, file_model, frozenset(torn))
        if problem:
            result.problems.append(f"{name}: {problem}")
    return result


def read_by_blocks(path: Path) -> tuple[bytes, set[int]]:
    """The file's bytes (zeros where a block read EIO) and the blocks that did.

    Raises OSError when the file cannot be opened or its size read.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pieces: list[bytes] = []
        torn: set[int] = set()
        for index in range((size + BLOCK - 1) // BLOCK):
            want = min(BLOCK, size - index * BLOCK)
            try:
                piece = os.pread(fd, want, index * BLOCK)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                torn.add(index)
                piece = bytes(want)
            pieces.append(piece)
        return b"".join(pieces), torn
    finally:
        os.close(fd)


def _eio_problem(
    root: Path, name: str, model: FileModel, torn: set[int] | None, log_text: Callable[[], str]
) -> str | None:
    """Why an EIO (the whole file when *torn* is None, else those blocks) is not allowed."""
    if not model.eio_allowed:
        if torn is None:
            return "EIO where the format promises a readable file"
        untouched = sorted(torn - model.touched_blocks)
        if untouched:
            return (
                f"EIO in blocks {untouched}, which no write since the last fsync touched"
                f" (touched: {sorted(model.touched_blocks)})"
            )
    if f"/{root.name}/{name}" not in log_text():
        errors = [line for line in log_text().splitlines() if " ERROR " in line]
        return f"EIO but the daemon log does not name it; errors logged: {errors[-5:]}"
    return None


if __name__ == "__main__":
    count = writer(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    print(count)
