"""Key lifecycle tools on a backing directory: rewrap, rekey, keys, fsck, import, headers.

Offline code (no FUSE, no trio): it builds on the format layer, the key
providers and ``ContentFile`` only.  Long-running tools keep a journal in the
volume's reserved ``.kmsfs.d/`` directory so that a second run resumes them.
"""
