"""Ablation benchmark: the five variants over several seeds on the synthetic cohort, with paired tests.

Trains erm, groupdro, dmoe, fairdro and fairdro_groupdro (``bundle/configs/variants/``) with the same
cohort, schedule and seeds, evaluates each on the testing split (``evaluate.json``), and writes

- ``OUT/<variant>_s<seed>/``: every run's outputs (``fairness/per_case.csv``, ``metrics.json``, report);
- ``OUT/ablation.md`` and ``OUT/ablation.json``: per variant, mean ± std over seeds of mean Dice,
  worst-group Dice, ES-Dice, worst-group CVaR and hidden failures (for the routing grouping and the
  other grouping), plus paired comparisons of fairdro against each baseline (per-case differences
  pooled over seeds: Wilcoxon signed-rank p-value; paired bootstrap 95% interval of the difference in
  worst-group Dice and worst-group CVaR, per seed).

Usage (``make benchmark-fairness`` runs it with the defaults)::

    python bench/fairness_ablation.py --out bench/results/ablation [--seeds 0 1 2] [--epochs 10]
        [--n-cases 60] [--variants erm groupdro dmoe fairdro fairdro_groupdro]

Runs that already have a ``fairness/metrics.json`` are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))

from scripts import synthetic  # noqa: E402
from scripts.fairness_stats import compare_runs, read_metrics_json  # noqa: E402

VARIANTS = ["erm", "groupdro", "dmoe", "fairdro", "fairdro_groupdro"]
SUMMARIES = ["dice_all", "worst_group_dice", "es_dice", "worst_group_cvar", "hidden_failures", "hard_failures"]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        res = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}), see {log}: {' '.join(cmd)}")


def run_variant(variant: str, seed: int, data: Path, out: Path, epochs: int, extra: list[str]) -> Path:
    """Train and evaluate one variant with one seed; returns the run folder."""
    run_dir = out / f"{variant}_s{seed}"
    if (run_dir / "fairness" / "metrics.json").is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "bench.log"
    configs = ["bundle/configs/train.json", f"bundle/configs/variants/{variant}.json"]
    common = ["--dataset_dir", str(data), "--output_dir", str(run_dir), "--ckpt_dir", str(run_dir / "models"),
              "--seed", str(seed)] + extra  # fmt: skip
    py = [sys.executable, "-m", "monai.bundle", "run"]
    _run(py + ["training", "--config_file", json.dumps(configs), "--epochs", str(epochs)] + common, log)
    _run(py + ["evaluating", "--config_file", json.dumps(configs + ["bundle/configs/evaluate.json"])] + common, log)
    return run_dir


def _summary(run_dir: Path, grouping: str) -> dict[str, float]:
    block = read_metrics_json(run_dir)["groupings"][grouping]["dice"]
    return {k: float(block.get(k, float("nan"))) for k in SUMMARIES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-cases", type=int, default=60)
    parser.add_argument("--cohort-seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--grouping", default="stage", help="routing/DRO attribute (subgroup_key)")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "datalist.json").is_file():
        synthetic.generate_cohort(data, n_cases=args.n_cases, seed=args.cohort_seed)
    t0 = time.time()
    runs: dict[str, dict[int, Path]] = {v: {} for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            t = time.time()
            runs[variant][seed] = run_variant(variant, seed, data, out, args.epochs, extra)
            print(f"{variant:>17} seed {seed}: done in {time.time() - t:6.0f} s", flush=True)
    groupings = [args.grouping] + [g for g in ("stage", "institution") if g != args.grouping]

    table: dict = {"variants": {}, "comparisons": {}}
    for variant, by_seed in runs.items():
        table["variants"][variant] = {}
        for g in groupings:
            vals = {k: [_summary(r, g)[k] for r in by_seed.values()] for k in SUMMARIES}
            table["variants"][variant][g] = {
                k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
                for k, v in vals.items()
            }
    if "fairdro" in runs:
        for base in [v for v in args.variants if v != "fairdro"]:
            per_seed = [compare_runs(runs[base][s], runs["fairdro"][s], groupings=groupings) for s in args.seeds]
            table["comparisons"][f"fairdro_vs_{base}"] = per_seed

    lines = [
        f"Ablation on the synthetic cohort ({args.n_cases} cases, cohort seed {args.cohort_seed}), "
        f"{args.epochs} epochs, seeds {args.seeds}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; total {(time.time() - t0) / 60:.0f} min.",
        "",
    ]
    for g in groupings:
        lines += [
            f"Grouping `{g}` (mean ± std over seeds; testing split):",
            "",
            "| variant | mean Dice | worst-group Dice | ES-Dice | worst-group CVaR | hidden failures "
            "| hard cases failed |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in args.variants:
            s = table["variants"][variant][g]
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in SUMMARIES[:4]]
            cells += [f"{s[k]['mean']:.1f} ± {s[k]['std']:.1f}" for k in SUMMARIES[4:]]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    if table["comparisons"]:
        lines += [
            "Paired comparisons, fairdro minus baseline, per seed (routing grouping): Wilcoxon p on per-case "
            "Dice; 95% paired-bootstrap interval of the difference in worst-group Dice and worst-group CVaR.",
            "",
            "| comparison | seed | mean Δ Dice | Wilcoxon p | Δ worst-group Dice [95% CI] "
            "| Δ worst-group CVaR [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for name, per_seed in table["comparisons"].items():
            for seed, res in zip(args.seeds, per_seed):
                lines.append(_comparison_row(name, seed, res, groupings[0]))
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps(table, indent=2, default=str) + "\n")
    print(text)
    return 0


def _comparison_row(name: str, seed: int, res: dict, grouping: str) -> str:
    g = res["groupings"][grouping]

    def ci(entry):
        return f"{entry['estimate']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"

    return (
        f"| {name} | {seed} | {res['mean_difference']:+.3f} | {res['wilcoxon']['p_value']:.3g} | "
        f"{ci(g['worst_group_dice_difference'])} | {ci(g['worst_group_cvar_difference'])} |"
    )


if __name__ == "__main__":
    sys.exit(main())
