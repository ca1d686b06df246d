"""The adapter pyfuse3's loop waits with (kmsfs.fs.fuseloop): it returns at once while a
request is queued, waits with trio otherwise, and lets other tasks run regularly; and
how kmsfs chooses between it and a patched pyfuse3's own loop, and reports which."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace

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


def test_configure_uses_the_patched_loop_where_pyfuse3_has_it() -> None:
    ops = pyfuse3.Operations()
    try:
        how = fuseloop.configure(ops)
        if fuseloop.PYFUSE3.read_before_wait:
            assert how == "read_before_wait"
            assert ops.enable_read_before_wait is True
            assert pyfuse3.trio is trio  # type: ignore[attr-defined]
        else:
            assert how == "adapter"
            assert pyfuse3.trio is not trio  # type: ignore[attr-defined]
    finally:
        fuseloop.uninstall()


def test_status_names_the_hooks_in_use_and_why_one_is_off() -> None:
    patched = fuseloop.PYFUSE3.patched
    plain = SimpleNamespace(
        enable_read_before_wait=patched,
        enable_dont_mask=patched,
        cache_listings=patched,
        timeout=60.0,
        shared=False,
    )
    info = fuseloop.status(plain)
    assert info["version"] == pyfuse3.__version__ and info["patched"] is patched
    if not patched:
        assert info == {**info, "active": [], "off": {}, "loop": "adapter"}
        return
    assert info["active"] == ["read_before_wait", "dont_mask", "cache_dir"]
    assert info["loop"] == "read_before_wait"
    shared = SimpleNamespace(**{**vars(plain), "cache_listings": False, "shared": True})
    assert fuseloop.status(shared)["off"] == {"cache_dir": "shared mode"}
    varying = SimpleNamespace(**{**vars(plain), "timeout": 0.0})
    assert "cache_dir" not in fuseloop.status(varying)["active"]
    assert "access policy" in fuseloop.status(varying)["off"]["cache_dir"]
