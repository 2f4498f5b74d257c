"""Who may connect and associate: the refusal log and counter, and the count of pending and active connections.

A connection is *pending* from its TCP accept until its A-ASSOCIATE-RQ arrives (TLS handshake included), then
*active* until it closes. Pending connections have limits of their own (total and per host) and never count
toward the association limits, so silent peers cannot lock out senders.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

from .limits import Limits
from .metrics import NodeMetrics

logger = logging.getLogger(__name__)

#: every refusal cause the node counts in ``fairdro_node_refusals_total{cause}``
CAUSES = (
    "unknown_calling_aet", "association_limit", "association_limit_per_host", "pending_limit",
    "pending_limit_per_host", "pending_timeout", "tls_handshake", "malformed_pdu", "rejected_by_acse",
    "disk_floor", "invalid_instance", "sop_class", "instance_limit_association", "bytes_limit_association",
    "instance_limit_series", "bytes_limit_series",
)  # fmt: skip


class Refusals:
    """One WARNING line and one counter increment per refusal: ``Refused <subject> (cause=<cause>): <detail>.``
    The line is written before the counter moves, so whoever sees a count (a test, a metrics scrape) finds its line."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def refuse(self, cause: str, subject: str, detail: str, level: int = logging.WARNING) -> None:
        _check_cause(cause)
        logger.log(level, "Refused %s (cause=%s): %s.", subject, cause, detail)
        self.metrics.refusal(cause)

    def count(self, cause: str) -> None:
        """Count a refusal whose caller has written its own log line (which names ``cause=...``)."""
        _check_cause(cause)
        self.metrics.refusal(cause)


def _check_cause(cause: str) -> None:
    if cause not in CAUSES:
        raise ValueError(f"unknown refusal cause {cause!r}")


@dataclass
class _Connection:
    host: str
    state: str = "pending"  # then "active" or "refused"
    got_data: bool = False


class ConnectionGate:
    """Counts pending and active connections by host; decides admission (at accept) and association (at RQ)."""

    def __init__(self, limits: Limits, refusals: Refusals):
        self.limits, self.refusals = limits, refusals
        self._lock = threading.Lock()
        self._conns: dict[tuple, _Connection] = {}

    def _count(self, state: str) -> tuple[int, Counter]:
        hosts = Counter(c.host for c in self._conns.values() if c.state == state)
        return sum(hosts.values()), hosts

    def admit(self, key: tuple) -> bool:
        """At accept: True and counted as pending, or False (refused and logged) over a pending limit."""
        host, lim = str(key[0]), self.limits
        with self._lock:
            total, hosts = self._count("pending")
            if total >= lim.max_pending_connections:
                cause, limit = "pending_limit", f"max_pending_connections {lim.max_pending_connections}"
            elif hosts[host] >= lim.max_pending_per_host:
                cause, limit = "pending_limit_per_host", f"max_pending_per_host {lim.max_pending_per_host}"
            else:
                self._conns[key] = _Connection(host)
                return True
        self.refusals.refuse(cause, f"connection from {_peer(key)}", f"{limit} connections wait for an A-ASSOCIATE-RQ")
        return False

    def saw_data(self, key: tuple) -> None:
        with self._lock:
            if key in self._conns:
                self._conns[key].got_data = True

    def associate(self, key: tuple) -> tuple[str, str] | None:
        """At A-ASSOCIATE-RQ: None and counted as active, or ``(cause, detail)`` over an association limit."""
        lim = self.limits
        with self._lock:
            conn = self._conns.setdefault(key, _Connection(str(key[0])))
            total, hosts = self._count("active")
            if total >= lim.max_associations:
                return "association_limit", f"max_associations {lim.max_associations} associations are open"
            if hosts[conn.host] >= lim.max_associations_per_host:
                return "association_limit_per_host", f"max_associations_per_host {lim.max_associations_per_host}"
            conn.state = "active"
        return None

    def refused(self, key: tuple) -> None:
        """The association was refused (already logged): the connection is closing and is neither counted nor
        reported again."""
        with self._lock:
            if key in self._conns:
                self._conns[key].state = "refused"

    def close(self, key: tuple) -> _Connection | None:
        """The connection is gone; returns what was known of it."""
        with self._lock:
            return self._conns.pop(key, None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"pending": self._count("pending")[0], "active": self._count("active")[0]}


def _peer(key: tuple) -> str:
    return f"{key[0]}:{key[1]}" if len(key) > 1 else str(key[0])
