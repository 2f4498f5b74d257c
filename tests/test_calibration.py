"""The cohort calibration's table and its choice of the default level (bench/calibrate_cohort.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import calibrate_cohort as cal  # noqa: E402


def _csv(path: Path, rows):
    path.write_text("id,stage,subtype,dice\n" + "".join(f"c{i},T1,{s},{d}\n" for i, (s, d) in enumerate(rows)))
    return path


def test_minority_table_by_hand(tmp_path):
    # majority 0.8 x 4 -> 0.8; minority 0.2 and 0.6 -> 0.4, one of two below 0.5; gap 0.4 (every resample of the
    # majority is 0.8, the minority's lies in [0.2, 0.6], so the interval lies in [0.2, 0.6])
    rows = [("majority", 0.8)] * 4 + [("necrotic", 0.2), ("necrotic", 0.6)]
    t = cal.minority_table(_csv(tmp_path / "per_case.csv", rows))
    assert (t["n_majority"], t["n_minority"]) == (4, 2)
    assert t["majority_dice"] == pytest.approx(0.8) and t["minority_dice"] == pytest.approx(0.4)
    assert t["minority_failure_rate"] == 0.5 and t["gap"] == pytest.approx(0.4)
    assert 0.2 - 1e-9 <= t["gap_ci"][0] <= t["gap_ci"][1] <= 0.6 + 1e-9


def _r(maj, mino, fail, ci=(-0.01, 0.01)):
    return {"majority_dice": maj, "minority_dice": mino, "minority_failure_rate": fail, "gap": maj - mino,
            "gap_ci": list(ci)}  # fmt: skip


def test_choose_level_lowest_meeting_both_criteria():
    results = {
        ("k", 0, "erm"): _r(0.8, 0.8, 0.0),
        ("k", 0, "oracle"): _r(0.8, 0.79, 0.0),
        ("k", 1, "erm"): _r(0.8, 0.7, 0.1),  # fails too rarely
        ("k", 1, "oracle"): _r(0.8, 0.78, 0.0),
        ("k", 2, "erm"): _r(0.8, 0.4, 0.35),  # gap 0.4; the oracle closes (0.65 - 0.4) / 0.4 = 62 %
        ("k", 2, "oracle"): _r(0.79, 0.65, 0.1),
        ("k", 3, "erm"): _r(0.8, 0.3, 0.5),
        ("k", 3, "oracle"): _r(0.79, 0.6, 0.2),
    }
    level, why = cal.choose_level(results, "k", [0, 1, 2, 3])
    assert level == 2 and "62%" in why and "placebo clean: yes" in why


def test_choose_level_closest_when_none_qualifies():
    results = {
        ("k", 2, "erm"): _r(0.8, 0.75, 0.05),
        ("k", 2, "oracle"): _r(0.8, 0.70, 0.05),
        ("k", 3, "erm"): _r(0.8, 0.70, 0.10),  # ERM fails most here: the closest
        ("k", 3, "oracle"): _r(0.8, 0.72, 0.05),
    }
    level, why = cal.choose_level(results, "k", [0, 1, 2, 3])
    assert level == 3 and "no level meets both criteria" in why and "not yet measured" in why
    assert cal.choose_level({}, "k", [0, 1, 2, 3])[0] is None
