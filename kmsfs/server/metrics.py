"""Prometheus metrics of a running mount (``--metrics-listen HOST:PORT``).

Uses prometheus-client (the ``metrics`` extra), imported only when metrics are
asked for.  The HTTP server runs in prometheus-client's own daemon thread; on
each scrape the collector asks the trio loop for a status snapshot
(``trio.from_thread.run_sync``), so the figures are read on the thread that
owns them and the loop is never blocked for longer than building the snapshot.
No key material or key-provider secret is ever a label or a value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from kmsfs.errors import ConfigError
from kmsfs.server.config import parse_listen_address
from kmsfs.server.stats import PERCENTILES

log = logging.getLogger("kmsfs.metrics")

Snapshot = Callable[[], dict[str, Any]]


class MetricsServer:
    """A running metrics endpoint.  Attributes: host, port (the bound port), url."""

    def __init__(self, server: Any, thread: Any, host: str, port: int) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def check_metrics_listen(listen: str) -> tuple[str, int]:
    """The (host, port) of *listen*; ConfigError if it is malformed or
    prometheus-client is not installed."""
    try:
        address = parse_listen_address(listen)
    except ValueError as exc:
        raise ConfigError(f"--metrics-listen: {exc}") from None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--metrics-listen needs prometheus-client: pip install 'kmsfs[metrics]'"
        ) from None
    return address


def start_metrics_server(listen: str, snapshot: Snapshot) -> MetricsServer:
    """Serve metrics on *listen* (``HOST:PORT``; port 0 picks a free one).

    Raises ConfigError if prometheus-client is missing or the address is bad,
    OSError if it cannot be bound.
    """
    host, port = check_metrics_listen(listen)
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(KmsfsCollector(snapshot))
    started = start_http_server(port, addr=host, registry=registry)
    server, thread = started if started is not None else (None, None)
    bound = server.server_address[1] if server is not None else port
    metrics = MetricsServer(server, thread, host, bound)
    log.info("metrics served at %s", metrics.url)
    return metrics


class KmsfsCollector:
    """A prometheus-client collector built from one status snapshot per scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # no pre-registration checks: the snapshot needs the running loop

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        try:
            info = self._snapshot()
        except Exception as exc:  # the loop is shutting down, or a bug: say so, don't crash
            log.warning("metrics scrape failed: %s", exc)
            up = GaugeMetricFamily("kmsfs_up", "1 if the mount answered the scrape")
            up.add_metric([], 0)
            yield up
            return

        labels = ["volume_id", "mountpoint"]
        ident = [info["volume_id"], info["mountpoint"]]

        def gauge(name: str, doc: str, value: float | None) -> Any:
            family = GaugeMetricFamily(name, doc, labels=labels)
            if value is not None:
                family.add_metric(ident, value)
            return family

        def counter(name: str, doc: str, value: float) -> Any:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(ident, value)
            return family

        yield gauge("kmsfs_up", "1 if the mount answered the scrape", 1)
        yield gauge(
            "kmsfs_uptime_seconds", "Seconds since the mount started", info["uptime_seconds"]
        )
        yield counter("kmsfs_read_bytes", "Plaintext bytes read", info["bytes_read"])
        yield counter("kmsfs_written_bytes", "Plaintext bytes written", info["bytes_written"])
        yield counter("kmsfs_errors", "Requests answered with an error by kmsfs", info["errors"])
        yield gauge("kmsfs_open_files", "Open file handles", info["open_files"])
        yield gauge("kmsfs_inodes", "Inodes known to the kernel", info["inodes"])
        waits = info.get("lock_waits")
        if waits:  # shared mode
            yield gauge(
                "kmsfs_lock_waits", "Requests waiting for another daemon's lock", waits["waiting"]
            )
            ended = CounterMetricFamily(
                "kmsfs_lock_waits_given_up",
                "Waits for another daemon's lock that ended without it, per reason",
                labels=labels + ["reason"],
            )
            for reason in ("timed_out", "refused", "interrupted", "abandoned"):
                ended.add_metric([*ident, reason], waits[reason])
            yield ended

        yield from _rekey_metrics(info.get("rekey"), labels, ident)

        cache = info["key_cache"]
        yield gauge("kmsfs_key_cache_entries", "Unwrapped file keys in memory", cache["size"])
        yield gauge("kmsfs_key_cache_max_entries", "Key cache capacity", cache["max_entries"])
        yield counter("kmsfs_key_cache_hits", "Key cache hits", cache["hits"])
        yield counter("kmsfs_key_cache_misses", "Key cache misses", cache["misses"])
        yield counter("kmsfs_key_cache_evictions", "Key cache evictions", cache["evictions"])

        calls = info["provider_calls"]
        by_op = labels + ["operation"]
        call_family = CounterMetricFamily(
            "kmsfs_provider_calls", "Calls to the key provider", labels=by_op
        )
        error_family = CounterMetricFamily(
            "kmsfs_provider_errors", "Failed calls to the key provider", labels=by_op
        )
        for operation, figures in calls["by_operation"].items():
            call_family.add_metric([*ident, operation], figures["count"])
            error_family.add_metric([*ident, operation], figures["errors"])
        yield call_family
        yield error_family
        yield counter(
            "kmsfs_provider_time_seconds",
            "Total time spent in key provider calls",
            calls["latency_total_ms"] / 1000,
        )
        quantiles = GaugeMetricFamily(
            "kmsfs_provider_latency_seconds",
            "Key provider call latency over the last calls (see kmsfs status)",
            labels=labels + ["quantile"],
        )
        for pct in PERCENTILES:
            value = calls["latency_ms"][f"p{pct}"]
            if value is not None:
                quantiles.add_metric([*ident, str(pct / 100)], value / 1000)
        yield quantiles

        requests = info["requests"]["by_opcode"]
        by_opcode = labels + ["opcode"]
        request_family = CounterMetricFamily(
            "kmsfs_fuse_requests", "FUSE requests answered, per opcode", labels=by_opcode
        )
        request_errors = CounterMetricFamily(
            "kmsfs_fuse_request_errors",
            "FUSE requests answered with an error (ENOENT of a lookup included), per opcode",
            labels=by_opcode,
        )
        durations = HistogramMetricFamily(
            "kmsfs_fuse_request_duration_seconds",
            "Time the daemon took to answer a FUSE request, per opcode",
            labels=by_opcode,
        )
        longest = GaugeMetricFamily(
            "kmsfs_fuse_request_duration_max_seconds",
            "Longest time the daemon took to answer one FUSE request, per opcode",
            labels=by_opcode,
        )
        for opcode, figures in requests.items():
            values = [*ident, opcode]
            request_family.add_metric(values, figures["count"])
            request_errors.add_metric(values, figures["errors"])
            durations.add_metric(
                values, list(figures["buckets"].items()), figures["time_total_ms"] / 1000
            )
            longest.add_metric(values, figures["time_max_ms"] / 1000)
        yield request_family
        yield request_errors
        yield durations
        yield longest


REKEY_STATES = ("scanning", "running", "paused", "done", "cancelled", "failed")


def _rekey_metrics(rekey: dict[str, Any] | None, labels: list[str], ident: list[str]) -> Any:
    """The online rekey's figures (``kmsfs status``'s ``rekey``): none before a job."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    job = (rekey or {}).get("job")
    if job:
        state = GaugeMetricFamily(
            "kmsfs_rekey_state",
            "1 for the state the online rekey job is in",
            labels=labels + ["state"],
        )
        for name in REKEY_STATES:
            state.add_metric([*ident, name], 1 if job["state"] == name else 0)
        yield state
        gauges = (
            ("files_total", "Files the rekey job found due (with those done before a resume)"),
            ("bytes_total", "Plaintext bytes of the files the rekey job found due"),
            ("files_done", "Files re-keyed by the job"),
            ("bytes_done", "Plaintext bytes re-keyed by the job"),
            ("files_skipped", "Files the job skipped (hard-linked, changed meanwhile)"),
            ("files_failed", "Files the job failed to re-key"),
            ("rate_bytes_per_second", "Plaintext bytes a second the job re-keys (last 10 s)"),
            ("rate_files_per_second", "Files a second the job re-keys (last 10 s)"),
            ("eta_seconds", "Estimated seconds until the rekey job is done"),
        )
        for key, doc in gauges:
            family = GaugeMetricFamily(f"kmsfs_rekey_{key}", doc, labels=labels)
            if job[key] is not None:
                family.add_metric(ident, job[key])
            yield family
    auto = (rekey or {}).get("auto_rekey")
    if auto:
        done = CounterMetricFamily(
            "kmsfs_auto_rekey_files",
            "Files re-keyed because their key reached the usage warning",
            labels=labels,
        )
        done.add_metric(ident, auto["done"])
        yield done
