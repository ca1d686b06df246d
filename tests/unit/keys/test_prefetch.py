"""The prefetch pool of data keys and its use by the keyring (in-process, local keys)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from kmsfs.errors import KeyUnavailable
from kmsfs.format.header import WrappedKey
from kmsfs.keys.events import KeyEvent
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.local import LocalProvider
from kmsfs.keys.prefetch import KeyPool
from kmsfs.keys.provider import KeyContext

VOLUME = bytes(range(16))


class RemoteLocal(LocalProvider):
    """The local provider flagged as remote, so the keyring gives it a pool."""

    inline = False


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_each_pooled_key_is_fresh_bound_to_its_file_and_used_once() -> None:
    provider = LocalProvider(os.urandom(32), {})
    discarded: list[KeyContext] = []
    pool = KeyPool(VOLUME, provider.generate_data_key, size=8, on_discard=discarded.append)
    pool.start()
    wait_until(lambda: len(pool) >= 4)
    taken = [pool.take() for _ in range(4)]
    assert all(p is not None for p in taken)
    keys = {bytes(p.key) for p in taken if p}
    file_ids = {p.context.file_id for p in taken if p}
    assert len(keys) == len(file_ids) == 4
    for pooled in taken:
        assert pooled is not None and pooled.context.volume_id == VOLUME
        assert provider.unwrap(pooled.wrapped, pooled.context) == pooled.key
    wait_until(lambda: len(pool) >= 1)
    left = list(pool._ready)
    pool.close()
    assert len(pool) == 0 and pool.take() is None
    assert all(p.key == bytearray(32) for p in left)  # wiped
    assert pool.generated == pool.taken + pool.discarded
    assert {c.file_id for c in discarded}.isdisjoint(file_ids)


def test_concurrency_is_bounded_and_failures_back_off() -> None:
    active = 0
    most = 0
    calls = 0
    lock = threading.Lock()

    def failing(context: KeyContext) -> tuple[bytearray, WrappedKey]:
        nonlocal active, most, calls
        with lock:
            active += 1
            calls += 1
            most = max(most, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        raise KeyUnavailable("endpoint down")

    pool = KeyPool(VOLUME, failing, size=64, workers=3)
    pool.start()
    time.sleep(0.5)
    assert pool.take() is None  # never blocks, never raises
    pool.close()
    assert most <= 3
    assert calls < 40  # 3 workers backing off, not spinning (unbounded would be ~75)


def test_keyring_uses_pool_for_remote_provider_and_reports_every_key() -> None:
    events: list[KeyEvent] = []
    lock = threading.Lock()

    def sink(event: KeyEvent) -> None:
        with lock:
            events.append(event)

    keyring = Keyring(VOLUME, [RemoteLocal(os.urandom(32), {})], on_event=sink)
    assert keyring.pool is not None
    first = keyring.new_file({"uid": 1})
    wait_until(lambda: keyring.pool is not None and len(keyring.pool) >= 2)
    created = [first] + [keyring.new_file({"uid": 1}) for _ in range(10)]
    assert len({file_id for file_id, _, _ in created}) == 11
    keyring.close()
    ops = [e.operation for e in events]
    # The first create starts the pool and generates its own key directly.
    assert [op for op in ops if op in ("generate", "assign")][0] == "generate"
    assert ops.count("generate") + ops.count("assign") == 11
    assert ops.count("prefetch") == ops.count("assign") + ops.count("discard")
    assigned = {e.file_id for e in events if e.operation == "assign"}
    assert assigned <= {file_id.hex() for file_id, _, _ in created}


def test_inline_provider_has_no_pool() -> None:
    keyring = Keyring(VOLUME, [LocalProvider(os.urandom(32), {})])
    assert keyring.pool is None
    keyring.close()
