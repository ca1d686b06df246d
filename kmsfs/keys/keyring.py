"""The keyring: the volume's key layers assembled, as the daemon and the tools use them.

``Keyring`` = CachingKeys(PrefetchingKeys(MasterKeys)) (kmsfs/keys/layers.py),
the prefetching layer only when the first provider is not inline (a KMS or an
HSM), with every provider call reported through one ``Recorder``
(kmsfs/keys/events.py).  It checks that a header is this volume's before
any layer sees it, and turns headers into ciphers (``cipher_for``,
``new_file_cipher``), so no caller handles a file key itself.

All methods may block on a provider; callers on the trio loop run them in a
worker thread unless ``inline`` is True.
"""

from __future__ import annotations

from typing import Any

from kmsfs.errors import KmsfsError, WrongKeyError
from kmsfs.format.content import BlockCipher
from kmsfs.format.header import NEW_FILE_FORMAT, FileHeader, WrappedKey
from kmsfs.format.volume_config import KeyConfig
from kmsfs.keys.cache import KeyCache
from kmsfs.keys.events import EventSink, Recorder
from kmsfs.keys.layers import CachingKeys, FileKeys, MasterKeys, PrefetchingKeys
from kmsfs.keys.prefetch import KeyPool
from kmsfs.keys.provider import KeyContext, KeyProvider, wipe


class Keyring:
    """Attributes: volume_id, providers (in order), cache, inline, pool (the prefetch
    KeyPool or None), recorder (reports to the *on_event* sink given at construction:
    the audit log, the status counters), volume_key.

    ``volume_key`` is the volume key every key-check value wraps (None for a
    format-1 volume not migrated): tools need it to re-tag the volume config.
    """

    def __init__(
        self,
        volume_id: bytes,
        providers: list[KeyProvider],
        cache: KeyCache | None = None,
        on_event: EventSink | None = None,
    ) -> None:
        self.volume_id = volume_id
        self.recorder = Recorder(on_event)
        self.master = MasterKeys(volume_id, providers, self.recorder)
        self.providers = providers
        self.cache = cache if cache is not None else KeyCache()
        self.inline = all(p.inline for p in providers)
        self.volume_key: bytearray | None = None  # set by kmsfs.volume_open.open_volume
        source: FileKeys = self.master
        self.pool: KeyPool | None = None
        if not providers[0].inline:
            prefetching = PrefetchingKeys(self.master)
            self.pool = prefetching.pool
            source = prefetching
        self.keys = CachingKeys(source, self.cache, self.recorder)

    def new_file(
        self, requester: dict[str, Any] | None = None
    ) -> tuple[bytes, bytearray, tuple[WrappedKey, ...]]:
        """A new file ID with a fresh file key (the caller wipes it) and its wrapped forms."""
        context, key, entries = self.keys.new_file(requester)
        return context.file_id, key, entries

    def unwrap(
        self, header: FileHeader, what: str, requester: dict[str, Any] | None = None
    ) -> bytearray:
        """The file key of *header* (the caller wipes it).

        Raises WrongKeyError if the header belongs to another volume or has no
        entry for any of this volume's keys, else the last provider error.
        """
        if header.volume_id != self.volume_id:
            raise WrongKeyError(
                f"header belongs to volume {header.volume_id.hex()},"
                f" not this volume {self.volume_id.hex()}",
                where=what,
            )
        context = KeyContext(self.volume_id, header.file_id)
        key, _ = self.keys.unwrap(context, header.entries, what, requester)
        return key

    def cipher_for(
        self, header: FileHeader, what: str, requester: dict[str, Any] | None = None
    ) -> BlockCipher:
        """The block cipher of the file *header* describes: its key unwrapped (``unwrap``'s
        errors), the content key derived, the file key wiped.  The one way from a header to
        a cipher, for the daemon and every tool."""
        key = self.unwrap(header, what, requester)
        try:
            return BlockCipher.for_file(key, header)
        finally:
            wipe(key)

    def new_file_cipher(
        self,
        block_size: int,
        requester: dict[str, Any] | None = None,
        version: int = NEW_FILE_FORMAT,
    ) -> tuple[FileHeader, BlockCipher]:
        """A new file's header in file format *version* (fresh file ID and key, wrapped by
        every master key) and its block cipher; the file key is wiped (``new_file``'s
        errors)."""
        file_id, key, entries = self.new_file(requester)
        try:
            header = FileHeader.new(self.volume_id, file_id, block_size, entries, version)
            return header, BlockCipher.for_file(key, header)
        finally:
            wipe(key)

    def reencrypt(self, provider: Any, wrapped: WrappedKey, context: KeyContext) -> WrappedKey:
        """*wrapped* re-encrypted under *provider*'s key by the provider itself
        (``provider.reencrypt``, e.g. KMS ReEncrypt), reported as a "reencrypt"
        event.  Raises what the provider raises."""
        result: WrappedKey = self.recorder.call(
            "reencrypt", provider, context, provider.reencrypt, wrapped, context
        )
        return result

    def close(self) -> None:
        """Wipe the volume key and every cached or pooled key; close the providers."""
        wipe(self.volume_key)
        self.keys.close()


def unwrap_check(
    provider: KeyProvider,
    key: KeyConfig,
    volume_id: bytes,
    on_event: EventSink | None = None,
    version: int = 2,
) -> bytearray:
    """Unwrap *key*'s key-check value with *provider* (reported as an unwrap).

    Raises WrongKeyError naming the key if *provider* is not this volume's key
    (or the check was made for another config format: no downgrade).
    """
    context = KeyContext.key_check(volume_id, version)
    wrapped = WrappedKey(provider.name, provider.key_ref, key.check)
    try:
        value: bytearray = Recorder(on_event).call(
            "unwrap", provider, context, provider.unwrap, wrapped, context
        )
    except WrongKeyError as exc:
        raise WrongKeyError(f"{provider.describe()} is not this volume's key ({exc})") from None
    except KmsfsError:
        raise
    return value
