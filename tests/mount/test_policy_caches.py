"""The kernel's entry and attribute caches under a policy whose ``list`` decisions differ
by requester: kept for paths no such rule matches, never carrying one user's answer to
another (a name looked up, hard-linked or renamed into a path the other may not list).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import run_as, run_kmsfs
from support.fuse import requires_fuse
from support.policy_volume import NOBODY, PolicyVolume, as_root, denied, deny_policy, policy_volume

from kmsfs.fs.fuseloop import PYFUSE3

pytestmark = [
    requires_fuse,
    pytest.mark.skipif(os.geteuid() != 0, reason="runs processes as another uid"),
]
# names under a directory everyone may list (and the kernel keeps): the attacks below
# need a kept parent, as a parent that may not be listed is asked about on every walk
HIDDEN_FROM_NOBODY = deny_policy(NOBODY, '["/shared/hidden*", "/shared/hidden*/**"]', '["list"]')


@pytest.fixture
def pv(shared_dir: Path) -> Iterator[PolicyVolume]:
    volume = policy_volume(shared_dir)
    volume.write_config(HIDDEN_FROM_NOBODY)
    volume.mount()
    yield volume
    volume.vol.umount()


def answered(pv: PolicyVolume, opcode: str = "LOOKUP") -> int:
    """Requests of *opcode* the daemon has answered so far."""
    info = json.loads(run_kmsfs("status", pv.vol.mountpoint, "--json").stdout)
    return int(info["requests"]["by_opcode"].get(opcode, {}).get("count", 0))


def shown_to_nobody(path: Path) -> bool:
    """True if ``test -e`` as NOBODY finds *path* (a plain stat, which the kernel answers
    from its caches: coreutils' ``stat`` asks for more and always reaches the daemon)."""
    return run_as(NOBODY, "test", "-e", path).returncode == 0


def test_what_root_looked_up_stays_refused_to_a_user_the_policy_hides_it_from(
    pv: PolicyVolume,
) -> None:
    mnt = pv.vol.mountpoint
    (mnt / "shared/hidden").write_text("hidden")
    # root looks up everything first (reading a file would update its atime, which
    # makes the kernel ask for its attributes again: this test needs them kept)
    assert as_root("ls", "-lR", mnt).returncode == 0
    assert as_root("test", "-e", mnt / "shared/hidden-missing").returncode == 1
    assert denied(run_as(NOBODY, "cat", mnt / "shared/hidden"))
    assert not shown_to_nobody(mnt / "shared/hidden")
    assert denied(run_as(NOBODY, "stat", mnt / "shared/hidden-missing"))  # no kept ENOENT
    assert run_as(NOBODY, "cat", mnt / "shared/f").stdout == "shared data\n"


def test_a_name_linked_or_renamed_into_a_hidden_one_is_not_answered_from_the_cache(
    pv: PolicyVolume,
) -> None:
    mnt = pv.vol.mountpoint
    (mnt / "shared/moved").write_text("moved")
    (mnt / "shared/dir").mkdir(mode=0o755)
    (mnt / "shared/dir/inner").write_text("inner")
    # root's names are kept by the kernel, for everyone
    assert as_root("ls", "-lR", mnt / "shared").returncode == 0
    os.link(mnt / "shared/f", mnt / "shared/hidden-link")
    os.rename(mnt / "shared/moved", mnt / "shared/hidden-moved")
    os.rename(mnt / "shared/dir", mnt / "shared/hidden-dir")
    for path in ("hidden-link", "hidden-moved", "hidden-dir/inner"):
        assert denied(run_as(NOBODY, "cat", mnt / "shared" / path)), path
    for path in ("hidden-link", "hidden-moved", "hidden-dir", "hidden-dir/inner"):
        assert not shown_to_nobody(mnt / "shared" / path), path
    assert run_as(NOBODY, "cat", mnt / "shared/f").stdout == "shared data\n"


def test_entries_no_rule_testing_the_requester_matches_are_kept_by_the_kernel(
    pv: PolicyVolume,
) -> None:
    mnt = pv.vol.mountpoint
    (mnt / "shared/hidden").write_text("hidden")
    for path in ("shared/f", "shared/hidden"):
        os.stat(mnt / path)
    before = answered(pv)
    for _ in range(5):
        os.stat(mnt / "shared/f")
    kept = answered(pv)
    assert kept - before <= 1  # answered by the kernel (unless it dropped the entry)
    for _ in range(5):
        os.stat(mnt / "shared/hidden")
    assert answered(pv) >= kept + 5  # asked every time: another user may get another answer


@pytest.mark.skipif(
    not PYFUSE3.cache_dir,
    reason="stock pyfuse3 cannot ask the kernel to keep listings (FOPEN_CACHE_DIR): build"
    " the patched one with scripts/setup (docs/pyfuse3-patch.md)",
)
def test_only_a_directory_with_no_hidden_names_below_keeps_its_listing(pv: PolicyVolume) -> None:
    mnt = pv.vol.mountpoint
    (mnt / "shared/hidden").write_text("hidden")
    assert os.listdir(mnt / "vault") == ["f"]
    kept = answered(pv, "READDIRPLUS")
    assert os.listdir(mnt / "vault") == ["f"]
    assert answered(pv, "READDIRPLUS") == kept  # listed from the kernel's cache
    # /shared holds a name hidden from nobody: each opener gets a listing of its own
    assert as_root("ls", mnt / "shared").stdout.split() == ["f", "hidden"]
    assert as_root("ls", mnt / "shared").stdout.split() == ["f", "hidden"]
    assert run_as(NOBODY, "ls", mnt / "shared").stdout.split() == ["f"]
