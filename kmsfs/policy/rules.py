"""Policy rules once validated: what each one matches, and how it is written in TOML.

A rule matches a request when every condition it has matches (a missing
condition matches anything); a list matches when any of its items does:

- ``users`` / ``groups``: the request's uid; its gid or a supplementary group;
- ``programs``: the file the requesting process runs (programs.py); ``sha256``:
  the executable's content;
- ``paths``: the path of the file in the volume (globs.py);
- ``actions``: one of ACTIONS (``all`` in the file means every one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kmsfs.policy.globs import PathSet
from kmsfs.policy.identity import Requester
from kmsfs.policy.programs import ProgramSet

EFFECTS = ("permit", "deny")
MODES = ("enforce", "learn", "off")
# the order of keys when a rule is printed
RULE_KEYS = ("users", "groups", "programs", "sha256", "paths", "actions", "effect", "audit")


@dataclass(frozen=True, eq=False)
class Rule:
    """One ``[[policy.rule]]``, compiled.

    Attributes: number (1-based, in file order), effect, audit, actions,
    uids/gids/sha256 (frozensets; None = any), programs (ProgramSet or None =
    any), paths (PathSet or None = any), table (the TOML table as written, for
    display).
    """

    number: int
    effect: str
    audit: bool
    actions: frozenset[str]
    uids: frozenset[int] | None = None
    gids: frozenset[int] | None = None
    programs: ProgramSet | None = None
    sha256: frozenset[str] | None = None
    paths: PathSet | None = None
    table: dict[str, Any] = field(default_factory=dict)

    @property
    def ignores_requester(self) -> bool:
        """True if the rule has no condition on users, groups, programs or sha256."""
        return (
            self.uids is None
            and self.gids is None
            and self.programs is None
            and (self.sha256 is None)
        )

    def matches(self, requester: Requester, path: str) -> bool:
        """True if the requester and *path* satisfy every condition but ``actions``.

        Cheap tests first; the program's SHA-256 last.  Raises Pending (identity.py)
        when a fact needs blocking I/O and the requester may not block.
        """
        if self.uids is not None and requester.uid not in self.uids:
            return False
        if self.paths is not None and not self.paths.matches(path):
            return False
        return self._matches_process(requester)

    def matches_requester(self, requester: Requester) -> bool:
        """True if the requester satisfies every condition but ``actions`` and ``paths``."""
        if self.uids is not None and requester.uid not in self.uids:
            return False
        return self._matches_process(requester)

    def process_test(self) -> Callable[[Requester], bool] | None:
        """The test of groups, programs and sha256; None if the rule has none of them."""
        if self.gids is None and self.programs is None and self.sha256 is None:
            return None
        return self._matches_process

    def _matches_process(self, requester: Requester) -> bool:
        if (
            self.gids is not None
            and requester.gid not in self.gids
            and self.gids.isdisjoint(requester.groups)
        ):
            return False
        if self.programs is not None and not self.programs.matches(requester):
            return False
        return self.sha256 is None or requester.sha256 in self.sha256

    def mismatch(self, requester: Requester, action: str, path: str) -> str | None:
        """Why this rule does not match (the first failing condition), or None if it does."""
        if action not in self.actions:
            return f"action {action} is not in its actions"
        if self.uids is not None and requester.uid not in self.uids:
            return f"uid {requester.uid} is not in its users"
        if self.paths is not None and not self.paths.matches(path):
            return f"{path} does not match its paths"
        if self.gids is not None and self.gids.isdisjoint(requester.groups):
            groups = ", ".join(str(g) for g in sorted(requester.groups))
            return f"none of the groups ({groups}) is in its groups"
        if self.programs is not None:
            reason = self.programs.mismatch(requester)
            if reason is not None:
                return reason
        if self.sha256 is not None and requester.sha256 not in self.sha256:
            return f"the program's sha256 {requester.sha256} is not in its sha256"
        return None

    def toml(self) -> str:
        """The rule as a ``[[policy.rule]]`` table, keys in RULE_KEYS order."""
        return rule_toml(self.table)


def toml_string(text: str) -> str:
    """*text* as a TOML basic string; ValueError if TOML cannot hold it (a lone surrogate)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{text!r} is not valid Unicode (a file name in another encoding)")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    """A TOML scalar or array of scalars (strings, integers, booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise ValueError(f"cannot write {value!r} as a TOML value")


def rule_toml(table: dict[str, Any]) -> str:
    """``[[policy.rule]]`` and one ``key = value`` line per entry of *table*."""
    keys = [k for k in RULE_KEYS if k in table] + [k for k in table if k not in RULE_KEYS]
    lines = ["[[policy.rule]]"] + [f"{key} = {toml_value(table[key])}" for key in keys]
    return "\n".join(lines)
