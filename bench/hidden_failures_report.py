"""The calibration table of the positive-control search (``bench/hidden_failures.py``): maths and rendering.

Pure functions of the finished runs (their ``per_case.csv`` rows and ``train_log.json``), plus
:func:`write_calibration`, which writes ``calibration.md`` and ``calibration.json``.

- :func:`flat_curve`: whether a run's validation mean Dice varied by at most 0.005 over the last quarter of its
  epochs (the last ``max(2, ceil(E / 4))`` epochs of an E-epoch curve: epochs 23-30 of 30, 8-10 of 10).
- :func:`run_numbers`: a run's minority, majority, mean and worst-group (stage) Dice from its rows.
- :func:`oracle_gap`: an oracle's minority Dice minus its reference's (each case's Dice averaged over the seeds of
  each variant), with the 95% interval of ``ablation_stats.seed_case_bootstrap`` (seeds resampled, then cases
  within stage groups); it **passes** when it is >= :data:`MIN_GAP` and its interval excludes 0.
- :func:`placebo_check`: at the placebo, both gap intervals must contain 0.
- :func:`build_calibration` / :func:`render_markdown`: the table of every setting, whichever way it came out.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation_stats as stats  # noqa: E402

logger = logging.getLogger("hidden_failures")

#: gap name -> (oracle variant, its reference: the same network trained with the mean loss)
GAPS = {"backbone": ("oracle", "erm"), "dmoe": ("oracle_dmoe", "dmoe")}
VARIANTS = ("erm", "oracle", "dmoe", "oracle_dmoe")
MIN_GAP = 0.05
FLAT_TOL = 0.005
FILES = ("calibration.md", "calibration.json")


def flat_curve(val_mean_dice: Mapping[Any, float], tol: float = FLAT_TOL) -> dict[str, Any]:
    """Whether validation mean Dice (``{epoch: value}``) varied by at most ``tol`` over its last quarter.

    The window is the epochs after ``E - max(2, ceil(E / 4))``, E the last epoch. Returns ``{"flat", "range",
    "window"}`` (``flat`` and ``range`` ``None`` for a curve of fewer than 2 epochs).
    """
    points = sorted((int(e), float(v)) for e, v in val_mean_dice.items())
    if len(points) < 2:
        return {"flat": None, "range": None, "window": None}
    last = points[-1][0]
    start = last - max(2, math.ceil(last / 4))
    values = [v for e, v in points if e > start]
    spread = max(values) - min(values)
    return {"flat": spread <= tol + 1e-12, "range": spread, "window": [start + 1, last]}


def run_numbers(rows: Sequence[Mapping[str, Any]], group_key: str = "stage") -> dict[str, float | None]:
    """Minority, majority, mean and worst-group Dice of one run's ``per_case.csv`` rows."""
    if not rows:
        raise ValueError("a run without any testing case.")
    dice = [float(r["dice"]) for r in rows]
    minority = [stats.is_minority(r.get("subtype")) for r in rows]
    majority = [not m for m in minority]
    return {
        "minority_dice": stats.minority_dice(dice, minority),
        "majority_dice": stats.minority_dice(dice, majority),
        "mean_dice": sum(dice) / len(dice),
        "worst_group_dice": stats.worst_group_dice(dice, [str(r.get(group_key, "unknown")) for r in rows]),
    }


def variant_cell(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One variant of one setting: mean ± std over its finished runs, and each run's flat-curve check."""
    numbers = [run_numbers(r["rows"]) for r in runs]
    cell = {key: stats.mean_std([n[key] for n in numbers]) for key in ("minority_dice", "majority_dice",
                                                                        "mean_dice", "worst_group_dice")}  # fmt: skip
    cell["done"] = len(runs)
    cell["seeds"] = [r["seed"] for r in runs]
    cell["curves"] = {r["name"]: flat_curve((r.get("train_log") or {}).get("val_mean_dice", {})) for r in runs}
    return cell


def oracle_gap(
    oracle_runs: Sequence[Mapping[str, Any]], ref_runs: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The oracle's minority Dice minus its reference's, with the two-level (seeds, cases) 95% interval."""
    empty = {"estimate": None, "ci": None, "passes": None, "excludes_0": None, "n_runs": [len(oracle_runs),
             len(ref_runs)]}  # fmt: skip
    if not oracle_runs or not ref_runs:
        return empty
    a = stats.seed_average([r["rows"] for r in oracle_runs])
    b = stats.seed_average([r["rows"] for r in ref_runs])
    est_a, est_b = stats.minority_dice(a["dice"], a["minority"]), stats.minority_dice(b["dice"], b["minority"])
    if est_a is None or est_b is None:
        return empty
    ci = stats.seed_case_bootstrap(a, b, n_boot=n_boot, seed=seed)["minority_dice"]["ci"]
    estimate = est_a - est_b
    return {
        **empty,
        "estimate": estimate,
        "ci": ci,
        "excludes_0": stats.excludes_0(ci),
        "passes": gap_passes(estimate, ci),
    }


def gap_passes(estimate: float, ci: Sequence[float] | None) -> bool:
    """The positive-control rule: an oracle gap of at least :data:`MIN_GAP` whose interval excludes 0."""
    return bool(estimate >= MIN_GAP and stats.excludes_0(ci))


def placebo_check(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"clean": True/False/None, "text"}``: both gap intervals of the placebo setting contain 0."""
    gaps = (row or {}).get("gaps", {})
    if not gaps or any(gaps.get(g, {}).get("ci") is None for g in GAPS):
        return {"clean": None, "text": "placebo: not yet measured"}
    dirty = [g for g in GAPS if gaps[g]["excludes_0"]]
    words = ", ".join(f"{GAPS[g][0]} - {GAPS[g][1]} {_gap_text(gaps[g])}" for g in GAPS)
    if dirty:
        return {"clean": False, "text": f"placebo NOT clean (an interval excludes 0): {words}"}
    return {"clean": True, "text": f"placebo clean (both intervals contain 0): {words}"}


def setting_status(row: Mapping[str, Any]) -> str:
    """``passes``, ``backbone pair only``, ``dMoE pair only``, ``fails`` or ``not yet measured``, with caveats."""
    passes = {g: row["gaps"][g]["passes"] for g in GAPS}
    if any(p is None for p in passes.values()):
        status = "not yet measured"
    elif all(passes.values()):
        status = "passes"
    elif passes["backbone"]:
        status = "backbone pair only"
    elif passes["dmoe"]:
        status = "dMoE pair only"
    else:
        status = "fails"
    caveats = []
    if row["short_schedule"]:
        caveats.append("regularisation point, not converged")
    elif row["not_flat"]:
        caveats.append(f"{len(row['not_flat'])} run(s) not flat")
    if row["done"] < row["planned"]:
        caveats.append(f"{row['done']}/{row['planned']} runs")
    return status + (f" ({'; '.join(caveats)})" if caveats else "")


def setting_row(info: Mapping[str, Any], runs: Mapping[str, list], n_boot: int = 2000) -> dict[str, Any]:
    """One row of the table: the setting, its variants, its two gaps, its unflat runs and its status."""
    row = {**info, "variants": {v: variant_cell(runs[v]) for v in VARIANTS if runs.get(v)}}
    row["done"] = sum(len(r) for r in runs.values())
    row["gaps"] = {g: oracle_gap(runs.get(a, []), runs.get(b, []), n_boot) for g, (a, b) in GAPS.items()}
    row["not_flat"] = sorted(name for cell in row["variants"].values() for name, c in cell["curves"].items()
                             if c["flat"] is False)  # fmt: skip
    row["status"] = setting_status(row)
    return row


def verdict(rows: Sequence[Mapping[str, Any]], placebo: Mapping[str, Any]) -> str:
    """One paragraph: which settings pass the positive control (both gaps), or the closest one."""
    candidates = [r for r in rows if not r.get("is_placebo")]
    passing = [r["name"] + r["status"][len("passes") :] for r in candidates if r["status"].startswith("passes")]
    tail = f" {placebo['text']}."
    if passing:
        return f"Positive control passes (both oracle gaps >= {MIN_GAP} with 95% intervals excluding 0) in: " \
            f"{', '.join(passing)}.{tail}"  # fmt: skip
    measured = [r for r in candidates if all(r["gaps"][g]["estimate"] is not None for g in GAPS)]
    if not measured:
        return "Positive control: not yet measured." + tail
    best = max(measured, key=lambda r: min(r["gaps"][g]["estimate"] for g in GAPS))
    gaps = ", ".join(f"{GAPS[g][0]} - {GAPS[g][1]} {_gap_text(best['gaps'][g])}" for g in GAPS)
    return f"No setting passes both oracle gaps yet; the closest is {best['name']} ({best['status']}): {gaps}.{tail}"


def build_calibration(
    entries: Sequence[tuple[Mapping[str, Any], Mapping[str, list]]], placebo: str = "placebo", n_boot: int = 2000
) -> dict[str, Any]:
    """The table of every setting: ``entries`` are ``(setting info, {variant: [run]})`` in plan order."""
    rows = []
    for info, runs in entries:
        row = setting_row(info, runs, n_boot)
        row["is_placebo"] = info["name"] == placebo
        rows.append(row)
        logger.debug("setting %s: %s", info["name"], row["status"])
    check = placebo_check(next((r for r in rows if r["is_placebo"]), None))
    return {
        "settings": rows,
        "placebo": check,
        "verdict": verdict(rows, check),
        "rules": {
            "min_gap": MIN_GAP,
            "flat_tol": FLAT_TOL,
            "confidence": 0.95,
            "n_boot": n_boot,
            "interval": "two-level bootstrap: each variant's seeds, then cases within stage groups",
        },  # fmt: skip
        "runs_done": sum(r["done"] for r in rows),
        "runs_planned": sum(r["planned"] for r in rows),
    }


# ---------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------
def _gap_text(gap: Mapping[str, Any]) -> str:
    if gap.get("estimate") is None:
        return "-"
    ci = gap.get("ci")
    return f"{gap['estimate']:+.3f}" + (f" {stats.format_interval(ci)}" if ci else "")


def _mean(cell: Mapping[str, Any] | None, key: str) -> str:
    value = (cell or {}).get(key, {}).get("mean")
    return "-" if value is None else f"{value:.3f}"


def _pass(gap: Mapping[str, Any]) -> str:
    return {True: "yes", False: "no", None: "-"}[gap.get("passes")]


def _flat(row: Mapping[str, Any]) -> str:
    checked = sum(len(c["curves"]) for c in row["variants"].values())
    if not checked:
        return "-"
    if row["short_schedule"]:
        return f"n/a (short; {checked - len(row['not_flat'])}/{checked} flat)"
    return f"{checked - len(row['not_flat'])}/{checked}" + (" ⚑" if row["not_flat"] else "")


def _change(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in row.get("change", {}).items()) or "-"


def _main_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| setting | axis | change | runs | "
        + " | ".join(f"{v} min. Dice" for v in VARIANTS)
        + " | oracle - erm [95% CI] | pass | oracle_dmoe - dmoe [95% CI] | pass | flat curves | status |",
        "|---" * (10 + len(VARIANTS)) + "|",
    ]
    for r in rows:
        cells = " | ".join(_mean(r["variants"].get(v), "minority_dice") for v in VARIANTS)
        b, d = r["gaps"]["backbone"], r["gaps"]["dmoe"]
        head = f"| {r['name']} | {r['axis']} | {_change(r)} | {r['done']}/{r['planned']} | {cells} | "
        gaps = f"{_gap_text(b)} | {_pass(b)} | {_gap_text(d)} | {_pass(d)} | "
        lines.append(f"{head}{gaps}{_flat(r)} | {r['status']} |")
    return lines


def _side_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    heads = " | ".join(f"{v} majority / worst-group" for v in VARIANTS)
    lines = [f"| setting | {heads} |", "|---" * (1 + len(VARIANTS)) + "|"]
    for r in rows:
        cells = [f"{_mean(r['variants'].get(v), 'majority_dice')} / {_mean(r['variants'].get(v), 'worst_group_dice')}"
                 for v in VARIANTS]  # fmt: skip
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(table: Mapping[str, Any]) -> str:
    rows = table["settings"]
    smoke = table.get("bench") == "smoke"
    lines = [
        "# Hidden failures: positive-control search" + (" (smoke bench)" if smoke else ""),
        "",
        f"Generated by `bench/hidden_failures.py{' --bench smoke' if smoke else ''}` (`make benchmark-hidden-failures`)"
        f"; {table['runs_done']} of {table['runs_planned']} planned runs finished. Reference variants only (erm, "
        "oracle, dmoe, oracle_dmoe); every number is on the testing split. Minority Dice: mean over the finished "
        f"seeds. A gap passes when it is >= {MIN_GAP} minority Dice and its 95% interval (two-level bootstrap, "
        f"{table['rules']['n_boot']} draws: each variant's seeds with replacement, then cases within stage groups) "
        f"excludes 0. Flat curves: runs whose validation mean Dice varied by <= {FLAT_TOL} over the last quarter "
        "of their epochs (⚑: some did not; a short schedule is a regularisation point, where the rule does not "
        "apply).",
        "",
        table["verdict"],
        "",
        *_main_table(rows),
        "",
        "Majority Dice / worst-group (stage) Dice per variant (mean over seeds): what the oracles pay.",
        "",
        *_side_table(rows),
        "",
    ]
    not_flat = [f"{r['name']}: {', '.join(r['not_flat'])}" for r in rows if r["not_flat"]]
    if not_flat:
        lines += ["Runs whose validation curve was not flat over its last quarter: " + "; ".join(not_flat) + ".", ""]
    return "\n".join(lines)


def write_calibration(table: Mapping[str, Any], out: Path) -> list[Path]:
    """``calibration.md`` and ``calibration.json`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.md").write_text(render_markdown(table))
    text = json.dumps(stats.finite(table), indent=2, allow_nan=False, default=str)
    (out / "calibration.json").write_text(text + "\n")
    logger.info("calibration table: %d of %d runs, %s", table["runs_done"], table["runs_planned"], out)
    return [out / f for f in FILES]
