"""The audit trail: one JSON line per key operation and per file open
(``kmsfs mount --audit-log PATH``).

A key operation (see docs/SERVERS.md, "Audit log")::

    {"time": "2025-01-01T12:00:00.123456+00:00", "operation": "unwrap",
     "provider": "aws-kms", "key_ref": "arn:aws:kms:...", "volume_id": "<32 hex>",
     "file_id": "<32 hex>", "path": "/dir/file", "uid": 1000, "gid": 1000,
     "pid": 4242, "process": "cat", "exe": "/usr/bin/cat",
     "unknown_program": null, "result": "ok", "error": "", "latency_ms": 2.1}

An open or create through the mount, allowed or refused by kmsfs::

    {"time": "...", "operation": "open", "volume_id": "<32 hex>",
     "file_id": "<32 hex>", "path": "/dir/file", "uid": 1000, "gid": 1000,
     "pid": 4242, "process": "cat", "exe": "/usr/bin/cat",
     "unknown_program": null, "access": "read", "result": "ok", "error": ""}

``file_id`` is the one in the KMS encryption context, so records join with
CloudTrail's.  Fields the request did not provide (background prefetch, the
mount's key check) are null; ``exe`` is empty and ``unknown_program`` says
why when the process's program cannot be known (another mount or user
namespace than the daemon's, a process gone: kmsfs/policy/identity.py).  Key
material never reaches this module: neither a KeyEvent nor an AccessEvent holds
any.

The file is opened for appending, mode 0600 when created (an existing one is made
0600; a symbolic link or anything but a regular file is refused: ``open_private_log``),
and every record is written whole and flushed under a lock, so lines from worker
threads never interleave.  A failed write is logged once and does not fail the file
operation that caused it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from typing import IO

from kmsfs.fs.access_events import AccessEvent
from kmsfs.hostfiles import open_private_log
from kmsfs.keys.events import KeyEvent

log = logging.getLogger("kmsfs.audit")

REQUESTER_FIELDS = ("path", "uid", "gid", "pid", "process", "exe", "unknown_program")


def record(event: KeyEvent | AccessEvent, now: datetime | None = None) -> dict[str, object]:
    """The audit record of *event* (a key operation, or an open or create) as a JSON-ready dict."""
    out: dict[str, object] = {
        "time": (now or datetime.now(UTC)).isoformat(timespec="microseconds"),
        "operation": event.operation,
    }
    if isinstance(event, KeyEvent):
        out |= {"provider": event.provider, "key_ref": event.key_ref}
    out |= {"volume_id": event.volume_id, "file_id": event.file_id or None}
    out |= {name: event.requester.get(name) for name in REQUESTER_FIELDS}
    if isinstance(event, AccessEvent):
        out["access"] = event.access
    out |= {"result": event.result, "error": event.error}
    if isinstance(event, KeyEvent):
        out["latency_ms"] = event.latency_ms
    return out


class AuditLog:
    """A thread-safe JSON-lines writer; call it with each KeyEvent (the keyring's
    ``on_event`` sink) and each AccessEvent (the operations' ``on_access`` sink).

    Attributes: path, records (lines written), failed (True once a write failed).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open *path* for appending; ConfigError if it is refused (``open_private_log``)."""
        self.path = os.path.abspath(path)
        self.records = 0
        self.failed = False
        self._lock = threading.Lock()
        fd, note = open_private_log(self.path, "audit log")
        if note is not None:
            log.warning("%s", note)
        self._file: IO[str] | None = os.fdopen(fd, "a", encoding="utf-8")

    def __call__(self, event: KeyEvent | AccessEvent) -> None:
        self.write(record(event))

    def write(self, data: dict[str, object]) -> None:
        """Append one record that is already a JSON-ready dict (access-policy decisions)."""
        line = json.dumps(data, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line)
                self._file.flush()
                self.records += 1
            except OSError as exc:
                if not self.failed:
                    log.error("cannot write audit log %s: %s", self.path, exc.strerror)
                self.failed = True

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    log.error("cannot close audit log %s: %s", self.path, exc.strerror)
                self._file = None
