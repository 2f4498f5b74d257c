"""Uncertainty and comparisons for the fairness metrics: bootstrap intervals, paired tests, seed aggregation.

- :func:`bootstrap_group_metrics`: the subgroup statistics of :func:`scripts.fairness_metrics.compute_group_metrics`
  with percentile bootstrap intervals; every draw resamples the cases *within each group* with
  replacement (group sizes fixed), from a fixed seed, so a report is reproducible.
- :func:`compare_records`: two runs on the same cases: per-case paired differences (run B minus run A),
  a Wilcoxon signed-rank test (scipy), and a paired bootstrap interval (the same resampled cases for both
  runs) of the difference in worst-group score and in worst-group CVaR.
- :func:`aggregate_metrics`: mean ± sample standard deviation (``ddof=1``) of every summary over seed runs.

Command line (reads the files a run's :mod:`scripts.fairness_report` wrote; ``RUN`` is a run folder holding
``fairness/``, the ``fairness`` folder itself, or the file)::

    python bundle/scripts/fairness_stats.py summary RUN
    python bundle/scripts/fairness_stats.py compare RUN_A RUN_B [--groupings stage institution] [--out FILE]
    python bundle/scripts/fairness_stats.py aggregate RUN1 RUN2 ... [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

if __package__ in (None, ""):  # run as a file: make the ``scripts`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.fairness_metrics import (  # noqa: E402
    SCORE_COLUMNS,
    _as_bool,
    _group_label,
    class_names_of,
    compute_group_metrics,
    group_statistics,
    metric_output_names,
    records_to_table,
)

__all__ = [
    "aggregate_metrics",
    "aggregate_runs",
    "bootstrap_group_metrics",
    "compare_records",
    "compare_runs",
    "flatten_metrics",
    "main",
    "percentile_interval",
    "read_metrics_json",
    "read_per_case_csv",
    "wilcoxon_signed_rank",
]

logger = logging.getLogger(__name__)

PER_CASE_FILE = "per_case.csv"
METRICS_FILE = "metrics.json"
FAIRNESS_DIR = "fairness"


# --------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------
def percentile_interval(draws: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``draws`` (first axis) at ``confidence``, e.g. (2.5%, 97.5%)."""
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(np.asarray(draws, dtype=float), [tail, 100.0 - tail], axis=0)
    return float(low), float(high)


def _check_boot(n_boot: int, confidence: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"`n_boot` must be a positive integer, got {n_boot}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")


def _resample_indices(rng: np.random.Generator, sizes: Mapping[str, int], n_boot: int) -> dict[str, np.ndarray]:
    """Within-group bootstrap indices ``{group: (n_boot, n_g)}``, drawn in the order of ``sizes``."""
    return {g: rng.integers(0, n, size=(n_boot, n)) for g, n in sizes.items()}


def _values_by_group(rows: list[dict[str, Any]], attribute: str, metric: str, order: Sequence[str]):
    labels = np.array([_group_label(r.get(attribute)) for r in rows], dtype=object)
    values = np.array([float(r[metric]) for r in rows], dtype=float)
    return {g: values[labels == g] for g in order}


def bootstrap_group_metrics(
    records: Any,
    attribute: str,
    metric: str = "dice",
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    alpha: float = 0.2,
    threshold: float = 0.5,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Subgroup statistics with percentile bootstrap intervals (cases resampled within each group).

    Args:
        records: per-case records (see :func:`scripts.fairness_metrics.compute_group_metrics`).
        attribute: grouping attribute.
        metric: ``"dice"`` or ``"nsd"``.
        n_boot: number of bootstrap draws.
        seed: seed of the ``numpy.random.default_rng`` generator; the same seed gives the same intervals.
        confidence: interval level (0.95: the 2.5th and 97.5th percentiles of the draws).
        alpha: CVaR tail fraction.
        threshold: failure threshold.
        groups: expected group names, ``None`` for those present.

    Returns:
        The dict of :func:`~scripts.fairness_metrics.compute_group_metrics` (point estimates unchanged) with
        ``ci``: ``{summary: [low, high]}`` for every summary but ``hidden_failures``, ``ci`` in each group
        entry: ``{metric: [low, high], "cvar": [low, high]}``, and ``bootstrap``: the settings used.
    """
    _check_boot(n_boot, confidence)
    result = compute_group_metrics(records, attribute, metric=metric, alpha=alpha, threshold=threshold, groups=groups)
    rows = records_to_table(records)
    order = list(result["groups"])
    by_group = _values_by_group(rows, attribute, metric, order)
    rng = np.random.default_rng(seed)
    idx = _resample_indices(rng, {g: len(v) for g, v in by_group.items()}, n_boot)
    draws = group_statistics({g: by_group[g][idx[g]] for g in order}, metric=metric, alpha=alpha, threshold=threshold)
    result["ci"] = {
        name: list(percentile_interval(draws[name], confidence))
        for name in metric_output_names(metric)
        if name != "hidden_failures"
    }
    for j, g in enumerate(order):
        result["groups"][g]["ci"] = {
            metric: list(percentile_interval(draws["group_mean"][:, j], confidence)),
            "cvar": list(percentile_interval(draws["group_cvar"][:, j], confidence)),
        }
    result["bootstrap"] = {
        "n_boot": int(n_boot),
        "seed": int(seed),
        "confidence": float(confidence),
        "method": "percentile; cases resampled with replacement within each group",
    }
    return result


# --------------------------------------------------------------------------------------------------------------
# paired comparison
# --------------------------------------------------------------------------------------------------------------
def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int]:
    """Two-sided Wilcoxon signed-rank test of the paired differences ``b - a`` (``scipy.stats.wilcoxon``).

    Zero differences are dropped (scipy's ``zero_method="wilcox"``). When every difference is zero the
    runs are identical on these cases: ``statistic = 0``, ``p_value = 1``.

    Returns:
        ``{"statistic", "p_value", "n_nonzero"}``.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(f"paired samples must be 1-D of one length, got shapes {a_arr.shape} and {b_arr.shape}.")
    d = b_arr - a_arr
    n_nonzero = int(np.count_nonzero(d))
    if n_nonzero == 0:
        return {"statistic": 0.0, "p_value": 1.0, "n_nonzero": 0}
    res = sps.wilcoxon(b_arr, a_arr, zero_method="wilcox", alternative="two-sided")
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "n_nonzero": n_nonzero}


def _match_cases(records_a: Any, records_b: Any, id_key: str) -> tuple[list[dict], list[dict]]:
    rows_a, rows_b = records_to_table(records_a), records_to_table(records_b)
    maps = []
    for name, rows in (("A", rows_a), ("B", rows_b)):
        ids = [str(r.get(id_key)) for r in rows]
        if any(r.get(id_key) is None for r in rows):
            raise ValueError(f"run {name}: every case needs an {id_key!r} to pair runs.")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"run {name}: repeated case id(s) {dup[:10]}.")
        maps.append(dict(zip(ids, rows)))
    only_a, only_b = sorted(set(maps[0]) - set(maps[1])), sorted(set(maps[1]) - set(maps[0]))
    if only_a or only_b:
        raise ValueError(
            f"the runs were evaluated on different cases: {len(only_a)} only in A {only_a[:10]}, "
            f"{len(only_b)} only in B {only_b[:10]}. Compare runs evaluated on the same cases."
        )
    ids = sorted(maps[0])
    return [maps[0][i] for i in ids], [maps[1][i] for i in ids]


def compare_records(
    records_a: Any,
    records_b: Any,
    groupings: Sequence[str],
    metric: str = "dice",
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    alpha: float = 0.2,
    threshold: float = 0.5,
    id_key: str = "id",
) -> dict[str, Any]:
    """Paired comparison of run B against run A on the same cases (differences are B minus A).

    Args:
        records_a: per-case records of run A (with ``id_key``, the grouping columns and ``metric``).
        records_b: per-case records of run B, on the same case ids.
        groupings: grouping attributes for the worst-group differences.
        metric: ``"dice"`` or ``"nsd"``.
        n_boot: paired bootstrap draws (the same resampled cases, within groups, for both runs).
        seed: bootstrap seed.
        confidence: interval level.
        alpha: CVaR tail fraction.
        threshold: failure threshold.
        id_key: case id column.

    Returns:
        ``{"metric", "n_cases", "mean_difference", "median_difference", "n_improved", "n_worsened", "n_tied",
        "wilcoxon": {...}, "groupings": {attr: {"worst_group_<metric>_difference": {"estimate", "low",
        "high", "a", "b"}, "worst_group_cvar_difference": {...}, "groups": {g: {"n", "mean_difference"}}}}}``.

    Raises:
        ValueError: when the case sets differ, ids repeat, or a case's group differs between the runs.
    """
    _check_boot(n_boot, confidence)
    rows_a, rows_b = _match_cases(records_a, records_b, id_key)
    a = np.array([float(r[metric]) for r in rows_a])
    b = np.array([float(r[metric]) for r in rows_b])
    d = b - a
    result: dict[str, Any] = {
        "metric": metric,
        "n_cases": len(rows_a),
        "mean_difference": float(d.mean()),
        "median_difference": float(np.median(d)),
        "n_improved": int((d > 0).sum()),
        "n_worsened": int((d < 0).sum()),
        "n_tied": int((d == 0).sum()),
        "wilcoxon": wilcoxon_signed_rank(a, b),
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "confidence": float(confidence)},
        "groupings": {},
    }
    worst_key = f"worst_group_{metric}"
    for attribute in groupings:
        labels_a = [_group_label(r.get(attribute)) for r in rows_a]
        labels_b = [_group_label(r.get(attribute)) for r in rows_b]
        differing = [str(r[id_key]) for r, la, lb in zip(rows_a, labels_a, labels_b) if la != lb]
        if differing:
            raise ValueError(f"{attribute!r} differs between the runs for case(s) {differing[:10]}.")
        point_a = compute_group_metrics(rows_a, attribute, metric=metric, alpha=alpha, threshold=threshold)
        point_b = compute_group_metrics(rows_b, attribute, metric=metric, alpha=alpha, threshold=threshold)
        order = list(point_a["groups"])
        labels = np.array(labels_a, dtype=object)
        rng = np.random.default_rng(seed)
        idx = _resample_indices(rng, {g: int((labels == g).sum()) for g in order}, n_boot)
        draws_a = group_statistics({g: a[labels == g][idx[g]] for g in order}, metric, alpha, threshold)
        draws_b = group_statistics({g: b[labels == g][idx[g]] for g in order}, metric, alpha, threshold)
        entry: dict[str, Any] = {}
        for key, out_key in (
            (worst_key, f"{worst_key}_difference"),
            ("worst_group_cvar", "worst_group_cvar_difference"),
        ):
            low, high = percentile_interval(draws_b[key] - draws_a[key], confidence)
            entry[out_key] = {
                "estimate": float(point_b[key] - point_a[key]),
                "low": low,
                "high": high,
                "a": float(point_a[key]),
                "b": float(point_b[key]),
            }
        entry["groups"] = {
            g: {"n": int((labels == g).sum()), "mean_difference": float(d[labels == g].mean())} for g in order
        }
        result["groupings"][attribute] = entry
    return result


# --------------------------------------------------------------------------------------------------------------
# seed aggregation
# --------------------------------------------------------------------------------------------------------------
_SKIP_KEYS = {
    "ci",
    "alpha",
    "threshold",
    "n_cases",
    "n_groups",
    "n",
    "n_minority",
    "n_majority",
    "bootstrap",
    "settings",
    "routing",
}


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric summaries of a ``metrics.json`` as ``{"groupings/stage/dice/worst_group_dice": value}``.

    Only the ``overall`` and ``groupings`` sections are read; intervals, counts of cases and settings are
    skipped (booleans, strings and nulls too).
    """
    flat: dict[str, float] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k not in _SKIP_KEYS:
                    walk(v, f"{path}/{k}" if path else str(k))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[path] = float(node)

    for section in ("overall", "groupings"):
        if section in metrics:
            walk(metrics[section], section)
    return flat


def aggregate_metrics(metrics_list: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean ± sample standard deviation (``ddof=1``) of every numeric summary across seed runs.

    Args:
        metrics_list: the ``metrics.json`` contents of each run (at least two).
        names: optional run names, in the same order.

    Returns:
        ``{"n_runs", "runs", "metrics": {path: {"mean", "std", "values"}}, "dropped": [paths]}``; a summary
        absent from some run is dropped (with a warning) rather than averaged over fewer runs.

    Raises:
        ValueError: fewer than two runs, or no summary common to all runs.
    """
    if len(metrics_list) < 2:
        raise ValueError(f"aggregating seeds needs at least two runs, got {len(metrics_list)}.")
    names = list(names) if names is not None else [f"run{i}" for i in range(len(metrics_list))]
    flats = [flatten_metrics(m) for m in metrics_list]
    common = set(flats[0]).intersection(*flats[1:])
    dropped = sorted(set().union(*flats) - common)
    if dropped:
        logger.warning("%d summaries are not in every run and are left out, e.g. %s", len(dropped), dropped[:5])
    if not common:
        raise ValueError("the runs share no numeric summary: are these fairness/metrics.json files?")
    out: dict[str, Any] = {"n_runs": len(flats), "runs": names, "metrics": {}, "dropped": dropped}
    for key in sorted(common):
        values = np.array([f[key] for f in flats], dtype=float)
        out["metrics"][key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)),
            "values": values.tolist(),
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# files and command line
# --------------------------------------------------------------------------------------------------------------
def _resolve(run: str | Path, filename: str) -> Path:
    path = Path(run)
    for candidate in (path / FAIRNESS_DIR / filename, path / filename, path):
        if candidate.is_file() and candidate.name == filename:
            return candidate
    raise FileNotFoundError(f"no {filename} for run {str(run)!r} (looked in {path / FAIRNESS_DIR} and {path}).")


def read_per_case_csv(run: str | Path) -> list[dict[str, Any]]:
    """Per-case records of a run's ``fairness/per_case.csv``; ids and attributes stay strings."""
    import pandas as pd

    path = _resolve(run, PER_CASE_FILE)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    rows = frame.to_dict(orient="records")
    score_columns = _score_columns(list(rows[0]) if rows else [])
    for r in rows:
        for m in score_columns:
            if m in r:
                r[m] = float(r[m]) if r[m] != "" else float("nan")
        if "hard" in r:
            r["hard"] = _as_bool(r["hard"])
    return rows


def _score_columns(columns: Sequence[str]) -> list[str]:
    """The per-case score columns among ``columns``: :data:`SCORE_COLUMNS` and ``dice_<class>``, ``iou_<class>``."""
    per_class = {f"{m}_{c}" for c in class_names_of(columns) for m in ("dice", "iou")}
    return [c for c in columns if c in SCORE_COLUMNS or c in per_class]


def read_metrics_json(run: str | Path) -> dict[str, Any]:
    """Contents of a run's ``fairness/metrics.json``."""
    return json.loads(_resolve(run, METRICS_FILE).read_text())


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _format_minority(groupings: Mapping[str, Any]) -> list[str]:
    """Headline lines of the hidden-minority blocks (none when the run's cases had no ``subtype``)."""
    blocks = {attr: block["minority"] for attr, block in groupings.items() if "minority" in block}
    if not blocks:
        return []
    first = next(iter(blocks.values()))
    o = first["overall"]
    worst = []
    for attr, b in blocks.items():
        group = f" ({b['worst_minority_group']})" if b["worst_minority_group"] is not None else ""
        worst.append(f"{attr} {_num(b['worst_group_minority_dice'])}{group}")
    return [
        f"hidden minority (subtype; fails below Dice {first['threshold']:g}): {o['n_minority']} minority / "
        f"{o['n_majority']} majority cases, minority Dice {_num(o['minority_dice'])}, majority Dice "
        f"{_num(o['majority_dice'])}, minority failure rate {_num(o['minority_failure_rate'])} "
        f"({o['minority_failures']}/{o['n_minority']})",
        f"worst-group minority Dice: {', '.join(worst)}",
    ]


def _overall_line(metrics: Mapping[str, Any]) -> str:
    """``N cases: mean Dice .., HD95 .. mm, NSD ..`` with what the run has (HD95 in px for pixel units)."""
    overall = metrics["overall"]
    parts = [f"mean Dice {overall['dice']['mean']:.3f}"]
    for key, unit in (("hd95", "mm"), ("hd95_px", "px")):
        if key in overall:
            parts.append(f"HD95 {overall[key]['mean']:.1f} {unit}")
    for key, label in (("nsd", "NSD"), ("nsd_px", "NSD (px tolerance)")):
        if key in overall:
            parts.append(f"{label} {overall[key]['mean']:.3f}")
    return f"{metrics['n_cases']} cases: " + ", ".join(parts)


def _format_classes(metrics: Mapping[str, Any]) -> list[str]:
    """Per-class mean Dice, and per grouping each class's ES-Dice and ES-IoU (none for binary runs)."""
    classes = metrics.get("classes") or []
    if not classes:
        return []
    overall = metrics["overall"]
    dice = ", ".join(f"{c} {overall[f'dice_{c}']['mean']:.3f}" for c in classes if f"dice_{c}" in overall)
    lines = [f"per-class Dice (mean over cases): {dice}"]
    for attr, block in metrics["groupings"].items():
        per_class = block.get("per_class") or {}
        es = ", ".join(f"{c} {e['es_dice']:.3f} / {e['es_iou']:.3f}" for c, e in per_class.items())
        if es:
            lines.append(f"{attr}: per-class ES-Dice / ES-IoU: {es}")
    return lines


def format_summary(metrics: Mapping[str, Any]) -> str:
    """Headline table of one run: overall Dice/HD95/NSD, per grouping the fairness summaries, the per-class Dice
    and ES-Dice / ES-IoU of multi-class runs, and the hidden minority's Dice, the majority's and the minority
    failure rate when ``metrics.json`` has them."""
    lines = [
        _overall_line(metrics),
        f"{'grouping':<12} {'worst-group Dice':>17} {'group gap':>10} {'ES-Dice':>8} {'worst-group CVaR':>17} "
        f"{'hidden failures':>16} {'hard failed':>12}",
    ]
    for attr, block in metrics["groupings"].items():
        d = block["dice"]
        hard = f"{d.get('hard_failures', 0)}/{d.get('hard_cases', 0)}" if "hard_cases" in d else "-"
        lines.append(
            f"{attr:<12} {d['worst_group_dice']:>11.3f} ({d['worst_group']:>3}) {d['group_gap']:>10.3f} "
            f"{d['es_dice']:>8.3f} {d['worst_group_cvar']:>17.3f} {d['hidden_failures']:>16d} {hard:>12}"
        )
    lines += _format_classes(metrics)
    lines += _format_minority(metrics["groupings"])
    return "\n".join(lines)


def _default_groupings(run: str | Path, rows: list[dict[str, Any]]) -> list[str]:
    try:
        return list(read_metrics_json(run)["groupings"])
    except (FileNotFoundError, KeyError):
        if not rows:
            return []
        skip = {"id", "hard", "subtype", *_score_columns(list(rows[0]))}
        return [c for c in rows[0] if c not in skip]


def compare_runs(
    run_a: str | Path, run_b: str | Path, groupings: Sequence[str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`compare_records` on two runs' ``per_case.csv`` files (groupings default to run A's)."""
    rows_a, rows_b = read_per_case_csv(run_a), read_per_case_csv(run_b)
    groupings = list(groupings) if groupings else _default_groupings(run_a, rows_a)
    result = compare_records(rows_a, rows_b, groupings, **kwargs)
    result["run_a"], result["run_b"] = str(run_a), str(run_b)
    return result


def aggregate_runs(runs: Sequence[str | Path]) -> dict[str, Any]:
    """:func:`aggregate_metrics` over several seed runs' ``metrics.json`` files."""
    return aggregate_metrics([read_metrics_json(r) for r in runs], names=[str(r) for r in runs])


def _format_compare(result: Mapping[str, Any]) -> str:
    m = result["metric"]
    w = result["wilcoxon"]
    lines = [
        f"B = {result.get('run_b', 'B')} vs A = {result.get('run_a', 'A')}: {result['n_cases']} paired cases",
        f"  mean {m} difference (B - A): {result['mean_difference']:+.4f}  "
        f"median {result['median_difference']:+.4f}  improved {result['n_improved']}  "
        f"worsened {result['n_worsened']}  tied {result['n_tied']}",
        f"  Wilcoxon signed-rank: W = {w['statistic']:.4g}, p = {w['p_value']:.4g} ({w['n_nonzero']} non-zero)",
    ]
    level = round(100 * result["bootstrap"]["confidence"])
    for attribute, entry in result["groupings"].items():
        for key, d in entry.items():
            if key.endswith("_difference"):
                lines.append(
                    f"  {attribute}: {key} {d['estimate']:+.4f} [{level}% CI {d['low']:+.4f}, {d['high']:+.4f}] "
                    f"(A {d['a']:.4f}, B {d['b']:.4f})"
                )
    return "\n".join(lines)


def _format_aggregate(result: Mapping[str, Any]) -> str:
    lines = [f"{result['n_runs']} runs: mean ± std (ddof=1)"]
    for key, s in result["metrics"].items():
        lines.append(f"  {key}: {s['mean']:.4f} ± {s['std']:.4f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description="Compare fairness results of runs, or aggregate seed runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_p = sub.add_parser("compare", help="paired comparison of run B against run A on the same cases")
    cmp_p.add_argument("run_a")
    cmp_p.add_argument("run_b")
    cmp_p.add_argument("--groupings", nargs="+", default=None, help="grouping attributes (default: run A's)")
    cmp_p.add_argument("--metric", default="dice", choices=["dice", "nsd"])
    cmp_p.add_argument("--n-boot", type=int, default=1000)
    cmp_p.add_argument("--seed", type=int, default=0)
    cmp_p.add_argument("--alpha", type=float, default=0.2, help="CVaR tail fraction")
    cmp_p.add_argument("--out", default=None, help="write the result as JSON here")
    agg_p = sub.add_parser("aggregate", help="mean ± std of every summary over seed runs")
    agg_p.add_argument("runs", nargs="+")
    agg_p.add_argument("--out", default=None, help="write the result as JSON here")
    sum_p = sub.add_parser("summary", help="headline numbers of one run's fairness/metrics.json")
    sum_p.add_argument("run")
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            print(format_summary(read_metrics_json(args.run)))
            return 0
        if args.command == "compare":
            result = compare_runs(
                args.run_a,
                args.run_b,
                groupings=args.groupings,
                metric=args.metric,
                n_boot=args.n_boot,
                seed=args.seed,
                alpha=args.alpha,
            )
            text = _format_compare(result)
        else:
            result = aggregate_runs(args.runs)
            text = _format_aggregate(result)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
