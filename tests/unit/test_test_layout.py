"""Rules of the test layout that can be checked by reading the files: the benchmark and
helper scripts import nothing from tests/ (scripts/benchlib is their library, which the
tests may use), and no test imports from conftest.py or from another test module (the
library is tests/support, the fixtures are in conftest.py files)."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

from support.sources import imports

ROOT = Path(__file__).resolve().parents[2]

# An import of the tests' own modules, or tests/ put on the import path.
TEST_IMPORT = re.compile(
    r"^\s*(from|import)\s+(support|conftest|tests)\b"
    r"|sys\.path\.\w+\(.*[\"'/]tests\b",
    re.MULTILINE,
)


def _script_files() -> list[Path]:
    """Every text file under scripts/ (Python modules and the launchers, which embed
    Python in here-documents)."""
    files = []
    for path in sorted((ROOT / "scripts").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            try:
                path.read_text()
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


def test_the_scripts_are_found() -> None:
    names = {path.name for path in _script_files()}
    assert {"bench", "bench-kms", "kms.py", "common.py"} <= names


def test_scripts_import_nothing_from_tests() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}: {match.group(0)}"
        for path in _script_files()
        for text in [path.read_text()]
        for match in TEST_IMPORT.finditer(text)
    ]
    assert offenders == []


def test_the_rule_sees_an_import_of_test_support() -> None:
    assert TEST_IMPORT.search("x = 1\nfrom support.kms_support import kms_stack\n")
    assert TEST_IMPORT.search('sys.path.insert(0, str(Path("tests").absolute()))')
    assert not TEST_IMPORT.search("from benchlib.kms import kms_stack\n")


def _imports_of(source: str, wrong: Callable[[str], bool]) -> list[int]:
    """The lines of *source* that import a module whose name is *wrong*."""
    return sorted({line for line, name in imports(source) if wrong(name)})


def _conftest_imports(source: str) -> list[int]:
    return _imports_of(source, lambda name: name == "conftest")


def _test_module_imports(source: str) -> list[int]:
    """Imports of test modules (``test_x``, ``unit.fs.test_x``, ``mount.test_x``)."""
    return _imports_of(
        source, lambda name: name.split(".")[0] in ("unit", "mount") or name.startswith("test_")
    )


def test_no_test_imports_from_conftest() -> None:
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 50
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in files
        for line in _conftest_imports(path.read_text())
    ]
    assert offenders == []


def test_the_rule_sees_an_import_from_conftest() -> None:
    assert _conftest_imports("def f():\n    from conftest import Volume\n") == [2]
    assert _conftest_imports("import conftest\n") == [1]
    assert _conftest_imports("from support.volumes import Volume\n") == []


def test_no_test_imports_another_test_module() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line in _test_module_imports(path.read_text())
    ]
    assert offenders == []


def test_the_rule_sees_an_import_of_a_test_module() -> None:
    assert _test_module_imports("from test_operations import CTX\n") == [1]
    assert _test_module_imports("from unit.fs.test_operations import ops\n") == [1]
    assert _test_module_imports("from support.operations import CTX\n") == []


def _module_marks(source: str) -> str:
    """The source of the module-level ``pytestmark`` assignment of *source* ("" if none)."""
    if "pytestmark" not in source:  # no need to parse it
        return ""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "pytestmark" for target in node.targets
        ):
            return ast.get_source_segment(source, node) or ""
    return ""


def test_no_module_of_the_mount_tier_marks_itself_mount() -> None:
    """tests/conftest.py adds the mount marker to the mount tier's tests; a module-wide
    mark would also cover the tests a module marks nomount."""
    offenders = [
        path.name
        for path in sorted((ROOT / "tests" / "mount").glob("test_*.py"))
        if "mark.mount" in _module_marks(path.read_text())
    ]
    assert offenders == []


def test_the_rule_sees_a_module_mount_mark() -> None:
    assert "mark.mount" in _module_marks("pytestmark = [requires_fuse, pytest.mark.mount]\n")
    assert _module_marks("x = 1\n") == ""
