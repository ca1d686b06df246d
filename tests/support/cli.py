"""Running kmsfs commands from tests: the CLI of this checkout's .venv in a subprocess
(``run_kmsfs``) or in this process (``invoke_kmsfs``), as this host or as another one,
and commands as another user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "kmsfs"
# The options that name a volume's key on this host (a mount given one of them does not
# also get the volume's own key options).
KEY_FLAGS = {
    "--key-file",
    "--passphrase-file",
    "--kms-key-id",
    "--pkcs11-module",
    "--trust-volume-settings",
}


def run_kmsfs(
    *args: str | os.PathLike[str],
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the kmsfs CLI; with check=True a non-zero exit fails the test with its stderr."""
    result = subprocess.run(
        [str(BIN), *map(str, args)],
        capture_output=True,
        text=True,
        input=input,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"kmsfs {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}")
    return result


def invoke_kmsfs(
    *args: str | os.PathLike[str],
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a kmsfs command in this process, through click's CliRunner: the same exit
    code, stdout and stderr as ``run_kmsfs`` gives, without starting an interpreter and
    importing kmsfs again (about 0.3 s a command, more without bytecode caches).

    For the commands that return (policy, inspect, ...) and a ``mount`` that fails before
    it starts anything; a mount that starts a daemon is run with ``run_kmsfs``.  An
    exception other than the command's exit is raised
    here, where a subprocess would print its traceback and exit 1.
    """
    from click.testing import CliRunner

    from kmsfs.cli import main

    argv = [str(arg) for arg in args]
    result = CliRunner().invoke(main, argv, input=input, env=env, prog_name="kmsfs")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if check and result.exit_code != 0:
        pytest.fail(f"kmsfs {' '.join(argv)} exited {result.exit_code}: {result.stderr}")
    return subprocess.CompletedProcess(
        ["kmsfs", *argv], result.exit_code, result.stdout, result.stderr
    )


def other_host(tmp_path: Path, name: str = "host-b") -> dict[str, str]:
    """The environment of kmsfs commands run as another host: a state directory (pins)
    of its own under *tmp_path*."""
    path = tmp_path / f"{name}-state"
    path.mkdir(mode=0o700, exist_ok=True)
    return {"KMSFS_STATE_DIR": str(path)}


def run_as(uid: int, *command: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run *command* as user and group *uid*, without supplementary groups (setpriv)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *map(str, command)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
