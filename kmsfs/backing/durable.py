"""Durable replacement of a small file: temporary file, fsync, rename, fsync directory.

One home for the volume config and the lifecycle journals.  The temporary file
is created next to the target with O_EXCL|O_NOFOLLOW relative to the parent's
descriptor, so a planted symlink is never followed, and a crash leaves either
the old or the new content, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_durably(dir_fd: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace *name* in the directory *dir_fd* with *data*, atomically and durably.

    Raises OSError (ENOSPC, EACCES...) with the target left as it was.
    """
    temp = f"{name}.tmp"  # one per target (a crashed writer's is replaced); .kmsfs* stays hidden
    try:
        os.unlink(temp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def write_durably(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """``replace_durably`` for a path this host gave (its parent is opened once)."""
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace_durably(dir_fd, path.name, data, mode)
    finally:
        os.close(dir_fd)
