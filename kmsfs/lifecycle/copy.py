"""Writing an encrypted copy of a file (rekey, import) and copying metadata, on descriptors."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.header_xattr import write_new_header
from kmsfs.backing.syscalls import fchown_path_fd, utimens_path_fd
from kmsfs.format.content import format_of_mode, mode_for_format
from kmsfs.format.header import RESERVED_XATTR_PREFIX, FileHeader
from kmsfs.keys.keyring import Keyring

CHUNK_BLOCKS = 256
Reader = Callable[[int, int], bytes | bytearray]


def write_encrypted(
    fd: int, keyring: Keyring, block_size: int, reader: Reader, size: int, what: str
) -> FileHeader:
    """Fill the new, empty file *fd* with *size* bytes from *reader*, encrypted under a
    fresh file key and file ID in the format new files get (with its format marker),
    and fsync it.  All-zero chunks become holes.
    """
    header, cipher = keyring.new_file_cipher(block_size)
    write_new_header(fd, header)
    content = ContentFile(fd, cipher, 0, lambda: what)
    content.write_empty()
    chunk = CHUNK_BLOCKS * block_size
    for offset in range(0, size, chunk):
        data = reader(offset, chunk)
        if not data:
            break
        if data == bytes(len(data)):
            continue  # a hole: left sparse (the final truncate seals the last block)
        content.write(offset, data)
    if content.size != size:
        content.truncate(size)
    os.fsync(fd)
    return header


def read_xattrs(fd: int) -> dict[str, bytes]:
    """The user.* xattrs of the open file or directory *fd*, without kmsfs's own."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for name in names:
        if name.startswith("user.") and not name.startswith(RESERVED_XATTR_PREFIX):
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
