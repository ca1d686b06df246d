"""The access policy decides on facts the requester cannot forge: attacks on a real mount.

- a backing path reached through a symlink: rule paths must still be the paths in the
  volume (a string prefix of the configured backing path would match nothing, and every
  deny rule would fail open);
- an unprivileged user (uid 65534) in a user and mount namespace of their own
  (``unshare -Urm``, on by default on Debian 12) bind-mounts another binary over the
  permitted program's path: ``/proc/PID/exe`` then names the permitted program;
- a ``programs`` entry that is a symlink names the file it points to, in the mount
  and in ``kmsfs policy check`` alike.

Code run as another user uses Debian's /usr/bin/python3 or coreutils: /root (where the
test's own Python lives) is 0700 here.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import run_as
from support.fuse import requires_fuse
from support.policy_volume import (
    NOBODY,
    PolicyVolume,
    as_root,
    check_policy,
    denied,
    policy_volume,
)

pytestmark = requires_fuse
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs processes as another uid")


def check_read(
    pv: PolicyVolume, program: str | Path, path: str
) -> subprocess.CompletedProcess[str]:
    """``kmsfs policy check`` of a read of *path* by root running *program*."""
    return check_policy(
        pv.toml, "--user", "root", "--program", program, "--path", path, "--action", "read"
    )


@pytest.fixture
def pv(shared_dir: Path) -> Iterator[PolicyVolume]:
    volume = policy_volume(shared_dir)
    yield volume
    volume.vol.umount()


def test_a_symlinked_backing_path_keeps_deny_rules(pv: PolicyVolume, shared_dir: Path) -> None:
    # the operator names the backing directory through a symlinked parent, as in
    # /srv/enc where /srv -> /data
    (shared_dir / "srv").symlink_to(shared_dir)
    link = shared_dir / "srv" / pv.vol.backing.name
    pv.write_config(
        """
[policy]
default = "permit"

[[policy.rule]]
paths = ["/secret/**"]
actions = ["read"]
effect = "deny"
""",
        backing=link,
    )
    pv.mount()
    mnt = pv.vol.mountpoint
    assert denied(as_root("cat", mnt / "secret/f"))  # fails open if paths are string prefixes
    assert as_root("cat", mnt / "shared/f").stdout == "shared data\n"
    check = check_read(pv, "/bin/cat", "/secret/f")
    assert check.returncode == 1 and "denied by rule 1" in check.stdout  # the mount agrees
    records = pv.records()
    assert [(r["path"], r["rule"], r["allowed"]) for r in records] == [("/secret/f", 1, False)]


@needs_root
def test_a_bind_mount_in_a_namespace_of_ones_own_is_not_the_permitted_program(
    pv: PolicyVolume,
) -> None:
    reader = pv.program("secret-reader")  # the one program that may read /secret
    pv.write_config(
        f"""
[policy]
default = "permit"

[[policy.rule]]
programs = ["{reader}"]
paths = ["/secret/**"]
actions = ["read"]
effect = "permit"

[[policy.rule]]
paths = ["/secret/**"]
actions = ["read"]
effect = "deny"
"""
    )
    pv.mount()
    secret = pv.vol.mountpoint / "secret/f"
    assert run_as(NOBODY, reader, secret).stdout == "secret data\n"  # the genuine program
    assert denied(run_as(NOBODY, "cat", secret))
    # the attack: in a user and mount namespace of their own, uid 65534 puts another
    # binary (here cat, which would print anything) at the permitted program's path
    attack = run_as(
        NOBODY,
        "unshare",
        "-Urm",
        "sh",
        "-c",
        f"mount --bind /bin/cat {reader} && exec {reader} {secret}",
    )
    assert "secret data" not in attack.stdout
    assert denied(attack), attack
    # and the genuine binary inside such a namespace is no better: its libraries there
    # are whatever the namespace's owner mounted over them
    inside = run_as(NOBODY, "unshare", "-Urm", reader, secret)
    assert denied(inside), inside
    refused = [r for r in pv.records() if r["allowed"] is False]
    assert len(refused) == 3, refused
    for record in refused[1:]:
        assert record["exe"] is None  # never the permitted program's path
        assert record["unknown_program"] == "another mount namespace", record


def test_a_symlinked_program_entry_is_the_file_it_names(pv: PolicyVolume) -> None:
    real = pv.program("real-reader")
    alias = pv.programs / "reader"  # as /usr/bin/python3 -> python3.11
    alias.symlink_to(real.name)
    pv.write_config(
        f"""
[policy]
default = "deny"

[[policy.rule]]
actions = ["list"]
effect = "permit"

[[policy.rule]]
programs = ["{alias}"]
paths = ["/secret/**"]
actions = ["read"]
effect = "permit"
"""
    )
    pv.mount()
    secret = pv.vol.mountpoint / "secret/f"
    assert as_root(alias, secret).stdout == "secret data\n"  # runs as real-reader
    assert as_root(real, secret).stdout == "secret data\n"
    assert denied(as_root("cat", secret))
    for program in (alias, real):
        check = check_read(pv, program, "/secret/f")
        assert check.returncode == 0 and "permitted by rule 2" in check.stdout, check.stdout
    check = check_read(pv, "/bin/cat", "/secret/f")
    assert check.returncode == 1, check.stdout
    assert f"{alias} is a symlink to {real}" in pv.vol.log_text()
