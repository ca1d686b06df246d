"""The parts an operations object serves a volume with, and how a daemon builds them."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from kmsfs.backing.content_file import KeyUsageTable
from kmsfs.backing.encrypted_names import names_for
from kmsfs.backing.inode_room import HeaderRoom, header_room
from kmsfs.backing.names import Names, PlainNames
from kmsfs.backing.shared import DEFAULT_LOCK_TIMEOUT
from kmsfs.format.volume_config import VolumeConfig
from kmsfs.fs.access_events import AccessSink
from kmsfs.fs.inodes import O_PATH_FLAGS, InodeTable
from kmsfs.keys.keyring import Keyring
from kmsfs.policy import Policy
from kmsfs.policy.identity import IdentityCache

OFFLOAD_BYTES = 128 * 1024 + 1  # reads up to the readahead window run inline (DESIGN.md)
DEFAULT_TIMEOUT = 60.0
REQUEST_TASKS = 64  # requests the daemon handles at once (pyfuse3's tasks)


@dataclass
class ServedVolume:
    """The parts an operations object serves with, built by ``open_served_volume`` (or a test).

    Attributes: backing (absolute path), config, keyring, inodes (the inode
    table over the backing root's descriptor), key_usage (block encryptions
    per file key), io_limiter (threads for large I/O and fsync), key_limiter
    (threads for provider calls: a KMS outage must not stall other files'
    I/O), timeout (entry and attribute seconds), offload_bytes (reads and
    writes at least this large run in a thread), on_access (the audit log's
    sink for every open and create, or None), policy (the access policy;
    permit-all without one), identities (requester identities for it),
    on_policy (the audit log's sink for policy decisions marked for audit),
    shared (other daemons serve the volume too: docs/DESIGN.md "Shared storage"),
    lock_timeout (shared mode: seconds a request waits for another daemon's lock),
    names (the volume's names, plain or encrypted: kmsfs/backing/names.py),
    header_room (whether new files' headers fit in the backing inodes:
    kmsfs/backing/inode_room.py).
    """

    backing: str
    config: VolumeConfig
    keyring: Keyring
    inodes: InodeTable
    key_usage: KeyUsageTable
    io_limiter: trio.CapacityLimiter
    key_limiter: trio.CapacityLimiter
    timeout: float = DEFAULT_TIMEOUT
    offload_bytes: int = OFFLOAD_BYTES
    on_access: AccessSink | None = None
    policy: Policy = field(default_factory=Policy.permit_all)
    identities: IdentityCache = field(default_factory=IdentityCache)
    on_policy: Callable[[dict[str, Any]], None] | None = None
    shared: bool = False
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    names: Names = field(default_factory=PlainNames)
    header_room: HeaderRoom = field(default_factory=HeaderRoom)


def open_served_volume(
    backing: str,
    config: VolumeConfig,
    keyring: Keyring,
    timeout: float = DEFAULT_TIMEOUT,
    on_access: AccessSink | None = None,
    policy: Policy | None = None,
    on_policy: Callable[[dict[str, Any]], None] | None = None,
    shared: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> ServedVolume:
    """The parts for *backing*: its root descriptor, an inode table sized to the descriptor
    limit (a quarter of it, at most 2,048, stays free for open files), fresh limiters.
    *shared*: other daemons serve the volume too; a request waits at most
    *lock_timeout* seconds for another daemon's byte-range lock (kmsfs/fs/lockwait.py).
    A volume with encrypted names gets its names from the name secret, which the
    keyring's volume key unseals (ConfigTampered if it does not).  The backing
    root's room for headers in the inode is measured here, once."""
    backing = os.path.abspath(backing)
    names = names_for(config.names, keyring.volume_key, config.volume_id)
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    inodes = InodeTable(
        os.open(backing, O_PATH_FLAGS | os.O_DIRECTORY),
        high_water=fd_limit - min(fd_limit // 4, 2048) if fd_limit > 0 else 1 << 30,
    )
    return ServedVolume(
        backing,
        config,
        keyring,
        inodes,
        KeyUsageTable(),
        io_limiter=trio.CapacityLimiter(4),
        key_limiter=trio.CapacityLimiter(8),
        timeout=timeout,
        on_access=on_access,
        policy=policy or Policy.permit_all(),
        on_policy=on_policy,
        shared=shared,
        lock_timeout=lock_timeout,
        names=names,
        header_room=HeaderRoom(header_room(inodes.root_fd)),
    )
