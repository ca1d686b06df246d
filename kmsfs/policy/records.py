"""Audit records of policy decisions: one JSON object per audited request.

Written to the volume's audit log beside the key-use records (kmsfs/audit.py),
told apart by ``"operation": "policy"``.  The format is stable (docs/POLICY.md,
"Audit records"); fields are only ever added::

    {"time": "2025-06-01T10:00:00.123456+00:00", "operation": "policy",
     "action": "read", "path": "/db/base/1", "uid": 33, "gid": 33, "pid": 4242,
     "exe": "/usr/bin/cat", "rule": 2, "effect": "deny", "allowed": false,
     "mode": "enforce", "unknown_program": null, "unknown_path": null}

``rule`` is the deciding rule's number (1-based) or null for the default (and
for a path that could not be established); ``effect`` what it says;
``allowed`` whether the request went through (in learn mode a deny is
``"effect": "deny", "allowed": true``); ``exe`` the ``/proc/PID/exe`` link
text (`` (deleted)`` if the file was replaced), null if the program is
unknown, and then ``unknown_program`` says why ("another mount namespace",
...); ``path`` null when the file's path in the volume could not be
established, and then ``unknown_path`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kmsfs.policy import ACTIONS
from kmsfs.policy.engine import Decision
from kmsfs.policy.identity import Requester

OPERATION = "policy"


UNRESOLVED = "not under the mount root (moved out of the backing directory?)"


def audit_record(
    requester: Requester,
    action: str,
    path: str | None,
    decision: Decision,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The audit record of one decision, as a JSON-ready dict (pure but for reading /proc)."""
    when = now or datetime.now(UTC)
    return {
        "time": when.isoformat(timespec="microseconds"),
        "operation": OPERATION,
        "action": action,
        "path": path,
        "uid": requester.uid,
        "gid": requester.gid,
        "pid": requester.pid,
        "exe": requester.exe,
        "rule": decision.rule,
        "effect": decision.effect,
        "allowed": decision.allowed,
        "mode": decision.mode,
        "unknown_program": requester.unknown_program,
        "unknown_path": UNRESOLVED if path is None else None,
    }


@dataclass(frozen=True)
class SeenRequest:
    """A policy record read back: the fields ``kmsfs policy suggest`` uses."""

    action: str
    path: str | None
    uid: int
    gid: int
    exe: str | None
    rule: int | None
    effect: str
    allowed: bool
    mode: str

    @property
    def program(self) -> str | None:
        if self.exe is not None and self.exe.endswith(" (deleted)"):
            return self.exe[: -len(" (deleted)")]
        return self.exe


def parse_record(data: Any) -> SeenRequest | None:
    """A policy record -> SeenRequest; None for another kind of record; ValueError if malformed."""
    if not isinstance(data, dict) or data.get("operation") != OPERATION:
        return None
    try:
        seen = SeenRequest(
            action=data["action"],
            path=data["path"],
            uid=data["uid"],
            gid=data["gid"],
            exe=data["exe"],
            rule=data["rule"],
            effect=data["effect"],
            allowed=data["allowed"],
            mode=data["mode"],
        )
    except KeyError as exc:
        raise ValueError(f"policy record without {exc.args[0]!r}") from None
    if (
        seen.action not in ACTIONS
        or not (seen.path is None or (isinstance(seen.path, str) and seen.path.startswith("/")))
        or not isinstance(seen.uid, int)
        or not isinstance(seen.gid, int)
        or not (seen.exe is None or isinstance(seen.exe, str))
        or seen.effect not in ("permit", "deny")
    ):
        raise ValueError("policy record with a malformed field")
    return seen
