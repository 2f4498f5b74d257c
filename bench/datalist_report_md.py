"""``report.md`` of the benchmark on a user's datalist, from the report dict of ``bench/datalist_report.py``.

Sections: the headline (cohort, runs, the verdict), the variants pooled over folds, the paired comparisons of
FairDRO with each other variant, one table per grouping attribute (the subgroup key first, then the extra
attributes: per group and variant Dice, per-class Dice, worst-decile Dice, CVaR, failure rate, HD95 and whether the
group is too small to compare), the attributes not broken down, and the runs (folds, estimated and actual time).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def num(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def interval(entry: Mapping[str, Any] | None) -> str:
    ci = (entry or {}).get("ci")
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"


def _headline(report: Mapping[str, Any]) -> list[str]:
    info, s = report["info"], report["settings"]
    folds = f"{info['folds']}-fold cross-validation of" if info.get("folds") else "the datalist's own testing split of"
    return [
        f"# Fairness benchmark on `{info['datalist_name']}`",
        "",
        f"`{info['command']}`",
        "",
        f"{folds} {info['n_cases']} cases ({info.get('n_patients', info['n_cases'])} patients) grouped by "
        f"`{s['subgroup_key']}`; variants {', '.join(report['variants'])}, {info['seeds']} seed(s), "
        f"{info['epochs']} epochs, profile {info['profile']}. {report['runs']['done']} of {report['runs']['planned']} "
        f"runs finished. Every number is on the pooled testing cases"
        + (" (each case of the pool tested exactly once)." if info.get("folds") else "."),
        "",
        f"**Verdict.** {report['verdict']}",
        "",
    ]


def _variants(report: Mapping[str, Any]) -> list[str]:
    key = report["settings"]["subgroup_key"]
    sums = report["groupings"].get(key, {}).get("summary", {})
    lines = [
        "## Variants, pooled over folds",
        "",
        f"Seed-averaged cases; worst-group Dice, ES-Dice and worst-group CVaR over the comparable `{key}` groups.",
        "",
        "| variant | seeds | mean Dice | worst-group Dice | worst group | ES-Dice | worst-group CVaR | "
        "worst-group Dice per seed (mean ± std) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, cell in report["variants"].items():
        s, ps = sums.get(v, {}), cell.get("worst_group_dice_per_seed") or {}
        per_seed = f"{num(ps.get('mean'))} ± {num(ps.get('std'))}" if ps.get("mean") is not None else "-"
        lines.append(
            f"| {v}{' (winner)' if v == report.get('winner') else ''} | {cell['seeds_done']} | "
            f"{num(s.get('dice_all'))} | {num(s.get('worst_group_dice'))} | {s.get('worst_group') or '-'} | "
            f"{num(s.get('es_dice'))} | {num(s.get('worst_group_cvar'))} | {per_seed} |"
        )
    return [*lines, ""]


def _per_class(report: Mapping[str, Any]) -> list[str]:
    """Each class's worst-group Dice and ES-Dice per variant (multi-class cohorts only)."""
    key = report["settings"]["subgroup_key"]
    sums = report["groupings"].get(key, {}).get("summary", {})
    rows = [(v, c, e) for v, s in sums.items() for c, e in (s.get("per_class") or {}).items()]
    if len({c for _, c, _ in rows}) < 2:
        return []
    lines = ["## Per class", "", f"Each foreground class over the comparable `{key}` groups.", "",
             "| variant | class | worst-group Dice | ES-Dice |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {v} | {c} | {num(e['worst_group_dice'])} | {num(e['es_dice'])} |" for v, c, e in rows]
    return [*lines, ""]


def _comparisons(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Paired comparisons: fairdro minus each other variant", ""]
    if not report["comparisons"]:
        return [*lines, "Not measured (fairdro and another variant need every fold finished).", ""]
    lines += [
        "Same testing cases (comparable groups), each case's Dice averaged over the seeds. 95% paired bootstrap "
        f"intervals ({report['settings']['n_boot']} draws, cases resampled within groups; the last column "
        "resamples each variant's seeds too). Wilcoxon signed-rank p over cases.",
        "",
        "| vs | cases | mean Δ Dice | Wilcoxon p | Δ worst-group Dice | interval over cases | over seeds and cases |",
        "|---|---|---|---|---|---|---|",
    ]
    for other, c in report["comparisons"].items():
        wg = c["worst_group_dice"]
        lines.append(
            f"| {other} | {c['n_cases']} | {c['mean_difference']:+.3f} | {c['wilcoxon']['p_value']:.3g} | "
            f"{wg['estimate']:+.3f} | {interval(wg)} | {interval(c['seed_and_case']['worst_group_dice'])} |"
        )
    return [*lines, ""]


def _group_table(attribute: str, block: Mapping[str, Any], report: Mapping[str, Any]) -> list[str]:
    s = report["settings"]
    first = next(iter(next(iter(block["groups"].values()))["variants"].values()))
    classes = [k for k in first if k.startswith("dice_")]
    classes = classes if len(classes) > 1 else []  # one foreground class: its Dice is the Dice
    has_hd = first.get("hd95") is not None
    routed = "the routing attribute" if attribute == s["subgroup_key"] else "not a routing attribute"
    head = ["group", "cases", "variant", "Dice", *[f"Dice {c[5:]}" for c in classes], "worst-decile Dice",
            f"CVaR (worst {s['alpha']:.0%})", f"failure rate (Dice < {s['threshold']})", *(["HD95 (mm)"] * has_hd),
            "note"]  # fmt: skip
    lines = [f"## By `{attribute}` ({routed})", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g, entry in block["groups"].items():
        note = f"too small to compare (< {s['min_group_cases']} cases)" if entry["too_small"] else ""
        for v, c in entry["variants"].items():
            vals = [num(c["dice"]), *[num(c[k]) for k in classes], num(c["worst_decile_dice"]), num(c["cvar"]),
                    f"{c['failure_rate']:.0%}", *([num(c["hd95"], 1)] * has_hd), note]  # fmt: skip
            lines.append(f"| {g} | {entry['n']} | {v} | " + " | ".join(vals) + " |")
    if not has_hd and attribute == s["subgroup_key"]:
        lines += ["", "No HD95: the images carry no spacing (PNG, JPEG or NPZ); `hd95_px` in each run's "
                  "`per_case.csv` is in pixels."]  # fmt: skip
    return [*lines, ""]


def _runs(report: Mapping[str, Any]) -> list[str]:
    info = report["info"]
    lines = ["## Runs", "", "| fold | training | validation | testing |", "|---|---|---|---|"]
    lines += [f"| {f} | {n['training']} | {n['validation']} | {n['testing']} |" for f, n in info["splits"].items()]
    t = info.get("timing") or {}
    if t.get("estimated_s") is not None:
        lines += ["", f"Runs trained by the last invocation: {t.get('runs', 0)}, estimated "
                  f"{t['estimated_s'] / 60:.1f} min by the probe, took {t.get('actual_s', 0) / 60:.1f} min "
                  f"({info.get('device', '?')})."]  # fmt: skip
    return [*lines, ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [*_headline(report), *_variants(report), *_per_class(report), *_comparisons(report)]
    for attribute, block in report["groupings"].items():
        lines += _group_table(attribute, block, report)
    skipped = report["info"].get("skipped_attributes") or {}
    if skipped:
        lines += ["## Not broken down", "", *[f"- `{k}`: {why}" for k, why in skipped.items()], ""]
    lines += _runs(report)
    return "\n".join(lines)
