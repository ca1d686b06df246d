"""``kmsfs policy suggest``: permit rules for the would-be denies of a learn-mode run.

Input: the records of an audit log (records.py); only learn-mode would-be
denies (``"mode": "learn", "effect": "deny"``) are used.  Output: TOML
``[[policy.rule]]`` tables to review, one per (user, program, set of actions).

Generalisation, the only way a suggested rule is broader than what was seen:
for one user and program, a directory of which two or more distinct entries
were seen is written ``DIR/**`` (the directory and everything below it, at any
depth), with the union of the actions seen on those entries and below; the
highest such directory wins.  Every other path is written exactly (as a glob
that matches only itself).  Requests whose program was unknown (pid 0, a
process already gone) get no rule: a rule without ``programs`` would permit
any program; they are listed as comments, as are requests whose path could
not be established.
"""

from __future__ import annotations

import pwd
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kmsfs.policy import ACTIONS
from kmsfs.policy.globs import escape
from kmsfs.policy.records import SeenRequest
from kmsfs.policy.rules import rule_toml

MIN_SIBLINGS = 2


@dataclass
class _Group:
    uid: int
    program: str
    actions_by_path: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    denied_by: set[int | None] = field(default_factory=set)
    count: int = 0


@dataclass(frozen=True)
class Suggested:
    """One suggested rule: its TOML table and a comment saying what it comes from."""

    table: dict[str, Any]
    comment: str


def _parent(path: str) -> str:
    parent = path.rsplit("/", 1)[0]
    return parent or "/"


def _ancestors_or_self(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/", "/a", "/a/b", "/a/b/c"]``."""
    out = ["/"]
    parts = [p for p in path.split("/") if p]
    for index in range(len(parts)):
        out.append("/" + "/".join(parts[: index + 1]))
    return out


def generalise(actions_by_path: dict[str, set[str]]) -> dict[str, set[str]]:
    """Paths seen -> patterns (module docstring's rule) with the actions each must permit."""
    children: dict[str, set[str]] = defaultdict(set)
    for path in actions_by_path:
        if path != "/":
            children[_parent(path)].add(path)
    general = {d for d, kids in children.items() if len(kids) >= MIN_SIBLINGS}
    patterns: dict[str, set[str]] = defaultdict(set)
    for path, actions in actions_by_path.items():
        cover = next((a for a in _ancestors_or_self(path) if a in general), None)
        if cover is None:
            pattern = escape(path)
        else:
            pattern = "/**" if cover == "/" else escape(cover) + "/**"
        patterns[pattern] |= actions
    return dict(patterns)


def _user(uid: int) -> str | int:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid


def suggest(seen: Iterable[SeenRequest]) -> tuple[list[Suggested], list[str], int]:
    """(suggested rules, comments on what got no rule, enforced denies ignored)."""
    groups: dict[tuple[int, str], _Group] = {}
    unknown: dict[tuple[str, int, str, str], int] = defaultdict(int)
    enforced = 0
    for request in seen:
        if request.effect != "deny":
            continue
        if request.mode != "learn":
            enforced += 1
            continue
        program = request.program
        if program is None or request.path is None:
            what = "program unknown" if program is None else "path unknown"
            unknown[(what, request.uid, request.action, request.path or "?")] += 1
            continue
        group = groups.setdefault((request.uid, program), _Group(request.uid, program))
        group.actions_by_path[request.path].add(request.action)
        group.denied_by.add(request.rule)
        group.count += 1

    out: list[Suggested] = []
    for (uid, program), group in sorted(groups.items()):
        by_actions: dict[frozenset[str], list[str]] = defaultdict(list)
        for pattern, seen_actions in generalise(group.actions_by_path).items():
            by_actions[frozenset(seen_actions)].append(pattern)
        user = _user(uid)
        causes = sorted(group.denied_by, key=lambda r: (r is not None, r or 0))
        cause = ", ".join("the default" if r is None else f"rule {r}" for r in causes)
        comment = (
            f"# {user} (uid {uid}) running {program}: {group.count} requests"
            f" would have been denied by {cause}"
        )
        for actions, patterns in sorted(by_actions.items(), key=lambda item: sorted(item[1])):
            table = {
                "users": [user],
                "programs": [program],
                "paths": sorted(patterns),
                "actions": [a for a in ACTIONS if a in actions],
                "effect": "permit",
            }
            out.append(Suggested(table, comment))
            comment = ""  # said once per user and program
    notes = [
        f"# no rule ({what}): uid {uid} {action} {path} ({count}x)"
        for (what, uid, action, path), count in sorted(unknown.items())
    ]
    return out, notes, enforced


def suggest_toml(seen: Iterable[SeenRequest], source: str) -> tuple[str, int]:
    """The text ``kmsfs policy suggest`` prints, and the number of rules in it."""
    rules, notes, enforced = suggest(seen)
    lines = [
        f"# Suggested by kmsfs policy suggest from {source}: review before use.",
        "# Paste these rules before the rules that denied the requests (the first match wins).",
        f"# Paths: a directory of which {MIN_SIBLINGS} or more entries were seen is written DIR/**",
        "# (it and everything below it, with every action seen there); other paths are exact.",
    ]
    if enforced:
        lines.append(f"# {enforced} requests denied in enforce mode were left out.")
    if not rules and not notes:
        lines.append("# No would-be denies in learn mode: nothing to suggest.")
    written = 0
    for rule in rules:
        try:
            text = rule_toml(rule.table)
        except ValueError as exc:
            lines += ["", f"# a rule left out: {exc}"]
            continue
        lines += ["", rule.comment, text] if rule.comment else [text]
        written += 1
    if notes:
        lines.append("")
        lines += notes
    return "\n".join(lines) + "\n", written
