"""Header backup: export every file's header xattr to JSON lines, import them back.

For backup tools that drop extended attributes (plain ``cp``, many object
stores): without its header a file's key is lost.  The file holds one JSON
object per line; the first describes the export, each further one a file::

    {"kmsfs_headers": 1, "volume_id": "<32 hex>", "created": "<ISO 8601>"}
    {"path": "dir/name", "file_id": "<32 hex>", "header": "<base64 of the xattr>"}

Paths are relative to the backing root (inode-independent).  Hard links
appear under each name.  Import also restores the format marker (mode bit
S_ISVTX, docs/FORMAT.md) of each file whose header is then the export's: a copy
that dropped xattrs usually dropped mode bits too.  Headers hold no secret
(wrapped keys only), but the export names every file: keep it with the backup,
mode 0600.

Both directions work by descriptor (``kmsfs.backing.tree``): a file is opened beneath
the backing root without following any symlink, and its header is read from, or
set on, that descriptor; a path of an export that leads through a symlink is
reported as missing.  Replacing a header (``--force``) is compare-and-swap on that
descriptor.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kmsfs.backing.header_xattr import read_raw_header, replace_header, set_format_marker
from kmsfs.backing.names import own_entry
from kmsfs.backing.tree import Tree, TreeChanged, split_rel
from kmsfs.errors import FormatError, HeaderChanged, LifecycleError
from kmsfs.format.header import FileHeader
from kmsfs.format.volume_config import VolumeConfig

EXPORT_VERSION = 1


@dataclass
class HeadersReport:
    exported: int = 0
    restored: int = 0
    unchanged: int = 0
    replaced: int = 0
    missing: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    no_header: list[str] = field(default_factory=list)
    markers: int = 0  # format markers restored


def export_headers(backing: Path, config: VolumeConfig, output: Path) -> HeadersReport:
    """Write the headers of every regular file of *backing* to *output* (atomically)."""
    report = HeadersReport()
    temp = output.with_name(f".{output.name}.partial")
    with open(temp, "w", opener=lambda p, f: os.open(p, f, 0o600)) as handle:
        meta = {
            "kmsfs_headers": EXPORT_VERSION,
            "volume_id": config.volume_id.hex(),
            "created": dt.datetime.now(dt.UTC).isoformat(),
        }
        handle.write(json.dumps(meta) + "\n")
        with Tree(backing, encrypted_names=config.encrypted_names) as tree:
            for entry in tree.files():
                try:
                    fd = tree.open_file(entry.rel, expect=entry)
                except (FileNotFoundError, TreeChanged):
                    report.missing.append(entry.rel)  # changed since the walk
                    continue
                try:
                    raw = read_raw_header(fd)
                finally:
                    os.close(fd)
                _export_one(handle, entry.rel, raw, report)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, output)
    return report


def _export_one(handle: TextIO, rel: str, raw: bytes | None, report: HeadersReport) -> None:
    if raw is None:
        report.no_header.append(rel)
        return
    try:
        file_id = FileHeader.parse(raw).file_id.hex()
    except FormatError:
        file_id = ""
    record = {"path": rel, "file_id": file_id, "header": base64.b64encode(raw).decode()}
    handle.write(json.dumps(record) + "\n")
    report.exported += 1


def import_headers(
    backing: Path, config: VolumeConfig, source: Path, force: bool = False
) -> HeadersReport:
    """Restore headers from an export: set missing ones; with *force* replace differing ones."""
    report = HeadersReport()
    with open(source) as handle:
        lines = handle.read().splitlines()
    if not lines:
        raise LifecycleError(f"{source} is empty")
    try:
        meta = json.loads(lines[0])
    except ValueError:
        raise LifecycleError(f"{source}: first line is not JSON") from None
    if not isinstance(meta, dict) or meta.get("kmsfs_headers") != EXPORT_VERSION:
        raise LifecycleError(f"{source} is not a kmsfs header export")
    if meta.get("volume_id") != config.volume_id.hex():
        raise LifecycleError(
            f"{source} holds headers of volume {meta.get('volume_id')},"
            f" not this volume {config.volume_id.hex()}"
        )
    with Tree(backing, encrypted_names=config.encrypted_names) as tree:
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                rel = str(record["path"])
                raw = base64.b64decode(record["header"], validate=True)
                FileHeader.parse(raw)
            except (ValueError, KeyError, TypeError, binascii.Error, FormatError) as exc:
                raise LifecycleError(f"{source} line {number}: malformed record ({exc})") from None
            try:
                split_rel(rel)
            except ValueError:
                raise LifecycleError(
                    f"{source} line {number}: path {rel!r} leaves the volume"
                ) from None
            parts = os.fsencode(rel).split(b"/")
            if any(
                own_entry(part, index == 0, config.encrypted_names)
                for index, part in enumerate(parts)
            ):
                report.missing.append(rel)  # kmsfs's own (a config, a sidecar): no header
                continue
            _import_one(tree, rel, raw, force, report)
    return report


def _import_one(tree: Tree, rel: str, raw: bytes, force: bool, report: HeadersReport) -> None:
    """Set one header from the export on the file *rel* (by descriptor), and the format
    marker of the header it then has."""
    try:
        fd = tree.open_file(rel, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, TreeChanged):
        report.missing.append(rel)
        return
    try:
        current = read_raw_header(fd)
        if current == raw:
            report.unchanged += 1
        elif current is not None and not force:
            report.conflicts.append(rel)
        else:
            try:
                replace_header(fd, current, raw, rel)
            except HeaderChanged:
                report.conflicts.append(rel)  # changed under us: reported, left as it is
                return
            if current is None:
                report.restored += 1
            else:
                report.replaced += 1
        if read_raw_header(fd) == raw:
            version = FileHeader.parse(raw).version
            report.markers += set_format_marker(fd, version) != version
    finally:
        os.close(fd)
