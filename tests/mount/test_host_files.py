"""Files and directories the host names to the daemon: its log file and audit log, and
the runtime directory of its control socket.

The attacks: a symlink planted where root's daemon will create its log (in /tmp, say)
made the daemon append to whatever file it named; the log was created 0644, readable
by every local user.  Now log files are opened ``O_NOFOLLOW|O_APPEND``, created 0600,
an existing loose one is made 0600 with a log line, and one that is a symlink, not a
regular file, or another user's is refused (exit 3).  Likewise another user could make
the runtime directory of a non-root user's sockets (/tmp/kmsfs-UID) first, or a symlink
there: it is now used only if it is the user's own and 0700.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume

pytestmark = requires_fuse
NOBODY = 65534


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file, not a log\n")
    victim.chmod(0o644)
    return victim


@pytest.mark.parametrize("which", ["--log-file", "--audit-log"])
def test_a_symlink_planted_at_a_log_path_is_not_followed(
    volume: Volume, tmp_path: Path, which: str
) -> None:
    victim = _victim(tmp_path)
    before = victim.read_bytes(), victim.stat().st_mode
    planted = tmp_path / "planted.log"
    planted.symlink_to(victim)
    extra = ["--log-file", str(planted)] if which == "--log-file" else ["--audit-log", str(planted)]
    result = volume.mount(*extra, check=False)
    assert result.returncode == 3, result.stderr
    what = "log file" if which == "--log-file" else "audit log"
    assert result.stderr.strip() == (
        f"kmsfs: error: {what} {planted} is a symbolic link (to '{victim}'), not a regular"
        " file (kmsfs does not follow one here): name a regular file (kmsfs creates it 0600)"
    )
    assert (victim.read_bytes(), victim.stat().st_mode) == before
    assert not os.path.ismount(volume.mountpoint)


def test_log_and_audit_files_are_created_0600(volume: Volume, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    volume.mount("--audit-log", str(audit))
    volume.path("f").write_bytes(b"logged")
    volume.umount()
    assert stat.S_IMODE(volume.log_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert "mounted" in volume.log_text()


def test_an_existing_loose_log_is_made_0600_and_says_so(volume: Volume, tmp_path: Path) -> None:
    """Logs made by earlier versions are 0644: kept (appended to), made 0600, one line."""
    volume.log_file.write_text("an earlier run\n")
    volume.log_file.chmod(0o644)
    audit = tmp_path / "audit.jsonl"
    audit.write_text("")
    audit.chmod(0o640)
    volume.mount("--audit-log", str(audit))
    volume.umount()
    assert stat.S_IMODE(volume.log_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    text = volume.log_text()
    assert text.startswith("an earlier run\n")
    assert f"WARNING kmsfs.server: log file {volume.log_file} was mode 0644: made it 0600" in text
    assert f"WARNING kmsfs.audit: audit log {audit} was mode 0640: made it 0600" in text


def test_a_log_file_of_another_user_is_refused(volume: Volume) -> None:
    """Another user who made the file first (in /tmp, say) could read it or rewrite it."""
    volume.log_file.write_text("")
    volume.log_file.chmod(0o600)
    os.chown(volume.log_file, NOBODY, NOBODY)
    result = volume.mount(check=False)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        f"kmsfs: error: log file {volume.log_file} belongs to uid {NOBODY}, not to root or to"
        f" you (root): run 'chown root {volume.log_file}'"
    )
    assert volume.log_file.read_bytes() == b""


def test_a_fifo_at_the_log_path_is_refused_at_once(volume: Volume) -> None:
    os.mkfifo(volume.log_file, 0o600)
    result = volume.mount(check=False)
    os.unlink(volume.log_file)  # before the fixture reads the log (it would wait for a writer)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().startswith(
        f"kmsfs: error: log file {volume.log_file} is a FIFO, not a regular file"
    )


# -- the runtime directory (control sockets) --------------------------------------------


def _attackers_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o777)
    os.chown(path, NOBODY, NOBODY)  # made first by another local user
    return path


@pytest.mark.parametrize("planted", ["another user's directory", "a symlink"])
def test_mount_and_status_refuse_a_runtime_directory_another_user_made(
    volume: Volume, tmp_path: Path, planted: str
) -> None:
    """The daemon does not put its socket there (no status socket, an error in its log, a
    warning from mount) and ``kmsfs status`` refuses (exit 3) rather than connecting.
    Played by root through KMSFS_RUNTIME_DIR; the non-root default (/tmp/kmsfs-UID) is
    checked by the same code, run as another user below."""
    theirs = _attackers_dir(tmp_path / "theirs")
    runtime = theirs if planted != "a symlink" else tmp_path / "runtime"
    if planted == "a symlink":
        runtime.symlink_to(theirs)
        problem = f"is a symbolic link (to '{theirs}'), not a directory"
    else:
        problem = f"belongs to uid {NOBODY}, not to you (root)"
    volume.env["KMSFS_RUNTIME_DIR"] = str(runtime)
    refusal = (
        f"runtime directory {runtime} {problem}: kmsfs uses only a directory of its own user"
        f" with mode 0700; remove it ('rm -rf {runtime}', as root if it is another user's),"
        " or set KMSFS_RUNTIME_DIR to a directory of yours with mode 0700"
    )
    mounted = volume.mount()
    assert f"kmsfs: warning: {refusal}; this mount has no status socket" in mounted.stderr
    volume.path("f").write_bytes(b"still served")
    status = run_kmsfs("status", volume.mountpoint, check=False, env=volume.env)
    assert status.returncode == 3, status.stderr
    assert status.stderr.strip() == f"kmsfs: error: {refusal}"
    assert os.listdir(theirs) == []  # no socket where the other user could reach it
    volume.umount()
    assert f"ERROR kmsfs.server: no status socket for {volume.mountpoint}: {refusal}" in (
        volume.log_text()
    )


def test_a_loose_runtime_directory_of_ones_own_is_refused_with_chmod(
    volume: Volume, tmp_path: Path
) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    volume.env["KMSFS_RUNTIME_DIR"] = str(runtime)
    status = run_kmsfs("status", volume.mountpoint, check=False, env=volume.env)
    assert status.returncode == 3
    assert status.stderr.strip() == (
        f"kmsfs: error: runtime directory {runtime} is accessible by group or others"
        f" (mode 0755): run 'chmod 700 {runtime}'"
    )
    runtime.chmod(0o700)  # the fix the message gives
    volume.mount()
    assert run_kmsfs("status", volume.mountpoint, env=volume.env).returncode == 0
    assert stat.S_IMODE(os.stat(next(runtime.iterdir())).st_mode) == 0o600


NON_ROOT_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from kmsfs.errors import ConfigError
from kmsfs.server.rundir import open_runtime_dir, runtime_dir
try:
    open_runtime_dir(create=True)
except ConfigError as exc:
    print(exc)
    sys.exit(3)
print("using", runtime_dir())
"""


@pytest.mark.parametrize("planted", ["none", "another user's directory", "a symlink"])
def test_a_non_root_user_refuses_a_tmp_runtime_directory_another_user_made(
    tmp_path: Path, planted: str
) -> None:
    """/tmp/kmsfs-UID of a non-root user (no XDG_RUNTIME_DIR), made first by uid 65534.
    Run as that user with the system's Python (the test venv's lives under /root, 0700):
    the runtime-directory module needs neither trio nor FUSE."""
    uid = 4242
    default = Path(f"/tmp/kmsfs-{uid}")
    subprocess.run(["rm", "-rf", str(default)], check=True)
    theirs = tmp_path / "theirs"
    tmp_path.chmod(0o755)
    try:
        if planted == "another user's directory":
            _attackers_dir(default)
        elif planted == "a symlink":
            _attackers_dir(theirs)
            default.symlink_to(theirs)
            os.lchown(default, NOBODY, NOBODY)
        env = {k: v for k, v in os.environ.items() if "RUNTIME_DIR" not in k}
        source = str(Path(__file__).parents[2])
        result = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            + ["/usr/bin/python3", "-c", NON_ROOT_CHECK, source],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        if planted == "none":
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == f"using {default}"
            st = default.lstat()
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == uid
            assert stat.S_IMODE(st.st_mode) == 0o700
            return
        assert result.returncode == 3, result.stdout + result.stderr
        kind = (
            f"belongs to uid {NOBODY}, not to you ({uid})"
            if planted != "a symlink"
            else f"is a symbolic link (to '{theirs}'), not a directory"
        )
        assert result.stdout.strip().startswith(f"runtime directory {default} {kind}: ")
        assert not theirs.exists() or os.listdir(theirs) == []
    finally:
        subprocess.run(["rm", "-rf", str(default)], check=True)
