"""The FUSE operations layer driven in-process (no kernel, no mount): a volume's
``KmsfsOperations`` (``serving``), the request context handlers read (``CTX``), and
small async steps (``create``, ``read_all``) run with ``run`` or ``fuse_errno``."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from kmsfs.fs.operations import KmsfsOperations, open_served_volume
from kmsfs.volume_open import open_volume
from support.volumes import make_volume

ROOT = pyfuse3.ROOT_INODE
CTX = SimpleNamespace(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o022)


def fields(**flags: bool) -> Any:
    """A SetattrFields stand-in (pyfuse3's has read-only attributes): *flags* name the
    fields to update."""
    names = ("atime", "ctime", "gid", "mode", "mtime", "size", "uid")
    return SimpleNamespace(**{f"update_{n}": flags.get(n, False) for n in names})


@contextmanager
def serving(tmp_path: Path, names: str = "plain", **served: Any) -> Iterator[KmsfsOperations]:
    """The operations of a new volume under *tmp_path* (with *names*; made in this
    process, as ``kmsfs init`` makes it), closed after.  *served* goes to
    ``open_served_volume`` (timeout, shared)."""
    vol = make_volume(tmp_path, names=names, in_process=True)
    config, keyring = open_volume(vol.backing, {"key_file": str(vol.key_file)})
    operations = KmsfsOperations(open_served_volume(str(vol.backing), config, keyring, **served))
    try:
        yield operations
    finally:
        operations.close()
        keyring.close()


def run(func: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(func)


def fuse_errno(func: Callable[[], Awaitable[Any]]) -> int:
    """The errno of the FUSEError *func* raises (the test fails if it raises none)."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(func)
    return int(info.value.errno)


async def create(ops: KmsfsOperations, name: bytes, data: bytes = b"", parent: int = ROOT) -> int:
    """Create *name* in *parent* holding *data*; returns its inode."""
    info, attr = await ops.create(parent, name, 0o644, os.O_RDWR, CTX)
    if data:
        assert await ops.write(info.fh, 0, data) == len(data)
    await ops.release(info.fh)
    return int(attr.st_ino)


async def read_all(ops: KmsfsOperations, inode: int) -> bytes:
    """The whole content of *inode*, read through open/read/release."""
    fh = (await ops.open(inode, os.O_RDONLY, CTX)).fh
    try:
        size = (await ops.getattr(inode, CTX)).st_size
        return bytes(await ops.read(fh, 0, size + 100))
    finally:
        await ops.release(fh)
