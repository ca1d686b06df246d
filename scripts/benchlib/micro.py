"""Format-layer micro-benchmarks, as gocryptfs keeps in internal/speed.

    .venv/bin/python scripts/benchlib/micro.py [--seconds 0.5] [--markdown FILE]
    scripts/bench --micro [--quick]             # the same, through the launcher

Times, in this process and one thread, the public functions of
``kmsfs.format.content`` and ``kmsfs.format.header``:

- ``BlockCipher.seal`` / ``BlockCipher.open`` of one block, for each block size
  (512 B to 1 MiB), and of a 1 MiB run of blocks (the largest write the kernel
  sends): MB/s of plaintext and µs per call;
- ``BlockCipher.for_file`` (HKDF-SHA256 subkey + AES-GCM context), once per file;
- ``FileHeader.pack`` / ``FileHeader.parse`` with one and with three wrapped keys.

Each figure is the best of five measurements of about ``--seconds`` each (the
best is the least disturbed by other work on a shared machine).  No root, no
mount, no key provider: keys and IDs are random bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial

from kmsfs.format.content import BlockCipher
from kmsfs.format.header import FileHeader, WrappedKey

BLOCK_SIZES = (512, 4096, 16384, 65536, 131072, 1 << 20)
RUN_BYTES = 1 << 20
MB = 1_000_000
ROUNDS = 5


def best_time(func: Callable[[], object], seconds: float) -> float:
    """Seconds per call of *func*: the best of ROUNDS rounds of about *seconds* each."""
    func()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 10:
        func()
        calls += 1
    per_round = max(int(calls * 10 / ROUNDS), 1)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(per_round):
            func()
        best = min(best, (time.perf_counter() - start) / per_round)
    return best


def header(entries: int, block_size: int = 4096) -> FileHeader:
    """A header of the shape the local provider writes (61-byte wrapped keys)."""
    keys = tuple(
        WrappedKey("local", f"local:{os.urandom(8).hex()}", os.urandom(61)) for _ in range(entries)
    )
    return FileHeader(os.urandom(16), os.urandom(16), block_size, keys)


def cipher_rows(seconds: float) -> list[list[str]]:
    rows = []
    for block_size in BLOCK_SIZES:
        cipher = BlockCipher.for_file(os.urandom(32), header(1, block_size))
        for size in sorted({block_size, max(RUN_BYTES, block_size)}):
            plain = os.urandom(size)
            last = (size - 1) // block_size
            sealed = cipher.seal(0, plain, last)
            if bytes(cipher.open(0, sealed, last, "micro")) != plain:
                raise SystemExit(f"micro: open(seal(x)) != x for block size {block_size}")
            t_seal = best_time(partial(cipher.seal, 0, plain, last), seconds)
            t_open = best_time(partial(cipher.open, 0, sealed, last, "micro"), seconds)
            what = "1 block" if size == block_size else f"{size // block_size} blocks"
            rows.append(
                [
                    _size(block_size),
                    f"{_size(size)} ({what})",
                    f"{size / MB / t_seal:,.0f}",
                    f"{t_seal * 1e6:,.1f}",
                    f"{size / MB / t_open:,.0f}",
                    f"{t_open * 1e6:,.1f}",
                ]
            )
    return rows


def per_op_rows(seconds: float) -> list[list[str]]:
    rows = []
    key = os.urandom(32)
    one = header(1)
    rows.append(
        [
            "`BlockCipher.for_file` (HKDF + AES-GCM context)",
            _us(best_time(lambda: BlockCipher.for_file(key, one), seconds)),
        ]
    )
    for entries in (1, 3):
        h = header(entries)
        packed = h.pack()
        if FileHeader.parse(packed) != h:
            raise SystemExit("micro: parse(pack(h)) != h")
        label = f"{entries} wrapped key{'s' if entries > 1 else ''}, {len(packed)} bytes"
        rows.append([f"`FileHeader.pack`, {label}", _us(best_time(h.pack, seconds))])
        rows.append(
            [
                f"`FileHeader.parse`, {label}",
                _us(best_time(partial(FileHeader.parse, packed), seconds)),
            ]
        )
    return rows


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


def _us(t: float) -> str:
    return f"{t * 1e6:,.2f}"


def table(header_cells: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header_cells) + " |",
        "|" + "|".join("---" for _ in header_cells) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench --micro", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=0.5, help="time per measurement round set")
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args(argv)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")  # noqa: SIM115
            if line.startswith("model name")
        ),
        "?",
    )
    lines = [
        f"kmsfs format micro-benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}: one thread,"
        f" best of {ROUNDS} rounds of ~{args.seconds:g} s; CPU: {cpu}",
        "",
        *table(
            ["block size", "call", "seal MB/s", "seal µs/call", "open MB/s", "open µs/call"],
            cipher_rows(args.seconds),
        ),
        "",
        *table(["operation", "µs/call"], per_op_rows(args.seconds)),
        "",
        "MB = 10^6 bytes of plaintext. Headers as the local provider writes them"
        " (key reference `local:` + 16 hex digits, 61-byte wrapped keys).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
