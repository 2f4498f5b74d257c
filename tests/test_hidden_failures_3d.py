"""The 3D carry-back of the hidden-failures benchmark (bench/hidden_failures_3d.py): the plan, the cohort's minority
testing cases, the report from hand-made runs, the claims that let two processes share the runs, and the smoke
bench trained for real."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
for path in (BENCH, REPO / "bundle"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import hidden_failures as hf  # noqa: E402
import hidden_failures_3d as hf3  # noqa: E402
import runcache  # noqa: E402
from hidden_failures_cli import run_smoke  # noqa: E402
from scripts import synthetic  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------
def test_plan_runs_three_variants_three_seeds_with_the_diagnostic_on_dmoe_and_fairdro():
    specs = hf3.plan().specs()
    assert [(s.variant, s.seed) for s in specs] == [(v, k) for k in (0, 1, 2)
                                                   for v in ("dmoe", "fairdro", "oracle_dmoe")]  # fmt: skip
    for spec in specs:
        assert spec.overrides.get("dro#diagnose", False) is (spec.variant in ("dmoe", "fairdro"))
        assert spec.name == f"{spec.variant}_ring_l3_s{spec.seed}"


def test_plan_carries_the_chosen_2d_design_to_the_3d_cohort():
    carry = hf3.plan()
    chosen = next(s for s in hf.SETTINGS if s.name == "share_0.1")
    # the design the search chose: ring at level 3, share 0.1, weight decay 1e-4, validation every epoch,
    # the checkpoint by validation worst-group Dice
    assert (chosen.knobs["minority_frac"], chosen.knobs["difficulty"], chosen.knobs["weight_decay"]) == (0.1, 3, 1e-4)
    c, r = carry.cohort, carry.recipe
    assert (c["minority"], c["difficulty"], c["minority_frac"]) == ("ring", 3, 0.1)
    assert r == {"epochs": hf3.EPOCHS, "val_interval": 1, "optimizer#weight_decay": 1e-4,
                 "key_metric": "val_worst_group_dice", "num_samples": 1, "batch_size": 2}  # fmt: skip
    # the 3D knobs: no spatial_dims (the 3D generator and configs), the chosen volume shape
    assert "spatial_dims" not in c and runcache.spatial_dims(c) == 3 and c["shape"] == [48, 48, 24]
    assert not any("profiles/2d" in f for f in carry.specs()[0].config_files(evaluation=True))
    assert carry.source == "share_0.1" and hf3.EPOCHS >= 20


def test_the_3d_cohort_keeps_at_least_25_minority_testing_cases():
    for c in (hf3.plan().cohort, hf3.cohort_3d({"minority_frac": 0.1, "difficulty": 3})):
        items = synthetic.draw_attributes(c["n_cases"], c["seed"], c["minority"], c["minority_frac"])
        split = synthetic.stratified_split(items, "stage", c["seed"], c["split"])
        assert {k: len(v) for k, v in split.items()} == {"training": hf3.N_TRAIN, "validation": hf3.N_VAL,
                                                         "testing": hf3.N_TEST}  # fmt: skip
        assert sum(it["subtype"] == "ring" for it in split["testing"]) >= 25


def test_unknown_bench_and_variant_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown bench"):
        hf3.plan("big")
    args = hf._parser().parse_args(["--part", "carry3d", "--variants", "dmoe", "erm"])
    assert hf3.main(args, tmp_path, tmp_path) == 2
    assert "unknown variant(s) ['erm']" in capsys.readouterr().out


def test_dry_run_through_the_main_script(tmp_path, capsys):
    assert hf.main(["--part", "carry3d", "--dry-run", "--work", str(tmp_path / "w"), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.count("run\n") == 9 and "    dmoe_ring_l3_s0              run" in text
    one = hf3.run_minutes(hf3.plan())
    # 200 training cases: FIXED_MINUTES plus EPOCHS epochs of EPOCH_SECONDS; two processes: 5 runs one after another
    assert one == pytest.approx(hf3.FIXED_MINUTES + hf3.EPOCHS * hf3.EPOCH_SECONDS / 60)
    assert f"9 to run (about {9 * one:.0f} min in one process, {5 * one:.0f} min in two)" in text
    assert not (tmp_path / "carry3d").exists()


# ---------------------------------------------------------------------------------------------------------------
# the report from hand-made runs
# ---------------------------------------------------------------------------------------------------------------
MINORITY = [True, True, False, False, True, False, False, True]
STAGES = ["T1", "T2"] * 4
REF = [0.2, 0.4, 0.9, 0.8, 0.3, 0.9, 0.85, 0.1]  # minority mean 0.25, majority mean 0.8625


def _run(variant: str, seed: int, gain: float, curve: dict | None = None, diag: dict | None = None) -> dict:
    rows = [{"id": f"c{k}", "stage": s, "subtype": "ring" if m else "majority", "dice": d + (gain if m else 0.0)}
            for k, (d, m, s) in enumerate(zip(REF, MINORITY, STAGES))]  # fmt: skip
    log = {"val_mean_dice": curve or {str(e): 0.8 for e in range(1, 9)}, "curves": diag or {}}
    return {"name": f"{variant}_ring_l3_s{seed}", "variant": variant, "seed": seed, "rows": rows, "train_log": log}


def test_report_by_hand_the_control_passes():
    diag = {"cvar_precision": {"1": 0.2, "2": 0.4}, "cvar_base_rate": {"1": 0.1, "2": 0.1}}
    unflat = {str(e): 0.7 + 0.01 * e for e in range(1, 9)}  # last quarter: epochs 7-8 (window of 2), range 0.01
    runs = [_run("dmoe", 0, 0.0, diag=diag), _run("dmoe", 1, 0.0), _run("oracle_dmoe", 0, 0.3),
            _run("oracle_dmoe", 1, 0.5, curve=unflat), _run("fairdro", 0, 0.1), _run("fairdro", 1, 0.1)]  # fmt: skip
    report = hf3.build_report(hf3.plan().info(), runs, 9, n_boot=2000)
    # oracle_dmoe - dmoe: +0.4 on average over the seeds; a seed draw takes both seeds (+0.4), seed 0 twice (+0.3)
    # or seed 1 twice (+0.5), so the 95% interval is [+0.3, +0.5]: >= 0.05 and excluding 0
    control = report["positive_control"]
    assert control["difference"]["minority_dice"]["estimate"] == pytest.approx(0.4)
    assert control["difference"]["minority_dice"]["ci"] == pytest.approx([0.3, 0.5]) and control["passes"]
    fair = report["fairdro_vs_dmoe"]["minority_dice"]
    assert fair["estimate"] == pytest.approx(0.1) and fair["ci"] == pytest.approx([0.1, 0.1])
    # recovered share 0.1 / 0.4; in a draw the oracle's gain is 0.3, 0.4 or 0.5: shares 1/3, 1/4, 1/5
    assert report["share"]["estimate"] == pytest.approx(0.25)
    assert report["share"]["ci"] == pytest.approx([0.2, 1 / 3])
    cell = report["variants"]["fairdro"]
    assert cell["minority_dice"]["mean"] == pytest.approx(0.35)
    assert cell["majority_dice"]["mean"] == pytest.approx(0.8625)
    # worst group: T1 holds cases 0, 2, 4, 6 (0.3, 0.9, 0.4, 0.85 with fairdro's +0.1 on 0 and 4) -> 0.6125;
    # T2 holds 1, 3, 5, 7 (0.5, 0.8, 0.9, 0.2) -> 0.6
    assert cell["worst_group_dice"]["mean"] == pytest.approx(0.6)
    assert report["curves"]["oracle_dmoe_ring_l3_s1"]["range"] == pytest.approx(0.01)
    assert [n for n, c in report["curves"].items() if not c["flat"]] == ["oracle_dmoe_ring_l3_s1"]
    assert report["diagnostic"]["dmoe"]["pooled"]["lift"] == pytest.approx(0.3 / 0.1)
    text = hf3.render_markdown(report)
    assert "the 3D positive control passes: oracle_dmoe - dmoe +0.400 [+0.300, +0.500]" in text
    assert "fairdro raises minority Dice against dmoe (+0.100 [+0.100, +0.100])" in text
    assert "recovered share of the oracle's gain: 25% [20%, 33%]" in text
    assert "1 of 6 runs are not flat over their last quarter: oracle_dmoe_ring_l3_s1." in text
    assert "| oracle_dmoe_ring_l3_s1 | NO | 0.0100 | 7-8 |" in text and "underpowered" not in text


def test_report_by_hand_a_small_gap_labels_fairdro_underpowered(tmp_path):
    runs = [_run("dmoe", 0, 0.0), _run("oracle_dmoe", 0, 0.02), _run("fairdro", 0, 0.0)]
    report = hf3.build_report(hf3.plan().info(), runs, 9, n_boot=500)
    assert report["positive_control"]["difference"]["minority_dice"]["estimate"] == pytest.approx(0.02)
    assert report["positive_control"]["passes"] is False  # +0.02 < 0.05, though its interval [0.02, 0.02] excludes 0
    assert "does not pass" in report["verdict"] and "3D fairdro comparison is underpowered" in report["verdict"]
    assert "fairdro does not measurably change minority Dice" in report["verdict"]
    files = hf3.write_report(report, tmp_path)
    assert [f.name for f in files] == ["carry3d.md", "carry3d.json"]
    assert json.loads(files[1].read_text())["runs_done"] == 3
    empty = hf3.build_report(hf3.plan().info(), [], 9)
    assert empty["positive_control"]["passes"] is None and "not yet measured" in empty["verdict"]


# ---------------------------------------------------------------------------------------------------------------
# two processes share the runs
# ---------------------------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_is_exclusive_while_its_process_lives(tmp_path):
    token = tmp_path / "w" / "run.claim"
    assert hf3.claim(token) and token.read_text() == str(os.getpid())
    assert not hf3.claim(token)  # this process still holds it
    token.write_text(str(_dead_pid()))
    assert hf3.claim(token) and token.read_text() == str(os.getpid())  # a claim whose process is gone is taken
    token.write_text("garbage")
    assert hf3.claim(token)


def test_a_run_another_process_holds_is_skipped(tmp_path, monkeypatch):
    asked: list[str] = []

    def fake_run(spec, folder, data, work, **kwargs):
        asked.append(spec.name)
        assert (work / f"{spec.name}.claim").read_text() == str(os.getpid())  # held while it runs
        raise RuntimeError("not trained in this test")

    monkeypatch.setattr(hf3.runcache, "run", fake_run)
    runner = hf3.CarryBack(hf3.plan(), tmp_path / "out", tmp_path / "work")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "work" / "carry3d").mkdir(parents=True)
        (tmp_path / "work" / "carry3d" / "fairdro_ring_l3_s0.claim").write_text(str(other.pid))
        failed = runner.run(None, None)
    finally:
        other.kill()
        other.wait()
    names = [s.name for s in hf3.plan().specs()]
    assert asked == failed == [n for n in names if n != "fairdro_ring_l3_s0"]
    assert not any(p.name != "fairdro_ring_l3_s0.claim" for p in (tmp_path / "work" / "carry3d").glob("*.claim"))
    assert runner.run(None, None, ("oracle_dmoe",)) == ["oracle_dmoe_ring_l3_s0", "oracle_dmoe_ring_l3_s1",
                                                        "oracle_dmoe_ring_l3_s2"]  # fmt: skip


def test_commit_refuses_a_report_that_git_ignores(tmp_path, capsys):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("/res/carry3d.json\n")
    argv = ["--part", "carry3d", "--no-nice", "--commit", "--out", str(tmp_path / "res"), "--work", str(tmp_path / "w")]
    assert hf.main(argv) == 2
    assert "cannot commit ['res/carry3d.json']: git ignores them" in capsys.readouterr().out
    assert not (tmp_path / "w").exists() and not (tmp_path / "res").exists()  # nothing ran, nothing written
    (tmp_path / ".gitignore").write_text("")
    assert hf3.git_ignored([tmp_path / "res" / f for f in hf3.FILES], tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# the smoke bench, trained for real
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_carry_back_end_to_end(tmp_path):
    run_smoke(tmp_path, "--part", "carry3d", timeout=300)
    out = tmp_path / "smoke_results"
    report = json.loads((out / "carry3d.json").read_text())
    assert report["runs_done"] == report["runs_planned"] == 2 and set(report["variants"]) == {"dmoe", "fairdro"}
    for variant in ("dmoe", "fairdro"):  # the diagnostic ran on the 3D network, for both
        assert report["diagnostic"][variant]["pooled"]["runs"] == 1
    run_dir = out / "carry3d" / "fairdro_ring_l3_s0"
    meta = json.loads((run_dir / "run.json").read_text())
    assert "spatial_dims" not in meta["cohort"] and meta["cohort"]["shape"] == [32, 32, 16]
    assert meta["key"] == runcache.run_key(hf3.plan("smoke").specs()[1])
    with (run_dir / "per_case.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    c = hf3.SMOKE_COHORT  # the testing split of the smoke cohort, from its generator
    items = synthetic.draw_attributes(c["n_cases"], c["seed"], c["minority"], c["minority_frac"])
    testing = synthetic.stratified_split(items, "stage", c["seed"], c["split"])["testing"]
    assert list(rows[0]) == list(hf.PER_CASE_COLUMNS) and [r["id"] for r in rows] == [it["id"] for it in testing]
    assert sorted(json.loads((run_dir / "train_log.json").read_text())["val_mean_dice"]) == ["1", "2"]
    assert "## Variants" in (out / "carry3d.md").read_text()
    again = run_smoke(tmp_path, "--part", "carry3d", timeout=300)
    assert ": ran" not in again.stdout + again.stderr  # all cached
