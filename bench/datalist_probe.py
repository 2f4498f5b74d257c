"""The probe of the benchmark on a user's datalist: one short timed training, and the plan's time and disk estimates.

Before the first run, :func:`run_probe` trains ``fairdro`` (the dearest variant) for **two epochs** on at most
:data:`PROBE_TRAIN` training and :data:`PROBE_VAL` validation items of the first split, with the plan's profile and
overrides. From its log (MONAI's ``Epoch[n] Complete. Time taken`` lines of the trainer and the
validation) it keeps:

- ``train_case_s``: (the fastest trainer epoch - the fastest validation) / training items; ``val_case_s``: the
  fastest validation / validation items (the fastest epoch is the steady cost: the first one carries one-time costs,
  and on a shared machine any epoch can be slowed by other work);
- ``startup_s``: the rest of the process's wall time (imports, config parsing, the cohort check, caching, the first
  epoch's one-time costs);
- the size of the saved ``model.pt`` and of one checkpoint.

:func:`estimate_run` turns these into a run's seconds: training ``startup + epochs * (n_train * train_case_s + n_val
* val_case_s)``, evaluation ``startup + n_test * val_case_s * EVAL_FACTOR`` (the evaluation also inverts the
transforms, scores HD95 and NSD and draws the report). Every variant is estimated at ``fairdro``'s cost (``erm``,
without dMoE layers, is cheaper: the estimate is an upper bound). The probe is cached
in ``OUT/probe.json`` under a key of its configuration and datalist, so a resumed benchmark does not probe again.
:func:`disk_estimate`: the weights each run keeps in the scratch folder (for a re-evaluation without training), the
small files, and the checkpoints one run holds at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runcache  # noqa: E402

PROBE_TRAIN, PROBE_VAL, PROBE_EPOCHS = 16, 4, 2
#: the probed variant: the dearest (dMoE layers, the DRO bank refresh), so the estimates are upper bounds
PROBE_VARIANT = "fairdro"
EVAL_FACTOR = 3.0
#: small files and report of one run (per_case.csv, metrics.json, report.html, thumbnails), besides its weights
RUN_FILES_BYTES = 400_000
_COMPLETE = re.compile(r"(\w+) - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")
EVALUATOR = "SupervisedEvaluator"


@dataclass(frozen=True)
class Probe:
    """What one short training told (see the module notes)."""

    key: str
    variant: str
    device: str
    n_train: int
    n_val: int
    wall_s: float
    startup_s: float
    train_case_s: float
    val_case_s: float
    model_bytes: int
    checkpoint_bytes: int


def _seconds(h: str, m: str, s: str) -> float:
    return int(h) * 3600 + int(m) * 60 + float(s)


def parse_probe_log(text: str) -> dict[str, list[float]]:
    """``trainer_s`` and ``val_s``: the seconds of each training epoch and of each validation, in order."""
    out: dict[str, list[float]] = {"trainer_s": [], "val_s": []}
    for m in _COMPLETE.finditer(text):
        out["val_s" if m.group(1) == EVALUATOR else "trainer_s"].append(_seconds(*m.group(3, 4, 5)))
    return out


def probe_key(spec: runcache.RunSpec) -> str:
    """The probe's cache key: its training configuration and its datalist (not the files' times: a rewritten image
    does not change how long an epoch takes)."""
    blob = {"config": runcache.resolved_config(spec, evaluation=False), "fold": spec.cohort.get("split_sha256"),
            "seed": spec.seed}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_probe(path: Path, key: str) -> Probe | None:
    """The cached probe in ``path`` when its key is ``key``."""
    try:
        data = json.loads(path.read_text())
        return Probe(**data) if data.get("key") == key else None
    except (OSError, ValueError, TypeError):
        return None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def steady_costs(times: dict[str, list[float]], wall: float, n_train: int, n_val: int) -> dict[str, float]:
    """``startup_s``, ``train_case_s`` and ``val_case_s`` of a probe (module notes) from its epochs' seconds
    (:func:`parse_probe_log`) and its wall time."""
    epoch, val = min(times["trainer_s"] or [0.0]), min(times["val_s"] or [0.0])
    return {"startup_s": round(max(0.0, wall - len(times["trainer_s"]) * epoch), 2),
            "train_case_s": max(0.0, epoch - val) / max(1, n_train), "val_case_s": val / max(1, n_val)}  # fmt: skip


def run_probe(spec: runcache.RunSpec, n_train: int, n_val: int, work: Path, device: str) -> Probe:
    """Train ``spec`` (:data:`PROBE_EPOCHS` epochs, its split already written) in ``work``; returns the probe (``work``
    is removed)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = runcache.ensure_cohort(spec.cohort, work)
    t0 = time.time()
    runcache._bundle(runcache.bundle_command(spec, "training", data, work), work / "run.log")
    wall = time.time() - t0
    costs = steady_costs(parse_probe_log((work / "run.log").read_text()), wall, n_train, n_val)
    checkpoints = sorted((work / "checkpoints").glob("*.pt"))
    probe = Probe(
        key=probe_key(spec), variant=spec.variant, device=device, n_train=n_train, n_val=n_val, wall_s=round(wall, 2),
        **costs, model_bytes=_size(work / "models" / "model.pt"),
        checkpoint_bytes=max((_size(p) for p in checkpoints), default=0),
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return probe


def write_probe(probe: Probe, path: Path) -> None:
    path.write_text(json.dumps(asdict(probe), indent=2) + "\n")


def estimate_run(probe: Probe, epochs: int, n_train: int, n_val: int, n_test: int) -> tuple[float, float]:
    """(training s, evaluation s) of a run (module notes)."""
    train = probe.startup_s + epochs * (n_train * probe.train_case_s + n_val * probe.val_case_s)
    return train, probe.startup_s + n_test * probe.val_case_s * EVAL_FACTOR


def disk_estimate(probe: Probe, n_runs: int) -> tuple[int, int]:
    """(bytes kept after ``n_runs`` runs, bytes of checkpoints held while one run trains)."""
    return n_runs * (probe.model_bytes + RUN_FILES_BYTES), 2 * probe.checkpoint_bytes
