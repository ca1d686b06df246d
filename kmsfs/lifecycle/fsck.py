"""fsck: check every header and every block of a volume, offline or while mounted.

Findings (``Finding.kind``):

- ``no-header``: a regular file without ``user.kmsfs.header`` (a stray
  plaintext file copied into the backing directory, or a header lost by a
  backup tool that drops xattrs: see ``kmsfs headers import``).
- ``bad-header``: the header does not parse (the message says what was expected).
- ``foreign``: the header names another volume.
- ``marker``: the backing file's format marker (mode bit S_ISVTX, docs/FORMAT.md
  "The format marker") says another file format than its header (a copy that
  dropped mode bits, or an edit): sizes shown through a mount are wrong until
  the file is opened there, which restores it; ``headers import`` restores it too.
- ``missing-entry``: no wrapped-key entry for one of the volume's master keys
  (an unfinished ``rewrap`` / ``keys add``, or a file created by a daemon that
  did not have that key).
- ``unwrap``: no available master key unwraps the file key; or, when another
  entry does, the entry of one available key does not (names that key).
- ``key-mismatch``: two entries unwrap, with their keys, to different file keys
  (a header edited or assembled from pieces): readers holding different master
  keys would see different things.  Names both keys.  Every entry whose key is
  available is unwrapped, not only the first that opens.
- ``size``: the backing size cannot belong to a well-formed file (truncated
  inside a block header, empty backing file).
- ``block``: a block fails authentication (bit flip, truncation at a block
  boundary, blocks moved or swapped); ``block`` names its index.
- ``leftover``: a temporary file of an interrupted tool in ``.kmsfs.d``.
- in a volume with encrypted names, every name, sidecar, symlink target, directory
  ID and encrypted xattr is checked too (kmsfs/lifecycle/fsck_names.py: ``name``,
  ``dir-id``, ``symlink``, ``xattr``, ``leftover``, ``stray``), and each finding
  names the path in the volume (``path``, as far as its names decrypt) and the
  backing path (``backing``).

Files on a mounted volume that are being written may show transient block
errors; run fsck on an unmounted volume for a definitive answer.

The tree is walked and each file opened by descriptor (``kmsfs.backing.tree``): a
symlink is never followed, and a file renamed or replaced between the walk and
its check is left out, as a removed one is.
"""

from __future__ import annotations

import hmac
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.backing.content_file import ContentFile
from kmsfs.backing.encrypted_names import EncryptedNames, names_for
from kmsfs.backing.header_xattr import parse_header, read_raw_header
from kmsfs.backing.tree import Tree, TreeChanged, open_state_dir, walk
from kmsfs.errors import FormatError, IntegrityError, KmsfsError, ProviderError, reason_of
from kmsfs.format.content import BlockCipher, format_of_mode
from kmsfs.format.header import FileHeader
from kmsfs.format.volume_config import STATE_DIR_NAME as STATE_DIR
from kmsfs.format.volume_config import VolumeConfig
from kmsfs.keys.keyring import Keyring
from kmsfs.keys.provider import KeyContext, wipe
from kmsfs.lifecycle.fsck_names import check_names
from kmsfs.lifecycle.progress import Progress

CHUNK_BLOCKS = 256
MAX_BLOCKS_REPORTED = 20  # per file; the count says how many more


@dataclass
class Finding:
    """One problem: ``path`` in the volume (the backing path where it has no plaintext
    one), ``backing`` (the backing path, in a volume with encrypted names; else "")."""

    path: str
    kind: str
    message: str
    block: int | None = None
    backing: str = ""


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
    names = names_for(config.names, keyring.volume_key, config.volume_id)
    plain: dict[str, str] | None = None
    with Tree(root, encrypted_names=config.encrypted_names) as tree:
        if isinstance(names, EncryptedNames):
            plain = check_names(
                tree.fd,
                names,
                lambda rel, kind, text: report.findings.append(Finding(rel, kind, text)),
            )
        entries = list(tree.files())
        progress = Progress("fsck", len(entries), enabled=show_progress)
        try:
            for entry in entries:
                progress.advance()
                report.files += 1
                before = len(report.findings)
                try:
                    fd = tree.open_file(entry.rel, expect=entry)
                except (FileNotFoundError, TreeChanged):
                    report.files -= 1  # removed, renamed or replaced since the walk
                    continue
                except OSError as exc:
                    report.findings.append(Finding(entry.rel, "io", f"{exc.strerror or exc}"))
                    continue
                try:
                    _check_file(fd, entry.rel, config, refs, keyring, quick, report)
                except OSError as exc:
                    report.findings.append(Finding(entry.rel, "io", f"{exc.strerror or exc}"))
                finally:
                    os.close(fd)
                if len(report.findings) == before:
                    report.ok += 1
        finally:
            progress.close()
        _find_leftovers(tree, report)
    if plain is not None:  # name each finding by its path in the volume, and its backing one
        for finding in report.findings:
            finding.backing = finding.path
            finding.path = plain.get(finding.path) or finding.path
    return report


def _find_leftovers(tree: Tree, report: FsckReport) -> None:
    """Temporary files of interrupted tools in ``.kmsfs.d`` (walked by descriptor)."""
    try:
        state = open_state_dir(tree.fd, create=False)
    except OSError:
        return
    if state is None:
        return
    try:
        for node in walk(state):
            parent = node.rel.rpartition("/")[0].rpartition("/")[2]
            if not stat.S_ISDIR(node.st.st_mode) and (
                node.name.endswith(".tmp") or "tmp" in parent
            ):
                report.findings.append(
                    Finding(
                        f"{STATE_DIR}/{node.rel}",
                        "leftover",
                        "temporary file of an interrupted kmsfs tool",
                    )
                )
    finally:
        os.close(state)


def _check_file(
    fd: int,
    rel: str,
    config: VolumeConfig,
    refs: list[str],
    keyring: Keyring,
    quick: bool,
    report: FsckReport,
) -> None:
    add = report.findings.append
    raw = read_raw_header(fd)
    if raw is None:
        add(Finding(rel, "no-header", "no kmsfs header: plaintext or lost xattr"))
        return
    try:
        header = parse_header(raw, rel)
    except FormatError as exc:
        add(Finding(rel, "bad-header", reason_of(exc)))
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
    claimed = format_of_mode(os.fstat(fd).st_mode)
    if claimed != header.version:
        add(
            Finding(
                rel,
                "marker",
                f"the format marker (mode bit S_ISVTX) says file format {claimed}, the header"
                f" {header.version}: its size shows wrong through a mount until it is opened"
                " there (which restores the marker)",
            )
        )
    have = {entry.key_ref for entry in header.entries}
    for ref in refs:
        if ref not in have:
            add(Finding(rel, "missing-entry", f"no wrapped key for master key {ref}"))
    key = _file_key(header, rel, keyring, report)
    if key is None:
        return
    try:
        cipher = BlockCipher.for_file(key, header)
    finally:
        wipe(key)
    if quick:
        return
    _check_blocks(fd, rel, cipher, report)


def _check_blocks(fd: int, rel: str, cipher: BlockCipher, report: FsckReport) -> None:
    add = report.findings.append
    try:
        content = ContentFile.open(fd, cipher, lambda: rel)
    except IntegrityError as exc:
        add(Finding(rel, "size", reason_of(exc)))
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
            cipher.open(0, os.pread(fd, cipher.layout.overhead, 0), 0, rel)
        except IntegrityError as exc:
            add(Finding(rel, "block", _block_message(exc, rel), 0))
    if bad > MAX_BLOCKS_REPORTED:
        add(Finding(rel, "block", f"{bad - MAX_BLOCKS_REPORTED} more bad blocks not listed"))


def _block_message(exc: Exception, rel: str) -> str:
    return reason_of(exc)


def _file_key(
    header: FileHeader, rel: str, keyring: Keyring, report: FsckReport
) -> bytearray | None:
    """The file key of *header*, or None after reporting why not.

    With one entry whose master key is available, the keyring unwraps it.  With
    several, each is unwrapped on its own and the keys compared: a mismatch is a
    ``key-mismatch`` finding, an entry that does not open while another does an
    ``unwrap`` finding (a temporary provider error is not a finding).
    """
    add = report.findings.append
    pairs = [(p, e) for p in keyring.providers for e in header.entries if p.accepts(e)]
    if len(pairs) > 1:
        context = KeyContext(header.volume_id, header.file_id)
        opened: list[tuple[str, bytearray]] = []
        failed: list[tuple[str, ProviderError]] = []
        for provider, entry in pairs:
            try:
                opened.append((entry.key_ref, provider.unwrap(entry, context)))
            except ProviderError as exc:
                failed.append((entry.key_ref, exc))
        if opened:
            for ref, error in failed:
                if not error.temporary:
                    add(Finding(rel, "unwrap", f"the entry for {ref} does not unwrap ({error})"))
            first_ref, key = opened[0]
            for ref, other in opened[1:]:
                if not hmac.compare_digest(bytes(other), bytes(key)):
                    add(
                        Finding(
                            rel,
                            "key-mismatch",
                            f"the entries for {first_ref} and {ref} unwrap to different file keys",
                        )
                    )
                wipe(other)
            return key
    try:  # one entry, or none opened: the keyring's answer and message
        return keyring.unwrap(header, rel)
    except KmsfsError as exc:
        add(Finding(rel, "unwrap", reason_of(exc)))
        return None
