"""Key handling in layers, as the AWS Encryption SDK composes its materials managers.

One small interface, ``FileKeys``: a new file key (for a context it chooses),
and the key of a header's entries for a context.  ``MasterKeys`` answers it
with the volume's providers in order; ``CachingKeys`` and ``PrefetchingKeys``
wrap another ``FileKeys`` to add the key cache and the prefetch pool; the
``Recorder`` (kmsfs/keys/events.py) reports every provider call.
``kmsfs.keys.keyring.Keyring`` assembles them for the daemon and the tools.

All calls may block on a provider; callers on the trio loop run them in a
worker thread unless every provider is ``inline``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from kmsfs.errors import ProviderError, WrongKeyError
from kmsfs.format.header import ID_SIZE, WrappedKey
from kmsfs.keys.cache import KeyCache
from kmsfs.keys.events import Recorder
from kmsfs.keys.prefetch import KeyPool
from kmsfs.keys.provider import KeyContext, KeyProvider, wipe

NewFileKey = tuple[KeyContext, bytearray, tuple[WrappedKey, ...]]
# who asked, as audit records name them (path, uid, gid, pid, process, exe); None: nobody
RequesterFields = dict[str, Any] | None


class FileKeys(ABC):
    """A source of file keys for one volume.  Attribute: volume_id."""

    volume_id: bytes

    @abstractmethod
    def new_file(self, requester: RequesterFields = None) -> NewFileKey:
        """(context with a fresh file ID, a fresh file key the caller wipes, its wrapped
        forms: one per master key).  Raises the providers' errors."""

    @abstractmethod
    def unwrap(
        self,
        context: KeyContext,
        entries: Sequence[WrappedKey],
        what: str,
        requester: RequesterFields = None,
    ) -> tuple[bytearray, WrappedKey]:
        """(the file key the caller wipes, the entry it came from).  Raises WrongKeyError
        if no entry is one of this volume's keys', else the last provider error."""

    def close(self) -> None:
        return None


class MasterKeys(FileKeys):
    """The volume's master keys in order: the first generates each file key, the others
    wrap it too; a header is unwrapped by the first provider, in order, that holds an
    entry for it and succeeds.  Attributes: volume_id, providers, recorder."""

    def __init__(self, volume_id: bytes, providers: list[KeyProvider], recorder: Recorder):
        if not providers:
            raise ValueError("a keyring needs at least one provider")
        self.volume_id = volume_id
        self.providers = providers
        self.recorder = recorder

    def new_file(self, requester: RequesterFields = None) -> NewFileKey:
        context = KeyContext(self.volume_id, os.urandom(ID_SIZE))
        first = self.providers[0]
        key, wrapped = self.recorder.call(
            "generate", first, context, first.generate_data_key, context, requester=requester
        )
        return context, key, self.add_wrapped(context, key, wrapped, requester)

    def add_wrapped(
        self, context: KeyContext, key: bytearray, wrapped: WrappedKey, requester: RequesterFields
    ) -> tuple[WrappedKey, ...]:
        """*wrapped* and *key* wrapped by every other master key (the key is wiped on error)."""
        entries = [wrapped]
        try:
            for provider in self.providers[1:]:
                entries.append(
                    self.recorder.call(
                        "wrap", provider, context, provider.wrap, key, context, requester=requester
                    )
                )
        except BaseException:
            wipe(key)
            raise
        return tuple(entries)

    def unwrap(
        self,
        context: KeyContext,
        entries: Sequence[WrappedKey],
        what: str,
        requester: RequesterFields = None,
    ) -> tuple[bytearray, WrappedKey]:
        errors: list[ProviderError] = []
        for provider in self.providers:
            for entry in entries:
                if not provider.accepts(entry):
                    continue
                try:
                    key: bytearray = self.recorder.call(
                        "unwrap", provider, context, provider.unwrap, entry, context,
                        requester=requester,
                    )  # fmt: skip
                except ProviderError as exc:
                    errors.append(exc)
                    continue
                return key, entry
        if errors:
            last = errors[-1]
            raise type(last)(str(last), code=last.code, where=what)
        have = ", ".join(f"{e.provider} {e.key_ref}" for e in entries)
        want = ", ".join(p.describe() for p in self.providers)
        raise WrongKeyError(f"file key is wrapped by {have}; this volume has {want}", where=what)

    def close(self) -> None:
        for provider in self.providers:
            provider.close()


class CachingKeys(FileKeys):
    """Another FileKeys behind a key cache keyed by (context, entry): a blob copied into a
    header with another file ID misses, and the provider refuses it.  Cache hits are
    reported as "cache-hit" events."""

    def __init__(self, inner: FileKeys, cache: KeyCache, recorder: Recorder) -> None:
        self.inner = inner
        self.volume_id = inner.volume_id
        self.cache = cache
        self.recorder = recorder

    def new_file(self, requester: RequesterFields = None) -> NewFileKey:
        context, key, entries = self.inner.new_file(requester)
        self.cache.put(context, entries[0], key)
        return context, key, entries

    def unwrap(
        self,
        context: KeyContext,
        entries: Sequence[WrappedKey],
        what: str,
        requester: RequesterFields = None,
    ) -> tuple[bytearray, WrappedKey]:
        for entry in entries:
            cached = self.cache.get(context, entry)
            if cached is not None:
                self.recorder.emit(
                    "cache-hit", entry.provider, entry.key_ref, context, requester=requester
                )
                return cached, entry
        key, entry = self.inner.unwrap(context, entries, what, requester)
        self.cache.put(context, entry, key)
        return key, entry

    def close(self) -> None:
        self.cache.clear()
        self.inner.close()


class PrefetchingKeys(FileKeys):
    """MasterKeys whose first provider's data keys are generated ahead of need by a
    KeyPool (started by the first ``new_file``), so creates skip a KMS round trip."""

    def __init__(self, inner: MasterKeys) -> None:
        self.inner = inner
        self.volume_id = inner.volume_id
        first = inner.providers[0]
        recorder = inner.recorder
        self.pool = KeyPool(
            inner.volume_id,
            lambda ctx: recorder.call("prefetch", first, ctx, first.generate_data_key, ctx),
            on_discard=lambda ctx: recorder.emit("discard", first.name, first.key_ref, ctx),
        )

    def new_file(self, requester: RequesterFields = None) -> NewFileKey:
        pooled = self.pool.take()
        if pooled is None:
            self.pool.start()
            return self.inner.new_file(requester)
        first = self.inner.providers[0]
        context = pooled.context
        self.inner.recorder.emit("assign", first.name, first.key_ref, context, requester=requester)
        entries = self.inner.add_wrapped(context, pooled.key, pooled.wrapped, requester)
        return context, pooled.key, entries

    def unwrap(
        self,
        context: KeyContext,
        entries: Sequence[WrappedKey],
        what: str,
        requester: RequesterFields = None,
    ) -> tuple[bytearray, WrappedKey]:
        return self.inner.unwrap(context, entries, what, requester)

    def close(self) -> None:
        self.pool.close()
        self.inner.close()
