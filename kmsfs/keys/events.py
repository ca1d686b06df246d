"""Key-use events: what the audit log and the metrics hear of every provider call.

``Recorder`` wraps provider calls: it times them and reports one ``KeyEvent``
each (result, latency, error, requester) to the sink, if there is one.  It is
the audit layer of the keyring (kmsfs/keys/keyring.py); events never hold key
material.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kmsfs.errors import KmsfsError
from kmsfs.keys.provider import KeyContext, KeyProvider


@dataclass
class KeyEvent:
    """One use of a key, for the audit log.  Never holds key material."""

    # "generate", "wrap", "unwrap", "cache-hit"; with a key pool also "prefetch"
    # (background generate), "assign" (pooled key given to a new file), "discard";
    # "reencrypt" (a provider re-encrypting another key's entry itself)
    operation: str
    provider: str
    key_ref: str
    volume_id: str
    file_id: str
    result: str  # "ok" or the error class name
    latency_ms: float
    error: str = ""
    requester: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[KeyEvent], None]


class Recorder:
    """Times provider calls and reports them to ``on_event`` (None: nothing reported)."""

    def __init__(self, on_event: EventSink | None) -> None:
        self.on_event = on_event

    def call(
        self,
        operation: str,
        provider: KeyProvider,
        context: KeyContext,
        method: Callable[..., Any],
        *args: Any,
        requester: dict[str, Any] | None = None,
    ) -> Any:
        """``method(*args)`` reported as *operation*; its KmsfsErrors are reported, re-raised."""
        start = time.monotonic()
        try:
            result = method(*args)
        except KmsfsError as exc:
            elapsed = (time.monotonic() - start) * 1000
            self.emit(operation, provider.name, provider.key_ref, context, type(exc).__name__,
                      elapsed, str(exc), requester)  # fmt: skip
            raise
        elapsed = (time.monotonic() - start) * 1000
        self.emit(operation, provider.name, provider.key_ref, context, "ok", elapsed,
                  requester=requester)  # fmt: skip
        return result

    def emit(
        self,
        operation: str,
        provider: str,
        key_ref: str,
        context: KeyContext,
        result: str = "ok",
        latency_ms: float = 0.0,
        error: str = "",
        requester: dict[str, Any] | None = None,
    ) -> None:
        """Report one key use; no-op without a sink."""
        if self.on_event is None:
            return
        self.on_event(
            KeyEvent(
                operation,
                provider,
                key_ref,
                context.volume_id.hex(),
                context.file_id.hex() if context.purpose == "file" else context.purpose,
                result,
                round(latency_ms, 3),
                error,
                requester or {},
            )
        )
