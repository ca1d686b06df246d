"""Fixtures of the in-process operations tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.operations import serving

from kmsfs.fs.operations import KmsfsOperations


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[KmsfsOperations]:
    """The operations of a new local-provider volume with plain names."""
    with serving(tmp_path) as operations:
        yield operations
