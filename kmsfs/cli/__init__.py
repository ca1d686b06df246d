"""The ``kmsfs`` command line: one module per command group, shared pieces in ``common``.

Errors are one line on stderr and a documented exit code: 0 success, 1 other
failure, 2 usage, 3 config, 4 format, 5 integrity (and fsck problems), 6 key
provider (wrong key, denied, unavailable), 7 mount, 8 the volume config is not
what this host pinned.
"""

from __future__ import annotations

import click

from kmsfs.cli import keys, mount, pin, policy, rekey, tools, volume
from kmsfs.cli.mounthelper import MountHelperGroup


@click.group(cls=MountHelperGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kmsfs")
def main() -> None:
    """kmsfs: a FUSE filesystem that encrypts a directory with KMS- or HSM-wrapped keys."""


for _command in (
    volume.init,
    mount.mount,
    mount.umount,
    volume.inspect,
    volume.decrypt,
    volume.path,
    mount.status,
    keys.rewrap,
    keys.keys,
    keys.passwd,
    tools.fsck,
    rekey.rekey,
    tools.import_,
    tools.headers,
    policy.policy,
    pin.pin,
):
    main.add_command(_command)
