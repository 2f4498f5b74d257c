"""Tests of scripts.fairness_stats: bootstrap intervals, paired comparison, seed aggregation and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from scripts.fairness_stats import (
    aggregate_metrics,
    bootstrap_group_metrics,
    compare_records,
    flatten_metrics,
    main,
    percentile_interval,
    wilcoxon_signed_rank,
)

REPO = Path(__file__).resolve().parents[1]


def _random_records(seed=0, n=40):
    rng = np.random.default_rng(seed)
    groups = rng.choice(["T1", "T2", "T3"], size=n, p=[0.5, 0.3, 0.2])
    dice = rng.beta(6, 2, size=n)
    return [{"id": f"c{i:02d}", "stage": g, "dice": float(d)} for i, (g, d) in enumerate(zip(groups, dice))]


def test_bootstrap_contains_estimate_and_is_deterministic():
    records = _random_records()
    r1 = bootstrap_group_metrics(records, "stage", n_boot=300, seed=7)
    r2 = bootstrap_group_metrics(records, "stage", n_boot=300, seed=7)
    r3 = bootstrap_group_metrics(records, "stage", n_boot=300, seed=8)
    for name in ("dice_all", "worst_group_dice", "es_dice", "es_dice_std", "worst_group_cvar"):
        low, high = r1["ci"][name]
        assert low <= r1[name] <= high, name
    for g, entry in r1["groups"].items():
        assert entry["ci"]["dice"][0] <= entry["dice"] <= entry["ci"]["dice"][1], g
    assert r1["ci"] == r2["ci"]  # same seed, same intervals
    assert r1["ci"] != r3["ci"]
    assert r1["bootstrap"]["n_boot"] == 300 and r1["bootstrap"]["seed"] == 7
    assert "hidden_failures" not in r1["ci"]


def test_bootstrap_resamples_within_groups():
    # a group of one case (or of identical cases) cannot vary: resampling stays inside each group
    records = [
        {"id": "a", "stage": "T1", "dice": 0.3},
        {"id": "b", "stage": "T2", "dice": 0.8},
        {"id": "c", "stage": "T2", "dice": 0.8},
        {"id": "d", "stage": "T3", "dice": 0.2},
        {"id": "e", "stage": "T3", "dice": 1.0},
    ]
    r = bootstrap_group_metrics(records, "stage", n_boot=200, seed=0)
    assert r["groups"]["T1"]["ci"]["dice"] == [0.3, 0.3]
    assert r["groups"]["T2"]["ci"]["dice"] == pytest.approx([0.8, 0.8])
    low, high = r["groups"]["T3"]["ci"]["dice"]
    assert low == pytest.approx(0.2) and high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_group_metrics(records, "stage", n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(np.zeros(3), confidence=1.0)


def test_wilcoxon_hand_example_matches_scipy():
    a = [0.5] * 6
    b = [0.51, 0.52, 0.53, 0.54, 0.55, 0.44]
    # differences +.01 ... +.05, -.06: ranks 1..5 positive (W+ = 15), rank 6 negative (W- = 6); W = 6.
    # exact two-sided p: subsets of {1..6} with rank sum <= 6 number 1+1+1+2+2+3+4 = 14 of 64 -> p = 2*14/64
    r = wilcoxon_signed_rank(a, b)
    assert r["statistic"] == pytest.approx(6.0)
    assert r["p_value"] == pytest.approx(28 / 64)
    assert r["p_value"] == pytest.approx(sps.wilcoxon(b, a).pvalue)
    assert r["n_nonzero"] == 6
    assert wilcoxon_signed_rank(a, a) == {"statistic": 0.0, "p_value": 1.0, "n_nonzero": 0}


def test_compare_records_paired_differences():
    a = _random_records(seed=1, n=30)
    b = [dict(r, dice=r["dice"] + 0.1) for r in a]  # B is A plus 0.1 on every case
    r = compare_records(a, b[::-1], ["stage"], n_boot=200)  # order of rows does not matter: matched on id
    assert r["n_cases"] == 30 and r["n_improved"] == 30
    assert r["mean_difference"] == pytest.approx(0.1)
    d = r["groupings"]["stage"]
    for key in ("worst_group_dice_difference", "worst_group_cvar_difference"):
        assert d[key]["estimate"] == pytest.approx(0.1)
        assert d[key]["low"] == pytest.approx(0.1) and d[key]["high"] == pytest.approx(0.1)
    # a noisy change: the interval brackets the estimate
    rng = np.random.default_rng(5)
    c = [dict(r, dice=float(np.clip(r["dice"] + rng.normal(0.02, 0.05), 0, 1))) for r in a]
    e = compare_records(a, c, ["stage"], n_boot=300)["groupings"]["stage"]["worst_group_cvar_difference"]
    assert e["low"] <= e["estimate"] <= e["high"]
    with pytest.raises(ValueError, match="different cases"):
        compare_records(a, b[1:], ["stage"])
    with pytest.raises(ValueError, match="differs between the runs"):
        compare_records(a, [dict(r, stage="T9") if r["id"] == "c00" else r for r in b], ["stage"])


def _write_per_case(run: Path, rows):
    (run / "fairness").mkdir(parents=True)
    lines = ["id,stage,dice,hd95,nsd,hard"] + [f"{i},{s},{d},{h},{n},{k}" for i, s, d, h, n, k in rows]
    (run / "fairness" / "per_case.csv").write_text("\n".join(lines) + "\n")


def test_compare_cli_on_two_tiny_runs(tmp_path, capsys):
    run_a, run_b = tmp_path / "erm", tmp_path / "fairdro"
    _write_per_case(
        run_a, [("1", "T1", 0.9, 2.0, 0.9, "false"), ("2", "T1", 0.5, 9.0, 0.4, "true"), ("3", "T2", 0.4, 12, 0.3, "")]
    )
    _write_per_case(
        run_b, [("3", "T2", 0.6, 8.0, 0.5, ""), ("1", "T1", 0.9, 2.0, 0.9, "false"), ("2", "T1", 0.7, 5, 0.6, "true")]
    )
    out = tmp_path / "cmp.json"
    assert main(["compare", str(run_a), str(run_b), "--n-boot", "100", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # differences B - A: case 1: 0, case 2: +0.2, case 3: +0.2 -> mean 0.4/3; groupings from the CSV columns
    assert result["mean_difference"] == pytest.approx(0.4 / 3)
    assert (result["n_improved"], result["n_tied"]) == (2, 1)
    # stage: A T1 0.7, T2 0.4 -> worst 0.4; B T1 0.8, T2 0.6 -> worst 0.6: +0.2
    assert result["groupings"]["stage"]["worst_group_dice_difference"]["estimate"] == pytest.approx(0.2)
    assert "Wilcoxon" in capsys.readouterr().out
    # different case sets: an error, exit status 2
    run_c = tmp_path / "other"
    _write_per_case(run_c, [("1", "T1", 0.9, 2.0, 0.9, ""), ("9", "T2", 0.5, 3.0, 0.5, "")])
    assert main(["compare", str(run_a), str(run_c)]) == 2
    assert "different cases" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch and monai: several seconds on shared cores
def test_stats_file_runs_as_a_script(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    _write_per_case(
        run_a, [("1", "T1", 0.9, 2.0, 0.9, ""), ("2", "T1", 0.5, 9.0, 0.4, ""), ("3", "T2", 0.4, 12, 0.3, "")]
    )
    _write_per_case(
        run_b, [("1", "T1", 0.8, 2.0, 0.9, ""), ("2", "T1", 0.7, 5.0, 0.6, ""), ("3", "T2", 0.6, 8, 0.5, "")]
    )
    proc = subprocess.run(
        [sys.executable, "bundle/scripts/fairness_stats.py", "compare", str(run_a), str(run_b), "--n-boot", "50"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 paired cases" in proc.stdout


def _metrics_json(run: Path, mean_dice: float, worst: float):
    (run / "fairness").mkdir(parents=True)
    content = {
        "n_cases": 3,
        "settings": {"alpha": 0.2},
        "overall": {"dice": {"mean": mean_dice}},
        "groupings": {"stage": {"dice": {"worst_group_dice": worst, "ci": {"worst_group_dice": [0, 1]}, "n_cases": 3}}},
        "routing": None,
    }
    (run / "fairness" / "metrics.json").write_text(json.dumps(content))
    return content


def test_aggregate_over_seeds_by_hand(tmp_path):
    runs = []
    for k, (m, w) in enumerate([(0.7, 0.5), (0.8, 0.6), (0.9, 0.4)]):
        runs.append(tmp_path / f"seed{k}")
        _metrics_json(runs[-1], m, w)
    out = tmp_path / "agg.json"
    assert main(["aggregate", *map(str, runs), "--out", str(out)]) == 0
    agg = json.loads(out.read_text())
    # mean 0.8, sample std sqrt(((-.1)^2 + 0 + .1^2) / 2) = 0.1; worst: 0.5 +- 0.1
    assert agg["metrics"]["overall/dice/mean"]["mean"] == pytest.approx(0.8)
    assert agg["metrics"]["overall/dice/mean"]["std"] == pytest.approx(0.1)
    assert agg["metrics"]["groupings/stage/dice/worst_group_dice"]["mean"] == pytest.approx(0.5)
    assert agg["metrics"]["groupings/stage/dice/worst_group_dice"]["std"] == pytest.approx(0.1)
    assert set(agg["metrics"]) == {"overall/dice/mean", "groupings/stage/dice/worst_group_dice"}  # ci, counts skipped
    with pytest.raises(ValueError, match="at least two"):
        aggregate_metrics([json.loads((runs[0] / "fairness" / "metrics.json").read_text())])
    assert main(["aggregate", str(runs[0]), str(tmp_path / "missing")]) == 2


def test_flatten_skips_settings_and_intervals():
    flat = flatten_metrics({"settings": {"alpha": 0.2}, "overall": {"dice": {"mean": 0.5, "ci": [0, 1]}}, "x": 1})
    assert flat == {"overall/dice/mean": 0.5}


def _summary_metrics(minority=None):
    dice = {"worst_group_dice": 0.6, "worst_group": "T2", "group_gap": 0.2, "es_dice": 0.7, "worst_group_cvar": 0.4,
            "hidden_failures": 3}  # fmt: skip
    stage = {"dice": dice, **({"minority": minority} if minority else {})}
    overall = {"dice": {"mean": 0.75}, "hd95": {"mean": 4.0}, "nsd": {"mean": 0.8}}
    return {"n_cases": 12, "overall": overall, "groupings": {"stage": stage}}


def test_summary_headline_has_the_minority_numbers(tmp_path, capsys):
    cell = {"n_minority": 5, "n_majority": 6, "minority_dice": 0.41, "majority_dice": 0.75,
            "minority_failure_rate": 0.6, "minority_failures": 3}  # fmt: skip
    minority = {"threshold": 0.5, "groups": {"T1": cell}, "overall": cell, "worst_group_minority_dice": 0.325,
                "worst_minority_group": "T3", "kinds": {}}  # fmt: skip
    run = tmp_path / "run"
    (run / "fairness").mkdir(parents=True)
    (run / "fairness" / "metrics.json").write_text(json.dumps(_summary_metrics(minority)))
    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out
    assert "5 minority / 6 majority cases, minority Dice 0.410, majority Dice 0.750" in out
    assert "minority failure rate 0.600 (3/5)" in out
    assert "worst-group minority Dice: stage 0.325 (T3)" in out
    # an old metrics.json (no subtype in the datalist): the headline has no minority line
    (run / "fairness" / "metrics.json").write_text(json.dumps(_summary_metrics()))
    assert main(["summary", str(run)]) == 0
    assert "minority" not in capsys.readouterr().out


def test_flatten_skips_minority_counts_and_nulls():
    cell = {"n_minority": 0, "n_majority": 3, "minority_dice": None, "majority_dice": 0.8,
            "minority_failure_rate": None, "minority_failures": 0}  # fmt: skip
    flat = flatten_metrics({"groupings": {"stage": {"minority": {"threshold": 0.5, "groups": {"T2": cell}}}}})
    assert flat == {
        "groupings/stage/minority/groups/T2/majority_dice": 0.8,
        "groupings/stage/minority/groups/T2/minority_failures": 0.0,
    }
