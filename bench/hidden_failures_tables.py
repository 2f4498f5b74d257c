"""The hidden-failures report (part 2, ``bench/hidden_failures_compare.py``): maths and rendering.

Pure functions of the finished runs (``per_case.csv`` rows, ``train_log.json``), plus :func:`write_report`
(``report.md``, ``report.json``, ``diagnostic.png``).

- :func:`choose_jtt`: JTT's grid point with the best validation worst-group (stage) Dice (each run's best epoch,
  the checkpoint rule); ties go to the earlier point.
- :func:`variant_summary`: per variant, mean ± std over seeds of minority, majority, mean and worst-group Dice, and
  the minority failure rate (share of minority testing cases with Dice below :data:`FAIL_BELOW`, over every run).
- :func:`recovered_share`: ``(method - reference) / (oracle - reference)`` in minority Dice, with a two-level
  bootstrap interval: each variant's seeds resampled with replacement, then cases within stage groups (the same
  case draw for the three variants), the ratio taken in every draw. ``n/a`` where the oracle's gain interval
  contains 0 (there is nothing to recover).
- :func:`diagnostic_summary`: the intra-group CVaR diagnostic (precision, recall, base rate of the minority among
  each group's top-alpha bank losses) at the first refresh, on average over refreshes and at the last epoch.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_stats as stats  # noqa: E402
import hidden_failures_report as hfr  # noqa: E402

FAIL_BELOW = 0.5
N_BOOT = 2000
#: label-free method -> (its reference: the same network with the mean loss, the oracle on that network)
LABEL_FREE = {"erm_cvar": ("erm", "oracle"), "groupdro": ("erm", "oracle"), "fairdro": ("dmoe", "oracle_dmoe"),
              "jtt": ("dmoe", "oracle_dmoe")}  # fmt: skip
ORDER = ("erm", "erm_cvar", "groupdro", "oracle", "dmoe", "fairdro", "jtt", "oracle_dmoe")
NETWORK = {v: ("dMoE" if v in ("dmoe", "fairdro", "jtt", "oracle_dmoe") else "backbone") for v in ORDER}
MEASURES = ("precision", "recall", "base_rate")
FILES = ("report.md", "report.json", "diagnostic.png")


# ---------------------------------------------------------------------------------------------------------------
# JTT's point
# ---------------------------------------------------------------------------------------------------------------
def best_validation(train_log: Mapping[str, Any] | None) -> float | None:
    """A run's best validation worst-group (stage) Dice over its epochs (the checkpoint it keeps)."""
    curve = ((train_log or {}).get("curves") or {}).get("val_worst_group_dice") or {}
    return max(curve.values()) if curve else None


def choose_jtt(points: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The grid point (its ``jtt#`` settings) with the best validation worst-group Dice; ``None`` until every point
    has a finished run with a validation curve."""
    scores = [best_validation(p["run"]["train_log"]) if p.get("run") else None for p in points]
    if not points or any(s is None for s in scores):
        return None
    best = max(range(len(points)), key=lambda k: (scores[k], -k))
    return {k: v for k, v in points[best].items() if k.startswith("jtt#")}


# ---------------------------------------------------------------------------------------------------------------
# per variant
# ---------------------------------------------------------------------------------------------------------------
def by_variant(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        out.setdefault(run["variant"], []).append(run)
    return out


def failure_rate(runs: Sequence[Mapping[str, Any]], threshold: float = FAIL_BELOW) -> float | None:
    """Share of minority testing cases with Dice below ``threshold``, over every run's cases."""
    dice = [float(r["dice"]) for run in runs for r in run["rows"] if stats.is_minority(r.get("subtype"))]
    return sum(d < threshold for d in dice) / len(dice) if dice else None


def variant_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over the seeds of each Dice measure, the minority failure rate and the seeds."""
    numbers = [hfr.run_numbers(r["rows"]) for r in runs]
    cell = {k: stats.mean_std([n[k] for n in numbers]) for k in ("minority_dice", "majority_dice", "mean_dice",
                                                                 "worst_group_dice")}  # fmt: skip
    return {**cell, "minority_failure_rate": failure_rate(runs), "seeds": sorted(r["seed"] for r in runs)}


# ---------------------------------------------------------------------------------------------------------------
# paired differences and the recovered share
# ---------------------------------------------------------------------------------------------------------------
def difference(a_runs, b_runs, n_boot: int = N_BOOT) -> dict[str, Any] | None:
    """A - B in minority and worst-group Dice (seed averages), with two-level 95% intervals."""
    if not a_runs or not b_runs:
        return None
    a = stats.seed_average([r["rows"] for r in a_runs])
    b = stats.seed_average([r["rows"] for r in b_runs])
    boot = stats.seed_case_bootstrap(a, b, n_boot=n_boot)
    return {
        "minority_dice": {"estimate": _minority(a) - _minority(b), "ci": boot["minority_dice"]["ci"]},
        "worst_group_dice": {
            "estimate": stats.worst_group_dice(a["dice"], a["group"]) - stats.worst_group_dice(b["dice"], b["group"]),
            "ci": boot["worst_group_dice"]["ci"],
        },  # fmt: skip
        "n_runs": [len(a_runs), len(b_runs)],
    }


def _minority(avg: Mapping[str, Any]) -> float:
    return float(stats.minority_dice(avg["dice"], avg["minority"]))


def recovered_share(method_runs, ref_runs, oracle_runs, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The share of the oracle's minority-Dice gain over the reference that the method recovers.

    Returns ``{"estimate", "ci", "oracle_gain", "oracle_gain_ci", "applicable"}``; ``estimate`` and ``ci`` are
    ``None`` (n/a) where the oracle's gain interval contains 0.
    """
    if not (method_runs and ref_runs and oracle_runs):
        return {"estimate": None, "ci": None, "oracle_gain": None, "oracle_gain_ci": None, "applicable": False}
    avgs = [stats.seed_average([r["rows"] for r in runs]) for runs in (method_runs, ref_runs, oracle_runs)]
    for other in avgs[1:]:
        stats._check_pairing(avgs[0], other)
    rng = np.random.default_rng([seed, 2])
    idx = stats.stratified_indices(list(avgs[0]["group"]), n_boot, seed)
    m, r, o = (stats.drawn_minority_mean(stats.seed_case_draws(a, rng, idx), idx, a["minority"]) for a in avgs)
    gain_ci = stats._interval(o - r, 0.95)
    applicable = stats.excludes_0(gain_ci)
    est_m, est_r, est_o = (_minority(a) for a in avgs)
    with np.errstate(invalid="ignore", divide="ignore"):
        share_draws = (m - r) / (o - r)
    return {
        "estimate": (est_m - est_r) / (est_o - est_r) if applicable else None,
        "ci": stats._interval(share_draws[np.isfinite(share_draws)], 0.95) if applicable else None,
        "oracle_gain": est_o - est_r,
        "oracle_gain_ci": gain_ci,
        "applicable": applicable,
    }


# ---------------------------------------------------------------------------------------------------------------
# the intra-group diagnostic
# ---------------------------------------------------------------------------------------------------------------
def diagnostic_curves(train_log: Mapping[str, Any] | None) -> dict[str, dict[str, dict[int, float]]]:
    """``{group or "pooled": {measure: {epoch: value}}}`` from a run's ``cvar_*`` curves."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for name, curve in ((train_log or {}).get("curves") or {}).items():
        for measure in MEASURES:
            head = f"cvar_{measure}"
            if name == head or name.startswith(head + "_"):
                group = name[len(head) + 1 :] or "pooled"
                out.setdefault(group, {})[measure] = {int(e): float(v) for e, v in curve.items()}
    return out


def diagnostic_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per group (and pooled): each measure at the first refresh, averaged over refreshes and at the last one,
    each the mean over the runs; ``lift`` is mean precision over mean base rate."""
    per_group: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for run in runs:
        for group, measures in diagnostic_curves(run.get("train_log")).items():
            for measure, curve in measures.items():
                values = [curve[e] for e in sorted(curve)]
                per_group.setdefault(group, {}).setdefault(measure, []).append(
                    (values[0], float(np.mean(values)), values[-1]))  # fmt: skip
    out = {}
    for group, measures in sorted(per_group.items(), key=lambda kv: (kv[0] != "pooled", kv[0])):
        cell = {m: dict(zip(("first", "mean", "last"), np.mean(v, axis=0).tolist())) for m, v in measures.items()}
        base, prec = cell.get("base_rate", {}).get("mean"), cell.get("precision", {}).get("mean")
        cell["lift"] = prec / base if base and prec is not None else None
        cell["runs"] = len(measures.get("precision", []))
        out[group] = cell
    return out


def jtt_error_sets(runs: Sequence[Mapping[str, Any]], minority_ids: set[str]) -> dict[str, Any] | None:
    """JTT's error sets against the training minority: precision, recall (mean over runs), size."""
    rows = []
    for run in runs:
        path = Path(run["dir"]) / "jtt_error_set.json" if run.get("dir") else None
        if path is None or not path.is_file():
            continue
        ids = set(json.loads(path.read_text())["ids"])
        hit = len(ids & minority_ids)
        rows.append((hit / len(ids) if ids else 0.0, hit / len(minority_ids) if minority_ids else math.nan, len(ids)))
    if not rows:
        return None
    p, r, n = np.mean(rows, axis=0).tolist()
    return {"precision": p, "recall": r, "size": n, "runs": len(rows)}


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------
def build_report(c: Mapping[str, Any], n_boot: int = N_BOOT) -> dict[str, Any]:
    """The report of part 2 from :meth:`hidden_failures_compare.Comparison.collect`'s record ``c``."""
    runs = by_variant(c["runs"])
    placebo = by_variant(c["placebo_runs"])
    placebo_row = hfr.setting_row(c["placebo"], placebo, n_boot)
    control = {g: hfr.oracle_gap(runs.get(a, []), runs.get(b, []), n_boot) for g, (a, b) in hfr.GAPS.items()}
    methods = {}
    for method, (ref, oracle) in LABEL_FREE.items():
        share = recovered_share(runs.get(method), runs.get(ref), runs.get(oracle), n_boot)
        vs_ref = difference(runs.get(method), runs.get(ref), n_boot)
        methods[method] = {"reference": ref, "oracle": oracle, "vs_reference": vs_ref, "share": share}
    diagnosed = {v: diagnostic_summary(runs.get(v, [])) for v in ("dmoe", "fairdro") if runs.get(v)}
    report = {
        "setting": c["setting"],
        "choice": c["choice"],
        "runs_done": len(c["runs"]),
        "runs_planned": c["planned"],
        "positive_control": control,
        "placebo": {"row": placebo_row, "check": hfr.placebo_check(placebo_row)},
        "variants": {v: variant_summary(runs[v]) for v in ORDER if runs.get(v)},
        "methods": methods,
        "jtt": {
            "points": [_point_record(p) for p in c["jtt_points"]],
            "chosen": c["jtt_chosen"],
            "error_sets": jtt_error_sets(runs.get("jtt", []), set(c.get("train_minority_ids", []))),
        },  # fmt: skip
        "diagnostic": diagnosed,
        "rules": {"fail_below": FAIL_BELOW, "n_boot": n_boot, "confidence": 0.95, "min_gap": hfr.MIN_GAP},
    }
    report["verdict"] = verdict(report)
    return report


def _point_record(point: Mapping[str, Any]) -> dict[str, Any]:
    run = point.get("run")
    return {**{k: v for k, v in point.items() if k != "run"},
            "val_worst_group_dice": best_validation(run["train_log"]) if run else None}  # fmt: skip


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _diff_text(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("estimate") is None:
        return "-"
    ci = entry.get("ci")
    return f"{entry['estimate']:+.3f}" + (f" {stats.format_interval(ci)}" if ci else "")


def _share_text(share: Mapping[str, Any]) -> str:
    if share.get("oracle_gain") is None:
        return "-"
    if not share["applicable"]:
        return "n/a (oracle gain interval contains 0)"
    ci = share.get("ci")
    return f"{share['estimate']:.0%}" + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "")


def verdict(report: Mapping[str, Any]) -> str:
    """One paragraph: the control, then per label-free method its gain and recovered share, in words."""
    control = report["positive_control"]
    passed = {g: bool(control[g].get("passes")) for g in hfr.GAPS}
    state = "passes" if all(passed.values()) else "does not pass"
    if any(control[g].get("estimate") is None for g in hfr.GAPS):
        state = "is not measured yet (an oracle or its reference has no finished run)"
    words = [f"On {report['setting']['name']} ({report['runs_done']} of {report['runs_planned']} runs), the "
             f"positive control {state}: oracle - erm {_diff_text(control['backbone'])}, oracle_dmoe - dmoe "
             f"{_diff_text(control['dmoe'])}."]  # fmt: skip
    for method, entry in report["methods"].items():
        diff = (entry.get("vs_reference") or {}).get("minority_dice")
        if not diff:
            continue
        pair = "backbone" if entry["reference"] == "erm" else "dmoe"
        label = "" if passed[pair] else " (underpowered: this pair's positive control fails)"
        words.append(method_sentence(method, entry["reference"], diff, entry["share"], label))
    return " ".join(words)


def method_sentence(method: str, reference: str, diff: Mapping[str, Any], share: Mapping[str, Any], label="") -> str:
    """One sentence: the method's minority-Dice difference from its reference, in words by its interval, and the
    recovered share of the oracle's gain (``label``: what qualifies the share)."""
    ci = diff.get("ci") or [0.0, 0.0]
    sign = "raises" if ci[0] > 0 else "lowers" if ci[1] < 0 else "does not measurably change"
    return (f"{method} {sign} minority Dice against {reference} ({_diff_text(diff)}); recovered share of the "
            f"oracle's gain: {_share_text(share)}{label}.")  # fmt: skip


def _variant_table(report: Mapping[str, Any]) -> list[str]:
    lines = ["| variant | network | seeds | minority Dice | majority Dice | worst-group Dice | mean Dice | "
             f"minority failures (Dice < {FAIL_BELOW}) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v, cell in report["variants"].items():
        ms = [f"{cell[k]['mean']:.3f} ± {cell[k]['std']:.3f}" if cell[k].get("std") is not None
              else _fmt(cell[k].get("mean")) for k in ("minority_dice", "majority_dice", "worst_group_dice",
                                                       "mean_dice")]  # fmt: skip
        lines.append(f"| {v} | {NETWORK[v]} | {len(cell['seeds'])} | {' | '.join(ms)} | "
                     f"{_fmt(cell['minority_failure_rate'], '.1%')} |")  # fmt: skip
    return lines


def _method_table(report: Mapping[str, Any]) -> list[str]:
    lines = ["| method | against | minority Dice diff. [95% CI] | worst-group Dice diff. [95% CI] | oracle's gain "
             "[95% CI] | recovered share [95% CI] |", "|---|---|---|---|---|---|"]  # fmt: skip
    for method, e in report["methods"].items():
        vs = e.get("vs_reference") or {}
        gain = {"estimate": e["share"]["oracle_gain"], "ci": e["share"]["oracle_gain_ci"]}
        lines.append(f"| {method} | {e['reference']} (oracle: {e['oracle']}) | {_diff_text(vs.get('minority_dice'))}"
                     f" | {_diff_text(vs.get('worst_group_dice'))} | {_diff_text(gain)} | "
                     f"{_share_text(e['share'])} |")  # fmt: skip
    return lines


def _diagnostic_table(report: Mapping[str, Any]) -> list[str]:
    lines = ["| variant | group | runs | precision first / mean / last | recall first / mean / last | base rate | "
             "lift (precision / base rate) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v, groups in report["diagnostic"].items():
        for g, cell in groups.items():
            p, r = cell.get("precision", {}), cell.get("recall", {})
            lines.append(f"| {v} | {g} | {cell['runs']} | {_fmt(p.get('first'))} / {_fmt(p.get('mean'))} / "
                         f"{_fmt(p.get('last'))} | {_fmt(r.get('first'))} / {_fmt(r.get('mean'))} / "
                         f"{_fmt(r.get('last'))} | {_fmt(cell.get('base_rate', {}).get('mean'))} | "
                         f"{_fmt(cell.get('lift'), '.2f')} |")  # fmt: skip
    return lines


def _jtt_table(report: Mapping[str, Any]) -> list[str]:
    chosen = report["jtt"]["chosen"] or {}
    lines = ["| T (epochs) | tau | lambda_up | validation worst-group Dice | chosen |", "|---|---|---|---|---|"]
    for p in report["jtt"]["points"]:
        mark = "yes" if chosen and all(p[k] == v for k, v in chosen.items()) else ""
        lines.append(f"| {p['jtt#epochs']} | {p['jtt#tau']:g} | {p['jtt#lambda_up']:g} | "
                     f"{_fmt(p['val_worst_group_dice'])} | {mark} |")  # fmt: skip
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    s, choice = report["setting"], report["choice"]
    change = ", ".join(f"{k} {v}" for k, v in s["change"].items()) or "-"
    err = report["jtt"]["error_sets"]
    parts = [
        "# Hidden failures: the comparison",
        "",
        "Generated by `bench/hidden_failures.py --part compare` (`make benchmark-hidden-failures "
        "HIDDEN_ARGS='--part compare'`). Every number is on the testing split unless it says validation; intervals "
        "are 95%, two-level bootstrap (each variant's seeds, then cases within stage groups).",
        "",
        f"**Verdict.** {report['verdict']}",
        "",
        f"**Setting**: `{s['name']}` ({change}; {s['note'] or s['axis']}), chosen as {choice['how']} (search "
        f"status: {choice['status']}). {report['placebo']['check']['text']} (the placebo at this recipe).",
        "",
        "## Variants",
        "",
        *_variant_table(report),
        "",
        "## Label-free methods against their reference and the oracle",
        "",
        *_method_table(report),
        "",
        "## Can the within-subgroup CVaR see the minority? (training bank, every refresh)",
        "",
        "Precision: the minority's share of each group's top-alpha bank losses; recall: the share of the group's "
        "minority cases in it; base rate: the minority's share of the group. For `dmoe` the bank is computed and "
        "logged but never used. A precision at the base rate (lift 1) means the CVaR cannot see the minority.",
        "",
        *_diagnostic_table(report),
        "",
        "![precision of the top-alpha set per epoch](diagnostic.png)",
        "",
        "## JTT's settings (validation worst-group Dice, seed 0)",
        "",
        *_jtt_table(report),
        "",
        ("JTT's error sets against the training minority (mean over runs): precision "
         f"{_fmt(err['precision'])}, recall {_fmt(err['recall'])}, size {err['size']:.0f}." if err else ""),
        "",
        "## 3D carry-back",
        "",
        _carry3d_text(report.get("carry3d")),
    ]  # fmt: skip
    return "\n".join(parts).rstrip() + "\n"


def carry3d_summary(out: Path) -> dict[str, Any] | None:
    """The verdict and run counts of the 3D carry-back's report (``carry3d.json`` under ``out``), or None before it
    has one."""
    path = out / "carry3d.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("verdict", "runs_done", "runs_planned")}


def _carry3d_text(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "Not run yet (`--part carry3d`, reported in `carry3d.md` beside this report)."
    return (f"{summary['verdict']} Runs: {summary['runs_done']} of {summary['runs_planned']}; tables and runs in "
            "[`carry3d.md`](carry3d.md) (`--part carry3d`).")  # fmt: skip


def plot_diagnostic(report_runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """Pooled precision of the top-alpha set per epoch, each diagnosed run a line, the base rate dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(report_runs)), figsize=(5 * max(1, len(report_runs)), 3.5), squeeze=False)
    for ax, (variant, runs) in zip(axes[0], report_runs.items()):
        for run in runs:
            pooled = diagnostic_curves(run.get("train_log")).get("pooled", {})
            for measure, style in (("precision", "-"), ("base_rate", "--")):
                curve = pooled.get(measure, {})
                if curve:
                    ax.plot(sorted(curve), [curve[e] for e in sorted(curve)], style,
                            label=f"{measure} s{run['seed']}")  # fmt: skip
        ax.set_title(f"{variant}: minority share of the top-alpha set")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Mapping[str, Any], out: Path, diagnosed_runs: Mapping[str, Sequence] | None = None) -> list:
    """``report.md``, ``report.json`` and (with ``diagnosed_runs``) ``diagnostic.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / FILES[0], out / FILES[1]]
    files[0].write_text(render_markdown(report))
    files[1].write_text(json.dumps(report, indent=2, default=str) + "\n")
    if diagnosed_runs:
        plot_diagnostic(diagnosed_runs, out / FILES[2])
        files.append(out / FILES[2])
    return files
