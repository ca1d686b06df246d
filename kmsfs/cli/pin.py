"""``kmsfs pin show|set``: this host's pin of a volume (docs/KEYS.md, "The host pin")."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from kmsfs.cli.common import handle_errors, key_option_values, key_options, prompt_secret

if TYPE_CHECKING:
    from kmsfs.pins import Pin


@click.group()
def pin() -> None:
    """Show or set what this host trusts as the volume in a backing directory."""


def _describe(values: dict[str, Any] | None) -> dict[str, str]:
    if values is None:
        return dict.fromkeys(("volume ID", "fingerprint", "generation", "format"), "-")
    return {
        "volume ID": values["volume_id"],
        "fingerprint": values["fingerprint"],
        "generation": str(values["generation"]),
        "format": str(values["format"]),
    }


def _shown(pin: Pin | None) -> dict[str, Any] | None:
    return None if pin is None else pin.shown()


@pin.command("show")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def pin_show(backing: str, as_json: bool) -> None:
    """Show this host's pin of BACKING beside what its volume config says (no key needed;
    the config's values are not verified here: mount and the tools verify them)."""
    from kmsfs.format.volume_config import load_config
    from kmsfs.pins import pins_dir, read_pin

    current = _shown(read_pin(backing))
    config = load_config(backing)
    unverified = {
        "volume_id": config.volume_id.hex(),
        "format": config.version,
        "generation": config.generation,
    }
    if as_json:
        click.echo(json.dumps({"pin": current, "config": unverified}, indent=2))
        return
    if current is None:
        click.echo(f"{backing}: not pinned on this host (the next open pins it; {pins_dir()})")
    else:
        click.echo(f"pinned on this host: {current['backing']}")
        for name, value in _describe(current).items():
            click.echo(f"  {name + ':':13}{value}")
        click.echo(f"  {'pinned:':13}{current['pinned_at']} ({current['pinned_by']})")
        if current["updated_at"]:
            click.echo(f"  {'updated:':13}{current['updated_at']} ({current['updated_by']})")
    click.echo(
        f"volume config (not verified): volume ID {unverified['volume_id']}, format"
        f" {unverified['format']}, generation {unverified['generation']}"
    )


@pin.command("set")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@key_options(for_init=False)
@click.option("--yes", is_flag=True, help="Re-pin without --expect-fingerprint.")
@handle_errors
def pin_set(backing: str, yes: bool, **kwargs: Any) -> None:
    """Pin BACKING at its current volume config on purpose (a restore, a new host, a volume
    re-created at that path).

    The config is authenticated with the key options (the keys this host names
    only), and the old and new values are shown.  Give --expect-fingerprint FP
    (checked: refused with exit 8 if the volume key's fingerprint differs) or
    --yes.
    """
    import dataclasses

    from kmsfs.errors import PinMismatch, UsageError
    from kmsfs.format.volume_key import fingerprint, parse_fingerprint, show_fingerprint
    from kmsfs.keys.provider import wipe
    from kmsfs.pins import read_pin
    from kmsfs.trust import set_pin
    from kmsfs.volume_open import authenticate_volume

    options = key_option_values(kwargs)
    text = options.expect_fingerprint
    expected = parse_fingerprint(text, "--expect-fingerprint") if text else None
    config, volume_key = authenticate_volume(
        backing, dataclasses.replace(options, expect_fingerprint=None), prompt_secret
    )
    try:
        value = fingerprint(volume_key, config.volume_id)
        old = _describe(_shown(read_pin(backing)))
        new = _describe(
            {
                "volume_id": config.volume_id.hex(),
                "fingerprint": show_fingerprint(value),
                "generation": config.generation,
                "format": config.version,
            }
        )
        for name in old:
            mark = "" if old[name] == new[name] else "   (changes)"
            click.echo(f"{name + ':':13}{old[name]} -> {new[name]}{mark}")
        if expected is not None and expected != value:
            raise PinMismatch(
                f"{backing}: the volume key's fingerprint is {show_fingerprint(value)}, not"
                f" {show_fingerprint(expected)}: nothing was pinned"
            )
        if expected is None and not yes:
            raise UsageError(
                "nothing was pinned: check the new fingerprint with a host that knows the"
                f" volume, then run this again with --expect-fingerprint {show_fingerprint(value)}"
                " (or --yes)"
            )
        set_pin(backing, config, volume_key)
    finally:
        wipe(volume_key)
    click.echo(f"pinned {backing} at fingerprint {show_fingerprint(value)}")
