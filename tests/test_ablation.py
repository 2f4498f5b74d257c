"""The fairness ablation (bench/fairness_ablation.py, bench/ablation_stats.py): caching and statistics, no training.

``runcache.execute`` is replaced by a fake that writes what a real run leaves in its work folder
(``fairness/per_case.csv``, ``fairness/metrics.json``, ``run.log``) and counts its calls; ``runcache.ensure_cohort``
by one that generates nothing.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import ablation_stats as st  # noqa: E402
import fairness_ablation as fa  # noqa: E402
import retrain_check  # noqa: E402
import runcache  # noqa: E402
from scripts.fairness_metrics import compute_group_metrics, minority_metrics  # noqa: E402
from scripts.fairness_stats import wilcoxon_signed_rank  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# the run cache through fairness_ablation.main, with a fake training
# ---------------------------------------------------------------------------------------------------------------
CASES = [("c0", "T1", "necrotic"), ("c1", "T1", "majority"), ("c2", "T1", "majority"), ("c3", "T2", "necrotic"),
         ("c4", "T2", "majority"), ("c5", "T2", "majority")]  # fmt: skip
BASE = {"erm": 0.80, "fairdro": 0.78, "oracle": 0.82}


def fake_rows(spec: runcache.RunSpec) -> list[dict]:
    rows = []
    for i, (cid, stage, subtype) in enumerate(CASES):
        dice = BASE.get(spec.variant, 0.7) + 0.01 * spec.seed + 0.005 * i
        if subtype != "majority":
            dice -= {"erm": 0.40, "fairdro": 0.15, "oracle": 0.05}.get(spec.variant, 0.3)
        rows.append({"id": cid, "stage": stage, "institution": "A", "subtype": subtype, "dice": round(dice, 4)})
    return rows


class FakeExecute:
    """Stands in for ``runcache.execute``: writes a run's evaluation and log into ``work``; counts calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, spec: runcache.RunSpec, data: Path, work: Path) -> dict[str, float]:
        self.calls.append(spec.name)
        shutil.rmtree(work, ignore_errors=True)
        (work / "fairness").mkdir(parents=True)
        rows = fake_rows(spec)
        with (work / "fairness" / "per_case.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        metrics = {
            "settings": {"threshold": 0.5},
            "groupings": {
                "stage": {"dice": compute_group_metrics(rows, "stage"), "minority": minority_metrics(rows, "stage")}
            },
        }
        (work / "fairness" / "metrics.json").write_text(json.dumps(metrics, default=float))
        (work / "run.log").write_text(
            "INFO Epoch[1] Metrics -- val_mean_dice: 0.5000 dro_ess_frac: 0.9000\n"
            "INFO Epoch[2] Metrics -- val_mean_dice: 0.6000 dro_ess_frac: 0.7500\n"
        )
        return {"train_s": 1.0, "evaluate_s": 0.5}


def tiny_tables(fairdro_epochs: int = 2) -> list[fa.Table]:
    cohort = dict(fa.SMOKE_COHORT)
    specs = tuple(
        runcache.RunSpec(v, 0, cohort, {**fa.SMOKE_RECIPE, "epochs": fairdro_epochs if v == "fairdro" else 2})
        for v in ("erm", "fairdro", "oracle")
    )
    return [fa.Table("main", "main", cohort, specs)]


@pytest.fixture
def bench(monkeypatch, tmp_path):
    fake = FakeExecute()
    monkeypatch.setattr(runcache, "execute", fake)
    monkeypatch.setattr(runcache, "ensure_cohort", lambda cohort, root: root / runcache.cohort_name(cohort))
    monkeypatch.setattr(runcache, "git_commit", lambda: "abc1234")
    monkeypatch.setattr(fa, "plan_tables", lambda bench="full": tiny_tables())
    work = tmp_path / "work"

    def run(*extra: str) -> list[str]:
        fake.calls.clear()
        assert fa.main(["--bench", "smoke", "--work", str(work), *extra]) == 0
        return sorted(fake.calls)

    run.work = work
    run.out = work / "smoke_results"  # the smoke bench's default output, not the committed folder
    return run


ALL_VARIANTS = ("erm", "fairdro", "oracle")
ALL = ["erm_necrotic_l2_s0", "fairdro_necrotic_l2_s0", "oracle_necrotic_l2_s0"]


def test_cache_first_run_then_none_then_bench_version(bench, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bench() == ALL  # (a) a first run executes all three
    for name in ALL:
        assert sorted(p.name for p in (bench.out / name).iterdir()) == [
            "metrics.json", "per_case.csv", "run.json", "train_log.json"
        ]  # fmt: skip
        assert json.loads((bench.out / name / "run.json").read_text())["omp_num_threads"] == "1"
    assert bench() == []  # (b) nothing changed: nothing runs
    monkeypatch.setattr(runcache, "BENCH_VERSION", runcache.BENCH_VERSION + 1)
    assert bench() == ALL  # (c) a new bench version reruns every run
    assert bench() == []


def test_cache_reruns_only_changed_runs(bench, monkeypatch, tmp_path):
    assert bench() == ALL
    # (d) one run's overrides change: only that run
    monkeypatch.setattr(fa, "plan_tables", lambda bench="full": tiny_tables(fairdro_epochs=3))
    assert bench() == ["fairdro_necrotic_l2_s0"]
    assert bench() == []
    # a copy of the configs elsewhere changes nothing; editing one variant's overlay reruns only its runs
    configs = tmp_path / "configs"
    shutil.copytree(runcache.CONFIGS, configs)
    monkeypatch.setattr(runcache, "CONFIGS", configs)
    assert bench() == []
    overlay = configs / "variants" / "erm.json"
    overlay.write_text(json.dumps({**json.loads(overlay.read_text()), "use_dmoe": True}, indent=4))
    assert bench() == ["erm_necrotic_l2_s0"]
    assert bench() == []


def test_report_dry_run_and_report_only(bench, capsys):
    bench()
    report = json.loads((bench.out / "report.json").read_text())
    cells = report["tables"]["main"]["cells"]
    assert {v: (c["done"], c["planned"]) for v, c in cells.items()} == dict.fromkeys(ALL_VARIANTS, (1, 1))
    assert set(report["tables"]["main"]["comparisons"]) == {"erm", "oracle"}
    assert report["meta"]["commits"] == {"abc1234": 3}
    assert cells["fairdro"]["summary"]["ess_frac"]["mean"] == pytest.approx(0.75)
    assert "strongest non-oracle baseline by worst-group Dice is erm" in report["verdict"]
    md = (bench.out / "report.md").read_text()
    assert "| fairdro | 1/1 |" in md and "abc1234" in md and "dose_response.png" in md
    assert (bench.out / "dose_response.png").stat().st_size > 1000

    (bench.out / "report.md").unlink()
    assert bench("--report-only") == []
    assert (bench.out / "report.md").read_text() == md
    capsys.readouterr()
    assert bench("--dry-run") == []
    assert "3 of 3 runs cached, 0 to run" in capsys.readouterr().out


def test_full_plan_matches_the_design():
    tables = {t.name: t for t in fa.plan_tables("full")}
    specs = fa.plan("full")
    assert len({s.name for s in specs}) == len(specs) == 28 + 12 + 6
    assert list(tables)[0] == "main" and specs[: len(tables["main"].specs)] == list(tables["main"].specs)
    main = tables["main"]
    seeds = {v: sorted(s.seed for s in main.specs if s.variant == v) for v in main.variants()}
    assert seeds["erm"] == seeds["fairdro"] == [0, 1, 2, 3, 4]
    assert all(seeds[v] == [0, 1, 2] for v in ("groupdro", "erm_cvar", "dmoe", "fairdro_empirical",
                                               "fairdro_groupdro", "oracle"))  # fmt: skip
    default = fa.DEFAULT_DIFFICULTY["necrotic"]
    assert main.cohort == {**fa.COHORT, "minority": "necrotic", "difficulty": default}
    dose = [t for t in tables.values() if t.section == "dose_response"]
    assert len(dose) == 2 and dose[0].level == 0 and abs(dose[1].level - default) == 1
    assert tables["carry_over"].cohort["minority"] == "distractor"
    for t in [*dose, tables["carry_over"]]:
        assert sorted((s.variant, s.seed) for s in t.specs) == [(v, s) for v in ALL_VARIANTS for s in (0, 1)]
    assert all(s.overrides == fa.RECIPE and s.cohort["n_cases"] == 800 for s in specs)
    smoke = fa.plan("smoke")
    assert [s.variant for s in smoke] == ["erm", "fairdro", "oracle"] and smoke[0].cohort == fa.SMOKE_COHORT


def test_git_commit_paths_commits_only_its_paths(tmp_path, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "other.txt").write_text("someone else's work\n")
    git("add", "other.txt")  # staged by someone else: must stay out of the ablation commit
    run_dir = tmp_path / "res" / "erm_necrotic_l2_s0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}\n")
    (tmp_path / "res" / "report.md").write_text("# r\n")
    assert fa.git_commit_paths([run_dir, tmp_path / "res" / "report.md"], "ablation: x", repo=tmp_path)
    assert sorted(git("show", "--name-only", "--format=", "HEAD").split()) == [
        "res/erm_necrotic_l2_s0/run.json", "res/report.md"
    ]  # fmt: skip
    assert git("diff", "--cached", "--name-only").split() == ["other.txt"]
    assert git("log", "--format=%s").strip() == "ablation: x"


# ---------------------------------------------------------------------------------------------------------------
# statistics, by hand
# ---------------------------------------------------------------------------------------------------------------
def test_mean_std():
    r = st.mean_std([0.5, 0.7, 0.9])
    assert r["mean"] == pytest.approx(0.7) and r["std"] == pytest.approx(0.2) and r["n"] == 3  # sqrt(0.08 / 2)
    assert st.mean_std([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
    assert st.mean_std([None, 0.4, float("nan")]) == {"mean": 0.4, "std": 0.0, "n": 1}
    assert st.mean_std([]) == {"mean": None, "std": None, "n": 0}


METRICS = {
    "groupings": {
        "stage": {
            "dice": {"dice_all": 0.8, "worst_group_dice": 0.7, "es_dice": 0.75, "worst_group_cvar": 0.5},
            "minority": {
                "groups": {
                    "T2": {"minority_dice": None, "minority_failure_rate": None, "n_minority": 0},
                    "T1": {"minority_dice": 0.4, "minority_failure_rate": 0.5, "n_minority": 2},
                },
                "overall": {"minority_dice": 0.45, "minority_failure_rate": 0.25},
                "worst_group_minority_dice": 0.4,
            },
        }
    }
}


def test_run_summary():
    s = st.run_summary(METRICS, {"last_dro": {"dro_ess_frac": 0.6, "dro_lam": 1.0}})
    assert {k: s[k] for k in st.RUN_METRICS} == {
        "mean_dice": 0.8, "worst_group_dice": 0.7, "es_dice": 0.75, "worst_group_cvar": 0.5, "minority_dice": 0.45,
        "minority_failure_rate": 0.25, "worst_group_minority_dice": 0.4,
    }  # fmt: skip
    assert s["ess_frac"] == 0.6
    assert list(s["per_group"]) == ["T1", "T2"]
    assert s["per_group"]["T1"] == {"minority_dice": 0.4, "minority_failure_rate": 0.5, "n_minority": 2}
    assert s["per_group"]["T2"]["minority_dice"] is None
    empty = st.run_summary({}, None)
    assert empty["ess_frac"] is None and empty["mean_dice"] is None and empty["per_group"] == {}


def test_aggregate_runs():
    a = st.run_summary(METRICS, {"last_dro": {"dro_ess_frac": 0.6}})
    b = st.run_summary(METRICS, {"last_dro": {"dro_ess_frac": 0.8}})
    b["per_group"]["T1"]["minority_dice"] = 0.6
    agg = st.aggregate_runs([a, b])
    assert agg["ess_frac"]["mean"] == pytest.approx(0.7) and agg["ess_frac"]["std"] == pytest.approx(math.sqrt(0.02))
    assert agg["mean_dice"] == {"mean": 0.8, "std": 0.0, "n": 2}
    assert agg["per_group"]["T1"]["minority_dice"]["mean"] == pytest.approx(0.5)
    assert agg["per_group"]["T2"]["minority_dice"]["n"] == 0


def _rows(dice: dict[str, float]) -> list[dict]:
    meta = {"a": ("T1", "necrotic"), "b": ("T1", "majority"), "c": ("T2", "necrotic")}
    return [{"id": i, "stage": meta[i][0], "subtype": meta[i][1], "dice": d} for i, d in dice.items()]


def test_seed_average():
    avg = st.seed_average([_rows({"a": 0.5, "b": 0.8, "c": 0.6}), _rows({"c": 0.8, "a": 0.7, "b": 0.8})])
    assert avg["ids"] == ["a", "b", "c"] and avg["group"] == ["T1", "T1", "T2"]
    assert avg["minority"] == [True, False, True] and avg["n_runs"] == 2
    assert avg["dice"] == pytest.approx([0.6, 0.8, 0.7])
    with pytest.raises(ValueError, match="other cases"):
        st.seed_average([_rows({"a": 0.5, "b": 0.8}), _rows({"a": 0.5, "c": 0.8})])


def test_stratified_indices_stay_in_their_group():
    idx = st.stratified_indices(["T1", "T1", "T2"], n_boot=500, seed=0)
    assert idx.shape == (500, 3)
    assert set(idx[:, :2].ravel()) == {0, 1} and set(idx[:, 2]) == {2}
    assert np.array_equal(idx, st.stratified_indices(["T1", "T1", "T2"], n_boot=500, seed=0))


def test_paired_comparison_by_hand():
    # 3 cases in 2 stage groups: a (T1, minority), b (T1, majority), c (T2, minority)
    ours = st.seed_average([_rows({"a": 0.6, "b": 0.8, "c": 0.7})])
    other = st.seed_average([_rows({"a": 0.2, "b": 0.9, "c": 0.8})])
    r = st.paired_comparison(ours, other, n_boot=2000, seed=0)
    assert (r["n_cases"], r["n_minority"]) == (3, 2)
    assert r["mean_difference"] == pytest.approx((0.4 - 0.1 - 0.1) / 3)
    # worst group: ours min(0.7, 0.7) = 0.7, other min(0.55, 0.8) = 0.55
    assert r["worst_group_dice"]["estimate"] == pytest.approx(0.15)
    # minority: ours (0.6 + 0.7) / 2, other (0.2 + 0.8) / 2
    assert r["minority_dice"]["estimate"] == pytest.approx(0.15)
    # T2 has one case (fixed); T1 draws aa, ab, ba, bb. Worst-group difference: aa min(.6,.7)-min(.2,.8) = 0.4,
    # ab/ba 0.7-0.55 = 0.15, bb min(.8,.7)-min(.9,.8) = -0.1: each end holds ~25% of the draws
    assert r["worst_group_dice"]["ci"] == pytest.approx([-0.1, 0.4])
    # minority difference: aa (.6+.6+.7)/3-(.2+.2+.8)/3 = 0.7/3, ab/ba 0.15, bb (only c) 0.7-0.8 = -0.1
    assert r["minority_dice"]["ci"] == pytest.approx([-0.1, 0.7 / 3])
    w = r["wilcoxon"]  # differences +0.4, -0.1, -0.1: ranks 3, 1.5, 1.5 -> W+ = W- = 3
    assert w["statistic"] == pytest.approx(3.0) and w["n_nonzero"] == 3
    assert w == wilcoxon_signed_rank([0.2, 0.9, 0.8], [0.6, 0.8, 0.7])
    same = st.paired_comparison(ours, ours)
    assert same["worst_group_dice"] == {"estimate": 0.0, "ci": [0.0, 0.0]} and same["wilcoxon"]["p_value"] == 1.0


def test_seed_case_bootstrap_with_one_seed_equals_the_case_bootstrap():
    ours = st.seed_average([_rows({"a": 0.6, "b": 0.8, "c": 0.7})])
    other = st.seed_average([_rows({"a": 0.2, "b": 0.9, "c": 0.8})])
    two = st.seed_case_bootstrap(ours, other, n_boot=2000, seed=0)
    assert two["worst_group_dice"]["ci"] == pytest.approx([-0.1, 0.4])  # the hand values of the test above
    assert two["minority_dice"]["ci"] == pytest.approx([-0.1, 0.7 / 3])


def test_seed_case_bootstrap_sees_the_seed_spread():
    # every case of a seed has the same Dice: FairDRO seeds 0.6 and 0.8, the other variant one seed at 0.7. The
    # seed averages tie (case bootstrap [0, 0]); resampling FairDRO's two seeds gives 0.6, 0.7 (twice) or 0.8, a
    # difference of -0.1, 0 or +0.1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [-0.1, +0.1]
    ours = st.seed_average([_rows({"a": 0.6, "b": 0.6, "c": 0.6}), _rows({"a": 0.8, "b": 0.8, "c": 0.8})])
    other = st.seed_average([_rows({"a": 0.7, "b": 0.7, "c": 0.7})])
    assert st.paired_comparison(ours, other)["worst_group_dice"]["ci"] == pytest.approx([0.0, 0.0])
    two = st.seed_case_bootstrap(ours, other, n_boot=2000, seed=0)
    assert two["worst_group_dice"]["ci"] == pytest.approx([-0.1, 0.1])
    assert two["minority_dice"]["ci"] == pytest.approx([-0.1, 0.1])
    with pytest.raises(ValueError, match="do not pair"):
        st.seed_case_bootstrap(ours, st.seed_average([[{"id": "z", "stage": "T1", "subtype": "x", "dice": 1.0}]]))


def _report(wgd: dict[str, float], done: dict[str, int] | None = None, comparisons: dict | None = None) -> dict:
    done = done or {}
    cells = {
        v: {"planned": 3, "done": done.get(v, 3), "summary": {"worst_group_dice": {"mean": x, "std": 0.0, "n": 3}}}
        for v, x in wgd.items()
    }
    return {"tables": {"main": {"cells": cells, "comparisons": comparisons or {}}}}


def test_verdict():
    wgd = {"erm": 0.55, "groupdro": 0.60, "fairdro": 0.70, "fairdro_groupdro": 0.95, "oracle": 0.90}
    comps = {
        "groupdro": {
            "n_cases": 480, "n_minority": 72,
            "worst_group_dice": {"estimate": 0.1, "ci": [0.02, 0.2]},
            "minority_dice": {"estimate": -0.01, "ci": [-0.05, 0.03]},
        }
    }  # fmt: skip
    text = st.verdict(_report(wgd, comparisons=comps))
    assert text.startswith("Verdict: the strongest non-oracle baseline by worst-group Dice is groupdro (0.600")
    assert "On worst-group Dice FairDRO beats it: +0.100 (95% bootstrap interval [+0.020, +0.200], excludes 0)" in text
    assert "on minority Dice FairDRO is behind it but not significantly: -0.010" in text
    assert "[-0.050, +0.030], includes 0" in text

    worse = {"groupdro": {**comps["groupdro"], "worst_group_dice": {"estimate": -0.1, "ci": [-0.2, -0.05]}}}
    assert "FairDRO is worse than it: -0.100" in st.verdict(_report(wgd, comparisons=worse))
    assert st.verdict(_report(wgd, done={"erm": 1}, comparisons=comps)).startswith("Provisional verdict (2 planned")
    assert "not yet measured" in st.verdict(_report(wgd, done={"fairdro": 0}))
    assert "not yet measured" in st.verdict(_report(wgd, done={"erm": 0, "groupdro": 0}))
    assert "not yet measured" in st.verdict({"tables": {}})
    assert "paired comparison is not yet measured" in st.verdict(_report(wgd))
    seeds = {"worst_group_dice": {"ci": [-0.01, 0.2]}, "minority_dice": {"ci": [-0.09, -0.01]}}
    text = st.verdict(_report(wgd, comparisons={"groupdro": {**comps["groupdro"], "seed_and_case": seeds}}))
    assert text.endswith(
        "Resampling the seeds as well as the cases (two-level bootstrap), the 95% intervals are [-0.010, +0.200], "
        "includes 0 on worst-group Dice and [-0.090, -0.010], excludes 0 on minority Dice."
    )


@pytest.mark.parametrize("default, expected", [(1, [0, 2]), (2, [0, 3]), (3, [0, 2])])
def test_dose_response_levels_step_away_from_the_default(monkeypatch, default, expected):
    monkeypatch.setitem(fa.DEFAULT_DIFFICULTY, "necrotic", default)
    levels = [t.level for t in fa.plan_tables("full") if t.section == "dose_response"]
    assert levels == expected  # one level harder, or one easier from the hardest level (3)


def test_run_adopts_an_identical_finished_run_from_another_benchmark(monkeypatch, tmp_path):
    fake = FakeExecute()
    monkeypatch.setattr(runcache, "execute", fake)
    monkeypatch.setattr(runcache, "ensure_cohort", lambda cohort, root: root / "c")
    monkeypatch.setattr(runcache, "git_commit", lambda: "abc1234")
    spec = tiny_tables()[0].specs[0]
    calib, out = tmp_path / "calibration", tmp_path / "ablation"
    runcache.run(spec, calib, tmp_path / "data", tmp_path / "w1")
    assert len(fake.calls) == 1
    run_dir, ran = runcache.run(spec, out, tmp_path / "data", tmp_path / "w2", sources=[calib])
    assert not ran and len(fake.calls) == 1  # copied, not trained
    for name in ("run.json", "per_case.csv", "metrics.json", "train_log.json"):
        assert (run_dir / name).read_bytes() == (calib / spec.name / name).read_bytes()
    other = runcache.RunSpec(spec.variant, spec.seed, spec.cohort, {**spec.overrides, "epochs": 3})
    _, ran = runcache.run(other, out, tmp_path / "data", tmp_path / "w3", sources=[calib])
    assert ran and len(fake.calls) == 2  # another key: trained


def test_parse_train_log_keeps_the_per_epoch_curves():
    log = (
        "INFO Epoch[1] Metrics -- val_mean_dice: 0.5000 val_worst_group_dice: 0.4000\n"
        "INFO Epoch[1] Metrics -- dro_ess_frac: 1.0000 dro_lam: 0.0000\n"
        "INFO Epoch[2] Metrics -- val_mean_dice: 0.6000 val_worst_group_dice: 0.3500\n"
        "INFO Epoch[2] Metrics -- dro_ess_frac: 0.5000 dro_lam: 0.2500\n"
    )
    parsed = runcache.parse_train_log(log)
    assert parsed["val_mean_dice"] == {1: 0.5, 2: 0.6}
    assert parsed["curves"] == {
        "val_worst_group_dice": {1: 0.4, 2: 0.35}, "dro_ess_frac": {1: 1.0, 2: 0.5}, "dro_lam": {1: 0.0, 2: 0.25}
    }  # fmt: skip
    assert parsed["last_dro"] == {"dro_ess_frac": 0.5, "dro_lam": 0.25}


def test_variants_option_runs_only_those(bench):
    assert bench("--variants", "erm", "oracle") == ["erm_necrotic_l2_s0", "oracle_necrotic_l2_s0"]
    assert bench() == ["fairdro_necrotic_l2_s0"]  # the rest of the plan, later


def test_an_evaluation_change_reevaluates_without_training(monkeypatch, tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(runcache.CONFIGS, configs)
    monkeypatch.setattr(runcache, "CONFIGS", configs)
    fake, evaluated = FakeExecute(), []
    monkeypatch.setattr(runcache, "execute", fake)

    def reevaluate(spec, data, work):
        evaluated.append(spec.name)
        (work / "fairness").mkdir(parents=True, exist_ok=True)
        for name in ("per_case.csv", "metrics.json"):
            (work / "fairness" / name).write_text(f"re-evaluated {len(evaluated)}\n")
        return 0.5

    monkeypatch.setattr(runcache, "reevaluate", reevaluate)
    monkeypatch.setattr(runcache, "ensure_cohort", lambda cohort, root: root / "c")
    monkeypatch.setattr(runcache, "git_commit", lambda: "abc1234")
    spec, out, work = tiny_tables()[0].specs[0], tmp_path / "out", tmp_path / "work"
    runcache.run(spec, out, tmp_path / "data", work)
    (work / spec.name / "models").mkdir()
    (work / spec.name / "models" / "model.pt").write_bytes(b"weights")
    first = json.loads((out / spec.name / "run.json").read_text())

    def edit(name: str, key: str, value) -> None:
        config = json.loads((configs / name).read_text())
        config[key] = value
        (configs / name).write_text(json.dumps(config))

    edit("evaluate.json", "failure_threshold", 0.6)  # the evaluation only: re-evaluated, not trained
    _, ran = runcache.run(spec, out, tmp_path / "data", work)
    meta = json.loads((out / spec.name / "run.json").read_text())
    assert ran and fake.calls == [spec.name] and evaluated == [spec.name]
    assert meta["train_key"] == first["train_key"] and meta["key"] != first["key"]
    assert meta["train_commit"] == "abc1234" and meta["train_s"] == first["train_s"]
    assert (out / spec.name / "per_case.csv").read_text() == "re-evaluated 1\n"
    other = tmp_path / "ablation"  # another benchmark with this folder as a source: the same weights, re-evaluated
    edit("evaluate.json", "failure_threshold", 0.7)
    _, ran = runcache.run(spec, other, tmp_path / "data", tmp_path / "work2", sources=[out])
    assert ran and fake.calls == [spec.name] and evaluated == [spec.name] * 2
    assert (tmp_path / "work2" / spec.name / "models" / "model.pt").read_bytes() == b"weights"
    assert (other / spec.name / "train_log.json").read_bytes() == (out / spec.name / "train_log.json").read_bytes()
    edit("train.json", "learning_rate", 0.001)  # the training: trained again
    runcache.run(spec, out, tmp_path / "data", work)
    assert fake.calls == [spec.name, spec.name] and evaluated == [spec.name] * 2


def test_a_run_without_a_training_key_gets_one_while_its_key_holds(monkeypatch, tmp_path):
    monkeypatch.setattr(runcache, "execute", FakeExecute())
    monkeypatch.setattr(runcache, "ensure_cohort", lambda cohort, root: root / "c")
    spec, out = tiny_tables()[0].specs[0], tmp_path / "out"
    runcache.run(spec, out, tmp_path / "data", tmp_path / "work")
    meta = json.loads((out / spec.name / "run.json").read_text())
    train_key = meta.pop("train_key")
    (out / spec.name / "run.json").write_text(json.dumps(meta))  # a run from before training keys
    _, ran = runcache.run(spec, out, tmp_path / "data", tmp_path / "work")
    assert not ran and json.loads((out / spec.name / "run.json").read_text())["train_key"] == train_key


def test_dry_run_says_which_runs_would_be_copied_or_re_evaluated(monkeypatch, tmp_path, capsys):
    configs = tmp_path / "configs"
    shutil.copytree(runcache.CONFIGS, configs)
    monkeypatch.setattr(runcache, "CONFIGS", configs)
    monkeypatch.setattr(runcache, "execute", FakeExecute())
    monkeypatch.setattr(runcache, "ensure_cohort", lambda cohort, root: root / "c")
    spec, calib, out, work = tiny_tables()[0].specs[0], tmp_path / "calib", tmp_path / "out", tmp_path / "work"
    runcache.run(spec, calib, tmp_path / "data", work / "runs")
    assert runcache.decide(spec, out, work / "runs", [calib])[0] == "copy"
    assert runcache.decide(spec, out, work / "runs", [])[0] == "run"
    config = json.loads((configs / "evaluate.json").read_text())
    (configs / "evaluate.json").write_text(json.dumps({**config, "failure_threshold": 0.6}))
    assert runcache.decide(spec, out, work / "runs", [calib])[0] == "run"  # same training, but no weights on disk
    (work / "runs" / spec.name / "models").mkdir(parents=True)
    (work / "runs" / spec.name / "models" / "model.pt").write_bytes(b"w")
    assert runcache.decide(spec, out, work / "runs", [calib])[0] == "re-evaluate"
    fa.dry_run([fa.Table("main", "main", spec.cohort, (spec,))], out, [calib], work)
    assert "0 of 1 runs cached, 0 to run (about 0.0 h), 1 re-evaluate." in capsys.readouterr().out


def test_git_tracked(tmp_path, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    run_dir = tmp_path / "res" / "erm_necrotic_l3_s0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}\n")
    assert not fa.git_tracked(run_dir, tmp_path)  # a copied run, not committed yet
    assert fa.git_commit_paths([run_dir], "ablation: copy", repo=tmp_path)
    assert fa.git_tracked(run_dir, tmp_path)
    (run_dir / "run.json").write_text('{"key": 1}\n')
    assert not fa.git_tracked(run_dir, tmp_path)  # re-evaluated in place


def test_record_run_rewrites_and_commits_only_new_runs(tmp_path, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    run_dir, table = tmp_path / "res" / "erm_s0", tmp_path / "res" / "table.md"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}\n")
    writes: list[int] = []

    def write() -> list[Path]:
        writes.append(1)
        table.write_text(f"# {len(writes)}\n")
        return [table]

    fa.record_run(run_dir, False, write, "bench: copy", None)  # a cached run, nothing to commit to: no rewrite
    assert writes == [] and not table.exists()
    fa.record_run(run_dir, False, write, "bench: copy", tmp_path)  # a copy git does not track yet: rewrite, commit
    assert writes == [1] and fa.git_tracked(run_dir, tmp_path) and fa.git_tracked(table, tmp_path)
    fa.record_run(run_dir, False, write, "bench: again", tmp_path)  # cached and committed: nothing
    assert writes == [1]
    fa.record_run(run_dir, True, write, "bench: trained", tmp_path)  # trained: always
    assert writes == [1, 1] and table.read_text() == "# 2\n"
    log = subprocess.run(["git", "log", "--format=%s"], cwd=tmp_path, capture_output=True, text=True).stdout.split("\n")
    assert log[:2] == ["bench: trained", "bench: copy"]


def _write_rows(path: Path, dice: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "stage", "subtype", "dice"])
        writer.writeheader()
        writer.writerows(_rows(dice))


def test_retrain_check_compares_a_retrain_with_the_committed_run(tmp_path, capsys):
    name = "fairdro_necrotic_l3_s1"
    assert retrain_check.find_spec(name).seed == 1
    with pytest.raises(SystemExit, match="no run called"):
        retrain_check.find_spec("fairdro_necrotic_l9_s1")
    _write_rows(tmp_path / "results" / name / "per_case.csv", {"a": 0.6, "b": 0.8, "c": 0.7})
    _write_rows(tmp_path / "work" / name / "fairness" / "per_case.csv", {"a": 0.5, "b": 0.8, "c": 0.9})
    args = [name, "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--no-train"]
    with pytest.raises(SystemExit, match="not found: retrain first"):
        retrain_check.main([*args[:2], str(tmp_path / "elsewhere"), *args[3:]])
    assert retrain_check.main(args) == 0
    out = capsys.readouterr().out
    # |diff| 0.1, 0, 0.2; worst group: committed min(0.7, 0.7), retrain min(0.65, 0.9); minority (a, c)
    assert "3 testing cases, 1 identical, per-case |Δ Dice| mean 0.1000, max 0.2000" in out
    assert "| committed | 0.700 | 0.650 | 0.700 |" in out
    assert "| retrain | 0.650 | 0.700 | 0.733 |" in out
