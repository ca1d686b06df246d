"""FUSE-free access to a volume's backing directory.

Tree walking by descriptor, content files, header xattrs, syscalls the standard
library lacks, statx, extended attributes, shared-mode byte-range locks, the volume
lock and daemon registrations, the mount table and durable writes.  The daemon's
pyfuse3 layer (kmsfs.fs) and the offline tools (kmsfs.lifecycle, kmsfs.offline) both
build on it; nothing here imports pyfuse3, trio or a key provider SDK.
"""
