"""Where secrets come from: a file, a systemd credential, or a prompt; never argv or config.

Secrets are read from a file named by an option (``--key-file``,
``--passphrase-file``, ``--pkcs11-pin-file``), else from
``$CREDENTIALS_DIRECTORY/<credential>`` (systemd ``LoadCredential=``), else from
an interactive prompt when one is available.  Anything else is a ConfigError.
A secret file must be a regular file (not a symlink, FIFO, pipe or device:
``kmsfs.hostfiles``) private to its owner, as ssh wants of a private key:
mode 0600 or stricter, owned by root or by the user running kmsfs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from kmsfs.errors import ConfigError
from kmsfs.hostfiles import check_owner, open_regular

MAX_SECRET_FILE = 64 * 1024
Prompt = Callable[[str, bool], str]
NOT_A_FILE_HINT = (
    "give a file (mode 0600), a systemd credential ($CREDENTIALS_DIRECTORY), or type it"
    " at the prompt"
)


def read_secret_file(path: str | os.PathLike[str], what: str, private: bool = True) -> bytes:
    """Read a secret file whole.

    ConfigError if it is missing, unreadable, empty or huge, a symbolic link or
    anything but a regular file (a FIFO, a pipe such as ``<(...)``, a directory: named
    in the message; opened without following a link and without waiting for a
    writer, so a planted FIFO cannot hang a root process), or (when *private*) not
    private to its owner: see ``check_private``.  systemd credentials are read with
    *private* False (systemd makes them readable by the service alone).
    """
    fd, st = open_regular(path, os.O_RDONLY, what, NOT_A_FILE_HINT)
    try:
        if private:
            check_private(st, path, what)
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not data:
        raise ConfigError(f"{what} {path} is empty")
    if len(data) > MAX_SECRET_FILE:
        raise ConfigError(f"{what} {path} is larger than {MAX_SECRET_FILE} bytes")
    return data


def check_private(st: os.stat_result, path: str | os.PathLike[str], what: str) -> None:
    """ConfigError unless the file *st* describes is private, as ssh wants of a private key.

    Refused: any permission bit for group or others (they could read the
    secret, or replace it with one they know), and an owner other than root
    or the user running kmsfs (that owner could do either).  The message
    gives the command that fixes it.
    """
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} {path} is accessible by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o}): run 'chmod 600 {path}'"
        )
    check_owner(st, path, what)


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
            # systemd makes credentials readable by the service alone (0400, its
            # user, a private directory): no mode check, which a copy may fail
            data = read_secret_file(cred, f"{what} credential", private=False)
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
