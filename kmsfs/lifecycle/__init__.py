"""Key lifecycle tools on a backing directory: rewrap, rekey, keys, fsck, import, headers.

Offline code (no FUSE, no trio): it builds on the format layer, the key
providers and ``ContentFile`` only.  Long-running tools keep a journal in the
volume's reserved ``.kmsfs.d/`` directory so that a second run resumes them.
They run as root over a tree its users control, so they walk and open it by
descriptor and never follow a symlink in it (``kmsfs.backing.tree``), and they ask
the volume lock (``kmsfs.backing.volume_lock``) whether a daemon serves the volume.
"""
