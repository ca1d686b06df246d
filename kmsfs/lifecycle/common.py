"""Shared pieces of the lifecycle tools: walking a backing tree, headers, journals,
mount detection, birth times and the progress bar."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kmsfs.errors import FormatError, KmsfsError, UsageError
from kmsfs.format.header import XATTR_NAME, FileHeader
from kmsfs.format.volume import RESERVED_PREFIX, STATE_DIR_NAME


class LifecycleError(KmsfsError):
    """A lifecycle tool cannot start or finish (mounted volume, journal of another run)."""

    exit_code = 1


class VolumeMounted(LifecycleError):
    """The tool needs the volume unmounted."""

    exit_code = 7


# -- walking -----------------------------------------------------------------


@dataclass
class Entry:
    """One regular backing file (all names of one inode are walked separately)."""

    path: Path  # absolute
    rel: str  # relative to the backing root, '/'-separated
    st: os.stat_result


def walk_files(root: Path) -> Iterator[Entry]:
    """Every regular file under *root* in a stable (sorted) order, skipping the reserved
    ``.kmsfs*`` names at the root.  Symlinks are never followed."""
    root = Path(root)
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        directory = root / rel_dir if rel_dir else root
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue  # removed meanwhile (a mounted volume)
        subdirs = []
        for name in names:
            if not rel_dir and name.startswith(RESERVED_PREFIX):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = directory / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(rel)
            elif stat.S_ISREG(st.st_mode):
                yield Entry(path, rel, st)
        stack.extend(reversed(subdirs))


def walk_dirs(root: Path) -> list[Path]:
    """Every directory under *root* (not the root, not ``.kmsfs*``), parents first."""
    out: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        if Path(dirpath) == Path(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
        dirnames.sort()
        out.extend(Path(dirpath) / d for d in dirnames)
    return out


# -- headers -----------------------------------------------------------------


def read_raw_header(path: Path) -> bytes | None:
    """The header xattr's bytes, or None if the file has none."""
    try:
        return os.getxattr(path, XATTR_NAME, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def parse_header(raw: bytes, what: str) -> FileHeader:
    try:
        return FileHeader.parse(raw)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None


def replace_header(path: Path, header: FileHeader) -> None:
    """Replace the header xattr of *path* whole (setxattr is atomic for one value).

    XATTR_REPLACE: a file whose header vanished (or that was replaced by a
    file without one) is never given a header here; ENODATA then.
    """
    os.setxattr(path, XATTR_NAME, header.pack(), os.XATTR_REPLACE, follow_symlinks=False)


# -- journals ----------------------------------------------------------------


def state_dir(backing: Path) -> Path:
    path = Path(backing) / STATE_DIR_NAME
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def journal_path(backing: Path, name: str) -> Path:
    return Path(backing) / STATE_DIR_NAME / f"{name}.json"


def load_journal(backing: Path, name: str) -> dict[str, Any] | None:
    path = journal_path(backing, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LifecycleError(f"cannot read journal {path}: {exc}") from None
    if not isinstance(data, dict):
        raise LifecycleError(f"journal {path} is not a JSON object")
    return data


def save_journal(backing: Path, name: str, data: dict[str, Any]) -> None:
    """Write the journal atomically and durably (temp file, fsync, rename, fsync dir)."""
    directory = state_dir(backing)
    path = journal_path(backing, name)
    temp = path.with_name(path.name + ".tmp")
    write_durably(temp, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    os.replace(temp, path)
    fsync_dir(directory)


def drop_journal(backing: Path, name: str) -> None:
    path = journal_path(backing, name)
    path.unlink(missing_ok=True)
    if path.parent.exists():
        fsync_dir(path.parent)


def write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- mounts ------------------------------------------------------------------


def _unescape_mount_field(text: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (\\040...)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mountpoints_of(backing: Path, mounts_file: str = "/proc/mounts") -> list[str]:
    """Mount points where *backing* is mounted by kmsfs (fsname = the backing path)."""
    wanted = os.path.abspath(backing)
    found = []
    try:
        with open(mounts_file) as handle:
            lines = handle.readlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        source = _unescape_mount_field(fields[0])
        if fields[2].startswith("fuse") and os.path.abspath(source) == wanted:
            found.append(_unescape_mount_field(fields[1]))
    return found


def refuse_if_mounted(backing: Path, tool: str) -> None:
    where = mountpoints_of(backing)
    if where:
        raise VolumeMounted(
            f"{backing} is mounted at {where[0]}: {tool} works on an unmounted volume"
            f" (kmsfs umount {where[0]} first)"
        )


# -- birth time --------------------------------------------------------------

_STATX_BTIME = 0x800
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_FDCWD = -100
_libc: Any = None


def birth_time(path: Path) -> float | None:
    """The inode's birth time (statx btime) in seconds, or None if unavailable.

    A file key is created with its backing inode (by create, rekey and import,
    which all make new inodes), so the birth time is the age of the file key.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if not hasattr(_libc, "statx"):
            _libc = False
    if _libc is False:
        return None
    buf = ctypes.create_string_buffer(256)
    rc = _libc.statx(_AT_FDCWD, os.fsencode(str(path)), _AT_SYMLINK_NOFOLLOW, _STATX_BTIME, buf)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    mask = int.from_bytes(buf.raw[0:4], "little")
    if not mask & _STATX_BTIME:
        return None
    seconds = int.from_bytes(buf.raw[80:88], "little", signed=True)
    nanos = int.from_bytes(buf.raw[88:92], "little")
    return seconds + nanos / 1e9


# -- durations ---------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31557600}


def parse_duration(text: str) -> float:
    """'90d', '12h', '2w', '1y', '30m', '45s' (or plain seconds) -> seconds."""
    text = text.strip().lower()
    try:
        if text and text[-1] in _UNITS:
            value = float(text[:-1]) * _UNITS[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise UsageError(f"duration {text!r}: want a number with s, m, h, d, w or y") from None
    if value < 0:
        raise UsageError(f"duration {text!r} is negative")
    return value


# -- progress ----------------------------------------------------------------


class Progress:
    """A one-line progress bar (files, rate, ETA) on a terminal; silent otherwise.

    Attributes: label, total, done, started.
    """

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._shown = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._shown >= 0.1 or self.done >= self.total:
            self._shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        total = max(self.total, self.done)
        fraction = self.done / total if total else 1.0
        width = 24
        filled = int(width * fraction)
        eta = (total - self.done) / rate if rate > 0 else 0.0
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{total}"
            f" {fraction * 100:3.0f}% {rate:,.0f} files/s ETA {_clock(eta)} "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
