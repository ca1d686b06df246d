"""A volume mounted through a TOML config whose ``[policy]`` a test writes, and the helpers
the access-policy mount tests share (processes as root or as another uid, EACCES checks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from support.cli import BIN, run_kmsfs
from support.volumes import Volume, make_volume

NOBODY = 65534
# a policy that refuses everyone reading /vault and permits the rest
DENY_VAULT = """
[policy]
mode = "enforce"
default = "permit"

[[policy.rule]]
paths = ["/vault/**"]
actions = ["read"]
effect = "deny"
"""


def deny_policy(uid: int, paths: str, actions: str) -> str:
    """A default-permit [policy] with one rule denying *uid* the *actions* on *paths*
    (TOML arrays as text, e.g. '["/tools/**"]')."""
    return f"""
[policy]
default = "permit"

[[policy.rule]]
users = [{uid}]
paths = {paths}
actions = {actions}
effect = "deny"
"""


class PolicyVolume:
    """A volume mounted through a TOML config whose [policy] the test writes.

    Attributes: vol (the Volume), toml (the config file), audit (its audit log),
    programs (a 0755 directory for copies of binaries), pid (the daemon, once mounted).
    """

    def __init__(self, vol: Volume, root: Path) -> None:
        self.vol = vol
        self.toml = root / "vol.toml"
        self.audit = root / "audit.jsonl"
        self.programs = root / "programs"
        self.programs.mkdir(mode=0o755)
        self.pid = 0

    def write_config(self, policy: str, backing: Path | None = None) -> None:
        self.toml.write_text(
            f'backing = "{backing or self.vol.backing}"\n'
            f'mountpoint = "{self.vol.mountpoint}"\n'
            'options = ["allow_other"]\n'
            f'audit_log = "{self.audit}"\n'
            f'[provider]\ntype = "local"\nkey_file = "{self.vol.key_file}"\n' + policy
        )
        self.toml.chmod(0o644)

    def mount(self, cwd: Path | None = None, config: Path | None = None) -> None:
        """``kmsfs mount --config`` (*config* instead of ``toml``, run in *cwd*)."""
        result = subprocess.run(
            [
                str(BIN),
                "mount",
                "--config",
                str(config or self.toml),
                "--log-file",
                str(self.vol.log_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        self.pid = int(result.stdout.split("daemon pid ")[1].split(")")[0])
        self.vol.mounted = True

    def program(self, name: str, source: str = "/bin/cat") -> Path:
        """A copy of *source* at another path: another program for the policy."""
        copy = self.programs / name
        shutil.copy2(source, copy)
        copy.chmod(0o755)
        return copy

    def records(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        lines = self.audit.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("operation") == "policy"]

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """The daemon log once it contains *text* (AssertionError after *timeout* s)."""
        wait_for(lambda: text in self.vol.log_text(), timeout, f"{text!r} in the daemon log")
        return self.vol.log_text()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll *condition* until true; AssertionError naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def policy_volume(
    shared_dir: Path, dirs: tuple[str, ...] = ("secret", "shared", "vault"), names: str = "plain"
) -> PolicyVolume:
    """A volume under *shared_dir* (with *names*: plain or encrypted) with ``DIR/f`` (mode
    0666, "DIR data") in each of *dirs*, made as root without a policy and left unmounted."""
    vol = make_volume(shared_dir, names=names)
    vol.mount()
    vol.mountpoint.chmod(0o755)
    for d in dirs:
        (vol.mountpoint / d).mkdir(mode=0o777)
        (vol.mountpoint / d / "f").write_bytes(f"{d} data\n".encode())
        (vol.mountpoint / d / "f").chmod(0o666)
    vol.umount()
    return PolicyVolume(vol, shared_dir)


def as_root(*command: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, command)], capture_output=True, text=True, timeout=30)


def denied(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "Permission denied" in result.stderr


def check_policy(config: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """``kmsfs policy check CONFIG ARGS`` (exit 0 permitted, 1 denied)."""
    return run_kmsfs("policy", "check", config, *args, check=False)
