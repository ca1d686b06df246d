"""Key lifecycle commands: rewrap, rekey, keys, passwd, import, fsck, headers.

Registered on the ``kmsfs`` group by kmsfs/cli.py.  Exit codes are those of
kmsfs/cli.py; in addition ``fsck`` exits 0 when the volume is clean and
FSCK_PROBLEMS (5, as for integrity errors) when it found anything, and
``rewrap`` / ``keys add`` exit 1 when some files could not be re-wrapped
(each is listed; the volume keeps its old key).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kmsfs.cli import _options, handle_errors, key_options, prompt_secret
from kmsfs.keys.registry import PROVIDER_NAMES

FSCK_PROBLEMS = 5
REWRAP_INCOMPLETE = 1
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
        ]
    ):
        func = opt(func)
    return func


def _old_options(kwargs: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    old = {option: kwargs.pop(name, None) for name, option in OLD_OPTIONS.items()}
    old.update({name: new.get(name) for name in SHARED_OPTIONS})
    old["flag_names"] = {
        option: "--" + name.replace("_", "-") for name, option in OLD_OPTIONS.items()
    }
    return old


def _progress_flag(quiet: bool) -> bool | None:
    return False if quiet else None  # None: on a terminal only


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


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
@click.option(
    "--provider",
    default="local",
    show_default=True,
    type=click.Choice(PROVIDER_NAMES),
    help="Provider of the new master key.",
)
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

    new = _options(kwargs)
    report = rewrap_volume(
        backing,
        provider,
        new,
        _old_options(kwargs, new),
        prompt_secret,
        retire_old=True,
        dry_run=dry_run,
        show_progress=_progress_flag(quiet or as_json),
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        if report.problems:
            sys.exit(REWRAP_INCOMPLETE)
        return
    _print_rewrap(report, "rewrap")


@click.group()
def keys() -> None:
    """List, add and remove the master keys of a volume."""


@keys.command("list")
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def keys_list(backing: str, as_json: bool) -> None:
    """List the master keys of BACKING in the order they are tried."""
    from kmsfs.format.volume import load_config
    from kmsfs.lifecycle.common import load_journal

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
@click.option(
    "--provider",
    default="local",
    show_default=True,
    type=click.Choice(PROVIDER_NAMES),
    help="Provider of the key to add.",
)
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

    new = _options(kwargs)
    report = rewrap_volume(
        backing,
        provider,
        new,
        _old_options(kwargs, new),
        prompt_secret,
        retire_old=False,
        show_progress=_progress_flag(quiet),
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
        backing, key_ref, _options(kwargs), prompt_secret, force, _progress_flag(quiet)
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

    old, new = update_hints(backing, key_ref, _options(kwargs), prompt_secret)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name) and not isinstance(new.get(name), dict):
            click.echo(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    click.echo(f"recorded this host's settings for {key_ref}")


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
    from kmsfs.keys.cache import KeyCache
    from kmsfs.lifecycle.fsck import fsck_volume
    from kmsfs.volume import open_volume

    config, keyring = open_volume(backing, _options(kwargs), prompt_secret, KeyCache(0, 0))
    try:
        report = fsck_volume(
            backing, config, keyring, quick, show_progress=_progress_flag(quiet or as_json)
        )
    finally:
        keyring.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for finding in report.findings:
            where = f" block {finding.block}" if finding.block is not None else ""
            click.echo(f"{finding.path}{where}: {finding.kind}: {finding.message}")
        what = "headers" if quick else f"headers and {report.blocks} blocks"
        verdict = "clean" if report.clean else f"{len(report.findings)} problems"
        click.echo(f"fsck: {report.files} files, {report.ok} ok ({what} checked): {verdict}")
    if not report.clean:
        sys.exit(FSCK_PROBLEMS)


@click.command()
@click.argument("backing", type=click.Path(file_okay=False, exists=True))
@key_options(for_init=False)
@click.option("--older-than", help="Only files whose key is older (90d, 12h, 2w, 1y...).")
@quiet_option
@handle_errors
def rekey(backing: str, older_than: str | None, quiet: bool, **kwargs: Any) -> None:
    """Re-encrypt file contents of BACKING under fresh file keys (volume unmounted).

    Crash-safe and resumable (run it again); keeps hard links, owner, mode,
    times and user xattrs.
    """
    from kmsfs.keys.cache import KeyCache
    from kmsfs.lifecycle.common import parse_duration, refuse_if_mounted
    from kmsfs.lifecycle.rekey import rekey_volume
    from kmsfs.volume import open_volume

    age = parse_duration(older_than) if older_than else None
    refuse_if_mounted(Path(backing).absolute(), "rekey")
    config, keyring = open_volume(backing, _options(kwargs), prompt_secret, KeyCache(0, 0))
    try:
        report = rekey_volume(backing, config, keyring, age, _progress_flag(quiet))
    finally:
        keyring.close()
    for rel, message in report.skipped:
        click.echo(f"skipped {rel}: {message}", err=True)
    for rel, message in report.problems:
        click.echo(f"FAILED {rel}: {message}", err=True)
    click.echo(
        f"rekey: {report.files} files, {report.rekeyed} re-keyed ({report.bytes:,} bytes),"
        f" {report.not_due} not due, {len(report.skipped)} skipped,"
        f" {len(report.problems)} failed, in {report.seconds:.1f} s"
    )
    if report.problems:
        sys.exit(1)


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


@click.command("import")
@click.argument("plaindir", type=click.Path(file_okay=False, exists=True))
@click.argument("backing", type=click.Path(file_okay=False))
@click.option(
    "--provider",
    default="local",
    show_default=True,
    type=click.Choice(PROVIDER_NAMES),
    help="Master key provider of the new volume.",
)
@click.option("--block-size", default=4096, show_default=True, type=int)
@key_options(for_init=True)
@quiet_option
@handle_errors
def import_(
    plaindir: str, backing: str, provider: str, block_size: int, quiet: bool, **kwargs: Any
) -> None:
    """Copy the plaintext tree PLAINDIR into a new volume BACKING, encrypting every file.

    PLAINDIR is never modified.  Resumable: run the same command again.
    """
    from kmsfs.keys.cache import KeyCache
    from kmsfs.lifecycle.importer import check_import_target, import_tree
    from kmsfs.volume import init_volume, open_volume

    options = _options(kwargs)
    target = Path(backing)
    target.mkdir(exist_ok=True)
    if check_import_target(Path(plaindir), target) is None:
        init_volume(target, provider, options, prompt_secret, block_size)
    config, keyring = open_volume(target, options, prompt_secret, KeyCache(0, 0))
    try:
        report = import_tree(plaindir, target, config, keyring, _progress_flag(quiet))
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
    from kmsfs.format.volume import load_config
    from kmsfs.lifecycle.headers import export_headers

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
    from kmsfs.format.volume import load_config
    from kmsfs.lifecycle.headers import import_headers

    report = import_headers(Path(backing), load_config(backing), Path(source), force)
    for rel in report.missing:
        click.echo(f"warning: {rel}: not in the volume", err=True)
    for rel in report.conflicts:
        click.echo(f"conflict: {rel}: has a different header (kept; --force replaces)", err=True)
    click.echo(
        f"headers import: {report.restored} restored, {report.replaced} replaced,"
        f" {report.unchanged} unchanged, {len(report.conflicts)} conflicts,"
        f" {len(report.missing)} missing"
    )
    if report.conflicts:
        sys.exit(1)


COMMANDS = [rewrap, keys, fsck, rekey, passwd, import_, headers]
