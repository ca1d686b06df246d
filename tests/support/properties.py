"""How many examples a property test of the unit tier runs: the two profiles.

Each property test states the examples the full run gives it (``@examples(400)``):

- ``full`` (``KMSFS_PROPERTIES=full``, which scripts/test sets: the whole suite and CI)
  runs them all, random, as Hypothesis does by default: each run tries new examples,
  and a failure is saved in the example database and tried first the next run;
- ``unit`` (otherwise: ``pytest tests/unit``, the loop run after each edit) runs a
  quarter of them, at least 50, derandomized: the same examples every run, so a
  failure there is the edit's, not a rare input met by chance.  The examples are
  Hypothesis's own choice for each test (its boundary values and small cases first,
  then random ones from a seed fixed per test), not a hand-picked list.

No deadline in either: the machine is shared, and timings are never asserted.
"""

from __future__ import annotations

import os

from hypothesis import settings

PROFILE_VARIABLE = "KMSFS_PROPERTIES"
UNIT_SHARE = 4
UNIT_MINIMUM = 50


def profile() -> str:
    """``full`` or ``unit`` (anything else, and unset, is ``unit``)."""
    return "full" if os.environ.get(PROFILE_VARIABLE) == "full" else "unit"


def examples(full: int) -> settings:
    """The settings of a property test that runs *full* examples in the full profile."""
    if profile() == "full":
        return settings(max_examples=full, deadline=None)
    unit = max(full // UNIT_SHARE, min(full, UNIT_MINIMUM))
    return settings(max_examples=unit, deadline=None, derandomize=True, database=None)
