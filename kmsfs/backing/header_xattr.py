"""A backing file's header xattr and format marker, by descriptor: the one home for
them (no FUSE).

The daemon, ``decrypt``/``inspect`` and the lifecycle tools all read headers
through these functions, so "missing" and "malformed" are told apart the same
way everywhere, and every writer of new files gives them header and marker
with ``write_new_header``; tools that rewrite an existing header do it with
``replace_header`` (compare-and-swap).
"""

from __future__ import annotations

import errno
import os

from kmsfs.errors import FormatError, HeaderChanged
from kmsfs.format.content import format_of_mode, mode_for_format
from kmsfs.format.header import XATTR_NAME, FileHeader


def read_raw_header(fd: int | str) -> bytes | None:
    """The header xattr's bytes of the open file *fd* (or of the inode at the path
    *fd*: ``/proc/self/fd/N`` of an O_PATH descriptor), or None if it has none.

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


def read_header(fd: int | str, what: str) -> FileHeader:
    """The parsed header of the open file *fd* (or path, as ``read_raw_header``);
    FormatError naming *what* if it is
    missing (a file not written through kmsfs, or an xattr a copy lost) or malformed."""
    raw = read_raw_header(fd)
    if raw is None:
        raise FormatError(
            f"no kmsfs header ({XATTR_NAME} is missing: a file not written through"
            " kmsfs, or its header xattr was lost)",
            where=what,
        )
    return parse_header(raw, what)


def set_format_marker(fd: int, version: int) -> int:
    """Make the format marker of the open regular file *fd* say file format *version*
    (docs/FORMAT.md, "The format marker"); returns the format it said before.  OSError
    as fchmod raises it (EPERM for a caller that neither owns the file nor is root)."""
    mode = os.fstat(fd).st_mode
    claimed = format_of_mode(mode)
    if claimed != version:
        os.fchmod(fd, mode_for_format(mode, version))
    return claimed


def write_new_header(fd: int, header: FileHeader) -> int:
    """Give the new, empty backing file *fd* the format marker of the header's version,
    then the header xattr (so that whoever sees the header sees the marker: another
    daemon of a shared volume looking the file up meanwhile); returns the header's
    size in bytes.  OSError as fchmod or setxattr raise it (EEXIST if *fd* has a
    header already)."""
    set_format_marker(fd, header.version)
    packed = header.pack()
    os.setxattr(fd, XATTR_NAME, packed, os.XATTR_CREATE)
    return len(packed)


def replace_header(fd: int, expected: bytes | None, header: bytes, what: str) -> None:
    """Compare-and-swap the header of the open file *fd*: set *header* only if the
    header is still byte-identical to *expected* (None: the file has none).

    One setxattr replaces the value whole, so a crash leaves the old header or the
    new one.  Working on the descriptor the header was read from, the write can only
    reach the inode that was read, whatever is renamed meanwhile.  HeaderChanged if
    the header differs from *expected* (nothing written); ENODATA if it vanished
    between the check and the write.
    """
    if read_raw_header(fd) != expected:
        raise HeaderChanged("its header changed while the tool ran: left as it is", where=what)
    flags = os.XATTR_CREATE if expected is None else os.XATTR_REPLACE
    os.setxattr(fd, XATTR_NAME, header, flags)
