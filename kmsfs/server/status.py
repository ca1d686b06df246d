"""The control socket of a running mount and the ``kmsfs status`` client.

Each daemon listens on an AF_UNIX stream socket named after its mount point:
``<runtime dir>/<sha256(mount point)[:32]>.sock``, where the runtime dir is
``$KMSFS_RUNTIME_DIR``, else ``/run/kmsfs`` for root, else
``$XDG_RUNTIME_DIR/kmsfs`` (else ``/tmp/kmsfs-UID``): ``kmsfs.server.rundir``,
which uses it only if it is the user's own and 0700.  A socket outside the
mount keeps the filesystem's namespace untouched; the hash keeps any mount
point path within the 108-byte socket address limit.  The directory is 0700
and the socket 0600: only the daemon's user (and root) may ask.

Protocol: the client sends one line (``status``, ``reload-policy``, or one of the
online rekey's ``rekey-start <json>``, ``rekey-pause``, ``rekey-resume``,
``rekey-cancel``, ``rekey-status``); the daemon answers one line of JSON and closes.
Requests are served by a trio task on the FUSE loop, so answering never blocks a
file request for longer than building the answer (a policy reload reads its file
in a worker thread).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from kmsfs.backing.inode_room import PROBE_LIMIT
from kmsfs.errors import MountError
from kmsfs.server.rekey_progress import format_rekey
from kmsfs.server.rundir import in_runtime_dir, open_runtime_dir, runtime_dir

log = logging.getLogger("kmsfs.status")

MAX_REQUEST = 65536  # a rekey-start names its paths and master keys
REQUEST_TIMEOUT = 5.0


def socket_path(mountpoint: str | os.PathLike[str]) -> Path:
    """The control socket of the mount at *mountpoint*.

    Symlinks in the parent directories are resolved, so any spelling of the
    path finds the socket; the mount point itself is not touched (the daemon
    calls this from the loop that would have to answer a stat of it).
    """
    path = os.path.abspath(mountpoint)
    parent, name = os.path.split(path)
    resolved = os.path.join(os.path.realpath(parent), name) if name else path
    key = resolved.encode(errors="surrogateescape")
    return runtime_dir() / f"{hashlib.sha256(key).hexdigest()[:32]}.sock"


def bind_control_socket(mountpoint: str) -> tuple[trio.socket.SocketType, Path]:
    """A listening trio socket at ``socket_path(mountpoint)``, replacing a stale one.

    ConfigError if the runtime directory is not this user's and 0700 (``open_runtime_dir``);
    OSError if the socket cannot be made.
    """
    path = socket_path(mountpoint)
    dir_fd = open_runtime_dir(create=True)
    assert dir_fd is not None
    try:
        with contextlib.suppress(FileNotFoundError):
            # left by a daemon that died; a live one would own the mount point
            os.unlink(path.name, dir_fd=dir_fd)
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # the umask is process-wide and the daemon's is 0: chmod instead (the 0700
            # directory keeps others out meanwhile)
            plain.bind(in_runtime_dir(dir_fd, path.name))
            os.chmod(path.name, 0o600, dir_fd=dir_fd)
            plain.listen(16)
        except BaseException:
            plain.close()
            raise
    finally:
        os.close(dir_fd)
    sock = trio.socket.from_stdlib_socket(plain)
    return sock, path


async def serve_control(
    sock: trio.socket.SocketType, answer: Callable[[str], Awaitable[dict[str, Any]]]
) -> None:
    """Answer requests on *sock* until cancelled; *answer* maps a request to a JSON object."""
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\n" not in request and len(request) < MAX_REQUEST:
                    chunk = await stream.receive_some(MAX_REQUEST)
                    if not chunk:
                        break
                    request += chunk
            text = request.decode(errors="replace").strip()
            try:
                reply = await answer(text)
            except Exception as exc:  # a status bug must not take the mount down
                log.exception("status request %r failed", text)
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")

    await trio.serve_listeners(handle, [listener])


def query(mountpoint: str, request: str = "status", timeout: float = 10.0) -> dict[str, Any]:
    """Ask the daemon of *mountpoint*; MountError if none answers, ConfigError if the
    runtime directory is not this user's and 0700 (``open_runtime_dir``)."""
    path = socket_path(mountpoint)
    dir_fd = open_runtime_dir(create=False)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            if dir_fd is None:
                raise FileNotFoundError(errno.ENOENT, "no runtime directory")
            sock.connect(in_runtime_dir(dir_fd, path.name))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise MountError(
                    f"no kmsfs daemon answers for {mountpoint} (not mounted, or its daemon"
                    " died: see 'kmsfs mount' for stale mounts)"
                ) from None
            raise MountError(f"cannot reach the kmsfs daemon of {mountpoint}: {exc}") from None
        sock.sendall(request.encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise MountError(
            f"the kmsfs daemon of {mountpoint} did not answer in {timeout} s"
        ) from None
    finally:
        sock.close()
        if dir_fd is not None:
            os.close(dir_fd)
    try:
        reply: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise MountError(f"the kmsfs daemon of {mountpoint} sent a malformed answer") from None
    if "error" in reply:
        raise MountError(f"the kmsfs daemon of {mountpoint}: {reply['error']}")
    return reply


def format_status(info: dict[str, Any]) -> str:
    """The human-readable form of a status answer."""
    cache = info["key_cache"]
    calls = info["provider_calls"]
    latency = calls["latency_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    lines = [
        f"mount point:    {info['mountpoint']}",
        f"backing:        {info['backing']}",
        f"volume:         {info['volume_id']} (block size {info['block_size']}"
        f"{', ' + info['names'] + ' names' if 'names' in info else ''})",
        f"volume key:     fingerprint {info.get('volume_key_fingerprint') or '-'}, config"
        f" generation {info.get('config_generation', '-')}"
        f" (format {info.get('config_format', '-')})",
        f"daemon:         pid {info['pid']}, up {_duration(info['uptime_seconds'])}"
        f" (since {info['started']})",
    ]
    if info.get("volume_lock"):
        lines.append(f"volume lock:    {info['volume_lock']}")
    if "pyfuse3" in info:  # absent from daemons older than the pyfuse3 patch
        lines.append(f"pyfuse3:        {describe_pyfuse3(info['pyfuse3'])}")
    for provider in info["providers"]:
        lines.append(f"master key:     {provider['description']}")
    if "header_room" in info:  # absent from daemons older than the probe
        lines.append(f"file headers:   {describe_header_room(info['header_room'])}")
    lines += [
        f"key cache:      {cache['size']} of {cache['max_entries']} keys,"
        f" {cache['hits']} hits, {cache['misses']} misses, {cache['evictions']} evictions",
        f"provider calls: {calls['count']} ({calls['errors']} errors);"
        f" latency p50 {ms(latency['p50'])}, p90 {ms(latency['p90'])},"
        f" p99 {ms(latency['p99'])} (last {latency['window']} calls)",
    ]
    for op, figures in calls["by_operation"].items():
        lines.append(f"  {op + ':':14}{figures['count']} ({figures['errors']} errors)")
    open_files = info["open_files"]
    lines += [
        f"open files:     {'-' if open_files is None else open_files}"
        f" ({info['inodes']} inodes known to the kernel)",
        f"bytes read:     {info['bytes_read']}",
        f"bytes written:  {info['bytes_written']}",
        f"errors:         {info['errors']}",
    ]
    policy = info.get("policy")
    if policy:
        source = f" (from {policy['source']})" if policy["source"] else ""
        lines.append(f"access policy:  {policy['summary']}{source}")
    waits = info.get("lock_waits")
    if waits:
        lines.append(
            f"lock waits:     {waits['waiting']} waiting (at most {waits['limit']},"
            f" {waits['timeout_seconds']:g} s each); {waits['timed_out']} timed out,"
            f" {waits['refused']} refused, {waits['interrupted']} interrupted,"
            f" {waits['abandoned']} abandoned"
        )
    lines += format_rekey(info.get("rekey"))
    lines += format_requests(info.get("requests"))
    return "\n".join(lines)


def describe_header_room(room: dict[str, Any]) -> str:
    """The file headers line of a status answer: whether they fit in the backing inodes
    (``HeaderRoom.summary``, docs/SERVERS.md "The backing filesystem")."""
    inode = room["xattr_bytes"]
    size = room["header_bytes"]
    if inode is None:
        where = "inode room unknown (no O_TMPFILE or user xattrs, or a read-only filesystem)"
    elif inode >= PROBE_LIMIT:
        where = f"at least {inode} bytes of room in a backing inode"
    else:
        where = f"{inode} bytes of room in a backing inode"
    if size is None:
        return f"{where}; none created yet"
    if room["fits"] is False:
        return (
            f"{size} bytes, {where}: each takes a 4 KiB block of its own"
            ' (docs/SERVERS.md, "The backing filesystem")'
        )
    return f"{size} bytes, {where}" + ("" if inode is None else ": kept in the inode")


def describe_pyfuse3(info: dict[str, Any]) -> str:
    """The pyfuse3 line of a status answer: its version and the patch's hooks in use
    (docs/pyfuse3-patch.md), from ``kmsfs.fs.fuseloop.status``."""
    spin = info.get("spin_us", 0)  # absent from a daemon older than the spin
    spins = f"spins {spin} µs before it waits" if spin else "waits without spinning"
    if not info["patched"]:
        return (
            f"stock {info['version']}: none of the patch's hooks (loop: kmsfs's adapter, {spins})"
        )
    text = f"{info['version']}: {', '.join(info['active']) or 'no hooks in use'}"
    for name, why in info["off"].items():
        text += f"; {name} off ({why})"
    return f"{text}; loop {spins}"


def format_requests(requests: dict[str, Any] | None) -> list[str]:
    """The FUSE request lines of a status answer (none from a daemon that does not count)."""
    if not requests:
        return []
    lines = [f"FUSE requests:  {requests['count']} ({requests['errors']} answered with an error)"]
    if requests["by_opcode"]:
        lines.append(f"  {'opcode':13}{'count':>10}{'errors':>9}{'mean ms':>10}{'max ms':>10}")
    for opcode, figures in requests["by_opcode"].items():
        mean_ms = figures["time_total_ms"] / figures["count"]
        lines.append(
            f"  {opcode:13}{figures['count']:>10}{figures['errors']:>9}"
            f"{mean_ms:>10.3f}{figures['time_max_ms']:>10.2f}"
        )
    return lines


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
