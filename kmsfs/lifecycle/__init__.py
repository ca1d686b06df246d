"""Key lifecycle tools on a backing directory: rewrap, rekey, keys, fsck, import, headers.

Offline code (no FUSE, no trio): it builds on the format layer, the key
providers and ``kmsfs/backing/`` only, never on ``kmsfs/fs/`` (the import test
checks it).  Long-running tools keep a journal in the volume's reserved
``.kmsfs.d/`` directory so that a second run resumes them
(``kmsfs.backing.journals``).  They run as root over a tree its users control,
so they walk and open it by descriptor and never follow a symlink in it
(``kmsfs.backing.tree``), rewrite headers by compare-and-swap
(``kmsfs.backing.header_xattr.replace_header``), and ask the volume lock whether
a daemon serves the volume (``kmsfs.backing.tool_lock``).  ``progress``: the
progress bar.
"""
