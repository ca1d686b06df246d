"""The documentation points at things that exist.

README.md and docs/*.md are read as text and checked against the repository
and the command line:

- every relative link resolves to a file, and a ``#anchor`` to a heading of it;
- every test a document cites (``tests/mount/test_x.py::test_y``,
  ``test_x.py::test_y``, a ``::test_z`` that continues the previous file, or a
  bare ```test_...``` name) is defined in the test suite;
- every section a document names in another (``FORMAT.md, "Threat model"``,
  ``docs/DESIGN.md "Access policy"``, ``README "Exit codes"``) is a heading, or
  a bold run-in heading, of that file;
- every ``--option`` written after a ``kmsfs COMMAND`` in code is an option of
  that command (read from the click commands themselves);
- no document names an internal issue number, and neither does any comment,
  docstring or string of the code, the tests, the scripts or the systemd units.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest

REPO = Path(__file__).parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
TESTS = REPO / "tests"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED = re.compile(r"`((?:tests/[\w/]+/)?test_\w+\.py)?(::\w+)?`")
PATCHES = REPO / "patches"
SECTION = re.compile(
    r"\b(README|(?:docs/)?[\w-]+\.md)(?:,? ?\(?)\s*((?:\"[^\"\n]+\"(?:,? (?:and |or )?)?)+)"
)
ISSUE = re.compile(r"\b[Ii]ssues? #?\d+|(?<![\w#&])#\d{1,3}\b(?!-)|\bround (?:one|two|three)\b")


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def target_doc(name: str) -> Path:
    """The document a reference such as ``README``, ``KEYS.md`` or ``docs/KEYS.md`` names."""
    if name == "README":
        return REPO / "README.md"
    base = Path(name).name
    return REPO / ("README.md" if base == "README.md" else f"docs/{base}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def headings(path: Path) -> tuple[str, ...]:
    """Headings and bold run-in headings (``**Title.**``) of *path*, outside code blocks."""
    found: list[str] = []
    for line in prose_lines(path):
        if match := re.match(r"#{1,6} (.+)", line):
            found.append(re.sub(r"[`*]", "", match.group(1)).strip())
        for bold in re.findall(r"\*\*([^*]+)\*\*", line):
            found.append(bold.strip().rstrip(".:").replace("`", ""))
    return tuple(found)


def prose_lines(path: Path) -> Iterator[str]:
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield line


@cache
def defined_tests() -> dict[str, set[str]]:
    """Test file (relative path) -> names of the functions and classes it defines."""
    found: dict[str, set[str]] = {}
    for path in TESTS.rglob("*.py"):
        text = path.read_text()
        found[str(path.relative_to(REPO))] = set(
            re.findall(r"^\s*(?:async )?(?:def|class) (\w+)", text, re.MULTILINE)
        )
    # the tests a patch of ours adds to another project's suite (pyfuse3's test_fs.py)
    for patch in PATCHES.glob("*.patch"):
        text = patch.read_text()
        for file, body in re.findall(r"^\+\+\+ b/(\S+)\n(.*?)(?=^diff |\Z)", text, re.M | re.S):
            if Path(file).name.startswith("test_"):
                names = re.findall(r"^\+\s*(?:async )?def (test_\w+)", body, re.MULTILINE)
                found.setdefault(f"{patch.name}:{file}", set()).update(names)
    return found


def files_named(name: str) -> list[str]:
    if "/" in name:
        return [name] if name in defined_tests() else []
    return [path for path in defined_tests() if Path(path).name == name]


def is_ours(file_part: str, name_part: str) -> bool:
    """Whether a citation is checked: any with a test name, and every ``tests/...``
    file (a bare ``test_x.py`` without a name may be another project's file)."""
    return bool(name_part) or file_part.startswith("tests/")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_link_resolves(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in {slug(h) for h in headings(path)}:
            broken.append(f"{target}: {path.name} has no heading #{anchor}")
    assert not broken, f"{doc_id(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_cited_test_exists(doc: Path) -> None:
    missing = []
    for line in doc.read_text().splitlines():
        current: list[str] = []  # the file a "::name" on this line continues
        for file_part, name_part in CITED.findall(line):
            if not is_ours(file_part, name_part):
                continue
            if file_part:
                current = files_named(file_part)
                if not current:
                    missing.append(f"{file_part}: no such test file")
                    continue
            name = name_part[2:]
            if not name:
                continue
            if current:
                if not any(name in defined_tests()[f] for f in current):
                    missing.append(f"{file_part or current[0]}::{name}")
            elif not any(name in names for names in defined_tests().values()):
                missing.append(f"::{name} (no file before it on the line)")
        for bare in re.findall(r"`(test_\w+)`", line):
            if not any(bare in names for names in defined_tests().values()):
                missing.append(bare)
    assert not missing, f"{doc_id(doc)} cites tests that do not exist: " + ", ".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_named_section_exists(doc: Path) -> None:
    text = re.sub(r"\s+", " ", " ".join(prose_lines(doc)))  # references may wrap lines
    missing = []
    for name, quoted in SECTION.findall(text):
        target = target_doc(name)
        if not target.exists():
            missing.append(f"{name}: no such document")
            continue
        for section in re.findall(r"\"([^\"]+)\"", quoted):
            if not any(h == section or h.startswith(section) for h in headings(target)):
                missing.append(f'{name} "{section}"')
    assert not missing, f"{doc_id(doc)} names sections that do not exist: " + ", ".join(missing)


@cache
def cli() -> click.Group:
    (script,) = entry_points(group="console_scripts", name="kmsfs")
    group = script.load()
    assert isinstance(group, click.Group)
    return group


def code_commands(doc: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each ``kmsfs ...`` command written as code in *doc*.

    In code blocks a command is a line (with its ``\\`` continuations); in prose,
    an inline code span.  Shell comments and what follows ``|``, ``;`` or ``&&``
    are cut off.
    """
    lines = doc.read_text().splitlines()
    fenced = False
    index = 0
    while index < len(lines):
        line = lines[index]
        number = index + 1
        index += 1
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            while line.endswith("\\") and index < len(lines):
                line = line[:-1] + " " + lines[index]
                index += 1
            spans = [line.lstrip("$ ").strip()]
        else:
            spans = re.findall(r"`([^`]+)`", line)
        for span in spans:
            span = re.split(r"\s#|\s\|\s|;|&&", span)[0]
            if re.match(r"(?:\.venv/bin/)?kmsfs \w", span):
                yield number, span


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_kmsfs_options_exist(doc: Path) -> None:
    wrong = []
    for number, span in code_commands(doc):
        words = span.split()[1:]
        command: click.Command = cli()
        path = ["kmsfs"]
        while words and isinstance(command, click.Group) and words[0] in command.commands:
            command = command.commands[words[0]]
            path.append(words.pop(0))
        if isinstance(command, click.Group):
            continue  # "kmsfs keys" as a name, or a mount helper's "kmsfs SOURCE ..."
        known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        known |= {"-h", "--help"}
        for word in words:
            option = re.match(r"\[?(--?[a-z][\w-]*)", word)
            if option and option.group(1) not in known:
                wrong.append(f"line {number}: {' '.join(path)} has no option {option.group(1)}")
    assert not wrong, f"{doc_id(doc)}: " + "; ".join(wrong)


def issue_numbers(text: str) -> list[str]:
    """``line N: 'issue <number>'`` for each internal issue number *text* names."""
    if not ISSUE.search(text.replace("PKCS#11", "")):  # no match spans lines: the usual case
        return []
    return [
        f"line {number}: {match.group(0)!r}"
        for number, line in enumerate(text.splitlines(), 1)
        for match in ISSUE.finditer(line.replace("PKCS#11", ""))
    ]


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_no_internal_issue_numbers(doc: Path) -> None:
    found = issue_numbers(doc.read_text())
    assert not found, f"{doc_id(doc)} names internal issues (name the behaviour instead): " + (
        ", ".join(found)
    )


@pytest.mark.parametrize("tree", ["kmsfs", "tests", "scripts", "systemd"])
def test_no_internal_issue_numbers_in_code(tree: str) -> None:
    found = []
    for path in sorted((REPO / tree).rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # saved volumes and other binary fixtures
            continue
        found += [f"{doc_id(path)} {where}" for where in issue_numbers(text)]
    assert not found, "internal issue numbers (name the behaviour instead): " + ", ".join(found)
