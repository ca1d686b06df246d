"""Operating the access policy on a real mount: listings, reloads and what survives them,
the active policy in the log and ``kmsfs status``, ``systemctl reload``'s command, a
policy that refuses the daemon its own readiness check, and exec-only programs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
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
    deny_policy,
    policy_volume,
    wait_for,
)

from kmsfs.fs.fuseloop import PYFUSE3

pytestmark = requires_fuse
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs processes as another uid")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pv(shared_dir: Path) -> Iterator[PolicyVolume]:
    volume = policy_volume(shared_dir)
    yield volume
    volume.vol.umount()


def reload_command(config: Path) -> list[str]:
    """The unit's ExecReload= command line, for the config file *config*."""
    unit = (REPO / "systemd/kmsfs@.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecReload="))
    command = line.partition("=")[2].replace("/usr/local/bin/kmsfs", str(BIN))
    return shlex.split(command.replace("/etc/kmsfs/%i.toml", str(config)))


@needs_root
def test_a_listing_leaves_out_what_the_requester_may_not_list(pv: PolicyVolume) -> None:
    mnt = pv.vol.mountpoint
    pv.write_config(deny_policy(NOBODY, '["/shared/hidden*"]', '["list"]'))
    pv.mount()
    for name in ("hidden1", "hidden2", "visible"):
        (mnt / "shared" / name).write_text(name)  # as root, whom no rule names
    assert run_as(NOBODY, "ls", mnt / "shared").stdout.split() == ["f", "visible"]
    assert as_root("ls", mnt / "shared").stdout.split() == ["f", "hidden1", "hidden2", "visible"]
    assert denied(run_as(NOBODY, "stat", mnt / "shared/hidden1"))
    # entries left out of a listing are not audited one by one: only the stat was
    assert {r["path"] for r in pv.records()} == {"/shared/hidden1"}


def test_descriptors_opened_before_a_reload_keep_what_they_were_given(
    pv: PolicyVolume,
) -> None:
    mnt = pv.vol.mountpoint
    pv.write_config('[policy]\ndefault = "permit"\n')
    pv.mount()
    held = os.open(mnt / "vault/f", os.O_RDONLY)
    folder = os.open(mnt / "vault", os.O_RDONLY | os.O_DIRECTORY)
    try:
        pv.write_config(
            DENY_VAULT + '\n[[policy.rule]]\npaths = ["/vault/f"]\nactions = ["list"]\n'
            'effect = "deny"\n'
        )
        assert subprocess.run(reload_command(pv.toml), capture_output=True).returncode == 0
        # a file opened before the reload: decided at open, it keeps reading
        assert os.pread(held, 100, 0) == b"vault data\n"
        with pytest.raises(PermissionError):  # a new open is decided by the new policy
            open(mnt / "vault/f", "rb").close()
        # a directory opened before: its next listing is made under the new policy
        assert os.listdir(folder) == []
    finally:
        os.close(held)
        os.close(folder)


def readdirplus_count(pv: PolicyVolume) -> int:
    """READDIRPLUS requests the daemon has answered so far."""
    info = json.loads(run_kmsfs("status", pv.vol.mountpoint, "--json").stdout)
    return int(info["requests"]["by_opcode"].get("READDIRPLUS", {}).get("count", 0))


@pytest.mark.skipif(
    not PYFUSE3.cache_dir,
    reason="stock pyfuse3 cannot ask the kernel to keep listings (FOPEN_CACHE_DIR): build"
    " the patched one with scripts/setup (docs/pyfuse3-patch.md)",
)
def test_a_listing_the_kernel_kept_is_made_again_after_a_reload(pv: PolicyVolume) -> None:
    """A policy whose ``list`` rules ignore the requester leaves kept listings on; one kept
    under it must not outlive a reload that hides an entry (before: the kernel went on
    listing the hidden name from its cache until the directory changed)."""
    mnt = pv.vol.mountpoint
    pv.write_config('[policy]\ndefault = "permit"\n')
    pv.mount()
    for name in ("hidden", "visible"):
        (mnt / "shared" / name).write_text(name)
    assert sorted(os.listdir(mnt / "shared")) == ["f", "hidden", "visible"]
    kept = readdirplus_count(pv)
    assert sorted(os.listdir(mnt / "shared")) == ["f", "hidden", "visible"]
    assert readdirplus_count(pv) == kept  # listed from the kernel's cache
    pv.write_config(
        '[policy]\ndefault = "permit"\n\n[[policy.rule]]\npaths = ["/shared/hidden"]\n'
        'actions = ["list"]\neffect = "deny"\n'
    )
    assert subprocess.run(reload_command(pv.toml), capture_output=True).returncode == 0
    assert sorted(os.listdir(mnt / "shared")) == ["f", "visible"]
    # the new listing is kept in turn, under the policy in force
    kept = readdirplus_count(pv)
    assert sorted(os.listdir(mnt / "shared")) == ["f", "visible"]
    assert readdirplus_count(pv) == kept


def test_the_active_policy_is_in_the_log_and_in_status(pv: PolicyVolume) -> None:
    pv.write_config(DENY_VAULT)
    pv.mount()
    assert (
        f"access policy: 1 rules, default permit, mode enforce (from {pv.toml})"
        in pv.vol.log_text()
    )
    info = json.loads(run_kmsfs("status", pv.vol.mountpoint, "--json").stdout)
    assert info["policy"] == {
        "mode": "enforce",
        "default": "permit",
        "rules": 1,
        "rules_not_applied": 0,
        "source": str(pv.toml),
        "summary": "1 rules, default permit, mode enforce",
        "config_file": str(pv.toml),
        "reloads": 0,
        "reloads_refused": 0,
    }
    text = run_kmsfs("status", pv.vol.mountpoint).stdout
    assert f"access policy:  1 rules, default permit, mode enforce (from {pv.toml})" in text


def test_a_relative_config_path_still_reloads_after_the_daemon_detached(
    pv: PolicyVolume,
) -> None:
    pv.write_config(DENY_VAULT)
    pv.mount(cwd=pv.toml.parent, config=Path(pv.toml.name))  # --config vol.toml
    mnt = pv.vol.mountpoint
    assert denied(as_root("cat", mnt / "vault/f"))
    pv.write_config(DENY_VAULT.replace("/vault/**", "/secret/**"))
    os.kill(pv.pid, signal.SIGHUP)  # the daemon's working directory is / by now
    pv.wait_for_log("policy reloaded")
    assert as_root("cat", mnt / "vault/f").stdout == "vault data\n"
    assert denied(as_root("cat", mnt / "secret/f"))


def test_systemctl_reload_fails_when_the_daemon_refuses_the_file(pv: PolicyVolume) -> None:
    pv.write_config(DENY_VAULT)
    pv.mount()
    mnt = pv.vol.mountpoint
    command = reload_command(pv.toml)
    # a good change: exit 0 once the daemon serves it
    pv.write_config(DENY_VAULT.replace("/vault/**", "/secret/**"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert "policy reloaded" in done.stdout
    assert as_root("cat", mnt / "vault/f").stdout == "vault data\n"  # in force on return
    # [policy] dropped by mistake: refused, the policy in force stays, the reload fails
    pv.write_config("")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert refused.returncode == 3, refused
    assert "has no [policy] table: reloading it would permit every request" in refused.stderr
    assert 'write [policy] with mode = "off"' in refused.stderr
    assert denied(as_root("cat", mnt / "secret/f"))
    assert "policy not reloaded, keeping the current one" in pv.vol.log_text()
    # a rule the daemon refuses (an unknown user): the same
    pv.write_config(DENY_VAULT + '[[policy.rule]]\nusers = ["no-such-user-xyz"]\neffect = "deny"\n')
    refused = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert refused.returncode == 3 and "no-such-user-xyz" in refused.stderr, refused
    # switching the policy off is said explicitly
    pv.write_config('[policy]\nmode = "off"\n')
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert as_root("cat", mnt / "secret/f").stdout == "secret data\n"
    info = json.loads(run_kmsfs("status", mnt, "--json").stdout)
    assert (info["policy"]["reloads"], info["policy"]["reloads_refused"]) == (2, 1)


def test_a_policy_that_refuses_the_readiness_check_fails_the_mount_with_exit_7(
    pv: PolicyVolume,
) -> None:
    pv.write_config('[policy]\ndefault = "deny"\n')
    result = subprocess.run(
        [str(BIN), "mount", "--config", str(pv.toml), "--log-file", str(pv.vol.log_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 7, result
    assert "does not answer the daemon's own readiness check" in result.stderr
    assert "denies list on / to the daemon (uid 0, program " in result.stderr
    assert "by the default (deny)" in result.stderr
    assert 'paths = ["/"] actions = ["list"]' in result.stderr
    wait_for(lambda: not os.path.ismount(pv.vol.mountpoint), 10, "the mount to go")


@needs_root
def test_exec_without_read_needs_the_mode_bits_too(pv: PolicyVolume) -> None:
    # The policy refuses uid 65534 reading /tools and permits running what is there.  The
    # kernel lets a process of the same uid read the program's memory (ptrace,
    # /proc/PID/mem) unless the file's mode refuses that uid read, as docs/POLICY.md says.
    mnt = pv.vol.mountpoint
    pv.write_config(deny_policy(NOBODY, '["/tools/**"]', '["read"]'))
    pv.mount()
    (mnt / "tools").mkdir(mode=0o755)  # as root, whom no rule names
    tool = mnt / "tools/sleep"
    tool.write_bytes(Path("/bin/sleep").read_bytes())
    tool.chmod(0o755)
    first_page = hashlib.sha256(tool.read_bytes()[:4096]).hexdigest()
    assert denied(run_as(NOBODY, "cat", tool))
    assert memory_of(tool) == first_page  # readable mode: the program can be copied
    pv.wait_for_log("lets that uid read it, so the running program can be read from its memory")
    tool.chmod(0o711)  # as root: exec-only for everyone else
    assert memory_of(tool).startswith("refused")
    assert denied(run_as(NOBODY, "cat", tool))


READ_OWN_CHILD = """
import hashlib, subprocess, sys, time
child = subprocess.Popen([sys.argv[1], "30"])
try:
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(f"/proc/{child.pid}/maps") as maps:
                lines = [l for l in maps if l.rstrip().endswith(sys.argv[1])]
            with open(f"/proc/{child.pid}/mem", "rb") as mem:
                mem.seek(int(lines[0].split("-")[0], 16))
                print(hashlib.sha256(mem.read(4096)).hexdigest())
            break
        except PermissionError as exc:
            print("refused", exc.errno)
            break
        except (IndexError, FileNotFoundError):  # not exec'ed yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
finally:
    child.kill()
"""


def memory_of(program: Path) -> str:
    """As uid 65534: run *program*, and read its first page from the process's memory."""
    result = run_as(NOBODY, "/usr/bin/python3", "-c", READ_OWN_CHILD, program)
    assert result.returncode == 0, result
    return result.stdout.strip()
