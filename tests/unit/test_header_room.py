"""What the daemon records of its headers against the backing inodes' room, and how
``kmsfs status`` words it (the probe itself runs on real ext4 filesystems:
tests/mount/test_backing_inodes.py)."""

from __future__ import annotations

from kmsfs.backing.inode_room import PROBE_LIMIT, HeaderRoom
from kmsfs.server.status import describe_header_room


def test_the_log_hears_of_a_header_that_does_not_fit_once() -> None:
    room = HeaderRoom(xattr_bytes=60)
    assert room.summary() == {"xattr_bytes": 60, "header_bytes": None, "fits": None}
    assert room.note_header(138) is True
    assert room.note_header(138) is False  # said once
    assert room.note_header(300) is False
    assert room.summary() == {"xattr_bytes": 60, "header_bytes": 300, "fits": False}


def test_a_header_that_fits_is_never_reported_and_the_largest_is_kept() -> None:
    room = HeaderRoom(xattr_bytes=316)
    assert room.note_header(138) is False
    assert room.summary()["fits"] is True
    assert room.note_header(400) is True  # a second master key's entry pushed it out
    assert room.summary() == {"xattr_bytes": 316, "header_bytes": 400, "fits": False}


def test_an_unknown_room_is_never_reported() -> None:
    room = HeaderRoom(xattr_bytes=None)
    assert room.note_header(5000) is False
    assert room.summary() == {"xattr_bytes": None, "header_bytes": 5000, "fits": None}


def test_the_status_line_says_where_headers_go() -> None:
    def line(xattr: int | None, header: int | None) -> str:
        room = HeaderRoom(xattr_bytes=xattr)
        if header is not None:
            room.note_header(header)
        return describe_header_room(room.summary())

    assert line(60, None) == "60 bytes of room in a backing inode; none created yet"
    assert line(60, 138) == (
        "138 bytes, 60 bytes of room in a backing inode: each takes a 4 KiB block of its"
        ' own (docs/SERVERS.md, "The backing filesystem")'
    )
    assert line(316, 138) == "138 bytes, 316 bytes of room in a backing inode: kept in the inode"
    assert line(PROBE_LIMIT, 138) == (
        f"138 bytes, at least {PROBE_LIMIT} bytes of room in a backing inode: kept in the inode"
    )
    assert line(None, 138) == (
        "138 bytes, inode room unknown (no O_TMPFILE or user xattrs, or a read-only filesystem)"
    )
