"""The access policy: who may see plaintext through the mount (docs/POLICY.md).

Rules come from ``[policy]`` in the host's volume config (parse.py), never
from the backing directory.  What the operations layer uses:

- ``IdentityCache.lookup(pid, uid, gid) -> Requester`` per request (identity.py);
- ``Policy.decide(requester, action, path) -> Decision`` and, for a directory
  rename, ``Policy.decide_tree`` (engine.py); ``Pending`` (``HashPending`` for
  the program's SHA-256) when a rule needs a fact that must be read off the
  event loop: call ``pending.resolve()`` in a worker thread, then decide again;
- ``audit_record(requester, action, path, decision) -> dict`` when
  ``decision.audit`` (records.py).

This package depends on nothing above ``kmsfs.errors`` and ``kmsfs.backing.statx``
(docs/DESIGN.md layers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kmsfs.policy.engine import Decision, Policy
    from kmsfs.policy.identity import HashPending, IdentityCache, Pending, Requester
    from kmsfs.policy.parse import parse_policy
    from kmsfs.policy.records import audit_record

# What a rule can name; here, not in rules.py, so that the command line's choices
# need none of the rest.
ACTIONS = ("read", "write", "create", "delete", "rename", "list", "exec")

# Imported on first use, so that the command line (``kmsfs --help``) imports none of it.
_WHERE = {
    "Decision": "engine",
    "HashPending": "identity",
    "IdentityCache": "identity",
    "Pending": "identity",
    "Policy": "engine",
    "Requester": "identity",
    "audit_record": "records",
    "parse_policy": "parse",
}

__all__ = [
    "ACTIONS",
    "Decision",
    "HashPending",
    "IdentityCache",
    "Pending",
    "Policy",
    "Requester",
    "audit_record",
    "parse_policy",
]


def __getattr__(name: str) -> Any:
    """The public name *name* from the submodule that defines it (AttributeError if none)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
