"""The runtime directory, where each daemon's control socket lives.

``$KMSFS_RUNTIME_DIR``, else ``/run/kmsfs`` for root, else ``$XDG_RUNTIME_DIR/kmsfs``,
else ``/tmp/kmsfs-UID``.  Whichever it is, it is used only if it belongs to the user
running kmsfs and has mode 0700, and is not a symbolic link (``open_private_dir``):
in /tmp another local user can create ``/tmp/kmsfs-UID`` first, or a symlink there,
and would then see, replace or intercept the sockets.  Sockets are then bound and
reached through the directory's descriptor (``/proc/self/fd/N/NAME``), never through
a path that could be swapped after the check.

Needs neither trio nor FUSE (tests run it as other users with the system's Python).
"""

from __future__ import annotations

import os
from pathlib import Path

from kmsfs.errors import ConfigError
from kmsfs.hostfiles import open_private_dir

WHAT = "runtime directory"
HINT = ", or set KMSFS_RUNTIME_DIR to a directory of yours with mode 0700"


def runtime_dir() -> Path:
    """Where the control sockets are (see the module's docstring); nothing is checked."""
    configured = os.environ.get("KMSFS_RUNTIME_DIR")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/run/kmsfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg, "kmsfs")
    return Path(f"/tmp/kmsfs-{os.geteuid()}")


def open_runtime_dir(create: bool) -> int | None:
    """The runtime directory's descriptor, created 0700 (with its parents) if *create*;
    None if it does not exist and not *create*.

    ConfigError (exit 3) if it is not a directory of this user with mode 0700 (a
    symbolic link, another user's, group or others allowed in), naming the command
    that fixes it, or if it cannot be created.
    """
    path = runtime_dir()
    if create and not path.parent.is_dir():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            pass  # the directory's own creation says why
    return open_private_dir(path, WHAT, create, HINT)


def runtime_dir_problem() -> str | None:
    """Why a control socket could not be made (an unsafe runtime directory), to say
    before mounting; None if nothing is wrong yet (or the directory does not exist)."""
    try:
        fd = open_runtime_dir(create=False)
    except ConfigError as exc:
        return str(exc)
    if fd is not None:
        os.close(fd)
    return None


def in_runtime_dir(dir_fd: int, name: str) -> str:
    """A path to *name* in the runtime directory held open as *dir_fd* (for bind and
    connect, which take no directory descriptor): within the 108-byte limit of a unix
    socket address."""
    return f"/proc/self/fd/{dir_fd}/{name}"
