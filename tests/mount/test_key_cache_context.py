"""The key cache answers only the question a provider answered: (context, wrapped key).

The attack: whoever can write the backing directory copies file A's wrapped
key into a header that names another file ID.  The provider would refuse that
blob for that file ID (the ID is in the KMS encryption context / the AEAD's
AAD); the cache, keyed by the blob alone, used to hand out A's key anyway, so
the forged file opened (and could be written) under A's key while A's key was
cached.  It must fail exactly as with a cold cache.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from support.fuse import requires_fuse
from support.volumes import Volume

from kmsfs.errors import WrongKeyError
from kmsfs.format.header import XATTR_NAME, FileHeader, WrappedKey
from kmsfs.keys.cache import KeyCache
from kmsfs.keys.events import KeyEvent
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.local import LocalProvider
from kmsfs.keys.provider import KeyContext, wipe

VOLUME = bytes(range(16))


def forge(header: FileHeader) -> FileHeader:
    """*header* with a new file ID and the same wrapped keys (what the attacker writes)."""
    return FileHeader(header.volume_id, os.urandom(16), header.block_size, header.entries)


@pytest.mark.nomount
def test_cached_key_is_not_given_to_a_header_with_another_file_id() -> None:
    events: list[KeyEvent] = []
    ring = Keyring(VOLUME, [LocalProvider(os.urandom(32), {})], KeyCache(), events.append)
    file_id, key, entries = ring.new_file()  # cached, as every key of a file created here
    header = FileHeader(VOLUME, file_id, 4096, entries)
    again = ring.unwrap(header, "a")
    assert again == key and events[-1].operation == "cache-hit"

    with pytest.raises(WrongKeyError, match="cannot unwrap"):
        ring.unwrap(forge(header), "forged")
    assert events[-1].operation == "unwrap" and events[-1].result == "WrongKeyError"
    assert events[-1].file_id != file_id.hex()
    for buffer in (key, again):
        wipe(buffer)


@pytest.mark.nomount
def test_cache_entry_is_keyed_by_context_and_wrapped_key() -> None:
    cache = KeyCache()
    wrapped = WrappedKey("local", "local:00", b"blob")
    a, b = KeyContext(VOLUME, bytes(16)), KeyContext(VOLUME, bytes(15) + b"\x01")
    cache.put(a, wrapped, bytes(range(32)))
    assert cache.get(b, wrapped) is None  # same blob, other file ID
    assert cache.get(a, WrappedKey("local", "local:01", b"blob")) is None  # other master key
    copy = cache.get(a, wrapped)
    assert isinstance(copy, bytearray) and copy == bytes(range(32))
    wipe(copy)  # the caller's copy: wiping it leaves the cached key intact
    assert cache.get(a, wrapped) == bytes(range(32))


@requires_fuse
@pytest.mark.mount
def test_forged_header_with_a_cached_blob_fails_like_a_cold_cache(mounted: Volume) -> None:
    data = os.urandom(10_000)
    mounted.path("a").write_bytes(data)
    assert mounted.path("a").read_bytes() == data  # a's key is in the daemon's cache
    a_backing = mounted.backing_path("a")
    header = FileHeader.parse(os.getxattr(a_backing, XATTR_NAME))

    def plant(name: str) -> Path:
        target = mounted.backing_path(name)
        target.write_bytes(a_backing.read_bytes())
        os.setxattr(target, XATTR_NAME, forge(header).pack())
        return target

    plant("forged")
    # Opening reads no block: only the key check can refuse it (the old cache let it
    # open, and writes would then have been sealed under a's key for the forged ID).
    with pytest.raises(OSError) as info:
        open(mounted.path("forged"), "r+b").close()
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError) as info:
        mounted.path("forged").read_bytes()
    assert info.value.errno == errno.EIO
    log = mounted.log_text()
    assert "/forged: local key" in log and "cannot unwrap this key" in log
    assert mounted.path("a").read_bytes() == data

    mounted.remount()  # cold cache: the same answer
    plant("forged2")
    with pytest.raises(OSError) as info:
        open(mounted.path("forged2"), "r+b").close()
    assert info.value.errno == errno.EIO
