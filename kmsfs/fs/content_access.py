"""How the operations reach file content and sizes: this daemon alone, or shared with
other daemons.  Chosen once, when the operations are built (``content_access_for``);
the handlers ask it instead of testing a flag.

``LocalContentAccess``: this daemon alone serves the volume, so the kernel may keep
pages across opens and write back whole pages, listings may stay cached, and the
size of an open file is the one its ContentFile holds.

``SharedContentAccess`` (docs/DESIGN.md "Shared storage"): other daemons write the
same files, so none of that: no writeback cache (the kernel would write back whole
pages over another host's bytes), no page cache kept across opens, sizes read from
the backing file under a byte-range lock (a size not read under one is not cached
by the kernel), an open that meets a file another daemon is creating waits for its
header, a create that finds the name taken meanwhile by another daemon opens that
file, and an open with O_TRUNC always truncates (the size this daemon knows may be
stale).  Waits for another daemon go through ``LockWaits`` (kmsfs/fs/lockwait.py),
on the loop, with a deadline.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.shared import (
    CREATING_WAIT,
    LockBusy,
    SharedContentFile,
    check_created,
    locked_plain_size,
)
from kmsfs.format.content import Layout
from kmsfs.format.header import XATTR_NAME
from kmsfs.fs.fuseloop import PYFUSE3
from kmsfs.fs.inodes import Inode
from kmsfs.fs.lockwait import LockWaits, LockWaitTimeout
from kmsfs.fs.served import ServedVolume

LayoutFor = Callable[[os.stat_result, Inode], Layout]


class LocalContentAccess:
    """This daemon alone serves the volume.

    Attributes: shared (False), keep_cache (the kernel keeps a file's pages across
    opens), writeback_cache (the kernel writes back whole pages), cache_listings
    (FOPEN_CACHE_DIR, with the patched pyfuse3), content_class (what an open file's
    content is).
    """

    shared = False
    keep_cache = True
    writeback_cache = True

    def __init__(self) -> None:
        self.content_class: type[ContentFile] = ContentFile
        # FOPEN_CACHE_DIR on opendir (patched pyfuse3): the kernel keeps listings until
        # the directory changes through the mount
        self.cache_listings = PYFUSE3.cache_dir

    def open_size(self, entry: Inode | None) -> int | None:
        """The plaintext size of *entry* as its open content holds it, or None (not
        open): the size the kernel may be told without reading the backing file."""
        if entry is not None and entry.content is not None:
            return entry.content.size
        return None

    def attr_timeout_of_computed_size(self, timeout: float) -> float:
        """How long the kernel may cache attributes whose size was computed from the
        backing file's size without a lock (*timeout*: the configured one)."""
        return timeout

    async def locked_size(
        self, st: os.stat_result, entry: Inode, layout_for: LayoutFor, caller: int
    ) -> int | None:
        """The plaintext size of the regular file *entry* read under a byte-range lock,
        or None: its size comes from ``open_size`` or from *st*."""
        return None

    async def wait_created(self, entry: Inode, caller: int) -> None:
        """Before *entry*'s content is first opened: nothing to wait for here."""

    def opens_created_elsewhere(self, exc: BaseException, flags: int) -> bool:
        """True if a create that failed with *exc* should open the file instead, as one
        another daemon made since the negative lookup."""
        return False

    def truncates_on_open(self, content: ContentFile) -> bool:
        """True if an open with O_TRUNC must truncate *content* (not when it is empty)."""
        return content.size > 0


class SharedContentAccess(LocalContentAccess):
    """Other daemons may serve the volume at once (module docstring).

    Attributes: as ``LocalContentAccess``, and lock_waits (the waits for other
    daemons' byte-range locks).
    """

    shared = True
    keep_cache = False
    writeback_cache = False

    def __init__(self, backing: str, lock_waits: LockWaits) -> None:
        super().__init__()
        self.content_class = SharedContentFile.for_backing(backing)
        self.cache_listings = False  # other daemons change directories too
        self.lock_waits = lock_waits

    def open_size(self, entry: Inode | None) -> int | None:
        return None

    def attr_timeout_of_computed_size(self, timeout: float) -> float:
        # another daemon may have been extending the file when its size was read
        return 0

    async def locked_size(
        self, st: os.stat_result, entry: Inode, layout_for: LayoutFor, caller: int
    ) -> int | None:
        """The size read under a lock; None for a daemon not running as root that may
        not open the file (it gives the size it has, uncached by the kernel).
        *caller*: the requester's pid (its wait for another daemon's lock ends if it
        is interrupted).  LockWaitFailed and its kin from ``lock_waits`` when another
        daemon holds the file's end too long."""
        # the layout of the file's format: as its header gave it, else as its marker claims
        path, layout = entry.proc_path, layout_for(st, entry)
        try:
            try:  # on the loop: granted or refused at once; refused, it waits there too
                return locked_plain_size(path, layout)
            except LockBusy as busy:
                return await self.lock_waits.call(
                    locked_plain_size, path, layout, busy=busy, caller=caller, key=entry.ino
                )
        except PermissionError:
            return None

    async def wait_created(self, entry: Inode, caller: int) -> None:
        """Before the content is first opened: wait (up to CREATING_WAIT seconds, through
        ``lock_waits``) while the backing file has no header or no first block yet, as
        while another daemon creates it (O_EXCL open, header, first block).  After
        that, opening it reports what is missing.  Raises what ``lock_waits`` raises,
        but not its timeout."""
        if entry.content is not None:
            return
        path = entry.proc_path
        try:
            await self.lock_waits.call(
                check_created,
                path,
                functools.partial(_has_header, path),
                caller=caller,
                give_up_after=CREATING_WAIT,
            )
        except LockWaitTimeout:
            pass

    def opens_created_elsewhere(self, exc: BaseException, flags: int) -> bool:
        # O_CREAT without O_EXCL opens what is there, as a local filesystem would
        return isinstance(exc, FileExistsError) and not flags & os.O_EXCL

    def truncates_on_open(self, content: ContentFile) -> bool:
        return True  # the size this daemon knows may be another daemon's past


def content_access_for(parts: ServedVolume, lock_waits: LockWaits) -> LocalContentAccess:
    """The content access the volume is served with: shared or local, as *parts* say."""
    if parts.shared:
        return SharedContentAccess(parts.backing, lock_waits)
    return LocalContentAccess()


def _has_header(path: str) -> bool:
    """True if the backing file at *path* has a kmsfs header xattr."""
    try:
        os.getxattr(path, XATTR_NAME)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return False
    return True
