"""Who counts as an admin for ``trusted.*``: real processes, read from /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from kmsfs.backing.xattrs import CAP_SYS_ADMIN, has_capability, is_host_admin


def _in_own_user_namespace(pid: int) -> bool:
    return os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino


def test_root_of_a_user_namespace_is_not_a_host_admin() -> None:
    """``unshare -Ur`` (any local user can) gives a process every capability in its
    effective set, over its own user namespace only."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    proc = subprocess.Popen(["unshare", "-Ur", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not _in_own_user_namespace(proc.pid):
            assert time.monotonic() < deadline, "unshare did not make a user namespace"
            time.sleep(0.01)
        while not has_capability(proc.pid, CAP_SYS_ADMIN):  # set once uid 0 is mapped
            assert time.monotonic() < deadline, "no CAP_SYS_ADMIN in the new namespace"
            time.sleep(0.01)
        assert not is_host_admin(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not is_host_admin(proc.pid)  # gone: not an admin either
    if os.geteuid() == 0:
        assert is_host_admin(os.getpid())
