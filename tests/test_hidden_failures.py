"""The hidden-failures positive-control search (bench/hidden_failures.py, bench/hidden_failures_report.py), the 2D
path of the run cache (bench/runcache.py) and the oracle_dmoe variant.

Most tests train nothing: ``runcache.execute`` is replaced by a fake that writes what a real run leaves in its work
folder. ``test_smoke_bench_end_to_end`` trains the smoke plan for real (about 30 s with one thread).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from scripts import synthetic

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
CONFIGS = REPO / "bundle" / "configs"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import fairness_ablation as fa  # noqa: E402
import hidden_failures as hf  # noqa: E402
import hidden_failures_report as hfr  # noqa: E402
import runcache  # noqa: E402

ORDER = ["base", "placebo", "early_stop", "weight_decay", "share_0.02", "share_0.1", "level_2"]


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------
def test_plan_settings_runs_seeds_and_variants():
    settings = hf.plan()
    assert [s.name for s in settings] == ORDER  # base first, then the most informative
    assert sum(len(s.specs) for s in settings) == 56
    for s in settings:
        assert [(r.variant, r.seed) for r in s.specs] == [
            (v, seed) for seed in (0, 1) for v in ("erm", "oracle", "dmoe", "oracle_dmoe")
        ]  # seed by seed: every variant's seed 0 first
        assert {r.name for r in s.specs} == {f"{v}_ring_l{s.knobs['difficulty']}_s{seed}" for v in hf.VARIANTS
                                             for seed in (0, 1)}  # fmt: skip
    base = settings[0]
    assert base.cohort == {"spatial_dims": 2, "n_cases": 3300, "seed": 0, "shape": [64, 64], "minority": "ring",
                           "minority_frac": 0.05, "difficulty": 3, "split": [0.30303, 0.090909, 0.606061]}  # fmt: skip
    assert base.recipe == {"epochs": 30, "val_interval": 1, "optimizer#weight_decay": 1e-4,
                           "key_metric": "val_worst_group_dice"}  # fmt: skip
    assert math.isclose(sum(base.cohort["split"]), 1.0, abs_tol=1e-9)


def test_every_setting_differs_from_the_base_in_exactly_one_thing():
    base = hf.plan()[0]
    assert base.change() == {}
    axes: dict[str, list[str]] = {}
    for s in hf.plan()[1:] + list(hf.EXTRA_SETTINGS):
        assert len(s.change()) == 1, s.name
        (knob,) = s.change()
        axes.setdefault(s.axis, []).append(s.name)
        cohort_diff = {k for k in base.cohort if base.cohort[k] != s.cohort[k]}
        recipe_diff = {k for k in base.recipe if base.recipe[k] != s.recipe[k]}
        expected = {"minority_frac": ({"minority_frac"}, set()), "difficulty": ({"difficulty"}, set()),
                    "n_train": ({"n_cases", "split"}, set()), "epochs": (set(), {"epochs"}),
                    "weight_decay": (set(), {"optimizer#weight_decay"})}[knob]  # fmt: skip
        assert (cohort_diff, recipe_diff) == expected, s.name
    default_axes = {s.axis for s in hf.plan()[1:]}
    assert len(default_axes) >= 3 and all(len([n for n in axes[a] if n in ORDER]) >= 2 for a in default_axes)
    assert hf.plan()[1].knobs["difficulty"] == 0 and hf.PLACEBO == "placebo"
    assert hf.plan()[2].short_schedule and not any(s.short_schedule for s in hf.plan() if s.name != "early_stop")


def test_every_setting_keeps_25_minority_testing_cases():
    for s in hf.plan() + list(hf.EXTRA_SETTINGS):
        c = s.cohort
        items = synthetic.draw_attributes(c["n_cases"], c["seed"], c["minority"], c["minority_frac"])
        split = synthetic.stratified_split(items, "stage", c["seed"], c["split"])
        counts = {k: len(v) for k, v in split.items()}
        assert counts == {"training": s.knobs["n_train"], "validation": 300, "testing": 2000}, s.name
        assert sum(it["subtype"] != "majority" for it in split["testing"]) >= 25, s.name


def test_plan_names_extras_and_refuses_unknown_ones():
    assert [s.name for s in hf.plan("full", ["train_2000", "placebo"])] == ["placebo", "train_2000"]
    with pytest.raises(ValueError, match="unknown setting"):
        hf.plan("full", ["nope"])
    with pytest.raises(ValueError, match="unknown bench"):
        hf.plan("huge")
    smoke = hf.plan("smoke")
    assert [r.variant for r in smoke[0].specs] == ["dmoe", "oracle_dmoe"] and smoke[0].change() == {}


def test_run_minutes_by_hand():
    by_name = {s.name: s for s in hf.plan() + list(hf.EXTRA_SETTINGS)}
    assert hf.run_minutes(by_name["base"]) == pytest.approx(1.5 + 30 * 6 / 60)  # 4.5
    assert hf.run_minutes(by_name["early_stop"]) == pytest.approx(1.5 + 10 * 6 / 60)  # 2.5
    assert hf.run_minutes(by_name["train_2000"]) == pytest.approx(1.5 + 30 * 2 * 6 / 60)  # 7.5


# ---------------------------------------------------------------------------------------------------------------
# the run cache: 3D keys unchanged, the 2D path, nested overrides
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(runcache.BENCH_VERSION != 3, reason="the committed ablation is history under BENCH_VERSION 3")
def test_the_keys_of_the_committed_ablation_runs_are_unchanged():
    metas = sorted((REPO / "bench" / "results" / "ablation").glob("*/run.json"))
    checked = 0
    for path in metas:
        meta = json.loads(path.read_text())
        spec = runcache.RunSpec(meta["variant"], meta["seed"], meta["cohort"], meta.get("overrides", {}))
        assert spec.name == path.parent.name
        assert runcache.run_key(spec) == meta["key"], path.parent.name
        if "train_key" in meta:
            assert runcache.run_key(spec, evaluation=False) == meta["train_key"], path.parent.name
        checked += 1
    assert checked == 46
    # and the ablation's own plan finds every one of them
    assert all(fa.run_state(spec, fa.RESULTS) == "done" for spec in fa.plan("full"))


def test_config_files_of_3d_and_2d_runs():
    names = lambda files: [str(Path(f).relative_to(CONFIGS)) for f in files]  # noqa: E731
    spec3 = runcache.RunSpec("erm", 0, {"n_cases": 8})
    assert names(spec3.config_files()) == ["train.json", "variants/erm.json"]
    assert names(spec3.config_files(True)) == ["train.json", "variants/erm.json", "evaluate.json"]
    spec2 = runcache.RunSpec("oracle_dmoe", 1, {"spatial_dims": 2, "n_cases": 8}, {"optimizer#weight_decay": 0.2})
    assert names(spec2.config_files()) == ["train.json", "variants/oracle_dmoe.json", "profiles/2d.json"]
    assert names(spec2.config_files(True)) == ["train.json", "variants/oracle_dmoe.json", "evaluate.json",
                                               "profiles/2d.json", "profiles/2d_evaluate.json"]  # fmt: skip
    cmd = runcache.bundle_command(spec2, "evaluating", Path("/d"), Path("/w"))
    assert json.loads(cmd[cmd.index("--config_file") + 1]) == spec2.config_files(True)
    assert cmd[cmd.index("--optimizer#weight_decay") + 1] == "0.2"
    for bad in (4, "2", True):
        with pytest.raises(ValueError, match="spatial_dims"):
            runcache.RunSpec("erm", 0, {"spatial_dims": bad}).config_files()


def test_2d_keys_see_the_profile_and_the_nested_overrides():
    cohort = hf.plan()[0].cohort
    a = runcache.RunSpec("erm", 0, cohort, {"optimizer#weight_decay": 1e-4, "key_metric": "val_worst_group_dice"})
    b = runcache.RunSpec("erm", 0, cohort, {"optimizer#weight_decay": 0.2, "key_metric": "val_worst_group_dice"})
    config = runcache.resolved_config(b, evaluation=False)
    assert config["spatial_dims"] == 2 and config["batch_size"] == 32  # profiles/2d.json is applied
    assert config["optimizer"]["weight_decay"] == 0.2 and config["key_metric"] == "val_worst_group_dice"
    assert runcache.run_key(a, evaluation=False) != runcache.run_key(b, evaluation=False)
    assert "validate#case_metrics#spatial_dims" not in runcache.resolved_config(a, evaluation=False)
    assert runcache.resolved_config(a)["validate"]["case_metrics"]["spatial_dims"] == "@spatial_dims"  # 2d_evaluate
    # without spatial_dims the cohort is the 3D one: another key for otherwise equal arguments
    c3 = {k: v for k, v in cohort.items() if k != "spatial_dims"}
    assert runcache.run_key(runcache.RunSpec("erm", 0, c3)) != runcache.run_key(runcache.RunSpec("erm", 0, cohort))


def test_ensure_cohort_generates_the_2d_cohort(tmp_path):
    cohort = {"spatial_dims": 2, "n_cases": 8, "seed": 1, "shape": [48, 48], "minority_frac": 0.25}
    folder = runcache.ensure_cohort(cohort, tmp_path)
    datalist = json.loads((folder / "datalist.json").read_text())
    assert datalist["spatial_dims"] == 2 and datalist["shape"] == [48, 48]
    assert len(list((folder / "images").glob("*.png"))) == 8
    assert runcache.ensure_cohort(cohort, tmp_path) == folder  # generated once


def test_copy_per_case_keeps_the_named_columns(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text("id,stage,dice,hd95_px\nc0,T1,0.5,3.0\n")
    runcache.copy_per_case(src, tmp_path / "b.csv", ("id", "dice"))
    assert (tmp_path / "b.csv").read_text().splitlines() == ["id,dice", "c0,0.5"]
    with pytest.raises(ValueError, match="lacks the column"):
        runcache.copy_per_case(src, tmp_path / "c.csv", ("id", "subtype"))


# ---------------------------------------------------------------------------------------------------------------
# oracle_dmoe: the oracle's weights on the dMoE network; subtype read only by the oracles
# ---------------------------------------------------------------------------------------------------------------
def _parser(*files: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    return parser


ITEMS = [{"id": f"c{k}", "stage": stage, "subtype": "ring" if k % 4 == 0 else "majority"}
         for k, stage in enumerate(["T1", "T2", "T3", "T4"] * 2)]  # fmt: skip


def _dro(variant: str, items: list[dict]):
    parser = _parser("train.json", f"variants/{variant}.json")
    parser["dro#cohort"] = items
    return parser.get_parsed_content("dro", instantiate=True)


def test_oracle_dmoe_resolves_to_the_oracle_on_the_dmoe_network():
    config = _parser("train.json", "variants/oracle_dmoe.json", "profiles/2d.json").get()
    assert config["run_name"] == "oracle_dmoe" and config["use_dmoe"] is True
    assert (config["dro"]["intra"], config["dro"]["inter"], config["dro"]["subtype_key"]) == (
        "oracle", "empirical", "subtype"
    )  # fmt: skip
    oracle = _parser("train.json", "variants/oracle.json").get()
    dmoe = _parser("train.json", "variants/oracle_dmoe.json").get()
    assert {k for k in oracle if oracle[k] != dmoe[k]} == {"run_name", "use_dmoe"}  # one thing changed, and the name
    dro = _dro("oracle_dmoe", ITEMS)
    assert dro.minority.tolist() == [True, False, False, False, True, False, False, False]  # c0 and c4, by hand


def test_subtype_is_read_only_by_the_oracles():
    variants = sorted(p.stem for p in (CONFIGS / "variants").glob("*.json"))
    assert {"erm", "oracle", "dmoe", "oracle_dmoe"} <= set(variants)
    assert "subtype" not in (CONFIGS / "train.json").read_text()
    blind = [{k: v for k, v in it.items() if k != "subtype"} for it in ITEMS]
    for variant in variants:
        mentions = "subtype" in (CONFIGS / "variants" / f"{variant}.json").read_text()
        assert mentions == variant.startswith("oracle"), variant
        if variant.startswith("oracle"):
            with pytest.raises(RuntimeError) as err:  # MONAI wraps FairDRO's ValueError
                _dro(variant, blind)
            assert "lack it" in str(err.value.__cause__), variant
        elif "groupdro" not in variant:  # a cohort without subtypes builds, and no minority flag is kept
            assert _dro(variant, blind).minority is None, variant


# ---------------------------------------------------------------------------------------------------------------
# the calibration table, by hand
# ---------------------------------------------------------------------------------------------------------------
CASES = [("m0", "T1", "ring"), ("m1", "T1", "ring"), ("j0", "T1", "majority"), ("j1", "T1", "majority"),
         ("m2", "T2", "ring"), ("m3", "T2", "ring"), ("j2", "T2", "majority"), ("j3", "T2", "majority")]  # fmt: skip


def _run(name: str, seed: int, minority: list[float] | float, curve: dict | None = None) -> dict:
    values = minority if isinstance(minority, list) else [minority] * 4
    it = iter(values)
    rows = [{"id": cid, "stage": stage, "subtype": sub, "dice": next(it) if sub == "ring" else 0.9}
            for cid, stage, sub in CASES]  # fmt: skip
    flat = {str(e): 0.9 for e in range(1, 9)}
    return {"name": name, "seed": seed, "rows": rows, "train_log": {"val_mean_dice": curve or flat}}


def _info(name: str, planned: int = 8, short: bool = False) -> dict:
    return {"name": name, "axis": "test", "change": {}, "note": "", "short_schedule": short, "planned": planned}


def test_flat_curve_by_hand():
    curve = {str(e): 0.5 + 0.05 * e for e in range(1, 7)} | {"7": 0.940, "8": 0.946}
    assert hfr.flat_curve(curve) == {"flat": False, "range": pytest.approx(0.006), "window": [7, 8]}
    curve["8"] = 0.944  # window of 8 epochs: the last max(2, ceil(8 / 4)) = 2
    assert hfr.flat_curve(curve)["flat"] is True
    thirty = {e: 0.9 + 0.001 * e for e in range(1, 31)}  # 30 epochs: the last 8 (23..30) span 0.007
    assert hfr.flat_curve(thirty)["window"] == [23, 30] and hfr.flat_curve(thirty)["flat"] is False
    thirty.update({e: 0.95 for e in range(23, 31)})
    thirty[22] = 0.5  # outside the window
    assert hfr.flat_curve(thirty) == {"flat": True, "range": 0.0, "window": [23, 30]}
    assert hfr.flat_curve({"1": 0.3})["flat"] is None


def test_run_numbers_by_hand():
    nums = hfr.run_numbers(_run("r", 0, [0.1, 0.3, 0.5, 0.7])["rows"])
    assert nums["minority_dice"] == pytest.approx(0.4) and nums["majority_dice"] == pytest.approx(0.9)
    assert nums["worst_group_dice"] == pytest.approx((0.1 + 0.3 + 1.8) / 4)  # T1 0.55 < T2 0.75
    assert nums["mean_dice"] == pytest.approx((1.6 + 3.6) / 8)
    with pytest.raises(ValueError, match="without any testing case"):
        hfr.run_numbers([])


def _pass_setting() -> dict:
    # backbone: erm 0.30 / 0.40, oracle 0.60 / 0.70 in every minority case: gap 0.30, every draw in [0.2, 0.4]
    # dmoe: 0.50 / 0.50, oracle_dmoe 0.53 / 0.53: gap 0.03 in every draw: excludes 0 but below 0.05
    bent = {str(e): 0.9 for e in range(1, 8)} | {"8": 0.8}
    return {"erm": [_run("erm_s0", 0, 0.30), _run("erm_s1", 1, 0.40)],
            "oracle": [_run("oracle_s0", 0, 0.60), _run("oracle_s1", 1, 0.70, bent)],
            "dmoe": [_run("dmoe_s0", 0, 0.50), _run("dmoe_s1", 1, 0.50)],
            "oracle_dmoe": [_run("oracle_dmoe_s0", 0, 0.53), _run("oracle_dmoe_s1", 1, 0.53)]}  # fmt: skip


def _placebo_setting(shift: float = 0.0) -> dict:
    # per minority case the oracle is +0.2, -0.2, +0.2, -0.2 from its reference (plus ``shift``): estimate ``shift``
    up, down = [0.7 + shift, 0.5 + shift, 0.7 + shift, 0.5 + shift], [0.5, 0.7, 0.5, 0.7]
    return {v: [_run(f"{v}_s{s}", s, up if v.startswith("oracle") else down) for s in (0, 1)] for v in hfr.VARIANTS}


def test_oracle_gap_by_hand():
    runs = _pass_setting()
    gap = hfr.oracle_gap(runs["oracle"], runs["erm"], n_boot=500)
    assert gap["estimate"] == pytest.approx(0.30)  # (0.65 - 0.35)
    assert 0.2 - 1e-9 <= gap["ci"][0] <= gap["ci"][1] <= 0.4 + 1e-9 and gap["ci"][0] < 0.3 < gap["ci"][1]
    assert gap["passes"] and gap["excludes_0"]
    small = hfr.oracle_gap(runs["oracle_dmoe"], runs["dmoe"], n_boot=500)
    assert small["estimate"] == pytest.approx(0.03) and small["ci"] == pytest.approx([0.03, 0.03])
    assert small["excludes_0"] and not small["passes"]  # significant but under 0.05
    placebo = hfr.oracle_gap(_placebo_setting()["oracle"], _placebo_setting()["erm"], n_boot=500)
    assert placebo["estimate"] == pytest.approx(0.0) and placebo["ci"][0] < 0 < placebo["ci"][1]
    assert not placebo["passes"] and not placebo["excludes_0"]
    assert hfr.oracle_gap([], runs["erm"])["estimate"] is None and hfr.oracle_gap([], [])["n_runs"] == [0, 0]


def test_calibration_table_by_hand(tmp_path):
    both = _pass_setting()
    both["oracle_dmoe"] = [_run("oracle_dmoe_s0", 0, 0.60), _run("oracle_dmoe_s1", 1, 0.60)]  # gap 0.10: passes
    entries = [(_info("base"), _pass_setting()), (_info("placebo"), _placebo_setting()),
               (_info("good"), both), (_info("half", planned=8), {"erm": [_run("erm_s0", 0, 0.3)]}),
               (_info("short", short=True), both)]  # fmt: skip
    table = hfr.build_calibration(entries, placebo="placebo", n_boot=500)
    rows = {r["name"]: r for r in table["settings"]}
    base = rows["base"]
    assert base["variants"]["erm"]["minority_dice"]["mean"] == pytest.approx(0.35)
    assert base["variants"]["erm"]["minority_dice"]["std"] == pytest.approx(math.sqrt(0.005))
    assert base["variants"]["erm"]["worst_group_dice"]["mean"] == pytest.approx((0.6 + 0.65) / 2)
    assert base["not_flat"] == ["oracle_s1"]  # its last quarter spans 0.1
    assert base["status"] == "backbone pair only (1 run(s) not flat)"
    assert rows["good"]["status"] == "passes (1 run(s) not flat)"
    assert rows["good"]["gaps"]["dmoe"]["estimate"] == pytest.approx(0.10)
    assert rows["half"]["status"] == "not yet measured (1/8 runs)" and rows["half"]["done"] == 1
    assert rows["short"]["status"] == "passes (regularisation point, not converged)"
    assert rows["placebo"]["is_placebo"] and table["placebo"]["clean"] is True
    assert table["runs_done"] == 8 * 4 + 1 and table["runs_planned"] == 40
    assert table["verdict"].startswith("Positive control passes")
    assert "in: good (1 run(s) not flat), short (regularisation point, not converged)." in table["verdict"]
    assert "placebo clean" in table["verdict"]
    files = hfr.write_calibration({**table, "bench": "full"}, tmp_path)
    assert [f.name for f in files] == ["calibration.md", "calibration.json"]
    text = files[0].read_text()
    assert "| good | test | - | 8/8 | 0.350 | 0.650 | 0.500 | 0.600 | +0.300 [" in text
    assert "| half | test | - | 1/8 | 0.300 | - | - | - | - | - | - | - | 1/1 | not yet measured (1/8 runs) |" in text
    header, rule = text.split("\n| setting |")[1].split("\n")[:2]
    assert ("| setting |" + header).count("|") == rule.count("|") == 15  # 14 columns, one rule cell each
    assert json.loads(files[1].read_text())["settings"][0]["name"] == "base"


def test_a_placebo_with_a_gap_is_not_clean_and_the_verdict_names_the_closest():
    entries = [(_info("base"), _pass_setting()), (_info("placebo"), _placebo_setting(shift=0.25))]
    table = hfr.build_calibration(entries, n_boot=500)
    assert table["placebo"]["clean"] is False and "NOT clean" in table["placebo"]["text"]
    assert table["settings"][1]["gaps"]["backbone"]["estimate"] == pytest.approx(0.25)  # +0.45 / +0.05 per case
    assert table["settings"][1]["gaps"]["backbone"]["ci"][0] >= 0.05 - 1e-9
    assert table["verdict"].startswith("No setting passes both oracle gaps yet; the closest is base")
    assert hfr.build_calibration([], n_boot=10)["verdict"].startswith("Positive control: not yet measured")


# ---------------------------------------------------------------------------------------------------------------
# the search loop with a fake training: --max-runs, --settings, --commit, --dry-run
# ---------------------------------------------------------------------------------------------------------------
class FakeExecute:
    """Stands in for ``runcache.execute``: writes a run's evaluation (with a column the bench drops) and log."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, spec: runcache.RunSpec, data: Path, work: Path) -> dict[str, float]:
        self.calls.append(spec.name)
        shutil.rmtree(work, ignore_errors=True)
        (work / "fairness").mkdir(parents=True)
        oracle = spec.variant.startswith("oracle")
        with (work / "fairness" / "per_case.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "stage", "institution", "subtype", "dice", "hd95_px", "hard"])
            for cid, stage, sub in CASES:
                dice = 0.9 if sub == "majority" else (0.7 if oracle else 0.3)
                writer.writerow([cid, stage, "A", sub, dice, 2.0, "false"])
        (work / "fairness" / "metrics.json").write_text("{}\n")
        lines = [f"INFO Epoch[{e}] Metrics -- val_mean_dice: {0.9:.4f}" for e in range(1, 5)]
        (work / "run.log").write_text("\n".join(lines) + "\n")
        return {"train_s": 1.0, "evaluate_s": 0.5}


@pytest.fixture
def fake(monkeypatch):
    execute = FakeExecute()
    monkeypatch.setattr(runcache, "execute", execute)
    monkeypatch.setattr(runcache, "ensure_cohort", lambda cohort, root: root / runcache.cohort_name(cohort))
    monkeypatch.setattr(runcache, "git_commit", lambda: "abc1234")
    return execute


def test_search_max_runs_and_settings(fake, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--no-nice", "--out", str(out), "--work", str(work), "--settings", "placebo"]
    assert hf.main([*common, "--max-runs", "3"]) == 0
    assert fake.calls == ["erm_ring_l0_s0", "oracle_ring_l0_s0", "dmoe_ring_l0_s0"]
    run_dir = out / "placebo" / "erm_ring_l0_s0"
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "per_case.csv", "run.json", "train_log.json"]
    assert run_dir.joinpath("per_case.csv").read_text().splitlines()[0] == ",".join(hf.PER_CASE_COLUMNS)
    table = json.loads((out / "calibration.json").read_text())
    assert [s["name"] for s in table["settings"]] == ORDER  # every planned setting is listed
    assert table["runs_done"] == 3 and table["runs_planned"] == 56
    fake.calls.clear()
    assert hf.main(common) == 0  # resumes: the other 5 placebo runs, nothing else
    assert fake.calls == ["oracle_dmoe_ring_l0_s0", "erm_ring_l0_s1", "oracle_ring_l0_s1", "dmoe_ring_l0_s1",
                          "oracle_dmoe_ring_l0_s1"]  # fmt: skip
    placebo = json.loads((out / "calibration.json").read_text())["settings"][1]
    assert placebo["gaps"]["backbone"]["estimate"] == pytest.approx(0.4) and placebo["done"] == 8
    assert "placebo NOT clean" in (out / "calibration.md").read_text()
    fake.calls.clear()
    assert hf.main(common) == 0 and fake.calls == []  # all cached


def test_commit_commits_only_the_run_and_the_table(fake, tmp_path, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "other.txt").write_text("someone else's work\n")
    git("add", "other.txt")
    out = tmp_path / "res"
    argv = ["--no-nice", "--commit", "--out", str(out), "--work", str(tmp_path / "work"), "--max-runs", "1"]
    assert hf.main(argv) == 0
    assert sorted(git("show", "--name-only", "--format=", "HEAD").split()) == [
        "res/base/erm_ring_l3_s0/metrics.json", "res/base/erm_ring_l3_s0/per_case.csv",
        "res/base/erm_ring_l3_s0/run.json", "res/base/erm_ring_l3_s0/train_log.json",
        "res/calibration.json", "res/calibration.md",
    ]  # fmt: skip
    assert git("log", "--format=%s").strip() == "hidden failures: base/erm_ring_l3_s0"
    assert git("diff", "--cached", "--name-only").split() == ["other.txt"]


def test_commit_waits_for_another_git_process(tmp_path, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.txt").write_text("a\n")
    lock = tmp_path / ".git" / "index.lock"
    lock.write_text("")
    threading.Timer(1.0, lock.unlink).start()  # another git process lets go of the index after 1 s
    assert fa.git_commit_paths([tmp_path / "a.txt"], "hidden failures: x", repo=tmp_path, attempts=10)


def test_dry_run_output(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert hf.main(["--dry-run", "--out", str(out), "--work", str(work)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if not line.startswith("    ")]
    assert [line.split()[0] for line in lines[:-1]] == ORDER
    assert lines[1].split()[:6] == ["placebo", "difficulty", "difficulty", "0", "0/8", "cached,"]
    assert "8 to run (~20 min)" in lines[2]  # early stop: 8 x 2.5 min
    assert lines[-1] == "0 of 56 runs cached, 56 to run (about 236 min, 3.9 h on the quiet 2-core CPU)."
    assert "    erm_ring_l3_s0               run" in text
    assert not out.exists()  # a dry run writes nothing
    # one finished run with the current key counts as cached
    spec = hf.plan()[0].specs[0]
    run_dir = out / "base" / spec.name
    run_dir.mkdir(parents=True)
    for name in ("per_case.csv", "metrics.json"):
        (run_dir / name).write_text("")
    (run_dir / "run.json").write_text(json.dumps({"key": runcache.run_key(spec)}))
    assert hf.main(["--dry-run", "--out", str(out), "--work", str(work)]) == 0
    text = capsys.readouterr().out
    assert "1 of 56 runs cached, 55 to run (about 232 min" in text and f"    {spec.name:<28} cached" in text


def test_bad_arguments_are_refused(capsys):
    for argv, message in ((["--settings", "nope"], "unknown setting"), (["--max-runs", "0"], "--max-runs must"),
                          (["--threads", "0"], "--threads must")):  # fmt: skip
        with pytest.raises(SystemExit):
            hf.main(["--dry-run", *argv])
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the smoke bench, trained for real
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_bench_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: no oversubscription on a shared CPU

    def bench(*extra: str) -> str:
        cmd = [sys.executable, str(BENCH / "hidden_failures.py"), "--bench", "smoke", "--work", str(tmp_path), *extra]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    log = bench("--max-runs", "1")
    out = tmp_path / "smoke_results"
    assert "smoke/dmoe_ring_l3_s0: ran" in log and "smoke/oracle_dmoe_ring_l3_s0" not in log
    assert json.loads((out / "calibration.json").read_text())["runs_done"] == 1
    log = bench()
    assert "smoke/dmoe_ring_l3_s0: cached" in log and "smoke/oracle_dmoe_ring_l3_s0: ran" in log
    run_dir = out / "smoke" / "oracle_dmoe_ring_l3_s0"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["cohort"]["spatial_dims"] == 2 and meta["overrides"]["key_metric"] == "val_worst_group_dice"
    assert meta["omp_num_threads"] == "1" and meta["key"] == runcache.run_key(hf.smoke_setting().specs[1])
    with (run_dir / "per_case.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(hf.PER_CASE_COLUMNS) and len(rows) == 15  # 60 images, a quarter for testing
    assert sorted(json.loads((run_dir / "train_log.json").read_text())["val_mean_dice"]) == ["1", "2"]
    table = json.loads((out / "calibration.json").read_text())
    assert table["runs_done"] == 2 and table["settings"][0]["gaps"]["dmoe"]["estimate"] is not None
    assert "| smoke | smoke | - | 2/2 |" in (out / "calibration.md").read_text()
    assert not (REPO / "bench" / "results" / "hidden_failures" / "smoke").exists()  # never the committed folder
    assert ": ran (" not in bench() and (out / "calibration.md").is_file()  # a third call trains nothing


def test_train_log_keeps_the_diagnostic_curves():
    log = "\n".join(
        [
            "INFO Epoch[1] Metrics -- cvar_precision_T1: 0.2500 cvar_base_rate_T1: 0.0500 dro_ess_frac: 1.0000",
            "INFO Epoch[1] Metrics -- val_mean_dice: 0.5000",
            "INFO Epoch[2] Metrics -- cvar_precision_T1: 0.5000 cvar_base_rate_T1: 0.0500 dro_ess_frac: 0.5000",
        ]
    )
    curves = runcache.parse_train_log(log)["curves"]
    assert curves["cvar_precision_T1"] == {1: 0.25, 2: 0.5}
    assert curves["cvar_base_rate_T1"] == {1: 0.05, 2: 0.05}
    assert curves["dro_ess_frac"] == {1: 1.0, 2: 0.5}
