"""``[policy]`` of a host's volume config (/etc/kmsfs/NAME.toml) -> a compiled Policy.

::

    [policy]
    mode = "enforce"            # or "learn": deny nothing, audit every would-be deny;
                                # or "off": permit everything (rules checked, not applied)
    default = "permit"          # or "deny": the effect for requests no rule matches

    [[policy.rule]]             # rules are tried in order; the first match decides
    users = ["postgres", 1001]  # names (resolved now) or numeric uids
    groups = ["dba"]            # names or gids: the request's gid or a supplementary group
    programs = ["/usr/lib/postgresql/15/bin/postgres"]   # executables (programs.py)
    sha256 = ["<64 hex>"]       # the executable's content (any of these)
    paths = ["/db/**"]          # globs in the volume (globs.py)
    actions = ["read", "write"] # ACTIONS or "all"; missing = all
    effect = "permit"           # required: permit or deny
    audit = true                # also audit requests this rule permits

Every list key also takes a single value.  Errors raise ConfigError naming
the file, the rule number, the key and the problem.  Nothing here reads the
backing directory.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import re
from typing import Any

from kmsfs.errors import ConfigError
from kmsfs.policy import ACTIONS
from kmsfs.policy.engine import Policy
from kmsfs.policy.globs import GlobError, PathPattern, PathSet
from kmsfs.policy.programs import ProgramRegistry, ProgramSet
from kmsfs.policy.rules import EFFECTS, MODES, RULE_KEYS, Rule

POLICY_KEYS = ("mode", "default", "rule")
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def parse_policy(table: dict[str, Any], where: str) -> Policy:
    """Validate and compile the ``[policy]`` *table* of the file *where*; ConfigError if wrong.

    Programs named by rules are resolved and stat'ed now (programs.py).  With
    ``mode = "off"`` the rules are validated and counted, not applied: the
    policy permits everything.
    """
    _refuse_unknown(table, POLICY_KEYS, where, "policy.")
    mode = _choice(table, "mode", MODES, "enforce", f"{where}: policy.mode")
    default = _choice(table, "default", EFFECTS, "permit", f"{where}: policy.default")
    raw_rules = table.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise ConfigError(
            f"{where}: policy.rule must be an array of tables, written [[policy.rule]]"
        )
    programs = ProgramRegistry()
    rules = tuple(
        _parse_rule(raw, number, where, programs) for number, raw in enumerate(raw_rules, 1)
    )
    if mode == "off":
        return Policy.off(where, ignored=len(rules))
    return Policy(rules, default, mode, where, programs)


def _parse_rule(raw: dict[str, Any], number: int, where: str, registry: ProgramRegistry) -> Rule:
    here = f"{where}: policy rule {number}"
    _refuse_unknown(raw, RULE_KEYS, here, "")
    effect = raw.get("effect")
    if effect is None:
        raise ConfigError(f"{here}: effect is missing (permit or deny)")
    effect = _choice(raw, "effect", EFFECTS, None, f"{here}: effect")
    audit = raw.get("audit", False)
    if not isinstance(audit, bool):
        raise ConfigError(f"{here}: audit must be true or false, not {audit!r}")

    actions: frozenset[str] = frozenset(ACTIONS)
    names = _strings(raw, "actions", here)
    if names is not None:
        for name in names:
            if name != "all" and name not in ACTIONS:
                raise ConfigError(
                    f"{here}: actions: unknown action {name!r}{_did_you_mean(name, ACTIONS)};"
                    f" actions are {', '.join(ACTIONS)} and all"
                )
        if "all" not in names:
            actions = frozenset(names)

    programs = _strings(raw, "programs", here)
    program_set: ProgramSet | None = None
    if programs is not None:
        for program in programs:
            if not os.path.isabs(program) or os.path.normpath(program) != program:
                raise ConfigError(
                    f"{here}: programs: {program!r} is not a normalised absolute path"
                    " (the executable's path, e.g. /usr/bin/rsync)"
                )
        program_set = ProgramSet(registry.get(program, here) for program in programs)

    digests = _strings(raw, "sha256", here)
    if digests is not None:
        digests = [digest.lower() for digest in digests]
        for digest in digests:
            if not SHA256_HEX.fullmatch(digest):
                raise ConfigError(
                    f"{here}: sha256: {digest!r} is not 64 hexadecimal digits (sha256sum FILE)"
                )

    paths: PathSet | None = None
    patterns = _strings(raw, "paths", here)
    if patterns is not None:
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(PathPattern(pattern))
            except GlobError as exc:
                raise ConfigError(f"{here}: paths: bad glob {pattern!r}: {exc}") from None
        paths = PathSet(compiled)

    return Rule(
        number=number,
        effect=effect,
        audit=audit,
        actions=actions,
        uids=_ids(raw, "users", here, pwd.getpwnam, "user"),
        gids=_ids(raw, "groups", here, grp.getgrnam, "group"),
        programs=program_set,
        sha256=frozenset(digests) if digests is not None else None,
        paths=paths,
        table=dict(raw),
    )


def _ids(raw: dict[str, Any], key: str, here: str, lookup: Any, kind: str) -> frozenset[int] | None:
    """Names (resolved now) or numeric IDs -> a set of IDs; ConfigError for an unknown name."""
    items = _items(raw, key, here, f"any {kind}")
    if items is None:
        return None
    ids: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ConfigError(
                f"{here}: {key}: {item!r} is not a {kind} name (a string) or ID (an integer)"
            )
        if isinstance(item, int):
            if not 0 <= item <= MAX_ID:
                raise ConfigError(f"{here}: {key}: {item} is not a valid {kind} ID")
            ids.add(item)
            continue
        try:
            entry = lookup(item)
        except KeyError:
            hint = " (write a numeric ID as an integer, without quotes)" if item.isdigit() else ""
            raise ConfigError(f"{here}: {key}: unknown {kind} {item!r}{hint}") from None
        ids.add(entry.pw_uid if kind == "user" else entry.gr_gid)
    return frozenset(ids)


def _items(raw: dict[str, Any], key: str, here: str, matches: str) -> list[Any] | None:
    """The value under *key* as a non-empty list (a single value is a list of one)."""
    value = raw.get(key)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{here}: {key} is empty (leave it out to match {matches})")
    return items


def _strings(raw: dict[str, Any], key: str, here: str) -> list[str] | None:
    """A string or a non-empty list of strings under *key*, or None if absent."""
    items = _items(raw, key, here, "anything")
    if items is None:
        return None
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(
                f"{here}: {key} must be a string or a list of strings, not"
                f" {type(item).__name__} ({item!r})"
            )
        if not item:
            raise ConfigError(f"{here}: {key} has an empty string")
    return list(items)


def _choice(
    table: dict[str, Any], key: str, choices: tuple[str, ...], default: str | None, here: str
) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or value not in choices:
        named = [repr(c) for c in choices]
        raise ConfigError(
            f"{here} must be {', '.join(named[:-1])} or {named[-1]}, not {value!r}"
            + (_did_you_mean(value, choices) if isinstance(value, str) else "")
        )
    return value


def _refuse_unknown(table: dict[str, Any], known: tuple[str, ...], here: str, prefix: str) -> None:
    for name in table:
        if name not in known:
            raise ConfigError(
                f"{here}: unknown key {prefix}{name}{_did_you_mean(name, known, prefix)};"
                f" known: {', '.join(prefix + k for k in known)}"
            )


def _did_you_mean(name: str, choices: tuple[str, ...], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""
