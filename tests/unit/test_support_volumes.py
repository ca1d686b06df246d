"""The unit tier makes its volumes in process (``make_volume(in_process=True)``); that
they are what ``kmsfs init`` makes is checked against the real command, in a process
of its own, by tests/mount/test_in_process_volumes.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.volumes import make_volume


def test_in_process_takes_no_init_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--block-size"):
        make_volume(tmp_path, "--block-size", "8192", in_process=True)
