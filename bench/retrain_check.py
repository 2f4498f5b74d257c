"""Retrain one finished run of the fairness ablation in a scratch folder and compare it with the committed run.

A reproducibility check: the same run (same configuration, same seed) trained again, for example with another
torch thread count, on another machine, or after a code change meant to leave results equal. It prints a markdown
table: the per-case Dice differences and the run's worst-group, minority and mean Dice beside the committed ones.

Usage::

    OMP_NUM_THREADS=1 python bench/retrain_check.py fairdro_necrotic_l3_s1 [--work DIR] [--results DIR]
    python bench/retrain_check.py fairdro_necrotic_l3_s1 --work DIR --no-train   # compare a retrain already in DIR

The retrain goes to ``<work>/<run name>/`` (default ``.bench_work/retrain_check``); nothing under ``--results`` is
written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_stats as stats  # noqa: E402
import fairness_ablation as fa  # noqa: E402
import runcache  # noqa: E402


def find_spec(name: str) -> runcache.RunSpec:
    """The run of the full plan called ``name``."""
    specs = {spec.name: spec for spec in fa.plan("full")}
    if name not in specs:
        raise SystemExit(f"no run called {name!r} in the ablation plan; e.g. {next(iter(specs))}")
    return specs[name]


def read_rows(path: Path, hint: str) -> list[dict[str, Any]]:
    """The per-case rows of ``path``; a missing file stops with ``hint`` (what to do about it)."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: {hint}")
    return fa.read_per_case(path)


def compare(new: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-case |Dice difference| and the run-level metrics of both (cases paired by id)."""
    a, b = stats.seed_average([new]), stats.seed_average([ref])  # raises if the cases differ
    diff = [abs(x - y) for x, y in zip(a["dice"], b["dice"])]
    out: dict[str, Any] = {
        "cases": len(diff),
        "identical": sum(d == 0.0 for d in diff),
        "max_abs_diff": max(diff),
        "mean_abs_diff": sum(diff) / len(diff),
    }
    for label, run in (("retrain", a), ("committed", b)):
        out[label] = {
            "worst_group_dice": stats.worst_group_dice(run["dice"], run["group"]),
            "minority_dice": stats.minority_dice(run["dice"], run["minority"]),
            "mean_dice": sum(run["dice"]) / len(run["dice"]),
        }
    return out


def render(name: str, result: dict[str, Any]) -> str:
    threads = os.environ.get("OMP_NUM_THREADS") or "default"
    lines = [
        f"Retrain of `{name}` (OMP_NUM_THREADS={threads}) against the committed run: {result['cases']} testing "
        f"cases, {result['identical']} identical, per-case |Δ Dice| mean {result['mean_abs_diff']:.4f}, "
        f"max {result['max_abs_diff']:.4f}.",
        "",
        "| run | worst-group Dice | minority Dice | mean Dice |",
        "|---|---|---|---|",
    ]
    for label in ("committed", "retrain"):
        m = result[label]
        lines.append(f"| {label} | {m['worst_group_dice']:.3f} | {m['minority_dice']:.3f} | {m['mean_dice']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run name, e.g. fairdro_necrotic_l3_s1")
    parser.add_argument("--work", type=Path, default=fa.REPO / ".bench_work" / "retrain_check")
    parser.add_argument("--data", type=Path, default=None, help="cohort root (default <work>/data)")
    parser.add_argument("--results", type=Path, default=fa.RESULTS, help="the committed run folders")
    parser.add_argument("--no-train", action="store_true", help="compare the retrain already in <work>/<run>")
    args = parser.parse_args(argv)
    spec = find_spec(args.run)
    work = args.work.resolve() / spec.name
    if not args.no_train:
        data = runcache.ensure_cohort(spec.cohort, (args.data or args.work / "data").resolve())
        times = runcache.execute(spec, data, work)
        print(f"trained and evaluated in {times['train_s'] + times['evaluate_s']:.0f} s", flush=True)
    new = read_rows(work / "fairness" / "per_case.csv", "retrain first (without --no-train) or give the --work used")
    ref = read_rows(args.results / spec.name / "per_case.csv", "no finished run there; check --results")
    print(render(spec.name, compare(new, ref)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
