"""The mount spec: everything ``kmsfs mount`` decided, typed and frozen, for the server.

``kmsfs/cli/mountspec.py`` builds it from the command line and the config file
(the command line wins); ``kmsfs/server/launch.py`` checks it and starts the
process; ``kmsfs/server/assembly.py`` builds the mount from it.  Nothing is
added to it or changed in it on the way.

The ranges of the shared-mode timeouts are here, once, for the command line
(``-o shared_timeout=S``) and the config file (``shared_timeout = S``) alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kmsfs.backing.shared import DEFAULT_LOCK_TIMEOUT, DEFAULT_SHARED_TIMEOUT
from kmsfs.keys.cache import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES
from kmsfs.keys.settings import HostOptions

if TYPE_CHECKING:
    from kmsfs.keys.secrets import Prompt
    from kmsfs.policy import Policy

# seconds: (lowest, highest) accepted
SHARED_SECONDS = {"shared_timeout": (0.0, 60.0), "shared_lock_timeout": (0.1, 600.0)}


def seconds_range_problem(name: str, value: float) -> str | None:
    """Why *value* is not accepted for the shared-mode timeout *name* ('give seconds from
    0 to 60'), or None if it is."""
    low, high = SHARED_SECONDS[name]
    if low <= value <= high:
        return None
    return f"give seconds from {low:g} to {high:g}"


@dataclass(frozen=True)
class SharedMode:
    """Shared mode: other daemons may serve the volume at once (docs/DESIGN.md "Shared
    storage").  Attributes: timeout (entry and attribute seconds), lock_timeout
    (seconds a request waits for another daemon's byte-range lock before it fails
    with EIO)."""

    timeout: float = DEFAULT_SHARED_TIMEOUT
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT


@dataclass(frozen=True)
class MountSpec:
    """One mount, as decided.

    Attributes: backing and mountpoint (absolute), fuse_options (passed to FUSE:
    the config file's, then the command line's, without kmsfs's own), shared
    (the shared-mode settings, or None: this daemon alone serves the volume),
    key_options (this host's provider settings and control flags), prompt (asks
    for a passphrase or PIN, or None), cache_max_entries and cache_max_age (the
    unwrapped-key cache), audit_log (absolute, or None: no audit log),
    metrics_listen (``HOST:PORT`` or None), log_level, log_file (None: stderr),
    policy (the config file's access policy, or None: permit all), config_file
    (absolute: re-read for the policy on reload, after the daemon has left the
    working directory; None without one), auto_rekey (``-o auto_rekey``: a format-1
    file whose key reaches the usage warning is re-keyed online).
    """

    backing: str
    mountpoint: str
    fuse_options: tuple[str, ...] = ()
    shared: SharedMode | None = None
    key_options: HostOptions = field(default_factory=HostOptions)
    prompt: Prompt | None = None
    cache_max_entries: int = DEFAULT_MAX_ENTRIES
    cache_max_age: float = DEFAULT_MAX_AGE
    audit_log: str | None = None
    metrics_listen: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    policy: Policy | None = None
    config_file: str | None = None
    auto_rekey: bool = False

    @property
    def read_only(self) -> bool:
        """Mounted ``-o ro``: nothing is written, not even a config migration."""
        return "ro" in self.fuse_options

    @property
    def allow_nonempty(self) -> bool:
        """``-o nonempty``: mount over a directory that has entries."""
        return "nonempty" in self.fuse_options
