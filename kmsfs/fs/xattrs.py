"""Which extended attributes the mount stores, shows and refuses, as ext4 does (no FUSE).

- ``user.*``: stored on the backing file, for everyone the permission bits allow;
  ``user.kmsfs*`` (the header) is hidden and refused.
- ``system.posix_acl_access`` / ``system.posix_acl_default``: stored on the
  backing file, where the backing filesystem applies default-ACL inheritance to
  new files; the kernel caches and enforces them (FUSE_POSIX_ACL with
  ``default_permissions``).
- ``trusted.*``: stored, but only for a requester with CAP_SYS_ADMIN; others
  neither see nor set them (ext4: ENODATA when reading, EPERM when setting).
- ``security.*`` and other ``system.*``: not stored (a security label set here
  would be enforced by no LSM on this mount); reading gives ENODATA without a
  syscall (``ls -l`` and every write ask for some), setting EOPNOTSUPP.
"""

from __future__ import annotations

import enum
import errno
import os

from kmsfs.format.header import RESERVED_XATTR_PREFIX

ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_RESERVED = RESERVED_XATTR_PREFIX.encode()
CAP_SYS_ADMIN = 21


class Namespace(enum.Enum):
    RESERVED = "reserved"  # kmsfs's own: hidden, refused
    STORED = "stored"  # user.* and the POSIX ACLs
    PRIVILEGED = "privileged"  # trusted.*: CAP_SYS_ADMIN only
    UNSUPPORTED = "unsupported"  # security.*, other system.*


def namespace_of(name: bytes) -> Namespace:
    if name.startswith(_RESERVED):
        return Namespace.RESERVED
    if name.startswith(b"user.") or name in ACL_NAMES:
        return Namespace.STORED
    if name.startswith(b"trusted."):
        return Namespace.PRIVILEGED
    return Namespace.UNSUPPORTED


def has_default_acl(path: str) -> bool:
    """True if directory *path* has a default ACL; False if not, or if its filesystem has
    no ACLs.  OSError for anything else (the directory is gone, ...)."""
    try:
        os.getxattr(path, ACL_NAMES[1])
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return False
        raise
    return True


def has_capability(pid: int, capability: int) -> bool:
    """True if process *pid* has *capability* in its effective set (False if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> capability & 1)
    except (OSError, ValueError):
        return False
    return False
