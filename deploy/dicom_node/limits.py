"""The node's limits (``limits`` in ``dicom_node.json``) and the per-association / per-series usage checked against
them. A client over a limit gets the standard refusal (see ``deploy/dicom_node.md``, *Limits*)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .settings import DicomNodeError

GIB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Connection, association, transfer and ``failed/`` limits, and the full-disk retry; every value must be > 0.

    ``max_pending*`` and ``pending_timeout_seconds`` bound connections that have not sent an A-ASSOCIATE-RQ yet
    (TLS handshake included); they do not count toward ``max_associations*``. ``disk_full_retry_seconds``: a series
    whose inference or result writing ran out of space stays in ``processing/`` and is tried again after this long.
    """

    max_associations: int = 16
    max_associations_per_host: int = 8
    max_pending_connections: int = 128
    max_pending_per_host: int = 64
    pending_timeout_seconds: float = 10.0
    network_timeout_seconds: float = 60.0
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 30.0
    max_pdu_size: int = 16382
    max_instances_per_association: int = 20000
    max_bytes_per_association: int = 16 * GIB
    max_instances_per_series: int = 5000
    max_bytes_per_series: int = 8 * GIB
    max_failed_series: int = 500
    max_failed_bytes: int = 20 * GIB
    disk_full_retry_seconds: float = 60.0

    @classmethod
    def parse(cls, value: Mapping[str, Any] | Limits | None) -> Limits:
        """Defaults overridden by ``value``; unknown names and values <= 0 are refused."""
        if isinstance(value, Limits):
            return value
        value = dict(value or {})
        types = {f.name: f.type for f in fields(cls)}
        if unknown := sorted(set(value) - set(types)):
            raise DicomNodeError(f"limits: unknown setting(s) {unknown}; known: {sorted(types)}.")
        parsed = {}
        for name, raw in value.items():
            cast = float if types[name] == "float" else int
            try:
                parsed[name] = cast(raw)
            except (TypeError, ValueError) as err:
                raise DicomNodeError(f"limits.{name} must be a number, got {raw!r}.") from err
            if parsed[name] <= 0 or isinstance(raw, bool):
                raise DicomNodeError(f"limits.{name} must be a number > 0, got {raw!r}.")
        return cls(**parsed)


class TransferBudget:
    """Instances and bytes stored per association and per series, checked before each instance is stored.

    ``check`` returns ``(cause, detail)`` for an instance over a limit, else records it and returns None. Series
    counts restart when the series' spool folder is gone (the worker took it).
    """

    def __init__(self, limits: Limits, spool_dir: Path):
        self.limits, self.spool_dir = limits, Path(spool_dir)
        self._lock = threading.Lock()
        self._associations: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()
        self._series: dict[str, list[int]] = {}

    def check(self, assoc: Any, series: str, size: int) -> tuple[str, str] | None:
        lim = self.limits
        with self._lock:
            per_assoc = self._associations.setdefault(assoc, [0, 0])
            if not (self.spool_dir / series).is_dir():
                self._series.pop(series, None)
            per_series = self._series.setdefault(series, [0, 0])
            for (count, total), scope, max_count, max_bytes in (
                (per_assoc, "association", lim.max_instances_per_association, lim.max_bytes_per_association),
                (per_series, "series", lim.max_instances_per_series, lim.max_bytes_per_series),
            ):
                if count + 1 > max_count:
                    return f"instance_limit_{scope}", f"more than max_instances_per_{scope} {max_count}"
                if total + size > max_bytes:
                    return f"bytes_limit_{scope}", f"more than max_bytes_per_{scope} {max_bytes}"
            for usage in (per_assoc, per_series):
                usage[0] += 1
                usage[1] += size
        return None
