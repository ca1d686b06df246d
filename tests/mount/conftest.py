"""Fixtures of the mount tier shared by several modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gluster_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two GlusterFS clients of one volume (tests/support/gluster.py), for the session."""
    from support.gluster import GlusterUnavailable, gluster_volume

    try:
        with gluster_volume(tmp_path_factory.mktemp("gluster")) as mounts:
            yield mounts
    except GlusterUnavailable as exc:
        pytest.skip(f"GlusterFS: {exc}")
