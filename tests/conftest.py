"""Shared fixtures and hooks: volumes created with the real CLI and mounted with real
FUSE, moto's KMS server, the ``mount`` marker.  The library the tests import (Volume,
make_volume, run_kmsfs, requires_fuse, force_unmount, ...) is the package
tests/support; nothing imports from this file.

Every mount made here is unmounted at teardown whatever happened
(``fusermount3 -u``, then a lazy unmount), and the daemon's log is checked
for tracebacks, which fail the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.fuse import force_unmount, fuse_available
from support.volumes import Volume, check_log, make_volume

if TYPE_CHECKING:
    from benchlib.kms import KmsProxy, MotoServer

MOUNT_DIR = Path(__file__).parent / "mount"
MOUNTING_FIXTURES = {"mounted"}  # fixtures that mount a volume for the test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``mount`` every test that mounts or tries to: those of tests/mount/ but the
    ones marked ``nomount`` (the CLI and the offline tools against real volumes), and
    those using a mounting fixture; so ``-m "not mount"`` needs no /dev/fuse.  Checked
    against what the tests do by ``pytest -p support.mountcheck``."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        in_mount_tier = item.path.is_relative_to(MOUNT_DIR)
        if fixtures & MOUNTING_FIXTURES or (
            in_mount_tier and item.get_closest_marker("nomount") is None
        ):
            item.add_marker(pytest.mark.mount)


@pytest.fixture(scope="session", autouse=True)
def host_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This host's kmsfs state (the volume pins) for the session, in a private temporary
    directory (``KMSFS_STATE_DIR``), so no test reads or writes /var/lib/kmsfs.  A test
    that plays a second host gives its commands another one (``other_host``)."""
    path = tmp_path_factory.mktemp("host-state")
    path.chmod(0o700)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KMSFS_STATE_DIR", str(path))
        yield path


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 0755 directory in /tmp, so that other uids (``run_as``) can reach mounts under
    it (pytest's own tmp directory is 0700).  Mounts at ``mnt*`` in it are unmounted
    at teardown."""
    path = Path(tempfile.mkdtemp(prefix="kmsfs-shared-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mountpoint in path.glob("mnt*"):
            force_unmount(mountpoint)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def volume(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    """A local-provider volume (key file), created but not mounted; with plain names,
    or the names a module asks for with ``BOTH_NAMES`` (``request.param``)."""
    vol = make_volume(tmp_path, names=getattr(request, "param", "plain"))
    try:
        yield vol
    finally:
        force_unmount(vol.mountpoint)
        check_log(vol)


@pytest.fixture
def mounted(volume: Volume) -> Iterator[Volume]:
    """A mounted local-provider volume."""
    if not fuse_available():
        pytest.skip("needs /dev/fuse")
    volume.mount()
    yield volume
    if volume.mounted and os.path.ismount(volume.mountpoint):
        volume.umount()


# -- AWS KMS on moto's server (scripts/benchlib/kms.py), shared by the KMS test modules --


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's KMS server on 127.0.0.1, one per test module."""
    from benchlib.kms import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[KmsProxy]:
    """A counting, fault-injecting proxy in front of moto."""
    from benchlib.kms import KmsProxy

    kms_proxy = KmsProxy(moto.url)
    yield kms_proxy
    kms_proxy.close()


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for the kmsfs subprocesses, and nothing from this machine's AWS setup."""
    from benchlib.kms import aws_environment

    for name in ("AWS_PROFILE", "AWS_REGION", "HTTP_PROXY", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_environment(tmp_path).items():
        monkeypatch.setenv(name, value)
