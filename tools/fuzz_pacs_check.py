"""The checker of the DICOM node's fuzz result (tools/fuzz_pacs.py, ``make fuzz-pacs``).

``python tools/fuzz_pacs_check.py [bench/results/pacs/fuzz_pacs.json]``: one line per violation and exit status 1,
else ``OK`` and 0. The rules (issue 31): at least 1000 malformed cases (a ``--quick`` run: all it asked for), every
mutator used; no crash and no exception reaching ``threading.excepthook``/``sys.excepthook`` in the node; every
valid series sent acknowledged, delivered, and equal to the bundle's own result (Dice 1.000 for the SEG and the
RTSTRUCT, to three decimals); at most +5 open file descriptors and +64 MiB resident memory; nothing left in
spool/ or processing/, nothing but valid series in results/, failed/ within its cap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MIN_MALFORMED = 1000
MAX_FD_GROWTH, MAX_RSS_GROWTH_MIB = 5, 64.0
DICE_MIN = 0.9995  # 1.000 to three decimals
REQUIRED = ("machine", "date", "seed", "command", "malformed", "by_mutation", "crashes", "unhandled_exceptions",
            "valid_series_sent", "valid_series_delivered", "fd_growth", "rss_growth_mib")  # fmt: skip
DEFAULT = Path(__file__).resolve().parents[1] / "bench" / "results" / "pacs" / "fuzz_pacs.json"


def check(result: dict[str, Any]) -> list[str]:
    """Every violation of the fuzz rules in ``result``, one line each (empty: it passes)."""
    missing = [key for key in REQUIRED if key not in result]
    if missing:
        return [f"missing field(s) {missing}"]
    return [*_check_cases(result), *_check_node(result), *_check_valid(result), *_check_state(result)]


def _check_cases(r: dict[str, Any]) -> list[str]:
    problems = []
    wanted = r.get("requested", {}).get("count", MIN_MALFORMED) if r.get("quick") else MIN_MALFORMED
    if r["malformed"] < wanted:
        problems.append(f"malformed: {r['malformed']} cases sent, at least {wanted} needed")
    if sum(r["by_mutation"].values()) != r["malformed"]:
        problems.append(f"by_mutation adds up to {sum(r['by_mutation'].values())}, not malformed {r['malformed']}")
    unused = sorted(set(r.get("mutations_known", [])) - {k for k, v in r["by_mutation"].items() if v > 0})
    if unused:
        problems.append(f"mutations never sent: {unused}")
    return problems


def _check_node(r: dict[str, Any]) -> list[str]:
    problems = []
    if r["crashes"] != 0:
        problems.append(f"crashes: {r['crashes']} (must be 0): {r.get('crash')}")
    if r["unhandled_exceptions"] != 0:
        problems.append(f"unhandled_exceptions: {r['unhandled_exceptions']} (must be 0; see the node's log)")
    fd, rss = r["fd_growth"], r["rss_growth_mib"]
    if fd is None or fd > MAX_FD_GROWTH:
        problems.append(f"fd_growth: {fd} open file descriptors (at most +{MAX_FD_GROWTH})")
    if rss is None or rss > MAX_RSS_GROWTH_MIB:
        problems.append(f"rss_growth_mib: {rss} MiB (at most +{MAX_RSS_GROWTH_MIB:g})")
    return problems


def _check_valid(r: dict[str, Any]) -> list[str]:
    problems = []
    sent, delivered = r["valid_series_sent"], r["valid_series_delivered"]
    attempted = r.get("valid_series_attempted", sent)
    if sent < 2:
        problems.append(f"valid_series_sent: {sent}; at least 2 (the warm-up and one during the fuzz)")
    if attempted != sent:
        problems.append(f"valid series: {attempted - sent} of {attempted} not acknowledged in full by the node")
    if delivered != sent:
        problems.append(f"valid_series_delivered {delivered} != valid_series_sent {sent}")
    for row in [row for row in r.get("valid_dice", []) if row.get("delivered", True)]:
        for kind in ("seg", "rtstruct"):
            if row.get(kind) is None:
                problems.append(f"valid series {row['series']}: {kind.upper()} delivered but its Dice against the "
                                "bundle's own result was not measured")  # fmt: skip
            elif row[kind] < DICE_MIN:
                problems.append(f"valid series {row['series']}: {kind.upper()} Dice {row[kind]:.4f} against the "
                                "bundle's own result (must be 1.000)")  # fmt: skip
        if not row.get("references_only_its_slices", False):
            problems.append(f"valid series {row['series']}: the RTSTRUCT does not reference exactly its slices")
    return problems


def _check_state(r: dict[str, Any]) -> list[str]:
    problems = []
    if r.get("spool_left"):
        problems.append(f"spool/processing not empty at the end: {r['spool_left'][:5]}")
    if r.get("results_not_valid"):
        problems.append(f"results/ holds series that are not valid ones: {r['results_not_valid'][:5]}")
    failed = r.get("failed")
    if failed is None:
        problems.append("failed: missing (the failed/ folder against its cap)")
    elif failed["series"] > failed["max_series"] or failed["bytes"] > failed["max_bytes"]:
        problems.append(f"failed/ holds {failed['series']} series, {failed['bytes']} bytes: over its cap "
                        f"({failed['max_series']} series, {failed['max_bytes']} bytes)")  # fmt: skip
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", nargs="?", type=Path, default=DEFAULT, help=f"result JSON (default {DEFAULT})")
    args = ap.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
    except (OSError, ValueError) as err:
        print(f"cannot read {args.result}: {err}")
        return 1
    problems = check(result) if isinstance(result, dict) else [f"{args.result} does not hold a JSON object"]
    for line in problems:
        print(line)
    if not problems:
        print(f"OK: {args.result}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
