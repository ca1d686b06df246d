"""kmsfs fsck: clean on a good volume, and names every planted fault with its block."""

from __future__ import annotations

import json
import os
from pathlib import Path

from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.volumes import Volume, make_volume

BS = 4096
BBS = BS + 40  # files made through the mount are format 2


def _write_files(vol: Volume) -> dict[str, bytes]:
    files = {
        "small": b"hello\n",
        "empty": b"",
        "three_blocks": os.urandom(3 * BS),
        "two_and_half": os.urandom(2 * BS + 100),
        "dir/sub/nested": os.urandom(5000),
        "flip": os.urandom(3 * BS + 7),
        "cut_boundary": os.urandom(2 * BS + 10),
        "cut_inside": os.urandom(BS + 10),
        "no_header": os.urandom(100),
    }
    vol.mount()
    for name, data in files.items():
        vol.path(name).parent.mkdir(parents=True, exist_ok=True)
        vol.path(name).write_bytes(data)
    os.link(vol.path("small"), vol.path("dir/hardlink"))
    os.symlink("small", vol.path("symlink"))
    vol.umount()
    return files


@requires_fuse
def test_fsck_clean(volume: Volume) -> None:
    _write_files(volume)
    result = run_kmsfs("fsck", volume.backing, "--key-file", volume.key_file)
    assert result.returncode == 0
    assert result.stdout.strip().endswith(": clean")
    assert "fsck: 10 files, 10 ok" in result.stdout
    data = json.loads(run_kmsfs("fsck", volume.backing, "--json", *volume.key_args).stdout)
    assert data["clean"] is True and data["findings"] == [] and data["files"] == 10


@requires_fuse
def test_fsck_names_each_planted_fault(volume: Volume, tmp_path: Path) -> None:
    _write_files(volume)
    (tmp_path / "other").mkdir()
    other = make_volume(tmp_path / "other")
    try:
        other.mount()
        other.path("theirs").write_bytes(b"x" * 100)
    finally:
        other.umount()
        force_unmount(other.mountpoint)
    b = volume.backing
    # bit flip in the ciphertext of block 1 of a four-block file
    with open(b / "flip", "r+b") as handle:
        handle.seek(BBS + 40)
        byte = handle.read(1)
        handle.seek(BBS + 40)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.truncate(b / "cut_boundary", 2 * BBS)  # at a block boundary: block 1 is now final
    os.truncate(b / "cut_inside", BBS + 10)  # inside the header of block 1
    os.removexattr(b / "no_header", "user.kmsfs.header")
    os.setxattr(
        b / "small",
        "user.kmsfs.header",
        os.getxattr(other.backing / "theirs", "user.kmsfs.header"),
    )
    (b / "dir" / "stray.txt").write_bytes(b"plaintext copied into the backing directory\n")

    result = run_kmsfs("fsck", b, "--key-file", volume.key_file, check=False)
    assert result.returncode == 5, result.stderr
    lines = result.stdout.splitlines()
    assert "flip block 1: block: block 1 failed authentication (modified or moved)" in lines
    assert any(line.startswith("cut_boundary block 1: block: block 1 (final)") for line in lines)
    assert "cut_inside: size: backing size 4146 ends inside a block header" in lines
    assert "no_header: no-header: no kmsfs header: plaintext or lost xattr" in lines
    assert "dir/stray.txt: no-header: no kmsfs header: plaintext or lost xattr" in lines
    assert any(line.startswith("small: foreign: header of another volume") for line in lines)
    # the hard link is another name of the same inode, so it is reported too
    assert any(line.startswith("dir/hardlink: foreign:") for line in lines)
    assert lines[-1] == "fsck: 11 files, 4 ok (headers and 15 blocks checked): 7 problems"

    data = json.loads(run_kmsfs("fsck", b, "--json", *volume.key_args, check=False).stdout)
    kinds = {(f["path"], f["kind"], f["block"]) for f in data["findings"]}
    assert kinds == {
        ("flip", "block", 1),
        ("cut_boundary", "block", 1),
        ("cut_inside", "size", None),
        ("no_header", "no-header", None),
        ("dir/stray.txt", "no-header", None),
        ("small", "foreign", None),
        ("dir/hardlink", "foreign", None),
    }
    # --quick checks headers only: the block faults are not seen, the header faults are
    quick = run_kmsfs("fsck", b, "--quick", "--json", *volume.key_args, check=False)
    assert quick.returncode == 5
    quick_kinds = {f["kind"] for f in json.loads(quick.stdout)["findings"]}
    assert quick_kinds == {"no-header", "foreign"}


def test_fsck_wrong_key_is_refused(volume: Volume, tmp_path: Path) -> None:
    (tmp_path / "o2").mkdir()
    other = make_volume(tmp_path / "o2")
    result = run_kmsfs("fsck", volume.backing, "--key-file", other.key_file, check=False)
    assert result.returncode == 6
    assert "wrong key" in result.stderr


def test_fsck_missing_entry_for_a_volume_key(volume: Volume, tmp_path: Path) -> None:
    from support.lifecycle_support import populate

    populate(volume.backing, volume.key_file, 3)
    key_b = tmp_path / "b.key"
    run_kmsfs("keys", "add", volume.backing, "--old-key-file", volume.key_file, "--key-file", key_b)
    path = volume.backing / "d1/f00001"
    from kmsfs.format.header import FileHeader

    header = FileHeader.parse(os.getxattr(path, "user.kmsfs.header"))
    os.setxattr(path, "user.kmsfs.header", header.with_entries(header.entries[:1]).pack())
    result = run_kmsfs("fsck", volume.backing, "--quick", *volume.key_args, check=False)
    assert result.returncode == 5
    assert "d1/f00001: missing-entry: no wrapped key for master key local:" in result.stdout


def test_fsck_reports_entries_that_unwrap_to_different_keys(volume: Volume, tmp_path: Path) -> None:
    """A header whose entries are each valid but wrap different file keys: whoever reads
    the file with one master key sees other bytes (or EIO) than whoever uses the other."""
    from support.lifecycle_support import populate

    from kmsfs.format.header import FileHeader, WrappedKey
    from kmsfs.format.volume_config import load_config
    from kmsfs.keys.provider import KeyContext, random_key, wipe
    from kmsfs.keys.registry import open_provider
    from kmsfs.keys.settings import HostOptions

    populate(volume.backing, volume.key_file, 3)
    key_b = tmp_path / "b.key"
    run_kmsfs("keys", "add", volume.backing, "--key-file", key_b, "--old-key-file", volume.key_file)
    config = load_config(volume.backing)
    ref_a, ref_b = (key.key_ref for key in config.keys)
    provider_b = open_provider(config.keys[1], HostOptions.parse({"key_file": str(key_b)}), None)
    try:
        mixed = volume.backing / "d1/f00001"
        header = FileHeader.parse(os.getxattr(mixed, "user.kmsfs.header"))
        other_key = random_key()  # a valid entry for B, for this file, of another key
        try:
            forged = provider_b.wrap(other_key, KeyContext(header.volume_id, header.file_id))
        finally:
            wipe(other_key)
        os.setxattr(
            mixed, "user.kmsfs.header", header.with_entries((header.entries[0], forged)).pack()
        )
        # and an entry for B that does not unwrap at all (taken from another file)
        moved = volume.backing / "d2/f00002"
        header2 = FileHeader.parse(os.getxattr(moved, "user.kmsfs.header"))
        stray = FileHeader.parse(os.getxattr(volume.backing / "d0/f00000", "user.kmsfs.header"))
        os.setxattr(
            moved,
            "user.kmsfs.header",
            header2.with_entries((header2.entries[0], stray.entries[1])).pack(),
        )
        assert isinstance(forged, WrappedKey)
    finally:
        provider_b.close()

    result = run_kmsfs("fsck", volume.backing, "--quick", *volume.key_args, check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert (
        f"d1/f00001: key-mismatch: the entries for {ref_a} and {ref_b} unwrap to different"
        " file keys" in lines
    ), lines
    assert any(line.startswith(f"d2/f00002: unwrap: the entry for {ref_b}") for line in lines)
    assert lines[-1] == "fsck: 3 files, 1 ok (headers checked): 2 problems"
    report = run_kmsfs("fsck", volume.backing, "--json", *volume.key_args, check=False)
    data = json.loads(report.stdout)
    assert {(f["path"], f["kind"]) for f in data["findings"]} == {
        ("d1/f00001", "key-mismatch"),
        ("d2/f00002", "unwrap"),
    }


@requires_fuse
def test_fsck_reports_a_wrong_format_marker(volume: Volume) -> None:
    """The marker steers the sizes a mount shows (docs/FORMAT.md "The format marker"):
    fsck names a file whose marker disagrees with its header, also with --quick."""
    _write_files(volume)
    os.chmod(volume.backing / "three_blocks", 0o644)  # format 2, marker lost
    result = run_kmsfs("fsck", volume.backing, "--quick", *volume.key_args, check=False)
    assert result.returncode == 5, result.stdout
    assert (
        "three_blocks: marker: the format marker (mode bit S_ISVTX) says file format 1, the"
        " header 2: its size shows wrong through a mount until it is opened there (which"
        " restores the marker)"
    ) in result.stdout.splitlines()
    volume.mount()
    assert volume.path("three_blocks").read_bytes()  # opening it restores the marker
    volume.umount()
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0
