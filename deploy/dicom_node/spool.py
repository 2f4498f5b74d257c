"""spool/ and processing/: durable instance writes, per-series quiet timers, and claims of complete series."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from scripts.safe_io import atomic_write_bytes, fsync_folder

from .settings import safe_uid
from .storage import OWNER_ONLY

logger = logging.getLogger(__name__)


class Spool:
    """Instances of incomplete series, grouped by SeriesInstanceUID, and the move of a quiet series to processing/.

    ``arrivals`` maps a series in ``spool/`` to the monotonic time of its last instance; ``writers`` counts the
    C-STORE handlers writing into a series right now (a series being written is never claimed).
    """

    def __init__(self, spool_dir: Path, processing_dir: Path):
        self.spool_dir, self.processing_dir = Path(spool_dir), Path(processing_dir)
        self._lock = threading.Lock()
        self._arrivals: dict[str, float] = {}
        self._writers: dict[str, int] = {}

    def write(self, series: str, sop: str, data: bytes) -> None:
        """Write one instance durably (temp file, fsync, rename, folder fsync). Raises OSError when it cannot."""
        with self._lock:
            self._writers[series] = self._writers.get(series, 0) + 1
            self._arrivals[series] = time.monotonic()
        try:
            folder = self.spool_dir / series
            if not folder.is_dir():
                folder.mkdir(mode=OWNER_ONLY, exist_ok=True)
                fsync_folder(str(self.spool_dir))
            atomic_write_bytes(data, folder / f"{sop}.dcm")
        finally:
            with self._lock:
                self._writers[series] -= 1
                if not self._writers[series]:
                    del self._writers[series]
                self._arrivals[series] = time.monotonic()

    def quiet(self, quiet_seconds: float) -> list[str]:
        """Series without a new instance for ``quiet_seconds`` and no write under way, oldest first."""
        now = time.monotonic()
        with self._lock:
            ordered = sorted(self._arrivals.items(), key=lambda item: item[1])
            return [uid for uid, last in ordered if uid not in self._writers and now - last >= quiet_seconds]

    def claim(self, uid: str, quiet_seconds: float) -> bool:
        """Move a quiet series to ``processing/`` by one rename (False when it is not quiet any more or empty).

        A series recovered in ``processing/`` (no arrival recorded) is claimed as it is.
        """
        with self._lock:
            if uid not in self._arrivals:
                return (self.processing_dir / uid).is_dir()
            if uid in self._writers or time.monotonic() - self._arrivals[uid] < quiet_seconds:
                return False
            del self._arrivals[uid]
            source, target = self.spool_dir / uid, self.processing_dir / uid
            if not source.is_dir():  # nothing was written (every write of the series failed)
                return target.is_dir()
            if target.exists():  # a recovered, unfinished copy: merge the instances
                for path in source.iterdir():
                    path.replace(target / path.name)
                source.rmdir()
            else:
                source.rename(target)
            fsync_folder(str(self.spool_dir))
            fsync_folder(str(self.processing_dir))
        return True

    def busy(self) -> bool:
        with self._lock:
            return bool(self._arrivals or self._writers)

    def receiving(self) -> int:
        with self._lock:
            return len(self._arrivals)

    def recover(self) -> list[str]:
        """What a previous run left: returns the ``processing/`` series (to queue first); restarts the quiet timer
        of every ``spool/`` series (instances may still be arriving). Temp files of unacknowledged writes go."""
        now = time.monotonic()
        unfinished = []
        for folder, in_spool in ((self.processing_dir, False), (self.spool_dir, True)):
            for path in sorted(folder.iterdir()):
                uid = safe_uid(path.name)
                if uid is None or not path.is_dir():
                    logger.warning("Ignoring %s: not a series folder written by this node.", path)
                    continue
                for tmp in path.glob(".*"):
                    tmp.unlink(missing_ok=True)
                if in_spool:
                    with self._lock:
                        self._arrivals[uid] = now
                else:
                    unfinished.append(uid)
                logger.info("Recovered series %s from %s.", uid, folder.name)
        return unfinished
