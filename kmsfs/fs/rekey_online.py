"""Online rekey of one file: a new backing file under a fresh key, switched in under the
operations' own locks while the file stays open (docs/DESIGN.md "Online rekey").

``OnlineRekey.rekey(rel, st, wanted, before_chunk)`` holds the inode (``InodeTable.hold``)
and opens its content as an OPEN does, mirrors every write and truncate of it into a
new backing file (``ContentFile.mirror``), copies it chunk by chunk holding the inode's
lock for one chunk at a time, then switches: fsync, copy metadata, RENAME_EXCHANGE the
new file in, re-point the entry (``InodeTable.rebind``), fsync the directory, and only
then make the new ``ContentFile`` the one every handle uses.  The job around it (walk,
selection, rate limits, pause, journal) is ``kmsfs.server.rekey_job``.

What fails and how: ``Skipped`` (with the reason) for a file that is not to be done or
no longer can be (hard-linked, unlinked or changed meanwhile), ``NotDue`` for one that
*wanted* does not select after all;
``RekeyAbandoned`` when a write or truncate of the file failed while it was mirrored
(nothing switched: the next job does it); KmsfsError and OSError as the content, the key
provider and the backing filesystem raise them.  In every case the file is left as it
was, under its old key, and the temporary file is removed.  Cancellation is honoured
between chunks; the switch itself (from the exchange to the new content) is shielded.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.copy import copy_chunk, copy_metadata, read_xattrs, start_encrypted
from kmsfs.backing.header_xattr import read_header
from kmsfs.backing.syscalls import RENAME_EXCHANGE, renameat2
from kmsfs.backing.tree import FILE_FLAGS, Entry, Tree, TreeChanged
from kmsfs.errors import KmsfsError
from kmsfs.format.header import FileHeader
from kmsfs.fs.errno_map import LookAgain
from kmsfs.fs.inodes import Inode

if TYPE_CHECKING:
    from kmsfs.fs.operations import KmsfsOperations

log = logging.getLogger("kmsfs.rekey")

TMP_NAME = "rekey-online-tmp"  # in .kmsfs.d: the new file until the exchange, then the old
CHUNK_BYTES = 256 * 1024  # plaintext copied per hold of the inode lock

# (header, content) -> None if the file is to be re-keyed, else why not
Wanted = Callable[[FileHeader, ContentFile], str | None]


class Skipped(KmsfsError):
    """The file is not re-keyed, for the reason given (not an error of the volume).
    ``retry``: it changed under the rekey (moved, replaced, unlinked), and a later walk
    that meets it again may do it."""

    exit_code = 1
    retry = False


class Moved(Skipped):
    """The file was renamed, replaced or removed while the rekey had it in hand."""

    retry = True


class NotDue(Skipped):
    """Met, but not to be done after all (``wanted`` said why)."""


class RekeyAbandoned(KmsfsError):
    """A change to the file failed while it was being copied: nothing was switched."""

    exit_code = 1


@dataclass
class Progress:
    """The file being re-keyed.  Attributes: path (in the volume), size (plaintext, when
    the copy started), copied (plaintext bytes copied so far)."""

    path: str
    size: int = 0
    copied: int = 0


class OnlineRekey:
    """Re-keys files of the volume *ops* serves, one at a time.

    Attributes: ops (the operations), tree (the backing root, by descriptor), state_fd
    (``.kmsfs.d``), chunk (plaintext bytes per hold of the inode lock), current (the
    file being done, or None).
    """

    def __init__(
        self, ops: KmsfsOperations, tree: Tree, state_fd: int, chunk: int = CHUNK_BYTES
    ) -> None:
        self.ops = ops
        self.tree = tree
        self.state_fd = state_fd
        block = ops.config.block_size
        self.chunk = max(chunk // block, 1) * block  # whole blocks: no read-modify-write
        self.current: Progress | None = None

    def recover(self) -> None:
        """Remove the temporary file a daemon killed during a rekey left: it is the new
        file (never switched in) or the old one (switched out), and the name holds the
        other, complete, either way.  Blocking (an unlink)."""
        try:
            os.unlink(TMP_NAME, dir_fd=self.state_fd)
        except FileNotFoundError:
            pass

    async def rekey(
        self,
        rel: str,
        st: os.stat_result,
        wanted: Wanted,
        before_chunk: Callable[[int], Awaitable[None]],
        path: str | None = None,
    ) -> int:
        """Re-key the regular file *rel* of the backing tree, which the walk found with
        attributes *st*; returns the plaintext bytes copied.  *path* is its path in the
        volume (with encrypted names not *rel*), for messages and the audit log.

        *wanted* decides, once the file is open, whether it is still to be done;
        *before_chunk(n)* is awaited before each chunk, with the bytes it will copy as far as
        the file's size then says (rate limits, pause).
        Raises as the module docstring says.
        """
        path = path or "/" + rel
        try:
            fd = self.tree.open_file(rel, os.O_RDONLY, Entry(rel, st))
        except (FileNotFoundError, TreeChanged) as exc:
            raise Moved("removed, replaced or moved since the walk met it", where=path) from exc
        links = os.fstat(fd).st_nlink
        if links != 1:
            os.close(fd)
            raise Skipped(f"{links} hard links: re-key it with the volume unmounted", where=path)
        try:
            entry = self.ops.inodes.hold(os.fstat(fd), fd)
        except OSError as exc:  # a deferred entry whose name moved on (ESTALE)
            raise Moved(f"changed since the walk met it ({exc.strerror})", where=path) from None
        self.current = Progress(path)
        try:
            return await self._rekey_entry(entry, path, wanted, before_chunk)
        finally:
            self.current = None
            with trio.CancelScope(shield=True):
                await self.ops.contents.release_content(entry)
                self.ops.inodes.release_if_unused(entry)

    async def _rekey_entry(
        self,
        entry: Inode,
        path: str,
        wanted: Wanted,
        before_chunk: Callable[[int], Awaitable[None]],
    ) -> int:
        ops = self.ops
        requester = _requester(path)
        async with entry.lock:
            try:
                old = await ops.contents.content(entry, requester)
            except LookAgain:  # its format marker was wrong, and is right now
                old = await ops.contents.content(entry, requester)
        header = read_header(old.fd, path)
        reason = wanted(header, old)
        if reason is not None:
            raise NotDue(reason, where=path)
        new_header, cipher = await ops.contents.key_call(
            ops.keyring.new_file_cipher, header.block_size, requester
        )
        self.recover()
        new_fd = os.open(
            TMP_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | FILE_FLAGS, 0o600, dir_fd=self.state_fd
        )
        new = None
        try:
            new = start_encrypted(new_fd, new_header, cipher, path)
            new.describe = lambda: ops.places.describe(entry)
            async with entry.lock:
                old = self._mirrored(entry, None)
                old.mirror, old.mirror_error = new, None
            copied = await self._copy(entry, new, before_chunk)
            await trio.to_thread.run_sync(os.fsync, new_fd, limiter=ops.contents.io_limiter)
            synced = (new.usage.sealed, new.size)
            async with entry.lock:
                old = self._mirrored(entry, new)
                if new.size != old.size:
                    new.truncate(old.size)  # a trailing hole the copy left unwritten
                if (new.usage.sealed, new.size) != synced:  # changed since: sync again
                    await trio.to_thread.run_sync(os.fsync, new_fd, limiter=ops.contents.io_limiter)
                with trio.CancelScope(shield=True):
                    await self._switch(entry, old, new, header, new_header)
            await trio.to_thread.run_sync(_free, old.fd, limiter=ops.contents.io_limiter)
            return copied
        finally:
            if new is None or entry.content is not new:
                with trio.CancelScope(shield=True):
                    await self._unmirror(entry, new)
                os.close(new_fd)
                self.recover()

    async def _unmirror(self, entry: Inode, new: ContentFile | None) -> None:
        """Stop mirroring the entry's content into *new*, holding the inode lock: a request
        in a worker thread may be writing through the mirror, whose descriptor the caller
        closes next (a number that a later open may reuse)."""
        async with entry.lock:
            content = entry.content
            if content is not None and new is not None and content.mirror is new:
                content.mirror = None

    def _mirrored(self, entry: Inode, new: ContentFile | None) -> ContentFile:
        """The entry's content (call with its lock held), still mirrored into *new* (None:
        not mirrored yet); RekeyAbandoned if a change failed meanwhile."""
        content = entry.content
        assert content is not None  # held open by us
        if content.mirror is not new:
            why = content.mirror_error
            raise RekeyAbandoned(
                f"a write or truncate failed while it was copied ({why}): left as it was",
                where=self.ops.places.describe(entry),
            )
        return content

    async def _copy(
        self, entry: Inode, new: ContentFile, before_chunk: Callable[[int], Awaitable[None]]
    ) -> int:
        """Copy the entry's content into *new*, one chunk per hold of the inode lock, up to
        the size it has at each chunk; returns the plaintext bytes read."""
        ops = self.ops
        pos = copied = 0
        progress = self.current
        size = entry.content.size if entry.content is not None else 0
        while True:
            await before_chunk(min(self.chunk, max(size - pos, 0)))  # as it looks now
            async with entry.lock:
                old = self._mirrored(entry, new)
                size = old.size
                if progress is not None:
                    progress.size = size
                if pos >= old.size:
                    return copied
                copied += await trio.to_thread.run_sync(
                    copy_chunk, old.read, new, pos, self.chunk, limiter=ops.contents.io_limiter
                )
            pos += self.chunk
            if progress is not None:
                progress.copied = min(pos, progress.size)

    async def _switch(
        self,
        entry: Inode,
        old: ContentFile,
        new: ContentFile,
        old_header: FileHeader,
        header: FileHeader,
    ) -> None:
        """Put *new* (under *header*) in place of *old* (under *old_header*) under the
        file's name and make every handle use it (inode lock held, not cancellable).  Up
        to the exchange nothing has changed (Moved then); after it the switch completes."""
        ops = self.ops
        dir_fd = self._exchange(entry, old, new, old_header.file_id, header.file_id)
        try:
            await trio.to_thread.run_sync(os.fsync, dir_fd, limiter=ops.contents.io_limiter)
        finally:
            os.close(dir_fd)
            # from here on every request uses the new file (also if the fsync failed:
            # the entry already stands for the new inode)
            old.mirror = None
            entry.content = new
            entry.format, entry.claims = header.version, 0
        os.unlink(TMP_NAME, dir_fd=self.state_fd)  # the old inode, held as ``retired``
        log.info("%s: re-keyed (file ID %s, format %d)", ops.places.describe(entry),
                 header.file_id.hex(), header.version)  # fmt: skip

    def _exchange(
        self, entry: Inode, old: ContentFile, new: ContentFile, old_id: bytes, new_id: bytes
    ) -> int:
        """Copy the old inode's metadata to the new one (encrypted xattr values sealed
        again: they are bound to the file ID, *old_id* before and *new_id* after),
        exchange the two names, rebind the entry; returns the descriptor of the
        directory (to fsync).  Runs without an await, so no other request of this
        daemon comes in between."""
        ops = self.ops
        st_old = os.fstat(old.fd)
        backing = ops.places.paths.backing_of(entry.fd)
        path = ops.places.describe(entry)
        if backing is None or backing == "/" or st_old.st_nlink != 1:
            raise Moved(
                "unlinked, hard-linked or moved out of the volume while it was copied",
                where=path,
            )
        try:
            dir_fd, name = self.tree.parent(backing[1:])
        except (FileNotFoundError, TreeChanged) as exc:
            raise Moved(f"its directory changed while it was copied ({exc})", where=path) from None
        entry_fd = -1
        try:
            values = ops.names.rebind_xattrs(read_xattrs(old.fd), old_id, new_id)
            copy_metadata(st_old, new.fd, values)
            entry_fd = os.dup(new.fd)  # before the exchange: nothing may fail after it
            times = os.fstat(dir_fd)
            try:
                renameat2(self.state_fd, TMP_NAME.encode(), dir_fd, os.fsencode(name),
                          RENAME_EXCHANGE)  # fmt: skip
            except FileNotFoundError:
                raise Moved("removed while it was re-keyed", where=path) from None
            # what came out must be the old inode, and what went in the new one: whoever
            # can write the backing directory may have swapped either name meanwhile
            back = os.stat(TMP_NAME, dir_fd=self.state_fd, follow_symlinks=False)
            put = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            st_new = os.fstat(new.fd)
            if (back.st_dev, back.st_ino, put.st_ino) != (st_old.st_dev, st_old.st_ino,
                                                          st_new.st_ino):  # fmt: skip
                renameat2(self.state_fd, TMP_NAME.encode(), dir_fd, os.fsencode(name),
                          RENAME_EXCHANGE)  # fmt: skip
                raise Moved("replaced in the backing directory while re-keyed", where=path)
            ops.inodes.rebind(entry, entry_fd, st_new, retire=old.fd)
        except BaseException:
            os.close(dir_fd)
            if entry_fd >= 0:
                os.close(entry_fd)
            raise
        try:  # the exchange changed them; nothing else did (no await since)
            os.utime(dir_fd, ns=(times.st_atime_ns, times.st_mtime_ns))
        except OSError as exc:
            log.warning("%s: directory times not restored: %s", path, exc.strerror)
        return dir_fd


def _free(fd: int) -> None:
    """Give back the blocks of the old inode, once nothing names it (it is kept open:
    ``InodeTable.rebind``).  Not possible on a read-only descriptor: left as it is."""
    try:
        if os.fstat(fd).st_nlink == 0:
            os.ftruncate(fd, 0)
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.EINVAL, errno.EPERM):
            raise


def _requester(path: str) -> dict[str, Any]:
    """Who uses the file's keys, for the audit log: this daemon's rekey."""
    return {
        "path": path,
        "uid": os.geteuid(),
        "gid": os.getegid(),
        "pid": os.getpid(),
        "process": "kmsfs-rekey",
    }
