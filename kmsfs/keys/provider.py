"""The key-provider interface every master-key backend implements.

A provider owns one master key and does three things with it: generate a
fresh 256-bit data key (plaintext and wrapped), wrap a given key, and unwrap
a wrapped key.  Every call carries a KeyContext, the volume and file IDs that
the wrapped key is bound to (the AWS KMS encryption context; AAD elsewhere).

Template method: the public methods check arguments and results and convert
any unexpected SDK exception into a ProviderError; subclasses implement the
``_generate``/``_wrap``/``_unwrap`` calls and raise WrongKeyError,
KeyAccessDenied or KeyUnavailable (temporary) for the failures they know.

Calls may block (network, HSM): callers on the trio loop run them in a worker
thread unless ``inline`` is True (pure CPU, microseconds).
"""

from __future__ import annotations

import os
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from kmsfs.errors import KmsfsError, ProviderError, WrongKeyError
from kmsfs.format.header import ID_SIZE, WrappedKey

DATA_KEY_SIZE = 32
PURPOSE_FILE = "file"
PURPOSE_KEY_CHECK = "key-check"  # format 1: a random key per master key
PURPOSE_VOLUME_KEY = "volume-key"  # formats 2, 3: the volume key, the same under every key


@dataclass(frozen=True)
class KeyContext:
    """What a wrapped key is bound to: a volume, a file, and a purpose.

    ``as_dict`` is the AWS KMS encryption context (no path: renames and hard
    links stay free, and CloudTrail logs the context in the clear); ``aad`` is
    its canonical byte form for AEAD-based wrapping.
    """

    volume_id: bytes
    file_id: bytes
    purpose: str = PURPOSE_FILE

    def __post_init__(self) -> None:
        if len(self.volume_id) != ID_SIZE or len(self.file_id) != ID_SIZE:
            raise ValueError("volume and file IDs must be 16 bytes")

    @classmethod
    def key_check(cls, volume_id: bytes, version: int = 2) -> KeyContext:
        """The context of a config's key-check value: format 1's random key, or (formats 2
        and 3) the volume key.  Distinct purposes, so a later config cannot pass as format 1."""
        purpose = PURPOSE_KEY_CHECK if version < 2 else PURPOSE_VOLUME_KEY
        return cls(volume_id, bytes(ID_SIZE), purpose)

    def as_dict(self) -> dict[str, str]:
        context = {"kmsfs:volume-id": self.volume_id.hex(), "kmsfs:file-id": self.file_id.hex()}
        if self.purpose != PURPOSE_FILE:
            context["kmsfs:purpose"] = self.purpose
        return context

    def aad(self) -> bytes:
        """Sorted (key, value) pairs, each as u16 length + UTF-8 bytes."""
        parts = [b"kmsfs-context-v1"]
        for key, value in sorted(self.as_dict().items()):
            for text in (key.encode(), value.encode()):
                parts += [struct.pack(">H", len(text)), text]
        return b"".join(parts)


class KeyProvider(ABC):
    """One master key behind one backend.

    Attributes:
        name: provider name recorded in headers and the volume config.
        inline: True if calls are pure CPU and may run on the event loop.
        key_ref: identity of the master key, recorded in every header entry.
    """

    name: ClassVar[str]
    inline: ClassVar[bool] = False

    @property
    @abstractmethod
    def key_ref(self) -> str: ...

    def settings(self) -> dict[str, Any]:
        """Non-secret settings to record in the volume config."""
        return {}

    def describe(self) -> str:
        """One line for logs and status, naming the provider and key."""
        return f"{self.name} key {self.key_ref}"

    def generate_data_key(self, context: KeyContext) -> tuple[bytearray, WrappedKey]:
        """A fresh random data key and its wrapped form for *context*."""
        plaintext, blob = self._call("generate", self._generate, context)
        if len(plaintext) != DATA_KEY_SIZE:
            raise ProviderError(f"{self.describe()}: returned a {len(plaintext)}-byte data key")
        return bytearray(plaintext), WrappedKey(self.name, self.key_ref, bytes(blob))

    def wrap(self, plaintext: bytes | bytearray, context: KeyContext) -> WrappedKey:
        """Wrap an existing data key for *context* (re-wrapping, extra master keys)."""
        if len(plaintext) != DATA_KEY_SIZE:
            raise ValueError(f"data key of {len(plaintext)} bytes: want {DATA_KEY_SIZE}")
        blob = self._call("wrap", self._wrap, bytes(plaintext), context)
        return WrappedKey(self.name, self.key_ref, bytes(blob))

    def unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytearray:
        """Unwrap *wrapped*; WrongKeyError if it was not made by this key for *context*."""
        if not self.accepts(wrapped):
            raise WrongKeyError(
                f"wrapped by {wrapped.provider} key {wrapped.key_ref}, not by {self.describe()}"
            )
        plaintext = self._call("unwrap", self._unwrap, wrapped, context)
        if len(plaintext) != DATA_KEY_SIZE:
            raise WrongKeyError(f"{self.describe()}: unwrapped a {len(plaintext)}-byte key")
        return bytearray(plaintext)

    def public_wrap(self) -> str | None:
        """Who besides the holders of this master key can *wrap* under it, or None.

        Such a party can make a volume key of their own pass this key's check:
        only a host's pin stops that (docs/FORMAT.md, "Host pin"), so the tools
        warn when such a key joins a volume.
        """
        return None

    def accepts(self, wrapped: WrappedKey) -> bool:
        """True if *wrapped* names this provider and master key."""
        return wrapped.provider == self.name and wrapped.key_ref == self.key_ref

    def close(self) -> None:
        """Release sessions and clients; the provider is unusable afterwards."""
        return None

    def _call(self, operation: str, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except KmsfsError:
            raise
        except Exception as exc:  # an SDK error the subclass did not classify
            raise ProviderError(
                f"{self.describe()}: {operation} failed: {type(exc).__name__}: {exc}"
            ) from exc

    @abstractmethod
    def _generate(self, context: KeyContext) -> tuple[bytes | bytearray, bytes]:
        """Return (plaintext data key, wrapped blob)."""

    @abstractmethod
    def _wrap(self, plaintext: bytes, context: KeyContext) -> bytes:
        """Return the wrapped blob for *plaintext*."""

    @abstractmethod
    def _unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes | bytearray:
        """Return the plaintext data key."""


def random_key() -> bytearray:
    return bytearray(os.urandom(DATA_KEY_SIZE))


def wipe(buffer: bytearray | None) -> None:
    """Overwrite a key buffer with zeros (as far as Python allows: copies may remain)."""
    if buffer is not None:
        buffer[:] = bytes(len(buffer))
