"""A DICOM node that receives planning CT series and sends the bundle's RTSTRUCT (and optionally SEG) back.

Flow (see ``docs/dicom_node.md`` for the deployment picture and every setting)::

    C-STORE (CT) -> spool/<series>/<sop>.dcm  (fsync, then 0x0000)
                 -> quiet for quiet_seconds   -> processing/<series>/  (one worker, one series at a time)
                 -> DICOM inference           -> results/<series>/ (RS_, SEG_, mask, result.json, delivery.json)
                 -> C-STORE to every destination, retried with back-off until each one answers 0x0000
                 (CT checks failing          -> failed/<series>/ with reason.txt)

Everything the node acknowledged is on disk before the acknowledgement, and every state change is a rename or
an atomic file replacement, so a node killed at any moment resumes on restart: ``spool/`` and ``processing/`` are
queued again and undelivered results are sent again (delivery is at-least-once).

Logs and files carry UIDs, AE titles and reasons only: PatientName / PatientID are never logged.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydicom
from pydicom import uid as dicom_uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from scripts.dicom_series import DicomSeriesError, read_header
from scripts.safe_io import atomic_write_bytes, atomic_write_json, fsync_folder

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
# CT Image Storage is also accepted compressed, in every transfer syntax the pinned decoders read (see the
# "Compressed transfer syntaxes" section of docs/README.md); instances are stored as received, never transcoded.
# JPEG Extended 12-bit (.51) is left out: no decoder with a licence compatible with Apache-2.0 reads it.
CT_COMPRESSED_TRANSFER_SYNTAXES = (
    dicom_uid.JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    dicom_uid.JPEGLossless,  # 1.2.840.10008.1.2.4.57
    dicom_uid.JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    dicom_uid.JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    dicom_uid.JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    dicom_uid.JPEG2000,  # 1.2.840.10008.1.2.4.91
    dicom_uid.RLELossless,  # 1.2.840.10008.1.2.5
)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_NO_PEER = "*NO-PEER-ALLOWED*"  # 17 characters: longer than any AE title a peer can send, so it matches nobody
_NODE_KEYS = ("input_dir", "output_dir", "subgroup")  # set per series by the node, never by inference_overrides


class DicomNodeError(ValueError):
    """A node setting is invalid (the message names the setting)."""


def safe_uid(value: Any) -> str | None:
    """The UID as a string when it is safe as a file name (digits and dots, at most 64 characters), else None."""
    text = "" if value is None else str(value).strip()
    return text if len(text) <= 64 and _UID.fullmatch(text) else None


def series_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """sha256 of the sorted SOP Instance UIDs (one per line): equal for the same instance set."""
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fsync_tree(folder: Path) -> None:
    """fsync every file of a folder, then the folder (inference writers do not fsync)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_folder(str(folder))


def _series_error(err: BaseException | None) -> DicomSeriesError | None:
    """The DicomSeriesError in an exception chain (MONAI and ignite wrap transform errors), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DicomSeriesError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives the results (C-STORE SCP)."""

    ae_title: str
    host: str
    port: int

    @property
    def key(self) -> str:
        """``AE@host:port``, the destination's name in logs and ``delivery.json``."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, item: Mapping[str, Any] | Destination) -> Destination:
        """Build from ``{"ae_title", "host", "port"}``, refusing incomplete entries."""
        if isinstance(item, Destination):
            return item
        try:
            dest = cls(str(item["ae_title"]).strip(), str(item["host"]).strip(), int(item["port"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DicomNodeError(f"destinations: each entry needs ae_title, host and port; got {item!r}.") from err
        if not dest.ae_title or len(dest.ae_title) > 16 or not dest.host or not 0 < dest.port < 65536:
            raise DicomNodeError(f"destinations: invalid entry {item!r} (AE title 1-16 characters, port 1-65535).")
        return dest


class SubgroupSource:
    """Chooses the subgroup routing of a series from the node settings (never logs header values).

    Args:
        mode: ``"fixed"`` (``value`` for every series), ``"attribute"`` (a header attribute, mapped through
            ``mapping`` when one is given) or ``"lookup"`` (a CSV/JSON ``table`` keyed by ``key``).
        value: the subgroup of mode ``fixed`` (None: unknown routing).
        attribute: header keyword read by mode ``attribute``.
        mapping: header value -> subgroup for mode ``attribute``.
        table: CSV (columns ``key``'s name or ``key``, and ``subgroup``) or JSON (``{key value: subgroup}`` or a
            list of records) for mode ``lookup``; read again for every series so edits apply at once.
        key: ``"PatientID"`` or ``"StudyInstanceUID"``, the header value looked up in ``table``.
        subgroups: the network's subgroups; anything else resolves to None (the 'unknown' routing).
    """

    def __init__(
        self,
        mode: str = "fixed",
        value: str | None = None,
        attribute: str = "InstitutionName",
        mapping: Mapping[str, str] | None = None,
        table: str | Path | None = None,
        key: str = "PatientID",
        subgroups: Sequence[str] | None = None,
    ):
        if mode not in ("fixed", "attribute", "lookup"):
            raise DicomNodeError(f"subgroup_source.mode must be 'fixed', 'attribute' or 'lookup', got {mode!r}.")
        self.mode, self.value, self.attribute, self.key = mode, value, attribute, key
        self.mapping = {str(k): str(v) for k, v in (mapping or {}).items()}
        self.table = Path(table) if table else None
        self.subgroups = list(subgroups) if subgroups is not None else None
        if mode == "fixed" and value is not None and self.subgroups is not None and value not in self.subgroups:
            raise DicomNodeError(f"subgroup_source.value {value!r} is not one of the subgroups {self.subgroups}.")
        if mode == "attribute" and tag_for_keyword(attribute) is None:
            raise DicomNodeError(f"subgroup_source.attribute {attribute!r} is not a DICOM keyword.")
        if mode == "lookup":
            if key not in ("PatientID", "StudyInstanceUID"):
                raise DicomNodeError(f"subgroup_source.key must be 'PatientID' or 'StudyInstanceUID', got {key!r}.")
            if self.table is None or not self.table.is_file():
                raise DicomNodeError(f"subgroup_source.table {table!r} is not a file (needed by mode 'lookup').")
            self.load_table()

    def load_table(self) -> dict[str, str]:
        """The lookup table as ``{key value: subgroup}``.

        Raises:
            DicomNodeError: the file cannot be read or has no ``subgroup`` column / values.
        """
        path = self.table
        try:
            if path.suffix.lower() == ".json":
                content = json.loads(path.read_text(encoding="utf-8"))
                rows = content if isinstance(content, list) else [{"key": k, "subgroup": v} for k, v in content.items()]
            else:
                with open(path, newline="", encoding="utf-8-sig") as f:
                    rows = list(csv.DictReader(f))
            return {str(row.get(self.key, row.get("key", ""))).strip(): str(row["subgroup"]).strip() for row in rows}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            raise DicomNodeError(
                f"subgroup_source.table {path}: cannot read it as a {self.key} -> subgroup table "
                f"(CSV with columns {self.key!r}/'key' and 'subgroup', or JSON): {type(err).__name__}."
            ) from err

    def resolve(self, header: Dataset, series_uid: str) -> str | None:
        """The subgroup of a series, or None (unknown routing) with a log line when it cannot be resolved."""
        if self.mode == "fixed":
            return self.value
        name = self.attribute if self.mode == "attribute" else self.key
        raw = header.get(name)
        text = "" if raw is None else str(raw).strip()
        if not text:
            return self._unknown(series_uid, f"the series has no {name}")
        if self.mode == "attribute":
            candidate = self.mapping.get(text) if self.mapping else text
            where = f"subgroup_source.mapping has no entry for its {name} (value not logged)"
        else:
            try:
                candidate = self.load_table().get(text)
            except DicomNodeError as err:
                return self._unknown(series_uid, str(err))
            where = f"{self.table} has no row for its {name} (value not logged)"
        if candidate is None:
            return self._unknown(series_uid, where)
        if self.subgroups is not None and candidate not in self.subgroups:
            shown = "a value" if candidate == text else repr(candidate)  # header values are never logged
            return self._unknown(series_uid, f"{name} gives {shown} that is not one of {self.subgroups}")
        return candidate

    @staticmethod
    def _unknown(series_uid: str, why: str) -> None:
        logger.warning("Series %s: subgroup unresolved (%s); using the 'unknown' subgroup routing.", series_uid, why)
        return None


class _AllowListAE(AE):
    """pynetdicom AE whose calling-AE allow-list may be empty meaning *nobody* (pynetdicom reads [] as everyone)."""

    refuse_everyone = False

    @property
    def require_calling_aet(self) -> list[str]:  # read by pynetdicom's ACSE for every association request
        return [_NO_PEER] if self.refuse_everyone else AE.require_calling_aet.fget(self)

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        AE.require_calling_aet.fset(self, ae_titles)


@dataclass
class _Delivery:
    """One result still to be stored at one destination."""

    uid: str
    dest: Destination
    attempts: int = 0
    due: float = 0.0  # time.monotonic() of the next attempt


class DicomNode:
    """Storage SCP + series spool + inference worker + result sender (see the module docstring).

    Args:
        ae_title: this node's AE title.
        bind_address: address to listen on.
        port: port to listen on (0: any free port; ``node.port`` holds the real one after :meth:`start`).
        allowed_calling_aets: calling AE titles accepted; empty refuses every association.
        destinations: ``[{"ae_title", "host", "port"}]`` that receive every result.
        send_seg: also send the DICOM SEG (the RTSTRUCT is always sent).
        quiet_seconds: a series is complete after this long without a new instance.
        work_dir: root of ``spool/``, ``processing/``, ``results/`` and ``failed/``.
        subgroup_source: keyword arguments of :class:`SubgroupSource` (or one).
        inference_config_files: the bundle's ``inference.json`` and ``inference_dicom.json``.
        inference_overrides: extra config overrides for inference (``ckpt_path``, ``features``, ...).
        retry: ``{"initial_seconds", "max_seconds", "factor"}`` of the delivery back-off.
        poll_seconds: how often the quiet timers are checked.
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
        work_dir: str | Path = "node",
        subgroup_source: Mapping[str, Any] | SubgroupSource | None = None,
        inference_config_files: Sequence[str | Path] = (),
        inference_overrides: Mapping[str, Any] | None = None,
        retry: Mapping[str, float] | None = None,
        poll_seconds: float = 0.1,
    ):
        self.ae_title, self.bind_address, self.port = str(ae_title), str(bind_address), int(port)
        self.allowed_calling_aets = [str(a).strip() for a in allowed_calling_aets]
        self.destinations = [Destination.parse(d) for d in destinations]
        self.send_seg, self.quiet_seconds, self.poll_seconds = bool(send_seg), float(quiet_seconds), poll_seconds
        self.work_dir = Path(work_dir)
        self.inference_config_files = [str(p) for p in inference_config_files]
        self.inference_overrides = dict(inference_overrides or {})
        retry = {"initial_seconds": 2.0, "max_seconds": 60.0, "factor": 2.0, **(retry or {})}
        self.retry = {k: float(retry[k]) for k in ("initial_seconds", "max_seconds", "factor")}
        if self.quiet_seconds < 0 or self.retry["initial_seconds"] <= 0 or self.retry["factor"] < 1:
            raise DicomNodeError(f"need quiet_seconds >= 0, retry initial_seconds > 0, factor >= 1; got {retry}.")
        if not self.inference_config_files or not all(Path(p).is_file() for p in self.inference_config_files):
            raise DicomNodeError(f"inference_config_files must name existing files, got {self.inference_config_files}.")
        if clash := sorted(set(_NODE_KEYS) & set(self.inference_overrides)):
            raise DicomNodeError(f"inference_overrides must not set {clash}: the node sets them for every series.")
        if isinstance(subgroup_source, SubgroupSource):
            self.subgroup_source = subgroup_source
        else:
            self.subgroup_source = SubgroupSource(**dict(subgroup_source or {}), subgroups=self._subgroups())
        self.spool, self.processing = self.work_dir / "spool", self.work_dir / "processing"
        self.results, self.failed = self.work_dir / "results", self.work_dir / "failed"
        self._lock = threading.Lock()
        self._arrivals: dict[str, float] = {}  # series in spool/ -> monotonic time of its last instance
        self._writers: dict[str, int] = {}  # series -> C-STORE handlers writing into it right now
        self._queued: set[str] = set()
        self._queue: queue.Queue[str] = queue.Queue()
        self._current: str | None = None
        self._outbox: dict[tuple[str, str], _Delivery] = {}
        self._counts = dict.fromkeys(("stored", "refused", "processed", "failed", "duplicates", "delivered"), 0)
        self._stop, self._wake_sender = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None

    def _subgroups(self) -> list[str] | None:
        """The network's subgroup names, read from the inference configs."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(self.inference_config_files)
        parser.update(self.inference_overrides)
        return list(parser.get_parsed_content("subgroups")) if "subgroups" in parser else None

    # ---------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Recover the on-disk state, start the worker threads and listen; returns once listening."""
        for folder in (self.spool, self.processing, self.results, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        fsync_folder(str(self.work_dir))
        self._stop.clear()
        self._recover()
        ae = _AllowListAE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts  # non-CT classes reach the handler to be refused
        ae.add_supported_context(CTImageStorage, list(CT_COMPRESSED_TRANSFER_SYNTAXES))  # added to the defaults
        ae.add_supported_context(Verification)
        ae.require_calling_aet = self.allowed_calling_aets
        ae.refuse_everyone = not self.allowed_calling_aets
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        self._server = ae.start_server((self.bind_address, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        for target in (self._watch_loop, self._work_loop, self._send_loop):
            thread = threading.Thread(target=target, name=f"dicom-node-{target.__name__.strip('_')}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self.allowed_calling_aets:
            logger.warning("allowed_calling_aets is empty: every association is refused.")
        logger.info(
            "DICOM node %s listening on %s:%d (calling AEs %s; destinations %s; quiet %.1f s; work_dir %s).",
            self.ae_title, self.bind_address, self.port, self.allowed_calling_aets,
            [d.key for d in self.destinations], self.quiet_seconds, self.work_dir,
        )  # fmt: skip

    def stop(self, timeout: float = 60.0) -> None:
        """Stop listening and stop the threads (waits up to ``timeout`` for a running series or delivery).

        Whatever is not finished stays on disk and is resumed by the next :meth:`start`.
        """
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self._wake_sender.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        logger.info("DICOM node %s stopped.", self.ae_title)

    def serve_forever(self) -> None:
        """Start (unless started) and block until SIGINT/SIGTERM, then stop cleanly."""
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            logger.info("Received %s: stopping.", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self._server is None:
                self.start()
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is being received, queued, processed or waiting for delivery; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = self._arrivals or self._writers or self._queued or self._current or self._outbox
            if not busy:
                return True
            time.sleep(0.05)
        return False

    def status(self) -> dict[str, Any]:
        """Counts: series receiving/queued/processing, pending deliveries, and totals since start."""
        with self._lock:
            return {
                "receiving": len(self._arrivals),
                "queued": len(self._queued),
                "processing": int(self._current is not None),
                "current": self._current,
                "pending_deliveries": len(self._outbox),
                **self._counts,
            }

    def _recover(self) -> None:
        """Queue what a previous run left: processing/ first, then spool/ (quiet timer restarts), and deliveries."""
        now = time.monotonic()
        for folder in (self.results, self.failed):
            for stale in folder.glob(".*"):  # unfinished result folders and replaced ones
                shutil.rmtree(stale, ignore_errors=True)
        for folder, in_spool in ((self.processing, False), (self.spool, True)):
            for path in sorted(folder.iterdir()):
                uid = safe_uid(path.name)
                if uid is None or not path.is_dir():
                    logger.warning("Ignoring %s: not a series folder written by this node.", path)
                    continue
                for tmp in path.glob(".*"):
                    tmp.unlink(missing_ok=True)  # a temp file of a write that was never acknowledged
                if in_spool:
                    self._arrivals[uid] = now
                elif uid not in self._queued:
                    self._queued.add(uid)
                    self._queue.put(uid)
                logger.info("Recovered series %s from %s.", uid, folder.name)
        for path in sorted(self.results.glob("*/delivery.json")):
            record = _read_json(path)
            try:
                if not isinstance(record, dict):
                    raise DicomNodeError("not a readable JSON object")
                self._queue_deliveries(path.parent.name, record, now)
            except DicomNodeError as err:
                logger.error("Cannot resume the deliveries of %s: %s; fix or remove the file.", path, err)

    # --------------------------------------------------------------------------------------------- receiving

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        logger.warning(
            "Refused association from calling AE %r at %s: not in allowed_calling_aets.",
            requestor.ae_title, requestor.address,
        )  # fmt: skip

    def _refuse(self, status: int, sop_uid: str, why: str) -> int:
        with self._lock:
            self._counts["refused"] += 1
        logger.warning("Refused instance %s (status 0x%04X): %s.", sop_uid, status, why)
        return status

    def _on_store(self, event: evt.Event) -> int:
        """C-STORE handler: check the instance, write it durably to the spool, then acknowledge."""
        sop_uid = str(event.request.AffectedSOPInstanceUID or "(unknown)")
        sop_class = event.context.abstract_syntax
        if sop_class != CTImageStorage:
            name = getattr(pydicom.uid.UID(sop_class), "name", sop_class)
            return self._refuse(STATUS_SOP_CLASS_NOT_SUPPORTED, sop_uid, f"SOP class {name} is not CT Image Storage")
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta  # the transfer syntax, needed to decode the pixel data
            series_uid, ds_sop_uid = ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
            missing = [k for k, v in (("SeriesInstanceUID", series_uid), ("SOPInstanceUID", ds_sop_uid)) if not v]
            if "PixelData" not in ds:
                missing.append("PixelData")
        except Exception as err:  # pydicom raises many types for a stream it cannot parse
            return self._refuse(STATUS_CANNOT_UNDERSTAND, sop_uid, f"cannot decode the data set ({type(err).__name__})")
        if missing:
            return self._refuse(STATUS_DATASET_MISMATCH, sop_uid, f"missing {', '.join(missing)}")
        series, sop = safe_uid(series_uid), safe_uid(ds_sop_uid)
        if series is None or sop is None:
            return self._refuse(STATUS_DATASET_MISMATCH, sop_uid, "SeriesInstanceUID/SOPInstanceUID is not a valid UID")
        if sop != sop_uid:
            return self._refuse(STATUS_DATASET_MISMATCH, sop_uid, f"data set SOPInstanceUID is {sop}")
        try:
            _ = ds.pixel_array
        except Exception as err:  # truncated pixel data, unsupported encoding, ...
            return self._refuse(STATUS_CANNOT_UNDERSTAND, sop_uid, f"cannot decode pixel data ({type(err).__name__})")
        data = event.encoded_dataset(include_meta=True)
        with self._lock:
            self._writers[series] = self._writers.get(series, 0) + 1
            self._arrivals[series] = time.monotonic()
        try:
            folder = self.spool / series
            if not folder.is_dir():
                folder.mkdir(parents=True)
                fsync_folder(str(self.spool))
            atomic_write_bytes(data, folder / f"{sop}.dcm")
        except OSError as err:
            logger.error("Cannot spool instance %s of series %s: %s.", sop, series, err)
            return STATUS_OUT_OF_RESOURCES
        finally:
            with self._lock:
                self._writers[series] -= 1
                if not self._writers[series]:
                    del self._writers[series]
                self._arrivals[series] = time.monotonic()
        with self._lock:
            self._counts["stored"] += 1
        return STATUS_SUCCESS

    # -------------------------------------------------------------------------------------------- processing

    def _watch_loop(self) -> None:
        """Queue every spooled series that has been quiet for ``quiet_seconds``."""
        while not self._stop.wait(self.poll_seconds):
            now = time.monotonic()
            with self._lock:
                for uid, last in sorted(self._arrivals.items(), key=lambda item: item[1]):
                    if uid not in self._writers and uid not in self._queued and now - last >= self.quiet_seconds:
                        self._queued.add(uid)
                        self._queue.put(uid)

    def _claim(self, uid: str) -> bool:
        """Move a quiet spool folder to processing/ (False when new instances arrived meanwhile)."""
        with self._lock:
            if uid in self._arrivals:
                last = self._arrivals[uid]
                if uid in self._writers or time.monotonic() - last < self.quiet_seconds:
                    self._queued.discard(uid)  # not quiet any more: the watcher queues it again later
                    return False
                del self._arrivals[uid]
                source, target = self.spool / uid, self.processing / uid
                if not source.is_dir():  # nothing was written (every write of the series failed)
                    self._queued.discard(uid)
                    return False
                if target.exists():  # a recovered, unfinished copy: merge the instances
                    for path in source.iterdir():
                        path.replace(target / path.name)
                    source.rmdir()
                else:
                    source.rename(target)
                fsync_folder(str(self.spool))
                fsync_folder(str(self.processing))
            self._queued.discard(uid)
            self._current = uid
        return True

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self._queue.get(timeout=self.poll_seconds)
            except queue.Empty:
                continue
            try:
                if self._claim(uid):
                    self._process(uid)
            except Exception:  # keep serving; the series stays on disk and is queued again at the next start
                logger.exception("Series %s: unexpected error; it is queued again at the next start.", uid)
            finally:
                with self._lock:
                    self._current = None
                    self._queued.discard(uid)

    def _process(self, uid: str) -> None:
        """Infer one claimed series into results/ (or move it to failed/), then queue its delivery."""
        folder = self.processing / uid
        files = sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))
        if not files:
            shutil.rmtree(folder, ignore_errors=True)
            return
        fingerprint = series_fingerprint(p.stem for p in files)  # file names are the SOPInstanceUIDs
        result_dir = self.results / uid
        previous = _read_json(result_dir / "result.json")
        sop_uids = sorted(p.stem for p in files)
        earlier = set(previous.get("sop_instance_uids", [])) if previous else set()
        # the same instances again, or a resend of some of them: the earlier result stands
        if previous and (previous.get("fingerprint") == fingerprint or set(sop_uids) <= earlier):
            logger.info("Series %s: duplicate of its processed result (%d instances); not re-sent.", uid, len(files))
            shutil.rmtree(folder)
            with self._lock:
                self._counts["duplicates"] += 1
            return
        if previous:
            logger.info(
                "Series %s: instance set differs from the earlier result (%s -> %d instances); re-processing, the "
                "earlier result will be replaced.", uid, previous.get("instance_count"), len(files),
            )  # fmt: skip
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{uid}.", suffix=".tmp", dir=self.results))
        try:
            subgroup = self.subgroup_source.resolve(read_header(files[0]), uid)
            self._infer(folder, tmp, subgroup)
            names = {"rtstruct": f"RS_{uid}.dcm", "seg": f"SEG_{uid}.dcm"}
            absent = [n for key, n in names.items() if not (tmp / n).is_file() and (key == "rtstruct" or self.send_seg)]
            if absent:
                raise RuntimeError(f"inference wrote no {absent}")
            names.update(("mask", p.name) for p in tmp.glob("*_seg.nii.gz"))  # <series uid>_seg.nii.gz
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            self._fail(uid, folder, err)
            return
        result = {
            "series_instance_uid": uid,
            "instance_count": len(files),
            "fingerprint": fingerprint,
            "sop_instance_uids": sop_uids,
            "subgroup": subgroup,
            "files": names,
            "timings": {"inference_seconds": round(time.monotonic() - started, 3), "finished_at": _now()},
        }
        delivery = {
            "series_instance_uid": uid,
            "fingerprint": fingerprint,
            "destinations": {
                d.key: {"ae_title": d.ae_title, "host": d.host, "port": d.port, "done": False, "attempts": 0}
                for d in self.destinations
            },
        }
        atomic_write_json(result, tmp / "result.json")
        atomic_write_json(delivery, tmp / "delivery.json")
        _fsync_tree(tmp)
        with self._lock:
            old = None
            if result_dir.exists():
                old = result_dir.with_name(f".{uid}.replaced")
                shutil.rmtree(old, ignore_errors=True)
                result_dir.rename(old)
            tmp.rename(result_dir)
            fsync_folder(str(self.results))
            for key in [k for k in self._outbox if k[0] == uid]:
                del self._outbox[key]  # deliveries of the replaced result are superseded
            self._queue_deliveries(uid, delivery, time.monotonic())
            self._counts["processed"] += 1
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(folder)
        fsync_folder(str(self.processing))
        self._wake_sender.set()
        logger.info(
            "Series %s: %d instances processed (subgroup %s) in %.1f s; queued for %d destination(s).",
            uid, len(files), subgroup, result["timings"]["inference_seconds"], len(self.destinations),
        )  # fmt: skip

    def _infer(self, series_dir: Path, out_dir: Path, subgroup: str | None) -> None:
        """Run the bundle's DICOM inference on one series folder."""
        from monai.bundle import ConfigWorkflow

        workflow = ConfigWorkflow(
            config_file=self.inference_config_files, workflow_type="infer", run_id="inference",
            logging_file=False,  # the bundle's logging.conf would disable the node's loggers
            **self.inference_overrides, input_dir=str(series_dir), output_dir=str(out_dir), subgroup=subgroup,
        )  # fmt: skip
        workflow.initialize()
        workflow.run()
        workflow.finalize()

    def _fail(self, uid: str, folder: Path, err: Exception) -> None:
        """Move a series that could not be processed to failed/<uid>/ with a reason.txt; log one ERROR line."""
        series_err = _series_error(err)
        if series_err is not None:
            reason = f"refused by the CT checks ({type(series_err).__name__}): {series_err}"
        else:
            reason = f"inference failed ({type(err).__name__}): {err}"
        logger.error("Series %s: no RTSTRUCT, %s", uid, reason)
        target = self.failed / uid
        if target.exists():
            shutil.rmtree(target)  # an earlier failure of the same series is superseded
        folder.rename(target)
        fsync_folder(str(self.processing))
        atomic_write_bytes(f"{_now()} series {uid}: {reason}\n".encode(), target / "reason.txt")
        with self._lock:
            self._counts["failed"] += 1

    # ---------------------------------------------------------------------------------------------- delivery

    def _queue_deliveries(self, uid: str, delivery: Mapping[str, Any], due: float) -> None:
        """Add the not-yet-done destinations of a ``delivery.json`` to the outbox (caller holds the lock)."""
        for key, entry in (delivery.get("destinations") or {}).items():
            if not entry.get("done"):
                dest = Destination.parse(entry)
                self._outbox[(uid, key)] = _Delivery(uid, dest, int(entry.get("attempts", 0)), due)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_sender.clear()
            with self._lock:
                pending = min(self._outbox.values(), key=lambda d: d.due, default=None)
            if pending is None or pending.due > time.monotonic():
                wait = 1.0 if pending is None else min(1.0, pending.due - time.monotonic())
                self._wake_sender.wait(max(0.0, wait))
                continue
            self._deliver(pending)

    def _deliver(self, item: _Delivery) -> None:
        """One delivery attempt; records the outcome in delivery.json and schedules a retry on failure."""
        result_dir = self.results / item.uid
        paths = [result_dir / f"RS_{item.uid}.dcm"] + ([result_dir / f"SEG_{item.uid}.dcm"] if self.send_seg else [])
        if not result_dir.is_dir():  # removed by hand: there is nothing left to send
            with self._lock:
                self._outbox.pop((item.uid, item.dest.key), None)
            logger.error("Series %s: its result folder was removed; delivery to %s abandoned.", item.uid, item.dest.key)
            return
        try:
            error = self._c_store(item.dest, [pydicom.dcmread(p) for p in paths])
        except Exception as err:  # unreadable result file (replaced meanwhile?) or a pynetdicom error
            error = f"{type(err).__name__}: {err}"
        with self._lock:
            if self._outbox.get((item.uid, item.dest.key)) is not item:
                return  # the result was replaced while sending
            item.attempts += 1
            record = _read_json(result_dir / "delivery.json") or {}
            entry = record.setdefault("destinations", {}).setdefault(item.dest.key, {})
            entry.update(ae_title=item.dest.ae_title, host=item.dest.host, port=item.dest.port)
            entry.update(done=error is None, attempts=item.attempts, last_error=error, last_attempt_at=_now())
            if error is None:
                entry["delivered_at"] = entry["last_attempt_at"]
                del self._outbox[(item.uid, item.dest.key)]
                self._counts["delivered"] += 1
            else:
                r = self.retry
                delay = min(r["initial_seconds"] * r["factor"] ** (item.attempts - 1), r["max_seconds"])
                item.due = time.monotonic() + delay
                entry["next_attempt_in_seconds"] = delay
            atomic_write_json(record, result_dir / "delivery.json")
        if error is None:
            logger.info("Series %s: delivered %s to %s.", item.uid, [p.name for p in paths], item.dest.key)
        else:
            at = (datetime.now().astimezone() + timedelta(seconds=delay)).isoformat(timespec="seconds")
            logger.warning(
                "Series %s: delivery to %s failed (attempt %d: %s); next retry in %.1f s at %s.",
                item.uid, item.dest.key, item.attempts, error, delay, at,
            )  # fmt: skip

    def _c_store(self, dest: Destination, datasets: Sequence[Dataset]) -> str | None:
        """C-STORE the datasets in one association; None on success (every status 0x0000), else the reason."""
        ae = AE(ae_title=self.ae_title)
        for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            return "association rejected or aborted, or destination unreachable"
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code != STATUS_SUCCESS:
                    shown = "no response" if code is None else f"0x{int(code):04X}"
                    return f"C-STORE of {ds.SOPInstanceUID} answered {shown}"
        finally:
            assoc.release()
        return None


# ----------------------------------------------------------------------------------------------------- CLI


def _parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs; values are read as JSON when they parse, else as strings."""
    overrides: dict[str, Any] = {}
    items = list(args)
    while items:
        token = items.pop(0)
        if not token.startswith("--") or len(token) < 3:
            raise DicomNodeError(f"expected --key value, got {token!r}.")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if not items:
                raise DicomNodeError(f"--{key} needs a value.")
            value = items.pop(0)
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.dicom_node --config bundle/configs/dicom_node.json [--port 11113 ...]``."""
    from monai.bundle import ConfigParser

    default = Path(__file__).resolve().parents[1] / "configs" / "dicom_node.json"
    epilog = "Other --key value pairs override config settings (JSON values), e.g. --port 11113."
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog)
    ap.add_argument("--config", nargs="+", default=[str(default)], help="config file(s), merged in order")
    ap.add_argument("--log_level", default="INFO", help="logging level (default INFO)")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        parser = ConfigParser()
        parser.read_config(args.config)
        parser.update(_parse_overrides(rest))
        node = parser.get_parsed_content("node")
    except Exception as err:  # MONAI wraps errors raised while instantiating the node in a RuntimeError
        cause = err
        while cause.__cause__ is not None and not isinstance(cause, DicomNodeError):
            cause = cause.__cause__
        print(f"error: {cause}", file=sys.stderr)
        return 2
    node.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
