"""Path patterns of policy rules: ``/``-rooted globs compiled to one regex.

Syntax (docs/POLICY.md, "Rules"):

- a pattern starts with ``/`` and names a path inside the volume; components are
  separated by single ``/``; ``.``, ``..``, empty components and a trailing ``/``
  are refused (``/`` alone is the volume's root);
- a pattern without wildcards matches exactly that path;
- ``*`` matches any run of characters inside one component (also none),
  ``?`` one character, ``[abc]`` / ``[a-z]`` / ``[!abc]`` one character of (not
  of) a class; none of them ever matches ``/``;
- ``**`` as a whole component matches any number of components, none included:
  ``/db/**`` is ``/db`` itself and everything below it (the prefix ``/db``),
  ``/**/*.key`` is every ``.key`` file at any depth.  Including the directory
  itself is deliberate: a rule that protects a tree also protects the name of
  its root (renaming or deleting ``/db``).
- there is no escape character: a literal ``*``, ``?`` or ``[`` is written as a
  class, ``[*]``, ``[?]``, ``[[]`` (``escape`` does that).

Request paths are what the operations layer computes from the backing
descriptor: ``/`` or ``/a/b``, never a trailing ``/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WILDCARDS = frozenset("*?[")
_STAR = "**"


class GlobError(ValueError):
    """A pattern that is not a valid policy glob; ``str(exc)`` says why."""


@dataclass(frozen=True)
class _Part:
    """One component of a pattern: ``**``, a literal name, or a regex for one name."""

    text: str
    regex: str  # matches exactly one component
    literal: bool
    any_depth: bool = False  # the component is **
    any_name: bool = False  # the component is * (matches every name)


def _class_regex(component: str, start: int) -> tuple[str, int]:
    """The regex of the class starting at ``component[start] == "["`` and the index after it."""
    i = start + 1
    negate = i < len(component) and component[i] in "!^"
    if negate:
        i += 1
    items: list[str] = []
    first = True
    while i < len(component) and (component[i] != "]" or first):
        first = False
        char = component[i]
        if i + 2 < len(component) and component[i + 1] == "-" and component[i + 2] != "]":
            end = component[i + 2]
            if end < char:
                raise GlobError(f"range {char}-{end} in {component!r} is reversed")
            items.append(f"{re.escape(char)}-{re.escape(end)}")
            i += 3
        else:
            items.append(re.escape(char))
            i += 1
    if i >= len(component):
        raise GlobError(f"[ without its ] in {component!r}")
    body = "".join(items)
    return ("[^/" + body + "]" if negate else "[" + body + "]"), i + 1


def _part(component: str) -> _Part:
    if component == _STAR:
        return _Part(component, "", literal=False, any_depth=True)
    if _STAR in component:
        raise GlobError(f"** must be a whole component, not part of {component!r}")
    if not WILDCARDS.intersection(component):
        return _Part(component, re.escape(component), literal=True)
    out: list[str] = []
    i = 0
    while i < len(component):
        char = component[i]
        if char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            regex, i = _class_regex(component, i)
            out.append(regex)
        else:
            out.append(re.escape(char))
            i += 1
    return _Part(component, "".join(out), literal=False, any_name=component == "*")


def split_path(path: str) -> list[str]:
    """The components of a ``/``-rooted path (``/`` -> []); GlobError if it is not one."""
    if not path.startswith("/"):
        raise GlobError(f"{path!r} does not start with / (paths are inside the volume)")
    if path == "/":
        return []
    if path.endswith("/"):
        raise GlobError(
            f"{path!r} ends with / (write /dir for the directory, /dir/** for its tree)"
        )
    parts = path[1:].split("/")
    for part in parts:
        if part in ("", ".", ".."):
            shown = "an empty component" if part == "" else f"a {part} component"
            raise GlobError(f"{path!r} has {shown}")
        if "\0" in part:
            raise GlobError(f"{path!r} contains a NUL character")
    return parts


def escape(path: str) -> str:
    """The pattern matching exactly *path* (wildcard characters put in a class)."""
    return "".join(f"[{char}]" if char in WILDCARDS else char for char in path)


class PathPattern:
    """One compiled glob.  Attributes: text (as written), literal (no wildcards)."""

    __slots__ = ("text", "literal", "prefix", "suffix", "_parts", "_regex")

    def __init__(self, text: str) -> None:
        """Compile *text*; GlobError saying what is wrong with it."""
        self.text = text
        self._parts = [_part(component) for component in split_path(text)]
        self.literal = all(part.literal for part in self._parts)
        self._regex = re.compile(self.regex_source(), re.DOTALL)
        # cheap necessary conditions tested before the regex: every match starts
        # with the leading literal components and ends with the last one's literal tail
        leading = []
        for part in self._parts:
            if not part.literal:
                break
            leading.append(part.text)
        self.prefix = "/" + "/".join(leading) if leading else ""
        last = self._parts[-1] if self._parts else None
        tail = ""
        if last is not None and not last.literal and not last.any_depth:
            match = re.search(r"[^*?\]]*$", last.text)
            tail = match.group() if match else ""
            if "[" in tail:
                tail = ""
        self.suffix = tail

    @property
    def first(self) -> str | None:
        """The literal first component every match has ("" for the root), None if any."""
        if not self._parts:
            return ""
        return self._parts[0].text if self._parts[0].literal else None

    def regex_source(self) -> str:
        """A regex (for ``fullmatch`` with DOTALL) of the paths this pattern matches."""
        if not self._parts:
            return "/"
        # ** is zero or more components: "(?:/.*)?" ("/**" alone also matches "/")
        return "".join("(?:/.*)?" if part.any_depth else "/" + part.regex for part in self._parts)

    def matches(self, path: str) -> bool:
        """True if *path* (a request path, ``/`` or ``/a/b``) is matched."""
        return self._regex.fullmatch(path) is not None

    # -- what a pattern says about a whole subtree (for directory renames) -------

    def _states_after(self, components: list[str]) -> set[int]:
        """Pattern positions reachable after matching *components* (a path's prefix)."""
        states = self._close({0})
        for component in components:
            following: set[int] = set()
            for state in states:
                if state == len(self._parts):
                    continue
                part = self._parts[state]
                if part.any_depth:
                    following.add(state)  # ** takes this component and may take more
                elif re.fullmatch(part.regex, component, re.DOTALL):
                    following.add(state + 1)
            states = self._close(following)
            if not states:
                break
        return states

    def _close(self, states: set[int]) -> set[int]:
        """Add the positions reached by letting a ** match no component."""
        todo = list(states)
        closed = set(states)
        while todo:
            state = todo.pop()
            if (
                state < len(self._parts)
                and self._parts[state].any_depth
                and state + 1 not in closed
            ):
                closed.add(state + 1)
                todo.append(state + 1)
        return closed

    def can_match_below(self, directory: str) -> bool:
        """True if some path strictly below *directory* could match."""
        states = self._states_after(split_path(directory))
        return any(state < len(self._parts) for state in states)

    def covers_below(self, directory: str) -> bool:
        """True if every path strictly below *directory* matches (a conservative answer)."""
        for state in self._states_after(split_path(directory)):
            rest = self._parts[state:]
            if len(rest) == 1 and rest[0].any_depth:
                return True
            if len(rest) == 2 and rest[0].any_name and rest[1].any_depth:
                return True
        return False


def first_component(path: str) -> str:
    """``/a/b`` -> ``a``; ``/`` -> ``""``."""
    end = path.find("/", 1)
    return path[1:end] if end > 0 else path[1:]


class PathSet:
    """The ``paths`` of one rule: exact paths in a set, globs in one alternation.

    Attributes: patterns, firsts (the first components a matching path can
    have, None if any: the policy indexes rules by it).
    """

    __slots__ = ("patterns", "firsts", "_exact", "_globs", "_everything")

    def __init__(self, patterns: list[PathPattern]) -> None:
        self.patterns = tuple(patterns)
        # the first components a matching path can have; None: any
        firsts = {p.first for p in patterns}
        self.firsts: frozenset[str] | None = (
            None if None in firsts else frozenset(f for f in firsts if f is not None)
        )
        self._exact = frozenset(p.text for p in patterns if p.literal)
        self._globs = tuple(
            (p.prefix, p.suffix, p._regex.fullmatch) for p in patterns if not p.literal
        )
        self._everything = any(p.text == "/**" for p in patterns)

    def matches(self, path: str) -> bool:
        if path in self._exact or self._everything:
            return True
        for prefix, suffix, fullmatch in self._globs:
            if path.startswith(prefix) and path.endswith(suffix) and fullmatch(path) is not None:
                return True
        return False

    def can_match_below(self, directory: str) -> bool:
        return any(p.can_match_below(directory) for p in self.patterns)

    def covers_below(self, directory: str) -> bool:
        return any(p.covers_below(directory) for p in self.patterns)
