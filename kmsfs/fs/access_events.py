"""What the operations layer reports about file access, for the audit log.

Kept apart from kmsfs.fs.operations so that the audit log reads it without
importing pyfuse3 or trio.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ACCESS = {os.O_RDONLY: "read", os.O_WRONLY: "write", os.O_RDWR: "read-write"}


def access_mode(flags: int) -> str:
    """The access mode of open(2) *flags*: "read", "write" or "read-write"."""
    return _ACCESS.get(flags & os.O_ACCMODE, "read-write")


@dataclass
class AccessEvent:
    """One open or create of a file through the mount, allowed or refused.

    Attributes: operation ("open" or "create"), access ("read", "write",
    "read-write"), volume_id and file_id (hex; file_id "" when the file's
    header was not read), result ("ok" or the errno name answered, e.g.
    "EACCES"), error (the cause, "" when ok), requester (path, uid, gid, pid,
    process, exe).  Never holds key material.
    """

    operation: str
    access: str
    volume_id: str
    file_id: str
    result: str
    error: str = ""
    requester: dict[str, Any] = field(default_factory=dict)


AccessSink = Callable[[AccessEvent], None]
