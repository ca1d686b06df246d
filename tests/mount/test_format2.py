"""File formats through a real mount (docs/FORMAT.md "Content", "The format marker").

New files are format 2 (XAES-256-GCM blocks) with the format marker on the
backing file; a saved format-1 volume reads and writes and its files stay
format 1; and the marker, which only steers the sizes ``stat`` shows, cannot
make the kernel keep a wrong size once a file is opened: a lost marker, or one
planted on a format-1 file, is restored at open and the kernel made to look the
file up again, so reads end and appends land where the header's size says.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from support.cli import run_kmsfs
from support.fuse import force_unmount, requires_fuse
from support.lifecycle_support import header_of, write_files
from support.saved_volume import check_saved_plaintext, restore_saved_volume
from support.volumes import Volume

from kmsfs.format.content import Layout
from kmsfs.format.header import FORMAT_1, FORMAT_2

pytestmark = requires_fuse

BS = 4096


def backing_mode(vol: Volume, rel: str) -> int:
    return stat.S_IMODE(os.stat(vol.backing_path(rel)).st_mode)


def marker_lines(vol: Volume, rel: str) -> list[str]:
    return [
        line
        for line in vol.log_text().splitlines()
        if f"/{rel}: the backing file's format marker" in line and "marker restored" in line
    ]


def test_new_files_are_format_2_with_the_marker(mounted: Volume) -> None:
    data = os.urandom(3 * BS + 100)
    mounted.path("new").write_bytes(data)
    os.chmod(mounted.path("new"), 0o640)
    header = header_of(mounted.backing_path("new"))
    assert (header.version, header.suite) == (FORMAT_2, 2)
    assert backing_mode(mounted, "new") == 0o1640
    assert mounted.backing_path("new").stat().st_size == len(data) + 4 * 40
    st = mounted.path("new").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o640, len(data))
    # +t asked through the mount: never shown, and the backing file keeps its marker
    os.chmod(mounted.path("new"), 0o1600)
    assert stat.S_IMODE(mounted.path("new").stat().st_mode) == 0o600
    assert backing_mode(mounted, "new") == 0o1600
    mounted.remount()
    assert mounted.path("new").read_bytes() == data
    assert stat.S_IMODE(mounted.path("new").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["format1-local", "format2-local"])
def test_saved_format_1_volume_reads_writes_and_stays_format_1(name: str, tmp_path: Path) -> None:
    """The files of a saved volume (config format 1 or 2: both hold file format 1)."""
    vol, saved, args = restore_saved_volume(name, tmp_path)
    blocks = base64.b64decode(saved["plaintext"]["blocks.bin"])
    hello = base64.b64decode(saved["plaintext"]["hello.txt"])
    try:
        vol.mount()
        check_saved_plaintext(vol, saved)
        with open(vol.path("blocks.bin"), "r+b") as handle:
            handle.seek(100)
            handle.write(b"overwritten")
        with open(vol.path("hello.txt"), "ab") as handle:
            handle.write(b"appended " * 1000)
        os.chmod(vol.path("hello.txt"), 0o1600)  # +t must not mark it format 2
        vol.path("fresh").write_bytes(b"new file")
        vol.remount()
        want_blocks = blocks[:100] + b"overwritten" + blocks[111:]
        assert vol.path("blocks.bin").read_bytes() == want_blocks
        assert vol.path("hello.txt").read_bytes() == hello + b"appended " * 1000
        assert vol.path("fresh").read_bytes() == b"new file"
    finally:
        vol.umount()
        force_unmount(vol.mountpoint)
    for rel, size in (("blocks.bin", len(want_blocks)), ("hello.txt", len(hello) + 9000)):
        assert header_of(vol.backing / rel).version == FORMAT_1, rel
        assert not os.stat(vol.backing / rel).st_mode & stat.S_ISVTX, rel
        assert os.stat(vol.backing / rel).st_size == Layout(BS, FORMAT_1).backing_size(size)
    assert header_of(vol.backing / "fresh").version == FORMAT_2
    assert run_kmsfs("fsck", vol.backing, *args).returncode == 0
    for rel, version, size in (("hello.txt", 1, len(hello) + 9000), ("fresh", 2, 8)):
        info = json.loads(run_kmsfs("inspect", vol.backing / rel, "--json").stdout)
        assert (info["format_version"], info["suite"], info["plaintext_size"]) == (
            version,
            version,
            size,
        )


def test_lost_marker_is_restored_at_open(volume: Volume) -> None:
    """A format-2 file whose marker is gone (a copy that dropped mode bits) shows a size
    computed for format 1 until it is opened; the first open restores the marker and
    reads exactly the file, without the zeros the kernel would add up to a size it
    kept, and stat then shows the true size."""
    data = os.urandom(10 * BS + 5)
    volume.mount()
    volume.path("lost").write_bytes(data)
    volume.path("also-lost").write_bytes(data)
    volume.umount()
    for rel in ("lost", "also-lost"):
        os.chmod(volume.backing_path(rel), 0o644)
    shown = Layout(BS, FORMAT_1).plain_size(volume.backing_path("lost").stat().st_size)
    assert shown != len(data)
    audit = volume.root / "audit.jsonl"
    volume.mount("--audit-log", str(audit))
    assert sorted(os.listdir(volume.mountpoint)) == ["also-lost", "lost"]  # readdirplus
    assert volume.path("lost").stat().st_size == shown  # only the size shown is wrong
    with open(volume.path("lost"), "rb") as handle:
        assert handle.read() == data
    assert volume.path("lost").stat().st_size == len(data)
    assert backing_mode(volume, "lost") == 0o1644
    assert len(marker_lines(volume, "lost")) == 1
    # the open the kernel retried is one open, recorded once, as it ended
    opens = [json.loads(line) for line in audit.read_text().splitlines()]
    opens = [r for r in opens if r.get("operation") == "open" and r.get("path") == "/lost"]
    assert [r["result"] for r in opens] == ["ok"]
    # appending to the other one lands at the true end, too
    with open(volume.path("also-lost"), "ab") as handle:
        handle.write(b"tail")
    assert volume.path("also-lost").read_bytes() == data + b"tail"
    volume.umount()
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0


def test_lost_marker_in_shared_mode(volume: Volume) -> None:
    """Shared mode reads a size under a lock of the final block, with the layout the
    marker claims: a lost marker gives the format-1 size there too, until the open,
    whose header restores the marker; reads, stat and an append then use the header's
    format (the size read under the lock is never the wrong format's again)."""
    data = os.urandom(10 * BS + 5)
    volume.mount("-o", "shared")
    volume.path("lost").write_bytes(data)
    volume.umount()
    os.chmod(volume.backing_path("lost"), 0o644)
    shown = Layout(BS, FORMAT_1).plain_size(volume.backing_path("lost").stat().st_size)
    assert shown != len(data)
    volume.mount("-o", "shared")
    assert volume.path("lost").stat().st_size == shown  # only the size shown is wrong
    with open(volume.path("lost"), "rb") as handle:
        assert handle.read() == data
    assert volume.path("lost").stat().st_size == len(data)
    with open(volume.path("lost"), "ab") as handle:
        handle.write(b"tail")
    assert volume.path("lost").read_bytes() == data + b"tail"
    assert volume.path("lost").stat().st_size == len(data) + 4
    assert backing_mode(volume, "lost") == 0o1644
    assert len(marker_lines(volume, "lost")) == 1
    volume.umount()
    assert run_kmsfs("fsck", volume.backing, *volume.key_args).returncode == 0


def test_planted_marker_on_a_format1_file_cannot_misplace_an_append(volume: Volume) -> None:
    """The attack: the marker set on a format-1 file makes the size shown smaller.  An
    O_APPEND write through the kernel's writeback cache lands at the size the kernel
    holds: without the protection it overwrote the end of the file.  With it, the open
    restores the marker and the kernel takes the header's size first."""
    data = os.urandom(40 * BS + 123)
    write_files(volume.backing, volume.key_file, {"old": data, "old2": data}, FORMAT_1)
    for rel in ("old", "old2"):
        os.chmod(volume.backing_path(rel), 0o1644)
    shown = Layout(BS, FORMAT_2).plain_size(volume.backing_path("old").stat().st_size)
    assert shown < len(data)
    volume.mount()
    assert volume.path("old").stat().st_size == shown
    with open(volume.path("old"), "ab") as handle:
        handle.write(b"appended")
    assert volume.path("old").read_bytes() == data + b"appended"
    assert volume.path("old").stat().st_size == len(data) + 8
    assert volume.path("old2").stat().st_size == shown
    with open(volume.path("old2"), "rb") as handle:  # and a read is not cut short
        assert handle.read() == data
    volume.umount()
    assert backing_mode(volume, "old") == 0o644
    assert header_of(volume.backing_path("old")).version == FORMAT_1
    assert len(marker_lines(volume, "old")) == 1


def test_truncate_by_name_of_a_file_with_a_lost_marker(volume: Volume) -> None:
    """truncate(2) opens the content by name too (SETATTR): the same ESTALE retry."""
    data = os.urandom(5 * BS)
    volume.mount()
    volume.path("cut").write_bytes(data)
    volume.umount()
    os.chmod(volume.backing_path("cut"), 0o644)
    volume.mount()
    os.truncate(volume.path("cut"), 2 * BS + 1)
    assert volume.path("cut").read_bytes() == data[: 2 * BS + 1]
    assert backing_mode(volume, "cut") == 0o1644
