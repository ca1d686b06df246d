"""The benchmark harness behind ``scripts/bench`` (see docs/PERFORMANCE.md).

Modules: ``common`` (running commands, /proc readings), ``systems`` (how each
filesystem under test is created, mounted and unmounted), ``workloads`` (the
rows), ``report`` (medians, ratios, the table), ``cli`` (options and the run
loop), ``cproject`` (the generated C project of the git row), ``micro``
(format-layer micro-benchmarks, run with the checkout's .venv) and ``floorfs``
(the in-memory pyfuse3 filesystem of the ``floor`` system, run with the .venv);
``kms`` is the KMS stand-in (moto's server behind a counting, delaying,
fault-injecting proxy) that scripts/bench-kms and the KMS tests share.

The harness itself uses only the standard library, so the system python3 runs it.
"""
