"""The test vectors of docs/FORMAT.md: each block is ``<!-- NAME:begin -->`` and a
fenced block of ``field: value`` lines."""

from __future__ import annotations

import re
from pathlib import Path

FORMAT_MD = Path(__file__).parents[2] / "docs" / "FORMAT.md"


def load_vectors(block: str) -> dict[str, str]:
    """The fields of the vector block *block* (``test-vectors``, ``name-vectors``)."""
    text = FORMAT_MD.read_text()
    found = re.search(rf"<!-- {block}:begin -->\n```\n(.*?)```", text, re.S)
    assert found, f"docs/FORMAT.md has no {block} block"
    return dict(line.split(": ", 1) for line in found.group(1).strip().splitlines())
