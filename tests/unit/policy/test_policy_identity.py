"""Requester identities read from real processes: /proc/PID/exe, groups, executable hashes.

Programs get a new identity by being copied to another path (``cp /bin/sleep
DIR/mysleep``).  Nothing of /proc is mocked.  The pid-reuse test makes the
kernel give a new process a chosen pid through /proc/sys/kernel/ns_last_pid
(root only).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.policy import HashPending, IdentityCache, parse_policy

SLEEP = shutil.which("sleep") or "/bin/sleep"
CAT = shutil.which("cat") or "/bin/cat"
BASH = shutil.which("bash") or "/bin/bash"
NOBODY = 65534
BACKUP = 34


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def copy_program(source: str, target: Path) -> Path:
    shutil.copy2(source, target)
    os.chmod(target, 0o755)
    return target


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        with process:  # closes its stdin pipe and waits for it
            pass


def start(processes: list[subprocess.Popen[bytes]], *argv: str | Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE)
    processes.append(process)
    return process


def wait_for_exe(pid: int, expected: str, timeout: float = 10) -> None:
    """Wait until the process *pid* runs *expected* (it has exec'ed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/exe") == expected:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never ran {expected}")


def test_a_copied_binary_is_another_program(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    mysleep = copy_program(SLEEP, tmp_path / "mysleep")
    copy = start(processes, mysleep, "60")
    original = start(processes, SLEEP, "60")
    wait_for_exe(copy.pid, str(mysleep))
    wait_for_exe(original.pid, os.path.realpath(SLEEP))
    cache = IdentityCache()
    policy = parse_policy(
        {"default": "deny", "rule": [{"programs": str(mysleep), "effect": "permit"}]}, "t.toml"
    )
    assert cache.lookup(copy.pid, 0, 0).exe == str(mysleep)
    assert policy.decide(cache.lookup(copy.pid, 0, 0), "read", "/x").allowed
    assert not policy.decide(cache.lookup(original.pid, 0, 0), "read", "/x").allowed


def test_a_process_that_execs_gets_the_new_programs_identity(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    # the attack: a permitted program exec's another one; the pid stays, the identity must not
    mybash = copy_program(BASH, tmp_path / "mybash")
    mysleep = copy_program(SLEEP, tmp_path / "mysleep")
    shell = start(processes, mybash, "-c", f"read line; exec {mysleep} 60")
    wait_for_exe(shell.pid, str(mybash))
    cache = IdentityCache()
    policy = parse_policy(
        {"default": "deny", "rule": [{"sha256": sha256_of(mybash), "effect": "permit"}]}, "t.toml"
    )
    before = cache.lookup(shell.pid, 0, 0, blocking=True)
    assert before.exe == str(mybash)
    assert policy.decide(before, "read", "/x").allowed  # hashed and cached for this process
    assert shell.stdin is not None
    shell.stdin.write(b"go\n")
    shell.stdin.flush()
    wait_for_exe(shell.pid, str(mysleep))
    after = cache.lookup(shell.pid, 0, 0, blocking=True)
    assert after.exe == str(mysleep)
    assert not after.sha256_known  # the cached hash was of the program before the exec
    assert after.sha256 == sha256_of(mysleep)
    assert not policy.decide(after, "read", "/x").allowed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: writes ns_last_pid to reuse a pid")
def test_a_reused_pid_does_not_inherit_the_hash_of_the_process_before(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    # the attack: a process running a pinned program exits; another program, put at the
    # same path, gets the same pid; a cache keyed on pid and path would permit it
    program = copy_program(SLEEP, tmp_path / "prog")
    pinned = sha256_of(program)
    first = start(processes, program, "60")
    wait_for_exe(first.pid, str(program))
    pid = first.pid
    cache = IdentityCache()
    policy = parse_policy(
        {"default": "deny", "rule": [{"sha256": pinned, "effect": "permit"}]}, "t.toml"
    )
    assert policy.decide(cache.lookup(pid, 0, 0, blocking=True), "read", "/x").allowed
    first.kill()
    first.wait()
    replacement = copy_program(CAT, tmp_path / "prog.new")
    os.replace(replacement, program)
    # start times count clock ticks (10 ms): a pid is never reused that fast without
    # ns_last_pid (the kernel hands out every other pid first)
    time.sleep(0.05)
    second = None
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
            handle.write(str(pid - 1))
        candidate = start(processes, program)
        if candidate.pid == pid:
            second = candidate
            break
        candidate.kill()
    if second is None:
        pytest.skip(f"other processes kept taking pid {pid} (busy machine)")
    wait_for_exe(pid, str(program))
    requester = cache.lookup(pid, 0, 0)
    assert requester.exe == str(program)  # same pid, same path ...
    assert not requester.sha256_known  # ... but another process: hash again
    with pytest.raises(HashPending):
        policy.decide(requester, "read", "/x")
    assert requester.compute_sha256() == sha256_of(CAT)
    assert not policy.decide(requester, "read", "/x").allowed


def test_hashes_are_cached_per_process_and_per_file(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    mysleep = copy_program(SLEEP, tmp_path / "mysleep")
    one = start(processes, mysleep, "60")
    two = start(processes, mysleep, "60")
    wait_for_exe(one.pid, str(mysleep))
    wait_for_exe(two.pid, str(mysleep))
    cache = IdentityCache()
    first = cache.lookup(one.pid, 0, 0)
    assert not first.sha256_known
    assert first.compute_sha256() == sha256_of(SLEEP)
    assert cache.lookup(one.pid, 0, 0).sha256_known  # per process
    second = cache.lookup(two.pid, 0, 0)
    assert second.compute_sha256() == sha256_of(SLEEP)
    assert cache.hashes == 1  # per file: the second process's executable was not read again


def test_a_deleted_executable_keeps_its_path_and_content(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    mysleep = copy_program(SLEEP, tmp_path / "mysleep")
    process = start(processes, mysleep, "60")
    wait_for_exe(process.pid, str(mysleep))
    before = IdentityCache().lookup(process.pid, 0, 0).exe_stat
    mysleep.unlink()  # as a package upgrade replaces a running daemon's binary
    requester = IdentityCache().lookup(process.pid, 0, 0, blocking=True)
    assert requester.exe == f"{mysleep} (deleted)"
    assert requester.unknown_program is None
    after = requester.exe_stat
    assert before is not None and after is not None
    assert (after.dev, after.ino, after.birth_ns) == (before.dev, before.ino, before.birth_ns)
    assert requester.sha256 == sha256_of(SLEEP)  # read through /proc/PID/exe


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: starts a process as another user")
def test_supplementary_groups_are_read_from_the_process(
    processes: list[subprocess.Popen[bytes]],
) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    process = start(
        processes,
        setpriv,
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        f"--groups={BACKUP}",
        SLEEP,
        "60",
    )
    wait_for_exe(process.pid, os.path.realpath(SLEEP))
    cache = IdentityCache()
    policy = parse_policy(
        {"default": "deny", "rule": [{"groups": "backup", "effect": "permit"}]}, "t.toml"
    )
    member = cache.lookup(process.pid, NOBODY, NOBODY)
    assert member.groups == {NOBODY, BACKUP}
    assert policy.decide(member, "read", "/x").allowed
    # the same uid/gid from a process without the group
    other = start(
        processes, setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SLEEP, "60"
    )
    wait_for_exe(other.pid, os.path.realpath(SLEEP))
    assert not policy.decide(cache.lookup(other.pid, NOBODY, NOBODY), "read", "/x").allowed


def test_unknown_processes_have_no_program(processes: list[subprocess.Popen[bytes]]) -> None:
    cache = IdentityCache()
    assert cache.lookup(0, 0, 0).exe is None  # the kernel's own requests, other pid namespaces
    gone = start(processes, "true")
    gone.wait()
    requester = cache.lookup(gone.pid, 0, 0, blocking=True)
    assert requester.exe is None
    assert requester.sha256 is None
    assert requester.groups == {0}
    policy = parse_policy(
        {"rule": [{"programs": "/usr/bin/true", "effect": "deny"}], "default": "permit"}, "t"
    )
    assert policy.decide(requester, "read", "/x").rule is None


def test_the_caches_are_bounded(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    cache = IdentityCache(max_files=2)
    programs = [copy_program(SLEEP if n % 2 else CAT, tmp_path / f"p{n}") for n in range(4)]
    for n, program in enumerate(programs):
        (tmp_path / f"p{n}").chmod(0o755)
        process = start(processes, program, "60") if n % 2 else start(processes, program)
        wait_for_exe(process.pid, str(program))
        assert cache.lookup(process.pid, 0, 0).compute_sha256() is not None
    assert len(cache._by_file) == 2
