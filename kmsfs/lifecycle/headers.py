"""Header backup: export every file's header xattr to JSON lines, import them back.

For backup tools that drop extended attributes (plain ``cp``, many object
stores): without its header a file's key is lost.  The file holds one JSON
object per line; the first describes the export, each further one a file::

    {"kmsfs_headers": 1, "volume_id": "<32 hex>", "created": "<ISO 8601>"}
    {"path": "dir/name", "file_id": "<32 hex>", "header": "<base64 of the xattr>"}

Paths are relative to the backing root (inode-independent).  Hard links
appear under each name.  Headers hold no secret (wrapped keys only), but the
export names every file: keep it with the backup, mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs.errors import FormatError
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.format.volume import VolumeConfig
from kmsfs.lifecycle.common import LifecycleError, read_raw_header, walk_files

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
        for entry in walk_files(backing):
            raw = read_raw_header(entry.path)
            if raw is None:
                report.no_header.append(entry.rel)
                continue
            try:
                file_id = FileHeader.parse(raw).file_id.hex()
            except FormatError:
                file_id = ""
            record = {
                "path": entry.rel,
                "file_id": file_id,
                "header": base64.b64encode(raw).decode(),
            }
            handle.write(json.dumps(record) + "\n")
            report.exported += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, output)
    return report


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
    root = backing.resolve()
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
            rel = str(record["path"])
            raw = base64.b64decode(record["header"], validate=True)
            FileHeader.parse(raw)
        except (ValueError, KeyError, TypeError, binascii.Error, FormatError) as exc:
            raise LifecycleError(f"{source} line {number}: malformed record ({exc})") from None
        path = (root / rel).resolve()
        if root not in path.parents:
            raise LifecycleError(f"{source} line {number}: path {rel!r} leaves the volume")
        if not path.is_file() or path.is_symlink():
            report.missing.append(rel)
            continue
        current = read_raw_header(path)
        if current == raw:
            report.unchanged += 1
        elif current is None:
            os.setxattr(path, XATTR_NAME, raw, os.XATTR_CREATE, follow_symlinks=False)
            report.restored += 1
        elif force:
            os.setxattr(path, XATTR_NAME, raw, os.XATTR_REPLACE, follow_symlinks=False)
            report.replaced += 1
        else:
            report.conflicts.append(rel)
    return report
