"""ContentFile in-process (no FUSE): random writes and truncates against a bytearray model,
in both file formats."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.properties import examples

from kmsfs.backing import content_file
from kmsfs.backing.content_file import ContentFile
from kmsfs.errors import IntegrityError
from kmsfs.format.content import CIPHERS, OVERHEADS, Layout
from kmsfs.format.header import FORMAT_1, FORMAT_2

BS = 512
FORMATS = pytest.mark.parametrize("version", [FORMAT_1, FORMAT_2])


def new_file(path: Path, version: int, key: bytes = bytes(32)) -> ContentFile:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    content = ContentFile(fd, CIPHERS[version](key, bytes(16), BS), 0, lambda: str(path))
    content.write_empty()
    return content


def reopen(content: ContentFile) -> ContentFile:
    """A fresh ContentFile on the same backing file: nothing cached."""
    return ContentFile.open(content.fd, content.cipher, content.describe)


operation = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 6 * BS), st.binary(min_size=1, max_size=3 * BS)),
    st.tuples(st.just("truncate"), st.integers(0, 6 * BS), st.just(b"")),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the examples of a property test (one file each, truncated by the
    next: a directory per example cost more than the example)."""
    return tmp_path_factory.mktemp("cf")


@FORMATS
@examples(150)
@given(st.lists(operation, max_size=12))
def test_random_operations_match_model(scratch: Path, version: int, ops: list) -> None:
    content = new_file(scratch / "f", version)
    model = bytearray()
    try:
        for kind, offset, data in ops:
            if kind == "write":
                content.write(offset, data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
            else:
                content.truncate(offset)
                del model[offset:]
                model.extend(bytes(offset - len(model)))
            assert content.size == len(model)
            assert os.fstat(content.fd).st_size == Layout(BS, version).backing_size(len(model))
        fresh = reopen(content)
        assert fresh.read(0, len(model) + 10) == bytes(model)
        for offset in range(0, len(model), 97):
            assert fresh.read(offset, 300) == bytes(model[offset : offset + 300])
    finally:
        os.close(content.fd)


@FORMATS
def test_sparse_extension_writes_only_data_and_final_block(tmp_path: Path, version: int) -> None:
    content = new_file(tmp_path / "f", version)
    content.truncate(10 * 1024 * 1024 * 1024)
    assert content.size == 10 * 1024**3
    assert os.stat(tmp_path / "f").st_blocks * 512 < 1024 * 1024
    assert reopen(content).read(5 * 1024**3, 100) == bytes(100)
    os.close(content.fd)


@FORMATS
def test_truncation_at_boundary_is_detected(tmp_path: Path, version: int) -> None:
    content = new_file(tmp_path / "f", version)
    content.write(0, os.urandom(3 * BS))
    os.ftruncate(content.fd, 2 * (BS + OVERHEADS[version]))  # what an attacker would do
    with pytest.raises(IntegrityError, match="block 1 .final."):
        reopen(content).read(0, 3 * BS)
    os.close(content.fd)


@FORMATS
def test_interrupted_append_still_reads(tmp_path: Path, version: int) -> None:
    """Steps (1) and (2) of an extending write done, step (3) not: data stays readable."""
    content = new_file(tmp_path / "f", version)
    first = os.urandom(BS + 100)
    content.write(0, first)
    second = os.urandom(BS)
    cipher = content.cipher
    padded = first[BS:] + bytes(BS - 100)
    bbs = BS + OVERHEADS[version]
    os.pwrite(content.fd, cipher.seal(1, padded, 1), bbs)  # step 1
    os.pwrite(content.fd, cipher.seal(2, second, 2), 2 * bbs)  # step 2
    assert reopen(content).read(0, 4 * BS) == first + bytes(BS - 100) + second
    os.close(content.fd)


@FORMATS
def test_key_use_warning_in_format_1_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """Format-1 keys wear out (2^32 blocks); XAES-256-GCM keys do not (docs/FORMAT.md)."""
    monkeypatch.setattr(content_file, "WARN_BLOCK_ENCRYPTIONS", 8)
    content = new_file(tmp_path / "f", version)
    with caplog.at_level(logging.WARNING, logger="kmsfs.fs"):
        for _ in range(4):
            content.write(0, bytes(2 * BS))
    assert content.usage.sealed == 9
    warning = (
        f"{tmp_path / 'f'}: 9 block encryptions under one file key (NIST limit 2^32):"
        " re-key this file"
    )
    want = [warning] if version == FORMAT_1 else []
    assert [r.getMessage() for r in caplog.records] == want
    os.close(content.fd)
