"""Helpers the tests share: KMS and HSM stand-ups, planted attacks, saved volumes,
the crash harness.  Fixtures and the volume helpers are in tests/conftest.py."""
