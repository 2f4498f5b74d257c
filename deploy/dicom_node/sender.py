"""The outbox of undelivered results and the sender that C-STOREs them, retrying with back-off for ever."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from scripts.safe_io import atomic_write_json

from .metrics import NodeMetrics
from .settings import Destination, now_iso, read_json
from .tls import TlsSettings

logger = logging.getLogger(__name__)


@dataclass
class Delivery:
    """One result still to be stored at one destination."""

    uid: str
    dest: Destination
    attempts: int = 0
    due: float = 0.0  # time.monotonic() of the next attempt
    created: float = 0.0  # time.time() when the result was written
    last_instance_at: float | None = None  # time.time() of the series' last acknowledged instance


class Outbox:
    """Pending deliveries by ``(series UID, destination key)``.

    ``lock`` also guards every change of a ``results/<uid>/`` folder (publication by the worker, ``delivery.json``
    updates by the sender, retention), so a replaced or expired result is never written to by a late attempt.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self._items: dict[tuple[str, str], Delivery] = {}

    def add(self, uid: str, record: Mapping[str, Any], due: float, created: float) -> None:
        """Queue the not-yet-done destinations of a ``delivery.json`` record (caller holds ``lock``)."""
        for entry in (record.get("destinations") or {}).values():
            if not entry.get("done"):
                dest = Destination.parse(entry)
                item = Delivery(uid, dest, int(entry.get("attempts", 0)), due, created, record.get("last_instance_at"))
                self._items[(uid, dest.key)] = item
        self.wake.set()

    def drop_series(self, uid: str) -> None:
        """Forget every pending delivery of a series (caller holds ``lock``)."""
        for key in [k for k in self._items if k[0] == uid]:
            del self._items[key]

    def has_series(self, uid: str) -> bool:
        """Whether a delivery of the series is pending (caller holds ``lock``)."""
        return any(k[0] == uid for k in self._items)

    def next_due(self) -> Delivery | None:
        with self.lock:
            return min(self._items.values(), key=lambda d: d.due, default=None)

    def current(self, item: Delivery) -> bool:
        """Whether ``item`` is still the pending delivery for its key (caller holds ``lock``)."""
        return self._items.get((item.uid, item.dest.key)) is item

    def done(self, item: Delivery) -> None:
        self._items.pop((item.uid, item.dest.key), None)

    def pending(self) -> int:
        with self.lock:
            return len(self._items)

    def undelivered(self) -> tuple[int, float]:
        """(series with a pending delivery, age in seconds of the oldest such result; 0 when none)."""
        with self.lock:
            created = {}
            for item in self._items.values():
                created[item.uid] = min(created.get(item.uid, item.created), item.created)
        return len(created), (time.time() - min(created.values())) if created else 0.0


class Sender:
    """Delivers each pending result over one association per attempt; records every attempt in delivery.json."""

    def __init__(self, ae_title: str, results: Path, outbox: Outbox, send_seg: bool, retry: Mapping[str, float],
                 tls: TlsSettings, destinations: Sequence[Destination], metrics: NodeMetrics):  # fmt: skip
        self.ae_title, self.results, self.outbox, self.send_seg = ae_title, Path(results), outbox, send_seg
        self.retry, self.tls, self.metrics = dict(retry), tls, metrics
        self.configured = {d.key: d for d in destinations}
        self._contexts: dict[bool, Any] = {}

    def loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.outbox.wake.clear()
            pending = self.outbox.next_due()
            if pending is None or pending.due > time.monotonic():
                wait = 1.0 if pending is None else min(1.0, pending.due - time.monotonic())
                self.outbox.wake.wait(max(0.0, wait))
                continue
            self.deliver(pending)

    def _files(self, uid: str) -> list[Path]:
        folder = self.results / uid
        return [folder / f"RS_{uid}.dcm"] + ([folder / f"SEG_{uid}.dcm"] if self.send_seg else [])

    def deliver(self, item: Delivery) -> None:
        """One delivery attempt; records the outcome in delivery.json and schedules a retry on failure."""
        result_dir = self.results / item.uid
        paths = self._files(item.uid)
        if not result_dir.is_dir():  # removed by hand: there is nothing left to send
            with self.outbox.lock:
                self.outbox.done(item)
            logger.error("Series %s: its result folder was removed; delivery to %s abandoned.", item.uid, item.dest.key)
            return
        try:
            error = self.c_store(item.dest, [pydicom.dcmread(p) for p in paths])
        except Exception as err:  # unreadable result file (replaced meanwhile?) or a pynetdicom error
            error = f"{type(err).__name__}: {err}"
        delay = self._record(item, result_dir, error)
        if delay is None:
            logger.info("Series %s: delivered %s to %s.", item.uid, [p.name for p in paths], item.dest.key)
        elif delay >= 0:
            at = (datetime.now().astimezone() + timedelta(seconds=delay)).isoformat(timespec="seconds")
            logger.warning(
                "Series %s: delivery to %s failed (attempt %d: %s); next retry in %.1f s at %s.",
                item.uid, item.dest.key, item.attempts, error, delay, at,
            )  # fmt: skip

    def _record(self, item: Delivery, result_dir: Path, error: str | None) -> float | None:
        """Write the attempt into delivery.json; the retry delay (None: delivered; -1: superseded meanwhile)."""
        with self.outbox.lock:
            if not self.outbox.current(item):
                return -1.0  # the result was replaced while sending
            item.attempts += 1
            record = read_json(result_dir / "delivery.json") or {}
            entry = record.setdefault("destinations", {}).setdefault(item.dest.key, {})
            entry.update(ae_title=item.dest.ae_title, host=item.dest.host, port=item.dest.port)
            entry.update(done=error is None, attempts=item.attempts, last_error=error, last_attempt_at=now_iso())
            delay = None
            if error is None:
                entry["delivered_at"] = entry["last_attempt_at"]
                if item.last_instance_at is not None:
                    entry["latency_seconds"] = round(time.time() - item.last_instance_at, 3)
                    self.metrics.latency.observe(entry["latency_seconds"])
                self.outbox.done(item)
                self.metrics.inc("delivered")
            else:
                r = self.retry
                delay = min(r["initial_seconds"] * r["factor"] ** (item.attempts - 1), r["max_seconds"])
                item.due = time.monotonic() + delay
                entry["next_attempt_in_seconds"] = delay
                self.metrics.inc("retries")
            atomic_write_json(record, result_dir / "delivery.json")
        return delay

    def _tls_args(self, dest: Destination) -> tuple[Any, str | None] | None:
        """pynetdicom's ``tls_args`` for a destination (the configured entry wins over delivery.json's copy)."""
        dest = self.configured.get(dest.key, dest)
        if not (self.tls.enabled if dest.tls is None else dest.tls):
            return None
        check = dest.tls_hostname is not None
        if check not in self._contexts:
            self._contexts[check] = self.tls.client_context(check_hostname=check)
        return self._contexts[check], dest.tls_hostname

    def c_store(self, dest: Destination, datasets: Sequence[Dataset]) -> str | None:
        """C-STORE the datasets in one association; None on success (every status 0x0000), else the reason."""
        ae = AE(ae_title=self.ae_title)
        for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls_args = self._tls_args(dest)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            tls = " (TLS: or the handshake / certificate check failed)" if tls_args else ""
            return f"association rejected or aborted, or destination unreachable{tls}"
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code != 0x0000:
                    shown = "no response" if code is None else f"0x{int(code):04X}"
                    return f"C-STORE of {ds.SOPInstanceUID} answered {shown}"
        finally:
            assoc.release()
        return None
