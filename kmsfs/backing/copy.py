"""Writing an encrypted copy of a file and copying its metadata, on descriptors (no FUSE).

Used by the offline rekey and import (``write_encrypted``: the whole file at once) and
by the daemon's online rekey (``start_encrypted`` and ``copy_chunk``: a chunk at a
time, under the inode's lock, docs/DESIGN.md "Online rekey").
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.header_xattr import write_new_header
from kmsfs.backing.syscalls import fchown_path_fd, utimens_path_fd
from kmsfs.backing.xattrs import Namespace, namespace_of
from kmsfs.format.content import BlockCipher, format_of_mode, mode_for_format
from kmsfs.format.header import FileHeader

CHUNK_BLOCKS = 256
Reader = Callable[[int, int], bytes | bytearray]
# what the mount stores on a backing file (kmsfs/backing/xattrs.py), kmsfs's own aside
COPIED_XATTRS = (Namespace.STORED, Namespace.PRIVILEGED)


def start_encrypted(fd: int, header: FileHeader, cipher: BlockCipher, what: str) -> ContentFile:
    """Make the new, empty file *fd* a well-formed empty file of *header* (format marker,
    header xattr, an empty final block sealed by *cipher*) and return its ContentFile.
    OSError as fchmod, setxattr or pwrite raise it."""
    write_new_header(fd, header)
    content = ContentFile(fd, cipher, 0, lambda: what)
    content.write_empty()
    return content


def copy_chunk(reader: Reader, target: ContentFile, offset: int, length: int) -> int:
    """Copy up to *length* plaintext bytes at *offset* from *reader* into *target* at the
    same offset, and return how many were read (0: the end).  An all-zero chunk is not
    written: it stays a hole, or keeps what *target* has there.  Raises what *reader*
    and ``ContentFile.write`` raise."""
    data = reader(offset, length)
    if data and data != bytes(len(data)):
        target.write(offset, data)
    return len(data)


def write_encrypted(
    fd: int, header: FileHeader, cipher: BlockCipher, reader: Reader, size: int, what: str
) -> None:
    """Fill the new, empty file *fd* with *size* bytes from *reader*, encrypted as
    *header* and *cipher* say (a fresh file key and ID: ``Keyring.new_file_cipher``),
    with its format marker, and fsync it.  All-zero chunks become holes."""
    content = start_encrypted(fd, header, cipher, what)
    chunk = CHUNK_BLOCKS * header.block_size
    for offset in range(0, size, chunk):
        if not copy_chunk(reader, content, offset, chunk):
            break
    if content.size != size:
        content.truncate(size)  # a trailing hole: the final block is sealed here
    os.fsync(fd)


def read_xattrs(fd: int) -> dict[str, bytes]:
    """The xattrs the mount stores of the open file or directory *fd* (``user.*``,
    ``trusted.*`` and the POSIX ACLs: kmsfs/backing/xattrs.py), without kmsfs's own."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for name in names:
        if namespace_of(os.fsencode(name)) in COPIED_XATTRS:
            try:
                values[name] = os.getxattr(fd, name)
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # removed meanwhile
                    raise
    return values


def copy_metadata(st: os.stat_result, fd: int, xattrs: dict[str, bytes] | None = None) -> None:
    """Owner, mode, *xattrs* and atime/mtime of *st* onto the inode of *fd*.

    *fd* may be an O_PATH descriptor (a symlink, FIFO or device node: no xattrs then).
    The owner is set first (chown clears set-id bits), the times last.  A regular
    file keeps the format marker it has (the mode bit S_ISVTX: *st*'s is not copied).
    """
    try:
        fchown_path_fd(fd, st.st_uid, st.st_gid)
    except PermissionError:
        pass  # not root: the files stay owned by the caller
    if not stat.S_ISLNK(st.st_mode):
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            mode = mode_for_format(mode, format_of_mode(os.fstat(fd).st_mode))
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
            os.chmod(f"/proc/self/fd/{fd}", mode)  # the inode of fd
        else:
            os.fchmod(fd, mode)
    for name, value in (xattrs or {}).items():
        os.setxattr(fd, name, value)
    utimens_path_fd(fd, st.st_atime_ns, st.st_mtime_ns)
