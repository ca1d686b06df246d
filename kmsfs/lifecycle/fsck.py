"""fsck: check every header and every block of a volume, offline or while mounted.

Findings (``Finding.kind``):

- ``no-header``: a regular file without ``user.kmsfs.header`` (a stray
  plaintext file copied into the backing directory, or a header lost by a
  backup tool that drops xattrs: see ``kmsfs headers import``).
- ``bad-header``: the header does not parse (the message says what was expected).
- ``foreign``: the header names another volume.
- ``missing-entry``: no wrapped-key entry for one of the volume's master keys
  (an unfinished ``rewrap`` / ``keys add``, or a file created by a daemon that
  did not have that key).
- ``unwrap``: no available master key unwraps the file key.
- ``size``: the backing size cannot belong to a well-formed file (truncated
  inside a block header, empty backing file).
- ``block``: a block fails authentication (bit flip, truncation at a block
  boundary, blocks moved or swapped); ``block`` names its index.
- ``leftover``: a temporary file of an interrupted tool in ``.kmsfs.d``.

Files on a mounted volume that are being written may show transient block
errors; run fsck on an unmounted volume for a definitive answer.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.errors import FormatError, IntegrityError, KmsfsError
from kmsfs.format.content import BlockCipher
from kmsfs.format.volume import STATE_DIR_NAME, VolumeConfig
from kmsfs.fs.content_file import ContentFile
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import wipe
from kmsfs.lifecycle.common import Progress, parse_header, read_raw_header, walk_files

CHUNK_BLOCKS = 256
MAX_BLOCKS_REPORTED = 20  # per file; the count says how many more


@dataclass
class Finding:
    path: str
    kind: str
    message: str
    block: int | None = None


@dataclass
class FsckReport:
    volume_id: str
    files: int = 0
    ok: int = 0
    blocks: int = 0
    quick: bool = False
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["clean"] = self.clean
        return data


def fsck_volume(
    backing: str | os.PathLike[str],
    config: VolumeConfig,
    keyring: Keyring,
    quick: bool = False,
    show_progress: bool | None = None,
) -> FsckReport:
    """Check every regular file of the volume in *backing* with *keyring*."""
    root = Path(backing).absolute()
    report = FsckReport(config.volume_id.hex(), quick=quick)
    refs = [key.key_ref for key in config.keys]
    entries = list(walk_files(root))
    progress = Progress("fsck", len(entries), enabled=show_progress)
    try:
        for entry in entries:
            progress.advance()
            report.files += 1
            before = len(report.findings)
            try:
                _check_file(entry.path, entry.rel, config, refs, keyring, quick, report)
            except FileNotFoundError:
                report.files -= 1
                continue
            except OSError as exc:
                report.findings.append(Finding(entry.rel, "io", f"{exc.strerror or exc}"))
            if len(report.findings) == before:
                report.ok += 1
    finally:
        progress.close()
    state = root / STATE_DIR_NAME
    if state.is_dir():
        for dirpath, _, names in os.walk(state):
            for name in sorted(names):
                if name.endswith(".tmp") or "tmp" in Path(dirpath).name:
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    report.findings.append(
                        Finding(rel, "leftover", "temporary file of an interrupted kmsfs tool")
                    )
    return report


def _check_file(
    path: Path,
    rel: str,
    config: VolumeConfig,
    refs: list[str],
    keyring: Keyring,
    quick: bool,
    report: FsckReport,
) -> None:
    add = report.findings.append
    raw = read_raw_header(path)
    if raw is None:
        add(Finding(rel, "no-header", "no kmsfs header: plaintext or lost xattr"))
        return
    try:
        header = parse_header(raw, rel)
    except FormatError as exc:
        add(Finding(rel, "bad-header", str(exc).removeprefix(f"{rel}: ")))
        return
    if header.volume_id != config.volume_id:
        add(
            Finding(
                rel,
                "foreign",
                f"header of another volume {header.volume_id.hex()}"
                f" (this volume is {config.volume_id.hex()})",
            )
        )
        return
    have = {entry.key_ref for entry in header.entries}
    for ref in refs:
        if ref not in have:
            add(Finding(rel, "missing-entry", f"no wrapped key for master key {ref}"))
    try:
        key = keyring.unwrap(header, rel)
    except KmsfsError as exc:
        add(Finding(rel, "unwrap", str(exc).removeprefix(f"{rel}: ")))
        return
    try:
        cipher = BlockCipher.for_file(key, header)
    finally:
        wipe(key)
    if quick:
        return
    with open(path, "rb") as handle:
        try:
            content = ContentFile.open(handle.fileno(), cipher, lambda: rel)
        except IntegrityError as exc:
            add(Finding(rel, "size", str(exc).removeprefix(f"{rel}: ")))
            return
        bs = cipher.block_size
        count = max(-(-content.size // bs), 1)
        report.blocks += count
        bad = 0
        chunk = CHUNK_BLOCKS * bs
        for offset in range(0, max(content.size, 1), chunk):
            try:
                content.read(offset, chunk)
                continue
            except IntegrityError:
                pass
            first = offset // bs
            for index in range(first, min(first + CHUNK_BLOCKS, count)):
                try:
                    content.read(index * bs, bs)
                except IntegrityError as exc:
                    bad += 1
                    if bad <= MAX_BLOCKS_REPORTED:
                        add(Finding(rel, "block", _block_message(exc, rel), index))
        if content.size == 0:
            try:
                cipher.open(0, os.pread(handle.fileno(), 28, 0), 0, rel)
            except IntegrityError as exc:
                add(Finding(rel, "block", _block_message(exc, rel), 0))
        if bad > MAX_BLOCKS_REPORTED:
            add(Finding(rel, "block", f"{bad - MAX_BLOCKS_REPORTED} more bad blocks not listed"))


def _block_message(exc: Exception, rel: str) -> str:
    return str(exc).removeprefix(f"{rel}: ")
