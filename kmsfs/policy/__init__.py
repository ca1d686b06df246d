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

from kmsfs.policy.engine import Decision, Policy
from kmsfs.policy.identity import HashPending, IdentityCache, Pending, Requester
from kmsfs.policy.parse import parse_policy
from kmsfs.policy.records import audit_record
from kmsfs.policy.rules import ACTIONS

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
