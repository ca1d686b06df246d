"""The backing filesystem must tell names apart by case (encrypted names may differ in
case only).  This kernel has no CONFIG_UNICODE (an ext4 with the casefold feature does
not mount) and no case-insensitive filesystem with user xattrs, so these tests stand in
for one: the probe's look-up of the upper-case name, and the flags ioctl, are made to
answer as a case-folding filesystem would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsfs.backing import names
from kmsfs.errors import ConfigError


def test_init_refuses_a_filesystem_that_ignores_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names.check_case_sensitive(tmp_path)  # this one tells case apart
    assert os.listdir(tmp_path) == []  # the probe is gone
    real_stat = os.stat

    def folding_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if isinstance(path, str) and path.startswith(".KMSFS-CASE-PROBE-"):
            path = path.lower()
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(names.os, "stat", folding_stat)
    with pytest.raises(ConfigError, match="ignores case in names"):
        names.check_case_sensitive(tmp_path)
    assert os.listdir(tmp_path) == []


def test_mount_refuses_a_casefolded_backing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names.check_not_casefolded(tmp_path)  # no casefold flag here
    flags = names.FS_CASEFOLD_FL.to_bytes(4, "little") + bytes(4)
    monkeypatch.setattr(names.fcntl, "ioctl", lambda fd, request, arg: flags)
    monkeypatch.setattr(names.sys, "byteorder", "little")
    with pytest.raises(ConfigError, match="casefold attribute"):
        names.check_not_casefolded(tmp_path)
