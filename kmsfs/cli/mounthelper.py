"""``mount.fuse.kmsfs``: the helper mount(8) runs for ``-t fuse.kmsfs`` and fstab lines.

mount(8) looks for ``/sbin/mount.<type>`` first, so with this helper installed
as ``/sbin/mount.fuse.kmsfs`` (``scripts/install-systemd`` does it) it is run
instead of fuse3's generic ``mount.fuse3``, as::

    mount.fuse.kmsfs SOURCE MOUNTPOINT [-s] [-f] [-n] [-v] [-N NS] [-o OPTIONS] [-t fuse.kmsfs]

Without it, mount(8) runs fuse3's ``mount.fuse3``, which runs the program
named after the subtype, ``kmsfs`` (found on ``$PATH``), as ``kmsfs SOURCE
MOUNTPOINT -o OPTIONS``; the ``kmsfs`` command group accepts that form too
(``MountHelperGroup``).  Either way the arguments become ``kmsfs mount SOURCE
MOUNTPOINT --config FILE -o ...``, run in this process: it returns once the
mount answers, as mount(8) expects, leaving the daemon running.

kmsfs options inside ``-o``: ``config=FILE``, ``log_level=LEVEL``,
``log_file=FILE``, ``metrics_listen=HOST:PORT``.  Options meant for mount(8)
or systemd (``defaults``, ``auto``, ``noauto``, ``user``, ``users``,
``nouser``, ``owner``, ``group``, ``_netdev``, ``nofail``, ``x-*``,
``comment=*``, ``rw``) are dropped; the rest (``allow_other``, ``ro``,
``nonempty``, ``nosuid``, ...) are passed to FUSE.

``main`` is the ``mount.fuse.kmsfs`` entry point; ``MountHelperGroup`` is the
``kmsfs`` command group that takes mount.fuse3's form.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

KMSFS_OPTIONS = {
    "config": "--config",
    "log_level": "--log-level",
    "log_file": "--log-file",
    "metrics_listen": "--metrics-listen",
}
DROPPED = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group"}
DROPPED |= {"_netdev", "nofail", "rw", "loop", "dev", "suid"}  # mount.fuse3 adds dev,suid
USAGE = "usage: mount.fuse.kmsfs BACKING MOUNTPOINT [-o config=FILE,OPTIONS]"


class HelperUsage(Exception):
    pass


def translate(argv: Sequence[str]) -> list[str] | None:
    """The ``kmsfs`` arguments for mount-helper arguments *argv*; None for a fake mount (-f).

    Raises HelperUsage for arguments mount(8) would not pass.
    """
    positional: list[str] = []
    raw_options: list[str] = []
    fake = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-o":
            if not args:
                raise HelperUsage("-o needs a value")
            raw_options.append(args.pop(0))
        elif arg.startswith("-o") and len(arg) > 2:
            raw_options.append(arg[2:])
        elif arg in ("-t", "-N"):
            if not args:
                raise HelperUsage(f"{arg} needs a value")
            args.pop(0)
        elif arg == "-f":
            fake = True
        elif arg in ("-n", "-s", "-v"):
            continue
        elif arg.startswith("-"):
            raise HelperUsage(f"unknown option {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise HelperUsage("need BACKING and MOUNTPOINT")
    source, mountpoint = positional
    if "#" in source:  # legacy "kmsfs#/srv/enc" sources
        source = source.split("#", 1)[1]

    command = ["mount", source, mountpoint]
    fuse_options: list[str] = []
    for chunk in raw_options:
        for option in chunk.split(","):
            option = option.strip()
            name, _, value = option.partition("=")
            if not option or option in DROPPED or option.startswith(("x-", "comment=")):
                continue
            if name in KMSFS_OPTIONS:
                if not value:
                    raise HelperUsage(f"option {name} needs a value ({name}=...)")
                command += [KMSFS_OPTIONS[name], value]
            else:
                fuse_options.append(option)
    if fuse_options:
        command += ["-o", ",".join(fuse_options)]
    return None if fake else command


class MountHelperGroup(click.Group):
    """The ``kmsfs`` group; also takes mount.fuse3's ``kmsfs SOURCE MOUNTPOINT -o OPTS``.

    A first argument that is a path (has a ``/``; command names never do) is
    read as a mount source: the arguments are translated as for
    ``mount.fuse.kmsfs``.  A mistyped command name stays "No such command".
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = args[0] if args else ""
        if len(args) >= 2 and "/" in first and first not in self.commands:
            try:
                command = translate(args)
            except HelperUsage as exc:
                raise click.UsageError(f"{exc}\n{USAGE}") from None
            if command is None:
                ctx.exit(0)
            args = command
        result: Any = super().parse_args(ctx, args)
        return list(result)


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
