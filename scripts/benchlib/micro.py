"""Format-layer micro-benchmarks, as gocryptfs keeps in internal/speed.

    .venv/bin/python scripts/benchlib/micro.py [--seconds 0.5] [--markdown FILE]
    scripts/bench --micro [--quick]             # the same, through the launcher

Times, in this process and one thread, the public functions of
``kmsfs.format.content`` and ``kmsfs.format.header``, for file format 1
(AES-256-GCM blocks) and file format 2 (XAES-256-GCM blocks) side by side:

- ``BlockCipher.seal`` / ``BlockCipher.open`` of one block, for each block size
  (512 B to 1 MiB), and of a 1 MiB run of blocks (the largest write the kernel
  sends): µs per call for both formats, their ratio, and format 2's MB/s of
  plaintext (the blocks of one open share a nonce prefix, as in the daemon);
- format 2's random access: ``open`` of one block whose nonce prefix is not among
  the derived keys the cipher keeps (a random read of blocks written by many
  opens of the file: a cipher uses one prefix for 4,096 blocks in a row);
- ``BlockCipher.for_file`` (HKDF-SHA256 subkey + AES-GCM or XAES context), once
  per file;
- ``FileHeader.pack`` / ``FileHeader.parse`` with one and with three wrapped keys.

Each figure is the best of 25 rounds, about ``--seconds`` in all (the best is
the least disturbed by other work on a shared machine; short rounds catch the
quiet moments of a busy one); the two formats take turns round by round, so
their ratio compares them under the same conditions.  No root, no mount, no key
provider: keys and IDs are random bytes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial

from kmsfs.format.content import BlockCipher
from kmsfs.format.header import FORMAT_1, FORMAT_2, FileHeader, WrappedKey
from kmsfs.format.xaes import CACHE_ENTRIES

BLOCK_SIZES = (512, 4096, 16384, 65536, 131072, 1 << 20)
RUN_BYTES = 1 << 20
MB = 1_000_000
ROUNDS = 25


def best_times(funcs: list[Callable[[], object]], seconds: float) -> list[float]:
    """Seconds per call of each of *funcs*: the best of ROUNDS rounds, about *seconds*
    in all per function.  The functions take turns within each round, so that two
    compared meet the same disturbances of a shared machine."""
    per_round = []
    for func in funcs:
        func()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 10:
            func()
            calls += 1
        per_round.append(max(int(calls * 10 / ROUNDS), 1))
    best = [float("inf")] * len(funcs)
    for _ in range(ROUNDS):
        for index, (func, count) in enumerate(zip(funcs, per_round, strict=True)):
            start = time.perf_counter()
            for _ in range(count):
                func()
            best[index] = min(best[index], (time.perf_counter() - start) / count)
    return best


def best_time(func: Callable[[], object], seconds: float) -> float:
    """``best_times`` of one function."""
    return best_times([func], seconds)[0]


def header(entries: int, block_size: int = 4096, version: int = FORMAT_1) -> FileHeader:
    """A header of the shape the local provider writes (61-byte wrapped keys)."""
    keys = tuple(
        WrappedKey("local", f"local:{os.urandom(8).hex()}", os.urandom(61)) for _ in range(entries)
    )
    return FileHeader.new(os.urandom(16), os.urandom(16), block_size, keys, version)


def seal_open_times(
    ciphers: list[BlockCipher], plain: bytes, last: int, seconds: float
) -> tuple[list[float], list[float]]:
    """Seconds per ``seal`` and per ``open`` of *plain* (blocks 0..*last*) by each cipher,
    measured in turns."""
    seals, opens = [], []
    for cipher in ciphers:
        sealed = cipher.seal(0, plain, last)
        if bytes(cipher.open(0, sealed, last, "micro")) != plain:
            raise SystemExit(f"micro: open(seal(x)) != x in format {cipher.version}")
        seals.append(partial(cipher.seal, 0, plain, last))
        opens.append(partial(cipher.open, 0, sealed, last, "micro"))
    return best_times(seals, seconds), best_times(opens, seconds)


def cipher_rows(seconds: float) -> list[list[str]]:
    rows = []
    for block_size in BLOCK_SIZES:
        ciphers = [
            BlockCipher.for_file(os.urandom(32), header(1, block_size, version))
            for version in (FORMAT_1, FORMAT_2)
        ]
        for size in sorted({block_size, max(RUN_BYTES, block_size)}):
            plain = os.urandom(size)
            last = (size - 1) // block_size
            (seal1, seal2), (open1, open2) = seal_open_times(ciphers, plain, last, seconds)
            what = "1 block" if size == block_size else f"{size // block_size} blocks"
            rows.append(
                [
                    _size(block_size),
                    f"{_size(size)} ({what})",
                    f"{seal1 * 1e6:,.1f}",
                    f"{seal2 * 1e6:,.1f}",
                    f"{seal2 / seal1:.2f}",
                    f"{size / MB / seal2:,.0f}",
                    f"{open1 * 1e6:,.1f}",
                    f"{open2 * 1e6:,.1f}",
                    f"{open2 / open1:.2f}",
                    f"{size / MB / open2:,.0f}",
                ]
            )
    return rows


def random_read_rows(seconds: float, block_size: int = 4096) -> list[list[str]]:
    """One-block opens of format 1, and of format 2 with the block's nonce prefix known
    or not (blocks sealed by 4x as many opens as the cipher keeps derived keys),
    measured in turns."""
    labels, opens = [], []
    for version, blocks, label in (
        (FORMAT_1, 1, "format 1"),
        (FORMAT_2, 1, "format 2, nonce prefix known (of the block read before)"),
        (FORMAT_2, 4 * CACHE_ENTRIES, "format 2, nonce prefix not kept (a key derived)"),
    ):
        key, head = os.urandom(32), header(1, block_size, version)
        cipher = BlockCipher.for_file(key, head)
        # written by as many opens (each draws its own nonce prefix), read by this one
        writers = [BlockCipher.for_file(key, head) for _ in range(blocks)]
        sealed = itertools.cycle([w.seal(5, os.urandom(block_size), 9) for w in writers])
        labels.append(f"`open`, 1 block of {_size(block_size)}, {label}")
        opens.append(partial(_open_next, cipher, sealed))
    return [[label, _us(t)] for label, t in zip(labels, best_times(opens, seconds), strict=True)]


def _open_next(cipher: BlockCipher, sealed: Iterator[bytearray]) -> None:
    cipher.open(5, next(sealed), 9, "micro")


def per_op_rows(seconds: float) -> list[list[str]]:
    rows = []
    key = os.urandom(32)
    for version, what in ((FORMAT_1, "AES-GCM context"), (FORMAT_2, "XAES context")):
        one = header(1, version=version)
        rows.append(
            [
                f"`BlockCipher.for_file`, format {version} (HKDF + {what})",
                _us(best_time(partial(BlockCipher.for_file, key, one), seconds)),
            ]
        )
    one = header(1)
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
    p.add_argument("--seconds", type=float, default=0.5, help="time per figure (all its rounds)")
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
        f" best of {ROUNDS} rounds, ~{args.seconds:g} s a figure; CPU: {cpu}",
        "",
        *table(
            [
                "block size",
                "call",
                "seal µs, format 1",
                "seal µs, format 2",
                "seal 2/1",
                "seal MB/s, format 2",
                "open µs, format 1",
                "open µs, format 2",
                "open 2/1",
                "open MB/s, format 2",
            ],
            cipher_rows(args.seconds),
        ),
        "",
        *table(
            ["operation", "µs/call"], random_read_rows(args.seconds) + per_op_rows(args.seconds)
        ),
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
