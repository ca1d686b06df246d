"""Random operation sequences applied to the mount and to a plain directory, compared.

A hypothesis state machine creates, writes (at offsets around block
boundaries), appends, truncates, reads, renames and unlinks a handful of
files, through short-lived opens and through descriptors kept open across
renames and unlinks, on the mount and on a plain directory at once.  Every
operation must have the same outcome on both sides: the same bytes, or the
same errno.  Reads are sometimes made "cold" (fsync, then drop the file's
pages from the kernel cache) so that they reach the daemon and its
decryption instead of the page cache.  After all examples the volume is
remounted and every example's final tree is compared once more.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support.fuse import requires_fuse
from support.volumes import BOTH_NAMES, Volume

pytestmark = [requires_fuse, BOTH_NAMES]

BS = 4096
NAMES = ["a", "b", "c", "d/e"]  # "d" is a directory made by each example

boundaries = [k * BS + d for k in range(6) for d in (-1, 0, 1) if k * BS + d >= 0]
offsets = st.one_of(st.sampled_from(boundaries), st.integers(0, 6 * BS))
sizes = st.one_of(st.sampled_from(boundaries), st.integers(0, 6 * BS))
payloads = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.integers(1, 3 * BS + 2).map(lambda n: os.urandom(n)),
    st.sampled_from([BS, BS - 1, BS + 1]).map(lambda n: bytes([0x5A]) * n),
)


def outcome(func, *args):  # type: ignore[no-untyped-def]
    """("ok", result) or ("err", errno): what an operation did, comparable across sides."""
    try:
        return ("ok", func(*args))
    except OSError as exc:
        return ("err", exc.errno)


class Counter:
    value = 0


class MountVersusPlain(RuleBasedStateMachine):
    vol: Volume
    ref_root: Path
    finished: list[tuple[Path, Path]]

    def __init__(self) -> None:
        super().__init__()
        Counter.value += 1
        self.m = self.vol.path(f"ex{Counter.value}")
        self.r = self.ref_root / f"ex{Counter.value}"
        for side in (self.m, self.r):
            side.mkdir()
            (side / "d").mkdir()
        self.handles: list[tuple[int, int]] = []

    def both(self, func, name: str, *args):  # type: ignore[no-untyped-def]
        got = outcome(func, self.m / name, *args)
        want = outcome(func, self.r / name, *args)
        assert got == want, f"{func.__name__}({name}, ...): mount {got}, plain {want}"
        return got

    # -- short-lived opens -------------------------------------------------

    @rule(name=st.sampled_from(NAMES), exclusive=st.booleans())
    def create(self, name: str, exclusive: bool) -> None:
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else 0)
        self.both(lambda p: os.close(os.open(p, flags, 0o644)), name)

    @rule(name=st.sampled_from(NAMES), offset=offsets, data=payloads)
    def write(self, name: str, offset: int, data: bytes) -> None:
        def op(path: Path) -> int:
            fd = os.open(path, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        self.both(op, name)

    @rule(name=st.sampled_from(NAMES), data=payloads)
    def append(self, name: str, data: bytes) -> None:
        def op(path: Path) -> int:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both(op, name)

    @rule(name=st.sampled_from(NAMES), data=payloads)
    def rewrite_with_o_trunc(self, name: str, data: bytes) -> None:
        def op(path: Path) -> int:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both(op, name)

    @rule(name=st.sampled_from(NAMES), size=sizes)
    def truncate(self, name: str, size: int) -> None:
        self.both(os.truncate, name, size)

    @rule(name=st.sampled_from(NAMES), offset=offsets, length=st.integers(0, 3 * BS + 5))
    def read(self, name: str, offset: int, length: int) -> None:
        def op(path: Path) -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        self.both(op, name)

    @rule(name=st.sampled_from(NAMES))
    def cold_read_whole(self, name: str) -> None:
        """fsync and drop the file's cached pages, so the read goes through the daemon."""

        def op(path: Path) -> bytes:
            fd = os.open(path, os.O_RDWR)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                return os.pread(fd, 8 * BS, 0)
            finally:
                os.close(fd)

        self.both(op, name)

    @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
    def rename(self, src: str, dst: str) -> None:
        got = outcome(os.rename, self.m / src, self.m / dst)
        want = outcome(os.rename, self.r / src, self.r / dst)
        assert got == want, f"rename({src}, {dst}): mount {got}, plain {want}"

    @rule(name=st.sampled_from(NAMES))
    def unlink(self, name: str) -> None:
        self.both(os.unlink, name)

    # -- descriptors kept open across renames and unlinks --------------------

    @precondition(lambda self: len(self.handles) < 3)
    @rule(name=st.sampled_from(NAMES))
    def open_handle(self, name: str) -> None:
        got = outcome(os.open, self.m / name, os.O_RDWR)
        want = outcome(os.open, self.r / name, os.O_RDWR)
        if got[0] == want[0] == "ok":
            self.handles.append((got[1], want[1]))
            return
        for fd in (got, want):
            if fd[0] == "ok":
                os.close(fd[1])
        assert got == want, f"open({name}): mount {got}, plain {want}"

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 2), offset=offsets, data=payloads)
    def handle_write(self, index: int, offset: int, data: bytes) -> None:
        fm, fr = self.handles[index % len(self.handles)]
        assert os.pwrite(fm, data, offset) == os.pwrite(fr, data, offset)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 2), offset=offsets, length=st.integers(0, 3 * BS))
    def handle_read(self, index: int, offset: int, length: int) -> None:
        fm, fr = self.handles[index % len(self.handles)]
        assert os.pread(fm, length, offset) == os.pread(fr, length, offset)
        assert os.fstat(fm).st_size == os.fstat(fr).st_size
        assert os.fstat(fm).st_nlink == os.fstat(fr).st_nlink

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 2), size=sizes)
    def handle_truncate(self, index: int, size: int) -> None:
        fm, fr = self.handles[index % len(self.handles)]
        os.ftruncate(fm, size)
        os.ftruncate(fr, size)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 2))
    def close_handle(self, index: int) -> None:
        fm, fr = self.handles.pop(index % len(self.handles))
        os.close(fm)
        os.close(fr)

    # -- comparisons ---------------------------------------------------------

    @invariant()
    def same_names_and_sizes(self) -> None:
        for sub in ("", "d"):
            names = sorted(os.listdir(self.m / sub))
            assert names == sorted(os.listdir(self.r / sub)), sub
            for name in names:
                got, want = os.lstat(self.m / sub / name), os.lstat(self.r / sub / name)
                assert (got.st_size, got.st_nlink) == (want.st_size, want.st_nlink), name
                assert got.st_mode == want.st_mode, name

    def teardown(self) -> None:
        for fm, fr in self.handles:
            os.close(fm)
            os.close(fr)
        self.handles.clear()
        for name in NAMES:
            if (self.r / name).exists():
                assert (self.m / name).read_bytes() == (self.r / name).read_bytes(), name
        self.finished.append((self.m, self.r))


def tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = path.read_bytes() if path.is_file() else None
    return out


def test_mount_behaves_like_a_plain_directory(mounted: Volume, tmp_path: Path) -> None:
    ref_root = tmp_path / "reference"
    ref_root.mkdir()
    finished: list[tuple[Path, Path]] = []
    MountVersusPlain.vol = mounted
    MountVersusPlain.ref_root = ref_root
    MountVersusPlain.finished = finished
    run_state_machine_as_test(
        MountVersusPlain,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    assert len(finished) >= 10  # the examples really ran
    mounted.remount()
    for m, r in finished:
        assert tree(m) == tree(r), m.name
    assert not [line for line in mounted.log_text().splitlines() if " ERROR " in line]


def test_errno_for_missing_files_matches(mounted: Volume, tmp_path: Path) -> None:
    """A few fixed outcomes the state machine relies on, stated plainly."""
    m, r = mounted.mountpoint, tmp_path
    for base in (m, r):
        (base / "dir").mkdir()
    for func, args in [
        (os.truncate, ("missing", 5)),
        (os.unlink, ("missing",)),
        (lambda p: os.rename(p, p.parent / "other"), ("missing",)),
        (os.open, ("missing", os.O_RDONLY)),
        (os.unlink, ("dir",)),
        (os.open, ("dir", os.O_WRONLY)),
        (os.truncate, ("dir", 0)),
    ]:
        got = outcome(func, m / args[0], *args[1:])
        want = outcome(func, r / args[0], *args[1:])
        for side in (got, want):
            if side[0] == "ok" and func is os.open:
                os.close(side[1])
        assert got == want, (func.__name__, args)
    assert outcome(os.unlink, m / "missing") == ("err", errno.ENOENT)
