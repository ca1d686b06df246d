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

if TYPE_CHECKING:
    from kmsfs.format.volume_config import VolumeConfig

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
    "expect_fingerprint",
)

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
            opts.append(click.option("--expect-fingerprint", metavar="FP", help=EXPECT_HELP))
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


def provider_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--provider``: one of the registered providers, local by default."""
    from kmsfs.keys.registry import PROVIDER_NAMES

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


def key_option_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the key options from a command's *kwargs*: the options a provider reads."""
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


# --old-X -> the option X naming the current key on this host; the shared --kms-region,
# --kms-endpoint-url and --kms-profile serve the current key too.
OLD_OPTIONS = {
    "old_key_file": "key_file",
    "old_passphrase_file": "passphrase_file",
    "old_kms_key_id": "kms_key_id",
    "old_pkcs11_module": "pkcs11_module",
    "old_pkcs11_token": "pkcs11_token",
    "old_pkcs11_key": "pkcs11_key",
    "old_pkcs11_pin_file": "pkcs11_pin_file",
    "trust_volume_settings": "trust_volume_settings",
    "expect_fingerprint": "expect_fingerprint",
}
SHARED_OPTIONS = ("kms_region", "kms_endpoint_url", "kms_profile")


def old_key_options(func: Any) -> Any:
    """Options naming the volume's current key on this host (the new key uses the others)."""
    for opt in reversed(
        [
            click.option(
                "--old-key-file",
                type=click.Path(dir_okay=False, exists=True),
                help="Current local key file.",
            ),
            click.option(
                "--old-passphrase-file",
                type=click.Path(dir_okay=False, exists=True),
                help="File holding the current passphrase.",
            ),
            click.option("--old-kms-key-id", help="Current AWS KMS key (ARN, ID or alias)."),
            click.option(
                "--old-pkcs11-module",
                type=click.Path(dir_okay=False),
                help="PKCS#11 module of the current key.",
            ),
            click.option("--old-pkcs11-token", help="Token label of the current key."),
            click.option("--old-pkcs11-key", help="Label of the current key on its token."),
            click.option(
                "--old-pkcs11-pin-file",
                type=click.Path(dir_okay=False, exists=True),
                help="File holding the current PKCS#11 token PIN.",
            ),
            click.option(
                "--trust-volume-settings",
                is_flag=True,
                default=None,
                help="Find the current keys with the settings recorded in the backing"
                " directory (only for a backing directory nobody else can write).",
            ),
            click.option("--expect-fingerprint", metavar="FP", help=EXPECT_HELP),
        ]
    ):
        func = opt(func)
    return func


def old_option_values(kwargs: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    old = {option: kwargs.pop(name, None) for name, option in OLD_OPTIONS.items()}
    old.update({name: new.get(name) for name in SHARED_OPTIONS})
    old["flag_names"] = {
        option: "--" + name.replace("_", "-") for name, option in OLD_OPTIONS.items()
    }
    return old


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
