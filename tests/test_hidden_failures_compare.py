"""Part 2 of the hidden-failures benchmark (bench/hidden_failures_compare.py, bench/hidden_failures_tables.py) and
the run cache's JTT path (bench/runcache.py): the chosen setting, JTT's grid and choice, the comparison's runs, the
recovered share, the diagnostic summary and the smoke comparison trained for real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import hidden_failures as hf  # noqa: E402
import hidden_failures_compare as hfc  # noqa: E402
import hidden_failures_tables as hft  # noqa: E402
import runcache  # noqa: E402
from hidden_failures_cli import run_smoke  # noqa: E402


def _rows(dice: list[float], minority: list[bool], stages: list[str] | None = None) -> list[dict]:
    stages = stages or ["T1", "T2"] * (len(dice) // 2)
    return [{"id": f"c{k:02d}", "stage": s, "subtype": "ring" if m else "majority", "dice": d}
            for k, (d, m, s) in enumerate(zip(dice, minority, stages))]  # fmt: skip


def _run(variant: str, dice: list[float], minority: list[bool], seed: int = 0, train_log: dict | None = None):
    return {"variant": variant, "seed": seed, "rows": _rows(dice, minority), "train_log": train_log or {}}


MINORITY = [True, True, False, False, True, False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# the recovered share
# ---------------------------------------------------------------------------------------------------------------
def test_recovered_share_by_hand_half_of_the_oracle_on_every_case():
    ref = [0.2, 0.4, 0.9, 0.8, 0.3, 0.9, 0.85, 0.1]
    oracle = [d + 0.4 if m else d for d, m in zip(ref, MINORITY)]
    method = [d + 0.2 if m else d for d, m in zip(ref, MINORITY)]  # half of the oracle's gain on every minority case
    share = hft.recovered_share([_run("m", method, MINORITY)], [_run("r", ref, MINORITY)],
                                [_run("o", oracle, MINORITY)], n_boot=500)  # fmt: skip
    assert share["applicable"] and share["estimate"] == pytest.approx(0.5)
    assert share["ci"] == pytest.approx([0.5, 0.5]) and share["oracle_gain"] == pytest.approx(0.4)
    assert share["oracle_gain_ci"] == pytest.approx([0.4, 0.4])


def test_recovered_share_two_seeds_by_hand():
    ref = [0.2, 0.4, 0.9, 0.8, 0.3, 0.9, 0.85, 0.1]
    oracle = [d + 0.4 if m else d for d, m in zip(ref, MINORITY)]
    m0 = [d + 0.1 if m else d for d, m in zip(ref, MINORITY)]
    m1 = [d + 0.3 if m else d for d, m in zip(ref, MINORITY)]
    runs = [_run("m", m0, MINORITY, 0), _run("m", m1, MINORITY, 1)]
    share = hft.recovered_share(runs, [_run("r", ref, MINORITY)], [_run("o", oracle, MINORITY)], n_boot=2000)
    # seed average: +0.2 of +0.4; a seed draw is both seeds (0.5), seed 0 twice (0.25) or seed 1 twice (0.75)
    assert share["estimate"] == pytest.approx(0.5)
    assert share["ci"][0] == pytest.approx(0.25) and share["ci"][1] == pytest.approx(0.75)


def test_recovered_share_is_na_without_an_oracle_gain():
    ref = [0.2, 0.4, 0.9, 0.8, 0.3, 0.9, 0.85, 0.1]
    method = [d + 0.2 if m else d for d, m in zip(ref, MINORITY)]
    share = hft.recovered_share([_run("m", method, MINORITY)], [_run("r", ref, MINORITY)],
                                [_run("o", list(ref), MINORITY)], n_boot=200)  # fmt: skip
    assert not share["applicable"] and share["estimate"] is None and share["ci"] is None
    assert hft._share_text(share).startswith("n/a")
    empty = hft.recovered_share([], [_run("r", ref, MINORITY)], [_run("o", ref, MINORITY)])
    assert empty["oracle_gain"] is None and hft._share_text(empty) == "-"


def test_failure_rate_and_variant_summary_by_hand():
    runs = [_run("erm", [0.4, 0.6, 0.9, 0.9, 0.2, 0.8, 0.9, 0.7], MINORITY, 0),
            _run("erm", [0.45, 0.3, 0.9, 0.9, 0.6, 0.8, 0.9, 0.7], MINORITY, 1)]  # fmt: skip
    # minority Dice of the 8 minority cases over both runs: 0.4, 0.6, 0.2, 0.7, 0.45, 0.3, 0.6, 0.7 -> 4 below 0.5
    assert hft.failure_rate(runs) == pytest.approx(4 / 8)
    cell = hft.variant_summary(runs)
    assert cell["minority_dice"]["mean"] == pytest.approx(np.mean([(0.4 + 0.6 + 0.2 + 0.7) / 4,
                                                                   (0.45 + 0.3 + 0.6 + 0.7) / 4]))  # fmt: skip
    assert cell["seeds"] == [0, 1] and cell["minority_failure_rate"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# JTT's point and the diagnostic
# ---------------------------------------------------------------------------------------------------------------
def _log(curve: dict) -> dict:
    return {"curves": {"val_worst_group_dice": curve}}


def test_choose_jtt_takes_the_best_validation_epoch_and_the_earlier_point_on_ties():
    points = [{"name": "a", "jtt#epochs": 2, "jtt#tau": 0.5, "jtt#lambda_up": 5.0,
               "run": {"train_log": _log({"1": 0.5, "2": 0.7, "3": 0.6})}},
              {"name": "b", "jtt#epochs": 5, "jtt#tau": 0.5, "jtt#lambda_up": 20.0,
               "run": {"train_log": _log({"1": 0.65, "2": 0.68})}},
              {"name": "c", "jtt#epochs": 2, "jtt#tau": 0.8, "jtt#lambda_up": 5.0,
               "run": {"train_log": _log({"1": 0.7})}}]  # fmt: skip
    assert hft.choose_jtt(points) == {"jtt#epochs": 2, "jtt#tau": 0.5, "jtt#lambda_up": 5.0}  # 0.7 = c's 0.7: a
    points[1]["run"] = None
    assert hft.choose_jtt(points) is None  # not every point ran yet


def test_verdict_words_each_pair_by_its_own_control():
    share = {"estimate": 0.5, "ci": [0.2, 0.8], "oracle_gain": 0.1, "oracle_gain_ci": [0.02, 0.18], "applicable": True}
    report = {
        "setting": {"name": "s"}, "runs_done": 3, "runs_planned": 40,
        "positive_control": {"backbone": {"estimate": None, "passes": None},
                             "dmoe": {"estimate": 0.1, "ci": [0.02, 0.18], "passes": True}},
        "methods": {
            "erm_cvar": {"reference": "erm", "share": {"oracle_gain": None},
                         "vs_reference": {"minority_dice": {"estimate": -0.01, "ci": [-0.05, 0.03]}}},
            "fairdro": {"reference": "dmoe", "share": share,
                        "vs_reference": {"minority_dice": {"estimate": 0.05, "ci": [0.01, 0.09]}}},
            "jtt": {"reference": "dmoe", "vs_reference": None, "share": {"oracle_gain": None}},
        },
    }  # fmt: skip
    text = hft.verdict(report)
    assert "positive control is not measured yet" in text and "oracle_dmoe - dmoe +0.100 [+0.020, +0.180]" in text
    assert "erm_cvar does not measurably change minority Dice against erm (-0.010 [-0.050, +0.030])" in text
    assert "share of the oracle's gain: - (underpowered: this pair's positive control fails)" in text
    fairdro = "fairdro raises minority Dice against dmoe (+0.050 [+0.010, +0.090]); recovered share of the oracle's"
    assert f"{fairdro} gain: 50% [20%, 80%]." in text
    assert "jtt" not in text  # no finished run: left out
    report["positive_control"]["backbone"] = {"estimate": 0.01, "ci": [-0.02, 0.04], "passes": False}
    assert "the positive control does not pass: oracle - erm +0.010 [-0.020, +0.040]" in hft.verdict(report)


def test_diagnostic_summary_by_hand():
    log_a = {
        "curves": {
            "cvar_precision": {"1": 0.2, "2": 0.4},
            "cvar_base_rate": {"1": 0.05, "2": 0.05},
            "cvar_precision_T1": {"1": 0.1, "2": 0.3, "3": 0.5},
            "cvar_recall_T1": {"1": 0.5, "3": 1.0},
            "cvar_base_rate_T1": {"1": 0.1, "2": 0.1, "3": 0.1},
            "val_worst_group_dice": {"1": 0.9},
        }
    }
    log_b = {"curves": {"cvar_precision": {"1": 0.4, "2": 0.6}, "cvar_base_rate": {"1": 0.05, "2": 0.05}}}
    summary = hft.diagnostic_summary([{"train_log": log_a}, {"train_log": log_b}])  # fmt: skip
    assert list(summary) == ["pooled", "T1"]
    pooled = summary["pooled"]
    assert pooled["precision"] == pytest.approx({"first": 0.3, "mean": 0.4, "last": 0.5})
    assert pooled["lift"] == pytest.approx(0.4 / 0.05) and pooled["runs"] == 2
    t1 = summary["T1"]
    assert t1["precision"] == pytest.approx({"first": 0.1, "mean": 0.3, "last": 0.5})
    assert t1["recall"] == pytest.approx({"first": 0.5, "mean": 0.75, "last": 1.0}) and t1["runs"] == 1


def test_jtt_error_sets_by_hand(tmp_path):
    (tmp_path / "jtt_error_set.json").write_text(json.dumps({"ids": ["a", "b", "c", "d"]}))
    got = hft.jtt_error_sets([{"dir": tmp_path}], {"a", "x"})
    assert got == {"precision": 0.25, "recall": 0.5, "size": 4.0, "runs": 1}
    assert hft.jtt_error_sets([{"dir": tmp_path / "none"}], {"a"}) is None


# ---------------------------------------------------------------------------------------------------------------
# the chosen setting and the plan
# ---------------------------------------------------------------------------------------------------------------
def _row(name: str, gaps: tuple, done: int = 8, placebo: bool = False) -> dict:
    status = "passes" if all(g >= 0.05 for g in gaps) else "fails"
    return {"name": name, "is_placebo": placebo, "done": done, "planned": 8, "status": status,
            "gaps": {g: {"estimate": e, "passes": e >= 0.05} for g, e in zip(("backbone", "dmoe"), gaps)}}  # fmt: skip


def test_choose_takes_the_first_passing_setting_in_plan_order():
    settings = hf.plan("full")
    rows = [_row("base", (-0.04, 0.01)), _row("placebo", (0, 0), placebo=True), _row("early_stop", (0.1, 0.06)),
            _row("weight_decay", (0.3, 0.3))]  # fmt: skip
    choice = hfc.choose({"settings": rows}, settings)
    assert choice.setting.name == "early_stop" and choice.underpowered == () and "first" in choice.how
    rows[2] = _row("early_stop", (0.1, 0.06), done=6)  # an unfinished earlier setting blocks the rule
    with pytest.raises(ValueError, match="early_stop"):
        hfc.choose({"settings": rows}, settings)
    assert hfc.choose({"settings": rows}, settings, "weight_decay").how == "named with --setting"
    with pytest.raises(ValueError, match="unknown setting"):
        hfc.choose({"settings": rows}, settings, "nope")


def test_choose_without_a_passing_setting_takes_the_closest_and_labels_it():
    settings = hf.plan("full")
    rows = [_row("base", (-0.04, 0.01)), _row("early_stop", (0.12, 0.02)), _row("weight_decay", (0.03, 0.04))]
    choice = hfc.choose({"settings": rows}, settings)
    assert choice.setting.name == "weight_decay" and set(choice.underpowered) == {"backbone", "dmoe"}


def test_comparison_plan_diagnoses_dmoe_and_fairdro_only_and_jtt_waits_for_its_point():
    setting = next(s for s in hf.SETTINGS if s.name == "early_stop")
    specs = hfc.comparison_specs(setting, None)
    assert len(specs) == 35 and "jtt" not in {s.variant for s in specs}
    point = dict(hfc.JTT_GRID[0])
    specs = hfc.comparison_specs(setting, point)
    assert len(specs) == 40 and {s.seed for s in specs} == {0, 1, 2, 3, 4}
    for spec in specs:
        assert spec.overrides.get("dro#diagnose", False) is (spec.variant in ("dmoe", "fairdro"))
        assert spec.overrides["epochs"] == 10 and spec.cohort == setting.cohort
        assert ("jtt#tau" in spec.overrides) is (spec.variant == "jtt")
    grid = hfc.jtt_specs(setting)
    assert len(grid) == 6 and all(s.overrides["jtt#epochs"] < 10 and s.seed == 0 for s in grid.values())
    placebo = hfc.placebo_setting(setting)
    assert placebo.cohort == {**setting.cohort, "difficulty": 0} and placebo.recipe == setting.recipe
    assert len(placebo.specs) == 8


def test_variants_split_the_comparison_between_two_processes(tmp_path, monkeypatch):
    setting = next(s for s in hf.SETTINGS if s.name == "early_stop")
    choice = hfc.Choice(setting, "named", "fails", ())
    asked: list[tuple[str, str]] = []

    def fake_run(spec, folder, *args, **kwargs):
        asked.append((folder.relative_to(tmp_path / "out" / "compare_early_stop").parts[0], spec.variant))
        raise RuntimeError("not trained in this test")

    monkeypatch.setattr(hfc.runcache, "run", fake_run)
    comparison = hfc.Comparison(choice, tmp_path / "out", tmp_path / "work")
    failed_a = comparison.run(None, None, ("jtt", "oracle", "oracle_dmoe"))
    a, asked[:] = list(asked), []
    failed_b = comparison.run(None, None, ("erm", "erm_cvar", "groupdro", "dmoe", "fairdro"))
    # JTT's 6 grid points and the oracles' 10 runs and 4 placebo runs go to the first; jtt's own 5 runs wait for
    # its grid; everything else to the second: no run twice, none left out
    assert a.count(("jtt_grid", "jtt")) == 6 and len(a) == 6 + 10 + 4 and len(failed_a) == 20
    assert {v for _, v in asked} == {"erm", "erm_cvar", "groupdro", "dmoe", "fairdro"}
    assert len(asked) == 25 + 4 == len(failed_b)
    assert sorted(a + asked) == sorted([("jtt_grid", "jtt")] * 6 + [("runs", s.variant) for s in
                                       hfc.comparison_specs(setting, None)] + [("placebo", v) for v in
                                       hf.VARIANTS for _ in hf.SEEDS])  # fmt: skip


def test_jtt_seed_0_is_copied_from_its_grid_point(tmp_path):
    setting = next(s for s in hf.SETTINGS if s.name == "early_stop")
    comparison = hfc.Comparison(hfc.Choice(setting, "named", "fails", ()), tmp_path / "out", tmp_path / "work")
    runs = next(st for st in comparison.stages() if st[0] == "runs")
    assert runs[3] == [tmp_path / "out" / "early_stop"]  # no JTT point chosen yet: the search's folder only
    chosen = dict(hfc.JTT_GRID[3])
    comparison.jtt_choice = lambda: (chosen, [])
    runs = next(st for st in comparison.stages() if st[0] == "runs")
    grid = tmp_path / "out" / "compare_early_stop" / "jtt_grid" / "T5_tau0.5_up5"
    assert runs[3] == [tmp_path / "out" / "early_stop", grid]
    jtt0 = next(s for s in runs[2] if s.variant == "jtt" and s.seed == 0)
    assert jtt0 == hfc.jtt_specs(setting)["T5_tau0.5_up5"]  # the same run, so the same cache key


def test_unknown_variant_is_refused(tmp_path, capsys):
    args = hf._parser().parse_args(["--part", "compare", "--bench", "smoke", "--variants", "dmoe", "fairdr0"])
    assert hfc.main(args, tmp_path, tmp_path) == 2
    assert "unknown variant(s) ['fairdr0']" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# the run cache's JTT path
# ---------------------------------------------------------------------------------------------------------------
def test_identification_is_the_dmoe_run_of_jtts_first_stage():
    setting = next(s for s in hf.SETTINGS if s.name == "early_stop")
    spec = runcache.RunSpec("jtt", 3, setting.cohort, {**setting.recipe, "jtt#epochs": 5, "jtt#tau": 0.8,
                                                       "jtt#lambda_up": 20.0})  # fmt: skip
    ident = runcache.identification_spec(spec)
    assert ident == runcache.RunSpec("dmoe", 3, setting.cohort, {**setting.recipe, "epochs": 5})
    plain = runcache.RunSpec("jtt", 0, setting.cohort, dict(setting.recipe))
    assert runcache.identification_spec(plain).overrides["epochs"] == runcache.JTT_DEFAULT_EPOCHS == 10
    # the JTT settings are part of the run's training key
    other = runcache.RunSpec("jtt", 3, setting.cohort, {**spec.overrides, "jtt#tau": 0.5})
    assert runcache.run_key(spec, evaluation=False) != runcache.run_key(other, evaluation=False)


def test_a_new_key_of_a_section_is_part_of_the_training_key():
    setting = next(s for s in hf.SETTINGS if s.name == "early_stop")
    plain = runcache.RunSpec("dmoe", 0, setting.cohort, dict(setting.recipe))
    diagnosed = runcache.RunSpec("dmoe", 0, setting.cohort, {**setting.recipe, "dro#diagnose": True})
    # dro#diagnose is not in train.json's dro section, yet it changes what the training logs (train_log.json)
    assert runcache.run_key(plain, evaluation=False) != runcache.run_key(diagnosed, evaluation=False)
    evaluation_only = runcache.RunSpec("dmoe", 0, setting.cohort, {**setting.recipe, "case_metrics#nope": 1})
    assert runcache.run_key(plain, evaluation=False) == runcache.run_key(evaluation_only, evaluation=False)


def test_overrides_are_written_as_python_literals_on_the_command_line():
    assert runcache._cli_value(True) == "True" and runcache._cli_value(False) == "False"
    assert runcache._cli_value(0.5) == "0.5" and runcache._cli_value([1, 2]) == "[1, 2]"
    assert runcache._cli_value("val_worst_group_dice") == "val_worst_group_dice"


# ---------------------------------------------------------------------------------------------------------------
# the smoke comparison, trained for real
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_comparison_end_to_end(tmp_path):
    run_smoke(tmp_path, "--part", "compare")
    out = tmp_path / "smoke_results"
    report = json.loads((out / "report.json").read_text())
    assert report["runs_done"] == report["runs_planned"] == 4
    assert set(report["variants"]) == {"dmoe", "fairdro", "jtt", "oracle_dmoe"}
    assert report["jtt"]["chosen"] == hfc.SMOKE.jtt_grid[0] and report["jtt"]["error_sets"]["runs"] == 1
    for variant in ("dmoe", "fairdro"):  # the diagnostic ran at every refresh, for both
        assert report["diagnostic"][variant]["pooled"]["runs"] == 1
    jtt_run = out / "compare_smoke" / "runs" / "jtt_ring_l3_s0"
    error_set = json.loads((jtt_run / "jtt_error_set.json").read_text())
    assert error_set["epochs"] == 1 and error_set["tau"] == 0.5
    assert (out / "diagnostic.png").stat().st_size > 0 and "## Variants" in (out / "report.md").read_text()
    again = run_smoke(tmp_path, "--part", "compare")
    assert ": ran" not in again.stdout + again.stderr  # all cached


def test_report_carries_the_3d_verdict_when_the_carry_back_has_one(tmp_path):
    assert hft.carry3d_summary(tmp_path) is None
    assert "Not run yet" in hft._carry3d_text(None)
    carry = {"verdict": "The 3D control passes.", "runs_done": 7, "runs_planned": 9, "variants": {}}
    (tmp_path / "carry3d.json").write_text(json.dumps(carry))
    summary = hft.carry3d_summary(tmp_path)
    assert summary == {"verdict": "The 3D control passes.", "runs_done": 7, "runs_planned": 9}
    text = hft._carry3d_text(summary)
    assert text.startswith("The 3D control passes. Runs: 7 of 9;") and "(carry3d.md)" in text
