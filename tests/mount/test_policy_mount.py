"""The access policy enforced by a real mount: real processes under other
uids and other programs (a copy of a binary at another path is another program), on an
``allow_other`` mount configured by a TOML volume config.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import BIN, run_as, run_kmsfs
from support.fuse import requires_fuse
from support.policy_volume import (
    DENY_VAULT,
    NOBODY,
    PolicyVolume,
    as_root,
    denied,
    policy_volume,
)

pytestmark = requires_fuse


@pytest.fixture
def pv(shared_dir: Path) -> Iterator[PolicyVolume]:
    volume = policy_volume(shared_dir)
    yield volume
    volume.vol.umount()


def test_rules_by_program_user_and_root_with_audit(pv: PolicyVolume) -> None:
    reader = pv.program("secret-reader")
    pv.write_config(
        f"""
[policy]
mode = "enforce"
default = "permit"

[[policy.rule]]           # 1: only this program reads /secret
programs = ["{reader}"]
paths = ["/secret/**"]
actions = ["read"]
effect = "permit"

[[policy.rule]]           # 2: nobody else does
paths = ["/secret/**"]
actions = ["read"]
effect = "deny"

[[policy.rule]]           # 3: nobody (the user) may not write /shared, audited
users = [{NOBODY}]
paths = ["/shared/**"]
actions = ["write", "create", "delete"]
effect = "deny"

[[policy.rule]]           # 4: root gets no plaintext of /vault
users = ["root"]
paths = ["/vault/**"]
actions = ["read", "write"]
effect = "deny"
"""
    )
    pv.mount()
    mnt = pv.vol.mountpoint
    # first match wins: the permitted program reads, /bin/cat (rule 2) does not
    assert as_root(reader, mnt / "secret/f").stdout == "secret data\n"
    assert denied(as_root("cat", mnt / "secret/f"))
    assert run_as(NOBODY, reader, mnt / "secret/f").stdout == "secret data\n"
    # per user and per action: nobody reads /shared but cannot write or create there
    assert run_as(NOBODY, "cat", mnt / "shared/f").stdout == "shared data\n"
    assert denied(run_as(NOBODY, "sh", "-c", f"echo x >> {mnt}/shared/f"))
    assert denied(run_as(NOBODY, "touch", mnt / "shared/new"))
    assert denied(run_as(NOBODY, "rm", "-f", mnt / "shared/f"))
    assert as_root("sh", "-c", f"echo root >> {mnt}/shared/f").returncode == 0
    # root is matched like anyone: no plaintext of /vault, while names stay visible
    assert denied(as_root("cat", mnt / "vault/f"))
    assert as_root("ls", mnt / "vault").stdout == "f\n"
    # the default (permit) for what no rule names
    assert run_as(NOBODY, "cat", mnt / "vault/f").stdout == "vault data\n"
    records = pv.records()
    by_rule = {r["rule"]: r for r in records}
    assert {2, 3, 4} <= set(by_rule), records
    denial = by_rule[4]
    assert denial["uid"] == 0 and denial["path"] == "/vault/f" and denial["action"] == "read"
    assert denial["effect"] == "deny" and denial["allowed"] is False
    assert denial["exe"] and str(denial["exe"]).endswith("cat")
    assert by_rule[3]["uid"] == NOBODY


def test_learn_mode_denies_nothing_and_suggest_makes_the_rules(pv: PolicyVolume) -> None:
    app = pv.program("app")
    learn = """
[policy]
mode = "learn"
default = "deny"

[[policy.rule]]
actions = ["list"]
effect = "permit"
"""
    pv.write_config(learn)
    pv.mount()
    mnt = pv.vol.mountpoint
    assert as_root(app, mnt / "shared/f").stdout == "shared data\n"  # nothing denied
    assert run_as(NOBODY, app, mnt / "secret/f").stdout == "secret data\n"
    would_be = pv.records()
    assert would_be and all(r["mode"] == "learn" and r["allowed"] for r in would_be)
    pv.vol.umount()
    suggested = run_kmsfs("policy", "suggest", pv.audit).stdout
    assert "[[policy.rule]]" in suggested and str(app) in suggested
    pv.write_config(learn.replace('"learn"', '"enforce"') + "\n" + suggested)
    pv.audit.unlink()
    pv.mount()
    # exactly the workload that was seen is permitted, other programs are not
    assert as_root(app, mnt / "shared/f").stdout == "shared data\n"
    assert run_as(NOBODY, app, mnt / "secret/f").stdout == "secret data\n"
    assert denied(as_root("cat", mnt / "shared/f"))
    assert denied(run_as(NOBODY, app, mnt / "vault/f"))


def test_reload_applies_a_good_policy_and_keeps_the_old_one_on_error(pv: PolicyVolume) -> None:
    pv.write_config(DENY_VAULT)
    pv.mount()
    mnt = pv.vol.mountpoint
    assert denied(as_root("cat", mnt / "vault/f"))
    bad_rule = '\n[[policy.rule]]\nusers = ["no-such-user-xyz"]\neffect = "deny"\n'
    pv.write_config(DENY_VAULT + bad_rule)
    os.kill(pv.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "policy not reloaded" not in pv.vol.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "policy not reloaded, keeping the current one" in pv.vol.log_text()
    assert "no-such-user-xyz" in pv.vol.log_text()
    assert os.path.ismount(mnt)  # SIGHUP no longer unmounts
    assert denied(as_root("cat", mnt / "vault/f"))  # the old policy still holds
    pv.write_config(DENY_VAULT.replace('"/vault/**"', '"/secret/**"'))
    os.kill(pv.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "policy reloaded" not in pv.vol.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert as_root("cat", mnt / "vault/f").stdout == "vault data\n"
    assert denied(as_root("cat", mnt / "secret/f"))
    assert BIN.exists()
