"""Hidden-failures benchmark, the 3D carry-back (issue 29, item 6): does the 2D finding hold on the 3D cohort?

Run by ``python bench/hidden_failures.py --part carry3d``. ``dmoe``, ``fairdro`` and ``oracle_dmoe``, seeds 0, 1
and 2 (9 runs), on the 3D synthetic cohort (``scripts/synthetic.py``) with the design that the 2D positive-control
search chose (:data:`CHOSEN`, ``share_0.1``): minority ``ring`` at level 3, share 0.1 of every stage group, weight
decay 1e-4, validation every epoch, the checkpoint chosen by validation worst-group (stage) Dice. Those knobs are
read from the search's setting (``hidden_failures.SETTINGS``), never repeated here. ``dmoe`` and ``fairdro`` run
with ``dro#diagnose: true`` (``hidden_failures_compare.DIAGNOSED``).

**The 3D size** (:data:`SHAPE`, :data:`N_TRAIN`, :data:`N_VAL`, :data:`N_TEST`, :data:`EPOCHS`): 48x48x24 voxels,
200 training, 60 validation and 500 testing cases (48 minority testing cases: at least 25), the ablation's batch
(2 volumes, 1 patch each) and the default 64x64x32 patch, 40 epochs. Measured on 2026-12-07 (08:04-08:08 UTC,
``uptime`` load 2.8-3.7: two 2D comparison runs beside it), one thread, ``nice -n 15``, a ``fairdro`` run with the
diagnostic, 2 epochs, 200/60/260 cases:

==============  ========  ====================  ===============  ==================  ==============================
volume          patch     epoch (train + val)   evaluation       CTV voxels          minority cases without a decoy
==============  ========  ====================  ===============  ==================  ==============================
32x32x16        64x32x32  8.4 s                 19.7 s (260)     34-130              6 of 52
48x48x24        64x64x32  19.4 s                19.5 s (260)     194-429             1 of 52
64x64x32        64x64x32  15.4 s                28.3 s (260)     250-836             0 of 52
==============  ========  ====================  ===============  ==================  ==============================

(wall times on the busy CPU; each run also spends about 10 s starting each of its two processes.) Every volume
smaller than the patch is padded to it (``SpatialPadd``, and the network pads to multiples of 32), so 48x48x24
costs what 64x64x32 costs; only a smaller patch is cheaper, and a 64x32x32 patch needs a volume of 32 voxels or
less across. At 32x32x16 the CTV is a few dozen voxels (3 mm slices), the network's validation Dice was still 0.0
after 2 epochs, and 12% of the minority cases have no decoy (no room for it): the minority's rule is no longer the
one the 2D design tests. 48x48x24 is the smallest shape where the target and the decoy are what the design says;
its validation mean Dice was 0.53 after 2 epochs. 64x64x32 costs the same and holds larger targets: a change of
:data:`SHAPE` only (the timing table says nothing else changes).

**The schedule** (calibration run, ``dmoe`` seed 0 with the diagnostic on the 48x48x24 cohort of the timing,
200/60/260 cases, 40 epochs; 2026-12-07 08:08-08:24 UTC, ``uptime`` load 3.4-4.6, one thread, ``nice -n 15``):
training 895 s (22 s an epoch, 100 steps, validation and the bank refresh; one epoch took 74 s while a smoke run
beside it had the CPU), evaluation 45 s, 605 s of CPU in all. Validation mean Dice by epoch: 0.263 (1), 0.665 (2),
0.775 (5), 0.820 (10), 0.847 (15), 0.861 (20), 0.862 (25), 0.866 (30), 0.867 (35), 0.867 (40); epochs 31-40 range
from 0.8626 to 0.8673, 0.0047: **flat** by the rule (<= 0.005), with little to spare, so :data:`EPOCHS` is 40 (a
shorter cosine schedule was not measured; a run that is not flat is flagged in the report). The best validation
worst-group Dice (0.779) came at epoch 29. On the 260 testing cases: minority Dice 0.801 (26 cases, none below 0.5),
majority 0.876, worst group 0.820; the diagnostic's pooled precision rose from 0.175 (epoch 2) to 0.275 against a
base rate of 0.1. So in 3D ``dmoe`` alone reaches the minority's rule on most cases: the oracle has about 0.075 of
minority Dice to gain, and the 3D positive control (>= 0.05) may well fail; the report then labels the fairdro
comparison underpowered.

**Wall time**: about 2 minutes a run for the two process starts and the evaluation of 500 cases, plus 40 epochs of
about 20 s: 15 minutes a run, 9 runs in about 2.3 hours in one process or 77 minutes in two (5 runs in the longer).

Everything lands in ``bench/results/hidden_failures/carry3d/<run>/`` (``bench/runcache.py``, ``per_case.csv``
with ``hidden_failures.PER_CASE_COLUMNS``); after every run ``carry3d.md`` and ``carry3d.json`` beside it are
rewritten from the finished runs: per variant minority, majority and worst-group Dice (mean over seeds), the 3D
positive control ``oracle_dmoe - dmoe`` and ``fairdro - dmoe`` in minority Dice with their two-level intervals
(``hidden_failures_tables.difference``), fairdro's recovered share of the oracle's gain, every run's flat-curve
check and the intra-group diagnostic of ``dmoe`` and ``fairdro``.

**Two processes** on a 2-core CPU run the same command (``--threads 1`` each): a process claims a run before it
starts it (``<work>/carry3d/<run>.claim``, holding its process id) and skips a run that a living process holds, so
the two share the 9 runs (5 and 4) without any split to name. ``--variants`` still restricts a process to some
variants. ``--bench smoke``: a tiny 3D cohort, ``dmoe`` and ``fairdro``, one seed, 2 epochs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fairness_ablation as fa
import hidden_failures as hf
import hidden_failures_compare as hfc
import hidden_failures_report as hfr
import hidden_failures_tables as hft
import runcache

logger = logging.getLogger("hidden_failures")

NAME = "carry3d"
FILES = (f"{NAME}.md", f"{NAME}.json")
#: the 2D setting whose design is carried back (the search's choice)
CHOSEN = "share_0.1"
VARIANTS = ("dmoe", "fairdro", "oracle_dmoe")
SEEDS = (0, 1, 2)
SHAPE = (48, 48, 24)
N_TRAIN, N_VAL, N_TEST = 200, 60, 500
EPOCHS = 40
#: the 3D ablation's batch: 2 volumes, one patch each (the default 64x64x32 patch)
BATCH = {"num_samples": 1, "batch_size": 2}
#: minutes of a run on the 2-core CPU, one thread: two process starts, caching and the evaluation of 500 cases,
#: plus the measured seconds of an epoch (training and validation) at 200 training cases
FIXED_MINUTES, EPOCH_SECONDS = 2.0, 20.0
SMOKE_COHORT = {"n_cases": 16, "seed": 0, "shape": [32, 32, 16], "minority": "ring", "minority_frac": 0.25,
                "difficulty": 3, "split": [0.5, 0.25, 0.25]}  # fmt: skip
SMOKE_RECIPE = {"epochs": 2, "val_interval": 1, "optimizer#weight_decay": 1e-4, "key_metric": "val_worst_group_dice",
                "num_samples": 1, "batch_size": 2, "patch_size": [64, 32, 32], "features": 4,
                "num_experts": 4}  # fmt: skip
SMOKE_VARIANTS = ("dmoe", "fairdro")


@dataclass(frozen=True)
class CarryPlan:
    """The carry-back's cohort, recipe, variants and seeds; its runs go to ``<out>/<name>``."""

    name: str
    cohort: dict[str, Any]
    recipe: dict[str, Any]
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    source: str  # the 2D setting whose design it carries

    def specs(self) -> list[runcache.RunSpec]:
        """Seed by seed (every variant's seed 0 first); ``dmoe`` and ``fairdro`` with the diagnostic."""
        return [runcache.RunSpec(v, s, self.cohort, {**self.recipe, **_diagnose(v)})
                for s in self.seeds for v in self.variants]  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "cohort": self.cohort, "recipe": self.recipe,
                "variants": list(self.variants), "seeds": list(self.seeds)}  # fmt: skip


def _diagnose(variant: str) -> dict[str, Any]:
    return {"dro#diagnose": True} if variant in hfc.DIAGNOSED else {}


def chosen_setting(name: str = CHOSEN) -> hf.Setting:
    """The searched 2D setting named ``name`` (default or extra)."""
    return hf.plan("full", [name])[0]


def cohort_3d(knobs: dict[str, Any], shape=SHAPE, sizes=(N_TRAIN, N_VAL, N_TEST)) -> dict[str, Any]:
    """The 3D cohort with a 2D setting's minority (``ring``), level and share: ``sizes`` training, validation and
    testing cases of ``shape`` voxels (a cohort without ``spatial_dims`` is the 3D one, ``runcache.ensure_cohort``)."""
    n = sum(sizes)
    train, val = round(sizes[0] / n, 6), round(sizes[1] / n, 6)
    return {"n_cases": n, "seed": 0, "shape": list(shape), "minority": "ring", "minority_frac": knobs["minority_frac"],
            "difficulty": knobs["difficulty"], "split": [train, val, round(1.0 - train - val, 6)]}  # fmt: skip


def recipe_3d(knobs: dict[str, Any], epochs: int = EPOCHS) -> dict[str, Any]:
    """The 2D setting's recipe (weight decay, validation every epoch, checkpoint rule) at ``epochs``, with the 3D
    batch."""
    return {**hf.recipe_of({**knobs, "epochs": epochs}), **BATCH}


def plan(bench: str = "full") -> CarryPlan:
    """The carry-back of the full bench, or the smoke bench's tiny one."""
    if bench == "smoke":
        return CarryPlan(NAME, dict(SMOKE_COHORT), dict(SMOKE_RECIPE), SMOKE_VARIANTS, (0,), "smoke")
    if bench != "full":
        raise ValueError(f"unknown bench {bench!r}: 'full' or 'smoke'.")
    knobs = chosen_setting().knobs
    return CarryPlan(NAME, cohort_3d(knobs), recipe_3d(knobs), VARIANTS, SEEDS, CHOSEN)


def run_minutes(carry: CarryPlan) -> float:
    """Estimated minutes of one run on the 2-core CPU (one thread)."""
    train_cases = carry.cohort["n_cases"] * carry.cohort["split"][0]
    return FIXED_MINUTES + carry.recipe["epochs"] * EPOCH_SECONDS * train_cases / N_TRAIN / 60


# ---------------------------------------------------------------------------------------------------------------
# two processes share the runs: a claim per run
# ---------------------------------------------------------------------------------------------------------------
def claim(path: Path) -> bool:
    """Create the claim file ``path`` holding this process's id; ``False`` when a living process holds it (a claim
    whose process is gone is taken over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _holder_alive(path):
                return False
            path.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def _holder_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's living process
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
class CarryBack:
    """The carry-back's runner and report under ``out/<name>`` (runs) and ``out`` (``carry3d.md``/``.json``)."""

    def __init__(self, carry: CarryPlan, out: Path, work: Path):
        self.carry, self.out = carry, out
        self.folder, self.work, self.data = out / carry.name, work / carry.name, work / "data"

    def run(self, max_runs: int | None, commit_repo: Path | None, variants: tuple[str, ...] | None = None) -> list:
        """Run every run in order that no other process holds, rewriting (``commit_repo``: committing) the report
        after each new one; returns the failed runs."""
        failed, new = [], 0
        for spec in [s for s in self.carry.specs() if variants is None or s.variant in variants]:
            if max_runs is not None and new >= max_runs:
                logger.info("stopping after %d new run(s) (--max-runs)", new)
                break
            token = self.work / f"{spec.name}.claim"
            if not claim(token):
                logger.info("%s/%s: another process runs it", self.carry.name, spec.name)
                continue
            try:
                result = self._run_one(spec)
            finally:
                token.unlink(missing_ok=True)
            if result is None:
                failed.append(spec.name)
                continue
            run_dir, ran = result
            new += int(ran)
            fa.record_run(run_dir, ran, self.write_report, f"hidden failures: {self.carry.name}/{spec.name}",
                          commit_repo)  # fmt: skip
        return failed

    def _run_one(self, spec: runcache.RunSpec) -> tuple[Path, bool] | None:
        """``(folder, ran)`` of one run (cached or trained); ``None`` when it failed (the others still run)."""
        try:
            run_dir, ran = runcache.run(spec, self.folder, self.data, self.work, per_case_columns=hf.PER_CASE_COLUMNS)
        except (RuntimeError, ValueError) as exc:
            logger.error("%s/%s: FAILED (%s)", self.carry.name, spec.name, exc)
            return None
        logger.info("%s/%s: %s", self.carry.name, spec.name, "ran" if ran else "cached")
        return run_dir, ran

    def dry_run(self) -> int:
        """Print the plan: each run's action and the estimated minutes of what is not cached."""
        actions = [runcache.decide(spec, self.folder, self.work)[0] for spec in self.carry.specs()]
        for spec, action in zip(self.carry.specs(), actions):
            print(f"    {spec.name:<28} {action}")
        todo = len(actions) - actions.count("cached")
        one, two = todo * run_minutes(self.carry), -(-todo // 2) * run_minutes(self.carry)
        print(f"{self.carry.name} ({self.carry.source}, {'x'.join(map(str, self.carry.cohort['shape']))}): "
              f"{len(actions) - todo} of {len(actions)} runs cached, {todo} to run (about {one:.0f} min in one "
              f"process, {two:.0f} min in two).")  # fmt: skip
        return 0

    # -- the report ----------------------------------------------------------------------------------------------
    def write_report(self, n_boot: int = hft.N_BOOT) -> list[Path]:
        runs = hfc.finished(self.carry.specs(), self.folder)
        report = build_report(self.carry.info(), runs, len(self.carry.specs()), n_boot)
        return write_report(report, self.out)


# ---------------------------------------------------------------------------------------------------------------
# the report: pure functions of the finished runs
# ---------------------------------------------------------------------------------------------------------------
def passes(diff: dict[str, Any] | None) -> bool | None:
    """Whether a minority-Dice difference passes the positive-control rule (>= 0.05, interval excluding 0)."""
    entry = (diff or {}).get("minority_dice")
    if not entry or entry.get("ci") is None:
        return None
    return hfr.gap_passes(entry["estimate"], entry["ci"])


def build_report(info: dict[str, Any], runs: list[dict[str, Any]], planned: int, n_boot: int = hft.N_BOOT) -> dict:
    """The carry-back's report from its finished runs (``hidden_failures_compare.finished`` records)."""
    by = hft.by_variant(runs)
    control = hft.difference(by.get("oracle_dmoe"), by.get("dmoe"), n_boot)
    report = {
        "setting": info,
        "runs_done": len(runs),
        "runs_planned": planned,
        "variants": {v: hft.variant_summary(by[v]) for v in hft.ORDER if by.get(v)},
        "positive_control": {"difference": control, "passes": passes(control)},
        "fairdro_vs_dmoe": hft.difference(by.get("fairdro"), by.get("dmoe"), n_boot),
        "share": hft.recovered_share(by.get("fairdro"), by.get("dmoe"), by.get("oracle_dmoe"), n_boot),
        "curves": {r["name"]: hfr.flat_curve((r.get("train_log") or {}).get("val_mean_dice", {})) for r in runs},
        "diagnostic": {v: hft.diagnostic_summary(by[v]) for v in hfc.DIAGNOSED if by.get(v)},
        "rules": {"min_gap": hfr.MIN_GAP, "flat_tol": hfr.FLAT_TOL, "n_boot": n_boot, "confidence": 0.95},
    }
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict[str, Any]) -> str:
    """Plain sentences: the 3D positive control, fairdro against dmoe, and the flat-curve check."""
    control = report["positive_control"]
    gap = hft._diff_text((control["difference"] or {}).get("minority_dice"))
    head = f"On the 3D cohort ({report['runs_done']} of {report['runs_planned']} runs), "
    if control["passes"] is None:
        words = [head + "the 3D positive control is not yet measured (it needs oracle_dmoe and dmoe)."]
    elif control["passes"]:
        words = [head + f"the 3D positive control passes: oracle_dmoe - dmoe {gap} in minority Dice (>= "
                 f"{hfr.MIN_GAP} with an interval excluding 0)."]  # fmt: skip
    else:
        words = [head + f"the 3D positive control does not pass: oracle_dmoe - dmoe {gap} in minority Dice (it "
                 f"needs >= {hfr.MIN_GAP} with an interval excluding 0), so the 3D fairdro comparison is "
                 "underpowered: a tie between fairdro and dmoe does not mean that fairdro has no effect."]  # fmt: skip
    words.append(_fairdro_sentence(report))
    words.append(_flat_sentence(report["curves"]))
    return " ".join(w for w in words if w)


def _fairdro_sentence(report: dict[str, Any]) -> str:
    diff = (report["fairdro_vs_dmoe"] or {}).get("minority_dice")
    if not diff:
        return ""
    return hft.method_sentence("fairdro", "dmoe", diff, report["share"])


def _flat_sentence(curves: dict[str, dict[str, Any]]) -> str:
    if not curves:
        return ""
    unflat = sorted(name for name, c in curves.items() if c["flat"] is False)
    if not unflat:
        return f"Every finished run's validation curve is flat over its last quarter ({len(curves)} runs)."
    return f"{len(unflat)} of {len(curves)} runs are not flat over their last quarter: {', '.join(unflat)}."


def _gap_rows(report: dict[str, Any]) -> list[str]:
    lines = ["| difference | minority Dice [95% CI] | worst-group Dice [95% CI] | runs |", "|---|---|---|---|"]
    for label, diff in (("oracle_dmoe - dmoe (positive control)", report["positive_control"]["difference"]),
                        ("fairdro - dmoe", report["fairdro_vs_dmoe"])):  # fmt: skip
        d = diff or {}
        runs = " / ".join(map(str, d.get("n_runs", []))) or "-"
        lines.append(f"| {label} | {hft._diff_text(d.get('minority_dice'))} | "
                     f"{hft._diff_text(d.get('worst_group_dice'))} | {runs} |")  # fmt: skip
    return lines


def _curve_rows(curves: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"| run | flat (range <= {hfr.FLAT_TOL}) | range | epochs |", "|---|---|---|---|"]
    for name, c in curves.items():
        flat = "-" if c["flat"] is None else ("yes" if c["flat"] else "NO")
        window = f"{c['window'][0]}-{c['window'][1]}" if c["window"] else "-"
        lines.append(f"| {name} | {flat} | {hft._fmt(c['range'], '.4f')} | {window} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    s, c = report["setting"], report["setting"]["cohort"]
    split = [round(f * c["n_cases"]) for f in c["split"]]
    parts = [
        "# Hidden failures: the 3D carry-back",
        "",
        "Generated by `bench/hidden_failures.py --part carry3d`. Every number is on the testing split; intervals "
        "are 95%, two-level bootstrap (each variant's seeds, then cases within stage groups).",
        "",
        f"**Verdict.** {report['verdict']}",
        "",
        f"**Design** of the 2D setting `{s['source']}` on the 3D cohort: {'x'.join(map(str, c['shape']))} voxels, "
        f"minority `{c['minority']}` at level {c['difficulty']}, share {c['minority_frac']}, "
        f"{split[0]}/{split[1]}/{split[2]} training/validation/testing cases; "
        + ", ".join(f"{k} {v}" for k, v in s["recipe"].items()) + ".",
        "",
        "## Variants",
        "",
        *hft._variant_table(report),
        "",
        "## The 3D positive control and fairdro",
        "",
        *_gap_rows(report),
        "",
        f"Recovered share of the oracle's gain (fairdro): {hft._share_text(report['share'])}.",
        "",
        "## Flat validation curves (mean Dice over the last quarter of the epochs)",
        "",
        *_curve_rows(report["curves"]),
        "",
        "## Can the within-subgroup CVaR see the minority? (training bank, every refresh)",
        "",
        *hft._diagnostic_table(report),
    ]  # fmt: skip
    return "\n".join(parts).rstrip() + "\n"


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``carry3d.md`` and ``carry3d.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / FILES[0], out / FILES[1]]
    files[0].write_text(render_markdown(report))
    files[1].write_text(json.dumps(report, indent=2, default=str) + "\n")
    return files


def git_ignored(paths: list[Path], repo: Path) -> list[str]:
    """The ``paths`` (relative to ``repo``) that git ignores: ``git add`` would refuse them."""
    rel = [str(p.resolve().relative_to(repo.resolve())) for p in paths]
    res = subprocess.run(["git", "check-ignore", "--", *rel], cwd=repo, capture_output=True, text=True)
    return res.stdout.split()


def main(args, out: Path, work: Path) -> int:
    """``--part carry3d`` of ``bench/hidden_failures.py``."""
    carry = plan(args.bench)
    variants = tuple(args.variants) if args.variants else None
    unknown = sorted(set(variants or ()) - set(carry.variants))
    if unknown:
        print(f"hidden_failures --part carry3d: unknown variant(s) {unknown}; the carry-back's: {list(carry.variants)}")
        return 2
    runner = CarryBack(carry, out, work)
    if args.dry_run:
        return runner.dry_run()
    repo = fa.git_toplevel(out) if args.commit else None
    ignored = git_ignored([out / f for f in FILES], repo) if repo is not None else []
    if ignored:
        print(f"hidden_failures --part carry3d: --commit cannot commit {ignored}: git ignores them (add them to "
              ".gitignore's exceptions first).")  # fmt: skip
        return 2
    failed = [] if args.report_only else runner.run(args.max_runs, repo, variants)
    files = runner.write_report()
    if repo is not None and args.report_only:
        fa.git_commit_paths(files, f"hidden failures: {carry.name} report", repo, attempts=10)
    print(files[0].read_text())
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0
