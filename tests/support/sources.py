"""Python sources read as code, for the tests that check rules by reading files (the
import layers of kmsfs, the layout of tests/): the imports of a module, found without
walking every expression, once per session.

What is kept is the imports, not the syntax trees: the trees of every source are
millions of objects, and kept alive they made each later garbage collection, and the
interpreter's exit, seconds slower."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from functools import cache

# the fields of a statement that hold statements (bodies, else and finally blocks, except
# handlers, match cases); no expression holds one
BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def statements(body: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Every statement of *body* at any depth (in functions, classes, if/for/while/try/
    with/match blocks and except handlers), and the handlers and cases themselves.  An
    import is a statement: this finds every one that ``ast.walk`` finds, visiting a
    tenth of the nodes."""
    for node in body:
        yield node
        for block in BLOCKS:
            yield from statements(getattr(node, block, ()))


@cache
def imports(source: str) -> tuple[tuple[int, str], ...]:
    """(line, module) of every import in *source*: each module of ``import a, b.c`` and
    the module of ``from m import x`` (none for a relative ``from . import x``).  Read
    once per source: several rules read the same files."""
    found: list[tuple[int, str]] = []
    for node in statements(ast.parse(source).body):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return tuple(found)
