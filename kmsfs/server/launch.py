"""Starting the daemon for ``kmsfs mount``: the checks that can fail the command before
anything starts, the process settings made once, then serving in the foreground, or
in a forked daemon that reports back through a pipe once the mount answers.

The command line and the config file are merged into one ``MountSpec``
(kmsfs/cli/mountspec.py) before anything here runs; the mount itself is built
from it by kmsfs/server/assembly.py.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable

from kmsfs.errors import KmsfsError, MountError
from kmsfs.server.logs import LogFile, setup_logging
from kmsfs.server.spec import MountSpec

log = logging.getLogger(__name__)


def preflight(spec: MountSpec, say: Callable[[str], None]) -> None:
    """What is checked before anything starts, in this order: the metrics address
    (ConfigError if metrics cannot work), the runtime directory (an unsafe one is
    said: the mount will have no status socket), a stale mount at the mount point
    (detached, and said; MountError if it cannot be), the mount point itself
    (MountError: missing, not a directory, mounted, not empty without ``-o
    nonempty``).  *say* gets each line meant for the operator."""
    from kmsfs.server.mountpoint import check_mountpoint, recover_stale_mount
    from kmsfs.server.rundir import runtime_dir_problem

    if spec.metrics_listen is not None:
        from kmsfs.server.metrics import check_metrics_listen

        check_metrics_listen(spec.metrics_listen)
    problem = runtime_dir_problem()
    if problem is not None:
        say(f"kmsfs: warning: {problem}; this mount has no status socket")
    if recover_stale_mount(spec.mountpoint):
        say(f"kmsfs: detached the stale mount at {spec.mountpoint} (its daemon had died)")
    check_mountpoint(spec.mountpoint, allow_nonempty=spec.allow_nonempty)


def prepare_process() -> None:
    """The daemon's process settings, made once, before any secret is read (passphrase,
    PIN, keys): no core dumps, memory locked (a warning if it cannot be: keys may
    then reach swap), and the descriptor limit raised as far as the system lets
    (one descriptor per inode the kernel remembers)."""
    from kmsfs.backing.syscalls import disable_core_dumps, lock_memory

    disable_core_dumps()
    not_locked = lock_memory()
    if not_locked is not None:
        log.warning("%s", not_locked)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        log.debug("cannot raise the descriptor limit above %d", soft)


def run_foreground(spec: MountSpec) -> None:
    """Serve in this process, logging as the spec says (systemd's Type=notify path:
    systemd hears READY=1 once the mount answers).  ConfigError if the log file is
    refused (``LogFile``)."""
    from kmsfs.server import notify

    setup_logging(spec.log_level, LogFile(spec.log_file) if spec.log_file else None)

    def ready() -> None:
        notify.ready(f"serving {spec.mountpoint}")

    _serve(spec, ready)


def _serve(spec: MountSpec, on_ready: Callable[[], None]) -> None:
    """The daemon: its process settings, then the mount built and served (blocks)."""
    from kmsfs.server.assembly import serve_mount

    prepare_process()
    serve_mount(spec, on_ready)


def run_in_background(spec: MountSpec) -> int:
    """Fork a daemon; in the parent, return its pid once the mount answers.

    Raises the daemon's error (its message and exit code) if it failed before
    the mount answered: a KmsfsError subclass chosen by the exit code; ConfigError
    before forking if the log file is refused (``LogFile``).
    """
    log_file = LogFile(spec.log_file) if spec.log_file else None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        if log_file is not None:
            log_file.close()  # the daemon's now
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("OK"):
            return pid
        if not message:
            _, status = os.waitpid(pid, 0)
            message = f"ERR 7 daemon exited (status {status}) before the mount answered"
        _, exit_code, text = message.split(" ", 2)
        raise _error_for(int(exit_code), text.strip())

    os.close(read_end)
    setup_logging(spec.log_level, log_file, background=True)

    def ready() -> None:
        os.write(write_end, b"OK\n")
        os.close(write_end)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    code = 0
    try:
        _serve(spec, ready)
    except KmsfsError as exc:
        code = exc.exit_code
        _report(write_end, code, str(exc))
    except BaseException as exc:  # the daemon must report, whatever happened
        code = 1
        _report(write_end, code, f"{type(exc).__name__}: {exc}")
    finally:
        logging.shutdown()
        os._exit(code)


def _error_for(code: int, text: str) -> KmsfsError:
    """A KmsfsError carrying *text* whose exit code is *code*."""
    error = MountError(text)
    error.exit_code = code
    return error


def _report(fd: int, code: int, text: str) -> None:
    log.error("%s", text)
    try:
        os.write(fd, f"ERR {code} {text}\n".encode())
    except OSError:
        pass  # the parent is gone or the pipe was already closed after readiness
