"""The online rekey of one file, driven in-process against the operations layer (as
test_operations.py does): the copy mirrored under the inode lock, the switch, and what
open handles, waiting requests, renames, links and failures see around it
(docs/DESIGN.md "Online rekey").  Everything is real but the kernel: backing files,
headers, keys, ciphers; the request context is a plain object.

The rekey's ``before_chunk`` hook runs between two chunks of the copy, when the inode
lock is free: that is where these tests put the application's requests, so each
interleaving is exact, not a matter of timing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing
from support.lifecycle_support import header_of, write_file
from support.operations import CTX, ROOT, create, fields, read_all

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.tree import Tree, open_state_dir
from kmsfs.format.header import FORMAT_1, FORMAT_2, FileHeader
from kmsfs.fs.operations import KmsfsOperations
from kmsfs.fs.rekey_online import NotDue, OnlineRekey, RekeyAbandoned, Skipped

BS = 4096
CHUNK = 4 * BS  # the copy holds the inode lock for four blocks at a time


@pytest.fixture
def engine(ops: KmsfsOperations) -> Iterator[OnlineRekey]:
    tree = Tree.at(ops.inodes.root_fd, ops.backing)
    state = open_state_dir(tree.fd, create=True)
    assert state is not None
    try:
        yield OnlineRekey(ops, tree, state, chunk=CHUNK)
    finally:
        os.close(state)
        tree.close()


def any_file(header: FileHeader, content: ContentFile) -> str | None:
    return None


async def rekey(
    engine: OnlineRekey,
    name: str,
    between: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    """Re-key *name*; *between(n)* runs before the copy's n-th chunk (from 1)."""
    calls = [0]

    async def before_chunk(size: int) -> None:
        calls[0] += 1
        if between is not None:
            await between(calls[0])

    st = os.stat(Path(engine.ops.backing, name), follow_symlinks=False)
    return await engine.rekey(name, st, any_file, before_chunk)


def leftovers(ops: KmsfsOperations) -> list[str]:
    return [n for n in os.listdir(Path(ops.backing, ".kmsfs.d")) if n.startswith("rekey")]


def patch(model: bytearray, offset: int, data: bytes) -> None:
    if len(model) < offset:
        model.extend(bytes(offset - len(model)))
    model[offset : offset + len(data)] = data


def test_open_handle_keeps_working_across_the_switch(
    ops: KmsfsOperations, engine: OnlineRekey
) -> None:
    """Writes before, during (inside the part already copied, beyond it, and past the
    end) and after the copy all land in the file that survives; the handle opened
    before reads the new file; the kernel's inode number does not change."""
    path = Path(ops.backing, "f")
    model = bytearray(os.urandom(10 * BS + 123))

    async def main() -> None:
        ino = await create(ops, b"f", bytes(model))
        before = header_of(path)
        fh = (await ops.open(ino, os.O_RDWR, CTX)).fh

        async def between(n: int) -> None:
            changes = {
                2: (5, b"inside the copied part"),
                3: (9 * BS, b"ahead of the copy"),
                4: (len(model) + 3 * BS, b"past the end: a hole before it"),
            }
            if n in changes:
                offset, data = changes[n]
                assert await ops.write(fh, offset, data) == len(data)
                patch(model, offset, data)
            if n == 5:
                attr = pyfuse3.EntryAttributes()
                attr.st_size = len(model) - 700
                await ops.setattr(ino, attr, fields(size=True), fh, CTX)
                del model[attr.st_size :]

        copied = await rekey(engine, "f", between)
        assert copied >= 10 * BS
        assert await ops.write(fh, 1, b"after") == 5
        patch(model, 1, b"after")
        assert bytes(await ops.read(fh, 0, len(model) + 10)) == bytes(model)
        after = header_of(path)
        assert after.file_id != before.file_id and after.version == FORMAT_2
        assert (await ops.getattr(ino, CTX)).st_ino == ino
        assert (await ops.lookup(ROOT, b"f", CTX)).st_ino == ino
        assert os.stat(path).st_ino != ino  # a new backing inode, under the old number
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o1644
        await ops.release(fh)
        await ops.forget([(ino, 2)])  # create and lookup: the kernel forgets it
        assert ops.inodes.retired == 0
        attr = await ops.lookup(ROOT, b"f", CTX)
        assert attr.st_ino == os.stat(path).st_ino  # its own number from now on
        assert await read_all(ops, attr.st_ino) == bytes(model)

    trio.run(main)
    assert leftovers(ops) == []


def test_a_request_waiting_for_the_lock_during_the_switch_uses_the_new_file(
    ops: KmsfsOperations, engine: OnlineRekey
) -> None:
    """A large write queued behind the switch (it waits for the inode lock) must reach
    the new backing file.  Without re-reading the entry's content once it has the lock,
    it was written to the old inode, switched out and freed: the write was lost."""
    data = os.urandom(ops.contents.offload_bytes + BS)  # large: it takes the lock, never inline

    class Probe(OnlineRekey):
        async def _switch(
            self, entry: Any, old: Any, new: Any, old_header: Any, header: Any
        ) -> None:
            self.nursery.start_soon(ops.write, self.fh, 0, data)
            await trio.testing.wait_all_tasks_blocked()  # it waits for our lock now
            await super()._switch(entry, old, new, old_header, header)

    probe = Probe(ops, engine.tree, engine.state_fd, chunk=CHUNK)

    async def main() -> None:
        ino = await create(ops, b"f", os.urandom(3 * BS))
        probe.fh = (await ops.open(ino, os.O_RDWR, CTX)).fh  # type: ignore[attr-defined]
        async with trio.open_nursery() as nursery:
            probe.nursery = nursery  # type: ignore[attr-defined]
            await rekey(probe, "f")
        await ops.release(probe.fh)  # type: ignore[attr-defined]
        await ops.forget([(ino, 1)])
        attr = await ops.lookup(ROOT, b"f", CTX)
        assert await read_all(ops, attr.st_ino) == data

    trio.run(main)


def test_a_rename_during_the_copy_is_followed(ops: KmsfsOperations, engine: OnlineRekey) -> None:
    data = os.urandom(6 * BS)

    async def main() -> None:
        ino = await create(ops, b"f", data)
        sub = (await ops.mkdir(ROOT, b"sub", 0o755, CTX)).st_ino

        async def between(n: int) -> None:
            if n == 2:
                await ops.rename(ROOT, b"f", sub, b"g", 0, CTX)

        before = header_of(Path(ops.backing, "f"))
        await rekey(engine, "f", between)
        moved = Path(ops.backing, "sub/g")
        assert header_of(moved).file_id != before.file_id
        assert "f" not in os.listdir(ops.backing)
        assert await read_all(ops, ino) == data

    trio.run(main)


@pytest.mark.parametrize("change", ["link", "unlink", "replace"])
def test_a_file_linked_or_removed_during_the_copy_is_left_as_it_is(
    ops: KmsfsOperations, engine: OnlineRekey, change: str
) -> None:
    """A second name made during the copy would keep the old inode (whose blocks the
    switch frees); a file unlinked or renamed over has no name to switch.  Either way
    nothing is switched, and the file reads as before."""
    data = os.urandom(6 * BS)
    path = Path(ops.backing, "f")

    async def main() -> None:
        ino = await create(ops, b"f", data)
        before = header_of(path)
        fh = (await ops.open(ino, os.O_RDWR, CTX)).fh
        await create(ops, b"other", b"other")

        async def between(n: int) -> None:
            if n == 2 and change == "link":
                await ops.link(ino, ROOT, b"second", CTX)
            elif n == 2 and change == "unlink":
                await ops.unlink(ROOT, b"f", CTX)
            elif n == 2:
                await ops.rename(ROOT, b"other", ROOT, b"f", 0, CTX)

        with pytest.raises(Skipped):
            await rekey(engine, "f", between)
        assert bytes(await ops.read(fh, 0, len(data))) == data
        assert await ops.write(fh, 0, b"still writable") == 14
        entry = ops.inodes.get(ino)
        assert entry is not None and entry.content is not None and entry.content.mirror is None
        await ops.release(fh)
        if change == "link":
            assert header_of(path).file_id == before.file_id

    trio.run(main)
    assert leftovers(ops) == []


def test_hard_linked_files_are_skipped(ops: KmsfsOperations, engine: OnlineRekey) -> None:
    async def main() -> None:
        ino = await create(ops, b"f", b"linked")
        await ops.link(ino, ROOT, b"g", CTX)
        with pytest.raises(Skipped, match="2 hard links"):
            await rekey(engine, "f")

    trio.run(main)


def test_a_failed_mirrored_write_abandons_the_rekey_not_the_write(
    ops: KmsfsOperations, engine: OnlineRekey
) -> None:
    data = bytearray(os.urandom(8 * BS))
    path = Path(ops.backing, "f")

    async def main() -> None:
        ino = await create(ops, b"f", bytes(data))
        before = header_of(path)
        fh = (await ops.open(ino, os.O_RDWR, CTX)).fh

        async def between(n: int) -> None:
            if n == 2:
                entry = ops.inodes.get(ino)
                assert entry is not None and entry.content is not None
                mirror = entry.content.mirror
                assert mirror is not None

                def full(*args: Any) -> int:
                    raise OSError(errno.ENOSPC, "no space left for the new file")

                mirror._write = full  # type: ignore[method-assign]
                assert await ops.write(fh, 100, b"kept") == 4  # the application's succeeds
                patch(data, 100, b"kept")

        with pytest.raises(RekeyAbandoned, match="no space left"):
            await rekey(engine, "f", between)
        assert header_of(path).file_id == before.file_id
        assert bytes(await ops.read(fh, 0, len(data))) == bytes(data)
        await ops.release(fh)

    trio.run(main)
    assert leftovers(ops) == []


def test_cancelled_mid_copy_leaves_the_file_as_it_was(
    ops: KmsfsOperations, engine: OnlineRekey
) -> None:
    data = os.urandom(8 * BS)
    path = Path(ops.backing, "f")

    async def main() -> None:
        ino = await create(ops, b"f", data)
        before = header_of(path)
        with trio.CancelScope() as scope:

            async def between(n: int) -> None:
                if n == 2:
                    scope.cancel()

            await rekey(engine, "f", between)
        assert header_of(path).file_id == before.file_id
        entry = ops.inodes.get(ino)
        assert entry is not None and entry.opens == 0 and entry.content is None
        assert await read_all(ops, ino) == data

    trio.run(main)
    assert leftovers(ops) == []


def test_a_file_the_kernel_does_not_know_leaves_no_entry(
    ops: KmsfsOperations, engine: OnlineRekey
) -> None:
    """A format-1 file made offline, never looked up: re-keyed into format 2, and the
    entry held for it is closed again (no alias, no descriptor kept)."""
    path = Path(ops.backing, "old")
    data = os.urandom(5 * BS + 7)
    write_file(path, ops.config, ops.keyring, data, FORMAT_1)
    entries = len(ops.inodes)

    async def main() -> None:
        await rekey(engine, "old")
        assert len(ops.inodes) == entries and ops.inodes.retired == 0
        attr = await ops.lookup(ROOT, b"old", CTX)
        assert attr.st_ino == os.stat(path).st_ino and attr.st_size == len(data)
        assert await read_all(ops, attr.st_ino) == data

    trio.run(main)
    assert header_of(path).version == FORMAT_2
    assert os.stat(path).st_mode & stat.S_ISVTX


def test_not_wanted_after_all(ops: KmsfsOperations, engine: OnlineRekey) -> None:
    async def main() -> None:
        await create(ops, b"f", b"x")
        st = os.stat(Path(ops.backing, "f"))

        async def pace(size: int) -> None:
            return None

        with pytest.raises(NotDue, match="not this one"):
            await engine.rekey("f", st, lambda header, content: "not this one", pace)

    trio.run(main)
    assert leftovers(ops) == []


def test_auto_rekey_moves_a_worn_format_1_file_to_format_2(
    ops: KmsfsOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``-o auto_rekey`` the usage warning of a format-1 key (lowered here from 2^31
    block encryptions to 8) queues the file, which is re-keyed while it stays open (the
    service looks at its queue every 50 ms here instead of every second)."""
    from kmsfs.backing import content_file
    from kmsfs.server import rekey_job
    from kmsfs.server.rekey_job import RekeyService

    monkeypatch.setattr(content_file, "WARN_BLOCK_ENCRYPTIONS", 8)
    monkeypatch.setattr(rekey_job, "AUTO_POLL", 0.05)
    path = Path(ops.backing, "worn")
    write_file(path, ops.config, ops.keyring, b"a" * BS, FORMAT_1)
    service = RekeyService(auto=True)
    model = bytearray(b"a" * BS)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run, ops)
            await trio.testing.wait_all_tasks_blocked()
            attr = await ops.lookup(ROOT, b"worn", CTX)
            fh = (await ops.open(attr.st_ino, os.O_RDWR, CTX)).fh
            for n in range(10):
                data = os.urandom(BS)
                await ops.write(fh, n * BS, data)
                patch(model, n * BS, data)
            assert header_of(path).version == FORMAT_1
            with trio.fail_after(20):
                for _ in iter(lambda: service.auto_done, 1):
                    await trio.sleep(0.05)
            assert header_of(path).version == FORMAT_2
            assert bytes(await ops.read(fh, 0, len(model))) == bytes(model)
            assert service.status() == {"auto_rekey": {"queued": 0, "done": 1, "failed": 0}}
            await ops.release(fh)
            nursery.cancel_scope.cancel()

    trio.run(main)
