"""Starting the daemon for ``kmsfs mount``: open the volume, then serve in the foreground,
or fork a daemon that reports back through a pipe once the mount answers.

The command line and the config file are merged into one ``MountPlan``
(kmsfs/server/mountcmd.py) before anything here runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from kmsfs.errors import KmsfsError, MountError
from kmsfs.server.logs import LogFile, setup_logging
from kmsfs.server.mountcmd import MountPlan

log = logging.getLogger(__name__)


def serve_plan(plan: MountPlan, on_ready: Callable[[], None] | None) -> None:
    """Open the volume and serve it until unmounted (blocks).

    Raises the errors of ``open_volume`` (ConfigError, ConfigTampered,
    ProviderError...) and MountError; nothing is mounted then.
    """
    from kmsfs.audit import AuditLog
    from kmsfs.backing.shared import check_shared_support
    from kmsfs.backing.syscalls import disable_core_dumps, lock_memory
    from kmsfs.backing.volume_lock import claim_volume
    from kmsfs.daemon import serve
    from kmsfs.keys.cache import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES, KeyCache
    from kmsfs.server.policyfile import PolicyReloader
    from kmsfs.volume import open_volume

    cache = KeyCache(
        DEFAULT_MAX_ENTRIES if plan.cache_max_entries is None else plan.cache_max_entries,
        DEFAULT_MAX_AGE if plan.cache_max_age is None else plan.cache_max_age,
    )
    disable_core_dumps()  # before any secret is read: passphrase, PIN, keys
    not_locked = lock_memory()
    if not_locked is not None:
        log.warning("%s", not_locked)
    # The lock first: "in use" is said before any passphrase is asked, and a format-1
    # config is migrated (rewritten) only by the process that will serve the volume.
    if plan.shared:
        check_shared_support(plan.backing)
    claim = claim_volume(plan.backing, plan.mountpoint, plan.shared)
    plan.runtime.claim = claim  # rechecked while serving: tools must keep finding it
    plan.runtime.rekey.read_only = "ro" in plan.extra
    plan.runtime.rekey.auto = plan.auto_rekey
    audit = AuditLog(plan.audit_log) if plan.audit_log else None
    try:
        config, keyring = open_volume(
            plan.backing,
            plan.key_options,
            plan.prompt,
            cache,
            audit,
            migrate="ro" not in plan.extra,
        )
        services = [plan.runtime.run]
        reloader = PolicyReloader(plan.config_file) if plan.config_file else None
        plan.runtime.reloader = reloader
        serve(
            plan.backing,
            plan.mountpoint,
            config,
            keyring,
            plan.extra,
            on_ready,
            services=services,
            audit=audit,
            lock_fd=claim.lock_fd,
            shared=plan.shared,
            timeout=plan.shared_timeout if plan.shared else None,
            lock_timeout=plan.shared_lock_timeout,
            policy=plan.policy,
            reloader=reloader,
        )
    finally:
        claim.close()
        if audit is not None:
            audit.close()


def run_foreground(plan: MountPlan) -> None:
    """Serve in this process, logging as the plan says (systemd's Type=notify path).
    ConfigError if the log file is refused (``LogFile``)."""
    setup_logging(plan.log_level, LogFile(plan.log_file) if plan.log_file else None)
    serve_plan(plan, plan.runtime.on_ready)


def run_in_background(plan: MountPlan) -> int:
    """Fork a daemon; in the parent, return its pid once the mount answers.

    Raises the daemon's error (its message and exit code) if it failed before
    the mount answered: a KmsfsError subclass chosen by the exit code; ConfigError
    before forking if the log file is refused (``LogFile``).
    """
    log_file = LogFile(plan.log_file) if plan.log_file else None
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
    setup_logging(plan.log_level, log_file, background=True)

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
        serve_plan(plan, ready)
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
