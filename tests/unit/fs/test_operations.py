"""The FUSE operations layer driven in-process (as s3ql's t3_fs_api.py does): no kernel,
no mount, no root.  Everything below the handlers is real: backing files, headers,
keys, ciphers.  The request context is a plain object with the fields handlers read.

These tests pin the errno each failure maps to (the operations layer is the only
place one is chosen) and the namespace and content operations end to end.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
from support.lifecycle_support import header_of, write_file
from support.operations import CTX, ROOT, create, fields, fuse_errno, read_all, run, serving

from kmsfs.errors import IntegrityError, KeyAccessDenied, KeyUnavailable, WrongKeyError
from kmsfs.format.content import Layout
from kmsfs.format.header import FORMAT_1, FORMAT_2, XATTR_NAME
from kmsfs.fs.operations import DEFAULT_TIMEOUT, KmsfsOperations, errno_for
from kmsfs.policy import Policy, parse_policy

# -- content ------------------------------------------------------------------


def test_create_write_read_back_and_backing_is_ciphertext(ops: KmsfsOperations) -> None:
    data = os.urandom(10_000)

    async def main() -> None:
        inode = await create(ops, b"f", data)
        assert await read_all(ops, inode) == data
        assert (await ops.getattr(inode, CTX)).st_size == len(data)
        assert (await ops.lookup(ROOT, b"f", CTX)).st_ino == inode

    run(main)
    backing = Path(ops.backing, "f").read_bytes()
    assert data[:4096] not in backing and len(backing) > len(data)
    assert os.getxattr(Path(ops.backing, "f"), XATTR_NAME)


# -- file formats and the format marker (docs/FORMAT.md "The format marker") ------------


def test_new_files_are_format_2_with_the_marker_never_shown(ops: KmsfsOperations) -> None:
    path = Path(ops.backing, "f")

    async def main() -> None:
        inode = await create(ops, b"f", b"x" * 5000)
        assert header_of(path).version == FORMAT_2
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o1644
        assert os.stat(path).st_size == 4096 + 40 + 904 + 40
        attr = await ops.getattr(inode, CTX)
        assert (attr.st_mode, attr.st_size) == (stat.S_IFREG | 0o644, 5000)
        await ops.forget([(inode, 1)])  # sizes from the marker now, not the header
        attr = await ops.lookup(ROOT, b"f", CTX)
        assert (attr.st_mode, attr.st_size) == (stat.S_IFREG | 0o644, 5000)
        # chmod keeps the marker whatever is asked, and shows none
        for asked, backing in ((0o600, 0o1600), (0o1640, 0o1640)):
            attr.st_mode = stat.S_IFREG | asked
            attr = await ops.setattr(inode, attr, fields(mode=True), None, CTX)
            assert stat.S_IMODE(os.stat(path).st_mode) == backing
            assert attr.st_mode == stat.S_IFREG | (asked & 0o777)

    run(main)


def test_a_format_1_file_stays_format_1_and_drops_a_requested_sticky_bit(
    ops: KmsfsOperations,
) -> None:
    path = Path(ops.backing, "old")
    write_file(path, ops.config, ops.keyring, b"a" * 5000, FORMAT_1)

    async def main() -> None:
        attr = await ops.lookup(ROOT, b"old", CTX)
        assert attr.st_size == 5000
        fh = (await ops.open(attr.st_ino, os.O_RDWR, CTX)).fh
        await ops.write(fh, 5000, b"b" * 5000)
        await ops.release(fh)
        assert await read_all(ops, attr.st_ino) == b"a" * 5000 + b"b" * 5000
        assert header_of(path).version == FORMAT_1
        assert os.stat(path).st_size == Layout(4096, FORMAT_1).backing_size(10_000)
        attr.st_mode = stat.S_IFREG | 0o1600
        await ops.setattr(attr.st_ino, attr, fields(mode=True), None, CTX)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # +t would say format 2

    run(main)


def test_a_lost_marker_is_restored_at_open_and_the_kernel_sent_to_look_again(
    ops: KmsfsOperations, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack: a format-2 file whose marker was removed shows a format-1 size.  At
    open the header decides: the marker is restored, and, since the kernel holds the
    wrong size (it keeps sizes itself under the writeback cache), the open answers
    ESTALE with a new generation, on which the kernel looks the file up again."""
    data = os.urandom(5000)
    path = Path(ops.backing, "m")

    async def main() -> None:
        inode = await create(ops, b"m", data)
        await ops.forget([(inode, 1)])
        os.chmod(path, 0o644)  # a copy that dropped mode bits, or an attacker
        shown = await ops.lookup(ROOT, b"m", CTX)
        assert shown.st_size == Layout(4096, FORMAT_1).plain_size(os.stat(path).st_size) == 5024
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(inode, os.O_RDONLY, CTX)
        assert info.value.errno == errno.ESTALE
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o1644
        again = await ops.lookup(ROOT, b"m", CTX)
        assert (again.st_size, again.generation) == (5000, shown.generation + 1)
        assert await read_all(ops, inode) == data
        os.chmod(path, 0o644)  # while the daemon knows the file, the header decides
        assert (await ops.lookup(ROOT, b"m", CTX)).st_size == 5000

    with caplog.at_level(logging.INFO, logger="kmsfs.fs"):
        run(main)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(
            "/m: the backing file's format marker (mode bit S_ISVTX) said file format 1,"
            " its header says 2"
        )
        and m.endswith("marker restored")
        for m in messages
    ), messages


def test_a_marker_flipped_back_before_the_open_still_sends_the_kernel_to_look_again(
    ops: KmsfsOperations,
) -> None:
    """The race: the marker is wrong when the kernel gets the size and right again when
    the file is opened.  The open still answers ESTALE: what counts is the size shown."""
    path = Path(ops.backing, "r")

    async def main() -> None:
        inode = await create(ops, b"r", b"r" * 5000)
        await ops.forget([(inode, 1)])
        os.chmod(path, 0o644)
        shown = await ops.lookup(ROOT, b"r", CTX)
        assert shown.st_size != 5000
        os.chmod(path, 0o1644)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(inode, os.O_RDONLY, CTX)
        assert info.value.errno == errno.ESTALE
        assert (await ops.lookup(ROOT, b"r", CTX)).st_size == 5000
        assert await read_all(ops, inode) == b"r" * 5000

    run(main)


def test_truncate_extends_with_zeros_and_shrinks(ops: KmsfsOperations) -> None:
    async def main() -> None:
        inode = await create(ops, b"t", b"abcdef" * 1000)
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 3
        await ops.setattr(inode, attr, fields(size=True), None, CTX)
        assert await read_all(ops, inode) == b"abc"
        attr.st_size = 9000
        await ops.setattr(inode, attr, fields(size=True), None, CTX)
        assert await read_all(ops, inode) == b"abc" + bytes(8997)

    run(main)


def test_write_past_end_leaves_a_hole_of_zeros(ops: KmsfsOperations) -> None:
    async def main() -> None:
        info, attr = await ops.create(ROOT, b"h", 0o644, os.O_RDWR, CTX)
        await ops.write(info.fh, 20_000, b"end")
        await ops.release(info.fh)
        assert await read_all(ops, attr.st_ino) == bytes(20_000) + b"end"

    run(main)


# -- namespace ----------------------------------------------------------------


def test_rename_link_unlink(ops: KmsfsOperations) -> None:
    async def main() -> None:
        inode = await create(ops, b"a", b"content")
        dir_attr = await ops.mkdir(ROOT, b"d", 0o755, CTX)
        await ops.rename(ROOT, b"a", dir_attr.st_ino, b"b", 0, CTX)
        assert (await ops.lookup(ROOT, b"a", CTX)).st_ino == 0  # a negative entry
        assert (await ops.lookup(dir_attr.st_ino, b"b", CTX)).st_ino == inode
        linked = await ops.link(inode, ROOT, b"c", CTX)
        assert linked.st_ino == inode and linked.st_nlink == 2
        await ops.unlink(dir_attr.st_ino, b"b", CTX)
        assert await read_all(ops, inode) == b"content"  # through the other name

    run(main)


def test_lookup_of_a_missing_name_is_a_cached_negative_entry(ops: KmsfsOperations) -> None:
    async def main() -> None:
        negative = await ops.lookup(ROOT, b"nope", CTX)
        assert negative.st_ino == 0 and negative.entry_timeout == ops.access_control.timeout

    run(main)


def test_a_reloaded_policy_sets_how_long_the_kernel_keeps_entries(
    ops: KmsfsOperations,
) -> None:
    """``set_policy`` (what ``policy reload`` calls): list rules that test the requester
    turn the kernel's entry and attribute caches off, a policy without them back on."""
    rule = {"users": "daemon", "actions": ["list"], "effect": "deny"}
    varies = parse_policy({"rule": [rule]}, "test.toml")

    async def timeouts() -> tuple[float, float]:
        negative = await ops.lookup(ROOT, b"nope", CTX)
        attr = await ops.getattr(ROOT, CTX)
        return negative.entry_timeout, attr.attr_timeout

    assert run(timeouts) == (DEFAULT_TIMEOUT, DEFAULT_TIMEOUT)
    ops.access_control.set_policy(varies)
    assert ops.access_control.policy is varies
    assert run(timeouts) == (0.0, 0.0)
    ops.access_control.set_policy(Policy.permit_all())
    assert run(timeouts) == (DEFAULT_TIMEOUT, DEFAULT_TIMEOUT)


def test_namespace_errors_map_to_posix_errnos(ops: KmsfsOperations) -> None:
    async def main() -> dict[str, int]:
        await create(ops, b"file")
        d = await ops.mkdir(ROOT, b"dir", 0o755, CTX)
        await create(ops, b"inside", parent=d.st_ino)
        seen = {}
        for label, call in {
            "create existing": lambda: ops.create(ROOT, b"file", 0o644, os.O_RDWR, CTX),
            "mkdir existing": lambda: ops.mkdir(ROOT, b"dir", 0o755, CTX),
            "rmdir not empty": lambda: ops.rmdir(ROOT, b"dir", CTX),
            "unlink a directory": lambda: ops.unlink(ROOT, b"dir", CTX),
            "rename noreplace": lambda: ops.rename(
                ROOT, b"file", d.st_ino, b"inside", pyfuse3.RENAME_NOREPLACE, CTX
            ),
        }.items():
            try:
                await call()
            except pyfuse3.FUSEError as exc:
                seen[label] = exc.errno
        return seen

    assert run(main) == {
        "create existing": errno.EEXIST,
        "mkdir existing": errno.EEXIST,
        "rmdir not empty": errno.ENOTEMPTY,
        "unlink a directory": errno.EISDIR,
        "rename noreplace": errno.EEXIST,
    }


def test_reserved_names_are_invisible_and_untouchable(ops: KmsfsOperations) -> None:
    for call in (
        lambda: ops.lookup(ROOT, b".kmsfs.json", CTX),
        lambda: ops.create(ROOT, b".kmsfs.d", 0o644, os.O_RDWR, CTX),
        lambda: ops.mkdir(ROOT, b".kmsfs-x", 0o755, CTX),
        lambda: ops.unlink(ROOT, b".kmsfs.json", CTX),
    ):
        assert fuse_errno(call) in (errno.ENOENT, errno.EPERM, errno.EACCES)


# -- xattrs -------------------------------------------------------------------


def test_user_xattrs_round_trip_and_the_header_is_hidden(ops: KmsfsOperations) -> None:
    async def main() -> None:
        inode = await create(ops, b"x", b"1")
        await ops.setxattr(inode, b"user.color", b"blue", CTX)
        assert await ops.getxattr(inode, b"user.color", CTX) == b"blue"
        names = await ops.listxattr(inode, CTX)
        assert b"user.color" in names and XATTR_NAME.encode() not in names
        await ops.removexattr(inode, b"user.color", CTX)
        assert b"user.color" not in await ops.listxattr(inode, CTX)

    run(main)
    inode = os.stat(Path(ops.backing, "x")).st_ino
    assert fuse_errno(lambda: ops.getxattr(inode, XATTR_NAME.encode(), CTX)) in (
        errno.ENODATA,
        errno.EPERM,
        errno.EACCES,
    )
    assert fuse_errno(lambda: ops.setxattr(inode, XATTR_NAME.encode(), b"x", CTX)) in (
        errno.EPERM,
        errno.EACCES,
    )
    assert fuse_errno(lambda: ops.getxattr(inode, b"user.none", CTX)) == errno.ENODATA


# -- errors of the layers below ------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (IntegrityError("f: block 0 failed authentication"), errno.EIO),
        (WrongKeyError("other volume"), errno.EIO),
        (KeyUnavailable("KMS down"), errno.EIO),
        (KeyAccessDenied("key disabled"), errno.EACCES),
        (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
        (PermissionError(errno.EPERM, "no"), errno.EPERM),
        (RuntimeError("a bug"), errno.EIO),
    ],
)
def test_domain_errors_map_to_one_errno(exc: BaseException, want: int) -> None:
    assert errno_for(exc) == want


def test_tampered_block_gives_eio_and_a_log_line(
    ops: KmsfsOperations, caplog: pytest.LogCaptureFixture
) -> None:
    inode = run(lambda: create(ops, b"victim", b"secret" * 2000))
    path = Path(ops.backing, "victim")
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    assert fuse_errno(lambda: read_all(ops, inode)) == errno.EIO
    assert any("victim" in r.getMessage() for r in caplog.records)


def test_missing_header_gives_eio(ops: KmsfsOperations) -> None:
    inode = run(lambda: create(ops, b"plain", b"data"))
    os.removexattr(Path(ops.backing, "plain"), XATTR_NAME)
    assert fuse_errno(lambda: ops.open(inode, os.O_RDONLY, CTX)) == errno.EIO


# -- request counters -----------------------------------------------------------


def test_requests_are_counted_per_opcode_with_their_errors(ops: KmsfsOperations) -> None:
    async def main() -> None:
        for name in (b"a", b"b", b"c"):
            await create(ops, name, b"data")
        await ops.lookup(ROOT, b"nope", CTX)  # a negative entry is an answer, not an error
        with pytest.raises(pyfuse3.FUSEError):
            await ops.mkdir(ROOT, b"a", 0o755, CTX)  # EEXIST
        with pytest.raises(pyfuse3.FUSEError):
            await ops.flush(1)  # ENOSYS: the kernel stops sending FLUSH
        await ops.forget([(ROOT, 0)])

    run(main)
    summary = ops.requests.summary()
    figures = summary["by_opcode"]
    assert {op: (f["count"], f["errors"]) for op, f in figures.items()} == {
        "CREATE": (3, 0),
        "WRITE": (3, 0),
        "RELEASE": (3, 0),
        "LOOKUP": (1, 0),
        "MKDIR": (1, 1),
        "FLUSH": (1, 1),
        "FORGET": (1, 0),
    }
    assert summary["count"] == 13 and summary["errors"] == 2
    create_figures = figures["CREATE"]
    assert 0 < create_figures["time_max_ms"] <= create_figures["time_total_ms"]
    cumulative = list(create_figures["buckets"].values())
    assert cumulative == sorted(cumulative) and cumulative[-1] == 3
    assert list(create_figures["buckets"])[-1] == "+Inf"


def test_forget_drops_the_entry_and_its_descriptor_is_closed(ops: KmsfsOperations) -> None:
    inode = run(lambda: create(ops, b"gone", b"data"))
    entry = ops.inodes.get(inode)
    assert entry is not None
    fd = entry.fd
    os.fstat(fd)
    run(lambda: ops.forget([(inode, 1)]))
    assert ops.inodes.get(inode) is None and entry.fd == -1
    ops.inodes.closer.stop()  # waits for the closer thread
    with pytest.raises(OSError):
        os.fstat(fd)


def test_backing_cut_inside_a_block_header_gives_eio_naming_the_file(
    ops: KmsfsOperations, caplog: pytest.LogCaptureFixture
) -> None:
    inode = run(lambda: create(ops, b"cut", b"x" * 5000))
    os.truncate(Path(ops.backing, "cut"), 4096 + 40 + 10)  # a format-2 file: 40 bytes a block
    assert fuse_errno(lambda: ops.open(inode, os.O_RDONLY, CTX)) == errno.EIO
    messages = [r.getMessage() for r in caplog.records]
    wanted = "/cut: backing size 4146 ends inside a block header"
    assert any(wanted in m for m in messages), messages


# -- shared mode ----------------------------------------------------------------------


@pytest.fixture
def shared_ops(tmp_path: Path) -> Iterator[KmsfsOperations]:
    with serving(tmp_path, timeout=1.0, shared=True) as operations:
        yield operations


def test_shared_lookup_gives_the_size_read_under_the_lock_and_caches_it(
    shared_ops: KmsfsOperations,
) -> None:
    async def main() -> None:
        await create(shared_ops, b"s", b"x" * 5000)
        attr = await shared_ops.lookup(ROOT, b"s", CTX)
        assert attr.st_size == 5000 and attr.attr_timeout == 1.0

    run(main)


@pytest.mark.parametrize(("fixture", "cached"), [("ops", True), ("shared_ops", False)])
def test_shared_mode_is_chosen_once_for_every_handler(
    fixture: str, cached: bool, request: pytest.FixtureRequest
) -> None:
    """Alone, the kernel may keep pages across opens and write back; shared, neither
    (the strategy chosen when the operations are built answers every handler)."""
    operations: KmsfsOperations = request.getfixturevalue(fixture)

    async def main() -> tuple[bool, bool]:
        inode = await create(operations, b"f")
        info = await operations.open(inode, os.O_RDWR | os.O_TRUNC, CTX)
        await operations.release(info.fh)
        return operations.enable_writeback_cache, info.keep_cache

    assert run(main) == (cached, cached)


def test_shared_lookup_of_a_file_the_daemon_may_not_open_answers_uncached(
    shared_ops: KmsfsOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon not running as root may be refused the open that reads a size under the
    lock: lookup still answers, with the backing size, and the kernel does not cache it.
    (The refusal is a stand-in: this suite runs as root, which no mode bits refuse.)"""
    import kmsfs.fs.content_access

    def refused(path: str, layout: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    async def main() -> None:
        await create(shared_ops, b"s", b"x" * 5000)
        monkeypatch.setattr(kmsfs.fs.content_access, "locked_plain_size", refused)
        attr = await shared_ops.lookup(ROOT, b"s", CTX)
        assert attr.st_size == 5000 and attr.attr_timeout == 0

    run(main)
