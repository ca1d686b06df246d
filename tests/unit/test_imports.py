"""The package's import graph: dependencies point one way, and there is no cycle.

Layers (docs/DESIGN.md): format <- backing, keys, policy <- fs <- daemon/server/lifecycle
<- cli; the offline tools (lifecycle, offline) use backing, never the pyfuse3 layer fs.
The graph is read from the sources (every ``import``/``from`` of a kmsfs module,
at any depth in a module, including imports inside functions).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from support.sources import imports

PACKAGE = Path(__file__).parents[2] / "kmsfs"
LAYER = {
    "format": 0,
    "errors": 0,
    "hostfiles": 0,
    "backing": 1,
    "keys": 1,
    "policy": 1,
    "fs": 2,
    "audit": 2,
    "volume_open": 2,
    "volume_writes": 2,
    "trust": 2,
    "pins": 1,
}
# the rest (daemon, server, lifecycle, offline) is layer 3, and cli is 4


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top in ("cli", "__main__"):
        return 4
    return LAYER.get(top, 3)


@cache
def graph() -> dict[str, set[str]]:
    """Each kmsfs module's kmsfs imports (read once: three tests walk it; do not modify)."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        targets = {module for _, module in imports(path.read_text()) if module.startswith("kmsfs")}
        edges[name] = {t for t in targets if t != name}
    return edges


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target in edges and state.get(target) is None:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if state.get(node) is None:
            visit(node)


def test_dependencies_point_one_way() -> None:
    wrong = [
        f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
        for source, targets in graph().items()
        for target in targets
        if layer(target) > layer(source)
    ]
    assert wrong == []


def test_format_layer_imports_no_fuse_trio_or_sdk() -> None:
    for path in (PACKAGE / "format").rglob("*.py"):
        text = path.read_text()
        for name in ("pyfuse3", "trio", "boto3", "botocore", "pkcs11"):
            assert f"import {name}" not in text, f"{path.name} imports {name}"


def test_backing_layer_imports_no_fuse_trio_or_sdk() -> None:
    for path in (PACKAGE / "backing").rglob("*.py"):
        imported = {module for _, module in imports(path.read_text())}
        for name in ("pyfuse3", "trio", "boto3", "botocore", "pkcs11"):
            assert not any(m.split(".")[0] == name for m in imported), f"{path.name} imports {name}"


def test_offline_tools_and_backing_never_import_the_pyfuse3_layer() -> None:
    wrong = [
        f"{source} imports {target}"
        for source, targets in graph().items()
        if source.startswith(("kmsfs.backing", "kmsfs.lifecycle", "kmsfs.offline"))
        for target in targets
        if target == "kmsfs.fs" or target.startswith("kmsfs.fs.")
    ]
    assert wrong == []
