"""What a mount runs beside the FUSE loop: status socket, metrics, systemd notifications,
and the recheck of the volume lock.

``ServerRuntime.run(ops)`` is handed to ``kmsfs.server.daemon.serve`` as a service
(kmsfs/server/assembly.py builds both): it starts with the FUSE loop and is
cancelled when the loop ends (unmount or signal).  On the way out it sends
``STOPPING=1`` and removes its socket.  A failure to start the status socket or
the metrics endpoint is logged and the mount keeps serving: observability must
never take data offline.  The one exception is a metrics address that cannot be
used at all, which ``kmsfs.server.launch.preflight`` reports before mounting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from kmsfs.backing.volume_lock import RECHECK_INTERVAL
from kmsfs.errors import ConfigError
from kmsfs.server import notify
from kmsfs.server.rekey_job import RekeyService
from kmsfs.server.stats import ProviderStats, snapshot

if TYPE_CHECKING:
    from kmsfs.backing.volume_lock import VolumeClaim
    from kmsfs.fs.operations import KmsfsOperations
    from kmsfs.server.metrics import MetricsServer
    from kmsfs.server.policyfile import PolicyReloader

log = logging.getLogger("kmsfs.server")


class ServerRuntime:
    """Attributes: mountpoint, metrics_listen (``HOST:PORT`` or None),
    provider_stats (the key-event counters the keyring reports to), claim (the
    volume lock and registration the daemon holds, to recheck; None: not
    watched), reloader (reloads the access policy from the config file; None
    without one), metrics (the running MetricsServer, once started), rekey (the
    online rekey: kmsfs/server/rekey_job.py)."""

    def __init__(
        self,
        mountpoint: str,
        provider_stats: ProviderStats,
        metrics_listen: str | None = None,
        claim: VolumeClaim | None = None,
        reloader: PolicyReloader | None = None,
        rekey: RekeyService | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.metrics_listen = metrics_listen
        self.provider_stats = provider_stats
        self.metrics: MetricsServer | None = None
        self.claim = claim
        self._lock_state = "held"
        self.reloader = reloader
        self.rekey = rekey if rekey is not None else RekeyService()
        self.started = time.time()
        self.started_monotonic = time.monotonic()

    async def run(self, ops: KmsfsOperations) -> None:
        """Serve status and metrics for *ops* until cancelled."""
        token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_status, ops)
                nursery.start_soon(self.rekey.run, ops)
                if self.metrics_listen is not None:
                    await self._start_metrics(ops, token)
                interval = notify.watchdog_interval()
                if interval is not None:
                    nursery.start_soon(self._watchdog, interval)
                if self.claim is not None:
                    nursery.start_soon(self._watch_claim)
                await trio.sleep_forever()  # until the FUSE loop ends and cancels us
        finally:
            with trio.CancelScope(shield=True):
                notify.stopping(f"unmounting {self.mountpoint}")
                if self.metrics is not None:
                    await trio.to_thread.run_sync(self.metrics.close)

    def snapshot(self, ops: KmsfsOperations) -> dict[str, Any]:
        info = snapshot(
            ops, self.provider_stats, self.mountpoint, self.started, self.started_monotonic
        )
        info["metrics_url"] = self.metrics.url if self.metrics is not None else None
        policy = info["policy"]
        reloader = self.reloader
        policy["config_file"] = reloader.path if reloader is not None else None
        policy["reloads"] = reloader.reloads if reloader is not None else 0
        policy["reloads_refused"] = reloader.refused if reloader is not None else 0
        info["volume_lock"] = self._lock_state if self.claim is not None else None
        info["rekey"] = self.rekey.status()
        return info

    async def reload_policy(self, ops: KmsfsOperations) -> dict[str, Any]:
        """The ``reload-policy`` request: reload, and say whether the new policy is served."""
        if self.reloader is None:
            return {"error": "mounted without a config file (--config): no policy to reload"}
        refused = await self.reloader.reload(ops)
        summary = ops.access_control.policy.summary()
        return {"reloaded": refused is None, "refused": refused, "policy": summary}

    def check_claim(self) -> None:
        """Recheck the volume lock and this daemon's registration (``VolumeClaim.recheck``:
        one moved aside is made and taken again, so tools see the mount) and log what
        was wrong as errors, once per change.  A few syscalls on the backing directory,
        run on the loop like the daemon's other metadata calls."""
        if self.claim is None:
            return
        found = self.claim.recheck()
        state = "; ".join(found) if found else "held"
        if found and state != self._lock_state:
            for line in found:
                log.error("%s", line)
        self._lock_state = state

    async def _serve_status(self, ops: KmsfsOperations) -> None:
        from kmsfs.server.status import bind_control_socket, serve_control

        try:
            sock, path = bind_control_socket(self.mountpoint)
        except OSError as exc:
            log.warning("no status socket for %s: %s", self.mountpoint, exc)
            return
        except ConfigError as exc:  # an unsafe runtime directory: not used, said loudly
            log.error("no status socket for %s: %s", self.mountpoint, exc)
            return
        log.debug("status socket %s", path)

        async def answer(request: str) -> dict[str, Any]:
            if request == "status":
                self.check_claim()  # a tool asks: the lock it would look for is back
                return self.snapshot(ops)
            if request == "reload-policy":
                return await self.reload_policy(ops)
            if request.startswith("rekey-"):
                return await self.rekey.request(request)
            return {"error": f"unknown request {request[:40]!r}"}

        try:
            await serve_control(sock, answer)
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    async def _start_metrics(self, ops: KmsfsOperations, token: trio.lowlevel.TrioToken) -> None:
        from kmsfs.server.metrics import start_metrics_server

        assert self.metrics_listen is not None

        def scrape() -> dict[str, Any]:
            return trio.from_thread.run_sync(self.snapshot, ops, trio_token=token)

        try:
            self.metrics = await trio.to_thread.run_sync(
                start_metrics_server, self.metrics_listen, scrape
            )
        except Exception as exc:
            log.error("metrics endpoint %s not started: %s", self.metrics_listen, exc)

    async def _watch_claim(self) -> None:
        while True:
            await trio.sleep(RECHECK_INTERVAL)
            self.check_claim()

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify.notify("WATCHDOG=1")
            await trio.sleep(interval)
