"""Fairness ablation: FairDRO against its baselines and ablations on the synthetic cohort with a hidden minority.

The plan (:func:`plan_tables`), run in this order, every run cached by ``bench/runcache.py``:

- **main**: the default minority kind (``necrotic`` at ``synthetic.DEFAULT_DIFFICULTY``): erm and fairdro with
  seeds 0-4; groupdro, erm_cvar, dmoe, fairdro_empirical, fairdro_groupdro and oracle with seeds 0-2;
- **dose-response**: the same kind at level 0 (the placebo: the minority looks like the majority) and at the
  default level + 1 (the default - 1 when the default is the hardest level, 3), erm, fairdro and oracle, seeds 0-1;
- **carry-over**: the other kind (``distractor``) at its default level, erm, fairdro and oracle, seeds 0-1.

Within a table the runs go seed by seed (every variant's seed 0 first), so a partial table already has one run of
each variant. Every run uses the cohort :data:`COHORT` (800 cases of 64x64x32, split 0.3/0.1/0.6: 240 training and
480 testing cases) and the recipe :data:`RECIPE` (6 epochs, the whole volume as one patch); they were chosen so that
one run (training + evaluation) takes about 8 minutes on the 2-core CPU, about 6 hours for the whole plan.

Each finished run is one folder ``bench/results/ablation/<run name>/`` of small committed files (``run.json``,
``per_case.csv``, ``metrics.json``, ``train_log.json``); data and checkpoints stay in the scratch folder
(``--work``). After every run the report is rewritten from whatever is finished (a partial table says how many
seeds of each cell are done): ``report.md``, ``report.json`` and ``dose_response.png`` in the same folder, with
the statistics of ``bench/ablation_stats.py`` and a plain verdict. The old ``ablation.md``/``ablation.json`` there
are the history of an earlier benchmark (60 cases, 5 variants) and are left as they are.

Usage::

    make benchmark-fairness                 # the whole plan (cached runs are skipped)
    make benchmark-fairness BENCH=smoke     # the same code path on a tiny plan (3 runs, about 2 minutes)
    python bench/fairness_ablation.py [--bench full|smoke] [--out DIR] [--work DIR]
        [--commit] [--report-only] [--dry-run] [--variants V [V ...]]

- ``--commit``: after each finished run, ``git add`` its folder and the report and commit them (``ablation: <run
  name>``), so a benchmark running in the background keeps its results across sessions;
- ``--report-only``: rebuild the report from the finished runs, train nothing;
- ``--dry-run``: print the plan, which runs are cached and which would run;
- ``--variants``: run only these variants' runs (for example those that a pending recipe change cannot affect).

The smoke bench writes under ``<work>/smoke_results`` (never the committed folder); a second smoke run is served
from the cache (delete that folder to train again).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_stats as stats  # noqa: E402
import runcache  # noqa: E402

sys.path.insert(0, str(runcache.BUNDLE))
from scripts.synthetic import DEFAULT_DIFFICULTY, LEVEL_SEVERITY  # noqa: E402

REPO = runcache.REPO
RESULTS = REPO / "bench" / "results" / "ablation"
REPORT_FILES = ("report.md", "report.json", "dose_response.png")

#: the cohort of every full-bench run (plus ``minority`` and ``difficulty``)
COHORT = {"n_cases": 800, "shape": [64, 64, 32], "split": [0.3, 0.1, 0.6], "seed": 0, "minority_frac": 0.15}
#: the recipe of every full-bench run: about 8 minutes per run (training + evaluation) on the 2-core CPU
RECIPE = {"num_samples": 1, "batch_size": 2, "val_interval": 1, "epochs": 6}
MINUTES_PER_RUN = 8
MAX_LEVEL = len(LEVEL_SEVERITY) - 1
MAIN_KIND = "necrotic"
CARRY_KIND = "distractor"
#: variant -> number of seeds (seeds 0..n-1) of the main table, in table order
MAIN_SEEDS = {"erm": 5, "groupdro": 3, "erm_cvar": 3, "dmoe": 3, "fairdro": 5, "fairdro_empirical": 3,
              "fairdro_groupdro": 3, "oracle": 3}  # fmt: skip
SIDE_VARIANTS = ("erm", "fairdro", "oracle")
SIDE_SEEDS = 2

SMOKE_COHORT = {"n_cases": 24, "shape": [48, 48, 24], "split": [0.5, 0.25, 0.25], "seed": 0, "minority_frac": 0.25,
                "minority": "necrotic", "difficulty": 2}  # fmt: skip
SMOKE_RECIPE = {"epochs": 2, "val_interval": 1, "num_samples": 1, "batch_size": 2, "features": 4, "num_experts": 4,
                "patch_size": [64, 64, 32]}  # fmt: skip
SMOKE_VARIANTS = ("erm", "fairdro", "oracle")

#: the verdict of a report (``ablation_stats.verdict``)
verdict = stats.verdict

SECTIONS = {"main": "Main table", "dose_response": "Dose-response", "carry_over": "Carry-over"}


@dataclass(frozen=True)
class Table:
    """The runs of one cohort in one section of the report."""

    name: str  # unique, e.g. "main", "dose_response_l0"
    section: str  # "main", "dose_response" or "carry_over"
    cohort: dict[str, Any]
    specs: tuple[runcache.RunSpec, ...]

    @property
    def kind(self) -> str:
        return self.cohort["minority"]

    @property
    def level(self) -> int:
        return self.cohort["difficulty"]

    def variants(self) -> list[str]:
        return list(dict.fromkeys(s.variant for s in self.specs))


def _seed_major(variant_seeds: dict[str, int]) -> list[tuple[str, int]]:
    n = max(variant_seeds.values())
    return [(v, s) for s in range(n) for v, k in variant_seeds.items() if s < k]


def _table(name: str, section: str, cohort: dict, variant_seeds: dict[str, int], recipe: dict) -> Table:
    specs = tuple(runcache.RunSpec(v, s, cohort, dict(recipe)) for v, s in _seed_major(variant_seeds))
    return Table(name, section, cohort, specs)


def plan_tables(bench: str = "full") -> list[Table]:
    """The tables of a bench (``full`` or ``smoke``), in run order (see the module notes)."""
    if bench == "smoke":
        return [_table("main", "main", dict(SMOKE_COHORT), dict.fromkeys(SMOKE_VARIANTS, 1), SMOKE_RECIPE)]
    if bench != "full":
        raise ValueError(f"unknown bench {bench!r}: 'full' or 'smoke'.")
    default = DEFAULT_DIFFICULTY[MAIN_KIND]
    tables = [_table("main", "main", {**COHORT, "minority": MAIN_KIND, "difficulty": default}, MAIN_SEEDS, RECIPE)]
    for level in sorted({0, default + 1 if default < MAX_LEVEL else default - 1} - {default}):
        cohort = {**COHORT, "minority": MAIN_KIND, "difficulty": level}
        side = dict.fromkeys(SIDE_VARIANTS, SIDE_SEEDS)
        tables.append(_table(f"dose_response_l{level}", "dose_response", cohort, side, RECIPE))
    cohort = {**COHORT, "minority": CARRY_KIND, "difficulty": DEFAULT_DIFFICULTY[CARRY_KIND]}
    tables.append(_table("carry_over", "carry_over", cohort, dict.fromkeys(SIDE_VARIANTS, SIDE_SEEDS), RECIPE))
    return tables


def plan(bench: str = "full") -> list[runcache.RunSpec]:
    """Every run of a bench, in run order (main table first)."""
    return [spec for table in plan_tables(bench) for spec in table.specs]


# ---------------------------------------------------------------------------------------------------------------
# reading finished runs
# ---------------------------------------------------------------------------------------------------------------
def read_per_case(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return [{**r, "dice": float(r["dice"])} for r in csv.DictReader(f)]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_run(run_dir: Path) -> dict[str, Any]:
    """The files of a finished run: ``meta`` (run.json), ``summary`` (:func:`ablation_stats.run_summary`), ``rows``."""
    meta = _read_json(run_dir / "run.json")
    summary = stats.run_summary(_read_json(run_dir / "metrics.json"), _read_json(run_dir / "train_log.json"))
    return {"meta": meta, "summary": summary, "rows": read_per_case(run_dir / "per_case.csv")}


def run_state(spec: runcache.RunSpec, out: Path) -> str:
    """``done`` (finished with the current key), ``stale`` (finished with another key) or ``missing``."""
    run_dir = out / spec.name
    if runcache.is_done(run_dir, runcache.run_key(spec)):
        return "done"
    return "stale" if (run_dir / "run.json").is_file() else "missing"


def build_report(tables: list[Table], out: Path, bench: str, n_boot: int = 2000) -> dict[str, Any]:
    """The report of the finished runs of ``tables`` under ``out`` (runs of another configuration are not counted)."""
    report: dict[str, Any] = {"bench": bench, "tables": {}, "stale_runs": [], "failed_runs": []}
    commits: dict[str, int] = {}
    times = []
    for table in tables:
        cells: dict[str, Any] = {}
        loaded: dict[str, list[dict[str, Any]]] = {}
        for spec in table.specs:
            cell = cells.setdefault(spec.variant, {"planned": 0, "done": 0, "seeds": [], "runs": {}})
            cell["planned"] += 1
            state = run_state(spec, out)
            if state == "stale":
                report["stale_runs"].append(spec.name)
            if state != "done":
                continue
            run = load_run(out / spec.name)
            cell["done"] += 1
            cell["seeds"].append(spec.seed)
            cell["runs"][str(spec.seed)] = {**run["summary"], "run": spec.name, "commit": run["meta"].get("commit")}
            loaded.setdefault(spec.variant, []).append(run)
            commit = run["meta"].get("commit", "unknown")
            commits[commit] = commits.get(commit, 0) + 1
            times.append(float(run["meta"].get("train_s", 0)) + float(run["meta"].get("evaluate_s", 0)))
        for variant, cell in cells.items():
            cell["summary"] = stats.aggregate_runs([r["summary"] for r in loaded.get(variant, [])])
        comparisons = {}
        if "fairdro" in loaded:
            ours = stats.seed_average([r["rows"] for r in loaded["fairdro"]])
            for other in table.variants():
                if other != "fairdro" and other in loaded:
                    theirs = stats.seed_average([r["rows"] for r in loaded[other]])
                    comparisons[other] = stats.paired_comparison(ours, theirs, n_boot=n_boot, seed=0)
                    comparisons[other]["seed_and_case"] = stats.seed_case_bootstrap(ours, theirs, n_boot, seed=0)
        report["tables"][table.name] = {
            "section": table.section,
            "kind": table.kind,
            "level": table.level,
            "cohort": table.cohort,
            "recipe": table.specs[0].overrides if table.specs else {},
            "cells": cells,
            "comparisons": comparisons,
        }
    report["meta"] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "commits": commits,
        "runs_done": sum(c["done"] for t in report["tables"].values() for c in t["cells"].values()),
        "runs_planned": sum(c["planned"] for t in report["tables"].values() for c in t["cells"].values()),
        "mean_run_minutes": round(sum(times) / len(times) / 60, 1) if times else None,
        "bench_version": runcache.BENCH_VERSION,
    }
    report["verdict"] = stats.verdict(report)
    return report


# ---------------------------------------------------------------------------------------------------------------
# writing the report
# ---------------------------------------------------------------------------------------------------------------
def _ms(entry: dict[str, Any] | None, pct: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    if pct:
        return f"{entry['mean']:.0%} ± {entry['std']:.0%}"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def _ci(entry: dict[str, Any]) -> str:
    if entry.get("estimate") is None:
        return "-"
    ci = entry.get("ci")
    return f"{entry['estimate']:+.3f}" + (f" {stats.format_interval(ci)}" if ci else "")


_MAIN_COLUMNS = [
    ("mean_dice", False),
    ("worst_group_dice", False),
    ("es_dice", False),
    ("worst_group_cvar", False),
    ("minority_dice", False),
    ("minority_failure_rate", True),
    ("worst_group_minority_dice", False),
    ("ess_frac", False),
]


def _variant_table(tab: dict[str, Any]) -> list[str]:
    labels = [stats.RUN_METRICS[k][1] if k in stats.RUN_METRICS else "ESS fraction (end)" for k, _ in _MAIN_COLUMNS]
    lines = ["| variant | seeds done | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for variant, cell in tab["cells"].items():
        vals = [_ms(cell["summary"].get(k), pct) for k, pct in _MAIN_COLUMNS]
        lines.append(f"| {variant} | {cell['done']}/{cell['planned']} | " + " | ".join(vals) + " |")
    return lines


def _stage_table(tab: dict[str, Any]) -> list[str]:
    stages = sorted({g for c in tab["cells"].values() for g in c["summary"].get("per_group", {})})
    if not stages:
        return []
    head = " | ".join(f"{g} minority Dice | {g} failure rate" for g in stages)
    lines = [f"| variant | {head} |", "|---" * (2 * len(stages) + 1) + "|"]
    for variant, cell in tab["cells"].items():
        per = cell["summary"].get("per_group", {})
        vals = []
        for g in stages:
            vals += [_ms(per.get(g, {}).get("minority_dice")), _ms(per.get(g, {}).get("minority_failure_rate"), True)]
        lines.append(f"| {variant} | " + " | ".join(vals) + " |")
    return lines


def _ci_only(comparison: dict[str, Any], metric: str) -> str:
    """The two-level (seeds and cases) interval of ``metric``, or "-" for a report without it."""
    ci = comparison.get("seed_and_case", {}).get(metric, {}).get("ci")
    return stats.format_interval(ci) if ci else "-"


def _comparison_rows(name: str, tab: dict[str, Any]) -> list[str]:
    rows = []
    for other, c in tab["comparisons"].items():
        rows.append(
            f"| {name} | {tab['kind']} l{tab['level']} | {other} | {c['n_runs_a']} vs {c['n_runs_b']} | "
            f"{c['n_cases']} ({c['n_minority']}) | {c['mean_difference']:+.3f} | {c['wilcoxon']['p_value']:.3g} | "
            f"{_ci(c['worst_group_dice'])} | {_ci(c['minority_dice'])} | {_ci_only(c, 'worst_group_dice')} | "
            f"{_ci_only(c, 'minority_dice')} |"
        )
    return rows


def dose_points(report: dict[str, Any], kind: str = MAIN_KIND) -> dict[str, dict[int, dict[str, Any]]]:
    """``{variant: {level: cell}}`` of erm, fairdro and oracle over the tables of ``kind`` (main + dose-response)."""
    points: dict[str, dict[int, dict[str, Any]]] = {}
    for tab in report["tables"].values():
        if tab["kind"] != kind or tab["section"] not in ("main", "dose_response"):
            continue
        for variant in SIDE_VARIANTS:
            cell = tab["cells"].get(variant)
            if cell and cell["done"]:
                points.setdefault(variant, {})[int(tab["level"])] = cell
    return points


def plot_dose_response(report: dict[str, Any], path: Path) -> bool:
    """Minority Dice and worst-group Dice against the level (mean ± std over seeds); False when nothing to plot."""
    points = dose_points(report)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, key in zip(axes, ("minority_dice", "worst_group_dice")):
        for variant, by_level in points.items():
            levels = sorted(by_level)
            means = [by_level[lv]["summary"][key]["mean"] for lv in levels]
            stds = [by_level[lv]["summary"][key]["std"] for lv in levels]
            keep = [i for i, m in enumerate(means) if m is not None]
            ax.errorbar([levels[i] for i in keep], [means[i] for i in keep], yerr=[stds[i] for i in keep],
                        marker="o", capsize=3, label=variant)  # fmt: skip
        ax.set_xlabel(f"{MAIN_KIND} difficulty level (0 = placebo)")
        ax.set_ylabel(stats.RUN_METRICS[key][1])
        ax.set_xticks(range(4))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Dose-response (testing split, mean ± std over seeds)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def render_markdown(report: dict[str, Any], has_plot: bool) -> str:
    meta = report["meta"]
    tables = report["tables"]
    main = tables.get("main")
    cohort = {k: v for k, v in (main or {}).get("cohort", {}).items() if k not in ("minority", "difficulty")}
    lines = [
        "# Fairness ablation" + (" (smoke bench)" if report["bench"] == "smoke" else ""),
        "",
        f"Generated by `bench/fairness_ablation.py --bench {report['bench']}` (`make benchmark-fairness"
        f"{' BENCH=smoke' if report['bench'] == 'smoke' else ''}`); {meta['runs_done']} of {meta['runs_planned']} "
        f"planned runs finished. Synthetic cohort {json.dumps(cohort)}, recipe "
        f"{json.dumps((main or {}).get('recipe', {}))}; every number is on the testing split, grouped by stage. "
        f"Report built on {meta['machine']}, {meta['cpus']} CPUs"
        + (f"; a run took {meta['mean_run_minutes']} min on average." if meta["mean_run_minutes"] else "."),
        "",
        report["verdict"],
        "",
    ]
    for tab in tables.values():
        if tab["section"] not in ("main", "carry_over"):
            continue
        lines += [
            f"## {SECTIONS[tab['section']]}: `{tab['kind']}` minority at level {tab['level']}",
            "",
            "Mean ± std over the finished seeds; the minority failure rate is the share of minority cases with "
            "Dice < 0.5; ESS fraction: effective sample size of the DRO case weights / training cases, last epoch.",
            "",
            *_variant_table(tab),
            "",
        ]
        stage = _stage_table(tab)
        if stage and tab["section"] == "main":
            lines += ["Minority Dice and failure rate per stage:", "", *stage, ""]
    comp_rows = [row for name, tab in tables.items() for row in _comparison_rows(name, tab)]
    lines += [
        "## Paired comparisons: fairdro minus each other variant",
        "",
        "Same cohort, same testing cases; each case's Dice averaged over the finished seeds of each variant. "
        "Wilcoxon signed-rank p over cases; 95% paired-bootstrap interval (2000 draws, seed 0, cases resampled "
        "within stage groups, the same draws for both variants) of the difference in worst-group Dice (lowest "
        "stage mean) and in minority Dice. The case bootstrap does not see seed-to-seed variation; the last two "
        "columns resample each variant's seeds too (two-level bootstrap: seeds with replacement, then the same "
        "case draws), which widens the intervals by that variation.",
        "",
    ]
    if comp_rows:
        lines += [
            "| table | cohort | vs | seeds (fairdro vs other) | cases (minority) | mean Δ Dice | Wilcoxon p "
            "| Δ worst-group Dice [95% CI] | Δ minority Dice [95% CI] | Δ worst-group, seeds too | "
            "Δ minority, seeds too |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *comp_rows,
            "",
        ]
    else:
        lines += ["Not yet measured (fairdro and another variant need a finished run on the same cohort).", ""]
    points = dose_points(report)
    lines += [f"## Dose-response: `{MAIN_KIND}` minority by level", ""]
    if points:
        lines += [
            "| variant | level | seeds done | minority Dice | minority failure rate | worst-group Dice |",
            "|---|---|---|---|---|---|",
        ]
        for variant, by_level in points.items():
            for level in sorted(by_level):
                s, cell = by_level[level]["summary"], by_level[level]
                lines.append(
                    f"| {variant} | {level} | {cell['done']}/{cell['planned']} | {_ms(s['minority_dice'])} | "
                    f"{_ms(s['minority_failure_rate'], True)} | {_ms(s['worst_group_dice'])} |"
                )
        lines.append("")
        if has_plot:
            lines += ["![dose-response](dose_response.png)", ""]
    else:
        lines += ["Not yet measured.", ""]
    lines += ["## Runs", ""]
    if meta["commits"]:
        lines += ["Git commits the finished runs ran on (from each `run.json`):", ""]
        lines += [f"- `{c}`: {n} run(s)" for c, n in sorted(meta["commits"].items())]
    else:
        lines.append("No finished run yet.")
    if report["stale_runs"]:
        lines += ["", f"{len(report['stale_runs'])} run folder(s) hold results of another configuration (not counted, "
                  f"rerun by the next benchmark): {', '.join(report['stale_runs'])}."]  # fmt: skip
    if report["bench"] == "full":
        lines += ["", "`ablation.md` and `ablation.json` in this folder are the history of an earlier benchmark (60 "
                  "cases, 5 variants, 3 seeds, 15 epochs), not produced by this script."]  # fmt: skip
    if report["failed_runs"]:
        lines += ["", f"Failed in this invocation: {', '.join(report['failed_runs'])}."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``report.md``, ``report.json`` and ``dose_response.png`` (when there is a point) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / "dose_response.png"
    has_plot = plot_dose_response(report, png)
    if not has_plot:
        png.unlink(missing_ok=True)
    (out / "report.md").write_text(render_markdown(report, has_plot))
    (out / "report.json").write_text(json.dumps(stats.finite(report), indent=2, allow_nan=False) + "\n")
    return [out / f for f in REPORT_FILES if (out / f).is_file()]


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def git_commit_paths(paths: list[Path], message: str, repo: Path = REPO, attempts: int = 3) -> bool:
    """``git add`` then commit only ``paths`` (``git commit --only``: other staged changes stay staged)."""
    rel = [str(p.resolve().relative_to(repo.resolve())) for p in paths if p.exists()]
    for attempt in range(attempts):
        add = subprocess.run(["git", "add", "--", *rel], cwd=repo, capture_output=True, text=True)
        if add.returncode == 0:
            res = subprocess.run(["git", "commit", "-q", "--only", "-m", message, "--", *rel], cwd=repo,
                                 capture_output=True, text=True)  # fmt: skip
            if res.returncode == 0:
                return True
            error = res.stdout + res.stderr
        else:
            error = add.stdout + add.stderr
        if "index.lock" not in error or attempt == attempts - 1:
            print(f"git commit failed: {error.strip()}", flush=True)
            return False
        time.sleep(2.0)
    return False


def git_toplevel(path: Path) -> Path | None:
    """The git working tree holding ``path`` (its nearest existing folder), or ``None``.

    The benchmark may run from another worktree at a fixed commit and commit its results into the main one."""
    folder = next((p for p in [path, *path.parents] if p.is_dir()), None)
    if folder is None:
        return None
    res = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    return Path(res.stdout.strip()) if res.returncode == 0 else None


def git_tracked(path: Path, repo: Path) -> bool:
    """Whether git tracks files under ``path`` and none of them has uncommitted changes."""
    rel = str(path.resolve().relative_to(repo.resolve()))
    files = subprocess.run(["git", "ls-files", "--", rel], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", rel], cwd=repo, capture_output=True, text=True)
    return bool(files) and not dirty.stdout.strip()


def record_run(run_dir: Path, ran: bool, write: Callable[[], list[Path]], message: str, repo: Path | None) -> None:
    """After a run of a benchmark: rewrite its tables (``write`` returns their files) when the run was trained, or is
    a copy that ``repo`` does not track yet, and commit the run's folder with them when ``repo`` is given."""
    if ran or (repo is not None and not git_tracked(run_dir, repo)):
        files = write()
        if repo is not None:
            git_commit_paths([run_dir, *files], message, repo, attempts=10)


def _write_tables(tables, out: Path, bench: str, failed: list[str]) -> list[Path]:
    report = build_report(tables, out, bench)
    report["failed_runs"] = failed
    return write_report(report, out)


def reusable(bench: str, out: Path) -> list[Path]:
    """Folders of other benchmarks beside ``out`` whose identical runs (same key) are copied instead of trained: the
    cohort calibration (ERM and the oracle, seed 0) and the recipe sweep (FairDRO, seed 0, one folder per setting)."""
    if bench != "full":
        return []
    results = out.parent
    return [results / "calibration", *sorted(p for p in (results / "recipe").glob("*") if p.is_dir())]


def dry_run(tables: list[Table], out: Path, sources: list[Path] = (), work: Path = Path(".bench_work")) -> int:
    counts: dict[str, int] = {}
    for table in tables:
        print(f"{table.name}: {table.kind} level {table.level}")
        for spec in table.specs:
            action, _ = runcache.decide(spec, out, work / "runs", list(sources))
            counts[action] = counts.get(action, 0) + 1
            word = {"cached": "cached", "copy": "would be copied (identical run of another benchmark)",
                    "re-evaluate": "would be re-evaluated (same training, weights kept)",
                    "rerun": "would rerun (configuration changed)", "run": "would run"}[action]  # fmt: skip
            print(f"  {spec.name:<40} {word}")
    total = sum(counts.values())
    todo = counts.get("run", 0) + counts.get("rerun", 0)
    extra = "".join(f", {counts[k]} {k}" for k in ("copy", "re-evaluate") if counts.get(k))
    cached = counts.get("cached", 0)
    print(f"{cached} of {total} runs cached, {todo} to run (about {todo * MINUTES_PER_RUN / 60:.1f} h){extra}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", choices=("full", "smoke"), default="full")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folders and report (default: bench/results/ablation; smoke: <work>/smoke_results)",
    )
    parser.add_argument("--work", type=Path, default=REPO / ".bench_work", help="scratch: data, checkpoints, logs")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run and the report")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report, train nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what is cached")
    parser.add_argument("--variants", nargs="+", metavar="V", help="run only these variants (the report has all)")
    args = parser.parse_args(argv)  # fmt: skip
    work = args.work.resolve()
    out = (args.out or (work / "smoke_results" if args.bench == "smoke" else RESULTS)).resolve()
    tables = plan_tables(args.bench)
    if args.dry_run:
        return dry_run(tables, out, reusable(args.bench, out), work)
    repo = git_toplevel(out) if args.commit else None
    if args.commit and repo is None:
        parser.error(f"--commit needs --out inside a git working tree, got {out}")
    failed: list[str] = []
    t_start = time.time()
    if not args.report_only:
        for spec in plan(args.bench):
            if args.variants and spec.variant not in args.variants:
                continue
            t = time.time()
            try:
                run_dir, ran = runcache.run(spec, out, work / "data", work / "runs", sources=reusable(args.bench, out))
            except RuntimeError as exc:  # one failed run does not stop a long benchmark
                print(f"{spec.name}: FAILED ({exc})", flush=True)
                failed.append(spec.name)
                continue
            print(f"{spec.name}: {'ran' if ran else 'cached'} ({time.time() - t:.0f} s)", flush=True)
            record_run(
                run_dir, ran, lambda: _write_tables(tables, out, args.bench, failed), f"ablation: {spec.name}", repo
            )  # a copy from another benchmark is new here too
    files = _write_tables(tables, out, args.bench, failed)
    if args.commit and args.report_only:
        git_commit_paths(files, "ablation: report", repo)
    print((out / "report.md").read_text())  # the report as written, not rendered a second time
    print(f"report: {out / 'report.md'} ({time.time() - t_start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
