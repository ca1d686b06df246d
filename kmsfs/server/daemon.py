"""Runs a mounted volume: FUSE session, trio loop, readiness, signals, clean unmount.

``serve`` is the last step of the assembly line (kmsfs/server/assembly.py): it
gets the operations object built, and blocks until the filesystem is unmounted
or the process gets SIGTERM/SIGINT (then it unmounts); SIGHUP reloads the
access policy.  ``on_ready`` is called once the mount point answers a stat
through the new filesystem; if the access policy refuses that stat, the daemon
unmounts and ``serve`` raises MountError saying which rule refused it.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import pyfuse3
import trio

from kmsfs.backing.mounttable import read_mountinfo
from kmsfs.errors import MountError
from kmsfs.fs import fuseloop
from kmsfs.fs.inodes import ROOT_INODE
from kmsfs.fs.operations import KmsfsOperations
from kmsfs.fs.served import REQUEST_TASKS
from kmsfs.policy import Policy
from kmsfs.server.policyfile import PolicyReloader
from kmsfs.server.spec import MountSpec
from kmsfs.server.status import describe_pyfuse3

log = logging.getLogger("kmsfs.daemon")
FLUSH_TIMEOUT = 30.0  # seconds to flush the kernel's dirty pages on SIGTERM before unmounting


def escape_option_value(value: str) -> str:
    """*value* made safe inside one libfuse ``-o`` option.

    libfuse splits an option string at commas and reads backslash escapes
    (``\\,``, ``\\\\``, ``\\NNN`` octal: ``process_real_option_group`` in
    lib/fuse_opt.c), so a backing path ``/srv/x,allow_other`` would otherwise add
    the option ``allow_other``.  Every comma, backslash, space or control
    character and every byte outside ASCII (pyfuse3 passes options as ASCII)
    becomes a three-digit octal escape, which libfuse turns back into that byte:
    the mount source is then exactly the path.
    """
    out = []
    for byte in os.fsencode(value):
        if 0x20 < byte < 0x7F and byte not in b",\\":
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def fuse_options(backing: str, extra: Iterable[str]) -> set[str]:
    """The FUSE options of a mount: ours (the backing path as fsname, escaped) and *extra*."""
    options = set(pyfuse3.default_options)
    options |= {f"fsname={escape_option_value(backing)}", "subtype=kmsfs"}
    for option in extra:
        if option in ("nonempty", "foreground"):
            continue
        options.add(option)
    return options


def serve(
    spec: MountSpec,
    ops: KmsfsOperations,
    on_ready: Callable[[], None] | None = None,
    services: Sequence[Callable[[KmsfsOperations], Awaitable[None]]] = (),
    reloader: PolicyReloader | None = None,
) -> None:
    """Mount *ops* at the spec's mount point and serve until unmounted; MountError if
    mounting fails, or if the access policy refuses the daemon's own readiness check
    (unmounted then).

    Each of *services* (status socket, metrics, ...) runs beside the FUSE loop
    with the operations object and is cancelled when the loop ends.  SIGHUP has
    *reloader* re-read the access policy from the TOML volume config, keeping the
    old one if the new one is refused.  The caller closes *ops* and what it was
    built with once this returns or raises.
    """
    backing, mountpoint = spec.backing, spec.mountpoint
    os.umask(0)  # new entries get the modes the requesters ask for (Places.new_mode)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(backing, spec.fuse_options))
    except RuntimeError as exc:
        raise MountError(f"cannot mount {backing} at {mountpoint}: {exc}") from None
    shared = spec.shared
    log.info(
        "mounted %s at %s (volume %s%s)",
        backing,
        mountpoint,
        ops.config.volume_id.hex(),
        f", shared mode, timeouts {shared.timeout:g} s, lock waits {shared.lock_timeout:g} s"
        if shared is not None
        else "",
    )
    policy = ops.access_control.policy
    log.info("access policy: %s%s", policy.summary(), _source(policy))
    policy.programs.log_notes()
    failed: list[MountError] = []
    try:
        trio.run(_run, mountpoint, on_ready, ops, services, reloader, failed)
    except BaseException:
        log.exception("FUSE loop failed")
        raise
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
    if failed:
        raise failed[0]


def _source(policy: Policy) -> str:
    return f" (from {policy.source})" if policy.source else ""


async def _run(
    mountpoint: str,
    on_ready: Callable[[], None] | None,
    ops: KmsfsOperations,
    services: Sequence[Callable[[KmsfsOperations], Awaitable[None]]],
    reloader: PolicyReloader | None,
    failed: list[MountError],
) -> None:
    async with trio.open_nursery() as nursery:
        # SIGTERM handled before the first request is: with the default action, a
        # SIGTERM right after the mount answers would kill the daemon and leave a
        # stale mount (pyfuse3.main may answer many requests before a started task runs)
        await nursery.start(_handle_signals, mountpoint, ops, reloader)
        nursery.start_soon(_announce_ready, mountpoint, on_ready, ops, failed)
        for service in services:
            nursery.start_soon(service, ops)
        # no trip around trio's loop per request while requests queue; once unmounted,
        # no request waits for another daemon's lock (pyfuse3.main waits for them all)
        fuseloop.configure(ops, on_disconnect=ops.lock_waits.close)
        log.info("pyfuse3 %s", describe_pyfuse3(fuseloop.status(ops)))
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=REQUEST_TASKS)
        finally:
            fuseloop.uninstall()
        nursery.cancel_scope.cancel()


async def _handle_signals(
    mountpoint: str,
    ops: KmsfsOperations,
    reloader: PolicyReloader | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:  # the access policy, nothing else
                if reloader is None:
                    log.warning("received SIGHUP: no config file (--config) to reload; ignored")
                    continue
                await reloader.reload(ops)
                continue
            log.info("received %s: unmounting", signal.Signals(signum).name)
            ops.lock_waits.close()  # requests waiting for other daemons' locks give up
            await _flush_kernel_cache(mountpoint, ops)
            # terminate() stops reading new requests; requests being handled finish
            # before pyfuse3.main returns, then serve() unmounts
            pyfuse3.terminate()
            return


async def _flush_kernel_cache(mountpoint: str, ops: KmsfsOperations) -> None:
    """syncfs the mount while the loop still serves, so the kernel's writeback cache
    (dirty pages of files still open) reaches the backing files before we unmount.

    syncfs may return once the kernel has queued the WRITE requests, before we have
    answered them, so then wait until none is pending: the connection's ``waiting``
    count (fusectl) when available, else until no write arrived for a while.
    """
    with trio.move_on_after(FLUSH_TIMEOUT) as scope:
        try:
            await trio.to_thread.run_sync(_syncfs, mountpoint, abandon_on_cancel=True)
        except OSError as exc:
            log.warning("cannot flush %s before unmounting: %s", mountpoint, exc)
        waiting = _fusectl_waiting(mountpoint)
        quiet, last = 0, -1
        while quiet < 4:
            await trio.sleep(0.025)
            if waiting is not None:
                try:
                    quiet = quiet + 1 if int(waiting.read_text()) == 0 else 0
                    continue
                except (OSError, ValueError):
                    waiting = None
            quiet = quiet + 1 if ops.bytes_written == last else 0
            last = ops.bytes_written
    if scope.cancelled_caught:
        log.warning("flushing %s took over %.0f s: unmounting anyway", mountpoint, FLUSH_TIMEOUT)


def _fusectl_waiting(mountpoint: str) -> Path | None:
    """``/sys/fs/fuse/connections/<minor>/waiting`` of the mount at *mountpoint*, if any."""
    for entry in read_mountinfo():
        if entry.mountpoint == mountpoint and entry.device.startswith("0:"):
            path = Path("/sys/fs/fuse/connections", entry.device[2:], "waiting")
            return path if path.exists() else None
    return None


def _syncfs(path: str) -> None:
    """syncfs(2) with the GIL released (pyfuse3.syncfs keeps it, which would deadlock
    against the loop that has to serve the writeback)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


async def _announce_ready(
    mountpoint: str,
    on_ready: Callable[[], None] | None,
    ops: KmsfsOperations,
    failed: list[MountError],
) -> None:
    try:
        st = await trio.to_thread.run_sync(os.stat, mountpoint)
    except PermissionError:  # the only EACCES a daemon's stat of its own root can get
        policy = ops.access_control.policy
        failed.append(await trio.to_thread.run_sync(_readiness_denied, mountpoint, policy))
        log.error("%s", failed[0])
        pyfuse3.terminate()
        return
    if st.st_ino != ROOT_INODE:
        log.warning("mount point %s answered with inode %d", mountpoint, st.st_ino)
    log.info("ready: %s answers", mountpoint)
    if on_ready is not None:
        on_ready()


def _readiness_denied(mountpoint: str, policy: Policy) -> MountError:
    """The error for a policy that refuses the daemon the stat that tells it the mount
    answers, naming the deciding rule (blocking: reads /proc, may hash this program)."""
    from kmsfs.policy import IdentityCache

    uid = os.geteuid()
    requester = IdentityCache().lookup(os.getpid(), uid, os.getegid(), blocking=True)
    decision = policy.decide(requester, "list", "/")
    if decision.allowed:  # not the policy (or no longer: reloaded meanwhile)
        return MountError(f"{mountpoint} refused the daemon's own readiness check (EACCES)")
    by = f"rule {decision.rule}" if decision.rule else f"the default ({policy.default})"
    return MountError(
        f"{mountpoint} does not answer the daemon's own readiness check (a stat of the mount"
        f" point): the access policy{_source(policy)} denies list on / to the daemon"
        f" (uid {uid}, program {requester.exe}) by {by}; permit it, for example with a first"
        f' rule: [[policy.rule]] users = [{uid}] paths = ["/"] actions = ["list"]'
        ' effect = "permit"'
    )
