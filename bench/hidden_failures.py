"""Hidden-failures benchmark, part 1: the positive-control search (issue 29, item 1), reference variants only.

(``--part compare`` runs part 2, the comparison on the chosen setting: ``bench/hidden_failures_compare.py``;
``--part carry3d`` the 3D carry-back of its design: ``bench/hidden_failures_3d.py``.)

Can an oracle that knows the hidden minority beat the same network trained with ERM? Only where it can does a tie
between FairDRO and ERM mean "no effect". This script searches for a setting where both oracle gaps pass:

- ``oracle - erm`` (the plain backbone) and ``oracle_dmoe - dmoe`` (the dMoE network), in minority Dice on the
  testing split, each >= 0.05 with a 95% interval (two-level bootstrap over seeds and cases,
  ``ablation_stats.seed_case_bootstrap``) that excludes 0;
- at the placebo (level 0: the tagged cases follow the majority's rule) both intervals contain 0.

Only ``erm``, ``oracle``, ``dmoe`` and ``oracle_dmoe`` run, seeds 0 and 1 (the run seed; the cohort's seed is 0).

**Base setting** (the 2D probe of ``docs/method.md`` section 5, on the project's own code): the 2D synthetic cohort
(``synthetic_2d``, 64x64, minority ``ring`` at level 3, share 0.05 of every stage group), 1000 training, 300
validation and 2000 testing images (the testing split is the same size in every setting, so that at the smallest
share tried, 0.02, it still holds about 40 minority cases: at least 25); ``profiles/2d.json`` (batch 32, lr 0.005
with one warm-up epoch and cosine decay) with weight decay 1e-4; the checkpoint is chosen by validation
worst-group (stage) Dice (``key_metric: val_worst_group_dice``). The full schedule is **30 epochs**: measured on
this CPU, validation mean Dice rises by about 0.002 from epoch 20 to 25 of a 40-epoch schedule, so a 30-epoch
cosine schedule is flat (range <= 0.005) over its last quarter. Every run's own curve is checked against that rule
(``hidden_failures_report.flat_curve``) and a run that fails it is flagged in the table.

**Axes**, one at a time from the base (:data:`SETTINGS`, run in this order, most informative first; 7 settings,
56 runs, about 4 hours on the quiet 2-core CPU):

=================  ===============  ====================================================================
setting            axis             change from the base
=================  ===============  ====================================================================
``base``           -                -
``placebo``        difficulty       level 0 (the placebo: its two gaps must have intervals containing 0)
``early_stop``     regularisation   a 10-epoch schedule: a regularisation point, *not* converged
``weight_decay``   regularisation   weight decay 0.2 (lr x wd = 1e-3 per step, the probe's 0.5 x 2e-3)
``share_0.02``     minority share   0.02 (about 20 minority training and 40 testing images)
``share_0.1``      minority share   0.1
``level_2``        difficulty       level 2 (brighter ring, dimmer decoy: an easier minority)
=================  ===============  ====================================================================

The training-set size axis (``train_500``, ``train_2000``: 500 or 2000 training images, validation and testing
unchanged) is defined too but runs only when named with ``--settings`` (16 more runs, about 1.2 hours), to keep
the search near 50 runs; the share axis was preferred because the testing split's design depends on it.

Each run is cached by ``bench/runcache.py`` and kept in ``bench/results/hidden_failures/<setting>/<run>/``
(``run.json``, ``per_case.csv`` with id, stage, institution, subtype, hard and Dice, ``metrics.json``,
``train_log.json``); data, weights and logs stay in the scratch folder (``--work``). After every finished run the
calibration table is rewritten from whatever is finished: ``calibration.md`` and ``calibration.json``
(``bench/hidden_failures_report.py``).

Usage (``make benchmark-hidden-failures``)::

    python bench/hidden_failures.py [--bench full|smoke] [--settings NAME ...] [--max-runs N] [--commit]
        [--dry-run] [--report-only] [--no-nice] [--threads N] [--out DIR] [--work DIR]

- ``--commit``: after each finished run, commit its folder and the calibration table (nothing else);
- ``--max-runs N``: stop after N new runs (a time-boxed session; a later call resumes);
- ``--settings``: run only these settings (the table still lists every planned one);
- ``--dry-run``: the plan, what is cached and the estimated minutes;
- ``--no-nice``: the runs start at normal CPU priority (default: ``os.nice(10)``, so interactive work is not
  starved);
- ``--threads N``: ``OMP_NUM_THREADS`` of the runs. On a CPU shared with other work, 2 threads on 2 busy cores
  oversubscribe: the smoke bench took 133 s with 2 threads beside another training and 28 s with 1;
- ``--bench smoke``: the same code on a tiny plan (2 variants, 1 seed, 2 epochs, 60 images of 64x64), written
  under ``<work>/smoke_results``, never into the committed folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fairness_ablation as fa  # noqa: E402
import hidden_failures_report as hfr  # noqa: E402
import runcache  # noqa: E402

logger = logging.getLogger("hidden_failures")

RESULTS = runcache.REPO / "bench" / "results" / "hidden_failures"
VARIANTS = ("erm", "oracle", "dmoe", "oracle_dmoe")
SEEDS = (0, 1)
N_VAL, N_TEST = 300, 2000
PER_CASE_COLUMNS = ("id", "stage", "institution", "subtype", "hard", "dice")
#: the knobs of a setting; a setting changes exactly one of them from :data:`BASE`
BASE = {"minority_frac": 0.05, "difficulty": 3, "n_train": 1000, "epochs": 30, "weight_decay": 1e-4}
#: minutes of a run on the quiet 2-core CPU: two process starts, caching and the evaluation of 2000 images, plus
#: about 6 s per epoch per 1000 training images (5 s measured, with validation)
FIXED_MINUTES, EPOCH_SECONDS_PER_1000 = 1.5, 6.0
SMOKE_COHORT = {"spatial_dims": 2, "n_cases": 60, "seed": 0, "shape": [64, 64], "minority": "ring",
                "minority_frac": 0.1, "difficulty": 3, "split": [0.5, 0.25, 0.25]}  # fmt: skip
SMOKE_RECIPE = {"epochs": 2, "val_interval": 1, "features": 4, "num_experts": 4, "batch_size": 8,
                "optimizer#weight_decay": 1e-4, "key_metric": "val_worst_group_dice"}  # fmt: skip
SMOKE_VARIANTS = ("dmoe", "oracle_dmoe")


@dataclass(frozen=True)
class Setting:
    """One point of the search: a cohort and a recipe, with the runs of the reference variants on it."""

    name: str
    axis: str  # "base", "difficulty", "regularisation", "minority share", "training size", "smoke"
    knobs: dict[str, Any]
    cohort: dict[str, Any]
    recipe: dict[str, Any]
    specs: tuple[runcache.RunSpec, ...]
    note: str = ""
    short_schedule: bool = False  # a regularisation point: the flat-curve rule does not apply
    extra: bool = field(default=False, compare=False)  # runs only when named with --settings

    def info(self) -> dict[str, Any]:
        """What the calibration table says of the setting."""
        return {"name": self.name, "axis": self.axis, "knobs": self.knobs, "change": self.change(),
                "note": self.note, "short_schedule": self.short_schedule, "planned": len(self.specs),
                "cohort": self.cohort, "recipe": self.recipe}  # fmt: skip

    def change(self) -> dict[str, Any]:
        """The knobs that differ from :data:`BASE` (empty for the base and for the smoke setting, which has its own
        cohort)."""
        if self.axis == "smoke":
            return {}
        return {k: v for k, v in self.knobs.items() if BASE[k] != v}


def cohort_of(knobs: dict[str, Any]) -> dict[str, Any]:
    """The 2D cohort of a setting: ``n_train`` training images, :data:`N_VAL` validation, :data:`N_TEST` testing."""
    n = knobs["n_train"] + N_VAL + N_TEST
    train, val = round(knobs["n_train"] / n, 6), round(N_VAL / n, 6)
    return {"spatial_dims": 2, "n_cases": n, "seed": 0, "shape": [64, 64], "minority": "ring",
            "minority_frac": knobs["minority_frac"], "difficulty": knobs["difficulty"],
            "split": [train, val, round(1.0 - train - val, 6)]}  # fmt: skip


def recipe_of(knobs: dict[str, Any]) -> dict[str, Any]:
    """The overrides of a setting's runs (on top of ``profiles/2d.json``)."""
    return {"epochs": knobs["epochs"], "val_interval": 1, "optimizer#weight_decay": knobs["weight_decay"],
            "key_metric": "val_worst_group_dice"}  # fmt: skip


def _specs(cohort: dict, recipe: dict, variants: tuple[str, ...], seeds: tuple[int, ...]) -> tuple:
    """Seed by seed (every variant's seed 0 first), so a partial setting already has one run of each variant."""
    return tuple(runcache.RunSpec(v, s, cohort, dict(recipe)) for s in seeds for v in variants)


def _setting(name: str, axis: str, change: dict[str, Any], note: str = "", **flags: bool) -> Setting:
    unknown = set(change) - set(BASE)
    if unknown:
        raise ValueError(f"setting {name!r} changes unknown knob(s) {sorted(unknown)}; knobs: {sorted(BASE)}.")
    knobs = {**BASE, **change}
    cohort, recipe = cohort_of(knobs), recipe_of(knobs)
    return Setting(name, axis, knobs, cohort, recipe, _specs(cohort, recipe, VARIANTS, SEEDS), note, **flags)


SETTINGS = (
    _setting("base", "base", {}, "the 2D probe's design at the full schedule"),
    _setting("placebo", "difficulty", {"difficulty": 0}, "placebo: both gap intervals must contain 0"),
    _setting(
        "early_stop",
        "regularisation",
        {"epochs": 10},
        "regularisation point (10-epoch schedule), not converged",
        short_schedule=True,
    ),  # fmt: skip
    _setting("weight_decay", "regularisation", {"weight_decay": 0.2}, "strong weight decay"),
    _setting("share_0.02", "minority share", {"minority_frac": 0.02}),
    _setting("share_0.1", "minority share", {"minority_frac": 0.1}),
    _setting("level_2", "difficulty", {"difficulty": 2}, "an easier minority"),
)
EXTRA_SETTINGS = (
    _setting("train_500", "training size", {"n_train": 500}, extra=True),
    _setting("train_2000", "training size", {"n_train": 2000}, extra=True),
)
PLACEBO = "placebo"


def smoke_setting() -> Setting:
    """The smoke bench's one setting: 2 variants, 1 seed, 2 epochs, 60 images."""
    specs = _specs(dict(SMOKE_COHORT), dict(SMOKE_RECIPE), SMOKE_VARIANTS, (0,))
    return Setting("smoke", "smoke", {"epochs": 2, "n_train": 30}, dict(SMOKE_COHORT), dict(SMOKE_RECIPE), specs)


def plan(bench: str = "full", names: list[str] | None = None) -> list[Setting]:
    """The settings of a bench in run order: the default plan, or the ``names`` (default or extra) in plan order."""
    if bench == "smoke":
        return [smoke_setting()]
    if bench != "full":
        raise ValueError(f"unknown bench {bench!r}: 'full' or 'smoke'.")
    every = SETTINGS + EXTRA_SETTINGS
    if not names:
        return list(SETTINGS)
    unknown = sorted(set(names) - {s.name for s in every})
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {[s.name for s in every]}.")
    return [s for s in every if s.name in names]


def run_minutes(setting: Setting) -> float:
    """Estimated minutes of one run of ``setting`` on the quiet 2-core CPU."""
    k = setting.knobs
    return FIXED_MINUTES + k["epochs"] * k["n_train"] / 1000 * EPOCH_SECONDS_PER_1000 / 60


# ---------------------------------------------------------------------------------------------------------------
# reading finished runs
# ---------------------------------------------------------------------------------------------------------------
def load_setting(setting: Setting, out: Path) -> dict[str, list[dict[str, Any]]]:
    """The finished runs of ``setting`` under ``out/<setting>`` with the current key, ``{variant: [run]}``; a run is
    ``{"name", "seed", "rows", "train_log"}``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for spec in setting.specs:
        run_dir = out / setting.name / spec.name
        if fa.run_state(spec, out / setting.name) != "done":
            continue
        train_log = fa._read_json(run_dir / "train_log.json")
        rows = fa.read_per_case(run_dir / "per_case.csv")
        runs.setdefault(spec.variant, []).append({"name": spec.name, "seed": spec.seed, "rows": rows,
                                                  "train_log": train_log})  # fmt: skip
    return runs


def calibration(settings: list[Setting], out: Path, n_boot: int = 2000) -> dict[str, Any]:
    """The calibration table of every setting in ``settings`` from the finished runs under ``out``."""
    entries = [(s.info(), load_setting(s, out)) for s in settings]
    return hfr.build_calibration(entries, placebo=PLACEBO, n_boot=n_boot)


def write_table(settings: list[Setting], out: Path, bench: str) -> list[Path]:
    table = calibration(settings, out)
    table["bench"] = bench
    return hfr.write_calibration(table, out)


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def dry_run(settings: list[Setting], out: Path, work: Path) -> int:
    """Print the plan: per setting its change, what is cached and the estimated minutes of what is not."""
    total = cached = 0
    minutes = 0.0
    for setting in settings:
        actions = [runcache.decide(spec, out / setting.name, work / setting.name)[0] for spec in setting.specs]
        done = actions.count("cached")
        todo = len(actions) - done
        total, cached, minutes = total + len(actions), cached + done, minutes + todo * run_minutes(setting)
        change = ", ".join(f"{k} {v}" for k, v in setting.change().items()) or "-"
        note = f" {setting.note}" if setting.note else ""
        print(f"{setting.name:<13} {setting.axis:<15} {change:<22} {done}/{len(actions)} cached, "
              f"{todo} to run (~{todo * run_minutes(setting):.0f} min){note}")  # fmt: skip
        for spec, action in zip(setting.specs, actions):
            print(f"    {spec.name:<28} {action}")
    print(f"{cached} of {total} runs cached, {total - cached} to run (about {minutes:.0f} min, "
          f"{minutes / 60:.1f} h on the quiet 2-core CPU).")  # fmt: skip
    return 0


def _run_one(spec: runcache.RunSpec, setting: Setting, out: Path, work: Path) -> tuple[Path, bool] | None:
    """Run (or find cached) one run; ``None`` when it failed (one failure does not stop the search)."""
    t = time.time()
    try:
        run_dir, ran = runcache.run(spec, out / setting.name, work / "data", work / "runs" / setting.name,
                                    per_case_columns=PER_CASE_COLUMNS)  # fmt: skip
    except (RuntimeError, ValueError) as exc:
        logger.error("%s/%s: FAILED (%s)", setting.name, spec.name, exc)
        return None
    logger.info("%s/%s: %s (%.0f s)", setting.name, spec.name, "ran" if ran else "cached", time.time() - t)
    return run_dir, ran


def search(settings: list[Setting], table_settings: list[Setting], out: Path, work: Path, args) -> list[str]:
    """Run the settings' runs in order, rewriting (and with ``--commit`` committing) the table after each new one;
    returns the failed runs."""
    repo = fa.git_toplevel(out) if args.commit else None
    failed, new = [], 0
    for setting in settings:
        for spec in setting.specs:
            if args.max_runs is not None and new >= args.max_runs:
                logger.info("stopping after %d new run(s) (--max-runs)", new)
                return failed
            result = _run_one(spec, setting, out, work)
            if result is None:
                failed.append(f"{setting.name}/{spec.name}")
                continue
            run_dir, ran = result
            new += int(ran)
            fa.record_run(run_dir, ran, lambda: write_table(table_settings, out, args.bench),
                          f"hidden failures: {setting.name}/{spec.name}", repo)  # fmt: skip
    return failed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("search", "compare", "carry3d"), default="search", help="search: the "
                        "positive-control search (part 1); compare: the comparison on the chosen setting "
                        "(bench/hidden_failures_compare.py); carry3d: the 3D carry-back "
                        "(bench/hidden_failures_3d.py)")  # fmt: skip
    parser.add_argument("--setting", default=None, metavar="NAME", help="--part compare: use this searched setting "
                        "instead of the rule's choice")  # fmt: skip
    parser.add_argument("--bench", choices=("full", "smoke"), default="full")
    parser.add_argument("--settings", nargs="+", metavar="NAME", help="run only these settings (extra ones too)")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="--part compare: run only these variants' runs "
                        "(JTT's grid only with jtt), so that two processes can share the comparison")  # fmt: skip
    parser.add_argument("--max-runs", type=int, default=None, metavar="N", help="stop after N new runs")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run and the table")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is cached")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table, train nothing")
    parser.add_argument("--no-nice", action="store_true", help="do not lower the CPU priority of the runs")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="OMP_NUM_THREADS of the runs "
                        "(default: as set; 1 keeps a core free, no oversubscription on a shared CPU)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/hidden_failures "
                        "(smoke: <work>/smoke_results)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=runcache.REPO / ".bench_work", help="scratch folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("max_runs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        settings = plan(args.bench, args.settings)
    except ValueError as exc:
        parser.error(str(exc))
    work = args.work.resolve()
    out = (args.out or (work / "smoke_results" if args.bench == "smoke" else RESULTS)).resolve()
    if args.part in PARTS:
        return _part(args, out, work)
    if args.dry_run:
        return dry_run(settings, out, work / "runs")
    if args.commit and fa.git_toplevel(out) is None:
        parser.error(f"--commit needs --out inside a git working tree, got {out}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    default = plan(args.bench)
    table_settings = default + [s for s in settings if s.name not in {d.name for d in default}]
    failed = []
    if not args.report_only:
        _prepare_runs(args)
        failed = search(settings, table_settings, out, work, args)
    files = write_table(table_settings, out, args.bench)
    if args.commit and args.report_only:
        fa.git_commit_paths(files, "hidden failures: calibration table", fa.git_toplevel(out), attempts=10)
    print(files[0].read_text())
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


#: the parts that live in a module of their own: ``--part`` -> module
PARTS = {"compare": "hidden_failures_compare", "carry3d": "hidden_failures_3d"}


def _part(args, out: Path, work: Path) -> int:
    """``--part compare``: the comparison on the chosen setting (``bench/hidden_failures_compare.py``); ``--part
    carry3d``: the 3D carry-back (``bench/hidden_failures_3d.py``)."""
    import importlib

    module = importlib.import_module(PARTS[args.part])
    if not args.dry_run:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        if not args.report_only:
            _prepare_runs(args)
    return module.main(args, out, work)


def _prepare_runs(args) -> None:
    """Lower this process's CPU priority (unless ``--no-nice``) and set the runs' ``OMP_NUM_THREADS``
    (``--threads``): the runs' processes inherit both (run.json records the threads)."""
    if not args.no_nice:
        os.nice(10)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)


if __name__ == "__main__":
    sys.exit(main())
