"""The decision: the first rule that matches a request decides, else the default.

``Policy.decide(requester, action, path)`` is what the operations layer calls
for every request it checks.  It does no I/O of its own (the requester reads
/proc lazily, see identity.py) and builds no Decision (each possible one is
made at compile time).  Rules are split by action and, within an action, by
uid at compile time; the rules worth testing for (action, uid, first path
component) are listed on first use and kept, with uids and components the
policy does not name sharing one entry, so this index is bounded by the
policy, not by the requests.  A rule's paths are a set of exact paths plus
one regex per glob, each behind a literal prefix/suffix test.

A request whose path the operations layer cannot establish (path None: see
docs/DESIGN.md "Access policy") is decided by ``unresolved_decision``: denied
and audited (let through, audited, in learn mode) whenever a rule could apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kmsfs.policy import ACTIONS
from kmsfs.policy.globs import first_component
from kmsfs.policy.identity import Requester
from kmsfs.policy.programs import ProgramRegistry
from kmsfs.policy.rules import Rule

# The request's path in the volume, or a function returning it (None: not resolvable)
PathArg = str | Callable[[], str | None]
_Check = tuple[Callable[[str], bool] | None, Callable[[Requester], bool] | None, "Decision"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request.

    Attributes:
        allowed: let the request through (always True in learn mode).
        effect: "permit" or "deny": what the rule (or the default) says.
        rule: the deciding rule's number (1-based), None for the default.
        audit: write an audit record: a deny, a rule with ``audit = true``, or
            in learn mode a would-be deny.
        mode: "enforce", "learn" or "off".
        unresolved: the request's path could not be established (the decision is
            then a deny that names no rule).
    """

    allowed: bool
    effect: str
    rule: int | None
    audit: bool
    mode: str
    unresolved: bool = False


def _decision(
    effect: str, rule: int | None, audit: bool, mode: str, unresolved: bool = False
) -> Decision:
    denied = effect == "deny"
    return Decision(
        allowed=mode == "learn" or not denied,
        effect=effect,
        rule=rule,
        audit=audit or denied,
        mode=mode,
        unresolved=unresolved,
    )


class Policy:
    """A compiled policy.

    Attributes: mode ("enforce"/"learn"/"off"), default ("permit"/"deny"),
    rules (tuple of Rule in file order), source (the file it came from, for
    messages), programs (the programs its rules name), needs_sha256 (some rule
    has ``sha256``), from_table (it comes from a ``[policy]`` table, not from
    its absence), ignored (rules of a ``mode = "off"`` table, not applied).
    """

    def __init__(
        self,
        rules: tuple[Rule, ...],
        default: str,
        mode: str,
        source: str = "",
        programs: ProgramRegistry | None = None,
        *,
        from_table: bool = True,
        ignored: int = 0,
    ):
        self.rules = rules
        self.default = default
        self.mode = mode
        self.source = source
        self.programs = programs or ProgramRegistry()
        self.from_table = from_table
        self.ignored = ignored
        self.needs_sha256 = any(rule.sha256 is not None for rule in rules)
        self.default_decision = _decision(default, None, False, mode)
        self.unresolved_decision = _decision("deny", None, True, mode, unresolved=True)
        self._decisions = {
            rule.number: _decision(rule.effect, rule.number, rule.audit, mode) for rule in rules
        }
        # action -> rules for any uid; action -> {uid: rules for that uid}
        self._any_uid: dict[str, tuple[Rule, ...]] = {}
        self._by_uid: dict[str, dict[int, tuple[Rule, ...]]] = {}
        for action in ACTIONS:
            for_action = [rule for rule in rules if action in rule.actions]
            named = {uid for rule in for_action if rule.uids is not None for uid in rule.uids}
            self._any_uid[action] = tuple(rule for rule in for_action if rule.uids is None)
            self._by_uid[action] = {
                uid: tuple(r for r in for_action if r.uids is None or uid in r.uids)
                for uid in named
            }
        self._uids = frozenset(uid for rule in rules if rule.uids for uid in rule.uids)
        self._firsts = frozenset(
            first
            for rule in rules
            if rule.paths and rule.paths.firsts
            for first in rule.paths.firsts
        )
        # (action, uid or None, first component or None) -> the rules that may match, as
        # (path test or None, process test or None, decision): uids are already checked
        self._candidates: dict[tuple[str, int | None, str | None], tuple[_Check, ...]] = {}
        # action -> the rules for it that test the requester, unless none can make two
        # requesters' decisions differ; and (path test or None, tests the requester) for
        # every rule for it, in file order (empty in the same case)
        self._varying: dict[str, tuple[Rule, ...]] = {
            action: tuple(
                rule for rule in rules if action in rule.actions and not rule.ignores_requester
            )
            if self.varies_by_requester(action)
            else ()
            for action in ACTIONS
        }
        self._variance: dict[str, tuple[tuple[Callable[[str], bool] | None, bool], ...]] = {
            action: tuple(
                (rule.paths.matches if rule.paths is not None else None, not rule.ignores_requester)
                for rule in rules
                if action in rule.actions
            )
            if self.varies_by_requester(action)
            else ()
            for action in ACTIONS
        }

    @classmethod
    def permit_all(cls, source: str = "") -> Policy:
        """The policy of a volume without ``[policy]``: no rules, default permit."""
        return cls((), "permit", "enforce", source, from_table=False)

    @classmethod
    def off(cls, source: str, ignored: int = 0) -> Policy:
        """A ``[policy]`` with ``mode = "off"``: permits everything, on purpose."""
        return cls((), "permit", "off", source, ignored=ignored)

    def summary(self) -> str:
        """One line for logs and status: rule count, default and mode."""
        if not self.from_table:
            return "no [policy]: every request permitted"
        if self.mode == "off":
            return f"mode off: every request permitted ({self.ignored} rules not applied)"
        return f"{len(self.rules)} rules, default {self.default}, mode {self.mode}"

    def describe(self) -> dict[str, object]:
        """The policy for ``kmsfs status --json``: mode, default, rules, source."""
        return {
            "mode": self.mode if self.from_table else None,
            "default": self.default,
            "rules": len(self.rules),
            "rules_not_applied": self.ignored,
            "source": self.source or None,
            "summary": self.summary(),
        }

    def rule(self, number: int) -> Rule:
        """The rule numbered *number* (1-based)."""
        return self.rules[number - 1]

    def applies(self, action: str) -> bool:
        """False when no rule names *action*: ``decide`` would return the default at once."""
        return bool(self._any_uid[action] or self._by_uid[action])

    def varies_by_requester(self, action: str) -> bool:
        """True if two requesters can get different decisions for *action* on one path.

        For ``list``: when False, the kernel's entry and attribute caches may
        keep what one process was shown for others (docs/DESIGN.md "Access
        policy"); when True, the operations layer answers with zero timeouts.
        """
        independent: list[Rule] = []  # earlier rules for this action that ignore the requester
        for rule in self.rules:
            if action not in rule.actions:
                continue
            if rule.ignores_requester:
                independent.append(rule)
                continue
            if not _shadowed(rule, independent):
                return True
        return False

    def varies_for(self, path: str | None, action: str) -> bool:
        """True if two requesters can get different decisions for *action* on *path*.

        Exact for the rules: the first rule matching *path* that ignores the
        requester decides for everyone, so a rule testing users, groups, programs
        or sha256 makes the answer True only if it matches *path* before such a
        rule does.  *path* None (not established) is answered for every path
        (``varies_by_requester``).  For ``list``, False lets the kernel keep the
        entry and its attributes for every process (docs/POLICY.md "What the
        kernel caches").  Raises KeyError for an action not in ACTIONS.
        """
        rules = self._variance[action]
        if not rules:
            return False
        if path is None:
            return True
        for path_test, tests_requester in rules:
            if path_test is None or path_test(path):
                return tests_requester
        return False

    def varies_below(self, directory: str | None, action: str) -> bool:
        """True if two requesters may get different decisions for *action* on some path
        strictly below *directory* (None: on some path anywhere).

        Conservative: True for any rule testing the requester that could match a path
        below, even where an earlier rule decides it for everyone.  For ``list``, False
        lets the kernel keep the directory's listing for every process.
        """
        rules = self._varying[action]
        if directory is None:
            return bool(rules)
        return any(rule.paths is None or rule.paths.can_match_below(directory) for rule in rules)

    def decide(self, requester: Requester, action: str, path: PathArg) -> Decision:
        """The first matching rule's Decision for *action* on *path*, else the default's.

        *path* is the file's path in the volume (``/`` or ``/a/b``), or a
        function returning it (None if it cannot be established: then
        ``unresolved_decision``), called only if a rule for *action* could apply
        to this uid.  Raises KeyError for an action not in ACTIONS, and Pending
        (identity.py) when a rule needs a fact that takes blocking I/O.
        """
        by_uid = self._by_uid[action].get(requester.uid)
        if by_uid is None:
            by_uid = self._any_uid[action]
        if not by_uid:
            return self.default_decision
        if not isinstance(path, str):
            found = path()
            if found is None:
                return self.unresolved_decision
            path = found
        first = first_component(path)
        key = (
            action,
            requester.uid if requester.uid in self._uids else None,
            first if first in self._firsts else None,
        )
        candidates = self._candidates.get(key)
        if candidates is None:
            candidates = self._candidates[key] = tuple(
                (
                    rule.paths.matches if rule.paths is not None else None,
                    rule.process_test(),
                    self._decisions[rule.number],
                )
                for rule in by_uid
                if rule.paths is None or rule.paths.firsts is None or key[2] in rule.paths.firsts
            )
        for path_test, process_test, decision in candidates:
            if path_test is not None and not path_test(path):
                continue
            if process_test is not None and not process_test(requester):
                continue
            return decision
        return self.default_decision

    def decide_tree(self, requester: Requester, action: str, path: str | None) -> Decision:
        """The Decision for *action* on *path* AND on every path below it.

        For renaming a directory, which renames everything below it.  Refused
        by a deny rule that applies to this requester and could match a path
        below *path* (unless earlier rules that apply decide everything it could
        match), and by a default deny when no rule decides the whole subtree.
        Conservative: it may refuse for a deny rule that no existing file matches.
        Raises Pending like ``decide``; *path* None decides like ``decide``.
        """
        if path is None:
            return self.decide(requester, action, lambda: None)
        decision = self.decide(requester, action, path)
        if decision.effect == "deny":
            return decision
        candidates = self._by_uid[action].get(requester.uid, self._any_uid[action])
        earlier: list[Rule] = []  # rules that apply to this requester and permit part of the tree
        for rule in candidates:
            if rule.paths is not None and not rule.paths.can_match_below(path):
                continue
            if not rule.matches_requester(requester):
                continue
            if rule.effect == "deny" and not _shadowed(rule, earlier):
                return self._decisions[rule.number]
            if rule.paths is None or rule.paths.covers_below(path):
                return decision  # every path below is decided by this rule or an earlier one
            earlier.append(rule)
        if self.default == "deny":
            return self.default_decision
        return decision

    def explain(
        self, requester: Requester, action: str, path: str
    ) -> list[tuple[Rule, str | None]]:
        """Each rule up to the deciding one, with why it does not match (None: it decides).

        For ``kmsfs policy check``: the slow path, written independently of
        ``decide``; the tests check that both always agree.  *requester* should
        be blocking (a SHA-256 is computed if a rule needs one).
        """
        out: list[tuple[Rule, str | None]] = []
        for rule in self.rules:
            reason = rule.mismatch(requester, action, path)
            out.append((rule, reason))
            if reason is None:
                break
        return out


def _shadowed(rule: Rule, earlier: list[Rule]) -> bool:
    """True if every path *rule* can match is matched by one of the *earlier* rules.

    Each pattern's matches lie at or below its literal leading components
    (its anchor); an earlier rule that matches the anchor and everything below
    it decides all of them first.
    """
    if rule.paths is None:
        return False
    for pattern in rule.paths.patterns:
        anchor = pattern.prefix or "/"
        if not any(
            other.paths is None
            or (other.paths.matches(anchor) and other.paths.covers_below(anchor))
            for other in earlier
        ):
            return False
    return True
