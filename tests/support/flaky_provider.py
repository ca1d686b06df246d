"""Test-only stand-in for a flaky KMS: the local provider with injected failures.

Run as ``python tests/support/flaky_provider.py mount ...`` (the kmsfs CLI with the
local provider patched).  Before each generate/unwrap, the patched provider
reads the control file named by KMSFS_TEST_FAULTS: a probability in 0..1 of
raising KeyUnavailable ("the KMS did not answer"), as the AWS provider does
on a timeout or throttling.  Writing 0 there is "the KMS is back".

Why a patch and not a real outage: moto's KMS stand-in has no switch for
failures, and a key file that comes and goes only matters at mount (the
local master key is read once).  The patch sits exactly where a real
provider raises: inside ``_generate``/``_unwrap``, below the template method,
the key cache and the operations layer that turns the error into EIO.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

from kmsfs.errors import KeyUnavailable
from kmsfs.keys.local import LocalProvider

_rng = random.Random()


def _maybe_fail(operation: str) -> None:
    try:
        with open(os.environ["KMSFS_TEST_FAULTS"]) as handle:
            rate = float(handle.read().strip() or 0)
    except (OSError, KeyError, ValueError):
        rate = 0.0
    if rate and _rng.random() < rate:
        raise KeyUnavailable(f"injected {operation} failure (test stand-in for a KMS outage)")


_generate = LocalProvider._generate
_unwrap = LocalProvider._unwrap


def _flaky_generate(self: LocalProvider, context: Any) -> tuple[bytes, bytes]:
    _maybe_fail("generate")
    return _generate(self, context)


def _flaky_unwrap(self: LocalProvider, wrapped: Any, context: Any) -> bytes:
    _maybe_fail("unwrap")
    return _unwrap(self, wrapped, context)


LocalProvider._generate = _flaky_generate  # type: ignore[method-assign]
LocalProvider._unwrap = _flaky_unwrap  # type: ignore[method-assign]

if __name__ == "__main__":
    from kmsfs.cli import main

    sys.argv[0] = "kmsfs"
    main()
