"""Where secrets come from: a file, a systemd credential, or a prompt; never argv or config.

Secrets are read from a file named by an option (``--key-file``,
``--passphrase-file``, ``--pkcs11-pin-file``), else from
``$CREDENTIALS_DIRECTORY/<credential>`` (systemd ``LoadCredential=``), else from
an interactive prompt when one is available.  Anything else is a ConfigError.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from kmsfs.errors import ConfigError

MAX_SECRET_FILE = 64 * 1024
Prompt = Callable[[str, bool], str]


def read_secret_file(path: str | os.PathLike[str], what: str) -> bytes:
    """Read a secret file whole; ConfigError if missing, unreadable, empty or huge."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SECRET_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not data:
        raise ConfigError(f"{what} {path} is empty")
    if len(data) > MAX_SECRET_FILE:
        raise ConfigError(f"{what} {path} is larger than {MAX_SECRET_FILE} bytes")
    return data


def warn_if_readable_by_others(path: str | os.PathLike[str]) -> str | None:
    """A warning if *path* can be read by group or others, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); use 0600"
    return None


def get_text_secret(
    file_path: str | None,
    credential: str,
    what: str,
    prompt: Prompt | None,
    confirm: bool = False,
) -> str:
    """A text secret (passphrase, PIN) with trailing newlines removed.

    Raises ConfigError if no source has it or it is empty.
    """
    if file_path:
        data = read_secret_file(file_path, what)
    else:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        cred = Path(cred_dir, credential) if cred_dir else None
        if cred is not None and cred.exists():
            data = read_secret_file(cred, f"{what} credential")
        elif prompt is not None:
            data = prompt(f"{what[0].upper()}{what[1:]}", confirm).encode()
        else:
            raise ConfigError(
                f"no {what}: give a file option, a systemd credential '{credential}',"
                " or run on a terminal"
            )
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{what} is empty")
    return text
