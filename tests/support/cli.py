"""Running kmsfs commands from tests: the CLI of this checkout's .venv, as this host or
as another one, and commands as another user."""

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
