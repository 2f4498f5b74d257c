"""The inference worker: queues quiet series, runs the bundle's DICOM inference one series at a time, and publishes
each result (or moves the series to failed/; a series that ran out of disk space is retried instead)."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.dicom_series import DicomSeriesError, read_header
from scripts.safe_io import atomic_write_bytes, atomic_write_json, fsync_folder

from .inference import BundleInference
from .metrics import NodeMetrics
from .sender import Outbox
from .settings import Destination, DicomNodeError, now_iso, read_json, series_fingerprint
from .spool import Spool
from .storage import DiskGuard, disk_full_error
from .subgroups import SubgroupSource

logger = logging.getLogger(__name__)


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


class Worker:
    """One thread turning quiet spool series into results, strictly one series at a time.

    Below the disk floor no new series is started; the worker resumes on its own when space returns. A series whose
    inference or result writing runs out of space (ENOSPC, EDQUOT) publishes nothing, stays in ``processing/`` and
    queued, and is tried again after ``disk_full_retry_seconds`` (no other series starts in between).
    """

    def __init__(self, spool: Spool, results: Path, failed: Path, outbox: Outbox, disk: DiskGuard,
                 metrics: NodeMetrics, subgroup_source: SubgroupSource, inference: BundleInference,
                 destinations: Sequence[Destination], send_seg: bool, quiet_seconds: float,
                 disk_full_retry_seconds: float = 60.0):  # fmt: skip
        if not float(disk_full_retry_seconds) > 0:
            raise DicomNodeError(f"disk_full_retry_seconds must be > 0, got {disk_full_retry_seconds!r}.")
        self.spool, self.results, self.failed, self.outbox = spool, Path(results), Path(failed), outbox
        self.disk, self.metrics, self.subgroup_source, self.inference = disk, metrics, subgroup_source, inference
        self.destinations, self.send_seg, self.quiet_seconds = list(destinations), send_seg, quiet_seconds
        self.disk_full_retry_seconds = float(disk_full_retry_seconds)
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._disk_full_tries: dict[str, int] = {}  # series -> attempts that ran out of space in a row
        self.current: str | None = None

    def enqueue(self, uid: str) -> None:
        with self._lock:
            if uid not in self._queued:
                self._queued.add(uid)
                self._queue.put(uid)

    def queue_quiet_series(self) -> None:
        """Queue every spooled series that has been quiet for ``quiet_seconds`` (called by the watcher)."""
        for uid in self.spool.quiet(self.quiet_seconds):
            self.enqueue(uid)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._queued or self.current)

    def queued(self) -> int:
        with self._lock:
            return len(self._queued)

    def loop(self, stop: threading.Event, poll_seconds: float) -> None:
        while not stop.is_set():
            try:
                uid = self._queue.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            while not stop.is_set() and not self.disk.above_floor():
                stop.wait(max(poll_seconds, 1.0))  # below the floor: start nothing until space returns
            if not self._take(uid):  # out of space: the series stays queued; start nothing until the retry
                stop.wait(self.disk_full_retry_seconds)
                self._queue.put(uid)

    def _take(self, uid: str) -> bool:
        """Claim and process one series; False when it ran out of disk space (it is then kept in the queue)."""
        finished = True
        try:
            if self.spool.claim(uid, self.quiet_seconds):
                with self._lock:
                    self.current = uid
                    self._queued.discard(uid)
                finished = self.process(uid)
        except Exception:  # keep serving; the series stays on disk and is queued again at the next start
            logger.exception("Series %s: unexpected error; it is queued again at the next start.", uid)
        finally:
            with self._lock:
                self.current = None
                if finished:
                    self._queued.discard(uid)
                else:
                    self._queued.add(uid)
        return finished

    def _is_duplicate(self, uid: str, sop_uids: list[str], fingerprint: str) -> bool:
        """Whether the arrival repeats (some of) the instances of the series' current result."""
        previous = read_json(self.results / uid / "result.json")
        if not previous:
            return False
        if previous.get("fingerprint") == fingerprint or set(sop_uids) <= set(previous.get("sop_instance_uids", [])):
            return True
        logger.info(
            "Series %s: instance set differs from the earlier result (%s -> %d instances); re-processing, the "
            "earlier result will be replaced.", uid, previous.get("instance_count"), len(sop_uids),
        )  # fmt: skip
        return False

    def process(self, uid: str) -> bool:
        """Infer one claimed series into results/ (or move it to failed/), then queue its delivery.

        Returns False when the disk ran out of space: nothing is published and the series stays in processing/.
        """
        folder = self.spool.processing_dir / uid
        files = sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))
        if not files:
            shutil.rmtree(folder, ignore_errors=True)
            return True
        sop_uids = sorted(p.stem for p in files)  # file names are the SOPInstanceUIDs
        fingerprint = series_fingerprint(sop_uids)
        if self._is_duplicate(uid, sop_uids, fingerprint):
            logger.info("Series %s: duplicate of its processed result (%d instances); not re-sent.", uid, len(files))
            shutil.rmtree(folder)
            self.metrics.inc("duplicates")
            return True
        result = {"series_instance_uid": uid, "instance_count": len(files), "fingerprint": fingerprint,
                  "sop_instance_uids": sop_uids}  # fmt: skip
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{uid}.", suffix=".tmp", dir=self.results))
            delivery = self._infer_into(tmp, folder, files, result)
        except Exception as err:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing partial stays in results/
            full = disk_full_error(err)
            if full is not None:
                self._defer(uid, full)
                return False
            self._fail(uid, folder, err)
            return True
        self._disk_full_tries.pop(uid, None)
        self._publish(uid, tmp, delivery)
        shutil.rmtree(folder)
        fsync_folder(str(self.spool.processing_dir))
        logger.info(
            "Series %s: %d instances processed (subgroup %s) in %.1f s; queued for %d destination(s).",
            uid, len(files), result["subgroup"], result["timings"]["inference_seconds"], len(self.destinations),
        )  # fmt: skip
        return True

    def _infer_into(self, tmp: Path, folder: Path, files: list[Path], result: dict[str, Any]) -> dict[str, Any]:
        """Infer the series into the temp folder and complete ``result`` there (with ``result.json`` and
        ``delivery.json``, all fsync-ed); returns the delivery record."""
        started, builds = time.monotonic(), self.inference.builds
        uid = result["series_instance_uid"]
        result["subgroup"] = self.subgroup_source.resolve(read_header(files[0]), uid)
        result["files"] = self._infer(folder, tmp, result["subgroup"])
        result["timings"] = {
            "inference_seconds": round(time.monotonic() - started, 3),
            "workflow_built": self.inference.builds > builds,  # False: the kept (warm) workflow was reused
            "finished_at": now_iso(),
        }
        result["last_instance_at"] = max(p.stat().st_mtime for p in files)  # written just before its acknowledgement
        delivery = {
            "series_instance_uid": uid,
            "fingerprint": result["fingerprint"],
            "last_instance_at": result["last_instance_at"],
            "destinations": {
                d.key: {"ae_title": d.ae_title, "host": d.host, "port": d.port, "done": False, "attempts": 0}
                for d in self.destinations
            },
        }
        atomic_write_json(result, tmp / "result.json")
        atomic_write_json(delivery, tmp / "delivery.json")
        _fsync_tree(tmp)
        return delivery

    def _infer(self, series_dir: Path, out_dir: Path, subgroup: str | None) -> dict[str, str]:
        """Run the bundle's DICOM inference on one series folder; returns the names of the files it wrote."""
        self.inference.run(series_dir, out_dir, subgroup)
        uid = series_dir.name
        names = {"rtstruct": f"RS_{uid}.dcm", "seg": f"SEG_{uid}.dcm"}
        absent = [n for key, n in names.items() if not (out_dir / n).is_file() and (key == "rtstruct" or self.send_seg)]
        if absent:
            raise RuntimeError(f"inference wrote no {absent}")
        names.update(("mask", p.name) for p in out_dir.glob("*_seg.nii.gz"))  # <series uid>_seg.nii.gz
        return names

    def _publish(self, uid: str, tmp: Path, delivery: dict[str, Any]) -> None:
        """Rename the finished temp folder to results/<uid>/ (replacing an earlier result) and queue its delivery."""
        result_dir, old = self.results / uid, None
        with self.outbox.lock:
            if result_dir.exists():
                old = result_dir.with_name(f".{uid}.replaced")
                shutil.rmtree(old, ignore_errors=True)
                result_dir.rename(old)
            tmp.rename(result_dir)
            fsync_folder(str(self.results))
            self.outbox.drop_series(uid)  # deliveries of the replaced result are superseded
            self.outbox.add(uid, delivery, time.monotonic(), time.time())
            self.metrics.inc("processed")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _defer(self, uid: str, err: OSError) -> None:
        """Keep a series that ran out of disk space for a retry: one ERROR line, one ``disk_full`` refusal counted."""
        tries = self._disk_full_tries[uid] = self._disk_full_tries.get(uid, 0) + 1
        try:
            free = f"{self.disk.free_bytes()} bytes"
        except OSError:
            free = "unknown"
        logger.error(
            "Series %s: deferred (cause=disk_full): work_dir ran out of space during inference or result writing "
            "(%s; attempt %d; free now %s); nothing was published, the series stays in processing/ and is retried "
            "in %.1f s.",
            uid, err, tries, free, self.disk_full_retry_seconds,
        )  # fmt: skip
        self.metrics.refusal("disk_full")

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
        fsync_folder(str(self.spool.processing_dir))
        atomic_write_bytes(f"{now_iso()} series {uid}: {reason}\n".encode(), target / "reason.txt")
        self.metrics.inc("failed")
