"""The host pin store: what this host remembers of each volume it opened.

The pin is **host state**, never volume state: whoever writes the backing
directory cannot change it (docs/FORMAT.md, "Host pin").  One file per backing
path, in a directory only the user running kmsfs can reach:

- root: ``/var/lib/kmsfs/pins/`` (directory 0700, files 0600, owned by root);
- other users: ``$XDG_STATE_HOME/kmsfs/pins`` or ``~/.local/state/kmsfs/pins``;
- ``KMSFS_STATE_DIR`` replaces the base directory (``$KMSFS_STATE_DIR/pins``).

A pin file is named by the SHA-256 of the backing directory's real path and
holds JSON::

    {"kmsfs_pin": 1, "backing": "/srv/enc", "volume_id": "<32 hex>", "format": 3,
     "fingerprint": "<32 hex>", "generation": 7, "pinned_at": "<ISO 8601>",
     "pinned_by": "init" | "first use" | "expected fingerprint" | "re-pin",
     "updated_at": "<ISO 8601>", "updated_by": "..."}

The fingerprint is FP(V) (kmsfs/format/volume_key.py), never the volume key.
Files are opened relative to the directory's descriptor with ``O_NOFOLLOW``,
written with ``replace_durably``, and read only if the directory and the file
belong to the user running kmsfs and nobody else may read or write them (the
message names the ``chown``/``chmod`` to run).  Updates hold an exclusive
``flock`` on the directory, so two processes of this host never interleave one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kmsfs.backing.durable import replace_durably
from kmsfs.errors import ConfigError
from kmsfs.format.header import ID_SIZE
from kmsfs.format.volume_config import NAMES_VERSION
from kmsfs.format.volume_key import FINGERPRINT_SIZE, MAX_GENERATION, show_fingerprint

ROOT_STATE_DIR = Path("/var/lib/kmsfs")
STATE_ENV = "KMSFS_STATE_DIR"
PIN_VERSION = 1
MAX_PIN_SIZE = 1 << 16
PINNED_BY = ("init", "first use", "expected fingerprint", "re-pin")


def state_dir() -> Path:
    """The base directory of this host's kmsfs state (see the module docstring)."""
    chosen = os.environ.get(STATE_ENV)
    if chosen:
        return Path(chosen)
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "kmsfs"


def pins_dir() -> Path:
    return state_dir() / "pins"


def backing_key(backing: str | os.PathLike[str]) -> str:
    """The path a pin is kept under: the backing directory's real path."""
    return os.path.realpath(backing)


def pin_file_name(backing: str | os.PathLike[str]) -> str:
    return hashlib.sha256(backing_key(backing).encode()).hexdigest() + ".json"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Pin:
    """What this host remembers of the volume at one backing path.

    Attributes: backing (real path), volume_id, format (config format),
    fingerprint (FP of the volume key), generation (the config's; 0 for
    format 2), pinned_at / pinned_by (when and how it was first pinned or
    re-pinned: ``PINNED_BY``), updated_at / updated_by (the last change since:
    a newer generation, a rotation followed, a write by this host).
    """

    backing: str
    volume_id: bytes
    format: int
    fingerprint: bytes
    generation: int
    pinned_at: str
    pinned_by: str
    updated_at: str = ""
    updated_by: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            kmsfs_pin=PIN_VERSION,
            volume_id=self.volume_id.hex(),
            fingerprint=self.fingerprint.hex(),
        )
        return data

    def shown(self) -> dict[str, Any]:
        """``to_json`` with the fingerprint as people read it (``kmsfs pin show``, inspect)."""
        return {**self.to_json(), "fingerprint": show_fingerprint(self.fingerprint)}

    def updated(self, by: str, **changes: Any) -> Pin:
        """This pin with *changes*, stamped as updated now *by* what."""
        return replace(self, **changes, updated_at=now(), updated_by=by)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Pin:
        """Parse a pin file's JSON; ConfigError naming the file and the field."""
        fields = {*cls.__dataclass_fields__, "kmsfs_pin"}
        if not isinstance(data, dict) or set(data) != fields:
            raise ConfigError(f"{where}: not a kmsfs pin (want the fields {', '.join(fields)})")
        if data["kmsfs_pin"] != PIN_VERSION:
            raise ConfigError(f"{where}: pin version {data['kmsfs_pin']!r}, want {PIN_VERSION}")
        texts = ("backing", "volume_id", "fingerprint", "pinned_at", "updated_at", "updated_by")
        for name in texts:
            if not isinstance(data[name], str):
                raise ConfigError(f"{where}: {name} must be a string")
        numbers = (("format", 2, NAMES_VERSION), ("generation", 0, MAX_GENERATION))
        for name, low, high in numbers:
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{where}: {name} must be an integer {low}..{high}")
        if data["pinned_by"] not in PINNED_BY:
            raise ConfigError(f"{where}: pinned_by {data['pinned_by']!r} is not one of {PINNED_BY}")
        try:
            volume_id = bytes.fromhex(data["volume_id"])
            value = bytes.fromhex(data["fingerprint"])
        except ValueError:
            volume_id = value = b""
        if len(volume_id) != ID_SIZE or len(value) != FINGERPRINT_SIZE:
            raise ConfigError(f"{where}: volume_id and fingerprint must be 32 hex digits")
        return cls(
            data["backing"],
            volume_id,
            data["format"],
            value,
            data["generation"],
            data["pinned_at"],
            data["pinned_by"],
            data["updated_at"],
            data["updated_by"],
        )


def _check_private(fd: int, path: Path, kind: str) -> None:
    """ConfigError unless *fd* belongs to the user running kmsfs and nobody else may use it."""
    st = os.fstat(fd)
    me = os.geteuid()
    if st.st_uid != me:
        raise ConfigError(
            f"the pin {kind} {path} belongs to uid {st.st_uid}, not to uid {me} that runs kmsfs:"
            f" a pin decides which volume config this host accepts (run chown {me}: {path})"
        )
    if st.st_mode & 0o077:
        want = "700" if kind == "directory" else "600"
        raise ConfigError(
            f"the pin {kind} {path} is open to group or others (mode"
            f" {stat.S_IMODE(st.st_mode):o}): run chmod {want} {path}"
        )


def _open_dir(create: bool) -> int | None:
    """The pins directory, opened (O_NOFOLLOW) and checked; None if absent and not *create*."""
    path = pins_dir()
    if create:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the pin directory {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot open the pin directory {path}: {exc.strerror}") from None
    try:
        _check_private(fd, path, "directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(dir_fd: int, backing: str | os.PathLike[str]) -> Pin | None:
    name = pin_file_name(backing)
    path = pins_dir() / name
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the pin {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"the pin {path} is not a regular file")
        _check_private(fd, path, "file")
        raw = handle.read(MAX_PIN_SIZE + 1)
    repin = f"replace it with 'kmsfs pin set {backing_key(backing)}'"
    try:
        pin = Pin.from_json(json.loads(raw.decode()), str(path))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ConfigError(f"the pin {path} is damaged (not JSON): {repin}") from None
    if pin.backing != backing_key(backing):
        raise ConfigError(f"the pin {path} is for {pin.backing}, not {backing_key(backing)}")
    return pin


def read_pin(backing: str | os.PathLike[str]) -> Pin | None:
    """This host's pin of the volume at *backing*, or None.  ConfigError if the store
    or the pin fails its owner, mode or form checks."""
    dir_fd = _open_dir(create=False)
    if dir_fd is None:
        return None
    try:
        return _read(dir_fd, backing)
    finally:
        os.close(dir_fd)


PinWriter = Callable[["Pin"], None]


@contextmanager
def pin_store(backing: str | os.PathLike[str]) -> Iterator[tuple[Pin | None, PinWriter]]:
    """Hold this host's pin store locked: yields (the current pin of *backing*, a
    function that writes a new one).  ConfigError as ``read_pin``, and if the
    store cannot be created or written."""
    dir_fd = _open_dir(create=True)
    assert dir_fd is not None
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)

        def write(pin: Pin) -> None:
            data = (json.dumps(pin.to_json(), indent=2, sort_keys=True) + "\n").encode()
            try:
                replace_durably(dir_fd, pin_file_name(backing), data, 0o600)
            except OSError as exc:
                raise ConfigError(
                    f"cannot write the pin of {pin.backing} in {pins_dir()}: {exc.strerror}"
                ) from None

        yield _read(dir_fd, backing), write
    finally:
        os.close(dir_fd)
