"""``kmsfs fsck``, ``import`` and ``headers``: tools that walk the backing tree (``rekey`` is
kmsfs/cli/rekey.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kmsfs.cli.common import (
    handle_errors,
    key_option_values,
    key_options,
    names_option,
    progress_flag,
    prompt_secret,
    provider_option,
    quiet_option,
)

FSCK_PROBLEMS = 5


@click.command()
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quick", is_flag=True, help="Check headers and key unwrapping only, not blocks.")
@key_options(for_init=False)
@quiet_option
@handle_errors
def fsck(backing: str, as_json: bool, quick: bool, quiet: bool, **kwargs: Any) -> None:
    """Check every header and block of the volume in BACKING.

    Exit 0 if clean, 5 if anything is wrong (each problem is listed with the
    file and block), 3/6 if the volume or its keys cannot be opened.
    """
    from kmsfs.keys.cache import NullCache
    from kmsfs.lifecycle.fsck import fsck_volume
    from kmsfs.volume_open import open_volume

    config, keyring = open_volume(backing, key_option_values(kwargs), prompt_secret, NullCache())
    try:
        report = fsck_volume(
            backing, config, keyring, quick, show_progress=progress_flag(quiet or as_json)
        )
    finally:
        keyring.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for finding in report.findings:
            where = f" block {finding.block}" if finding.block is not None else ""
            if finding.backing and finding.backing != finding.path:
                where += f" (backing {finding.backing})"
            click.echo(f"{finding.path}{where}: {finding.kind}: {finding.message}")
        what = "headers" if quick else f"headers and {report.blocks} blocks"
        verdict = "clean" if report.clean else f"{len(report.findings)} problems"
        click.echo(f"fsck: {report.files} files, {report.ok} ok ({what} checked): {verdict}")
    if not report.clean:
        sys.exit(FSCK_PROBLEMS)


@click.command("import")
@click.argument("plaindir", type=click.Path(file_okay=False, exists=True))
@click.argument("backing", type=click.Path(file_okay=False))
@provider_option("Master key provider of the new volume.")
@click.option("--block-size", default=4096, show_default=True, type=int)
@names_option
@key_options(for_init=True)
@quiet_option
@handle_errors
def import_(
    plaindir: str,
    backing: str,
    provider: str,
    block_size: int,
    plain_names: bool,
    quiet: bool,
    **kwargs: Any,
) -> None:
    """Copy the plaintext tree PLAINDIR into a new volume BACKING, encrypting every file.

    PLAINDIR is never modified.  Resumable: run the same command again.
    """
    from kmsfs.keys.cache import NullCache
    from kmsfs.lifecycle.importer import check_import_target, import_tree
    from kmsfs.volume_open import init_volume, open_volume

    options = key_option_values(kwargs)
    target = Path(backing)
    target.mkdir(exist_ok=True)
    if check_import_target(Path(plaindir), target) is None:
        init_volume(
            target,
            provider,
            options,
            prompt_secret,
            block_size,
            encrypted_names=not plain_names,
        )
    config, keyring = open_volume(target, options, prompt_secret, NullCache(), migrate=True)
    try:
        report = import_tree(plaindir, target, config, keyring, progress_flag(quiet))
    finally:
        keyring.close()
    for rel, message in report.skipped:
        click.echo(f"skipped {rel}: {message}", err=True)
    click.echo(
        f"import: {report.files} files ({report.imported} encrypted, {report.bytes:,} bytes;"
        f" {report.already} already done; {report.links} hard links), {report.dirs}"
        f" directories, {report.other} other, {len(report.skipped)} skipped,"
        f" in {report.seconds:.1f} s into volume {config.volume_id.hex()}"
    )


@click.group()
def headers() -> None:
    """Back up and restore the per-file key headers (for backups that drop xattrs)."""


@headers.command("export")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.argument("output", type=click.Path(dir_okay=False))
@handle_errors
def headers_export(backing: str, output: str) -> None:
    """Write the header of every file of BACKING to OUTPUT (JSON lines)."""
    from kmsfs.format.volume_config import load_config
    from kmsfs.lifecycle.header_backup import export_headers

    report = export_headers(Path(backing), load_config(backing), Path(output))
    for rel in report.no_header:
        click.echo(f"warning: {rel}: no kmsfs header", err=True)
    click.echo(f"exported {report.exported} headers to {output}")


@headers.command("import")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.argument("source", type=click.Path(dir_okay=False, exists=True))
@click.option("--force", is_flag=True, help="Replace headers that differ from the export.")
@handle_errors
def headers_import(backing: str, source: str, force: bool) -> None:
    """Restore headers from SOURCE (made by 'headers export') onto BACKING's files.

    Missing headers are set; differing ones are reported (replaced with --force).
    """
    from kmsfs.format.volume_config import load_config
    from kmsfs.lifecycle.header_backup import import_headers

    report = import_headers(Path(backing), load_config(backing), Path(source), force)
    for rel in report.missing:
        click.echo(f"warning: {rel}: not in the volume", err=True)
    for rel in report.conflicts:
        click.echo(f"conflict: {rel}: has a different header (kept; --force replaces)", err=True)
    click.echo(
        f"headers import: {report.restored} restored, {report.replaced} replaced,"
        f" {report.unchanged} unchanged, {len(report.conflicts)} conflicts,"
        f" {len(report.missing)} missing, {report.markers} format markers restored"
    )
    if report.conflicts:
        sys.exit(1)
