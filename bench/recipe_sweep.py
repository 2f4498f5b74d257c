"""Choose the FairDRO recipe's defaults on the validation split of the benchmark cohort (issue 15).

Every run is ``fairdro`` (seed 0) on the ablation's main cohort (``necrotic`` at its default level, 800 cases of
64x64x32, split 0.3/0.1/0.6) with the ablation's recipe, and one setting changed:

1. ``dro#apply``: ``sample`` against ``loss``, both at ``min_ess`` 0.5;
2. ``dro#min_ess``: 0.25 against 0.5 under the ``apply`` chosen in step 1 (two values: a run costs about 8 CPU
   minutes);
3. the schedule: ERM with twice the recipe's epochs, against the recipe's (does the validation curve still rise?).

ERM on the same cohort (seed 0, the calibration's run) is the reference. Each run is trained by
``bench/runcache.py`` (cached; the testing evaluation it also writes is kept for the ablation and never read here)
and evaluated again on the **validation** split (``eval_list_key: validation``) with the weights it selected. A
setting wins on the highest validation worst-group Dice (the quantity FairDRO is meant to lift); a difference under
``TIE`` counts as a tie, broken by validation minority Dice, then by staying with the current default.

The report (``recipe.md``, ``recipe.json``) gives, on validation only: mean Dice, worst-group Dice, minority Dice
and failure rate, the lowest ESS fraction after the warm-up (the floor must hold), the validation curve, and the
epoch every ``key_metric`` would select.

Usage (``make recipe-sweep``)::

    python bench/recipe_sweep.py [--out bench/results/recipe] [--work .bench_work] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fairness_ablation as fa  # noqa: E402
import runcache  # noqa: E402

sys.path.insert(0, str(runcache.BUNDLE))
from scripts.model_selection import KEY_METRICS, select_epoch  # noqa: E402

TIE = 0.005
BASE = {"dro#apply": "sample", "dro#min_ess": 0.5}
APPLY = ("sample", "loss")
MIN_ESS = (0.25, 0.5)
SEED = 0
#: the schedule check: ERM with twice the recipe's epochs (does its validation curve still rise?)
LONG_EPOCHS = 2 * fa.RECIPE["epochs"]
#: the calibration's results beside ``--out`` (its ERM run on the main cohort is this sweep's reference)
CALIBRATION = "calibration"


def main_cohort() -> dict[str, Any]:
    return {**fa.COHORT, "minority": fa.MAIN_KIND, "difficulty": fa.DEFAULT_DIFFICULTY[fa.MAIN_KIND]}


def setting_name(setting: dict[str, Any]) -> str:
    return f"{setting['dro#apply']}_ess{round(100 * setting['dro#min_ess'])}"


def spec_of(variant: str, setting: dict[str, Any] | None = None) -> runcache.RunSpec:
    return runcache.RunSpec(variant, SEED, main_cohort(), {**fa.RECIPE, **(setting or {})})


def validate(spec: runcache.RunSpec, data: Path, work: Path) -> Path:
    """Evaluate the weights a finished run selected on the validation split; returns the evaluation folder."""
    validation = ("--eval_list_key", "validation")
    runcache._bundle(runcache.bundle_command(spec, "evaluating", data, work, work / "validation", validation),
                     work / "validation.log")  # fmt: skip
    return work / "validation" / "fairness"


def run_with_validation(spec: runcache.RunSpec, out: Path, work: Path, runs: Path, sources: list[Path]) -> Path:
    """Train (cached, or adopted from ``sources``) and evaluate on validation once; returns the run folder.

    ``runs`` is the scratch folder of the run's training (its selected weights are read from there).
    """
    run_dir, _ = runcache.run(spec, out, work / "data", runs, sources=sources)
    val_dir = run_dir / "validation"
    if not (val_dir / "metrics.json").is_file():
        weights = runs / spec.name / "models" / "model.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: delete {run_dir} to train the run again.")
        fairness = validate(spec, runcache.ensure_cohort(spec.cohort, work / "data"), runs / spec.name)
        val_dir.mkdir(exist_ok=True)
        for name in ("metrics.json", "per_case.csv"):
            (val_dir / name).write_bytes((fairness / name).read_bytes())
    return run_dir


def summarize(run_dir: Path) -> dict[str, Any]:
    """The validation numbers of one run (see the module notes)."""
    log = json.loads((run_dir / "train_log.json").read_text())
    metrics = json.loads((run_dir / "validation" / "metrics.json").read_text())
    out = {k: v for k, v in fa.stats.run_summary(metrics, log).items() if k != "per_group"}
    curves = {"val_mean_dice": log["val_mean_dice"], **log.get("curves", {})}
    history = [(int(e), {k: c[e] for k, c in curves.items() if e in c}) for e in log["val_mean_dice"]]
    ess = list(log.get("curves", {}).get("dro_ess_frac", {}).values())
    out["lowest_ess_frac"] = min(ess) if ess else None
    out["val_curve"] = log["val_mean_dice"]
    out["selected_epoch"] = {k: select_epoch(history, k) for k in KEY_METRICS}
    return out


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether summary ``a`` beats ``b``: validation worst-group Dice by more than :data:`TIE`, else minority Dice
    by more than :data:`TIE`; otherwise not (the incumbent stays)."""
    for key in ("worst_group_dice", "minority_dice"):
        diff = (a.get(key) or 0.0) - (b.get(key) or 0.0)
        if abs(diff) > TIE:
            return diff > 0
    return False


def choose(results: dict[str, dict[str, Any]], options: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The winning setting among ``options`` (the first is the incumbent), with the reason."""
    best = options[0]
    for option in options[1:]:
        if better(results[setting_name(option)], results[setting_name(best)]):
            best = option
    rows = ", ".join(
        f"{setting_name(o)}: worst-group {results[setting_name(o)]['worst_group_dice']:.3f}, "
        f"minority {results[setting_name(o)]['minority_dice']:.3f}"
        for o in options
    )
    return best, f"{setting_name(best)} ({rows})"


def sweep(out: Path, work: Path, report_only: bool) -> dict[str, Any]:
    """Run step 1 (apply), then step 2 (min_ess under the chosen apply); returns the report dict."""
    results: dict[str, dict[str, Any]] = {}
    steps: dict[str, str] = {}

    def measure(variant: str, setting: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
        if name in results:
            return results[name]
        spec = spec_of(variant, setting)
        if report_only:
            run_dir = out / name / spec.name
            if not (run_dir / "validation" / "metrics.json").is_file():
                return None
        else:  # ERM's weights are the calibration's (same scratch folder); each setting trains in its own
            runs = work / "runs" if name == "erm" else work / "recipe" / name
            run_dir = run_with_validation(spec, out / name, work, runs, [out.parent / CALIBRATION])
        results[name] = {**summarize(run_dir), "setting": setting or {}}
        return results[name]

    measure("erm", None, "erm")
    apply_options = [{**BASE, "dro#apply": a} for a in APPLY]
    if all(measure("fairdro", o, setting_name(o)) for o in apply_options):
        chosen, steps["dro#apply"] = choose(results, apply_options)
        ess_options = [{**chosen, "dro#min_ess": e} for e in (0.5, *[e for e in MIN_ESS if e != 0.5])]
        if all(measure("fairdro", o, setting_name(o)) for o in ess_options):
            _, steps["dro#min_ess"] = choose(results, ess_options)
    long_run = f"erm_{LONG_EPOCHS}ep"
    if measure("erm", {"epochs": LONG_EPOCHS}, long_run) and "erm" in results:
        steps["schedule"] = schedule_check(results["erm"], results[long_run])
    return {"results": results, "choices": steps}


def schedule_check(short: dict[str, Any], long: dict[str, Any]) -> str:
    """ERM with the recipe's epochs against twice as many: what the longer schedule adds on validation."""
    return (
        f"ERM, {fa.RECIPE['epochs']} against {LONG_EPOCHS} epochs: mean Dice {short['mean_dice']:.3f} / "
        f"{long['mean_dice']:.3f}, worst-group Dice {short['worst_group_dice']:.3f} / {long['worst_group_dice']:.3f}, "
        f"minority Dice {short['minority_dice']:.3f} / {long['minority_dice']:.3f}"
    )


def render(report: dict[str, Any]) -> str:
    """``recipe.md``: the validation table, the curves and the choices."""
    head = ("| run | mean Dice | worst-group Dice | minority Dice | minority failure rate | lowest ESS fraction | "
            "validation mean Dice by epoch | epoch selected by " + ", ".join(KEY_METRICS) + " |")  # fmt: skip
    lines = [report["header"], "", head, "|---" * 8 + "|"]
    for name, r in report["results"].items():
        curve = " ".join(f"{v:.3f}" for v in r["val_curve"].values())
        ess = "-" if r["lowest_ess_frac"] is None else f"{r['lowest_ess_frac']:.2f}"
        picks = ", ".join(str(r["selected_epoch"][k]) for k in KEY_METRICS)
        lines.append(
            f"| {name} | {r['mean_dice']:.3f} | {r['worst_group_dice']:.3f} | {r['minority_dice']:.3f} | "
            f"{r['minority_failure_rate']:.0%} | {ess} | {curve} | {picks} |"
        )
    lines.append("")
    lines += [f"- `{step}`: **{why}**" for step, why in report["choices"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=runcache.REPO / "bench" / "results" / "recipe")
    parser.add_argument("--work", type=Path, default=runcache.REPO / ".bench_work")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    report = sweep(args.out, args.work, args.report_only)
    report["header"] = (
        f"FairDRO recipe on the **validation** split ({platform.machine()}, {os.cpu_count()} CPUs): fairdro seed "
        f"{SEED} on cohort {json.dumps(main_cohort())}, recipe {json.dumps(fa.RECIPE)}; ERM for reference. "
        f"Command: `python bench/recipe_sweep.py`. Rule: highest worst-group Dice, ties (< {TIE}) by minority "
        "Dice, then the incumbent."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    (args.out / "recipe.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
