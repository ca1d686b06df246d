"""pyfuse3 operations: the thin layer that maps FUSE requests onto the backing tree.

This is the only place an errno is chosen.  Lower layers raise OSError (passed
through with its errno) or kmsfs domain errors, which are logged with the file
and cause and answered with EIO (integrity, format, wrong key, provider
outage) or EACCES (the key provider refused access).

Names reach the backing directory through the volume's ``Names``
(kmsfs/backing/names.py): encrypted (names, symlink targets, user/trusted
xattrs) or plain, where names at the root starting with ``.kmsfs`` (the volume
config and state) are invisible and cannot be created.  ``user.kmsfs*`` xattrs
are hidden and refused in both.

The handlers are split by concern, each module a layer over the one before:
ops_base (errno mapping, the handler wrapper, helpers), ops_access (policy and
audit), ops_namespace (lookup, attributes, directories), ops_files (content and
xattrs); served.py builds the parts they serve with.
"""

from __future__ import annotations

from kmsfs.fs.ops_base import errno_for
from kmsfs.fs.ops_files import FileOps
from kmsfs.fs.served import DEFAULT_TIMEOUT, OFFLOAD_BYTES, ServedVolume, open_served_volume

__all__ = [
    "DEFAULT_TIMEOUT",
    "OFFLOAD_BYTES",
    "KmsfsOperations",
    "ServedVolume",
    "errno_for",
    "open_served_volume",
]


class KmsfsOperations(FileOps):
    """Serves one volume with the parts it is given (``ServedVolume``).

    Attributes: backing (path), config, keyring, inodes, key_usage, timeout,
    offload_bytes, on_access, and the counters errors, bytes_read, bytes_written
    and requests (per FUSE opcode, ``kmsfs.fs.requests``).
    """
