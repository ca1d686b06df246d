"""Volume config files: ``/etc/kmsfs/NAME.toml``, one volume per file.

Schema (every key optional except where the command line does not supply it)::

    backing = "/srv/enc"              # absolute path of the backing directory
    mountpoint = "/srv/data"          # absolute path of the mount point
    options = ["allow_other"]         # FUSE mount options (list, or "a,b" string)
    log_level = "info"                # debug, info, warning, error
    log_file = "/var/log/kmsfs.log"   # default: stderr (the journal under systemd)
    audit_log = "/var/log/kmsfs/data-audit.jsonl"
    metrics_listen = "127.0.0.1:9750" # Prometheus endpoint (needs kmsfs[metrics])
    trust_volume_settings = false     # true: find keys with the settings recorded in the
                                      # backing directory (only if nobody else can write it)
    expect_fingerprint = "3f2a-91c0-..."  # the volume-key fingerprint to pin at the first
                                      # mount on this host (ignored once pinned)

    [provider]
    type = "local"                    # local, aws-kms, pkcs11
    key_file = "/etc/kmsfs/data.key"  # local: key_file, passphrase_file
                                      # aws-kms: key_id, region, endpoint_url, profile
                                      # pkcs11: module, token, key, pin_file
                                      # (declared in kmsfs/keys/settings.py)

    [cache]
    max_entries = 10000               # unwrapped file keys kept in memory
    max_age = 3600                    # seconds

    [policy]                          # who may see plaintext (kmsfs/policy/parse.py)
    mode = "enforce"                  # or "learn"
    default = "permit"                # or "deny"
    [[policy.rule]]
    users = ["postgres"]
    paths = ["/db/**"]
    effect = "permit"

Precedence: the command line over this file.  The settings recorded in the
volume (``.kmsfs.json``) are hints, used only once the volume config is
authenticated or with ``trust_volume_settings`` (docs/FORMAT.md, "Threat model").
The file names code to load and endpoints to contact, so it must be owned by
root (or the user running kmsfs) and not writable by group or others.  The
file is validated whole when it is loaded and a ConfigError names the file,
the key and the problem.  Secrets (passphrases, PINs, key material) are
refused here: they come from files named by ``*_file`` keys, from systemd
credentials or from a prompt.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.errors import ConfigError
from kmsfs.format.volume_key import parse_fingerprint
from kmsfs.hostfiles import open_regular
from kmsfs.keys.settings import PROVIDERS
from kmsfs.policy import Policy, parse_policy
from kmsfs.server.spec import seconds_range_problem

CONFIG_DIR = Path("/etc/kmsfs")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Names that would hold a secret: refused wherever they appear.
SECRET_NAMES = {
    "passphrase": "passphrase_file",
    "password": "passphrase_file",
    "pin": "pin_file",
    "user_pin": "pin_file",
    "so_pin": "pin_file",
    "secret": None,
    "secret_key": None,
    "master_key": "key_file",
    "key_data": "key_file",
    "key_material": "key_file",
    "aws_secret_access_key": None,
    "aws_session_token": None,
    "secret_access_key": None,
    "session_token": None,
}
CREDENTIAL_HINT = {
    "passphrase_file": "kmsfs-passphrase",
    "pin_file": "kmsfs-pin",
}

TOP_LEVEL = {
    "backing",
    "mountpoint",
    "options",
    "shared",
    "shared_timeout",
    "shared_lock_timeout",
    "log_level",
    "log_file",
    "audit_log",
    "metrics_listen",
    "provider",
    "cache",
    "trust_volume_settings",
    "expect_fingerprint",
    "policy",
}
CACHE_KEYS = {"max_entries", "max_age"}


@dataclass(frozen=True)
class ServerConfig:
    """One volume's config file, validated.

    Attributes: path (the file), backing, mountpoint, provider_type,
    provider_options (CLI parameter name -> value), mount_options (FUSE options),
    shared, shared_timeout and shared_lock_timeout (shared mode and its timeouts,
    in their ranges: kmsfs/server/spec.py), cache_max_entries, cache_max_age,
    log_level, log_file, audit_log, metrics_listen, policy (the compiled
    ``[policy]``), expect_fingerprint (as written; checked to be a fingerprint).
    Unset values are None.
    """

    path: Path
    backing: str | None = None
    mountpoint: str | None = None
    provider_type: str | None = None
    provider_options: dict[str, str] = field(default_factory=dict)
    mount_options: tuple[str, ...] = ()
    shared: bool | None = None
    shared_timeout: float | None = None
    shared_lock_timeout: float | None = None
    cache_max_entries: int | None = None
    cache_max_age: float | None = None
    log_level: str | None = None
    log_file: str | None = None
    audit_log: str | None = None
    metrics_listen: str | None = None
    trust_volume_settings: bool | None = None
    expect_fingerprint: str | None = None
    policy: Policy | None = None

    def cli_defaults(self) -> dict[str, Any]:
        """Values for click's ``default_map``: what the command line did not say.

        Mount options are not here: they are added to the command line's
        (see ``mount_options``), not replaced by them.
        """
        values: dict[str, Any] = {
            "backing": self.backing,
            "mountpoint": self.mountpoint,
            "cache_max_entries": self.cache_max_entries,
            "cache_max_age": self.cache_max_age,
            "log_level": self.log_level,
            "log_file": self.log_file,
            "audit_log": self.audit_log,
            "metrics_listen": self.metrics_listen,
            "trust_volume_settings": self.trust_volume_settings,
            "expect_fingerprint": self.expect_fingerprint,
            **self.provider_options,
        }
        return {name: value for name, value in values.items() if value is not None}


def load_server_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read and validate the config file *path*; ConfigError naming the key and the problem.

    The ServerConfig's path (and its policy's source) is absolute: a daemon
    re-reads it on reload after leaving the working directory.
    """
    path = Path(os.path.abspath(path))
    # a FIFO would hang us; a symlink is followed (/etc may be links into a store) and
    # what it names is checked
    fd, _ = open_regular(path, os.O_RDONLY, "config file", follow=True)
    try:
        with open(fd, "rb") as handle:
            _check_owner_and_mode(handle.fileno(), path)
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_server_config(data, path)


def _check_owner_and_mode(fd: int, path: Path) -> None:
    """ConfigError unless the open file *fd* is owned by root or us and not group/world-writable."""
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"config file {path} is owned by uid {st.st_uid}: it names code to load and"
            f" endpoints to contact, so it must belong to root (chown root: {path})"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"config file {path} is writable by group or others (mode {st.st_mode & 0o777:o}):"
            f" run chmod go-w {path}"
        )


def parse_server_config(data: dict[str, Any], path: Path) -> ServerConfig:
    """Validate the parsed TOML *data* of the file *path*."""
    where = str(path)
    _refuse_secrets(data, where, "")
    _refuse_unknown(data, TOP_LEVEL, where, "")

    provider_type: str | None = None
    provider_options: dict[str, str] = {}
    provider = _table(data, "provider", where)
    if provider is not None:
        provider_type, provider_options = _parse_provider(provider, where)

    cache = _table(data, "cache", where)
    max_entries: int | None = None
    max_age: float | None = None
    if cache is not None:
        _refuse_unknown(cache, CACHE_KEYS, where, "cache.")
        max_entries = _get(cache, "max_entries", int, where, "cache.")
        if max_entries is not None and max_entries < 0:
            raise ConfigError(f"{where}: cache.max_entries must not be negative")
        raw_age = _get(cache, "max_age", (int, float), where, "cache.")
        if raw_age is not None:
            if raw_age < 0:
                raise ConfigError(f"{where}: cache.max_age must not be negative")
            max_age = float(raw_age)

    log_level = _get(data, "log_level", str, where)
    if log_level is not None and log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"{where}: log_level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    metrics_listen = _get(data, "metrics_listen", str, where)
    if metrics_listen is not None:
        try:
            parse_listen_address(metrics_listen)
        except ValueError as exc:
            raise ConfigError(f"{where}: metrics_listen: {exc}") from None

    policy_table = _table(data, "policy", where)
    policy = parse_policy(policy_table, where) if policy_table is not None else None

    trust = data.get("trust_volume_settings")
    if trust is not None and not isinstance(trust, bool):
        raise ConfigError(f"{where}: trust_volume_settings must be true or false, not {trust!r}")
    expect = _get(data, "expect_fingerprint", str, where)
    if expect is not None:
        parse_fingerprint(expect, f"{where}: expect_fingerprint")
    shared, timeouts = _shared_mode(data, where)
    return ServerConfig(
        path=path,
        trust_volume_settings=trust,
        expect_fingerprint=expect,
        backing=_abs_path(data, "backing", where),
        mountpoint=_abs_path(data, "mountpoint", where),
        provider_type=provider_type,
        provider_options=provider_options,
        mount_options=_mount_options(data, where),
        shared=shared,
        shared_timeout=timeouts.get("shared_timeout"),
        shared_lock_timeout=timeouts.get("shared_lock_timeout"),
        cache_max_entries=max_entries,
        cache_max_age=max_age,
        log_level=log_level.lower() if log_level else None,
        log_file=_abs_path(data, "log_file", where),
        audit_log=_abs_path(data, "audit_log", where),
        metrics_listen=metrics_listen,
        policy=policy,
    )


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); ValueError saying why not."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:9750)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return host, port


def check_volume_provider(config: ServerConfig, backing: str) -> None:
    """ConfigError if ``provider.type`` names no master key of the volume in *backing*."""
    if config.provider_type is None:
        return
    from kmsfs.format.volume_config import load_config

    volume = load_config(backing)
    types = [key.provider for key in volume.keys]
    if config.provider_type not in types:
        have = ", ".join(f"{key.provider} {key.key_ref}" for key in volume.keys)
        raise ConfigError(
            f"{config.path}: provider.type is {config.provider_type!r} but the volume in"
            f" {backing} has no such master key (it has {have})"
        )


# -- validation helpers ------------------------------------------------------


def _refuse_secrets(table: dict[str, Any], where: str, prefix: str) -> None:
    for name, value in table.items():
        lowered = name.lower()
        if lowered in SECRET_NAMES:
            use = SECRET_NAMES[lowered]
            hint = "put it in a file readable only by root"
            if use:
                hint += f" and name that file with {use}"
                credential = CREDENTIAL_HINT.get(use)
                if credential:
                    hint += f", or pass a systemd credential (LoadCredential={credential}:FILE)"
            raise ConfigError(
                f"{where}: {prefix}{name}: secrets never go in the config file; {hint}"
            )
        if isinstance(value, dict):
            _refuse_secrets(value, where, f"{prefix}{name}.")


def _refuse_unknown(table: dict[str, Any], known: set[str], where: str, prefix: str) -> None:
    for name in table:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key {prefix}{name}{hint}; known: "
                + ", ".join(f"{prefix}{k}" for k in sorted(known))
            )


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _get(
    table: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    where: str,
    prefix: str = "",
) -> Any:
    value = table.get(name)
    if value is None:
        return None
    # bool is an int in Python; TOML true/false is never a count or a path
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(
            f"{where}: {prefix}{name} must be {_type_name(kind)}, not {type(value).__name__}"
            f" ({value!r})"
        )
    return value


def _table(data: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    value: dict[str, Any] | None = _get(data, name, dict, where)
    return value


def _abs_path(table: dict[str, Any], name: str, where: str, prefix: str = "") -> str | None:
    value: str | None = _get(table, name, str, where, prefix)
    if value is None:
        return None
    if not value:
        raise ConfigError(f"{where}: {prefix}{name} is empty")
    if not os.path.isabs(value):
        raise ConfigError(f"{where}: {prefix}{name} must be an absolute path, not {value!r}")
    return value


def _mount_options(data: dict[str, Any], where: str) -> tuple[str, ...]:
    value = data.get("options")
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [part for item in value for part in item.split(",")]
    else:
        raise ConfigError(f"{where}: options must be a list of strings or a comma-separated string")
    items = [item.strip() for item in items if item.strip()]
    for item in items:
        if item.startswith("config="):
            raise ConfigError(f"{where}: options: {item!r} makes no sense inside a config file")
    return tuple(items)


def _shared_mode(data: dict[str, Any], where: str) -> tuple[bool | None, dict[str, float]]:
    """``shared = true``, ``shared_timeout = SECONDS`` and ``shared_lock_timeout =
    SECONDS``: (shared, the timeouts given).  ConfigError for a timeout that is not a
    number of seconds in its range, or set while shared is not true."""
    shared = data.get("shared")
    if shared is not None and not isinstance(shared, bool):
        raise ConfigError(f"{where}: shared must be true or false, not {shared!r}")
    timeouts: dict[str, float] = {}
    for name in ("shared_timeout", "shared_lock_timeout"):
        timeout = data.get(name)
        if timeout is None:
            continue
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise ConfigError(f"{where}: {name} must be a number of seconds, not {timeout!r}")
        if not shared:
            raise ConfigError(f"{where}: {name} is set but shared is not true")
        problem = seconds_range_problem(name, float(timeout))
        if problem is not None:
            raise ConfigError(f"{where}: {name} = {timeout!r}: {problem}")
        timeouts[name] = float(timeout)
    return shared, timeouts


def _parse_provider(provider: dict[str, Any], where: str) -> tuple[str, dict[str, str]]:
    """``[provider]``: its type and {option: value}, the keys being the declared settings
    of that provider (kmsfs/keys/settings.py) that belong in a volume config."""
    kinds = ", ".join(sorted(PROVIDERS))
    kind = _get(provider, "type", str, where, "provider.")
    if kind is None:
        raise ConfigError(f"{where}: provider.type is missing (one of {kinds})")
    if kind not in PROVIDERS:
        raise ConfigError(f"{where}: provider.type {kind!r} is not one of {kinds}")
    allowed = PROVIDERS[kind].toml_settings
    options: dict[str, str] = {}
    for name in provider:
        if name == "type":
            continue
        if name not in allowed:
            other = [t for t, decl in PROVIDERS.items() if name in decl.toml_settings]
            hint = f" (it belongs to the {other[0]} provider)" if other else ""
            raise ConfigError(
                f"{where}: provider.{name} is not an option of the {kind} provider{hint};"
                f" its options: {', '.join(sorted(allowed))}"
            )
        if allowed[name].kind == "path":  # a file on this host: absolute, existing
            value = _abs_path(provider, name, where, "provider.")
            assert value is not None
            if not os.path.exists(value):
                raise ConfigError(f"{where}: provider.{name}: {value} does not exist")
        else:
            value = _get(provider, name, str, where, "provider.")
            if not value:
                raise ConfigError(f"{where}: provider.{name} is empty")
        options[allowed[name].option] = value
    return kind, options
