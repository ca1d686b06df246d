"""Which extended attributes the mount stores, shows and refuses, as ext4 does (no FUSE).

- ``user.*``: stored on the backing file, for everyone the permission bits allow;
  ``user.kmsfs*`` (the header) is hidden and refused.
- ``system.posix_acl_access`` / ``system.posix_acl_default``: stored on the
  backing file, where the backing filesystem applies default-ACL inheritance to
  new files; the kernel caches and enforces them (FUSE_POSIX_ACL with
  ``default_permissions``).
- ``trusted.*``: stored, but only for a requester with CAP_SYS_ADMIN in the initial
  user namespace (``is_host_admin``); others, root of a user namespace included,
  neither see nor set them (ext4: ENODATA when reading, EPERM when setting).
- ``security.*`` and other ``system.*``: not stored (a security label set here
  would be enforced by no LSM on this mount); reading gives ENODATA without a
  syscall (``ls -l`` and every write ask for some), setting EOPNOTSUPP.
"""

from __future__ import annotations

import enum
import errno
import functools
import os

from kmsfs.format.header import RESERVED_XATTR_PREFIX

ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_RESERVED = RESERVED_XATTR_PREFIX.encode()
CAP_SYS_ADMIN = 21
# the inode number of the initial user namespace (include/linux/proc_ns.h, since 3.8)
PROC_USER_INIT_INO = 0xEFFFFFFD


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


def is_host_admin(pid: int) -> bool:
    """True if process *pid* may use ``trusted.*``: CAP_SYS_ADMIN in its effective set
    *and* it lives in the initial user namespace, which is what the kernel's
    ``capable(CAP_SYS_ADMIN)`` asks of ext4's callers.  Root of a user namespace (any
    local user can make one: ``unshare -Ur``) has every capability in its effective
    set, but only over its own namespace.  False if the process is gone.
    """
    return has_capability(pid, CAP_SYS_ADMIN) and in_initial_user_namespace(pid)


def in_initial_user_namespace(pid: int) -> bool:
    """True if *pid*'s user namespace (``/proc/PID/ns/user``) is the initial one: pid 1's
    (read once), or the kernel's fixed inode number for it if pid 1's cannot be read.

    Reading another process's namespace link is a ptrace-mode check: a daemon with
    fewer capabilities than the requester (the systemd unit's bounding set, against a
    root shell) is refused it.  Then the requester's ``uid_map`` (readable by all)
    decides: the whole identity map is the initial namespace's, and writing it for a
    new namespace takes CAP_SETUID over the parent one, so only host root can make a
    namespace (or a chain of them) that shows it; an unprivileged user's maps one uid.
    """
    try:
        st = os.stat(f"/proc/{pid}/ns/user")
    except PermissionError:
        return _identity_mapped(pid)
    except OSError:
        return False
    initial = _initial_user_ns()
    if initial is None:  # pid 1's link is not ours to read (as under some VM inits)
        return st.st_ino == PROC_USER_INIT_INO
    return (st.st_dev, st.st_ino) == initial


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


def _identity_mapped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/uid_map") as handle:
            return handle.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


@functools.cache
def _initial_user_ns() -> tuple[int, int] | None:
    """pid 1's user namespace, (device, inode), read once (it never changes); None if
    that link cannot be read."""
    try:
        st = os.stat("/proc/1/ns/user")
    except OSError:
        return None
    return st.st_dev, st.st_ino
