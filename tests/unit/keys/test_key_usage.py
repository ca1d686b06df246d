"""The per-key block-encryption count behind the nonce-limit warning survives closes.

AES-GCM with random nonces allows 2^32 encryptions per key (docs/FORMAT.md,
"How much one file key may encrypt"); the daemon warns at 2^31, for format-1
files (written here offline, as kmsfs before format 2 wrote them): format-2
keys do not wear out, and their files take no place in the table.  The count
used to live in the open file and restart at zero on every open, so a file
rewritten a little at a time by a program that opens and closes it (a log,
a database checkpoint, an editor's saves) never reached the warning.

In-process: the operations layer is driven without a kernel mount (no FUSE
request can set a 2^31 threshold in reasonable time), with the threshold
lowered by monkeypatching the constant; everything below the operations
(backing files, headers, keys, ciphers) is real.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from support.lifecycle_support import write_files
from support.volumes import Volume, make_volume

from kmsfs.backing import content_file
from kmsfs.format.header import FORMAT_1
from kmsfs.fs.operations import KmsfsOperations, open_served_volume
from kmsfs.volume_open import open_volume

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)


def operations(vol: Volume) -> KmsfsOperations:
    config, keyring = open_volume(vol.backing, {"key_file": str(vol.key_file)})
    return KmsfsOperations(open_served_volume(str(vol.backing), config, keyring))


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "block encryptions" in r.getMessage()]


def test_warning_fires_for_a_file_opened_and_closed_many_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(content_file, "WARN_BLOCK_ENCRYPTIONS", 50)
    vol = make_volume(tmp_path, in_process=True)
    bs = 4096
    seen_at: list[int] = []

    write_files(vol.backing, vol.key_file, {"db": os.urandom(4 * bs)}, FORMAT_1)  # 4 blocks

    async def main() -> None:
        ops = operations(vol)
        try:
            ino = (await ops.lookup(1, b"db", CTX)).st_ino
            for cycle in range(30):  # each session rewrites the 4 blocks, then closes
                fh = (await ops.open(ino, os.O_RDWR, CTX)).fh
                await ops.write(fh, 0, os.urandom(4 * bs))
                await ops.release(fh)
                if warnings(caplog) and not seen_at:
                    seen_at.append(cycle)
        finally:
            ops.close()
            ops.keyring.close()

    with caplog.at_level(logging.WARNING, logger="kmsfs.fs"):
        trio.run(main)
    # 4 allocated blocks at the first open, then 4 per session: the 12th (index 11) reaches 52.
    assert warnings(caplog) == [
        "/db: 52 block encryptions under one file key (NIST limit 2^32): re-key this file"
    ]
    assert seen_at == [11]


def test_a_new_daemon_starts_from_the_blocks_already_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts are kept per daemon; each allocated block was sealed at least once, so a
    restarted daemon counts a big file's blocks before its first write."""
    monkeypatch.setattr(content_file, "WARN_BLOCK_ENCRYPTIONS", 100)
    vol = make_volume(tmp_path, in_process=True)
    write_files(vol.backing, vol.key_file, {"big": bytes(4096)}, FORMAT_1)

    async def write_big() -> None:
        ops = operations(vol)
        try:
            ino = (await ops.lookup(1, b"big", CTX)).st_ino
            fh = (await ops.open(ino, os.O_RDWR, CTX)).fh
            await ops.write(fh, 0, os.urandom(120 * 4096))
            await ops.release(fh)
        finally:
            ops.close()
            ops.keyring.close()

    async def touch_big() -> None:
        ops = operations(vol)  # a new daemon: an empty table
        try:
            attr = await ops.lookup(1, b"big", CTX)
            fh = (await ops.open(attr.st_ino, os.O_RDWR, CTX)).fh
            assert warnings(caplog) == []  # reading or opening seals nothing
            await ops.write(fh, 0, b"x")
            await ops.release(fh)
        finally:
            ops.close()
            ops.keyring.close()

    with caplog.at_level(logging.WARNING, logger="kmsfs.fs"):
        trio.run(write_big)
        assert len(warnings(caplog)) == 1  # 1 block allocated, then 120 sealed: 121
        caplog.clear()
        trio.run(touch_big)
    assert warnings(caplog) == [
        "/big: 121 block encryptions under one file key (NIST limit 2^32): re-key this file"
    ]


def test_table_is_bounded_and_keeps_the_most_used_keys() -> None:
    from kmsfs.backing.content_file import KeyUsageTable

    table = KeyUsageTable(max_entries=8)
    for n in range(8):
        table.get(bytes([n]) * 16).sealed = 1000 * n
    table.get(b"\xff" * 16)  # the 9th: the four least used go
    assert len(table) == 5
    assert table.get(bytes([7]) * 16).sealed == 7000  # still counted
    assert table.get(bytes([4]) * 16).sealed == 4000
    assert table.get(bytes([0]) * 16).sealed == 0  # forgotten: restarts (from its lower bound)


def test_format_2_files_are_not_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New files are format 2: however much they are rewritten, no warning, and the
    table (bounded) keeps its places for the format-1 files it is for."""
    monkeypatch.setattr(content_file, "WARN_BLOCK_ENCRYPTIONS", 10)
    vol = make_volume(tmp_path, in_process=True)
    counted: list[int] = []

    async def main() -> None:
        ops = operations(vol)
        try:
            info, _ = await ops.create(1, b"new", 0o600, os.O_RDWR, CTX)
            for _ in range(5):
                await ops.write(info.fh, 0, os.urandom(4 * 4096))
            await ops.release(info.fh)
            counted.append(len(ops.key_usage))
        finally:
            ops.close()
            ops.keyring.close()

    with caplog.at_level(logging.WARNING, logger="kmsfs.fs"):
        trio.run(main)
    assert warnings(caplog) == []
    assert counted == [0]
