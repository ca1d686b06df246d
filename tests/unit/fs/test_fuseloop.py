"""The adapter pyfuse3's loop waits with (kmsfs.fs.fuseloop): it returns at once while a
request is queued, waits with trio otherwise, and lets other tasks run regularly."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyfuse3
import pytest
import trio

from kmsfs.fs import fuseloop


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def test_install_swaps_the_trio_pyfuse3_uses_and_uninstall_restores_it() -> None:
    fuseloop.install()
    try:
        adapter = pyfuse3.trio  # type: ignore[attr-defined]
        assert adapter is not trio
        assert adapter.open_nursery is trio.open_nursery  # everything else is trio's
        assert adapter.lowlevel.current_task is trio.lowlevel.current_task
        assert adapter.Lock is not trio.Lock
    finally:
        fuseloop.uninstall()
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]


def test_readable_fd_returns_without_yielding_then_yields_every_so_often(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    os.write(w, b"x")  # "a request is queued" and stays so: nobody reads it
    lowlevel = fuseloop._Trio().lowlevel
    ran_between: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            calls = 0

            async def other() -> None:
                while True:
                    ran_between.append(calls)
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()  # let it start
            ran_between.clear()
            for calls in range(1, 3 * fuseloop.YIELD_EVERY + 1):  # noqa: B007
                await lowlevel.wait_readable(r)
            nursery.cancel_scope.cancel()

    trio.run(main)
    # the other task ran only at the waits that went through trio: every YIELD_EVERY + 1
    assert ran_between, "wait_readable never yielded"
    assert len(ran_between) <= 3
    assert all(n % (fuseloop.YIELD_EVERY + 1) == 0 for n in ran_between), ran_between


def test_empty_fd_waits_until_data_arrives(pipe: tuple[int, int]) -> None:
    r, w = pipe
    lowlevel = fuseloop._Trio().lowlevel
    order: list[str] = []

    async def main() -> None:
        async def writer() -> None:
            await trio.sleep(0.05)
            order.append("write")
            os.write(w, b"x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            with trio.fail_after(5):
                await lowlevel.wait_readable(r)
            order.append("readable")

    trio.run(main)
    assert order == ["write", "readable"]


@pytest.mark.parametrize("seen", ["at once", "after waiting with trio"])
def test_a_connection_the_kernel_ended_is_reported_once(seen: str) -> None:
    """When the file system is unmounted, /dev/fuse polls POLLERR (here: a pipe whose
    writer is gone polls POLLHUP): the adapter calls on_disconnect, once, whether it
    saw it at once or after waiting with trio.  Requests waiting for another daemon's
    lock are told to stop then (pyfuse3's loop ends only once they have)."""
    calls: list[str] = []
    r, w = os.pipe()
    lowlevel = fuseloop._Trio(lambda: calls.append("gone")).lowlevel

    async def hang_up() -> None:
        await trio.sleep(0.05)
        os.close(w)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if seen == "at once":
                os.close(w)
            else:
                nursery.start_soon(hang_up)
            with trio.fail_after(5):
                await lowlevel.wait_readable(r)
                await lowlevel.wait_readable(r)

    try:
        trio.run(main)
    finally:
        os.close(r)
    assert calls == ["gone"]
