"""The node's disk: owner-only folders, the free-space floor, full-disk errors, and retention of delivered and failed
series."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .settings import DicomNodeError, read_json

logger = logging.getLogger(__name__)

OWNER_ONLY = 0o700
DAY_SECONDS = 86400.0
#: errors that mean "no space left" (a full file system, or the user's quota): transient, gone when space returns
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full_error(err: BaseException | None) -> OSError | None:
    """The no-space ``OSError`` (:data:`DISK_FULL_ERRNOS`) in an exception chain, if any.

    MONAI and ignite wrap errors raised by transforms and handlers, so the chain (``__cause__``, then
    ``__context__``) is followed to its end.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def owner_only_folder(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it readable by the node's user only: it holds patient data."""
    path.mkdir(parents=True, exist_ok=True, mode=OWNER_ONLY)
    os.chmod(path, OWNER_ONLY)


class DiskGuard:
    """Answers whether the work folder's file system is above ``min_free_bytes``, logging each crossing once.

    ``probe`` returns the free bytes of the file system (``shutil.disk_usage``); tests replace it.
    """

    def __init__(self, folder: Path, min_free_bytes: int):
        if int(min_free_bytes) < 0:
            raise DicomNodeError(f"min_free_bytes must be >= 0, got {min_free_bytes!r}.")
        self.folder, self.min_free_bytes = Path(folder), int(min_free_bytes)
        self.probe: Callable[[], int] = lambda: shutil.disk_usage(self.folder).free
        self._below = False
        self._lock = threading.Lock()

    def free_bytes(self) -> int:
        return int(self.probe())

    def above_floor(self) -> bool:
        """True when the free space is at least ``min_free_bytes``; logs when the state changes."""
        free = self.free_bytes()
        below = free < self.min_free_bytes
        with self._lock:
            changed, self._below = below != self._below, below
        if changed and below:
            logger.error(
                "Free space %d bytes is below min_free_bytes %d: instances are answered 0xA700 and no series is "
                "started until space returns.", free, self.min_free_bytes,
            )  # fmt: skip
        elif changed:
            logger.info("Free space %d bytes is above min_free_bytes again: receiving and processing resume.", free)
        return not below

    @property
    def below(self) -> bool:
        """The state seen by the last check (no new probe)."""
        return self._below


def _age_days(path: Path, now: float) -> float | None:
    try:
        return (now - path.stat().st_mtime) / DAY_SECONDS
    except OSError:
        return None


def _mtime(folder: Path) -> float:
    """When a failed series failed (its reason.txt; the folder when there is none)."""
    reason = folder / "reason.txt"
    try:
        return (reason if reason.is_file() else folder).stat().st_mtime
    except OSError:
        return 0.0


def _delivered(result_dir: Path) -> bool:
    """Whether ``delivery.json`` confirms every destination (an unreadable or missing file confirms nothing)."""
    record = read_json(result_dir / "delivery.json")
    if record is None or not isinstance(record.get("destinations"), dict):
        return False
    return all(isinstance(e, dict) and e.get("done") is True for e in record["destinations"].values())


def _remove(folder: Path) -> None:
    """Remove a series folder: first renamed to a hidden name (gone at once; leftovers are cleared on start)."""
    hidden = folder.with_name(f".{folder.name}.expired")
    folder.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


class Retention:
    """Deletes delivered results after ``retention_days`` and failed series after ``failed_retention_days``.

    A result is deleted only when its ``delivery.json`` records every destination as done and ``is_pending`` (the
    sender's outbox) does not hold it; its age runs from the last change of ``delivery.json`` (the last delivery).
    ``None`` keeps for ever (the default for ``failed/``: a person clears it). ``failed_cap`` ``(max series,
    max bytes)``: while ``failed/`` holds more, its oldest series are deleted (one log line each).
    """

    def __init__(self, results: Path, failed: Path, retention_days: float | None, failed_retention_days: float | None,
                 failed_cap: tuple[int, int] | None = None):  # fmt: skip
        for name, value in (("retention_days", retention_days), ("failed_retention_days", failed_retention_days)):
            if value is not None and float(value) < 0:
                raise DicomNodeError(f"{name} must be null or >= 0, got {value!r}.")
        self.results, self.failed = Path(results), Path(failed)
        self.retention_days = None if retention_days is None else float(retention_days)
        self.failed_retention_days = None if failed_retention_days is None else float(failed_retention_days)
        self.failed_cap = failed_cap

    def sweep(self, is_pending: Callable[[str], bool], lock: threading.Lock, now: float | None = None) -> list[str]:
        """Delete what has expired; returns the removed folders as ``results/<uid>`` / ``failed/<uid>``."""
        now = time.time() if now is None else now
        removed = []
        if self.retention_days is not None:
            for folder in sorted(p for p in self.results.iterdir() if p.is_dir() and not p.name.startswith(".")):
                age = _age_days(folder / "delivery.json", now)
                if age is None or age < self.retention_days:
                    continue
                with lock:  # the sender and the worker change results/ under the same lock
                    if is_pending(folder.name) or not _delivered(folder):
                        continue
                    _remove(folder)
                removed.append(f"results/{folder.name}")
        if self.failed_retention_days is not None:
            for folder in sorted(p for p in self.failed.iterdir() if p.is_dir() and not p.name.startswith(".")):
                reason = folder / "reason.txt"
                age = _age_days(reason if reason.is_file() else folder, now)
                if age is not None and age >= self.failed_retention_days:
                    _remove(folder)
                    removed.append(f"failed/{folder.name}")
        for name in removed:
            logger.info("Retention: removed %s.", name)
        return removed + self._cap_failed()

    def _cap_failed(self) -> list[str]:
        """Delete the oldest failed series while ``failed/`` holds more than ``failed_cap`` (series, bytes)."""
        if self.failed_cap is None:
            return []
        max_series, max_bytes = self.failed_cap
        folders = [p for p in self.failed.iterdir() if p.is_dir() and not p.name.startswith(".")]
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folders}
        removed = []
        for folder in sorted(folders, key=lambda p: (_mtime(p), p.name)):
            count, total = len(folders) - len(removed), sum(sizes.values())
            if count <= max_series and total <= max_bytes:
                break
            _remove(folder)
            sizes.pop(folder)
            removed.append(f"failed/{folder.name}")
            logger.warning("Retention: removed failed/%s: failed/ held %d series and %d bytes, over its cap "
                           "(max_failed_series %d, max_failed_bytes %d).", folder.name, count, total, max_series,
                           max_bytes)  # fmt: skip
        return removed
