"""Mount points: whether one can take a mount (``check_mountpoint``), and mount points
left behind by a daemon that died, and how ``kmsfs mount`` recovers them.

A FUSE daemon killed with SIGKILL (or by the OOM killer) leaves its mount in
the kernel: every access fails with ENOTCONN ("Transport endpoint is not
connected").  Nothing can be served there again until it is unmounted, and no
data is lost by unmounting it (the daemon is gone; what it had not written is
gone with it).  ``recover_stale_mount`` detaches such a mount lazily so that a
restart (``Restart=on-failure``, or an operator running ``kmsfs mount``
again) can mount in its place.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess

from kmsfs.errors import MountError

log = logging.getLogger("kmsfs.mountpoint")


def is_stale(mountpoint: str) -> bool:
    """True if *mountpoint* is a mount whose FUSE daemon is gone (ENOTCONN).

    stat() alone is not enough: the kernel may answer it from cached
    attributes of the dead mount's root.  statfs() always asks the daemon.
    """
    for probe in (os.stat, os.statvfs):
        try:
            probe(mountpoint)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return True
            if probe is os.stat:
                return False
    return False


def recover_stale_mount(mountpoint: str) -> bool:
    """Lazily unmount *mountpoint* if it is stale; True if it was.

    Raises MountError, naming the command to run by hand, if it cannot be
    unmounted (for example without the privilege to).
    """
    if not is_stale(mountpoint):
        return False
    log.info("%s is a stale mount left by a daemon that died: detaching it", mountpoint)
    attempts = []
    if shutil.which("fusermount3"):
        attempts.append(["fusermount3", "-u", "-z", mountpoint])
    if os.geteuid() == 0:
        attempts.append(["umount", "-l", mountpoint])
    reasons = []
    for command in attempts:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if not is_stale(mountpoint):
            log.info("detached the stale mount at %s (%s)", mountpoint, " ".join(command))
            return True
        reasons.append(result.stderr.strip() or f"{command[0]} exited {result.returncode}")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise MountError(
        f"{mountpoint} is a stale mount left by a daemon that died and could not be"
        f" detached{why}: run 'fusermount3 -uz {mountpoint}' (or, as root,"
        f" 'umount -l {mountpoint}') and mount again"
    )


def check_mountpoint(mountpoint: str, allow_nonempty: bool = False) -> None:
    """MountError if *mountpoint* cannot take a mount: missing, stale, or not empty."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"{mountpoint} is a stale mount left by a daemon that died:"
                f" run 'kmsfs umount {mountpoint}' (or 'fusermount3 -uz {mountpoint}') first"
            ) from None
        raise MountError(f"mount point {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    from kmsfs.fs.inodes import ROOT_INODE

    if os.path.ismount(mountpoint) and st.st_ino == ROOT_INODE:
        raise MountError(f"{mountpoint} is already a mount point (already mounted?)")
    if not allow_nonempty and os.listdir(mountpoint):
        raise MountError(
            f"mount point {mountpoint} is not empty (its files would be hidden; -o nonempty mounts"
            " anyway)"
        )
