"""The adapter pyfuse3's loop waits with (kmsfs.fs.fuseloop): it returns at once while a
request is queued, waits with trio otherwise, and lets other tasks run regularly; and
how kmsfs chooses between it and a patched pyfuse3's own loop, and reports which."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

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


@pytest.mark.parametrize("poll_first", [True, False], ids=["adapter", "watch only"])
@pytest.mark.parametrize("seen", ["at once", "after waiting with trio"])
def test_a_connection_the_kernel_ended_is_reported_once(seen: str, poll_first: bool) -> None:
    """When the file system is unmounted, /dev/fuse polls POLLERR (here: a pipe whose
    writer is gone polls POLLHUP): the adapter calls on_disconnect, once, whether it
    saw it at once or after waiting with trio, and so does the watch-only adapter that
    the patched loop (which reads before it waits) gets.  Requests waiting for another
    daemon's lock are told to stop then (pyfuse3's loop ends only once they have)."""
    calls: list[str] = []
    r, w = os.pipe()
    lowlevel = fuseloop._Trio(lambda: calls.append("gone"), poll_first).lowlevel

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


def test_configure_uses_the_patched_loop_where_pyfuse3_has_it() -> None:
    ops = pyfuse3.Operations()
    try:
        how = fuseloop.configure(ops)
        if fuseloop.PYFUSE3.read_before_wait:
            assert how == "read_before_wait"
            assert ops.enable_read_before_wait is True
            if fuseloop.spin_ns_here():  # the adapter watches and spins, nothing more
                assert pyfuse3.trio.lowlevel.spin_ns == fuseloop.SPIN_NS  # type: ignore[attr-defined]
                assert not pyfuse3.trio.lowlevel._poll_first  # type: ignore[attr-defined]
            else:
                assert pyfuse3.trio is trio  # type: ignore[attr-defined]
        else:
            assert how == "adapter"
            assert pyfuse3.trio is not trio  # type: ignore[attr-defined]
            assert pyfuse3.trio.lowlevel.spin_ns == fuseloop.spin_ns_here()  # type: ignore[attr-defined]
    finally:
        fuseloop.uninstall()


def test_configure_watches_for_the_disconnect_with_either_loop() -> None:
    """The daemon's on_disconnect (ending lock waits at unmount) reaches whichever loop
    serves: with the patched one, an adapter that only watches (trio's Lock; its
    wait_readable yields to trio even when the descriptor is readable)."""
    ops = pyfuse3.Operations()
    try:
        how = fuseloop.configure(ops, on_disconnect=lambda: None)
        adapter = pyfuse3.trio  # type: ignore[attr-defined]
        assert adapter is not trio
        assert adapter.lowlevel._on_disconnect is not None
        if how == "read_before_wait":
            assert ops.enable_read_before_wait is True
            assert adapter.Lock is trio.Lock and not adapter.lowlevel._poll_first
        else:
            assert adapter.Lock is not trio.Lock and adapter.lowlevel._poll_first
    finally:
        fuseloop.uninstall()


def test_the_watch_only_adapter_waits_with_trio_every_time(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The patched loop reads before it waits: its adapter does not poll first (as the
    polling one does, which needs no trio wait while the descriptor is readable)."""
    r, w = pipe
    os.write(w, b"x")  # readable, and stays so
    waits: list[int] = []
    real = trio.lowlevel.wait_readable

    async def counted(fd: int) -> None:
        waits.append(fd)
        await real(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)
    for poll_first, trio_waits in ((True, 0), (False, 5)):
        lowlevel = fuseloop._Trio(lambda: None, poll_first).lowlevel
        waits.clear()

        async def main(lowlevel: Any = lowlevel) -> None:
            for _ in range(5):
                await lowlevel.wait_readable(r)

        trio.run(main)
        assert len(waits) == trio_waits, poll_first


def test_status_names_the_hooks_in_use_and_why_one_is_off() -> None:
    patched = fuseloop.PYFUSE3.patched
    plain = SimpleNamespace(
        enable_read_before_wait=patched,
        enable_dont_mask=patched,
        content_access=SimpleNamespace(cache_listings=patched, shared=False),
        access_control=SimpleNamespace(timeout=60.0),
    )
    info = fuseloop.status(plain)
    assert info["version"] == pyfuse3.__version__ and info["patched"] is patched
    if not patched:
        assert info == {**info, "active": [], "off": {}, "loop": "adapter"}
        return
    assert info["active"] == ["read_before_wait", "dont_mask", "cache_dir"]
    assert info["loop"] == "read_before_wait"
    access = SimpleNamespace(cache_listings=False, shared=True)
    shared = SimpleNamespace(**{**vars(plain), "content_access": access})
    assert fuseloop.status(shared)["off"] == {"cache_dir": "shared mode"}
    varying = SimpleNamespace(**{**vars(plain), "access_control": SimpleNamespace(timeout=0.0)})
    assert "cache_dir" not in fuseloop.status(varying)["active"]
    assert "access policy" in fuseloop.status(varying)["off"]["cache_dir"]


@pytest.mark.parametrize("poll_first", [True, False], ids=["adapter", "watch only"])
def test_request_queued_says_whether_the_fd_the_loop_waits_for_has_data(
    pipe: tuple[int, int], poll_first: bool
) -> None:
    """The sync path runs a sync on the loop only when no request waits unread: it asks
    ``request_queued``, which polls the fd the loop waits for, and says True while that
    fd is unknown (no adapter, or the loop has not waited yet)."""
    r, w = pipe
    assert fuseloop.request_queued() is True  # no adapter installed
    fuseloop.install(lambda: None, poll_first)
    try:
        assert fuseloop.request_queued() is True  # the loop has not waited yet
        os.write(w, b"x")

        async def main() -> None:
            await pyfuse3.trio.lowlevel.wait_readable(r)  # type: ignore[attr-defined]

        trio.run(main)
        assert fuseloop.request_queued() is True
        os.read(r, 1)
        assert fuseloop.request_queued() is False
    finally:
        fuseloop.uninstall()
    assert fuseloop.request_queued() is True


class CountedWaits:
    """trio's wait_readable, counted: the waits that parked the loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = trio.lowlevel.wait_readable

        async def counted(fd: int) -> None:
            self.count += 1
            await real(fd)

        monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)


@pytest.mark.parametrize("poll_first", [True, False], ids=["adapter", "watch only"])
def test_a_request_that_comes_while_the_loop_spins_is_taken_without_parking(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch, poll_first: bool
) -> None:
    """The next request of a caller that sends one after another comes a few µs after
    the answer: the loop, still asking, takes it without parking (waking a parked
    daemon's idle CPU costs more than the spin).  Here the request comes 20 ms into
    a 5 s spin, from another thread."""
    r, w = pipe
    waits = CountedWaits(monkeypatch)
    lowlevel = fuseloop._Trio(None, poll_first, spin_ns=5_000_000_000).lowlevel

    async def main() -> None:
        timer = threading.Timer(0.02, os.write, (w, b"x"))
        timer.start()
        with trio.fail_after(10):
            await lowlevel.wait_readable(r)
        timer.join()

    trio.run(main)
    assert waits.count == 0


def test_spins_that_find_nothing_make_the_loop_park_at_once_more_and_more(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle daemon, or one whose caller shares its CPU, spins in vain: after such a
    spin the next 1, then 2, 4 … waits park without spinning, and a spin that finds a
    request ends that.  (Spinning is seen by the number of polls.)"""
    r, w = pipe
    lowlevel = fuseloop._Trio(None, True, spin_ns=1_000_000).lowlevel  # 1 ms
    polls: list[int] = []

    class CountingPoll:
        def __init__(self, poll: Any) -> None:
            self.inner = poll

        def poll(self, timeout: int) -> Any:
            polls.append(timeout)
            return self.inner.poll(timeout)

    async def wait_with_data_soon() -> None:
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                await trio.sleep(0.01)
                os.write(w, b"x")

            nursery.start_soon(write)
            await lowlevel.wait_readable(r)
        os.read(r, 1)

    spun: list[bool] = []

    async def main() -> None:
        await wait_with_data_soon()  # registers the fd; spins in vain (data after 10 ms)
        lowlevel._polls[r] = CountingPoll(lowlevel._polls[r])  # type: ignore[assignment]
        for _ in range(8):
            polls.clear()
            await wait_with_data_soon()
            spun.append(len(polls) > 2)

    trio.run(main)
    # waits after the first fruitless spin: 1 parked at once, spin (vain), 2 at once,
    # spin (vain), 4 at once ...
    assert spun == [False, True, False, False, True, False, False, False]
    # a spin that finds a request ends the backing off: the next fruitless spin is
    # followed by one park at once again
    lowlevel._skip, lowlevel.spin_ns = 0, 5_000_000_000
    timer = threading.Timer(0.02, os.write, (w, b"x"))
    timer.start()
    trio.run(lowlevel.wait_readable, r)
    timer.join()
    os.read(r, 1)
    assert (lowlevel._backoff, lowlevel._skip) == (1, 0)
