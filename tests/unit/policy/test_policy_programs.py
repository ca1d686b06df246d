"""Programs as the files they are (kmsfs/policy/programs.py), with real processes and files:
copies, hard links and symlinks, a program replaced by an upgrade, a reload, and a
process in a user and mount namespace of its own.  Nothing of /proc is mocked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import invoke_kmsfs

from kmsfs.backing.statx import Statx
from kmsfs.policy import IdentityCache, Pending, Policy, Requester, parse_policy
from kmsfs.policy.identity import file_key
from kmsfs.server.policyfile import load_policy, reload_policy

SLEEP = shutil.which("sleep") or "/bin/sleep"
CAT = shutil.which("cat") or "/bin/cat"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def start(processes: list[subprocess.Popen[bytes]], *argv: str | Path) -> int:
    process = subprocess.Popen([str(a) for a in argv])
    processes.append(process)
    return process.pid


def wait_for_exe(pid: int, expected: Path) -> None:
    """Wait until the process *pid* runs the file *expected* (it has exec'ed)."""
    want = os.stat(expected)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            st = os.stat(f"/proc/{pid}/exe")
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never ran {expected}")


def copy_program(source: str, target: Path) -> Path:
    shutil.copy2(source, target)
    target.chmod(0o755)
    return target


def permit(program: str | Path, **more: object) -> Policy:
    return parse_policy(
        {"default": "deny", "rule": [{"programs": str(program), "effect": "permit", **more}]},
        "t.toml",
    )


def allowed(policy: Policy, requester: Requester) -> bool:
    """Decide as the daemon does: non-blocking first, Pending resolved, then again."""
    for _ in range(3):
        try:
            return policy.decide(requester, "read", "/x").allowed
        except Pending as pending:
            pending.resolve()
    raise AssertionError("still pending")


def test_copies_hard_links_and_symlinks(tmp_path: Path) -> None:
    real = copy_program(CAT, tmp_path / "real")
    copy = copy_program(CAT, tmp_path / "copy")  # same bytes, another file
    os.link(real, tmp_path / "hard")  # the same file under another name
    (tmp_path / "soft").symlink_to("real")
    policy = permit(tmp_path / "soft")
    assert policy.programs.notes == [
        (
            logging.INFO,
            f"t.toml: policy rule 1: programs: {tmp_path / 'soft'} is a symlink to {real}:"
            f" the rule matches processes running {real}",
        )
    ]
    for program, expected in ((real, True), (tmp_path / "hard", True), (copy, False)):
        requester = Requester(0, 0, exe=str(program))
        assert allowed(policy, requester) is expected, program
        reason = policy.rule(1).mismatch(requester, "read", "/x")
        assert (reason is None) is expected, reason  # policy check's explanation agrees
    reason = policy.rule(1).mismatch(Requester(0, 0, exe=str(copy)), "read", "/x")
    assert reason == f"program {copy} is not one of its programs ({tmp_path / 'soft'})"


def test_an_inode_number_given_to_a_new_file_is_another_program() -> None:
    old = Statx(dev=8, ino=1234, size=10, mtime_ns=1, ctime_ns=2, birth_ns=100)
    reused = old._replace(birth_ns=200, ctime_ns=300)
    assert file_key(old) != file_key(reused)
    # without birth times, the ctime tells them apart (and changes when a file is unlinked)
    assert file_key(old._replace(birth_ns=None)) != file_key(reused._replace(birth_ns=None))


def test_an_upgraded_program_matches_without_a_reload(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    program = copy_program(SLEEP, tmp_path / "daemon")
    policy = permit(program)
    cache = IdentityCache()
    old_pid = start(processes, program, "60")
    wait_for_exe(old_pid, program)
    assert allowed(policy, cache.lookup(old_pid, 0, 0))
    # the package manager writes the new version beside it and renames it over the path
    os.replace(copy_program(SLEEP, tmp_path / "daemon.new"), program)
    new_pid = start(processes, program, "60")
    wait_for_exe(new_pid, program)
    requester = cache.lookup(new_pid, 0, 0)
    with pytest.raises(Pending):  # the path is stat'ed again, off the loop
        policy.decide(requester, "read", "/x")
    with caplog.at_level(logging.INFO, logger="kmsfs.policy.programs"):
        assert allowed(policy, requester)
    assert f"a new file at {program} (an upgrade?)" in caplog.text
    # the process started before the upgrade runs the old, deleted file: still the program
    # where the filesystem records birth times (else it is denied until restarted)
    old = cache.lookup(old_pid, 0, 0)
    assert old.exe == f"{program} (deleted)"
    assert old.exe_stat is not None
    assert allowed(policy, old) is (old.exe_stat.birth_ns is not None)
    # another program at another path triggers no look-up and is refused
    other = copy_program(SLEEP, tmp_path / "other")
    stranger = cache.lookup(start(processes, other, "60"), 0, 0)
    wait_for_exe(stranger.pid, other)
    assert policy.decide(stranger, "read", "/x").allowed is False


def test_a_reload_keeps_the_files_the_policy_before_accepted(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    program = copy_program(SLEEP, tmp_path / "daemon")
    config = tmp_path / "vol.toml"
    config.write_text(
        f'[policy]\ndefault = "deny"\n[[policy.rule]]\nprograms = "{program}"\neffect = "permit"\n'
    )
    before = load_policy(config)
    old_pid = start(processes, program, "60")
    wait_for_exe(old_pid, program)
    os.replace(copy_program(SLEEP, tmp_path / "daemon.new"), program)
    after, refused = reload_policy(config, before)  # e.g. the reload after the upgrade
    assert refused is None
    cache = IdentityCache()
    old = cache.lookup(old_pid, 0, 0)
    assert old.exe_stat is not None
    assert allowed(after, old) is (old.exe_stat.birth_ns is not None)
    new_pid = start(processes, program, "60")
    wait_for_exe(new_pid, program)
    assert after.decide(cache.lookup(new_pid, 0, 0), "read", "/x").allowed  # stat'ed at load


def test_a_process_in_a_namespace_of_its_own_is_an_unknown_program(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    if subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("user namespaces are disabled here")
    tmp_path.chmod(0o755)
    program = copy_program(SLEEP, tmp_path / "tool")
    digest = hashlib.sha256(program.read_bytes()).hexdigest()
    pid = start(processes, "unshare", "-Urm", program, "60")
    wait_for_exe(pid, program)
    cache = IdentityCache()
    requester = cache.lookup(pid, 0, 0, blocking=True)
    assert requester.unknown_program == "another mount namespace"
    assert requester.exe is None
    # the very file the policy names, but its libraries there may be anything
    assert not allowed(permit(program), requester)
    reason = permit(program).rule(1).mismatch(requester, "read", "/x")
    assert reason == "the program is unknown (another mount namespace)"
    # a sha256 rule names the content, wherever it runs
    by_content = parse_policy(
        {"default": "deny", "rule": [{"sha256": digest, "effect": "permit"}]}, "t.toml"
    )
    assert by_content.decide(requester, "read", "/x").allowed
    # the same program in the daemon's namespaces is known
    here = start(processes, program, "60")
    wait_for_exe(here, program)
    assert allowed(permit(program), cache.lookup(here, 0, 0))


def test_policy_check_says_what_a_symlinked_program_is(tmp_path: Path) -> None:
    real = copy_program(CAT, tmp_path / "real")
    (tmp_path / "alias").symlink_to(real)
    config = tmp_path / "vol.toml"
    config.write_text(
        f'[policy]\ndefault = "deny"\n[[policy.rule]]\nprograms = "{tmp_path / "alias"}"\n'
        'effect = "permit"\n'
    )
    for program in (tmp_path / "alias", real):
        result = invoke_kmsfs(
            "policy", "check", config, "--user", "root", "--program", program,
            "--path", "/x", "--action", "read",
        )  # fmt: skip
        assert "permitted by rule 1" in result.stdout
        assert f"note: {config}: policy rule 1: programs: {tmp_path / 'alias'} is a symlink" in (
            result.stdout
        )
    alias = invoke_kmsfs(
        "policy", "check", config, "--user", "root", "--program", tmp_path / "alias",
        "--path", "/x", "--action", "read",
    ).stdout  # fmt: skip
    assert f"running {tmp_path / 'alias'} (a symlink to {real})" in alias
