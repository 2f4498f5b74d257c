"""Statistics of the fairness ablation (``bench/fairness_ablation.py``): pure functions, no file access.

- :func:`run_summary`: the numbers of one run, from its ``metrics.json`` (stage grouping) and ``train_log.json``.
- :func:`mean_std` / :func:`aggregate_runs`: mean ± sample standard deviation (``ddof=1``; 0 for one seed) over
  the seeds of a variant.
- :func:`seed_average`: each case's Dice averaged over the seeds of one variant (the cases of a cohort are the same
  in every run, so runs pair case by case).
- :func:`paired_comparison`: variant A (FairDRO) against variant B on the same cases: Wilcoxon signed-rank test
  over cases (``scripts.fairness_stats.wilcoxon_signed_rank``) and a paired bootstrap, cases resampled *within
  stage groups* with the same indices for both variants, of the difference A - B in worst-group Dice (the lowest
  stage mean) and in minority Dice (the mean over minority cases), with percentile intervals.
- :func:`seed_case_bootstrap`: the same two intervals from a two-level bootstrap that resamples each variant's seeds
  as well as the cases, so that seed-to-seed variation (which the seed-averaged case bootstrap does not see) widens
  them.
- :func:`verdict`: one plain paragraph on FairDRO against the strongest baseline, from a report dict.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
if str(_BUNDLE) not in sys.path:
    sys.path.insert(0, str(_BUNDLE))

from scripts.fairness_stats import wilcoxon_signed_rank  # noqa: E402

#: summary of a run: name -> (metrics.json path under groupings.<grouping>, label in the tables)
RUN_METRICS = {
    "mean_dice": ("dice.dice_all", "mean Dice"),
    "worst_group_dice": ("dice.worst_group_dice", "worst-group Dice"),
    "es_dice": ("dice.es_dice", "ES-Dice"),
    "worst_group_cvar": ("dice.worst_group_cvar", "worst-group CVaR"),
    "minority_dice": ("minority.overall.minority_dice", "minority Dice"),
    "minority_failure_rate": ("minority.overall.minority_failure_rate", "minority failure rate"),
    "worst_group_minority_dice": ("minority.worst_group_minority_dice", "worst-group minority Dice"),
}
#: the end-of-training ESS fraction (``train_log.json`` ``last_dro.dro_ess_frac``)
ESS_KEY = "dro_ess_frac"
#: FairDRO's ablations are not baselines: the verdict picks the strongest of these (by worst-group Dice)
BASELINES = ("erm", "groupdro", "erm_cvar", "dmoe")
MAJORITY = "majority"


def _get(tree: Mapping[str, Any] | None, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _num(x: Any) -> float | None:
    """A finite float, or ``None`` (missing, ``None``, NaN)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_summary(
    metrics: Mapping[str, Any], train_log: Mapping[str, Any] | None = None, grouping: str = "stage"
) -> dict[str, Any]:
    """The numbers of one run.

    Args:
        metrics: the run's ``metrics.json`` (``scripts.fairness_report``).
        train_log: the run's ``train_log.json`` (``runcache.parse_train_log``), for the ESS fraction.
        grouping: the grouping attribute the summaries are read from.

    Returns:
        ``{name: value}`` for every name of :data:`RUN_METRICS` plus ``ess_frac`` (``None`` where missing) and
        ``per_group``: ``{group: {"minority_dice", "minority_failure_rate", "n_minority"}}``.
    """
    block = _get(metrics, f"groupings.{grouping}") or {}
    out: dict[str, Any] = {name: _num(_get(block, path)) for name, (path, _) in RUN_METRICS.items()}
    out["ess_frac"] = _num(_get(train_log, f"last_dro.{ESS_KEY}"))
    groups = _get(block, "minority.groups") or {}
    out["per_group"] = {
        g: {
            "minority_dice": _num(cell.get("minority_dice")),
            "minority_failure_rate": _num(cell.get("minority_failure_rate")),
            "n_minority": int(cell.get("n_minority") or 0),
        }
        for g, cell in sorted(groups.items())
    }
    return out


def mean_std(values: Sequence[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the values that are not ``None``.

    Returns ``{"mean", "std", "n"}``; ``mean`` and ``std`` are ``None`` without any value.
    """
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals)}


def aggregate_runs(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of each summary of :func:`run_summary` (and of each group's minority numbers)."""
    out: dict[str, Any] = {name: mean_std([s.get(name) for s in summaries]) for name in [*RUN_METRICS, "ess_frac"]}
    groups = sorted({g for s in summaries for g in s.get("per_group", {})})
    out["per_group"] = {
        g: {
            key: mean_std([s.get("per_group", {}).get(g, {}).get(key) for s in summaries])
            for key in ("minority_dice", "minority_failure_rate")
        }
        for g in groups
    }
    return out


def is_minority(subtype: Any) -> bool:
    """Whether a case's ``subtype`` names a minority kind (not missing, not ``majority``, not ``unknown``)."""
    if subtype is None or (isinstance(subtype, float) and math.isnan(subtype)):
        return False
    text = str(subtype).strip().lower()
    return text not in ("", MAJORITY, "unknown", "nan", "none")


def seed_average(runs: Sequence[Sequence[Mapping[str, Any]]], group_key: str = "stage") -> dict[str, Any]:
    """Each case's Dice averaged over the runs (seeds) of one variant.

    Args:
        runs: per run, its per-case rows (``per_case.csv``: ``id``, ``group_key``, ``subtype``, ``dice``).

    Returns:
        ``{"ids", "group", "minority", "dice", "n_runs", "per_run"}``: lists sorted by case id (``dice`` the seed
        average, ``per_run`` each run's Dice in the same order).

    Raises:
        ValueError: no run, or runs evaluated on different cases.
    """
    if not runs:
        raise ValueError("no run to average.")
    first = {str(r["id"]): r for r in runs[0]}
    ids = sorted(first)
    per_run = []
    for k, rows in enumerate(runs):
        by_id = {str(r["id"]): float(r["dice"]) for r in rows}
        if set(by_id) != set(ids):
            raise ValueError(f"run {k} was evaluated on other cases than run 0: the runs do not pair.")
        per_run.append([by_id[i] for i in ids])
    return {
        "ids": ids,
        "group": [str(first[i].get(group_key, "unknown")) for i in ids],
        "minority": [is_minority(first[i].get("subtype")) for i in ids],
        "dice": np.mean(np.asarray(per_run), axis=0).tolist(),
        "n_runs": len(runs),
        "per_run": per_run,
    }


def worst_group_dice(dice: Sequence[float], groups: Sequence[str]) -> float:
    """The lowest group mean of ``dice``."""
    d, g = np.asarray(dice, dtype=float), np.asarray(groups, dtype=object)
    return float(min(d[g == name].mean() for name in sorted(set(g.tolist()))))


def minority_dice(dice: Sequence[float], minority: Sequence[bool]) -> float | None:
    """Mean Dice of the minority cases (``None`` without any)."""
    d, m = np.asarray(dice, dtype=float), np.asarray(minority, dtype=bool)
    return float(d[m].mean()) if m.any() else None


def stratified_indices(groups: Sequence[str], n_boot: int, seed: int = 0) -> np.ndarray:
    """Bootstrap draws of case indices, resampled with replacement within each group (group sizes kept).

    Returns an ``[n_boot, n_cases]`` integer array: in every draw the slot of case ``i`` holds a case of ``i``'s
    group. Groups are drawn in sorted order from ``numpy.random.default_rng(seed)``.
    """
    g = np.asarray(groups, dtype=object)
    rng = np.random.default_rng(seed)
    out = np.zeros((n_boot, g.size), dtype=int)
    for name in sorted(set(g.tolist())):
        members = np.flatnonzero(g == name)
        out[:, members] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
    return out


def _interval(draws: np.ndarray, confidence: float) -> list[float] | None:
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return [float(low), float(high)]


def _check_pairing(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if a["ids"] != b["ids"]:
        raise ValueError("the variants were evaluated on different cases: they do not pair.")
    if a["group"] != b["group"] or a["minority"] != b["minority"]:
        raise ValueError("the variants disagree on the cases' groups or subtypes.")


def _draw_differences(
    xa: np.ndarray, xb: np.ndarray, idx: np.ndarray, groups: Sequence[str], minority: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per bootstrap draw, A - B in worst-group Dice and in minority Dice (NaN for a draw without a minority case).

    ``xa``, ``xb``: [n_boot, n_cases] Dice of the case drawn into each slot; ``idx``: the drawn case indices (slot i
    holds a case of slot i's group, so the slots of a group are the group's members).
    """
    g_arr = np.asarray(groups, dtype=object)
    slots = [np.flatnonzero(g_arr == name) for name in sorted(set(g_arr.tolist()))]

    def worst(x: np.ndarray) -> np.ndarray:  # [n_boot] lowest stage mean of each draw
        return np.min(np.stack([x[:, s].mean(axis=1) for s in slots], axis=1), axis=1)

    return worst(xa) - worst(xb), drawn_minority_mean(xa - xb, idx, minority)


def drawn_minority_mean(x: np.ndarray, idx: np.ndarray, minority: np.ndarray) -> np.ndarray:
    """[n_boot] mean of ``x`` ([n_boot, n_cases], slot values of the drawn cases ``idx``) over each draw's minority
    cases (NaN for a draw without one)."""
    m = np.asarray(minority, dtype=bool)[idx].astype(float)
    n_min = m.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * m).sum(axis=1) / np.where(n_min > 0, n_min, np.nan)


def _seed_weights(rng: np.random.Generator, n_runs: int, n_boot: int) -> np.ndarray:
    """[n_boot, n_runs] weights of a resample of the runs with replacement (counts / n_runs; rows sum to 1)."""
    picks = rng.integers(0, n_runs, size=(n_boot, n_runs))
    return (picks[:, :, None] == np.arange(n_runs)).sum(axis=1) / n_runs  # count of each run in each draw


def seed_case_draws(avg: Mapping[str, Any], rng: np.random.Generator, idx: np.ndarray) -> np.ndarray:
    """[n_boot, n_cases] Dice of one variant (:func:`seed_average`) in each two-level draw: its runs resampled with
    replacement (``rng``) and averaged case by case, then the drawn cases ``idx`` ([n_boot, n_cases])."""
    runs = np.asarray(avg["per_run"], dtype=float)
    return np.take_along_axis(_seed_weights(rng, runs.shape[0], idx.shape[0]) @ runs, idx, axis=1)


def seed_case_bootstrap(
    a: Mapping[str, Any], b: Mapping[str, Any], n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Two-level paired bootstrap of A - B (both from :func:`seed_average`): seeds, then cases.

    Each draw resamples each variant's runs with replacement (``default_rng([seed, 1])``, A's then B's), averages
    the drawn runs case by case, then takes the same within-stage case draw as :func:`paired_comparison` (identical
    indices for the same ``seed``). With one run per variant the intervals equal :func:`paired_comparison`'s; with
    more, seed-to-seed variation widens them.

    Returns:
        ``{"worst_group_dice": {"ci"}, "minority_dice": {"ci"}, "bootstrap": settings}``.
    """
    _check_pairing(a, b)
    rng = np.random.default_rng([seed, 1])
    idx = stratified_indices(list(a["group"]), n_boot, seed)
    xa = seed_case_draws(a, rng, idx)
    xb = seed_case_draws(b, rng, idx)
    worst_diff, min_diff = _draw_differences(xa, xb, idx, list(a["group"]), np.asarray(a["minority"], dtype=bool))
    return {
        "worst_group_dice": {"ci": _interval(worst_diff, confidence)},
        "minority_dice": {"ci": _interval(min_diff, confidence)},
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "confidence": float(confidence),
            "method": "percentile; each variant's seeds resampled with replacement, then cases within stage groups",
        },
    }


def paired_comparison(
    a: Mapping[str, Any], b: Mapping[str, Any], n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Variant A against variant B on the same cases (both from :func:`seed_average`); differences are A - B.

    Returns:
        ``{"n_cases", "n_minority", "n_runs_a", "n_runs_b", "mean_difference", "wilcoxon": {"statistic",
        "p_value", "n_nonzero"}, "worst_group_dice": {"estimate", "ci"}, "minority_dice": {"estimate", "ci"},
        "bootstrap": settings}``; ``ci`` is the percentile interval over the draws (``[low, high]``); draws
        without a minority case are left out of the minority interval (``None`` when no draw has one).
    """
    _check_pairing(a, b)
    da, db = np.asarray(a["dice"], dtype=float), np.asarray(b["dice"], dtype=float)
    groups, minority = list(a["group"]), np.asarray(a["minority"], dtype=bool)
    idx = stratified_indices(groups, n_boot, seed)
    worst_diff, min_diff = _draw_differences(da[idx], db[idx], idx, groups, minority)
    est_min_a, est_min_b = minority_dice(da, minority), minority_dice(db, minority)
    return {
        "n_cases": int(da.size),
        "n_minority": int(minority.sum()),
        "n_runs_a": int(a.get("n_runs", 1)),
        "n_runs_b": int(b.get("n_runs", 1)),
        "mean_difference": float((da - db).mean()),
        "wilcoxon": wilcoxon_signed_rank(db, da),
        "worst_group_dice": {
            "estimate": worst_group_dice(da, groups) - worst_group_dice(db, groups),
            "ci": _interval(worst_diff, confidence),
        },
        "minority_dice": {
            "estimate": None if est_min_a is None else est_min_a - est_min_b,
            "ci": _interval(min_diff, confidence),
        },
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "confidence": float(confidence),
            "method": "percentile; cases resampled with replacement within stage groups, same draws for both",
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# verdict
# ---------------------------------------------------------------------------------------------------------------
def finite(node: Any) -> Any:
    """``node`` for strict JSON: every non-finite float replaced by ``None``, mapping keys as strings, tuples as
    lists (the reports' ``json.dumps(..., allow_nan=False)``)."""
    if isinstance(node, dict):
        return {str(k): finite(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [finite(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def format_interval(ci: Sequence[float]) -> str:
    """An interval as ``[+0.012, +0.034]`` (the form of every interval in the report)."""
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def excludes_0(ci: Sequence[float] | None) -> bool:
    """Whether an interval lies wholly on one side of 0."""
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


def ci_words(entry: Mapping[str, Any] | None) -> str:
    """``[low, high], excludes 0`` (or ``includes 0``) for an entry's ``ci``; ``no interval`` without one."""
    ci = (entry or {}).get("ci")
    if not ci:
        return "no interval"
    return f"{format_interval(ci)}, {'excludes 0' if excludes_0(ci) else 'includes 0'}"


def _fmt_ci(entry: Mapping[str, Any]) -> str:
    lead = "95% bootstrap interval " if entry.get("ci") else ""
    return f"{entry['estimate']:+.3f} ({lead}{ci_words(entry)})"


def _beats(name: str, entry: Mapping[str, Any] | None) -> str:
    if entry is None or entry.get("estimate") is None:
        return f"on {name}: not yet measured"
    est, ci = entry["estimate"], entry.get("ci")
    if ci and ci[0] > 0:
        word = "beats it"
    elif ci and ci[1] < 0:
        word = "is worse than it"
    elif est > 0:
        word = "is ahead of it but not significantly"
    elif est < 0:
        word = "is behind it but not significantly"
    else:
        word = "ties with it"
    return f"on {name} FairDRO {word}: {_fmt_ci(entry)}"


def verdict(report: Mapping[str, Any], table: str = "main") -> str:
    """FairDRO against the strongest non-oracle baseline of ``table`` (by mean worst-group Dice over seeds).

    Reads ``report["tables"][table]``: ``cells`` (``{variant: {"done", "planned", "summary": {name: {"mean"}}}}``)
    and ``comparisons`` (``{other: paired_comparison}``). Says "not yet measured" while FairDRO or every baseline
    has no finished run, and "provisional" while some planned run of the table is missing.
    """
    tab = (report.get("tables") or {}).get(table)
    if not tab:
        return "Verdict: not yet measured (the table has no run)."
    cells = tab.get("cells", {})

    def done(v: str) -> int:
        return int(cells.get(v, {}).get("done", 0))

    def wgd(v: str) -> float | None:
        return _get(cells.get(v), "summary.worst_group_dice.mean")

    baselines = [v for v in BASELINES if v in cells and done(v) and wgd(v) is not None]
    if "fairdro" not in cells or not done("fairdro") or not baselines:
        missing = [v for v in ["fairdro", *[b for b in BASELINES if b in cells]] if not done(v)]
        return f"Verdict: not yet measured (no finished run of {', '.join(missing) or 'fairdro or a baseline'})."
    best = max(baselines, key=lambda v: wgd(v))
    comp = (tab.get("comparisons") or {}).get(best)
    missing = sum(int(c.get("planned", 0)) - int(c.get("done", 0)) for c in cells.values())
    lead = "Provisional verdict" if missing > 0 else "Verdict"
    note = f" ({missing} planned run(s) of this table not finished yet)" if missing > 0 else ""
    head = (
        f"{lead}{note}: the strongest non-oracle baseline by worst-group Dice is {best} "
        f"({wgd(best):.3f}, {done(best)} seed(s); FairDRO {wgd('fairdro'):.3f}, {done('fairdro')} seed(s))."
    )
    if comp is None:
        return head + " The paired comparison is not yet measured."
    n = f" Paired over {comp['n_cases']} testing cases ({comp['n_minority']} minority), seed-averaged Dice."
    first = _beats("worst-group Dice", comp.get("worst_group_dice"))
    text = f"{head} {first[0].upper()}{first[1:]}; {_beats('minority Dice', comp.get('minority_dice'))}.{n}"
    seeds = comp.get("seed_and_case")
    return text + (" " + _seed_sentence(seeds) if seeds else "")


def _seed_sentence(seeds: Mapping[str, Any]) -> str:
    """The two-level (seeds, then cases) intervals of :func:`seed_case_bootstrap`, as one sentence."""
    return (
        "Resampling the seeds as well as the cases (two-level bootstrap), the 95% intervals are "
        f"{ci_words(seeds.get('worst_group_dice'))} on worst-group Dice and "
        f"{ci_words(seeds.get('minority_dice'))} on minority Dice."
    )
