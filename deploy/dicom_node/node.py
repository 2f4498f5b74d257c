"""The DICOM node: receiver, worker and sender around one work folder (see ``deploy/dicom_node.md``).

Flow::

    C-STORE (CT) -> Receiver: spool/<series>/<sop>.dcm  (fsync, then 0x0000; 0xA700 below the disk floor)
                 -> quiet for quiet_seconds   -> Worker: processing/<series>/ (one series at a time)
                 -> DICOM inference           -> results/<series>/ (RS_, SEG_, mask, result.json, delivery.json)
                 -> Sender: C-STORE to every destination, retried with back-off until each one answers 0x0000
                 (CT checks failing          -> failed/<series>/ with reason.txt)

Everything the node acknowledged is on disk before the acknowledgement, and every state change is a rename or
an atomic file replacement, so a node killed at any moment resumes on restart: ``spool/`` and ``processing/`` are
queued again and undelivered results are sent again (delivery is at-least-once).

Logs and files carry UIDs, AE titles and reasons only: PatientName / PatientID are never logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.safe_io import fsync_folder

from .health import HealthServer, HealthSettings
from .inference import BundleInference
from .limits import Limits
from .metrics import NodeMetrics
from .receiver import Receiver
from .sender import Outbox, Sender
from .settings import Destination, DicomNodeError, default_work_dir, read_json
from .spool import Spool
from .storage import DiskGuard, Retention, owner_only_folder
from .subgroups import SubgroupSource
from .tls import TlsSettings
from .worker import Worker

logger = logging.getLogger(__name__)

_NODE_KEYS = ("input_dir", "output_dir", "subgroup")  # set per series by the node, never by inference_overrides
GIB = 1 << 30


def _retry_settings(retry: Mapping[str, float] | None) -> dict[str, float]:
    merged = {"initial_seconds": 2.0, "max_seconds": 60.0, "factor": 2.0, **(retry or {})}
    values = {k: float(merged[k]) for k in ("initial_seconds", "max_seconds", "factor")}
    if values["initial_seconds"] <= 0 or values["factor"] < 1:
        raise DicomNodeError(f"retry needs initial_seconds > 0 and factor >= 1; got {merged}.")
    return values


def _network_subgroups(config_files: Sequence[str], overrides: Mapping[str, Any]) -> list[str] | None:
    """The network's subgroup names, read from the inference configs."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(dict(overrides))
    return list(parser.get_parsed_content("subgroups")) if "subgroups" in parser else None


class DicomNode:
    """Storage SCP + series spool + inference worker + result sender, with disk floor, retention, health and TLS.

    Args:
        ae_title: this node's AE title.
        bind_address: address to listen on.
        port: port to listen on (0: any free port; ``node.port`` holds the real one after :meth:`start`).
        allowed_calling_aets: calling AE titles accepted; empty refuses every association.
        destinations: ``[{"ae_title", "host", "port"[, "tls", "tls_hostname"]}]`` that receive every result.
        send_seg: also send the DICOM SEG (the RTSTRUCT is always sent).
        quiet_seconds: a series is complete after this long without a new instance.
        work_dir: root of ``spool/``, ``processing/``, ``results/`` and ``failed/`` (owner-only permissions); None:
            :func:`~.settings.default_work_dir` (``$XDG_STATE_HOME/fairdro-node``, ``/var/lib/fairdro-node`` as root).
        subgroup_source: keyword arguments of :class:`SubgroupSource` (or one).
        inference_config_files: the bundle's ``inference.json`` and ``inference_dicom.json``.
        inference_overrides: extra config overrides for inference (``ckpt_path``, ``features``, ...).
        cold: build the inference workflow (network, checkpoint load) for every series; default False: built once
            and kept, rebuilt when the checkpoint file changes (see :mod:`.inference`).
        retry: ``{"initial_seconds", "max_seconds", "factor"}`` of the delivery back-off.
        min_free_bytes: below this much free space every C-STORE is answered 0xA700 and no series is started.
        retention_days: delivered results are deleted after this many days (None: kept).
        failed_retention_days: failed series are deleted after this many days (None: kept until a person acts).
        health: ``{"enabled", "bind_address", "port"}`` of the HTTP health and metrics endpoint.
        tls: ``{"enabled", "certificate", "private_key", "ca_bundle", "require_client_cert", "min_version"}``.
        limits: connection, association, transfer and ``failed/`` limits (:class:`~.limits.Limits`; missing names
            keep their defaults).
        poll_seconds: how often the quiet timers are checked.
        housekeeping_seconds: how often retention runs and the disk floor is re-checked.
    """

    def __init__(
        self,
        ae_title: str = "FAIRDRO",
        bind_address: str = "127.0.0.1",
        port: int = 11112,
        allowed_calling_aets: Sequence[str] = (),
        destinations: Sequence[Mapping[str, Any]] = (),
        send_seg: bool = False,
        quiet_seconds: float = 10.0,
        work_dir: str | Path | None = None,
        subgroup_source: Mapping[str, Any] | SubgroupSource | None = None,
        inference_config_files: Sequence[str | Path] = (),
        inference_overrides: Mapping[str, Any] | None = None,
        cold: bool = False,
        retry: Mapping[str, float] | None = None,
        min_free_bytes: int = GIB,
        retention_days: float | None = 30.0,
        failed_retention_days: float | None = None,
        health: Mapping[str, Any] | None = None,
        tls: Mapping[str, Any] | TlsSettings | None = None,
        poll_seconds: float = 0.1,
        housekeeping_seconds: float = 60.0,
        limits: Mapping[str, Any] | Limits | None = None,
    ):
        self.ae_title, self.bind_address, self.port = str(ae_title), str(bind_address), int(port)
        self.allowed_calling_aets = [str(a).strip() for a in allowed_calling_aets]
        self.destinations = [Destination.parse(d) for d in destinations]
        self.send_seg, self.quiet_seconds, self.poll_seconds = bool(send_seg), float(quiet_seconds), poll_seconds
        self.housekeeping_seconds = float(housekeeping_seconds)
        if self.quiet_seconds < 0:
            raise DicomNodeError(f"quiet_seconds must be >= 0, got {quiet_seconds!r}.")
        self.work_dir = default_work_dir() if work_dir in (None, "") else Path(work_dir)
        self.limits = Limits.parse(limits)
        self.inference_config_files = [str(p) for p in inference_config_files]
        self.inference_overrides = dict(inference_overrides or {})
        self.retry = _retry_settings(retry)
        if not self.inference_config_files or not all(Path(p).is_file() for p in self.inference_config_files):
            raise DicomNodeError(f"inference_config_files must name existing files, got {self.inference_config_files}.")
        if clash := sorted(set(_NODE_KEYS) & set(self.inference_overrides)):
            raise DicomNodeError(f"inference_overrides must not set {clash}: the node sets them for every series.")
        if not isinstance(cold, bool):
            raise DicomNodeError(f"cold must be true or false, got {cold!r}.")
        self.inference = BundleInference(self.inference_config_files, self.inference_overrides, cold=cold)
        if isinstance(subgroup_source, SubgroupSource):
            self.subgroup_source = subgroup_source
        else:
            subgroups = _network_subgroups(self.inference_config_files, self.inference_overrides)
            self.subgroup_source = SubgroupSource(**dict(subgroup_source or {}), subgroups=subgroups)
        self.tls, self.health_settings = TlsSettings.parse(tls), HealthSettings(health)
        if not self.tls.enabled and any(d.tls for d in self.destinations):
            raise DicomNodeError('destinations: an entry has "tls": true but tls.enabled is false.')
        self.spool_dir, self.processing = self.work_dir / "spool", self.work_dir / "processing"
        self.results, self.failed = self.work_dir / "results", self.work_dir / "failed"
        self.disk = DiskGuard(self.work_dir, min_free_bytes)
        self.retention = Retention(self.results, self.failed, retention_days, failed_retention_days,
                                   (self.limits.max_failed_series, self.limits.max_failed_bytes))  # fmt: skip
        self.metrics = NodeMetrics()
        self._build_parts()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.health: HealthServer | None = None

    def _build_parts(self) -> None:
        self.spool = Spool(self.spool_dir, self.processing)
        self.outbox = Outbox()
        self.receiver = Receiver(self.ae_title, self.allowed_calling_aets, self.spool, self.disk, self.metrics,
                                 self.limits)  # fmt: skip
        self.worker = Worker(
            self.spool, self.results, self.failed, self.outbox, self.disk, self.metrics, self.subgroup_source,
            self.inference, self.destinations, self.send_seg, self.quiet_seconds, self.limits.disk_full_retry_seconds,
        )  # fmt: skip
        self.sender = Sender(self.ae_title, self.results, self.outbox, self.send_seg, self.retry, self.tls,
                             self.destinations, self.metrics)  # fmt: skip
        m = self.metrics
        m.gauge("queue_length", "series complete and waiting for inference", lambda: self.worker.queued())
        m.gauge("receiving_series", "series in spool/ still receiving instances", lambda: self.spool.receiving())
        m.gauge("pending_deliveries", "deliveries not yet confirmed (series x destination)", self.outbox.pending)
        m.gauge("undelivered_results", "results not yet delivered everywhere", lambda: self.outbox.undelivered()[0])
        m.gauge("undelivered_oldest_age_seconds", "age of the oldest undelivered result (0: none)",
                lambda: self.outbox.undelivered()[1])  # fmt: skip
        m.gauge("disk_free_bytes", "free bytes on the work_dir file system", self.disk.free_bytes)
        m.gauge("disk_below_floor", "1 while free space is below min_free_bytes", lambda: float(self.disk.below))
        m.gauge("inference_builds", "inference workflows built since start (network constructed, weights loaded)",
                lambda: self.inference.builds)  # fmt: skip
        m.gauge("checkpoint_reloads", "warm rebuilds since start because the checkpoint file changed",
                lambda: self.inference.reloads)  # fmt: skip
        m.gauge("pending_connections", "connections without an A-ASSOCIATE-RQ yet (TLS handshake included)",
                lambda: self.receiver.gate.counts()["pending"])  # fmt: skip
        m.gauge("active_associations", "associations accepted and open", lambda: self.receiver.gate.counts()["active"])

    # ---------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Recover the on-disk state, start the worker threads and listen; returns once listening."""
        owner_only_folder(self.work_dir)
        for folder in (self.spool_dir, self.processing, self.results, self.failed):
            owner_only_folder(folder)
        fsync_folder(str(self.work_dir))
        self._stop.clear()
        self._recover()
        self.disk.above_floor()
        context = self.tls.server_context() if self.tls.enabled else None
        self.port = self.receiver.start(self.bind_address, self.port, context, self.tls.handshake_timeout_seconds)
        loops = {
            "watch": self._watch_loop,
            "work": lambda: self.worker.loop(self._stop, self.poll_seconds),
            "send": lambda: self.sender.loop(self._stop),
        }
        for name, target in loops.items():
            thread = threading.Thread(target=target, name=f"dicom-node-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.health_settings.enabled:
            self.health = HealthServer(self.health_settings, self.liveness, self.readiness, self.metrics.render)
            self.health.start()
        if not self.allowed_calling_aets:
            logger.warning("allowed_calling_aets is empty: every association is refused.")
        logger.info(
            "DICOM node %s listening on %s:%d (%s; calling AEs %s; destinations %s; quiet %.1f s; work_dir %s).",
            self.ae_title, self.bind_address, self.port, "TLS" if self.tls.enabled else "plain TCP",
            self.allowed_calling_aets, [d.key for d in self.destinations], self.quiet_seconds, self.work_dir,
        )  # fmt: skip

    def stop(self, timeout: float = 60.0) -> None:
        """Stop listening and stop the threads (waits up to ``timeout`` for a running series or delivery).

        Whatever is not finished stays on disk and is resumed by the next :meth:`start`.
        """
        self.receiver.stop()
        if self.health is not None:
            self.health.stop()
            self.health = None
        self._stop.set()
        self.outbox.wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        logger.info("DICOM node %s stopped.", self.ae_title)

    def serve_forever(self) -> None:
        """Start (unless started) and block until SIGINT/SIGTERM, then stop cleanly (sets the process umask 077)."""
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            logger.info("Received %s: stopping.", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        os.umask(0o077)  # the node's own process: every file it writes is for its user only (patient data)
        try:
            if not self.receiver.listening:
                self.start()
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch_loop(self) -> None:
        """Queue quiet series; every ``housekeeping_seconds`` re-check the disk floor and apply retention."""
        next_housekeeping = 0.0
        while not self._stop.wait(self.poll_seconds):
            self.worker.queue_quiet_series()
            if time.monotonic() >= next_housekeeping:
                next_housekeeping = time.monotonic() + self.housekeeping_seconds
                try:
                    self.disk.above_floor()
                    self.retention.sweep(self.outbox.has_series, self.outbox.lock)
                except OSError as err:
                    logger.error("Housekeeping failed (%s); retried in %.0f s.", err, self.housekeeping_seconds)

    def _recover(self) -> None:
        """Queue what a previous run left: processing/ first, then spool/ (quiet timer restarts), and deliveries."""
        for folder in (self.results, self.failed):
            for stale in folder.glob(".*"):  # unfinished result folders, replaced and expired ones
                shutil.rmtree(stale, ignore_errors=True)
        for uid in self.spool.recover():
            self.worker.enqueue(uid)
        for path in sorted(self.results.glob("*/delivery.json")):
            record = read_json(path)
            try:
                if record is None:
                    raise DicomNodeError("not a readable JSON object")
                created = (path.parent / "result.json").stat().st_mtime  # written once, with the result
                with self.outbox.lock:
                    self.outbox.add(path.parent.name, record, time.monotonic(), created)
            except (DicomNodeError, OSError) as err:
                logger.error("Cannot resume the deliveries of %s: %s; fix or remove the file.", path, err)

    # ---------------------------------------------------------------------------------------------- state

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is being received, queued, processed or waiting for delivery; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not (self.spool.busy() or self.worker.busy() or self.outbox.pending()):
                return True
            time.sleep(0.05)
        return False

    def status(self) -> dict[str, Any]:
        """Series receiving/queued/processing, pending deliveries, undelivered results, and totals since start."""
        current = self.worker.current
        undelivered, oldest = self.outbox.undelivered()
        return {
            "receiving": self.spool.receiving(),
            "queued": self.worker.queued(),
            "processing": int(current is not None),
            "current": current,
            "pending_deliveries": self.outbox.pending(),
            "undelivered": undelivered,
            "undelivered_oldest_age_seconds": round(oldest, 1),
            "below_disk_floor": self.disk.below,
            "inference_builds": self.inference.builds,
            "checkpoint_reloads": self.inference.reloads,
            **self.metrics.counts(),
            "refusals": self.metrics.refusal_counts(),
        }

    def liveness(self) -> dict[str, bool]:
        """Whether each of the node's threads runs (a dead one means: restart the node)."""
        alive = {t.name.removeprefix("dicom-node-"): t.is_alive() for t in self._threads}
        return {f"{name}_thread": ok for name, ok in alive.items()} or {"started": False}

    def readiness(self) -> dict[str, bool]:
        """Whether the node can take work now: listening, worker alive, disk above the floor."""
        threads = {t.name: t.is_alive() for t in self._threads}
        return {
            "listening": self.receiver.listening,
            "worker_alive": threads.get("dicom-node-work", False),
            "disk_above_floor": self.disk.above_floor(),
        }
