"""Log formats for stderr: a terminal or file, or the systemd journal.

Under systemd, stderr is connected to the journal and ``$JOURNAL_STREAM``
holds its ``device:inode``.  There each line gets an sd-daemon priority prefix
(``<3>`` for errors ... ``<7>`` for debug), which journald turns into the
entry's priority (``journalctl -p warning`` works), and no timestamp (the
journal has its own).  Elsewhere lines carry a timestamp and the level name.

Messages never contain secrets: kmsfs logs paths, key references and key IDs,
never key material, passphrases or PINs.  Still, a log file is the daemon's
own: created 0600, never opened through a symlink (``LogFile``).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import TextIO

from kmsfs.hostfiles import open_private_log

# sd-daemon(3) priority prefixes
PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``; a traceback's lines each get the prefix too."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def priority(levelno: int) -> int:
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True if *stream* (stderr) is the journal stream systemd gave us."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == device and st.st_ino == inode


def stderr_formatter(stream: TextIO | None = None) -> logging.Formatter:
    """The formatter for a handler writing to *stream* (default stderr)."""
    if stderr_is_journal(stream):
        return JournalFormatter()
    return logging.Formatter(PLAIN_FORMAT)


class LogFile:
    """A log file opened for appending, 0600, never through a symlink (``open_private_log``).

    Opened before the daemon forks, so a refused file is the command's error (exit 3).
    Attributes: path, stream, note (a line to log once logging is set up, or None).
    """

    def __init__(self, path: str) -> None:
        fd, self.note = open_private_log(path, "log file")
        self.path = path
        self.stream: TextIO = os.fdopen(fd, "a", encoding="utf-8")

    def close(self) -> None:
        self.stream.close()


def setup_logging(level: str, log_file: LogFile | None = None, background: bool = False) -> None:
    """Log to *log_file*, else stderr; a background daemon without a file logs to syslog."""
    handlers: list[logging.Handler] = []
    if log_file:
        handlers.append(logging.StreamHandler(log_file.stream))
    elif background and os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.ident = "kmsfs: "
        handlers.append(syslog)
    if not log_file and not background:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(stderr_formatter())  # journald-style under systemd
        handlers.append(stderr)
    if not handlers:  # a background daemon with nowhere to log: errors go through the pipe
        handlers.append(logging.NullHandler())
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    if log_file is not None and log_file.note is not None:
        logging.getLogger("kmsfs.server").warning("%s", log_file.note)
