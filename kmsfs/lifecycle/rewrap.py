"""Re-wrapping file keys under another master key, adding and removing master keys.

No file content is touched: only the header xattr of each file, replaced whole
by one ``setxattr`` (atomic for one value), so a crash leaves every header
either as it was or as it will be.

One engine serves three commands:

- ``rewrap`` (``retire_old=True``): the new key replaces every key of the volume.
- ``keys add`` (``retire_old=False``): the new key joins the others.
- ``keys remove``: a key leaves (its header entries are stripped).

Order of a run, each step recorded in the journal ``.kmsfs.d/rewrap.json``
before it starts, so a second run with the same options resumes (and skips
every header that already has an entry for the new key, so nothing is
re-wrapped twice):

1. **add**: the new key and its key-check value are appended to the volume
   config.  From now on a daemon that *starts* with both keys available wraps
   new files under both.
2. **cover**: every regular file that lacks an entry for the new key gets one
   (the old entries stay, so a running daemon that knows only the old key
   keeps opening everything).
3. **switch** (rewrap, remove): the config loses the retired keys and gets a
   new volume key that only the kept keys wrap.  Done only
   when every file of the volume is covered *and the volume is not mounted*:
   a daemon keeps the keyring it loaded at mount time, so files it creates
   during or after the cover pass are wrapped under the old key only.
   On a mounted volume the run therefore stops after the cover pass (exit 0,
   saying so); run it again after the next unmount to finish.
4. **strip**: the retired keys' entries are removed from every header.

Each header is replaced by compare-and-swap on one descriptor: the file is opened
beneath the backing root without following any symlink (``kmsfs.backing.tree``), must
be the inode the walk saw, its header is read from that descriptor, and the new
header is written to the same descriptor only if the header there is still
byte-identical to what was read (``replace_header``).  A rename on the mounted
volume between the read and the write can therefore never put one file's header
on another.  A file renamed or replaced under the walk counts as changed: the cover
pass runs again (up to ``MAX_PASSES``), and if files still moved in the last pass
they are listed and the keys are not switched.  Whether the volume is mounted is
the volume lock's answer (``kmsfs.backing.volume_lock``), and the switch and strip hold that lock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.backing.header_xattr import parse_header, read_raw_header, replace_header
from kmsfs.backing.journals import drop_journal, load_journal, save_journal
from kmsfs.backing.tool_lock import in_use_by, refuse_if_shared, volume_locked
from kmsfs.backing.tree import Entry, Tree, TreeChanged
from kmsfs.errors import (
    FormatError,
    HeaderChanged,
    KmsfsError,
    LifecycleError,
    UsageError,
    reason_of,
)
from kmsfs.format.header import MAX_ENTRIES, FileHeader, WrappedKey
from kmsfs.format.volume_config import load_config
from kmsfs.keys.cache import NullCache
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import KeyContext, KeyProvider, wipe
from kmsfs.keys.registry import create_provider, open_provider
from kmsfs.keys.secrets import Prompt
from kmsfs.keys.settings import HostOptions
from kmsfs.lifecycle.progress import Progress
from kmsfs.volume_open import open_volume
from kmsfs.volume_writes import (
    new_key_config,
    rotate_volume_key,
    save_volume_config,
    warn_public_wrap,
)

JOURNAL = "rewrap"
MAX_PASSES = 5  # cover passes on a mounted volume, until one finds nothing new
MAX_TRIES = 3  # per header, when it changes between our read and our write


@dataclass
class RewrapReport:
    """What a run did.  ``problems``: (path, message) of files it could not cover."""

    new_key: str = ""
    files: int = 0
    rewrapped: int = 0
    reencrypted: int = 0
    already: int = 0
    stripped: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    passes: int = 0
    finished: bool = False
    mounted_at: str | None = None
    dry_run: bool = False
    seconds: float = 0.0
    retired: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _old_prompt(prompt: Prompt | None) -> Prompt | None:
    if prompt is None:
        return None
    return lambda text, confirm: prompt(f"Current {text[0].lower()}{text[1:]}", confirm)


def rewrap_volume(
    backing: str | os.PathLike[str],
    provider_name: str,
    new_options: HostOptions,
    old_options: HostOptions,
    prompt: Prompt | None = None,
    *,
    retire_old: bool = True,
    dry_run: bool = False,
    show_progress: bool | None = None,
) -> RewrapReport:
    """Wrap every file key under the master key that *new_options* describe.

    The volume is opened (and its config authenticated) with *old_options*,
    which name a current key on this host.  With *retire_old* the volume's
    other keys are removed once every file is covered (rewrap); without, they
    stay (keys add).  Raises ConfigError or a ProviderError if a key cannot be
    opened, ConfigTampered if the config fails authentication, LifecycleError
    if another operation's journal is pending.  Per-file failures are listed
    in the report.
    """
    root = Path(backing).absolute()
    operation = "rewrap" if retire_old else "add"
    refuse_if_shared(root, "kmsfs rewrap" if retire_old else "kmsfs keys add")
    started = time.monotonic()
    report = RewrapReport(dry_run=dry_run)
    journal = load_journal(root, JOURNAL)
    if journal is not None and journal.get("operation") != operation:
        raise LifecycleError(
            f"a 'kmsfs {_command(journal)}' is not finished on {root}: run it again to finish it"
        )
    if journal is not None and journal.get("phase") == "strip":
        report.new_key = str(journal.get("new_key", ""))
        _finish(root, journal, report, show_progress, new_options, prompt)
        report.seconds = time.monotonic() - started
        return report

    new: KeyProvider | None = None
    config, old_ring = open_volume(
        root, old_options, _old_prompt(prompt), NullCache(), migrate=not dry_run
    )
    try:
        refs = [key.key_ref for key in config.keys]
        if journal is not None and journal.get("new_key") not in refs:
            journal = None  # stopped before the key was added: nothing was done yet
        if journal is not None:
            key = config.keys[refs.index(journal["new_key"])]
            try:
                new = open_provider(key, new_options, prompt)
            except KmsfsError as exc:
                raise type(exc)(
                    f"an unfinished {operation} to {key.key_ref} is recorded in"
                    f" .kmsfs.d/{JOURNAL}.json; give that key's options to finish it ({exc})"
                ) from None
        elif dry_run and _would_create(provider_name, new_options):
            new = None
        else:
            new = create_provider(provider_name, new_options, prompt)
        new_ref = new.key_ref if new is not None else ""
        report.new_key = new_ref or "(a new key)"
        old_keys = [key for key in config.keys if key.key_ref != new_ref]
        if not retire_old and new_ref in refs and journal is None:
            raise UsageError(f"{new_ref} is already a key of this volume")
        if not dry_run:
            assert new is not None
            if journal is None:
                journal = {
                    "operation": operation,
                    "new_key": new_ref,
                    "retire": [k.key_ref for k in old_keys] if retire_old else [],
                    "phase": "cover",
                    "started": dt.datetime.now(dt.UTC).isoformat(),
                }
                save_journal(root, JOURNAL, journal)
            if new_ref not in refs:
                warn_public_wrap(new)
                volume_key = _volume_key(old_ring)
                config.keys.append(new_key_config(new, config.volume_id, volume_key))
                save_volume_config(root, config, old_ring)
        report.mounted_at = in_use_by(root)
        for number in range(1, MAX_PASSES + 1):
            report.passes = number
            changed, moved = _cover_pass(
                root, config.volume_id, old_ring, new, report, dry_run, show_progress, number
            )
            if dry_run or changed + len(moved) == 0 or (not moved and in_use_by(root) is None):
                break
    finally:
        old_ring.close()
        if new is not None:
            new.close()
    report.mounted_at = in_use_by(root)
    if report.mounted_at is None:
        report.problems.extend(moved)  # the keys must not switch past a file not covered
    if dry_run or report.problems or report.mounted_at is not None:
        report.seconds = time.monotonic() - started
        return report
    assert journal is not None
    journal["phase"] = "strip"
    save_journal(root, JOURNAL, journal)
    _finish(root, journal, report, show_progress, new_options, prompt)
    report.seconds = time.monotonic() - started
    return report


def _volume_key(ring: Keyring) -> bytes:
    """The volume key of an opened, migrated volume (see ``save_volume_config``)."""
    if ring.volume_key is None:
        raise LifecycleError(
            "this volume's config is still format 1 (unauthenticated) because not every key"
            " could be opened: give every key's options once so it is migrated"
        )
    return bytes(ring.volume_key)


def _finish(
    root: Path,
    journal: dict[str, Any],
    report: RewrapReport,
    show_progress: bool | None,
    options: HostOptions,
    prompt: Prompt | None,
) -> None:
    """Switch and strip, holding the volume lock when keys leave the config (no daemon
    may start with the old keys meanwhile)."""
    if journal.get("retire"):
        with volume_locked(root, "switching the volume to the new key"):
            _switch_and_strip(root, journal, report, show_progress, options, prompt)
    else:
        _switch_and_strip(root, journal, report, show_progress, options, prompt)


def remove_key(
    backing: str | os.PathLike[str],
    key_ref: str,
    options: HostOptions,
    prompt: Prompt | None = None,
    force: bool = False,
    show_progress: bool | None = None,
) -> RewrapReport:
    """Remove master key *key_ref* from the volume and strip its header entries.

    *options* name a key of the volume on this host (to authenticate the
    config and re-tag it).  Offline only.  Refuses the last key, and (unless
    *force*) refuses when a file has no entry for any remaining key (it would
    become unreadable).
    """
    root = Path(backing).absolute()
    started = time.monotonic()
    with volume_locked(root, "keys remove"):
        report = _remove_key(root, key_ref, force, show_progress, options, prompt)
    report.seconds = time.monotonic() - started
    return report


def _remove_key(
    root: Path,
    key_ref: str,
    force: bool,
    show_progress: bool | None,
    options: HostOptions,
    prompt: Prompt | None,
) -> RewrapReport:
    journal = load_journal(root, JOURNAL)
    if journal is not None and not (
        journal.get("operation") == "remove" and journal.get("retire") == [key_ref]
    ):
        raise LifecycleError(
            f"a 'kmsfs {_command(journal)}' is not finished on {root}: run it again to finish it"
        )
    report = RewrapReport(retired=[key_ref])
    config = load_config(root)
    refs = [key.key_ref for key in config.keys]
    if journal is None:
        if key_ref not in refs:
            raise UsageError(f"{key_ref} is not a key of this volume (keys: {', '.join(refs)})")
        if len(refs) == 1:
            raise UsageError(f"{key_ref} is the volume's only key: refusing to remove it")
        remaining = set(refs) - {key_ref}
        orphans = []
        with backing_tree(root) as tree:
            for entry in tree.files():
                header = _header_or_none(tree, entry)
                if header is not None and not any(e.key_ref in remaining for e in header.entries):
                    orphans.append(entry.rel)
        if orphans and not force:
            shown = ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else "")
            raise LifecycleError(
                f"{len(orphans)} files have no entry for any other key and would become"
                f" unreadable: {shown} (run 'kmsfs keys add' or 'rewrap' first, or --force)"
            )
        journal = {
            "operation": "remove",
            "new_key": "",
            "retire": [key_ref],
            "phase": "strip",
            "started": dt.datetime.now(dt.UTC).isoformat(),
        }
        save_journal(root, JOURNAL, journal)
    _switch_and_strip(root, journal, report, show_progress, options, prompt)
    return report


def backing_tree(root: Path) -> Tree:
    """The volume's backing tree, walked as its names require (the config's mode: it was
    authenticated when the run opened the volume)."""
    return Tree(root, encrypted_names=load_config(root).encrypted_names)


def _command(journal: dict[str, Any]) -> str:
    return {"add": "keys add", "remove": "keys remove"}.get(str(journal.get("operation")), "rewrap")


def _would_create(provider_name: str, options: HostOptions) -> bool:
    """True if opening this new key would create something (a key file, a passphrase key)."""
    if provider_name != "local":
        return False
    key_file = options.of("local").key_file
    return not key_file or not Path(key_file).exists()


def _header_or_none(tree: Tree, entry: Entry) -> FileHeader | None:
    """The parsed header of *entry* (read by descriptor), or None if it has none, is
    malformed, or the entry is gone or changed."""
    try:
        fd = tree.open_file(entry.rel, expect=entry)
    except (FileNotFoundError, TreeChanged):
        return None
    try:
        raw = read_raw_header(fd)
        return parse_header(raw, entry.rel) if raw is not None else None
    except FormatError:
        return None
    finally:
        os.close(fd)


def new_entry(
    header: FileHeader, old_ring: Keyring | None, new: KeyProvider, what: str
) -> tuple[WrappedKey, bool]:
    """The file key of *header* wrapped by *new*; True if the provider re-encrypted it.

    A provider may offer ``reencrypt(wrapped, context) -> WrappedKey`` for a key
    wrapped by another master key of the same provider (AWS KMS ReEncrypt: the
    plaintext key never leaves KMS).  Otherwise the key is unwrapped by the
    old keys and wrapped by the new one.
    """
    context = KeyContext(header.volume_id, header.file_id)
    reencrypt = getattr(new, "reencrypt", None)
    # only entries of the volume's own (authenticated, opened) keys: a header's key_ref is
    # the backing directory's to choose, and must not pick the source key of a ReEncrypt
    known = {provider.key_ref for provider in old_ring.providers} if old_ring else set()
    if callable(reencrypt):
        for entry in header.entries:
            if entry.provider == new.name and entry.key_ref in known:
                try:
                    result: WrappedKey = reencrypt(entry, context)
                    return result, True
                except KmsfsError:
                    break  # fall back to unwrap + wrap
    if old_ring is None:
        raise LifecycleError("no old key is available to unwrap the file key", where=what)
    key = old_ring.unwrap(header, what)
    try:
        return new.wrap(key, context), False
    finally:
        wipe(key)


def _cover_pass(
    root: Path,
    volume_id: bytes,
    old_ring: Keyring | None,
    new: KeyProvider | None,
    report: RewrapReport,
    dry_run: bool,
    show_progress: bool | None,
    number: int,
) -> tuple[int, list[tuple[str, str]]]:
    """Give every file an entry for *new*; returns how many headers changed, and the
    files and directories that were renamed or replaced under the pass, with why (a
    file there may not be covered: another pass sees it at its new name)."""
    with backing_tree(root) as tree:
        entries = list(tree.files())
        label = "checking" if dry_run else "re-wrapping"
        progress = Progress(
            label if number == 1 else f"{label} (pass {number})",
            len(entries),
            enabled=show_progress,
        )
        changed = 0
        moved: list[tuple[str, str]] = []
        report.problems.clear()
        report.skipped.clear()
        first = number == 1
        seen: set[tuple[int, int]] = set()
        try:
            for entry in entries:
                progress.advance()
                if entry.inode in seen:
                    continue  # another name of a file already done
                seen.add(entry.inode)
                if first:
                    report.files += 1
                try:
                    fd = tree.open_file(entry.rel, expect=entry)
                except FileNotFoundError:  # removed, or renamed where the walk had been
                    moved.append((entry.rel, "removed or renamed while rewrap ran"))
                    continue
                except (TreeChanged, OSError) as exc:
                    moved.append((entry.rel, reason_of(exc)))
                    continue
                try:
                    changed += _cover_file(
                        fd, entry.rel, volume_id, old_ring, new, report, dry_run, first
                    )
                except FormatError as exc:
                    report.skipped.append((entry.rel, f"malformed header: {exc}"))
                except (KmsfsError, OSError) as exc:
                    report.problems.append((entry.rel, str(exc)))
                finally:
                    os.close(fd)
        finally:
            progress.close()
        moved.extend(tree.skipped)  # complete once the walk is
    return changed, moved


def _cover_file(
    fd: int,
    rel: str,
    volume_id: bytes,
    old_ring: Keyring | None,
    new: KeyProvider | None,
    report: RewrapReport,
    dry_run: bool,
    first: bool,
) -> int:
    """Give the open file *fd* an entry for *new* (compare-and-swap); 1 if it changed."""
    for _attempt in range(MAX_TRIES):
        raw = read_raw_header(fd)
        if raw is None:
            report.skipped.append((rel, "no kmsfs header (not encrypted)"))
            return 0
        header = parse_header(raw, rel)
        if header.volume_id != volume_id:
            report.skipped.append((rel, f"header of another volume {header.volume_id.hex()}"))
            return 0
        if new is not None and any(new.accepts(e) for e in header.entries):
            if first:
                report.already += 1
            return 0
        if len(header.entries) >= MAX_ENTRIES:
            raise FormatError(f"header already has {MAX_ENTRIES} entries", where=rel)
        if dry_run:
            if old_ring is None:
                raise LifecycleError("no old key to unwrap it", where=rel)
            wipe(old_ring.unwrap(header, rel))
            report.rewrapped += 1
            return 1
        assert new is not None
        wrapped, reencrypted = new_entry(header, old_ring, new, rel)
        try:
            replace_header(fd, raw, header.with_entries((*header.entries, wrapped)).pack(), rel)
        except HeaderChanged:
            continue  # read it again and redo
        report.rewrapped += 1
        report.reencrypted += reencrypted
        return 1
    raise HeaderChanged("its header kept changing while rewrap ran: left as it is", where=rel)


def _switch_and_strip(
    root: Path,
    journal: dict[str, Any],
    report: RewrapReport,
    show_progress: bool | None,
    options: HostOptions,
    prompt: Prompt | None,
) -> None:
    """Remove the retired keys from the config (idempotent), then from every header.

    *options* name a key of the volume on this host: the config is opened
    (authenticated) with it; the switch replaces the volume key (every kept key
    wraps a new one: ``rotate_volume_key``), so a retired key's holder cannot
    unwrap the key the config is now tagged with.
    """
    retire = set(journal.get("retire", []))
    report.retired = sorted(retire)
    if retire:  # the caller holds the volume lock
        config, ring = open_volume(root, options, prompt, NullCache(), migrate=True)
        try:
            keep = [key for key in config.keys if key.key_ref not in retire]
            if not keep:
                raise LifecycleError("refusing to remove every key of the volume")
            if len(keep) != len(config.keys):
                config.keys = keep
                rotate_volume_key(root, config, ring)
        finally:
            ring.close()
        with backing_tree(root) as tree:
            entries = list(tree.files())
            progress = Progress("removing old entries", len(entries), enabled=show_progress)
            try:
                for entry in entries:
                    progress.advance()
                    try:
                        _strip_file(tree, entry, config.volume_id, retire, report)
                    except FileNotFoundError:
                        continue
                    except (KmsfsError, OSError) as exc:
                        report.problems.append((entry.rel, reason_of(exc)))
            finally:
                progress.close()
    drop_journal(root, JOURNAL)
    report.finished = True


def _strip_file(
    tree: Tree, entry: Entry, volume_id: bytes, retire: set[str], report: RewrapReport
) -> None:
    """Remove the entries of the *retire*d keys from one header (compare-and-swap)."""
    fd = tree.open_file(entry.rel, expect=entry)
    try:
        for _attempt in range(MAX_TRIES):
            raw = read_raw_header(fd)
            try:
                header = parse_header(raw, entry.rel) if raw is not None else None
            except FormatError:
                return
            if header is None or header.volume_id != volume_id:
                return
            remaining = tuple(e for e in header.entries if e.key_ref not in retire)
            if len(remaining) == len(header.entries):
                return
            if not remaining:
                report.problems.append((entry.rel, "no entry left for any kept key"))
                return
            try:
                replace_header(fd, raw, header.with_entries(remaining).pack(), entry.rel)
            except HeaderChanged:
                continue
            report.stripped += 1
            return
        raise HeaderChanged("its header kept changing: left as it is", where=entry.rel)
    finally:
        os.close(fd)
