"""The report of the benchmark on a user's datalist: per-group numbers on the user's groups, paired comparisons, the
verdict and the winner.

Input: each finished run's ``per_case.csv`` (``bench/runcache.py``), by variant, seed and fold. A seed of a variant
is **complete** when every fold's run of it finished; its folds' testing cases are then **pooled** (with folds,
every case of the cross-validation pool is tested exactly once; :func:`pool_rows` refuses a case tested twice or
never). Each variant's cases are averaged over its complete seeds (each metric column, case by case).

Per grouping attribute (``SUBGROUP_KEY``, then each extra attribute such as ``sex`` or ``scanner``), per group and
variant (:func:`group_cell`), on the seed-averaged pooled cases:

- ``n`` testing cases; Dice (the mean over the foreground classes for multi-class) and ``dice_<class>`` per class;
- ``worst_decile_dice``: the 10th percentile of the group's Dice (``numpy.percentile``, linear): the Dice that the
  worst tenth of the group falls below; ``cvar``: the mean Dice of the group's worst ``alpha`` share
  (``scripts.fairness_metrics.cvar``, ``alpha`` 0.2 by default). Neither needs minority labels: they see hidden
  failures inside a group whose mean looks fine;
- ``failure_rate``: the share of the group's cases with Dice below ``threshold`` (``--threshold``, 0.5);
- ``hd95``: the mean HD95 in mm, where the images carry a spacing (NIfTI); PNG/JPEG/NPZ images have none and get
  no HD95 here (their ``hd95_px`` stays in ``per_case.csv``).

A group with fewer than ``min_group_cases`` testing cases is marked **too small to compare**: it is left out of
worst-group Dice, ES-Dice (``scripts.fairness_metrics.compute_group_metrics``) and the paired comparisons.

Comparisons (``bench/ablation_stats.py``): FairDRO against each other variant on the same seed-averaged cases of the
comparable groups: the difference in worst-group Dice over ``SUBGROUP_KEY`` with a paired bootstrap interval over
cases (resampled within groups) and a two-level one over seeds and cases, the mean difference and the Wilcoxon
signed-rank p. Minority Dice enters only when the items carry a ``subtype``.

The **winner** is the variant with the best seed-averaged pooled worst-group Dice over ``SUBGROUP_KEY`` (ties: the
earlier in ``VARIANTS``); the **verdict** names FairDRO's standing against the strongest baseline (erm, groupdro,
erm_cvar, dmoe by that worst-group Dice), in plain words: "beats" or "is worse than" only when the two-level interval
(over seeds and cases) excludes 0; the interval over cases alone does not see how much a retraining with another
seed moves the result, and is given beside it. With one seed the two are equal. While runs are missing the verdict is
provisional.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_stats as stats  # noqa: E402
import datalist_report_md  # noqa: E402
import runcache  # noqa: E402

if str(runcache.BUNDLE) not in sys.path:
    sys.path.insert(0, str(runcache.BUNDLE))
from scripts.fairness_metrics import SCORE_COLUMNS, class_names_of, compute_group_metrics, cvar  # noqa: E402
from scripts.fairness_stats import read_per_case_csv  # noqa: E402

OURS = "fairdro"
DECILE = 10.0
REPORT_FILES = ("report.md", "report.json")

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Settings:
    """What the report computes over: the groupings, thresholds and bootstrap (see the module notes)."""

    subgroup_key: str
    extras: tuple[str, ...] = ()
    threshold: float = 0.5
    alpha: float = 0.2
    min_group_cases: int = 10
    n_boot: int = 2000
    seed: int = 0

    @property
    def groupings(self) -> tuple[str, ...]:
        return (self.subgroup_key, *self.extras)


# ------------------------------------------------------------------------------------------------ cases


def read_rows(run_dir: Path) -> Rows:
    """A finished run's per-case rows (ids and attributes as text, scores as floats)."""
    return read_per_case_csv(run_dir / "per_case.csv")


def metric_columns(rows: Rows) -> list[str]:
    """The score columns every row has: ``dice``, ``iou``, ``hd95``/``hd95_px``, ``nsd``, per-class columns."""
    if not rows:
        return []
    per_class = [f"{m}_{c}" for c in class_names_of(rows[0]) for m in ("dice", "iou")]
    return [c for c in [*SCORE_COLUMNS, *per_class] if all(c in r for r in rows)]


def pool_rows(by_fold: Mapping[str, Rows], expected: Sequence[str] | None = None) -> Rows:
    """The folds' testing cases together; every expected id exactly once.

    Raises:
        ValueError: a case tested in two folds, or an expected case tested in none.
    """
    rows = [r for fold in sorted(by_fold) for r in by_fold[fold]]
    ids = [str(r["id"]) for r in rows]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"case(s) {twice[:5]} are tested in more than one fold.")
    missing = sorted(set(expected or ()) - set(ids))
    if missing:
        raise ValueError(f"case(s) {missing[:5]} are tested in no fold.")
    return rows


def average_seeds(runs: Sequence[Rows]) -> Rows:
    """Each case's score columns averaged over the runs (seeds); attributes from the first run."""
    columns = metric_columns(runs[0])
    by_id = [{str(r["id"]): r for r in rows} for rows in runs]
    out = []
    for case, first in sorted(by_id[0].items()):
        row = dict(first)
        for c in columns:
            row[c] = float(np.mean([float(b[case][c]) for b in by_id]))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ group numbers


def group_of(row: Mapping[str, Any], attribute: str) -> str:
    value = row.get(attribute)
    return "unknown" if value is None or str(value).strip() in ("", "nan", "None") else str(value)


def group_cell(rows: Rows, settings: Settings) -> dict[str, Any]:
    """The numbers of one group and variant (module notes)."""
    dice = np.array([float(r["dice"]) for r in rows])
    cell: dict[str, Any] = {
        "n": len(rows),
        "dice": float(dice.mean()),
        "worst_decile_dice": float(np.percentile(dice, DECILE)),
        "cvar": float(cvar(dice, settings.alpha)),
        "failure_rate": float((dice < settings.threshold).mean()),
        "hd95": float(np.mean([float(r["hd95"]) for r in rows])) if "hd95" in metric_columns(rows) else None,
    }
    for name in class_names_of(rows[0]):
        cell[f"dice_{name}"] = float(np.mean([float(r[f"dice_{name}"]) for r in rows]))
    return cell


def comparable_groups(rows: Rows, attribute: str, min_cases: int) -> tuple[list[str], dict[str, int]]:
    """(the groups with at least ``min_cases`` cases, sorted; every group's count)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[group_of(r, attribute)] = counts.get(group_of(r, attribute), 0) + 1
    return sorted(g for g, n in counts.items() if n >= min_cases), dict(sorted(counts.items()))


def _with_group(rows: Rows, attribute: str) -> Rows:
    return [{**r, attribute: group_of(r, attribute)} for r in rows]


def summary(rows: Rows, attribute: str, groups: Sequence[str], settings: Settings) -> dict[str, Any]:
    """Worst-group Dice, ES-Dice, worst-group CVaR and mean Dice over the comparable ``groups`` (and per class);
    ``None`` values without a comparable group."""
    kept = [r for r in _with_group(rows, attribute) if r[attribute] in groups]
    if not kept:
        return {"worst_group_dice": None, "worst_group": None, "es_dice": None, "worst_group_cvar": None,
                "dice_all": None, "per_class": {}}  # fmt: skip
    g = compute_group_metrics(kept, attribute, "dice", settings.alpha, settings.threshold, groups=list(groups))
    per_class = {}
    for name in class_names_of(kept[0]):
        gc = compute_group_metrics(kept, attribute, f"dice_{name}", settings.alpha, settings.threshold, list(groups))
        per_class[name] = {"worst_group_dice": gc[f"worst_group_dice_{name}"], "es_dice": gc[f"es_dice_{name}"]}
    return {"worst_group_dice": g["worst_group_dice"], "worst_group": g["worst_group"], "es_dice": g["es_dice"],
            "worst_group_cvar": g["worst_group_cvar"], "dice_all": g["dice_all"], "per_class": per_class}  # fmt: skip


def grouping_block(averaged: Mapping[str, Rows], attribute: str, settings: Settings) -> dict[str, Any]:
    """Per group and variant (:func:`group_cell`) and per variant (:func:`summary`) for one attribute."""
    any_rows = next(iter(averaged.values()))
    groups, counts = comparable_groups(any_rows, attribute, settings.min_group_cases)
    block: dict[str, Any] = {"comparable": groups, "too_small": [g for g in counts if g not in groups], "groups": {}}
    for g, n in counts.items():
        cells = {v: group_cell([r for r in rows if group_of(r, attribute) == g], settings) for v, rows in
                 averaged.items()}  # fmt: skip
        block["groups"][g] = {"n": n, "too_small": g not in groups, "variants": cells}
    block["summary"] = {v: summary(rows, attribute, groups, settings) for v, rows in averaged.items()}
    return block


# ------------------------------------------------------------------------------------------------ comparisons


def _comparable_rows(rows: Rows, key: str, groups: Sequence[str]) -> Rows:
    return [r for r in _with_group(rows, key) if r[key] in groups]


def compare(ours: Sequence[Rows], theirs: Sequence[Rows], key: str, groups: Sequence[str], settings: Settings) -> dict:
    """FairDRO (``ours``: its pooled rows per complete seed) against another variant on the comparable groups."""
    a = stats.seed_average([_comparable_rows(r, key, groups) for r in ours], group_key=key)
    b = stats.seed_average([_comparable_rows(r, key, groups) for r in theirs], group_key=key)
    result = stats.paired_comparison(a, b, n_boot=settings.n_boot, seed=settings.seed)
    result["seed_and_case"] = stats.seed_case_bootstrap(a, b, n_boot=settings.n_boot, seed=settings.seed)
    return result


def winner(summaries: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> str | None:
    """The variant with the best worst-group Dice (ties: the earlier in ``order``)."""
    scored = [v for v in order if summaries.get(v, {}).get("worst_group_dice") is not None]
    return max(scored, key=lambda v: (summaries[v]["worst_group_dice"], -order.index(v))) if scored else None


# ------------------------------------------------------------------------------------------------ verdict


def _standing(est: float, ci: Sequence[float] | None) -> str:
    if ci and ci[0] > 0:
        return "beats"
    if ci and ci[1] < 0:
        return "is worse than"
    if est > 0:
        return "is ahead of, but not significantly,"
    return "is behind, but not significantly," if est < 0 else "ties with"


def verdict(report: Mapping[str, Any]) -> str:
    """The plain verdict of a report (module notes)."""
    key, variants = report["settings"]["subgroup_key"], report["variants"]
    sums = report["groupings"].get(key, {}).get("summary", {}) if report["groupings"] else {}
    lead = "On this cohort" if report["complete"] else f"Provisionally ({report['runs']['done']} of " \
        f"{report['runs']['planned']} runs finished), on this cohort"  # fmt: skip
    best = report.get("winner")
    deploy = f" The model to deploy is {best} (best worst-group Dice, {sums[best]['worst_group_dice']:.3f})." \
        if best else ""  # fmt: skip
    if OURS not in sums:
        return f"{lead}, FairDRO was not compared (not among the variants, or unfinished).{deploy}"
    baselines = [v for v in stats.BASELINES if v in sums and sums[v]["worst_group_dice"] is not None]
    if not baselines:
        return f"{lead}, no baseline ({', '.join(stats.BASELINES)}) finished to compare FairDRO with.{deploy}"
    strongest = max(baselines, key=lambda v: sums[v]["worst_group_dice"])
    comp = report["comparisons"][strongest]
    wg, two_level = comp["worst_group_dice"], comp["seed_and_case"]["worst_group_dice"]
    text = (
        f"{lead}, FairDRO {_standing(wg['estimate'], two_level.get('ci'))} the strongest baseline, {strongest}, on "
        f"worst-group Dice over {key}: "
        f"{sums[OURS]['worst_group_dice']:.3f} vs {sums[strongest]['worst_group_dice']:.3f}, difference "
        f"{wg['estimate']:+.3f} (95% interval over seeds and cases {stats.ci_words(two_level)}; over cases alone "
        f"{stats.ci_words(wg)}), {comp['n_cases']} testing cases, "
        f"{variants[OURS]['seeds_done']} and {variants[strongest]['seeds_done']} seed(s)."
    )
    if comp["minority_dice"]["estimate"] is not None:
        text += f" Minority Dice: {comp['minority_dice']['estimate']:+.3f} ({stats.ci_words(comp['minority_dice'])})."
    small = report["groupings"][key]["too_small"]
    if small:
        text += f" Too small to compare (< {report['settings']['min_group_cases']} testing cases): {', '.join(small)}."
    return text + deploy


# ------------------------------------------------------------------------------------------------ report


def complete_seeds(runs: Mapping[int, Mapping[str, Rows | None]], folds: Sequence[str]) -> list[int]:
    """The seeds every fold of which finished."""
    return [s for s, by_fold in sorted(runs.items()) if all(by_fold.get(f) is not None for f in folds)]


def build_report(
    runs: Mapping[str, Mapping[int, Mapping[str, Rows | None]]],
    folds: Sequence[str],
    expected_ids: Sequence[str],
    settings: Settings,
    info: Mapping[str, Any],
) -> dict[str, Any]:
    """The report dict (module notes) from ``runs[variant][seed][fold]`` (rows, or ``None`` when not finished)."""
    order = list(runs)
    pooled = {v: {s: pool_rows({f: runs[v][s][f] for f in folds}, expected_ids) for s in complete_seeds(runs[v],
              folds)} for v in order}  # fmt: skip
    averaged = {v: average_seeds(list(p.values())) for v, p in pooled.items() if p}
    planned = sum(len(by_seed) * len(folds) for by_seed in runs.values())
    done = sum(1 for v in runs for s in runs[v] for f in folds if runs[v][s].get(f) is not None)
    report: dict[str, Any] = {
        "info": dict(info), "settings": {**settings.__dict__, "extras": list(settings.extras)},
        "runs": {"planned": planned, "done": done}, "complete": done == planned,
        "cases": {"expected": len(expected_ids), "tested_once": bool(averaged), "folds": list(folds)},
        "variants": {v: {"seeds_done": len(pooled[v]), "seeds": sorted(pooled[v])} for v in order},
        "groupings": {a: grouping_block(averaged, a, settings) for a in settings.groupings} if averaged else {},
        "comparisons": {},
    }  # fmt: skip
    if averaged:
        _per_seed(report, pooled, settings)
        _comparisons(report, pooled, settings)
        report["winner"] = winner(report["groupings"][settings.subgroup_key]["summary"], order)
    report["verdict"] = verdict(report)
    return report


def _per_seed(report: dict[str, Any], pooled: Mapping[str, Mapping[int, Rows]], settings: Settings) -> None:
    """Each variant's worst-group Dice over the subgroup key seed by seed (mean ± std over seeds)."""
    groups = report["groupings"][settings.subgroup_key]["comparable"]
    for v, by_seed in pooled.items():
        values = [summary(rows, settings.subgroup_key, groups, settings)["worst_group_dice"] for rows in
                  by_seed.values()]  # fmt: skip
        report["variants"][v]["worst_group_dice_per_seed"] = stats.mean_std(values)


def _comparisons(report: dict[str, Any], pooled: Mapping[str, Mapping[int, Rows]], settings: Settings) -> None:
    key = settings.subgroup_key
    groups = report["groupings"][key]["comparable"]
    if not pooled.get(OURS) or not groups:
        return
    ours = list(pooled[OURS].values())
    for other, by_seed in pooled.items():
        if other != OURS and by_seed:
            report["comparisons"][other] = compare(ours, list(by_seed.values()), key, groups, settings)


def write_report(report: Mapping[str, Any], out: Path) -> list[Path]:
    """``report.md`` and ``report.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(stats.finite(report), indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(datalist_report_md.render_markdown(report))
    return [out / f for f in REPORT_FILES]
