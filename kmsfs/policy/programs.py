"""The programs a policy names, as the files they are: ``programs = [...]`` of the rules.

Each configured path is resolved when the policy is loaded (a symlink such as
``/usr/bin/python3`` names the file it points to, and the log says so) and the
file there is stat'ed: its identity (device, inode, birth time or ctime:
identity.py ``file_key``) is what a requester's executable must have.  The same
``ProgramSet.matches`` serves the mount and ``kmsfs policy check``.

A program replaced since the load (a package upgrade) keeps working without a
reload: a requester whose executable is not a known one, but which the daemon
sees at a configured path (its ``/proc/PID/exe`` in the daemon's own
namespaces), makes that path be stat'ed again (in a worker thread: the path
may lead through this very mount), and the new file is accepted if it is the
one the requester runs.  Identities seen before stay accepted (up to
``HISTORY`` per path, and across reloads) for the processes still running the
old file: its birth time keeps a new file that gets the old inode number from
matching.  Where the filesystem records no birth time, the ctime is used, which
the unlink of the old file changes: processes still running a replaced file are
then denied until restarted (fail closed).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from functools import partial

from kmsfs.policy.identity import FileKey, Pending, Requester, file_key, stat_program

log = logging.getLogger(__name__)

HISTORY = 8  # identities kept per configured path: the current file and replaced ones


class Program:
    """One configured program path.

    Attributes: configured (as written), path (symlinks resolved at load),
    keys (accepted identities, oldest first; empty while nothing is there).
    """

    def __init__(self, configured: str, path: str) -> None:
        self.configured = configured
        self.path = path
        self.keys: tuple[FileKey, ...] = ()
        self._lock = threading.Lock()

    def refresh(self) -> FileKey | None:
        """Stat the file at ``path`` now (blocking) and accept its identity; None if absent."""
        try:
            key = file_key(stat_program(self.path))
        except OSError:
            return None
        self.accept([key])
        return key

    def accept(self, keys: Iterable[FileKey]) -> None:
        """Add *keys* (newest last), keeping the last HISTORY."""
        with self._lock:
            merged = [k for k in self.keys if k not in keys] + list(keys)
            self.keys = tuple(merged[-HISTORY:])


class ProgramRegistry:
    """The programs of one policy, one entry per resolved path (rules share them).

    Attributes: by_path (resolved path -> Program), notes (what resolving the
    configured paths found: symlinks, missing files; logged by ``log_notes``,
    printed by ``kmsfs policy check``).
    """

    def __init__(self) -> None:
        self.by_path: dict[str, Program] = {}
        self.notes: list[tuple[int, str]] = []  # (log level, message) from resolving paths

    def get(self, configured: str, here: str) -> Program:
        """The Program for *configured* (absolute, normalised), resolved and stat'ed now.

        Notes (``notes``) a symlink resolved, and a path where nothing is (yet):
        it then matches once a process runs a file there.
        """
        path = os.path.realpath(configured)
        if path != configured:
            self.notes.append(
                (
                    logging.INFO,
                    f"{here}: programs: {configured} is a symlink to {path}: the rule matches"
                    f" processes running {path}",
                )
            )
        program = self.by_path.get(path)
        if program is None:
            program = self.by_path[path] = Program(configured, path)
            if program.refresh() is None:
                self.notes.append(
                    (
                        logging.WARNING,
                        f"{here}: programs: nothing at {configured} (yet): the rule matches"
                        " once a process runs a file there",
                    )
                )
        return program

    def log_notes(self) -> None:
        """Log the notes of the load (the daemon, once its log is set up)."""
        for level, message in self.notes:
            log.log(level, "%s", message)

    def inherit(self, old: ProgramRegistry) -> None:
        """Keep the identities *old* (the policy this one replaces) accepted for the same
        paths: processes still running a replaced file stay who they were."""
        for path, program in self.by_path.items():
            before = old.by_path.get(path)
            if before is not None:
                program.accept([*before.keys, *program.keys])


class ProgramSet:
    """The ``programs`` of one rule.  Attributes: programs (tuple of Program), names
    (the paths as written)."""

    def __init__(self, programs: Iterable[Program]) -> None:
        self.programs = tuple(programs)
        self.names = tuple(p.configured for p in self.programs)

    def matches(self, requester: Requester) -> bool:
        """True if the requester runs one of these programs, in the daemon's namespaces.

        Raises Pending when a configured path must be stat'ed again (see the module
        docstring) and the requester may not block.
        """
        return self.mismatch(requester) is None

    def mismatch(self, requester: Requester) -> str | None:
        """Why the requester runs none of these programs, or None if it runs one."""
        st = requester.exe_stat
        if st is None:
            return f"the program is unknown ({requester.unknown_program or 'no executable'})"
        key = file_key(st)
        if any(key in program.keys for program in self.programs):
            reason = requester.unknown_program  # namespaces: read only for a known file
            return None if reason is None else f"the program is unknown ({reason})"
        text = requester.exe_text
        for program in self.programs:
            if program.path != text or requester.refreshed:
                continue
            reason = requester.unknown_program  # its path means nothing in another namespace
            if reason is not None:
                return f"the program is unknown ({reason})"
            if not requester.blocking:
                raise Pending(f"stat {program.path}", partial(_refresh, requester, program))
            _refresh(requester, program)
            if key in program.keys:
                return None
        return f"program {text} is not one of its programs ({', '.join(self.names)})"


def _refresh(requester: Requester, program: Program) -> None:
    """Stat *program* again for *requester* (once per request), logging a new file there."""
    requester.refreshed = True
    before = program.keys
    found = program.refresh()
    if found is not None and found not in before:
        log.info(
            "programs: a new file at %s (an upgrade?): matching it; processes still running"
            " the one before keep matching",
            program.path,
        )
