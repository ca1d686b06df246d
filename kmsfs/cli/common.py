"""What the ``kmsfs`` commands share: key options, error handling, progress flags.

Errors are one line on stderr, ``kmsfs: error: ...``, and the exit code of
their class (kmsfs/errors.py, README "Exit codes").
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from kmsfs.errors import KmsfsError, UsageError
from kmsfs.keys.settings import (
    CONTROL_OPTIONS,
    PROVIDER_NAMES,
    HostOptions,
    Setting,
    all_settings,
)

if TYPE_CHECKING:
    from kmsfs.format.volume_config import VolumeConfig

EXPECT_HELP = (
    "The volume-key fingerprint this volume must have when this host has not pinned it"
    " yet ('kmsfs pin show' on a host that knows it); refused if it differs. Ignored once"
    " pinned: the pin decides."
)


def prompt_secret(text: str, confirm: bool) -> str:
    """Ask on the terminal; ConfigError-free: click raises Abort on Ctrl-C."""
    if not sys.stdin.isatty():
        from kmsfs.errors import ConfigError

        raise ConfigError(f"{text} needed but there is no terminal to ask on: use a file option")
    return str(click.prompt(text, hide_input=True, confirmation_prompt=confirm, err=True))


TRUST_HELP = (
    "Find keys this host does not name with the settings recorded in the backing directory"
    " (key file path, KMS endpoint, PKCS#11 module). Only for a backing directory nobody"
    " else can write."
)
OLD_TRUST_HELP = (
    "Find the current keys with the settings recorded in the backing directory (only for a"
    " backing directory nobody else can write)."
)


def setting_option(declared: Setting, old: bool = False) -> Callable[[Any], Any]:
    """The click option of a declared provider setting (``--old-OPTION`` with *old*)."""
    help_text = declared.old_help if old else declared.help
    flag = "--old-" + declared.flag[2:] if old else declared.flag
    if declared.kind == "flag":
        return click.option(flag, is_flag=True, help=help_text)
    if declared.kind == "choice":
        return click.option(flag, type=click.Choice(list(declared.choices)), help=help_text)
    if declared.kind == "path":
        exists = declared.secret_file and (old or not declared.created)
        return click.option(flag, type=click.Path(dir_okay=False, exists=exists), help=help_text)
    return click.option(flag, help=help_text)


def _apply(func: Callable[..., Any], opts: list[Callable[[Any], Any]]) -> Callable[..., Any]:
    for opt in reversed(opts):
        func = opt(func)
    return func


def key_options(for_init: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that locate a master key (never the secret itself): every provider's
    declared settings (kmsfs/keys/settings.py), and the control flags of commands that
    open a volume."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        opts = [setting_option(s) for _, _, s in all_settings() if not s.init_only]
        if not for_init:
            opts.append(
                click.option("--trust-volume-settings", is_flag=True, default=None, help=TRUST_HELP)
            )
            opts.append(click.option("--expect-fingerprint", metavar="FP", help=EXPECT_HELP))
        if for_init:
            opts += [setting_option(s) for _, _, s in all_settings() if s.init_only]
        return _apply(func, opts)

    return decorate


def provider_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--provider``: one of the declared providers, local by default."""
    return click.option(
        "--provider",
        default="local",
        show_default=True,
        type=click.Choice(PROVIDER_NAMES),
        help=help_text,
    )


ENCRYPTED_NAMES_BY_DEFAULT = True


def names_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--plain-names/--encrypted-names``: the names of a new volume."""
    return click.option(
        "--plain-names/--encrypted-names",
        "plain_names",
        default=not ENCRYPTED_NAMES_BY_DEFAULT,
        show_default=True,
        help="Encrypt file and directory names, symlink targets and user/trusted xattrs"
        " (--encrypted-names), or store them in the clear (--plain-names): then whoever"
        " reads the backing directory, its backups or its disk reads every name, every"
        " symlink target and every user.* xattr as it is. Either way the tree's shape,"
        " entry counts, sizes, times and owners stay visible (docs/FORMAT.md, 'What"
        " encrypted names hide'); --plain-names only for a backing directory nobody but"
        " this host reads.",
    )(func)


def names_mode(config: VolumeConfig) -> str:
    """How a volume stores names, in one phrase (init, inspect, status)."""
    if config.encrypted_names:
        return "encrypted (names, symlink targets and user/trusted xattrs)"
    return "plain (names, symlink targets and user/trusted xattrs stored as they are)"


def key_option_values(kwargs: dict[str, Any]) -> HostOptions:
    """Pop the key options from a command's *kwargs*: the host's provider settings and
    control flags."""
    names = [s.option for _, _, s in all_settings()] + list(CONTROL_OPTIONS)
    return HostOptions.parse({name: kwargs.pop(name) for name in names if name in kwargs})


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


def old_key_options(func: Any) -> Any:
    """Options naming the volume's current key on this host (the new key uses the others;
    a shared setting, such as --kms-region, serves both)."""
    opts = [setting_option(s, old=True) for _, _, s in all_settings() if s.old_help is not None]
    opts.append(
        click.option("--trust-volume-settings", is_flag=True, default=None, help=OLD_TRUST_HELP)
    )
    opts.append(click.option("--expect-fingerprint", metavar="FP", help=EXPECT_HELP))
    return _apply(func, opts)


def old_option_values(kwargs: dict[str, Any], new: HostOptions) -> HostOptions:
    """Pop the --old-* options from *kwargs*: the options of the current key, with the
    shared settings of *new* and the control flags."""
    values: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for _, _, declared in all_settings():
        if declared.old_option is not None:
            values[declared.option] = kwargs.pop(declared.old_option, None)
            renamed[declared.option] = "--old-" + declared.flag[2:]
        elif declared.shared:
            values[declared.option] = new.value(declared.option)
    return HostOptions.parse(
        values,
        trust_volume_settings=kwargs.pop("trust_volume_settings", None),
        expect_fingerprint=kwargs.pop("expect_fingerprint", None),
        flag_names=renamed,
    )


def adding_key_option_values(kwargs: dict[str, Any]) -> tuple[HostOptions, HostOptions]:
    """Pop the options of a command that adds a key (rewrap, keys add): the new key's,
    as for init, and the current key's (``old_option_values``).  The control flags go
    with the current key: they are about opening the volume, which it does."""
    control = {name: kwargs.pop(name) for name in CONTROL_OPTIONS if name in kwargs}
    new = key_option_values(kwargs)
    kwargs.update(control)
    return new, old_option_values(kwargs, new)


def progress_flag(quiet: bool) -> bool | None:
    return False if quiet else None  # None: on a terminal only


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31557600}


def parse_duration(text: str) -> float:
    """'90d', '12h', '2w', '1y', '30m', '45s' (or plain seconds) -> seconds."""
    text = text.strip().lower()
    try:
        if text and text[-1] in _UNITS:
            value = float(text[:-1]) * _UNITS[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise UsageError(f"duration {text!r}: want a number with s, m, h, d, w or y") from None
    if value < 0:
        raise UsageError(f"duration {text!r} is negative")
    return value
