"""The ``kmsfs`` command line.  Errors are one line on stderr and a documented exit code.

Exit codes: 0 success, 1 other failure, 2 usage, 3 config, 4 format,
5 integrity, 6 key provider (wrong key, denied, unavailable), 7 mount.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from kmsfs.errors import KmsfsError, MountError, UsageError
from kmsfs.keys.registry import PROVIDER_NAMES
from kmsfs.server.config import config_option
from kmsfs.server.mountcmd import mount_server_options
from kmsfs.server.mounthelper import MountHelperGroup

if TYPE_CHECKING:
    from kmsfs.server.runtime import ServerRuntime

log = logging.getLogger("kmsfs")

KEY_OPTION_NAMES = (
    "key_file",
    "passphrase_file",
    "kms_key_id",
    "kms_region",
    "kms_endpoint_url",
    "kms_profile",
    "pkcs11_module",
    "pkcs11_token",
    "pkcs11_key",
    "pkcs11_pin_file",
    "pkcs11_create_key",
    "pkcs11_mechanism",
    "trust_volume_settings",
)


def prompt_secret(text: str, confirm: bool) -> str:
    """Ask on the terminal; ConfigError-free: click raises Abort on Ctrl-C."""
    if not sys.stdin.isatty():
        from kmsfs.errors import ConfigError

        raise ConfigError(f"{text} needed but there is no terminal to ask on: use a file option")
    return str(click.prompt(text, hide_input=True, confirmation_prompt=confirm, err=True))


def key_options(for_init: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that locate a master key (never the secret itself)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        opts = [
            click.option(
                "--key-file",
                type=click.Path(dir_okay=False),
                help="Local master key file (created 0600 by init if absent).",
            ),
            click.option(
                "--passphrase-file",
                type=click.Path(dir_okay=False, exists=True),
                help="File holding the passphrase of a local passphrase volume.",
            ),
            click.option("--kms-key-id", help="AWS KMS key ID, ARN or alias."),
            click.option("--kms-region", help="AWS region of the KMS key."),
            click.option("--kms-endpoint-url", help="KMS endpoint URL (regional, VPC, test)."),
            click.option("--kms-profile", help="AWS profile for credentials."),
            click.option(
                "--pkcs11-module",
                type=click.Path(dir_okay=False),
                help="PKCS#11 module (.so) path.",
            ),
            click.option("--pkcs11-token", help="PKCS#11 token label."),
            click.option("--pkcs11-key", help="Label of the wrapping key on the token."),
            click.option(
                "--pkcs11-pin-file",
                type=click.Path(dir_okay=False, exists=True),
                help="File holding the token user PIN.",
            ),
        ]
        if not for_init:
            opts.append(
                click.option(
                    "--trust-volume-settings",
                    is_flag=True,
                    default=None,
                    help="Find keys this host does not name with the settings recorded in the"
                    " backing directory (key file path, KMS endpoint, PKCS#11 module). Only for"
                    " a backing directory nobody else can write.",
                )
            )
        if for_init:
            opts.append(
                click.option(
                    "--pkcs11-create-key",
                    is_flag=True,
                    help="Create the wrapping key on the token if missing.",
                )
            )
            opts.append(
                click.option(
                    "--pkcs11-mechanism",
                    type=click.Choice(["aes-gcm", "aes-kwp", "aes-kw", "rsa-oaep-sha1"]),
                    help="Wrapping mechanism (default: the first the token and key support).",
                )
            )
        for opt in reversed(opts):
            func = opt(func)
        return func

    return decorate


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {name: kwargs.pop(name) for name in KEY_OPTION_NAMES if name in kwargs}


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a KmsfsError into one stderr line and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KmsfsError as exc:
            click.echo(f"kmsfs: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"kmsfs: error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)

    return wrapper


def setup_logging(level: str, log_file: str | None = None, background: bool = False) -> None:
    """Log to *log_file*, else stderr; a background daemon without a file logs to syslog."""
    handlers: list[logging.Handler] = []
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    elif background and os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.ident = "kmsfs: "
        handlers.append(syslog)
    if not log_file and not background:
        from kmsfs.server.logs import stderr_formatter

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


@click.group(cls=MountHelperGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kmsfs")
def main() -> None:
    """kmsfs: a FUSE filesystem that encrypts a directory with KMS- or HSM-wrapped keys."""


@main.command()
@click.argument("backing", type=click.Path(file_okay=False))
@click.option(
    "--provider",
    default="local",
    show_default=True,
    type=click.Choice(PROVIDER_NAMES),
    help="Master key provider.",
)
@click.option(
    "--block-size",
    default=4096,
    show_default=True,
    type=int,
    help="Plaintext block size in bytes (power of two, 512..1048576).",
)
@key_options(for_init=True)
@handle_errors
def init(backing: str, provider: str, block_size: int, **kwargs: Any) -> None:
    """Create a volume in the empty directory BACKING."""
    from kmsfs.volume import host_options_hint, init_volume

    config = init_volume(backing, provider, _options(kwargs), prompt_secret, block_size)
    key = config.keys[0]
    click.echo(f"created volume {config.volume_id.hex()} in {backing}")
    named = host_options_hint(key).split(" (")[0].replace("its options", "")
    click.echo(f"mount it with: kmsfs mount {shlex.quote(backing)} MOUNTPOINT {named}".rstrip())
    click.echo(f"master key: {key.provider} {key.key_ref}")


@main.command()
@click.argument("backing", required=False, type=click.Path(file_okay=False, exists=True))
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option(
    "-o",
    "mount_options",
    multiple=True,
    help="Mount options, comma-separated (allow_other, ro, nonempty, ...).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option("--log-file", type=click.Path(dir_okay=False), help="Log here instead of stderr.")
@click.option("--cache-max-entries", type=int, default=None, help="Unwrapped-key cache size.")
@click.option(
    "--cache-max-age", type=float, default=None, help="Seconds an unwrapped key stays cached."
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False),
    help="Append one JSON line per key operation to this file (default: no audit log).",
)
@mount_server_options
@key_options(for_init=False)
@handle_errors
def mount(
    backing: str | None,
    mountpoint: str | None,
    foreground: bool,
    mount_options: tuple[str, ...],
    log_level: str,
    log_file: str | None,
    cache_max_entries: int | None,
    cache_max_age: float | None,
    audit_log: str | None,
    **kwargs: Any,
) -> None:
    """Mount the volume in BACKING at MOUNTPOINT.

    Without --foreground, returns once the mount answers (exit 0) or failed.
    With --config FILE, BACKING, MOUNTPOINT and other settings may come from
    the file; the command line wins.  A stale mount left at MOUNTPOINT by a
    daemon that died is detached first.
    """
    from kmsfs.daemon import check_mountpoint
    from kmsfs.server.mountcmd import prepare_mount

    plan = prepare_mount(backing, mountpoint, mount_options, kwargs)
    backing, mountpoint, extra, runtime = plan.backing, plan.mountpoint, plan.extra, plan.runtime
    check_mountpoint(mountpoint, allow_nonempty="nonempty" in extra)
    options = _options(kwargs)
    cache_args = (cache_max_entries, cache_max_age)
    audit_log = os.path.abspath(audit_log) if audit_log else None
    if foreground:
        setup_logging(log_level, log_file)
        _mount(
            backing, mountpoint, options, extra, cache_args, runtime.on_ready, audit_log, runtime
        )
        return
    _mount_in_background(
        backing, mountpoint, options, extra, cache_args, log_level, log_file, audit_log, runtime
    )


def _mount(
    backing: str,
    mountpoint: str,
    options: dict[str, Any],
    extra: list[str],
    cache_args: tuple[int | None, float | None],
    on_ready: Callable[[], None] | None,
    audit_log: str | None = None,
    runtime: ServerRuntime | None = None,
) -> None:
    from kmsfs.audit import AuditLog
    from kmsfs.daemon import serve
    from kmsfs.keys.cache import KeyCache
    from kmsfs.volume import open_volume

    max_entries, max_age = cache_args
    cache = KeyCache(
        **({} if max_entries is None else {"max_entries": max_entries}),
        **({} if max_age is None else {"max_age": max_age}),
    )
    audit = AuditLog(audit_log) if audit_log else None
    try:
        config, keyring = open_volume(
            backing, options, prompt_secret, cache, audit, migrate="ro" not in extra
        )
        services = [runtime.run] if runtime is not None else []
        serve(backing, mountpoint, config, keyring, extra, on_ready, services=services)
    finally:
        if audit is not None:
            audit.close()


def _mount_in_background(
    backing: str,
    mountpoint: str,
    options: dict[str, Any],
    extra: list[str],
    cache_args: tuple[int | None, float | None],
    log_level: str,
    log_file: str | None,
    audit_log: str | None = None,
    runtime: ServerRuntime | None = None,
) -> None:
    """Fork a daemon; the parent exits 0 once the mount answers, or with the daemon's error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("OK"):
            click.echo(f"mounted {backing} at {mountpoint} (daemon pid {pid})")
            return
        if not message:
            _, status = os.waitpid(pid, 0)
            message = f"ERR 7 daemon exited (status {status}) before the mount answered"
        _, code, text = message.split(" ", 2)
        click.echo(f"kmsfs: error: {text.strip()}", err=True)
        sys.exit(int(code))

    os.close(read_end)
    setup_logging(log_level, log_file, background=True)

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
        _mount(backing, mountpoint, options, extra, cache_args, ready, audit_log, runtime)
    except KmsfsError as exc:
        code = exc.exit_code
        _report(write_end, code, str(exc))
    except BaseException as exc:  # the daemon must report, whatever happened
        code = 1
        _report(write_end, code, f"{type(exc).__name__}: {exc}")
    finally:
        logging.shutdown()
        os._exit(code)


def _report(fd: int, code: int, text: str) -> None:
    log.error("%s", text)
    try:
        os.write(fd, f"ERR {code} {text}\n".encode())
    except OSError:
        pass  # the parent is gone or the pipe was already closed after readiness


@main.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if the mount is busy.")
@config_option
@handle_errors
def umount(mountpoint: str | None, lazy: bool) -> None:
    """Unmount MOUNTPOINT (also clears a stale mount left by a dead daemon).

    With --config FILE, MOUNTPOINT may come from the file.
    """
    if mountpoint is None:
        raise UsageError("MOUNTPOINT missing: give it or --config FILE")
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().replace("fusermount3: ", "") or "fusermount3 failed"
        raise MountError(f"cannot unmount {mountpoint}: {reason}")


@main.command()
@click.argument("backing_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def inspect(backing_file: str, as_json: bool) -> None:
    """Show the header of BACKING_FILE (no key needed)."""
    from kmsfs.offline import inspect as inspect_file

    info = inspect_file(backing_file)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for name, value in info.items():
        if name != "entries":
            click.echo(f"{name}: {value}")
    for index, entry in enumerate(info["entries"]):
        click.echo(
            f"key {index}: {entry['provider']} {entry['key_ref']}"
            f" ({entry['wrapped_key_bytes']}-byte wrapped key)"
        )


@main.command()
@click.argument("backing_file", type=click.Path(dir_okay=False, exists=True))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option(
    "--volume",
    type=click.Path(file_okay=False, exists=True),
    help="Backing root of the volume (default: found above BACKING_FILE).",
)
@key_options(for_init=False)
@handle_errors
def decrypt(backing_file: str, output: str, volume: str | None, **kwargs: Any) -> None:
    """Decrypt BACKING_FILE to OUTPUT without mounting (offline recovery)."""
    from kmsfs.offline import decrypt_file
    from kmsfs.volume import find_volume_root, open_volume

    root = volume or find_volume_root(backing_file)
    _, keyring = open_volume(root, _options(kwargs), prompt_secret)
    try:
        size = decrypt_file(backing_file, output, keyring)
    finally:
        keyring.close()
    click.echo(f"decrypted {size} bytes to {output}")


@main.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys, for scripts).")
@config_option
@handle_errors
def status(mountpoint: str | None, as_json: bool) -> None:
    """Show the state of the mount at MOUNTPOINT: volume, keys, key cache, I/O, uptime.

    Exit 7 if no daemon answers for MOUNTPOINT.
    """
    from kmsfs.server.status import format_status, query

    if mountpoint is None:
        raise UsageError("MOUNTPOINT missing: give it or --config FILE")
    info = query(os.path.abspath(mountpoint))
    click.echo(json.dumps(info, indent=2) if as_json else format_status(info))


from kmsfs.cli_lifecycle import COMMANDS as _LIFECYCLE_COMMANDS  # noqa: E402

for _command in _LIFECYCLE_COMMANDS:
    main.add_command(_command)
