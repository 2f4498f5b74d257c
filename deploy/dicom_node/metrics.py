"""The node's counters, gauges and latency histogram, kept in a prometheus-client registry of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "fairdro_node_"
#: status() key -> (metric name without the prefix and the _total suffix, help text)
COUNTERS = {
    "stored": ("instances_received", "CT instances written to the spool and acknowledged (0x0000)"),
    "refused": ("instances_refused", "instances refused as invalid (0x0122, 0xA900, 0xC210)"),
    "disk_refused": ("instances_refused_disk_floor", "instances answered 0xA700 because the disk is below the floor"),
    "processed": ("series_completed", "series inferred into results/"),
    "failed": ("series_failed", "series moved to failed/ (CT checks or inference error)"),
    "duplicates": ("series_duplicates", "series arrivals recognised as already processed"),
    "delivered": ("series_delivered", "results stored at a destination (one per series and destination)"),
    "retries": ("delivery_retries", "failed delivery attempts (each one is retried)"),
}
#: last instance acknowledged -> result acknowledged by the destination; seconds
LATENCY_BUCKETS = (2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600)


class NodeMetrics:
    """Counters (also readable as a plain dict for ``status()``), gauges computed at scrape time, one histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._counters = {
            key: Counter(PREFIX + name, text, registry=self.registry) for key, (name, text) in COUNTERS.items()
        }
        self._refusals = Counter(PREFIX + "refusals", "refused connections, associations and instances, by cause",
                                 ["cause"], registry=self.registry)  # fmt: skip
        self._refusal_counts: dict[str, int] = {}
        self.latency = Histogram(
            PREFIX + "series_latency_seconds",
            "seconds from a series' last instance acknowledged to its RTSTRUCT acknowledged by a destination",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def inc(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[key] += amount
        self._counters[key].inc(amount)

    def refusal(self, cause: str) -> None:
        """One refusal, counted in ``fairdro_node_refusals_total{cause}``."""
        with self._lock:
            self._refusal_counts[cause] = self._refusal_counts.get(cause, 0) + 1
        self._refusals.labels(cause=cause).inc()

    def refusal_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refusal_counts)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` at every scrape."""
        Gauge(PREFIX + name, text, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
