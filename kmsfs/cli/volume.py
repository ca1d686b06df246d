"""``kmsfs init``, ``inspect`` and ``decrypt``: making a volume and reading one offline."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

import click

from kmsfs.cli.common import (
    handle_errors,
    key_option_values,
    key_options,
    names_mode,
    names_option,
    prompt_secret,
    provider_option,
)


@click.command()
@click.argument("backing", type=click.Path(file_okay=False))
@provider_option("Master key provider.")
@click.option(
    "--block-size",
    default=4096,
    show_default=True,
    type=int,
    help="Plaintext block size in bytes (power of two, 512..1048576).",
)
@names_option
@key_options(for_init=True)
@handle_errors
def init(backing: str, provider: str, block_size: int, plain_names: bool, **kwargs: Any) -> None:
    """Create a volume in the empty directory BACKING."""
    from kmsfs.backing.shared import check_ofd_locks, check_user_xattrs
    from kmsfs.errors import ConfigError
    from kmsfs.format.volume_key import show_fingerprint
    from kmsfs.pins import read_pin
    from kmsfs.volume import host_options_hint, init_volume

    # On the filesystem that will hold it (its parent if init is to create it):
    where = backing if os.path.isdir(backing) else os.path.dirname(os.path.abspath(backing))
    check_user_xattrs(where)  # every file's header lives in one
    try:
        check_ofd_locks(where)
    except ConfigError as exc:
        click.echo(f"kmsfs: warning: {exc} (the volume can still be mounted alone)", err=True)
    config = init_volume(
        backing,
        provider,
        key_option_values(kwargs),
        prompt_secret,
        block_size,
        encrypted_names=not plain_names,
    )
    key = config.keys[0]
    click.echo(f"created volume {config.volume_id.hex()} in {backing}")
    click.echo(f"names: {names_mode(config)}")
    pin = read_pin(backing)
    if pin is not None:
        click.echo(
            f"volume-key fingerprint: {show_fingerprint(pin.fingerprint)} (pinned on this host;"
            " give it as --expect-fingerprint at the first mount on another host)"
        )
    named = host_options_hint(key).split(" (")[0].replace("its options", "")
    click.echo(f"mount it with: kmsfs mount {shlex.quote(backing)} MOUNTPOINT {named}".rstrip())
    click.echo(f"master key: {key.provider} {key.key_ref}")


@click.command()
@click.argument("backing_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def inspect(backing_file: str, as_json: bool) -> None:
    """Show the header of BACKING_FILE (no key needed), and the generation of its volume's
    config (not verified) beside this host's pin of that volume."""
    from kmsfs.offline import inspect as inspect_file

    info = inspect_file(backing_file)
    info.update(_volume_state(backing_file))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for name, value in info.items():
        if name not in ("entries", "volume_config", "host_pin"):
            click.echo(f"{name}: {value}")
    for index, entry in enumerate(info["entries"]):
        click.echo(
            f"key {index}: {entry['provider']} {entry['key_ref']}"
            f" ({entry['wrapped_key_bytes']}-byte wrapped key)"
        )
    config, pin = info.get("volume_config"), info.get("host_pin")
    if config is not None:
        click.echo(
            f"volume config: {config['error']}"
            if "error" in config
            else f"volume config: format {config['format']}, generation {config['generation']},"
            f" {config['names']} names (not verified)"
        )
    if pin is not None:
        click.echo(
            f"host pin: {pin['error']}"
            if "error" in pin
            else f"host pin: volume-key fingerprint {pin['fingerprint']}, generation"
            f" {pin['generation']}, format {pin['format']} ({pin['pinned_by']},"
            f" {pin['pinned_at']})"
        )
    elif config is not None:
        click.echo("host pin: none (this host has not opened the volume)")


def _volume_state(backing_file: str) -> dict[str, Any]:
    """The volume config's format and generation and this host's pin, for the volume
    that holds *backing_file* ({} for a file outside any volume).  A config or pin
    that cannot be read is shown as ``{"error": ...}``: inspect still shows the header."""
    from kmsfs.errors import ConfigError
    from kmsfs.format.volume import load_config
    from kmsfs.offline import volume_root_of
    from kmsfs.pins import read_pin

    found = volume_root_of(backing_file)
    if found is None:
        return {}
    state: dict[str, Any] = {}
    try:
        config = load_config(found[0])
        state["volume_config"] = {
            "format": config.version,
            "generation": config.generation,
            "names": "encrypted" if config.encrypted_names else "plain",
        }
    except ConfigError as exc:
        state["volume_config"] = {"error": str(exc)}
    try:
        pin = read_pin(found[0])
        state["host_pin"] = None if pin is None else pin.shown()
    except ConfigError as exc:
        state["host_pin"] = {"error": str(exc)}
    return state


@click.command()
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
    _, keyring = open_volume(root, key_option_values(kwargs), prompt_secret)
    try:
        size = decrypt_file(backing_file, output, keyring)
    finally:
        keyring.close()
    click.echo(f"decrypted {size} bytes to {output}")
