"""``kmsfs mount``'s options as the MountSpec gets them (kmsfs/cli/mountspec.py)."""

from __future__ import annotations

from kmsfs.cli.mountspec import mount_spec


def spec_of(*options: str):  # type: ignore[no-untyped-def]
    return mount_spec(
        "/srv/enc",
        "/srv/data",
        options,
        key_options={},
        prompt=None,
        cache_max_entries=None,
        cache_max_age=None,
        audit_log=None,
        metrics_listen=None,
        log_level="info",
        log_file=None,
    )


def test_auto_rekey_is_kmsfs_own_option_not_passed_to_fuse() -> None:
    """``-o auto_rekey`` turns the online rekey of worn format-1 keys on; FUSE never
    sees it (an unknown option would make the mount fail)."""
    spec = spec_of("ro,auto_rekey", "allow_other")
    assert spec.auto_rekey is True
    assert spec.fuse_options == ("ro", "allow_other")
    assert spec.read_only
    assert spec_of("ro").auto_rekey is False
