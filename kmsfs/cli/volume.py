"""``kmsfs init``, ``inspect``, ``decrypt`` and ``path``: making a volume and reading one
offline."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from kmsfs.errors import UsageError

if TYPE_CHECKING:
    from kmsfs.backing.names import Names
    from kmsfs.format.volume_config import VolumeConfig


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
    from kmsfs.volume_open import host_options_hint, init_volume

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
    _warn_if_headers_do_not_fit(backing, config)
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


def _warn_if_headers_do_not_fit(backing: str, config: VolumeConfig) -> None:
    """Note on stderr when the new volume's file headers will not fit in the backing
    filesystem's inodes (kmsfs/backing/inode_room.py): the moment an operator can still
    make the filesystem again."""
    from kmsfs.backing.inode_room import header_room_at, new_header_size

    room = header_room_at(backing)
    size = new_header_size(config)
    if room is not None and size > room:
        click.echo(
            f"kmsfs: note: a file's header ({size} bytes) does not fit the {room} bytes"
            " this filesystem keeps in an inode: each file will take one more 4 KiB block,"
            " and a cold open one more disk read; an ext4 made with larger inodes"
            ' (mkfs.ext4 -I 512) keeps it there (docs/SERVERS.md, "The backing filesystem")',
            err=True,
        )


IN_VOLUME_HELP = (
    "The file is given as its path in the volume (plaintext names) of --volume, not as a"
    " backing file; with encrypted names, this needs the volume's key options."
)


@click.command()
@click.argument("backing_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--in-volume", is_flag=True, help=IN_VOLUME_HELP)
@click.option(
    "--volume",
    type=click.Path(file_okay=False, exists=True),
    help="Backing root of the volume (default: found above BACKING_FILE).",
)
@key_options(for_init=False)
@handle_errors
def inspect(
    backing_file: str, as_json: bool, in_volume: bool, volume: str | None, **kwargs: Any
) -> None:
    """Show the header of BACKING_FILE (no key needed), and the generation of its volume's
    config (not verified) beside this host's pin of that volume.  With --in-volume,
    BACKING_FILE is a path in the volume --volume (plaintext names)."""
    from kmsfs.offline import inspect as inspect_file

    shown = _source_file(backing_file, in_volume, volume, kwargs)
    info = inspect_file(shown)
    if in_volume:
        info["path_in_volume"] = backing_file
    info.update(_volume_state(str(shown)))
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
    from kmsfs.format.volume_config import load_config
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
@click.argument("backing_file", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option(
    "--volume",
    type=click.Path(file_okay=False, exists=True),
    help="Backing root of the volume (default: found above BACKING_FILE).",
)
@click.option("--in-volume", is_flag=True, help=IN_VOLUME_HELP)
@key_options(for_init=False)
@handle_errors
def decrypt(
    backing_file: str, output: str, volume: str | None, in_volume: bool, **kwargs: Any
) -> None:
    """Decrypt BACKING_FILE to OUTPUT without mounting (offline recovery).  With
    --in-volume, BACKING_FILE is a path in the volume --volume (plaintext names)."""
    from kmsfs.backing.encrypted_names import names_for
    from kmsfs.offline import backing_of, decrypt_file
    from kmsfs.volume_open import find_volume_root, open_volume

    if in_volume and volume is None:
        raise UsageError("--in-volume needs --volume BACKING (the volume the path is in)")
    if not in_volume and not os.path.lexists(backing_file):
        raise UsageError(f"{backing_file} does not exist (a path in the volume needs --in-volume)")
    root = volume or find_volume_root(backing_file)
    config, keyring = open_volume(root, key_option_values(kwargs), prompt_secret)
    try:
        source = backing_file
        if in_volume:
            names = names_for(config.names, keyring.volume_key, config.volume_id)
            source = str(backing_of(root, names, backing_file))
        size = decrypt_file(source, output, keyring)
    finally:
        keyring.close()
    click.echo(f"decrypted {size} bytes to {output}")


def _source_file(given: str, in_volume: bool, volume: str | None, kwargs: dict[str, Any]) -> Path:
    """The backing file *given* names: itself, or (with *in_volume*) the backing entry of
    that path in the volume *volume* (opened with the key options in *kwargs* if its
    names are encrypted)."""
    from kmsfs.offline import backing_of

    if not in_volume:
        if not os.path.lexists(given):
            raise UsageError(f"{given} does not exist (a path in the volume needs --in-volume)")
        return Path(given)
    if volume is None:
        raise UsageError("--in-volume needs --volume BACKING (the volume the path is in)")
    return backing_of(volume, _names_of(volume, kwargs), given)


def _names_of(volume: str, kwargs: dict[str, Any]) -> Names:
    """The names of the volume *volume*: plain ones need no key; encrypted ones are
    opened with the key options in *kwargs* (the config authenticated, the host pin
    checked)."""
    from kmsfs.backing.encrypted_names import names_for
    from kmsfs.backing.names import PlainNames
    from kmsfs.format.volume_config import load_config
    from kmsfs.volume_open import open_volume

    if not load_config(volume).encrypted_names:
        return PlainNames()
    config, keyring = open_volume(volume, key_option_values(kwargs), prompt_secret)
    try:
        return names_for(config.names, keyring.volume_key, config.volume_id)
    finally:
        keyring.close()


@click.command()
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--to-backing",
    "to_backing",
    metavar="PATH",
    help="Print the backing entry (absolute path) of PATH, a path in the volume.",
)
@click.option(
    "--to-plain",
    "to_plain",
    metavar="BACKING_PATH",
    help="Print the path in the volume of BACKING_PATH (absolute under BACKING, or"
    " relative to BACKING).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with a long name's sidecar).")
@key_options(for_init=False)
@handle_errors
def path(
    backing: str, to_backing: str | None, to_plain: str | None, as_json: bool, **kwargs: Any
) -> None:
    """Map paths of the volume in BACKING to backing paths and back (to restore one file
    from a backup of the backing directory, say).  A volume with plain names needs no
    key: its paths are its backing paths.

    A long name (160 bytes or more, encrypted names) is a backing entry and a sidecar
    file beside it, ENTRY.name, which holds its encrypted name: restore both."""
    from kmsfs.format.names import LONG_NAME_PREFIX, SIDECAR_SUFFIX
    from kmsfs.offline import backing_of, path_in_volume

    if (to_backing is None) == (to_plain is None):
        raise UsageError("give one of --to-backing PATH and --to-plain BACKING_PATH")
    names = _names_of(backing, kwargs)
    if to_backing is not None:
        found = backing_of(backing, names, to_backing)
        sidecar = None
        if names.encrypted and os.fsencode(found.name).startswith(LONG_NAME_PREFIX):
            sidecar = str(found) + SIDECAR_SUFFIX.decode()
        info: dict[str, Any] = {"path": to_backing, "backing": str(found), "sidecar": sidecar}
    else:
        assert to_plain is not None
        info = {"backing": to_plain, "path": path_in_volume(backing, names, to_plain)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(info["backing"] if to_backing is not None else info["path"])
