"""Tampering with the backing directory of a real mount: each case gives EIO, never wrong bytes.

Every case runs on both file formats (docs/FORMAT.md "Content"): format 2, whose
victims are written through one mount (new files are format 2), and format 1,
whose victims are written offline as kmsfs before format 2 wrote them.  The
volume is unmounted (the kernel caches pages, so tampering under a live mount
would test the cache), every victim is tampered with in its own way, and the
volume is mounted again.  Each case then checks that reading the victim fails with EIO and
that the daemon logged an error line naming the file, while an untouched
file beside it still reads correctly.

What the threat model (docs/FORMAT.md, "Threat model") accepts, asserted
here as documented behaviour rather than as a failure:

- a middle block whose backing bytes are *all* zero is a hole and reads as
  block-size zero bytes (zeroing part of a block, or the final block, is
  detected);
- a whole file replaced by another complete file of the same volume (header
  and content together) reads as that other file, since names are not bound
  into the content.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.fuse import force_unmount, fuse_available, requires_fuse
from support.lifecycle_support import write_files
from support.volumes import Volume, make_volume

from kmsfs.format.content import NONCE_SIZES, OVERHEADS
from kmsfs.format.header import FORMAT_1, FORMAT_2

pytestmark = requires_fuse

BS = 4096
HEADER = "user.kmsfs.header"
SIZE = 4 * BS + 1000  # four whole blocks and a partial final block (index 4)


def content(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


def read_block(path: Path, index: int, bbs: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * bbs)
        return f.read(bbs)


def write_block(path: Path, index: int, data: bytes, bbs: int) -> None:
    with open(path, "r+b") as f:
        f.seek(index * bbs)
        f.write(data)


def set_header(path: Path, value: bytes) -> None:
    os.setxattr(path, HEADER, value)


def header_of(path: Path) -> bytes:
    return os.getxattr(path, HEADER)


def patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def inverted(data: bytes, offset: int) -> bytes:
    """*data* with the byte at *offset* inverted (a random ID byte may already be 0xff)."""
    return patch(data, offset, bytes([data[offset] ^ 0xFF]))


@dataclass
class Ctx:
    """What a tampering function may use: the victim's and donors' backing paths, and
    the sizes of the victim's format: nonce, overhead (nonce + tag), backing block."""

    victim: Path
    donor: Path  # another file of the same volume, same size, written the same way
    foreign: Path  # a file of another volume (other master key)
    version: int

    @property
    def nonce(self) -> int:
        return NONCE_SIZES[self.version]

    @property
    def overhead(self) -> int:
        return OVERHEADS[self.version]

    @property
    def bbs(self) -> int:
        return BS + self.overhead

    def read_block(self, path: Path, index: int) -> bytes:
        return read_block(path, index, self.bbs)

    def write_block(self, path: Path, index: int, data: bytes) -> None:
        write_block(path, index, data, self.bbs)

    def other_format(self) -> bytes:
        """The version and suite bytes of the other file format."""
        other = FORMAT_1 if self.version == FORMAT_2 else FORMAT_2
        return bytes([other, other])


Tamper = Callable[[Ctx], None]

# Each case: (name, tamper, words one of which the daemon's log line must contain).
CASES: list[tuple[str, Tamper, tuple[str, ...]]] = [
    ("flip-ciphertext", lambda c: flip(c.victim, c.bbs + c.nonce + 100), ("authentication",)),
    ("flip-nonce", lambda c: flip(c.victim, 2 * c.bbs + 3), ("authentication",)),
    ("flip-tag", lambda c: flip(c.victim, 2 * c.bbs - 1, 0x80), ("authentication",)),
    ("flip-first-block", lambda c: flip(c.victim, c.nonce), ("authentication",)),
    ("flip-final-block", lambda c: flip(c.victim, 4 * c.bbs + c.nonce + 999), ("authentication",)),
    (
        "swap-blocks",
        lambda c: (lambda b0, b1: (c.write_block(c.victim, 0, b1), c.write_block(c.victim, 1, b0)))(
            c.read_block(c.victim, 0), c.read_block(c.victim, 1)
        ),
        ("authentication",),
    ),
    (
        "block-moved-within-file",
        lambda c: c.write_block(c.victim, 1, c.read_block(c.victim, 3)),
        ("authentication",),
    ),
    (
        "block-from-other-file",
        lambda c: c.write_block(c.victim, 2, c.read_block(c.donor, 2)),
        ("authentication",),
    ),
    (
        "final-block-from-other-file",
        lambda c: c.write_block(c.victim, 4, c.read_block(c.donor, 4)),
        ("authentication",),
    ),
    (
        "truncated-at-block-boundary",
        lambda c: os.truncate(c.victim, 2 * c.bbs),
        ("authentication", "truncated"),
    ),
    (
        "truncated-at-last-full-block",
        lambda c: os.truncate(c.victim, 4 * c.bbs),
        ("authentication", "truncated"),
    ),
    (
        "truncated-mid-block",
        lambda c: os.truncate(c.victim, 2 * c.bbs + 500),
        ("authentication", "truncated"),
    ),
    (
        "truncated-inside-block-header",
        lambda c: os.truncate(c.victim, 2 * c.bbs + 10),
        ("header", "cut short", "truncated"),
    ),
    (
        "truncated-to-one-empty-block",
        lambda c: os.truncate(c.victim, 3 * c.bbs + c.overhead),
        ("empty block", "authentication"),
    ),
    ("truncated-to-zero", lambda c: os.truncate(c.victim, 0), ("empty", "truncated")),
    (
        "extended-with-garbage-block",
        lambda c: c.write_block(c.victim, 5, os.urandom(c.bbs)),
        ("authentication",),
    ),
    (
        "final-block-zeroed",
        lambda c: c.write_block(c.victim, 4, bytes(1000 + c.overhead)),
        ("zeroed", "authentication"),
    ),
    (
        "middle-block-partly-zeroed",
        lambda c: c.write_block(c.victim, 1, bytes(c.bbs - 1)),
        ("authentication",),
    ),
    ("header-removed", lambda c: os.removexattr(c.victim, HEADER), ("no kmsfs header",)),
    (
        "header-from-other-file",
        lambda c: set_header(c.victim, header_of(c.donor)),
        ("authentication",),
    ),
    (
        "header-from-other-volume",
        lambda c: set_header(c.victim, header_of(c.foreign)),
        ("volume", "key", "wrapped"),
    ),
    ("header-empty", lambda c: set_header(c.victim, b""), ("header",)),
    (
        "header-truncated-by-one",
        lambda c: set_header(c.victim, header_of(c.victim)[:-1]),
        ("header", "wrapped", "length", "bytes"),
    ),
    (
        "header-truncated-to-fixed-part",
        lambda c: set_header(c.victim, header_of(c.victim)[:45]),
        ("header", "entry", "length", "bytes"),
    ),
    (
        "header-truncated-in-fixed-part",
        lambda c: set_header(c.victim, header_of(c.victim)[:20]),
        ("header", "bytes"),
    ),
    (
        "header-trailing-byte",
        lambda c: set_header(c.victim, header_of(c.victim) + b"\0"),
        ("header", "trailing", "bytes"),
    ),
    ("header-bad-magic", lambda c: set_header(c.victim, b"XMFH" + header_of(c.victim)[4:]), ()),
    (
        "header-bad-version",
        lambda c: set_header(c.victim, patch(header_of(c.victim), 4, b"\x09")),
        ("version",),
    ),
    (
        "header-flag-set",
        lambda c: set_header(c.victim, patch(header_of(c.victim), 6, b"\x00\x01")),
        ("flag",),
    ),
    (
        "header-block-size-changed",
        lambda c: set_header(c.victim, patch(header_of(c.victim), 8, (8192).to_bytes(4, "big"))),
        ("authentication", "block size"),
    ),
    (
        "header-volume-id-flipped",
        lambda c: set_header(c.victim, inverted(header_of(c.victim), 12)),
        ("volume", "key", "wrapped"),
    ),
    (
        "header-file-id-flipped",
        lambda c: set_header(c.victim, inverted(header_of(c.victim), 30)),
        ("key", "wrapped", "authentication"),
    ),
    (
        "header-wrapped-key-flipped",
        lambda c: set_header(
            c.victim, header_of(c.victim)[:-1] + bytes([header_of(c.victim)[-1] ^ 1])
        ),
        ("key", "wrapped"),
    ),
    (
        "header-no-entries",
        lambda c: set_header(c.victim, header_of(c.victim)[:44] + b"\x00"),
        ("entr",),
    ),
    (
        "header-says-the-other-format",
        lambda c: set_header(c.victim, patch(header_of(c.victim), 4, c.other_format())),
        ("authentication", "size", "block"),
    ),
]


@dataclass
class Lab:
    """A volume whose victims were tampered with while unmounted, mounted again."""

    vol: Volume
    expected: dict[str, bytes]
    version: int


@pytest.fixture(scope="module", params=[FORMAT_2, FORMAT_1], ids=["format-2", "format-1"])
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    if not fuse_available():
        pytest.skip("needs /dev/fuse")
    version = request.param
    root = tmp_path_factory.mktemp(f"tamper-format{version}")
    other_root = root / "other-volume"
    other_root.mkdir()
    main_root = root / "volume"
    main_root.mkdir()
    vol = make_volume(main_root)
    other = make_volume(other_root)
    try:
        other.mount()
        other.path("foreign").write_bytes(content(999))
        other.umount()

        expected: dict[str, bytes] = {"untouched": content(0), "zero-hole": content(1)}
        for seed, (name, _, _) in enumerate(CASES, start=10):
            expected[f"victim-{name}"] = content(seed)
            expected[f"donor-{name}"] = content(seed + 1000)
        # A whole-file replacement, accepted by the threat model: "replaced" becomes
        # a copy of "original" (header and content together).
        files = {**expected, "original": b"the original" * 500, "replaced": b"the other one" * 700}
        if version == FORMAT_2:
            vol.mount()
            for name, data in files.items():
                vol.path(name).write_bytes(data)
            vol.umount()
        else:
            write_files(vol.backing, vol.key_file, files, FORMAT_1)

        for name, tamper, _ in CASES:
            ctx = Ctx(
                vol.backing_path(f"victim-{name}"),
                vol.backing_path(f"donor-{name}"),
                other.backing_path("foreign"),
                version,
            )
            assert header_of(ctx.victim)[4] == version
            tamper(ctx)
        bbs = BS + OVERHEADS[version]
        write_block(vol.backing_path("zero-hole"), 2, bytes(bbs), bbs)
        shutil.copyfile(vol.backing_path("original"), vol.backing_path("replaced"))
        set_header(vol.backing_path("replaced"), header_of(vol.backing_path("original")))

        vol.mount()
        yield Lab(vol, expected, version)
        vol.umount()
    finally:
        force_unmount(vol.mountpoint)
        force_unmount(other.mountpoint)
    text = vol.log_text()
    assert "Traceback" not in text and "unexpected error" not in text, text[-4000:]


def read_errno(path: Path) -> int | None:
    """errno of opening and reading *path* whole, or None if that worked."""
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as exc:
        return exc.errno
    return None


def error_lines(vol: Volume, name: str) -> list[str]:
    pattern = re.compile(rf" ERROR .*/{re.escape(name)}\b")
    return [line for line in vol.log_text().splitlines() if pattern.search(line)]


@pytest.mark.parametrize("case", [name for name, _, _ in CASES])
def test_tampering_gives_eio_and_names_the_file(lab: Lab, case: str) -> None:
    words = next(w for name, _, w in CASES if name == case)
    victim = lab.vol.path(f"victim-{case}")
    assert read_errno(victim) == errno.EIO
    # A second attempt fails the same way (nothing was "repaired" or cached).
    assert read_errno(victim) == errno.EIO
    lines = error_lines(lab.vol, f"victim-{case}")
    assert lines, f"no error line names victim-{case}"
    assert not any(line.count(f"/victim-{case}:") > 1 for line in lines), lines
    if words:
        assert any(word in line for line in lines for word in words), lines
    # The untouched file and the donor still read correctly: the mount is healthy.
    assert lab.vol.path("untouched").read_bytes() == lab.expected["untouched"]
    donor = f"donor-{case}"
    assert lab.vol.path(donor).read_bytes() == lab.expected[donor]
    # stat never needs the header or the key: it works on a tampered file.
    assert victim.stat().st_size >= 0


@pytest.mark.parametrize(
    "case", ["flip-final-block", "final-block-zeroed", "truncated-at-last-full-block"]
)
def test_append_to_tampered_file_does_not_launder_it(lab: Lab, case: str) -> None:
    """Appending needs the final block's plaintext: it must fail, not re-seal garbage."""
    victim = lab.vol.path(f"victim-{case}")
    with pytest.raises(OSError) as info, open(victim, "ab") as f:
        f.write(b"more")
    assert info.value.errno == errno.EIO
    assert read_errno(victim) == errno.EIO


def test_documented_zeroed_middle_block_reads_as_hole(lab: Lab) -> None:
    """Accepted by the threat model: an all-zero middle block is a hole (reads as zeros)."""
    want = bytearray(lab.expected["zero-hole"])
    want[2 * BS : 3 * BS] = bytes(BS)
    assert lab.vol.path("zero-hole").read_bytes() == bytes(want)
    assert not error_lines(lab.vol, "zero-hole")


def test_documented_whole_file_replacement_is_not_detected(lab: Lab) -> None:
    """Accepted by the threat model: names are not bound into the content."""
    assert lab.vol.path("replaced").read_bytes() == b"the original" * 500
