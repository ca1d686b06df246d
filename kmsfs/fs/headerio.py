"""Reading a backing file's header xattr by descriptor: the one home for it (no FUSE).

The daemon, ``decrypt``/``inspect`` and the lifecycle tools all read headers
through these functions, so "missing" and "malformed" are told apart the same
way everywhere.
"""

from __future__ import annotations

import errno
import os

from kmsfs.errors import FormatError
from kmsfs.format.header import XATTR_NAME, FileHeader


def read_raw_header(fd: int) -> bytes | None:
    """The header xattr's bytes of the open file *fd*, or None if it has none.

    Other OSErrors (EIO, a filesystem without xattrs) propagate.
    """
    try:
        return os.getxattr(fd, XATTR_NAME)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def parse_header(raw: bytes, what: str) -> FileHeader:
    """*raw* parsed; FormatError naming *what* and the problem if it is malformed."""
    try:
        return FileHeader.parse(raw)
    except FormatError as exc:
        raise exc.located(what) from None


def read_header(fd: int, what: str) -> FileHeader:
    """The parsed header of the open file *fd*; FormatError naming *what* if it is
    missing (a file not written through kmsfs, or an xattr a copy lost) or malformed."""
    raw = read_raw_header(fd)
    if raw is None:
        raise FormatError(
            f"no kmsfs header ({XATTR_NAME} is missing: a file not written through"
            " kmsfs, or its header xattr was lost)",
            where=what,
        )
    return parse_header(raw, what)
