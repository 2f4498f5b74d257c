"""Progress of a long benchmark: one line per training epoch and an overall bar with the time left.

A run trains in a child process (``monai.bundle run``) whose log goes to ``<work>/<run>/run.log``
(``bench/runcache.py``). :class:`LogFollower` reads that file while the run goes on and hands every finished
training epoch (MONAI's ``Epoch[n] Complete. Time taken`` line of the trainer, with the latest validation metrics
of ``Epoch[n] Metrics --``) to :class:`Progress`, which prints::

    fold0 fairdro s0  epoch 3/10  4.1 s  val_mean_dice 0.812  [#######-------------]  35%  about 6 min left

The share done counts the estimated seconds of the finished runs and of the current run's finished epochs
(``bench/datalist_probe.py``); the time left is the estimated remainder scaled by how fast the finished part went
against its estimate (actual / estimated seconds so far), so a slow or fast machine corrects the plan as it runs.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

_TRAINER_EPOCH = re.compile(r"(\w+) - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")
_METRICS = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")
_VAL = re.compile(r"(val_mean_dice|val_worst_group_dice): ([-+0-9.eE]+)")
BAR_WIDTH = 20


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#####---------------]`` for ``fraction`` in [0, 1]."""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """The overall state of a benchmark's runs (see the module notes).

    Args:
        estimates: the estimated seconds (training + evaluation) of each run to do, by run name.
        out: where the lines go.
    """

    def __init__(self, estimates: dict[str, float], out: TextIO | None = None) -> None:
        self.estimates = dict(estimates)
        self.total = max(1e-9, sum(self.estimates.values()))
        self.out = out or sys.stdout
        self.done_est = 0.0
        self.started = time.time()
        self.current: tuple[str, str, int, float] | None = None  # (run name, label, epochs, training estimate)
        self.epochs_done = 0
        self.lock = threading.Lock()

    def start_run(self, name: str, label: str, epochs: int, train_est: float) -> None:
        with self.lock:
            self.current, self.epochs_done = (name, label, epochs, train_est), 0

    def end_run(self) -> None:
        with self.lock:
            if self.current is not None:
                self.done_est += self.estimates.get(self.current[0], 0.0)
            self.current = None

    def fraction(self) -> float:
        part = 0.0
        if self.current is not None and self.current[2]:
            part = self.current[3] * min(1.0, self.epochs_done / self.current[2])
        return min(1.0, (self.done_est + part) / self.total)

    def time_left(self) -> float:
        done = self.fraction() * self.total
        speed = (time.time() - self.started) / done if done > 0 else 1.0
        return (self.total - done) * speed

    def status(self) -> str:
        return f"{bar(self.fraction())} {self.fraction():4.0%}  about {duration(self.time_left())} left"

    def epoch(self, epoch: int, seconds: float, metrics: dict[str, float]) -> None:
        """Print the line of a finished training epoch."""
        with self.lock:
            if self.current is None:
                return
            self.epochs_done = epoch
            _, label, epochs, _ = self.current
            vals = [f"{k} {v:.3f}" for k, v in metrics.items()]
            parts = [label, f"epoch {epoch}/{epochs}", f"{seconds:.1f} s", *vals]
            line = "  " + "  ".join([*parts, self.status()])
        print(line, file=self.out, flush=True)


class LogFollower(threading.Thread):
    """Follow a run's log while it grows and report each finished training epoch to a :class:`Progress`."""

    def __init__(self, log: Path, progress: Progress, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.log, self.progress, self.interval = log, progress, interval
        self.stopped = threading.Event()
        self.offset, self.partial = 0, ""
        self.metrics: dict[str, float] = {}

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.read()
        self.read()

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def read(self) -> None:
        try:
            size = self.log.stat().st_size
        except OSError:
            return
        if size < self.offset:  # the run's folder was cleared: a new log
            self.offset, self.partial = 0, ""
        with self.log.open("r", errors="replace") as fh:
            fh.seek(self.offset)
            text = self.partial + fh.read()
            self.offset = fh.tell()
        *lines, self.partial = text.split("\n")
        for line in lines:
            self.line(line)

    def line(self, line: str) -> None:
        m = _METRICS.search(line)
        if m:
            self.metrics.update({k: float(v) for k, v in _VAL.findall(m.group(2))})
        m = _TRAINER_EPOCH.search(line)
        if m and m.group(1) != "SupervisedEvaluator":
            seconds = int(m.group(3)) * 3600 + int(m.group(4)) * 60 + float(m.group(5))
            self.progress.epoch(int(m.group(2)), seconds, dict(self.metrics))
