"""Files and directories the host names to the daemon: its log file and audit log.

The attacks: a symlink planted where root's daemon will create its log (in /tmp, say)
made the daemon append to whatever file it named; the log was created 0644, readable
by every local user.  Now log files are opened ``O_NOFOLLOW|O_APPEND``, created 0600,
an existing loose one is made 0600 with a log line, and one that is a symlink, not a
regular file, or another user's is refused (exit 3).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import Volume, requires_fuse

pytestmark = [requires_fuse, pytest.mark.mount]
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
