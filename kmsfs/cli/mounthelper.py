"""``mount.fuse.kmsfs``: the entry point mount(8) runs (see kmsfs/server/mounthelper.py).

It translates mount(8)'s arguments into ``kmsfs mount ...`` and runs that
command in this process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kmsfs.server.mounthelper import USAGE, HelperUsage, translate


def main(argv: Sequence[str] | None = None) -> None:
    """Exit 2 with the usage on arguments mount(8) would not send; else run ``kmsfs mount``."""
    try:
        command = translate(sys.argv[1:] if argv is None else argv)
    except HelperUsage as exc:
        print(f"mount.fuse.kmsfs: {exc}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    if command is None:
        return
    from kmsfs.cli import main as kmsfs_main

    kmsfs_main(args=command, prog_name="kmsfs")


if __name__ == "__main__":
    main()
