"""The lifecycle tools' journals and scratch files in ``.kmsfs.d`` (no FUSE).

A journal is a small JSON object a tool saves before each step it must be
able to resume (rewrap, rekey, import), written durably (``replace_durably``)
and read back with a size bound.  ``.kmsfs.d`` is reached by descriptor from
the backing root, never through a symlink (``kmsfs.backing.tree``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kmsfs.backing.durable import replace_durably
from kmsfs.backing.tree import FILE_FLAGS, open_root, open_state_dir
from kmsfs.errors import LifecycleError
from kmsfs.format.volume_config import STATE_DIR_NAME

MAX_JOURNAL_SIZE = 1 << 20


@contextmanager
def _state(backing: Path, create: bool) -> Iterator[int | None]:
    """The descriptor of ``.kmsfs.d`` (None if absent and not *create*)."""
    root = open_root(backing)
    try:
        try:
            state = open_state_dir(root, create)
        except OSError as exc:
            raise LifecycleError(
                f"{backing}/{STATE_DIR_NAME}: {exc.strerror} (kmsfs never follows a symlink there)"
            ) from None
    finally:
        os.close(root)
    try:
        yield state
    finally:
        if state is not None:
            os.close(state)


def load_journal(backing: Path, name: str) -> dict[str, Any] | None:
    where = f"{backing}/{STATE_DIR_NAME}/{name}.json"
    with _state(backing, create=False) as state:
        if state is None:
            return None
        try:
            fd = os.open(f"{name}.json", os.O_RDONLY | FILE_FLAGS, dir_fd=state)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LifecycleError(f"cannot read journal {where}: {exc.strerror}") from None
        try:
            raw = os.read(fd, MAX_JOURNAL_SIZE + 1)
        finally:
            os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LifecycleError(f"cannot read journal {where}: {exc}") from None
    if not isinstance(data, dict):
        raise LifecycleError(f"journal {where} is not a JSON object")
    return data


def save_journal(backing: Path, name: str, data: dict[str, Any]) -> None:
    """Write the journal atomically and durably (temp file, fsync, rename, fsync dir)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    with _state(backing, create=True) as state:
        assert state is not None
        replace_durably(state, f"{name}.json", text.encode())


def drop_journal(backing: Path, name: str) -> None:
    with _state(backing, create=False) as state:
        if state is None:
            return
        try:
            os.unlink(f"{name}.json", dir_fd=state)
        except FileNotFoundError:
            pass
        os.fsync(state)


def unlink_if_present(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
