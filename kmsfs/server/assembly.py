"""The assembly line of a mount: from a MountSpec to a served volume, in one place.

``serve_mount(spec, on_ready)`` builds every part once, with what it needs,
in this order, and nothing is rewired afterwards:

1. the process settings were made by kmsfs/server/launch.py, which runs this
   (``prepare_process``: no core dumps, memory locked, descriptor limit raised,
   before any secret is read);
2. the volume lock (``claim_volume``; shared mode checks the backing
   filesystem first): "in use" is said before any passphrase is asked, and a
   format-1 config is migrated only by the process that will serve the volume;
3. the sinks: the audit log (``--audit-log``) and the provider statistics,
   both fed by one key-event sink;
4. the volume (``open_volume``): keys checked, config authenticated, pinned,
   migrated unless mounted read-only; the keyring reports to that sink;
   a volume with encrypted names refused on a case-folding directory;
5. the operations (kmsfs/fs/), given the audit log for opens, creates and
   policy decisions; the runtime (status socket, metrics, lock recheck,
   systemd) with the claim, the statistics and the policy reloader;
6. the FUSE session (``daemon.serve``) until unmounted.

Whatever happens, what was built is closed in the reverse order.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from kmsfs.audit import AuditLog
from kmsfs.backing.names import check_not_casefolded
from kmsfs.backing.shared import DEFAULT_LOCK_TIMEOUT, check_shared_support
from kmsfs.backing.volume_lock import claim_volume
from kmsfs.fs.operations import DEFAULT_TIMEOUT, KmsfsOperations, open_served_volume
from kmsfs.keys.cache import KeyCache
from kmsfs.server import daemon
from kmsfs.server.policyfile import PolicyReloader
from kmsfs.server.rekey_job import RekeyService
from kmsfs.server.runtime import ServerRuntime
from kmsfs.server.spec import MountSpec
from kmsfs.server.stats import ProviderStats
from kmsfs.volume_open import open_volume


def serve_mount(spec: MountSpec, on_ready: Callable[[], None] | None) -> None:
    """Build the mount *spec* describes and serve it until unmounted (blocks); call it
    once per process, after ``launch.prepare_process``.

    Raises MountError (the volume is in use, mounting fails, the policy refuses
    the readiness check), ConfigError (an audit log refused, a backing
    filesystem unfit for shared mode) and the errors of ``open_volume``
    (ConfigError, ConfigTampered, PinMismatch, ProviderError...); nothing is
    mounted then.
    """
    shared = spec.shared
    with ExitStack() as built:
        if shared is not None:
            check_shared_support(spec.backing)
        claim = claim_volume(spec.backing, spec.mountpoint, shared is not None)
        built.callback(claim.close)
        audit = AuditLog(spec.audit_log) if spec.audit_log else None
        if audit is not None:
            built.callback(audit.close)
        stats = ProviderStats()
        config, keyring = open_volume(
            spec.backing,
            spec.key_options,
            spec.prompt,
            KeyCache(spec.cache_max_entries, spec.cache_max_age),
            stats.chain(audit),
            migrate=not spec.read_only,
        )
        built.callback(keyring.close)
        if config.encrypted_names:
            check_not_casefolded(spec.backing)
        parts = open_served_volume(
            spec.backing,
            config,
            keyring,
            DEFAULT_TIMEOUT if shared is None else shared.timeout,
            on_access=audit,
            policy=spec.policy,
            on_policy=audit.write if audit is not None else None,
            shared=shared is not None,
            lock_timeout=DEFAULT_LOCK_TIMEOUT if shared is None else shared.lock_timeout,
        )
        ops = KmsfsOperations(parts)
        built.callback(ops.close)
        reloader = PolicyReloader(spec.config_file) if spec.config_file else None
        rekey = RekeyService(read_only=spec.read_only, auto=spec.auto_rekey)
        runtime = ServerRuntime(spec.mountpoint, stats, spec.metrics_listen, claim, reloader, rekey)
        daemon.serve(spec, ops, on_ready, services=[runtime.run], reloader=reloader)
