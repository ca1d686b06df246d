"""The access policy of a mounted volume, read from its config file at mount and on reload.

``systemctl reload kmsfs@NAME`` sends SIGHUP; the daemon calls
``reload_policy(config_path, current)`` (in a worker thread: it reads a file
and resolves user and group names, which may ask LDAP) and serves the policy
it returns.  Only ``[policy]`` is applied: other settings take effect at the
next mount.
"""

from __future__ import annotations

import logging
import os

from kmsfs.errors import ConfigError
from kmsfs.policy import Policy
from kmsfs.server.config import load_server_config

log = logging.getLogger(__name__)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """The policy of the config file *path*: its ``[policy]``, or permit-all if it has none.

    Raises ConfigError (file, rule number and problem) like ``load_server_config``.
    """
    config = load_server_config(path)
    return config.policy or Policy.permit_all(str(path))


def reload_policy(path: str | os.PathLike[str], current: Policy) -> Policy:
    """Re-read *path*: its policy, or *current* (logged as an error) if the file is refused."""
    try:
        policy = load_policy(path)
    except ConfigError as exc:
        log.error("policy not reloaded, keeping the current one (%s): %s", current.summary(), exc)
        return current
    log.info("policy reloaded from %s: %s", path, policy.summary())
    return policy
