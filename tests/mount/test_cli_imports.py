"""What a new ``kmsfs`` process imports to show its help: nothing heavy.  Read from
``python -X importtime`` of a real interpreter each, which mounts nothing (the import
graph read from the sources is tests/unit/test_imports.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.nomount


def imported_by(*commands: list[str]) -> list[set[str]]:
    """The modules ``python -X importtime -m kmsfs ARGS`` imports (its stderr lists them),
    for each ARGS of *commands*: the processes run side by side."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "kmsfs", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    found = []
    for args, process in zip(commands, processes, strict=True):
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, f"kmsfs {' '.join(args)}: {stderr[-2000:]}"
        found.append(
            {
                line.rsplit("|", 1)[1].strip()
                for line in stderr.splitlines()
                if line.startswith("import time:") and "|" in line
            }
        )
    return found


def test_the_command_line_imports_nothing_heavy_to_show_its_help() -> None:
    """``kmsfs --help`` (and a command's) stays fast: the event loop, FUSE, the SDKs,
    cryptography and the layers below the command line are imported by the commands
    that run, not by the parsing of their options.  (A real interpreter each: what is
    tested is what a new process imports.)"""
    heavy = ("trio", "pyfuse3", "boto3", "botocore", "pkcs11", "cryptography")
    layers = ("kmsfs.fs", "kmsfs.server", "kmsfs.format", "kmsfs.backing", "kmsfs.lifecycle")
    commands = [["--help"], ["mount", "--help"], ["policy", "check", "--help"]]
    for args, modules in zip(commands, imported_by(*commands), strict=True):
        assert "kmsfs.cli" in modules
        wrong = sorted(
            name
            for name in modules
            if name.split(".")[0] in heavy
            or any(name == layer or name.startswith(layer + ".") for layer in layers)
        )
        assert wrong == [], f"kmsfs {' '.join(args)} imports {wrong}"
