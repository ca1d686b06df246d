"""The access policy of a mounted volume, read from its config file at mount and on reload.

``systemctl reload kmsfs@NAME`` runs ``kmsfs policy reload``, which asks the
daemon over its control socket and waits for the verdict; SIGHUP does the same
without a verdict.  Both call ``PolicyReloader.reload(ops)``, which re-reads
the file in a worker thread (it resolves user and group names, which may ask
LDAP, and stats the programs the rules name) and swaps in the policy it
returns, or keeps the current one and says why.  Only ``[policy]`` is
applied: other settings take effect at the next mount.

A file without ``[policy]`` is refused while a ``[policy]`` that applies rules
is in force: deleting the table by mistake (or a config management template
that lost it) would otherwise permit every request.  To switch the policy off
on purpose, write ``[policy]`` with ``mode = "off"``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from kmsfs.errors import ConfigError
from kmsfs.policy import Policy
from kmsfs.server.config import load_server_config

if TYPE_CHECKING:
    from kmsfs.fs.operations import KmsfsOperations

log = logging.getLogger(__name__)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """The policy of the config file *path*: its ``[policy]``, or permit-all if it has none.

    Raises ConfigError (file, rule number and problem) like ``load_server_config``.
    """
    config = load_server_config(path)
    return config.policy or Policy.permit_all(str(path))


def next_policy(path: str | os.PathLike[str], current: Policy) -> Policy:
    """The policy *path* holds now, to replace *current*; ConfigError if it is refused.

    Refused: a file ``load_server_config`` refuses, and a file without
    ``[policy]`` while *current* applies rules (module docstring).  The new
    policy keeps accepting the program files *current* accepted (programs.py).
    """
    policy = load_policy(path)
    if not policy.from_table and current.from_table and current.mode != "off":
        raise ConfigError(
            f"{path} has no [policy] table: reloading it would permit every request."
            ' To switch the access policy off, write [policy] with mode = "off"'
        )
    policy.programs.inherit(current.programs)
    return policy


def reload_policy(path: str | os.PathLike[str], current: Policy) -> tuple[Policy, str | None]:
    """Re-read *path*: (its policy, None), or (*current*, why the file was refused); logged."""
    try:
        policy = next_policy(path, current)
    except ConfigError as exc:
        log.error("policy not reloaded, keeping the current one (%s): %s", current.summary(), exc)
        return current, str(exc)
    log.info("policy reloaded from %s: %s", path, policy.summary())
    policy.programs.log_notes()
    return policy, None


class PolicyReloader:
    """Reloads the policy of a mount from its config file, one reload at a time.

    Attributes: path (the config file, absolute), reloads (reloads done),
    refused (reloads refused).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.reloads = 0
        self.refused = 0
        self._lock = trio.Lock()

    async def reload(self, ops: KmsfsOperations) -> str | None:
        """Read the file again and serve its policy; the reason if refused, else None.

        Concurrent reloads (SIGHUP and ``kmsfs policy reload``) run one after the
        other, so the file read last is the one served.
        """
        async with self._lock:
            current = ops.access_control.policy
            policy, refused = await trio.to_thread.run_sync(reload_policy, self.path, current)
            ops.access_control.set_policy(policy)
            if refused is None:
                self.reloads += 1
            else:
                self.refused += 1
            return refused
