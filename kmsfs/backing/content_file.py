"""Plaintext reads, writes and truncates on one encrypted backing file.

Blocking code with no FUSE or trio in it: the operations layer calls it
inline or in a worker thread, always holding the inode's lock, so one file's
read-modify-write of a block is never interleaved with another.

Write ordering keeps every state between two syscalls readable (see
docs/FORMAT.md, "Crash behaviour"): an extending write first pads a partial
final block (still sealed as final), then writes the new blocks, then re-seals
the old final block as a middle block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from kmsfs.backing.syscalls import preallocate
from kmsfs.errors import IntegrityError
from kmsfs.format.content import MAX_BLOCK_ENCRYPTIONS, BlockCipher

log = logging.getLogger("kmsfs.fs")
WARN_BLOCK_ENCRYPTIONS = MAX_BLOCK_ENCRYPTIONS // 2  # for format 1, whose keys wear out
USAGE_TABLE_ENTRIES = 32_768  # file IDs whose counts a daemon keeps (about 200 bytes each)


class KeyUsage:
    """Block encryptions counted under one file key (see docs/FORMAT.md,
    "How much one file key may encrypt").  Shared by every open of the files
    with that file ID while the daemon runs (format-1 files; a format-2 file's
    key has no practical limit, and its open file counts for itself).

    Attributes: sealed (the count: a lower bound of the key's real use),
    warned (the warning was logged).
    """

    __slots__ = ("sealed", "warned")

    def __init__(self, sealed: int = 0) -> None:
        self.sealed = sealed
        self.warned = False


class KeyUsageTable:
    """The KeyUsage of each file ID the daemon opened or created, for its lifetime.

    Bounded: beyond ``max_entries`` file IDs, the half with the fewest
    encryptions is forgotten (their counts restart from the lower bound at
    their next open), so the files rewritten most, the ones the count is for,
    stay.  Used on the trio loop only.
    """

    def __init__(self, max_entries: int = USAGE_TABLE_ENTRIES) -> None:
        if max_entries < 2:
            raise ValueError("a key usage table needs at least 2 entries")
        self.max_entries = max_entries
        self._entries: dict[bytes, KeyUsage] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, file_id: bytes) -> KeyUsage:
        """The count for *file_id*, a new one (0) if the daemon has none."""
        usage = self._entries.get(file_id)
        if usage is None:
            if len(self._entries) >= self.max_entries:
                self._forget_least_used()
            usage = self._entries[file_id] = KeyUsage()
        return usage

    def _forget_least_used(self) -> None:
        ranked = sorted(self._entries.items(), key=lambda item: item[1].sealed)
        for file_id, _ in ranked[: len(ranked) // 2]:
            del self._entries[file_id]


class ContentFile:
    """One open backing file.

    Attributes:
        fd: backing file descriptor, opened read-write (or read-only).
        cipher: the file's block cipher.
        size: plaintext size; authoritative while the file is open.
        describe: returns how log lines and errors name the file (its current path).
        file_id: the header's file ID (b"" if not given), for audit records.
        usage: the count of block encryptions under the file's key, shared by
            the daemon's opens of this file ID (a private one if not given).
        mirror: another ContentFile that every write and truncate is applied to
            as well, once applied here (the daemon's online rekey copies the file
            into it meanwhile: docs/DESIGN.md "Online rekey"), or None.
        mirror_error: why mirroring stopped (the first failure here or there, after
            which ``mirror`` is None and the copy is worthless), or None.
        on_worn: called (from the thread that sealed) once the key's count reaches
            the usage warning, after it is logged (``-o auto_rekey``), or None.
    """

    def __init__(
        self,
        fd: int,
        cipher: BlockCipher,
        size: int,
        describe: Callable[[], str],
        file_id: bytes = b"",
        usage: KeyUsage | None = None,
    ) -> None:
        self.fd = fd
        self.cipher = cipher
        self.file_id = file_id
        self.usage = usage if usage is not None else KeyUsage()
        self.layout = cipher.layout
        self.size = size
        self.describe = describe
        # (index, plaintext) of the final block as last sealed, to re-seal it
        # as a middle block on the next extending write without reading it back.
        self._final: tuple[int, bytes] | None = None
        self.mirror: ContentFile | None = None
        self.mirror_error: BaseException | None = None
        self.on_worn: Callable[[], None] | None = None
        # plaintext bytes written or truncated since the last fsync: how much the next
        # one may have to flush (kmsfs/fs/syncs.py syncs a little on the loop thread)
        self.unsynced = 0

    @property
    def what(self) -> str:
        return self.describe()

    @classmethod
    def open(
        cls,
        fd: int,
        cipher: BlockCipher,
        describe: Callable[[], str],
        file_id: bytes = b"",
        usage: KeyUsage | None = None,
    ) -> ContentFile:
        """Wrap *fd*; IntegrityError if its size cannot belong to a well-formed file.

        *usage* is raised to at least the number of the file's blocks that
        are allocated: each of those was sealed at least once, by whichever
        daemon or tool wrote it.
        """
        st = os.fstat(fd)
        layout = cipher.layout
        try:
            layout.check_backing_size(st.st_size, "")
        except IntegrityError as exc:  # name the file only now: describe() costs a readlink
            raise exc.located(describe()) from None
        size = layout.plain_size(st.st_size)
        content = cls(fd, cipher, size, describe, file_id, usage)
        blocks = layout.final_index(size) + 1
        allocated = st.st_blocks * 512 // layout.backing_block  # holes were never sealed
        content.usage.sealed = max(content.usage.sealed, min(blocks, allocated))
        return content

    def write_empty(self) -> None:
        """Make a just-created backing file a well-formed empty file (one empty final block)."""
        self._seal_at(0, b"", 0)
        self.size = 0
        self._final = (0, b"")

    # -- reading -----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Up to *length* plaintext bytes at *offset*; IntegrityError on a bad block."""
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        bs = self.layout.block_size
        first, last = offset // bs, (end - 1) // bs
        plain = self._read_blocks(first, last)
        start = offset - first * bs
        if start == 0 and len(plain) == end - offset:
            return plain  # aligned (every readahead READ): no copy
        return memoryview(plain)[start : start + end - offset].tobytes()

    def _read_blocks(self, first: int, last: int) -> bytearray:
        """Plaintext of blocks first..last (all must lie inside the file)."""
        bbs = self.layout.backing_block
        pos = first * bbs
        want = min((last + 1) * bbs, self.layout.backing_size(self.size)) - pos
        sealed = os.pread(self.fd, want, pos)
        if len(sealed) != want:
            raise IntegrityError(
                f"backing file is shorter than its size (block {first})", where=self.what
            )
        try:
            return self.cipher.open(first, sealed, self.layout.final_index(self.size), "")
        except IntegrityError as exc:  # name the file only now: describe() costs a readlink
            raise exc.located(self.what) from None

    def _block(self, index: int) -> bytes:
        """Current plaintext of one block inside the file (from the cache if it is final)."""
        if self._final is not None and self._final[0] == index:
            return self._final[1]
        return bytes(self._read_blocks(index, index))

    # -- writing -----------------------------------------------------------

    def _seal_at(self, index: int, plaintext: bytes | bytearray | memoryview, final: int) -> None:
        sealed = self.cipher.seal(index, plaintext, final)
        usage = self.usage
        usage.sealed += max(-(-len(plaintext) // self.layout.block_size), 1)
        if (
            usage.sealed >= WARN_BLOCK_ENCRYPTIONS
            and not usage.warned
            and self.cipher.max_encryptions is not None
        ):
            usage.warned = True
            log.warning(
                "%s: %d block encryptions under one file key (NIST limit 2^32): re-key this file",
                self.what,
                usage.sealed,
            )
            if self.on_worn is not None:
                self.on_worn()
        written = os.pwrite(self.fd, sealed, index * self.layout.backing_block)
        if written != len(sealed):
            raise OSError(28, "short write to backing file")  # ENOSPC is the usual cause

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write *data* at *offset*, growing the file if needed; returns len(data)."""
        self.unsynced += len(data)
        if self.mirror is None:
            return self._write(offset, data)
        self._mirrored(lambda content: content._write(offset, data))
        return len(data)

    def truncate(self, new_size: int) -> None:
        """Set the plaintext size, re-sealing the block that becomes final."""
        self.unsynced += abs(new_size - self.size)
        if self.mirror is None:
            self._truncate(new_size)
        else:
            self._mirrored(lambda content: content._truncate(new_size))

    def _mirrored(self, change: Callable[[ContentFile], object]) -> None:
        """Apply *change* here, then to the mirror; a failure of either ends mirroring
        (``mirror_error``), and one here is raised (the request fails as it would
        have); one of the mirror's is not: the request succeeded."""
        try:
            change(self)
        except BaseException as exc:
            self.mirror, self.mirror_error = None, exc
            raise
        mirror = self.mirror
        if mirror is None:
            return
        try:
            change(mirror)
        except Exception as exc:
            self.mirror, self.mirror_error = None, exc

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        length = len(data)
        if length == 0:
            return 0
        bs = self.layout.block_size
        old_size = self.size
        end = offset + length
        new_size = max(old_size, end)
        old_final = self.layout.final_index(old_size)
        new_final = self.layout.final_index(new_size)
        first, last = offset // bs, (end - 1) // bs

        moved_final = old_final < first  # the old final block becomes a middle block
        if new_size > old_size:
            # Reserve the space first: ENOSPC then fails the write before any block
            # changed, never after a partial final block (docs/FORMAT.md, "Write order").
            # Only the blocks written: a gap between the old final block and the
            # new run stays a hole (sparse files, truncate -s 10G).
            bbs = self.layout.backing_block
            start = first * bbs
            if moved_final and old_final + 1 < first:
                preallocate(self.fd, old_final * bbs, bbs)
            elif moved_final:
                start = old_final * bbs
            preallocate(self.fd, start, self.layout.backing_size(new_size) - start)
        if moved_final:
            old_plain = self._block(old_final) if old_size else b""
            padded = bytes(old_plain) + bytes(bs - len(old_plain))
            if len(old_plain) != bs:
                self._seal_at(old_final, padded, old_final)  # still final, now whole

        run_end = min((last + 1) * bs, new_size)
        head = offset - first * bs
        run: bytes | bytearray | memoryview
        if head == 0 and end == run_end:
            run = data  # whole blocks (or up to the end of the file): sealed as they are
        else:
            run = bytearray(run_end - first * bs)
            partial_first = head or (first == last and end < min(run_end, old_size))
            if partial_first and first <= old_final and first * bs < old_size:
                before = self._block(first)
                run[: len(before)] = before
            if last != first and end < min(run_end, old_size) and last <= old_final:
                after = self._block(last)
                run[(last - first) * bs : (last - first) * bs + len(after)] = after
            run[head : head + length] = data
        self._seal_at(first, run, new_final)

        if moved_final:
            self._seal_at(old_final, padded, new_final)  # now a middle block
        self.size = new_size
        if last == new_final:
            self._final = (last, bytes(run[(last - first) * bs :]))
        elif self._final is not None and self._final[0] != new_final:
            self._final = None
        return length

    def _truncate(self, new_size: int) -> None:
        old_size = self.size
        if new_size == old_size:
            return
        bs = self.layout.block_size
        if new_size > old_size:
            new_final = self.layout.final_index(new_size)
            start = max(old_size, new_final * bs)
            self._write(start, bytes(new_size - start))
            return
        if new_size == 0:
            self._seal_at(0, b"", 0)
            os.ftruncate(self.fd, self.layout.overhead)
            self.size = 0
            self._final = (0, b"")
            return
        new_final = self.layout.final_index(new_size)
        keep = self._block(new_final)[: new_size - new_final * bs]
        self._seal_at(new_final, keep, new_final)
        os.ftruncate(self.fd, self.layout.backing_size(new_size))
        self.size = new_size
        self._final = (new_final, bytes(keep))

    def fsync(self, datasync: bool) -> None:
        self.unsynced = 0
        if datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)
