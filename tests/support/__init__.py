"""The library the tests share (``from support.volumes import Volume``; pytest's
``pythonpath`` setting puts tests/ on the import path).

- ``cli``: running kmsfs (``run_kmsfs``, ``BIN``), as another host or another user;
- ``fuse``: whether FUSE is there (``requires_fuse``), ``force_unmount``, waits;
- ``volumes``: ``Volume``, ``make_volume``, the names parametrization (``BOTH_NAMES``);
- KMS and HSM stand-ups, planted attacks, saved volumes, the crash harness and the
  other ``*_support`` modules; ``mountcheck``, a plugin that checks the ``mount``
  marker (``pytest -p support.mountcheck``).

The fixtures are in tests/conftest.py; the KMS stand-in (moto behind a proxy) is
scripts/benchlib/kms.py, shared with the benchmarks.
"""
