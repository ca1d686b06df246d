"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

The protocol is newline-separated ``KEY=VALUE`` assignments in one datagram
to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a leading ``@`` means an
abstract socket (a NUL byte in the address).  Without the variable (not under
systemd, or not ``Type=notify``) every call is a no-op returning False.
Failures to send are logged, never raised: a lost notification must not stop
a mount from serving.

Messages used by kmsfs: ``READY=1`` once the mount answers, ``STATUS=...``
for ``systemctl status``, ``STOPPING=1`` when shutting down, ``WATCHDOG=1``
while the loop is alive (when ``WatchdogSec=`` is set).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("kmsfs.notify")


def notify_socket_address() -> str | bytes | None:
    """The address in ``$NOTIFY_SOCKET`` (bytes for an abstract socket), or None."""
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if not name.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET=%r: not a path or abstract socket name", name)
        return None
    return name


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` *assignments* in one datagram; True if sent.

    Newlines inside a value would start a new assignment, so they are replaced
    by spaces.
    """
    address = notify_socket_address()
    if address is None:
        return False
    lines = [a.replace("\n", " ") for a in assignments]
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify the service manager: %s", exc)
        return False
    log.debug("notified the service manager: %s", " ".join(lines))
    return True


def ready(status: str) -> bool:
    """``READY=1`` with a STATUS line and our MAINPID."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(text: str = "unmounting") -> bool:
    return notify("STOPPING=1", f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None.

    ``$WATCHDOG_PID``, when set, must be our pid (systemd sets it for the main
    process only).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
