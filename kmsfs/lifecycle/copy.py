"""Writing an encrypted copy of a file (rekey, import) and copying metadata."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from kmsfs.format.content import BlockCipher
from kmsfs.format.header import RESERVED_XATTR_PREFIX, XATTR_NAME, FileHeader
from kmsfs.fs.content_file import ContentFile
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import wipe

CHUNK_BLOCKS = 256
Reader = Callable[[int, int], bytes | bytearray]


def write_encrypted(
    target: Path, keyring: Keyring, block_size: int, reader: Reader, size: int
) -> FileHeader:
    """Create *target* (must not exist) holding *size* bytes from *reader*, encrypted
    under a fresh file key and file ID, and fsync it.  All-zero chunks become holes.
    """
    file_id = os.urandom(16)
    key, entries = keyring.new_file_key(file_id)
    header = FileHeader(keyring.volume_id, file_id, block_size, entries)
    try:
        cipher = BlockCipher.for_file(key, header)
    finally:
        wipe(key)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.setxattr(fd, XATTR_NAME, header.pack())
        content = ContentFile(fd, cipher, 0, lambda: str(target))
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
    finally:
        os.close(fd)
    return header


def copy_xattrs(source: Path, target: Path, skip_reserved: bool = True) -> None:
    """Copy the user.* xattrs (not kmsfs's own) of *source* to *target*."""
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        if not name.startswith("user."):
            continue
        if skip_reserved and name.startswith(RESERVED_XATTR_PREFIX):
            continue
        value = os.getxattr(source, name, follow_symlinks=False)
        os.setxattr(target, name, value, follow_symlinks=False)


def copy_metadata(st: os.stat_result, source: Path, target: Path) -> None:
    """Owner, mode, user xattrs and atime/mtime of *source* (stat *st*) onto *target*."""
    is_link = stat.S_ISLNK(st.st_mode)
    try:
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        pass  # not root: the files stay owned by the caller
    if not is_link:
        os.chmod(target, stat.S_IMODE(st.st_mode))
        copy_xattrs(source, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
