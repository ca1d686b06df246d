"""Offline tools on backing files: inspect a header, decrypt a file, map paths.  No FUSE.

A backing file named on the command line may lie in a tree its users control (a
directory of it swapped for a symlink while root runs ``kmsfs decrypt``).  So the
file is opened once, by descriptor, and everything is read from that descriptor:
if it lies inside a volume (a real directory above it holds ``.kmsfs.json``), it
is opened beneath that volume's root without following any symlink
(``kmsfs.backing.tree``); otherwise (a copy outside any volume) with ``O_NOFOLLOW``.

A file may also be named by its path in the volume (``backing_of``): in a volume
with encrypted names each component is encrypted under its directory's ID, read
from the backing tree by descriptor; ``path_in_volume`` is the reverse.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.header_xattr import read_header
from kmsfs.backing.names import Names
from kmsfs.backing.syscalls import RENAME_NOREPLACE, renameat2
from kmsfs.backing.tree import (
    FILE_FLAGS,
    NOT_FOLLOWED,
    TreeChanged,
    check_file,
    open_beneath,
    open_root,
)
from kmsfs.errors import KmsfsError
from kmsfs.format.content import Layout
from kmsfs.format.volume_config import CONFIG_NAME
from kmsfs.keys.keyring import Keyring

CHUNK_BLOCKS = 256
_AT_FDCWD = -100


def volume_root_of(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The nearest directory above *path* (lexically, from its absolute spelling) that
    holds a regular ``.kmsfs.json``, and *path* relative to it; None if there is none.

    A volume root is taken only as a real directory: KmsfsError if the nearest one
    is reached through a symlink of that name (inside a tree, a symlink can be
    anyone's; the operator gives the volume's own directory instead).
    """
    absolute = Path(os.path.abspath(path))
    for candidate in absolute.parents:
        try:
            if os.path.islink(candidate):
                if os.path.isfile(candidate / CONFIG_NAME):
                    raise KmsfsError(
                        f"{candidate} is a symlink to a kmsfs volume: give the path through"
                        f" the volume's own directory ({os.path.realpath(candidate)})"
                    )
                continue
            if stat.S_ISREG(os.lstat(candidate / CONFIG_NAME).st_mode):
                return candidate, absolute.relative_to(candidate).as_posix()
        except OSError:
            continue
    return None


def open_backing_file(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular backing file *path* (see the module doc).

    KmsfsError if a symlink or mount point is in its way inside the volume, or it
    is not a regular file; OSError (FileNotFoundError...) as the open raises it.
    """
    located = volume_root_of(path)
    try:
        if located is None:
            fd = os.open(path, os.O_RDONLY | FILE_FLAGS)
        else:
            root, rel = located
            root_fd = open_root(root)
            try:
                fd = open_beneath(root_fd, rel, os.O_RDONLY | FILE_FLAGS)
            finally:
                os.close(root_fd)
    except OSError as exc:
        if exc.errno in NOT_FOLLOWED:
            where = "is a symlink" if located is None else "has a symlink in its path in the volume"
            raise KmsfsError(f"{path} {where} (or a mount point): not followed") from None
        raise
    try:
        return check_file(fd, str(path))
    except TreeChanged:
        raise KmsfsError(f"{path} is not a regular file") from None


def backing_of(root: str | os.PathLike[str], names: Names, path: str) -> Path:
    """The backing entry of *path* (a path in the volume whose backing root is *root*).

    KmsfsError naming the first component that is missing, not a directory, a
    symlink in the backing tree (never followed), or without a readable ID.
    """
    root_fd = open_root(root)
    try:
        rel = names.backing_path(root_fd, os.fsencode(path))
    except (OSError, ValueError, KmsfsError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        where = exc.filename if isinstance(exc, OSError) and exc.filename else path
        raise KmsfsError(f"{path}: no such path in the volume ({where}: {why})") from None
    finally:
        os.close(root_fd)
    return Path(os.path.abspath(root)) / os.fsdecode(rel)


def path_in_volume(root: str | os.PathLike[str], names: Names, backing: str) -> str:
    """The path in the volume (``/a/b``) of the backing entry *backing* (an absolute
    path under *root*, or a path relative to *root*).  KmsfsError naming the component
    that does not decrypt or cannot be reached."""
    absolute = Path(os.path.abspath(os.path.join(root, backing)))  # join keeps an absolute
    try:
        rel = absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        raise KmsfsError(f"{backing} is not inside the volume {root}") from None
    root_fd = open_root(root)
    try:
        return names.resolve_plain(root_fd, "" if rel == "." else rel)
    except (OSError, ValueError, KmsfsError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise KmsfsError(f"{backing}: no path in the volume ({why})") from None
    finally:
        os.close(root_fd)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of *path* and its sizes, without any key."""
    fd = open_backing_file(path)
    try:
        header = read_header(fd, str(path))
        backing_size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return {
        "path": str(path),
        "format_version": header.version,
        "suite": header.suite,
        "block_size": header.block_size,
        "volume_id": header.volume_id.hex(),
        "file_id": header.file_id.hex(),
        "backing_size": backing_size,
        "plaintext_size": Layout(header.block_size, header.version).plain_size(backing_size),
        "entries": [
            {"provider": e.provider, "key_ref": e.key_ref, "wrapped_key_bytes": len(e.blob)}
            for e in header.entries
        ],
    }


def decrypt_file(
    backing_file: str | os.PathLike[str], output: str | os.PathLike[str], keyring: Keyring
) -> int:
    """Decrypt one backing file into *output* (which must not exist); returns the size.

    The output is written to a temporary name and renamed (never over an existing
    name) only when every block has authenticated, so a failure leaves no partial
    plaintext behind.
    """
    out_path = Path(output)
    if out_path.exists() or out_path.is_symlink():
        raise KmsfsError(f"{output} exists: refusing to overwrite it")
    fd = open_backing_file(backing_file)
    try:
        header = read_header(fd, str(backing_file))
        cipher = keyring.cipher_for(header, str(backing_file))
        content = ContentFile.open(fd, cipher, lambda: str(backing_file))
        temp = out_path.with_name(f".{out_path.name}.kmsfs-partial")
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            chunk = CHUNK_BLOCKS * header.block_size
            for offset in range(0, content.size, chunk):
                os.write(out, content.read(offset, chunk))
            os.fsync(out)
        except BaseException:
            os.close(out)
            os.unlink(temp)
            raise
        os.close(out)
    finally:
        os.close(fd)
    try:
        renameat2(_AT_FDCWD, os.fsencode(temp), _AT_FDCWD, os.fsencode(out_path), RENAME_NOREPLACE)
    except FileExistsError:
        os.unlink(temp)
        raise KmsfsError(f"{output} exists: refusing to overwrite it") from None
    return content.size
