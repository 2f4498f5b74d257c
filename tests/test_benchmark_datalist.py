"""The fairness benchmark on a user's datalist (bench/benchmark_datalist.py and its modules, issue 30).

Unit tests with hand-computed expectations (folds, inner validation, keys, report numbers, verdict), then the
command end to end on a user-style datalist (tests/fixtures_datalist.py: absolute paths, no subtype, extra
attributes; 2 folds, 2 variants, 1 seed, 2 epochs, a tiny network), on the FairSeg stand-in (multi-class), on four
bad inputs, and the README's numbers against the committed example report.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_2d import tree_digest, write_fairseg
from fixtures_datalist import PATIENT_KEY, break_user_datalist, items_of, write_user_datalist
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import benchmark_datalist as bd  # noqa: E402
import cv_folds  # noqa: E402
import datalist_cohort as dc  # noqa: E402
import datalist_probe as probe_mod  # noqa: E402
import datalist_report as dr  # noqa: E402
import runcache  # noqa: E402

SCRIPT = REPO / "bench" / "benchmark_datalist.py"
TINY = ["--set", "features=4", "--set", "num_experts=4", "--set", "batch_size=8"]
EXAMPLE = REPO / "bench" / "results" / "datalist_example"


def _items(strata: dict[str, int], patients: dict[str, int] | None = None) -> list[dict]:
    """Items of the given stratum sizes; ``patients``: per stratum, items per patient (consecutive items)."""
    items = []
    for s, n in strata.items():
        size = (patients or {}).get(s, 1)
        items += [{"id": f"{s}{i}", "stage": s, "patient": f"{s}p{i // size}"} for i in range(n)]
    return items


# ------------------------------------------------------------------------------------------------ folds


def test_folds_stratify_and_test_every_case_once():
    items = _items({"A": 10, "B": 8, "C": 6, "D": 4})
    folds = cv_folds.fold_test_items(items, 2, "stage", seed=0)
    assert sorted(i for f in folds for i in f) == list(range(28))  # every case in exactly one fold
    for f in folds:  # 10/8/6/4 halve exactly
        assert [sum(items[i]["stage"] == s for i in f) for s in "ABCD"] == [5, 4, 3, 2]
    folds3 = cv_folds.fold_test_items(items, 3, "stage", seed=1)
    for s, n in (("A", 10), ("B", 8), ("C", 6), ("D", 4)):  # floor or ceil of n / 3 in every fold
        counts = sorted(sum(items[i]["stage"] == s for i in f) for f in folds3)
        assert counts[0] == n // 3 and counts[-1] == -(-n // 3) and sum(counts) == n


def test_folds_keep_patients_together_and_differ_with_the_seed():
    items = _items({"A": 12, "B": 9}, patients={"A": 2, "B": 3})  # A: 6 patients of 2, B: 3 patients of 3
    folds = cv_folds.fold_test_items(items, 3, "stage", "patient", seed=0)
    fold_of = {i: k for k, f in enumerate(folds) for i in f}
    assert sorted(fold_of) == list(range(21))
    for p in {it["patient"] for it in items}:
        assert len({fold_of[i] for i, it in enumerate(items) if it["patient"] == p}) == 1, p
    # A: 6 patients over 3 folds -> 2 patients (4 items) each; B: 3 patients -> one (3 items) each
    for f in folds:
        assert [sum(items[i]["stage"] == s for i in f) for s in "AB"] == [4, 3]
    assert cv_folds.fold_test_items(items, 3, "stage", "patient", seed=1) != folds


def test_a_patient_with_items_of_two_groups_takes_the_more_common():
    items = [{"stage": "B", "patient": "p"}, {"stage": "A", "patient": "p"}, {"stage": "B", "patient": "p"},
             {"stage": "A", "patient": "q"}, {"patient": "r"}]  # fmt: skip
    units = cv_folds.units_of(items, "stage", "patient")
    assert [(u.items, u.stratum) for u in units] == [((0, 1, 2), "B"), ((3,), "A"), ((4,), "unknown")]


def test_quotas_by_largest_remainder():
    # 4 of 40 over 16/12/8/4: exact 1.6/1.2/0.8/0.4 -> floors 1/1/0/0, the two largest remainders (0.8 C, 0.6 A)
    assert cv_folds.quotas({"A": 16, "B": 12, "C": 8, "D": 4}, 4) == {"A": 2, "B": 1, "C": 1, "D": 0}
    # ties go by name: 2 of 4 over 1/1/1/1 -> A and B
    assert cv_folds.quotas({"B": 1, "A": 1, "D": 1, "C": 1}, 2) == {"A": 1, "B": 1, "C": 0, "D": 0}


def test_inner_validation_is_ten_percent_stratified():
    items = _items({"A": 16, "B": 12, "C": 8, "D": 4})
    indices = list(range(40))
    train, val = cv_folds.inner_validation(items, indices, "stage", seed=0, fold=0)
    assert len(val) == 4 and sorted(train + val) == indices and not set(train) & set(val)
    assert [sum(items[i]["stage"] == s for i in val) for s in "ABCD"] == [2, 1, 1, 0]  # the quotas above
    assert cv_folds.inner_validation(items, indices, "stage", seed=0, fold=1)[1] != val  # another fold, another draw


def test_inner_validation_keeps_patients_and_holds_out_at_least_one():
    items = _items({"A": 10, "B": 6}, patients={"A": 2, "B": 2})  # 16 items: 10 % is 2 (1.6 rounded)
    train, val = cv_folds.inner_validation(items, list(range(16)), "stage", "patient", seed=0)
    held = {items[i]["patient"] for i in val}
    assert len(val) == 2 and all(items[i]["patient"] not in held for i in train)
    tiny = _items({"A": 3})
    assert len(cv_folds.inner_validation(tiny, [0, 1, 2], "stage")[1]) == 1  # round(0.3) = 0 -> at least 1
    with pytest.raises(ValueError, match="cannot give up"):
        cv_folds.inner_validation(tiny, [0], "stage")


def test_more_folds_than_the_smallest_group_is_refused():
    units = cv_folds.units_of(_items({"A": 6, "B": 2}), "stage")
    cv_folds.check_folds(2, units, "stage")
    with pytest.raises(
        ValueError, match=r"FOLDS=3 is larger than the smallest group: stage=B has 2 cases, .*FOLDS=2 or"
    ):
        cv_folds.check_folds(3, units, "stage")
    lone = cv_folds.units_of(_items({"A": 6, "B": 1}), "stage")
    with pytest.raises(ValueError, match=r"stage=B has 1 case, .*merge it with another group or leave it out"):
        cv_folds.check_folds(2, lone, "stage")


# ------------------------------------------------------------------------------------------------ cohort and keys


@pytest.fixture(scope="module")
def user_cohort(tmp_path_factory) -> Path:
    """The user-style datalist of the end-to-end test (40 cases: 24 training, 6 validation, 10 testing)."""
    return write_user_datalist(tmp_path_factory.mktemp("user"), n_cases=40)


def test_the_cohort_is_read_as_a_user_writes_it(user_cohort):
    items = items_of(user_cohort)
    assert all(os.path.isabs(it["image"]) and "subtype" not in it for it in items)
    cohort = dc.load_cohort(user_cohort, "stage", PATIENT_KEY, folds=2)
    pool = items_of(user_cohort, ("training", "validation"))
    assert cohort.subgroups == ["T1", "T2", "T3", "T4"] and [i["id"] for i in cohort.pool] == [i["id"] for i in pool]
    assert cohort.pool[0]["image"] == pool[0]["image"] and cohort.pool[0]["scanner"] == pool[0]["scanner"]
    assert cohort.extras == ["scanner", "sex"]  # age has one value per case: skipped, with the reason
    n = len(pool)  # ages 30 + (3 i) % 55 differ for the 40 cases
    assert cohort.skipped_extras == {"age": f"{n} distinct values; bin it into at most 12 groups to break it down"}


def test_without_folds_the_own_lists_are_used_and_a_missing_validation_is_carved(tmp_path):
    data = json.loads(write_user_datalist(tmp_path / "u", n_cases=24).read_text())
    lists = {"training": data["training"] + data["validation"], "testing": data["testing"]}
    (tmp_path / "no_val.json").write_text(json.dumps(lists))
    cohort = dc.load_cohort(tmp_path / "no_val.json", "stage")
    (split,) = dc.make_splits(cohort, None)
    n = len(lists["training"])
    assert split.name == "testing" and [i["id"] for i in split.testing] == [i["id"] for i in lists["testing"]]
    assert len(split.validation) == round(0.1 * n) and len(split.training) == n - round(0.1 * n)
    with pytest.raises(dc.InputError, match="no non-empty 'testing' list; set FOLDS=k"):
        (tmp_path / "no_test.json").write_text(json.dumps({"training": lists["training"]}))
        dc.load_cohort(tmp_path / "no_test.json", "stage")


def test_extra_attributes_kept_and_skipped():
    items = [{"id": str(i), "sex": "FM"[i % 2], "site": "X", "note": None if i else "n", "grid": [1, 2],
              "stage": "T1"} for i in range(6)]  # fmt: skip
    kept, skipped = dc.extra_attributes(items, ("stage",))
    assert kept == ["sex"]
    assert skipped == {"grid": "not a single value per item", "note": "present in only 1 of 6 items",
                       "site": "one value only"}  # fmt: skip


def test_run_keys_of_a_user_cohort(user_cohort, tmp_path):
    cohort = dc.load_cohort(user_cohort, "stage", PATIENT_KEY, folds=2)
    split = dc.make_splits(cohort, 2)[0]
    spec = bd.spec_for(tmp_path, cohort, split, "2d", "erm", 0, {"subgroup_key": "stage", "epochs": 2})
    assert spec.name == "erm_fold0_s0"
    names = [Path(f).relative_to(runcache.CONFIGS).as_posix() for f in spec.config_files(True)]
    assert names == [
        "train.json",
        "variants/erm.json",
        "evaluate.json",
        "profiles/2d.json",
        "profiles/2d_evaluate.json",
    ]
    fair = bd.spec_for(tmp_path, cohort, split, "fairseg", "erm", 0, {})
    assert Path(fair.config_files(False)[-1]).name == "fairseg.json"
    key = runcache.run_key(spec)
    moved = bd.spec_for(tmp_path / "elsewhere", cohort, split, "2d", "erm", 0, {"subgroup_key": "stage", "epochs": 2})
    assert runcache.run_key(moved) == key  # OUT's paths are not in the key
    image = Path(items_of(user_cohort)[5]["image"])
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert runcache.run_key(spec) != key  # a rewritten file (its mtime) reruns
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert runcache.run_key(spec) == key
    fp = runcache.datalist_fingerprint(user_cohort)
    assert fp["n_files"] == 80 and len(fp["sha256"]) == 64


# ------------------------------------------------------------------------------------------------ report numbers


def _rows(values: dict[str, list[float]], key: str = "stage") -> list[dict]:
    return [{"id": f"{g}{i}", key: g, "dice": d} for g, ds in values.items() for i, d in enumerate(ds)]


def test_group_cell_numbers_by_hand():
    rows = _rows({"A": [0.9, 0.1, 0.5, 0.7, 0.3]})
    cell = dr.group_cell(rows, dr.Settings("stage", threshold=0.5, alpha=0.2))
    # sorted 0.1 0.3 0.5 0.7 0.9: 10th percentile (linear) = 0.1 + 0.4 * (0.3 - 0.1) = 0.18; worst 20% of 5 = 0.1
    assert cell["n"] == 5 and cell["dice"] == pytest.approx(0.5)
    assert cell["worst_decile_dice"] == pytest.approx(0.18) and cell["cvar"] == pytest.approx(0.1)
    assert cell["failure_rate"] == pytest.approx(0.4) and cell["hd95"] is None  # 0.1 and 0.3 are below 0.5


def test_too_small_groups_are_left_out_of_worst_group_and_es_dice():
    rows = _rows({"A": [0.8, 0.6, 0.7], "B": [0.9, 0.5, 0.7], "C": [0.1]})
    block = dr.grouping_block({"erm": rows}, "stage", dr.Settings("stage", min_group_cases=2))
    assert block["comparable"] == ["A", "B"] and block["too_small"] == ["C"]
    s = block["summary"]["erm"]
    # A 0.7, B 0.7; all 0.7; ES-Dice 0.7 / (1 + 0 + 0) -- C (0.1) does not count
    assert s["worst_group_dice"] == pytest.approx(0.7) and s["es_dice"] == pytest.approx(0.7)
    assert block["groups"]["C"]["too_small"] and block["groups"]["C"]["variants"]["erm"]["dice"] == 0.1


def test_pooling_refuses_a_case_tested_twice_or_never():
    a, b = _rows({"A": [0.5, 0.6]}), _rows({"B": [0.7]})
    assert len(dr.pool_rows({"fold0": a, "fold1": b}, ["A0", "A1", "B0"])) == 3
    with pytest.raises(ValueError, match="more than one fold"):
        dr.pool_rows({"fold0": a, "fold1": a}, ["A0", "A1"])
    with pytest.raises(ValueError, match="in no fold"):
        dr.pool_rows({"fold0": a}, ["A0", "A1", "B0"])


def test_seed_average_and_winner_ties():
    s0, s1 = _rows({"A": [0.2, 0.4]}), _rows({"A": [0.4, 0.8]})
    assert [r["dice"] for r in dr.average_seeds([s0, s1])] == pytest.approx([0.3, 0.6])
    sums = {"erm": {"worst_group_dice": 0.7}, "dmoe": {"worst_group_dice": 0.7}, "fairdro": {"worst_group_dice": 0.6}}
    assert dr.winner(sums, ["erm", "dmoe", "fairdro"]) == "erm" and dr.winner(sums, ["dmoe", "erm"]) == "dmoe"


def test_verdict_against_the_strongest_baseline():
    gen = np.random.default_rng(0)
    base = {g: list(gen.uniform(0.5, 0.7, 12)) for g in "AB"}
    ours = {g: [d + 0.1 for d in v] for g, v in base.items()}  # FairDRO 0.1 better on every case
    weak = {g: [d - 0.2 for d in v] for g, v in base.items()}
    runs = {v: {0: {"fold0": _rows(r)}} for v, r in (("erm", weak), ("dmoe", base), ("fairdro", ours))}
    ids = [r["id"] for r in _rows(base)]
    info = {"datalist": "d.json", "datalist_name": "d.json", "command": "c", "folds": None, "seeds": 1,
            "epochs": 2, "profile": "2d", "n_cases": 24, "splits": {"fold0": {"training": 1, "validation": 1,
            "testing": 24}}}  # fmt: skip
    report = dr.build_report(runs, ["fold0"], ids, dr.Settings("stage", n_boot=200), info)
    assert report["winner"] == "fairdro" and set(report["comparisons"]) == {"erm", "dmoe"}
    wg = report["comparisons"]["dmoe"]["worst_group_dice"]
    assert wg["estimate"] == pytest.approx(0.1) and wg["ci"] == pytest.approx([0.1, 0.1])
    assert report["verdict"].startswith("On this cohort, FairDRO beats the strongest baseline, dmoe, on worst-group")
    assert "difference +0.100" in report["verdict"] and "The model to deploy is fairdro" in report["verdict"]


# ------------------------------------------------------------------------------------------------ probe and progress

_LOG = """\
2026-12-07 05:00:01,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[1] Complete. Time taken: 00:00:00.500
2026-12-07 05:00:01,000 - INFO - Epoch[1] Metrics -- val_mean_dice: 0.2500 val_worst_group_dice: 0.1000
2026-12-07 05:00:01,000 - ignite.engine.engine.FairDROTrainer - INFO - Epoch[1] Complete. Time taken: 00:00:04.000
2026-12-07 05:00:02,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[2] Complete. Time taken: 00:00:00.400
2026-12-07 05:00:02,000 - INFO - Epoch[2] Metrics -- val_mean_dice: 0.5000 val_worst_group_dice: 0.3000
2026-12-07 05:00:02,000 - ignite.engine.engine.FairDROTrainer - INFO - Epoch[2] Complete. Time taken: 00:01:02.000
"""


def test_probe_costs_and_estimates_by_hand():
    times = probe_mod.parse_probe_log(_LOG)
    assert times == {"trainer_s": [4.0, 62.0], "val_s": [0.5, 0.4]}
    costs = probe_mod.steady_costs(times, wall=20.0, n_train=16, n_val=4)
    # fastest epoch 4.0 s (the 62 s one was slowed), fastest validation 0.4 s: (4.0 - 0.4) / 16 per training case,
    # 0.4 / 4 per validation case, start-up 20 - 2 * 4.0
    assert costs == pytest.approx({"startup_s": 12.0, "train_case_s": 0.225, "val_case_s": 0.1})
    probe = probe_mod.Probe("k", "fairdro", "CPU", 16, 4, 20.0, **costs, model_bytes=1000, checkpoint_bytes=3000)
    # training 12 + 10 * (80 * 0.225 + 8 * 0.1) = 200; evaluation 12 + 40 * 0.1 * 3 = 24
    assert probe_mod.estimate_run(probe, 10, 80, 8, 40) == pytest.approx((200.0, 24.0))
    assert probe_mod.disk_estimate(probe, 3) == (3 * (1000 + probe_mod.RUN_FILES_BYTES), 6000)


def test_progress_lines_and_bar(tmp_path):
    import io

    import run_progress

    out = io.StringIO()
    progress = run_progress.Progress({"a": 10.0, "b": 30.0}, out=out)
    progress.start_run("a", "fold0 erm s0", epochs=2, train_est=8.0)
    follower = run_progress.LogFollower(tmp_path / "run.log", progress)
    (tmp_path / "run.log").write_text(_LOG)
    follower.read()
    lines = out.getvalue().splitlines()
    # epoch 1: 8 * 1/2 of 40 estimated seconds = 10 %; epoch 2: 8 of 40 = 20 %
    assert lines[0].startswith("  fold0 erm s0  epoch 1/2  4.0 s  val_mean_dice 0.250  val_worst_group_dice 0.100")
    assert "[##------------------]  10%  about" in lines[0] and "[####----------------]  20%" in lines[1]
    progress.end_run()
    assert progress.fraction() == pytest.approx(0.25) and run_progress.bar(0.25) == "[#####---------------]"
    assert [run_progress.duration(s) for s in (45, 720, 12600)] == ["45 s", "12 min", "3.5 h"]


# ------------------------------------------------------------------------------------------------ bad inputs


def _bad_input(problem: str, cohort: Path) -> tuple[list[str], str]:
    """(extra arguments, the text the error line must name) for one bad input of the cohort."""
    if problem == "subgroup_key":
        return ["--subgroup-key", "site"], "no item has the SUBGROUP_KEY 'site'"
    if problem == "folds":
        return ["--folds", "9", "--patient-key", PATIENT_KEY], "FOLDS=9 is larger than the smallest group: stage="
    if problem == "invalid_json":
        cohort.write_text(cohort.read_text().rstrip() + ",\n")
        return [], "the datalist is not valid JSON"
    if problem == "export_not_empty":
        (cohort.parent / "exported").mkdir()
        (cohort.parent / "exported" / "notes.txt").write_text("mine")
        return ["--export", str(cohort.parent / "exported")], "the folder exists and is not empty"
    return [], break_user_datalist(cohort, problem)


@pytest.mark.parametrize(
    "problem", ["datalist_errors", "subgroup_key", "folds", "missing_image", "invalid_json", "export_not_empty"]
)
def test_bad_input_gets_one_line_before_training_and_nothing_written(tmp_path, capsys, problem):
    cohort = write_user_datalist(tmp_path / "user", n_cases=24)
    extra, named = _bad_input(problem, cohort)
    before, out = tree_digest(tmp_path), tmp_path / "runs" / "bench"
    args = ["--datalist", str(cohort), "--subgroup-key", "stage", "--folds", "2", "--out", str(out), *extra]
    assert bd.main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR benchmark-fairness: ") and named in lines[0], lines
    assert captured.out == "" and not out.exists() and tree_digest(tmp_path) == before


# ------------------------------------------------------------------------------------------------ end to end


def _command(cohort: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--datalist", str(cohort), "--subgroup-key", "stage", "--patient-key",
            PATIENT_KEY, "--folds", "2", "--variants", "erm,fairdro", "--seeds", "1", "--epochs", "2",
            "--min-group-cases", "3", "--out", str(out), *TINY, *extra]  # fmt: skip


def _kill_after_first_run(cmd: list[str], out: Path, timeout: float = 400) -> str:
    """Start the benchmark, SIGKILL it (and its training) once its first run finished; returns its output."""
    log = out.parent / "first.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not _finished_runs(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def _finished_runs(out: Path) -> list[str]:
    """The runs whose run.json is written (it is written last) and complete."""
    done = []
    for path in (out / "runs").glob("*/run.json"):
        try:
            done += [path.parent.name] if "key" in json.loads(path.read_text()) else []
        except ValueError:  # being written
            pass
    return done


def _per_case_ids(run_dir: Path) -> list[str]:
    with (run_dir / "per_case.csv").open() as fh:
        return [row["id"] for row in csv.DictReader(fh)]


def _main(capsys, args: list[str]) -> tuple[int, str]:
    """The command in this process (its runs train in child processes): (exit status, what it printed)."""
    capsys.readouterr()
    status = bd.main(args)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.slow
def test_end_to_end_on_a_user_datalist(tmp_path, user_cohort, meta_schema, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny runs: one thread each is faster, on a busy CPU by far
    out = tmp_path / "bench"
    cmd = _command(user_cohort, out)
    first = _kill_after_first_run(cmd, out)
    finished = sorted(p.parent.name for p in (out / "runs").glob("*/run.json"))
    assert finished == ["erm_fold0_s0"], first[-3000:]  # seed 0, fold 0, the variants in order
    plan = (out / "plan.txt").read_text()
    assert "runs: 4 (2 fold(s) x 2 variant(s) x 1 seed(s)): 0 cached, 4 to run" in plan
    assert re.search(r"estimate: [\d.]+ (CPU|GPU) hours .*; disk about \d+ MB", plan), plan
    assert re.search(r"fold0 erm s0  epoch 2/2 .*\] +\d+%  about .* left", first), first[-3000:]
    kept = (out / "runs" / "erm_fold0_s0" / "run.json").read_bytes()

    # resume: nothing finished reruns
    status, printed = _main(capsys, cmd[2:])
    assert status == 0, printed[-3000:]
    assert "fold0 erm s0: cached" in printed and printed.count(": finished in") == 3
    assert (out / "runs" / "erm_fold0_s0" / "run.json").read_bytes() == kept

    # every case of the pool tested exactly once, by each variant
    pool = [it["id"] for it in items_of(user_cohort, ("training", "validation"))]
    tests = [json.loads((out / "splits" / f"fold{k}" / "datalist.json").read_text())["testing"] for k in (0, 1)]
    assert sorted(it["id"] for t in tests for it in t) == sorted(pool)
    for variant in ("erm", "fairdro"):
        ids = [i for k in (0, 1) for i in _per_case_ids(out / "runs" / f"{variant}_fold{k}_s0")]
        assert sorted(ids) == sorted(pool), variant

    # the report: verdict, the user's groups and the extra attributes
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["cases"]["expected"] == len(pool) and report["winner"] in ("erm", "fairdro")
    assert report["verdict"].startswith("On this cohort, FairDRO ") and "strongest baseline, erm" in report["verdict"]
    assert list(report["groupings"]) == ["stage", "scanner", "sex"]
    assert set(report["groupings"]["sex"]["groups"]) == {"F", "M"}
    assert "age" in report["info"]["skipped_attributes"]
    md = (out / "report.md").read_text()
    assert "## By `scanner` (not a routing attribute)" in md and "**Verdict.** On this cohort" in md
    _check_report_against_runs(report, out)

    _check_export(capsys, cmd, tmp_path, user_cohort, meta_schema, report["winner"])
    _check_changed_image_reruns(capsys, cmd, out, user_cohort)


def _check_report_against_runs(report: dict, out: Path) -> None:
    """Group T1's Dice and failure rate of erm, recomputed from the runs' per_case.csv."""
    rows = [r for k in (0, 1) for r in csv.DictReader((out / "runs" / f"erm_fold{k}_s0" / "per_case.csv").open())]
    dice = np.array([float(r["dice"]) for r in rows if r["stage"] == "T1"])
    cell = report["groupings"]["stage"]["groups"]["T1"]["variants"]["erm"]
    assert cell["n"] == dice.size and cell["dice"] == pytest.approx(dice.mean())
    assert cell["failure_rate"] == pytest.approx((dice < 0.5).mean())
    assert cell["worst_decile_dice"] == pytest.approx(np.percentile(dice, 10))


def _check_export(capsys, cmd, tmp_path, cohort, meta_schema, winner) -> None:
    bundle = tmp_path / "exported"
    status, printed = _main(capsys, [*cmd[2:], "--export", str(bundle)])
    assert status == 0, printed[-3000:]
    assert f"export: retraining {winner} on the pool" in printed
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["subgroup_key"] == "stage" and inference["subgroups"] == ["T1", "T2", "T3", "T4"]
    assert inference["use_dmoe"] is (winner == "fairdro") and inference["features"] == 4
    verify = subprocess.run([sys.executable, str(REPO / "tools" / "verify_bundle.py"), "--bundle-dir", str(bundle),
                             "--schema", str(meta_schema)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert verify.returncode == 0 and "ALL CHECKS PASSED" in verify.stdout, verify.stdout[-3000:]
    case = items_of(cohort, ("testing",))[0]
    one = tmp_path / "one_case.json"
    one.write_text(json.dumps({"testing": [case]}))
    seg = tmp_path / "segmented"
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                          "configs/inference.json", "--datalist", str(one), "--dataset_dir", str(tmp_path),
                          "--output_dir", str(seg)], cwd=bundle, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    mask = np.asarray(Image.open(seg / f"{case['id']}_seg.png"))
    assert mask.shape == np.asarray(Image.open(case["image"])).shape and set(np.unique(mask)) <= {0, 1}


def _check_changed_image_reruns(capsys, cmd, out, cohort) -> None:
    """A rewritten image: every run of the plan would rerun (its key holds the file's size and time); one of them,
    run again, trains again and records its new key."""
    image = Path(items_of(cohort, ("training",))[0]["image"])
    pixels = np.asarray(Image.open(image)).copy()
    Image.fromarray(255 - pixels).save(image)
    status, printed = _main(capsys, [*cmd[2:], "--dry-run"])
    assert status == 0 and printed.count(" rerun\n") == 4, printed
    bench = bd.prepare(bd._parser().parse_args(cmd[2:]))
    spec = next(s for s in bench.specs if s.name == "erm_fold0_s0")
    old_key = json.loads((out / "runs" / spec.name / "run.json").read_text())["key"]
    run_dir, ran = runcache.run(spec, bench.runs_dir, bench.out, bench.work)
    new_key = json.loads((run_dir / "run.json").read_text())["key"]
    assert ran and new_key != old_key and new_key == runcache.run_key(spec)


@pytest.mark.slow
def test_fairseg_fixture_multiclass_report(tmp_path, monkeypatch):
    from scripts.prepare_fairseg import main as prepare

    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    data = write_fairseg(tmp_path / "data", "readme", n=30)
    datalist = tmp_path / "fairseg" / "datalist.json"
    assert prepare(["--data-dir", str(data), "--out", str(datalist)]) == 0
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(SCRIPT), "--datalist", str(datalist), "--subgroup-key", "race",
                          "--profile", "fairseg", "--variants", "fairdro", "--seeds", "1", "--epochs", "1",
                          "--min-group-cases", "3", "--out", str(out), *TINY, "--set", "image_size=[48,48]"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    race = report["groupings"]["race"]
    assert set(race["groups"]) == {"Asian", "Black", "White"} and race["too_small"] == []
    rows = list(csv.DictReader((out / "runs" / "fairdro_testing_s0" / "per_case.csv").open()))
    for g, entry in race["groups"].items():  # the per-class Dice, recomputed from the run's per_case.csv
        cell = entry["variants"]["fairdro"]
        for cls in ("rim", "cup"):
            expected = np.mean([float(r[f"dice_{cls}"]) for r in rows if r["race"] == g])
            assert cell[f"dice_{cls}"] == pytest.approx(expected), (g, cls)
    assert set(race["summary"]["fairdro"]["per_class"]) == {"rim", "cup"} and report["winner"] == "fairdro"
    assert {"gender", "language"} <= set(report["groupings"]) and report["cases"]["expected"] == 9
    md = (out / "report.md").read_text()
    assert "| Dice rim | Dice cup |" in md and "## Per class" in md


def _dry_run(capsys, datalist: Path, key: str, *extra: str) -> str:
    status, printed = _main(capsys, ["--datalist", str(datalist), "--subgroup-key", key, "--dry-run", *extra])
    assert status == 0, printed
    return printed


def test_dry_run_on_a_3d_nifti_datalist_with_relative_paths(tmp_path, capsys):
    from scripts.synthetic import generate_cohort

    generate_cohort(tmp_path / "ct", n_cases=30, seed=0, shape=(48, 48, 24))  # relative paths, as prepare_cohort
    out = tmp_path / "bench"
    printed = _dry_run(capsys, tmp_path / "ct" / "datalist.json", "stage", "--folds", "2", "--seeds", "1",
                       "--out", str(out))  # fmt: skip
    assert "configuration: profile none, 40 epochs" in printed and "runs: 6 (2 fold(s) x 3 variant(s)" in printed
    assert "extra attributes broken down: institution" in printed  # subtype and hard are bookkeeping, not attributes
    assert len(re.findall(r"^  \S+_fold\d_s0 +run$", printed, re.M)) == 6 and not out.exists()  # nothing written


def test_dry_run_on_a_ham10000_datalist(tmp_path, capsys):
    from fixtures_2d import write_ham10000
    from scripts.prepare_ham10000 import main as prepare

    datalist = tmp_path / "ham" / "datalist.json"
    assert prepare(["--data-dir", str(write_ham10000(tmp_path / "data")), "--out", str(datalist)]) == 0
    printed = _dry_run(capsys, datalist, "age_group", "--profile", "ham10000", "--out", str(tmp_path / "b"))
    assert "configuration: profile ham10000" in printed and "check_data: no errors" in printed
    assert "extra attributes broken down: " in printed and "sex" in printed


# ------------------------------------------------------------------------------------------------ make and README


def test_make_target_wraps_the_command_and_keeps_the_synthetic_plan():
    make = ["make", "-n", "-C", str(REPO), "benchmark-fairness"]
    plain = subprocess.run(make, capture_output=True, text=True, check=True).stdout
    assert "bench/fairness_ablation.py --bench full" in plain and "benchmark_datalist" not in plain
    user = subprocess.run([*make, "DATALIST=/d/x.json", "SUBGROUP_KEY=stage", "FOLDS=5", "PATIENT_KEY=pid",
                           "VARIANTS=erm,fairdro", "SEEDS=2", "PROFILE=2d", "EPOCHS=7"], capture_output=True,
                          text=True, check=True).stdout.replace("\\\n", " ")  # fmt: skip
    line = next(li for li in user.splitlines() if "benchmark_datalist.py" in li)
    for part in (
        "--datalist /d/x.json",
        "--subgroup-key stage",
        "--folds 5",
        "--patient-key pid",
        "--variants erm,fairdro",
        "--seeds 2",
        "--profile 2d",
        "--epochs 7",
        "--out runs/benchmark-x",
    ):
        assert part in line, (part, line)  # fmt: skip
    assert "fairness_ablation" not in user


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start : end if end > 0 else None]


def test_readme_numbers_come_from_the_committed_example_report():
    report = json.loads((EXAMPLE / "report.json").read_text())
    section = _section((REPO / "README.md").read_text(), "Your own data")
    assert report["complete"] and report["verdict"] in " ".join(section.split())
    plan = (EXAMPLE / "plan.txt").read_text()
    for line in ("runs: ", "estimate: ", "splits ("):
        shown = next(li for li in plan.splitlines() if line in li)
        assert shown.strip() in section, shown
    key = report["settings"]["subgroup_key"]
    for variant, s in report["groupings"][key]["summary"].items():
        row = f"| {variant} | {s['dice_all']:.3f} | {s['worst_group_dice']:.3f} | {s['es_dice']:.3f} |"
        assert row in section, row
    info = report["info"]
    timing = info["timing"]
    assert (
        f"took {timing['actual_s'] / 60:.0f} minutes" in section
        and f"estimated {timing['estimated_s'] / 60:.0f})" in section
    )
    for make_var in (
        f"FOLDS={info['folds']}",
        f"SEEDS={info['seeds']}",
        f"EPOCHS={info['epochs']}",
        f"PROFILE={info['profile']}",
        f"VARIANTS={','.join(report['variants'])}",
    ):
        assert make_var in section, make_var  # fmt: skip
