"""Durable replacement of a small file: temporary file, fsync, rename, fsync directory.

One home for the volume config and the lifecycle journals.  The temporary file
is created next to the target with O_EXCL|O_NOFOLLOW relative to the parent's
descriptor, so a planted symlink is never followed and a crash leaves either
the old or the new content, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace *path* with *data* atomically and durably.

    Raises OSError (ENOSPC, EACCES...) with the target left as it was.
    """
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        temp = f".{path.name}.{os.getpid()}.tmp"
        try:
            os.unlink(temp, dir_fd=dir_fd)  # left by a crashed run of this process id
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
        os.rename(temp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the directory *path* (makes a rename or create in it durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
