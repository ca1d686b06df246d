"""``kmsfs rewrap``, ``keys list|add|remove|update`` and ``passwd``: the master keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kmsfs.cli.common import (
    adding_key_option_values,
    handle_errors,
    key_option_values,
    key_options,
    old_key_options,
    progress_flag,
    prompt_secret,
    provider_option,
    quiet_option,
)

REWRAP_INCOMPLETE = 1


def _print_rewrap(report: Any, verb: str) -> None:
    for rel, message in report.skipped:
        click.echo(f"skipped {rel}: {message}", err=True)
    for rel, message in report.problems:
        click.echo(f"FAILED {rel}: {message}", err=True)
    rate = report.files / report.seconds if report.seconds else 0.0
    if report.dry_run:
        click.echo(
            f"dry run: {report.files} files, {report.rewrapped} would be re-wrapped under"
            f" {report.new_key}, {report.already} already are, {len(report.skipped)} skipped,"
            f" {len(report.problems)} cannot be"
        )
        return
    click.echo(
        f"{verb}: {report.files} files, {report.rewrapped} re-wrapped"
        f" ({report.reencrypted} by the provider's re-encrypt), {report.already} already"
        f" had the key, {report.stripped} old entries removed, {len(report.skipped)} skipped,"
        f" {len(report.problems)} failed, in {report.seconds:.1f} s ({rate:,.0f} files/s)"
    )
    if report.problems:
        click.echo(
            f"kmsfs: error: {len(report.problems)} files could not be re-wrapped (listed above);"
            " the volume keeps its current keys: fix them and run the same command again",
            err=True,
        )
        sys.exit(REWRAP_INCOMPLETE)
    if report.finished:
        if report.retired:
            click.echo(f"volume now uses {report.new_key}; removed {', '.join(report.retired)}")
        else:
            click.echo(f"done: every file is wrapped under {report.new_key}")
    elif report.mounted_at:
        click.echo(
            f"volume is mounted at {report.mounted_at}: every file present is wrapped under"
            f" {report.new_key} too, but the old keys stay in the volume config because the"
            " running daemon wraps new files under the keys it loaded at mount; unmount, then"
            " run the same command again to finish"
        )


@click.command()
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@provider_option("Provider of the new master key.")
@key_options(for_init=True)
@old_key_options
@click.option("--dry-run", is_flag=True, help="Check every file can be re-wrapped; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@quiet_option
@handle_errors
def rewrap(
    backing: str, provider: str, dry_run: bool, as_json: bool, quiet: bool, **kwargs: Any
) -> None:
    """Re-wrap every file key of BACKING under a new master key (no content rewritten).

    The new key is described as for init; the current one comes from the
    volume's settings or --old-*.  Resumable: run it again after a crash.
    """
    from kmsfs.lifecycle.rewrap import rewrap_volume

    new, current = adding_key_option_values(kwargs)
    report = rewrap_volume(
        backing,
        provider,
        new,
        current,
        prompt_secret,
        retire_old=True,
        dry_run=dry_run,
        show_progress=progress_flag(quiet or as_json),
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        if report.problems:
            sys.exit(REWRAP_INCOMPLETE)
        return
    _print_rewrap(report, "rewrap")


@click.group()
def keys() -> None:
    """List, add, remove and update the master keys of a volume."""


@keys.command("list")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def keys_list(backing: str, as_json: bool) -> None:
    """List the master keys of BACKING in the order they are tried."""
    from kmsfs.backing.journals import load_journal
    from kmsfs.format.volume_config import load_config

    config = load_config(backing)
    if as_json:
        click.echo(json.dumps([key.to_json() for key in config.keys], indent=2))
        return
    for index, key in enumerate(config.keys):
        settings = ", ".join(
            f"{name}={value}"
            for name, value in sorted(key.settings.items())
            if not isinstance(value, dict)
        )
        if "passphrase" in key.settings:
            settings = (settings + ", " if settings else "") + "passphrase"
        click.echo(f"{index}: {key.provider} {key.key_ref} ({settings})")
    journal = load_journal(Path(backing), "rewrap")
    if journal:
        click.echo(
            f"unfinished: {journal.get('operation')} (new key {journal.get('new_key') or '-'},"
            f" retiring {', '.join(journal.get('retire', [])) or '-'}): run it again to finish"
        )


@keys.command("add")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@provider_option("Provider of the key to add.")
@key_options(for_init=True)
@old_key_options
@quiet_option
@handle_errors
def keys_add(backing: str, provider: str, quiet: bool, **kwargs: Any) -> None:
    """Add a master key to BACKING and wrap every file key under it too.

    The key to add is described as for init; the existing keys come from the
    volume's settings or --old-*.  Resumable.
    """
    from kmsfs.lifecycle.rewrap import rewrap_volume

    new, current = adding_key_option_values(kwargs)
    report = rewrap_volume(
        backing,
        provider,
        new,
        current,
        prompt_secret,
        retire_old=False,
        show_progress=progress_flag(quiet),
    )
    _print_rewrap(report, "keys add")


@keys.command("remove")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.argument("key_ref")
@click.option("--force", is_flag=True, help="Remove even if some files have no other key.")
@key_options(for_init=False)
@quiet_option
@handle_errors
def keys_remove(backing: str, key_ref: str, force: bool, quiet: bool, **kwargs: Any) -> None:
    """Remove master key KEY_REF (see 'keys list') from BACKING and strip its entries.

    The key options name a key of the volume on this host (any of them): the
    volume config is authenticated with it before it is changed.
    """
    from kmsfs.lifecycle.rewrap import remove_key

    report = remove_key(
        backing, key_ref, key_option_values(kwargs), prompt_secret, force, progress_flag(quiet)
    )
    for rel, message in report.problems:
        click.echo(f"warning: {rel}: {message}", err=True)
    click.echo(f"removed {key_ref}: {report.stripped} headers updated in {report.seconds:.1f} s")


@keys.command("update")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.argument("key_ref")
@key_options(for_init=False)
@handle_errors
def keys_update(backing: str, key_ref: str, **kwargs: Any) -> None:
    """Record this host's settings (key file path, KMS endpoint, PKCS#11 module) as KEY_REF's
    hints in BACKING, after checking that they open that very key."""
    from kmsfs.lifecycle.hints import update_hints

    old, new = update_hints(backing, key_ref, key_option_values(kwargs), prompt_secret)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name) and not isinstance(new.get(name), dict):
            click.echo(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    click.echo(f"recorded this host's settings for {key_ref}")


@click.command()
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--old-passphrase-file",
    type=click.Path(dir_okay=False, exists=True),
    help="File holding the current passphrase.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, exists=True),
    help="File holding the new passphrase.",
)
@handle_errors
def passwd(backing: str, old_passphrase_file: str | None, passphrase_file: str | None) -> None:
    """Change the passphrase of BACKING's local passphrase key (no file is rewritten).

    For a key-file volume, move to a new key file with 'kmsfs rewrap BACKING
    --key-file NEW'.
    """
    from kmsfs.lifecycle.passwd import change_passphrase

    ref = change_passphrase(Path(backing), old_passphrase_file, passphrase_file, prompt_secret)
    click.echo(f"passphrase changed for {ref}")
