"""Tests of the synthetic heterogeneous cohort generator (METHOD.md section 5)."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts import synthetic

REPO = Path(__file__).resolve().parents[1]
SHAPE = (48, 48, 24)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    datalist = synthetic.generate_cohort(out, n_cases=40, seed=3, shape=SHAPE)
    return out, datalist


def _all_items(datalist):
    return [it for part in ("training", "validation", "testing") for it in datalist[part]]


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic.generate_cohort(a, n_cases=8, seed=5, shape=SHAPE)
    synthetic.generate_cohort(b, n_cases=8, seed=5, shape=SHAPE)
    synthetic.generate_cohort(c, n_cases=8, seed=6, shape=SHAPE)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_splits_are_disjoint_and_complete(cohort):
    _, datalist = cohort
    ids = {part: {it["id"] for it in datalist[part]} for part in ("training", "validation", "testing")}
    assert not ids["training"] & ids["validation"]
    assert not ids["training"] & ids["testing"]
    assert not ids["validation"] & ids["testing"]
    assert len(set().union(*ids.values())) == 40
    # stratified by stage: every stage with >= 3 cases appears in every split
    stages = Counter(it["stage"] for it in _all_items(datalist))
    for stage, n in stages.items():
        if n >= 3:
            for part in ids:
                assert any(it["stage"] == stage for it in datalist[part]), (stage, part)


def test_groups_are_imbalanced_and_hard_cases_in_every_stage_group(cohort):
    _, datalist = cohort
    items = _all_items(datalist)
    stages = Counter(it["stage"] for it in items)
    insts = Counter(it["institution"] for it in items)
    assert set(stages) == {"T1", "T2", "T3", "T4"}
    assert set(insts) == {"A", "B", "C"}
    # exact stage frequencies 0.35/0.30/0.20/0.15 of 40 cases
    assert [stages[s] for s in synthetic.STAGES] == [14, 12, 8, 6]
    assert max(insts.values()) >= 2 * min(insts.values())
    for stage in synthetic.STAGES:
        group = [it for it in items if it["stage"] == stage]
        n_hard = sum(it["hard"] for it in group)
        assert 1 <= n_hard < len(group) / 2, (stage, n_hard, len(group))
    for it in items:
        assert set(it) >= {"id", "image", "label", "stage", "institution", "hard", "subtype"}
        assert (it["hard_kind"] in synthetic.HARD_KINDS) == it["hard"]
        assert it["subtype"] in ("majority", "necrotic")
        assert not (it["hard"] and it["subtype"] != "majority"), "hard cases are drawn among the majority only"


def test_minority_share_inside_every_stage_group(cohort):
    _, datalist = cohort
    items = _all_items(datalist)
    for stage, n in zip(synthetic.STAGES, [14, 12, 8, 6]):
        n_min = sum(it["subtype"] == "necrotic" for it in items if it["stage"] == stage)
        # round(0.15 * n), at least one in a group of >= 4: 14 -> 2, 12 -> 2, 8 -> 1, 6 -> 1
        assert n_min == {14: 2, 12: 2, 8: 1, 6: 1}[n], (stage, n_min)
    assert datalist["minority"] == "necrotic" and datalist["minority_frac"] == synthetic.DEFAULT_MINORITY_FRAC


@pytest.mark.parametrize("fractions", [(0.6, 0.2, 0.2), (0.3, 0.1, 0.6), (0.5, 0.0, 0.5)])
def test_split_is_stratified_by_stage_and_subtype(fractions):
    items = synthetic.draw_attributes(90, seed=2, frac=0.2)
    split = synthetic.stratified_split(items, "stage", seed=2, fractions=fractions)
    ids = [it["id"] for part in split.values() for it in part]
    assert sorted(ids) == sorted(it["id"] for it in items)  # disjoint and complete
    for stage in synthetic.STAGES:
        for minority in (True, False):
            cell = [it for it in items if it["stage"] == stage and (it["subtype"] != "majority") == minority]
            for name, frac in zip(synthetic.SPLIT_NAMES, fractions):
                got = sum(it in cell for it in split[name])
                # every split holds its fraction of every (stage, subtype) cell, to within one case
                assert abs(got - frac * len(cell)) < 1.0 + 1e-9, (stage, minority, name, got, len(cell))


def test_benchmark_size_has_ten_minority_testing_cases_per_stage():
    # the size of the calibration and benchmark cohorts: 800 cases, split 0.3 / 0.1 / 0.6
    items = synthetic.draw_attributes(800, seed=0)
    split = synthetic.stratified_split(items, "stage", seed=0, fractions=(0.3, 0.1, 0.6))
    assert len(split["training"]) >= 200
    for stage in synthetic.STAGES:
        n_min = sum(it["stage"] == stage and it["subtype"] != "majority" for it in split["testing"])
        assert n_min >= 10, (stage, n_min)


def test_placebo_level_draws_the_minority_with_the_majority_rule():
    attrs = synthetic.draw_attributes(12, seed=4)
    index = next(i for i, a in enumerate(attrs) if a["subtype"] != "majority")
    as_majority = {**attrs[index], "subtype": "majority"}
    placebo = synthetic.make_case(attrs[index], 4, index, SHAPE, difficulty=0)
    reference = synthetic.make_case(as_majority, 4, index, SHAPE, difficulty=3)
    for a, b in zip(placebo, reference):
        np.testing.assert_array_equal(a, b)
    # at a real level the same case departs from it, while the label (the CTV) stays the same
    hard = synthetic.make_case(attrs[index], 4, index, SHAPE, difficulty=3)
    assert not np.array_equal(hard[0], reference[0])
    np.testing.assert_array_equal(hard[1], reference[1])


def _target_hu(kind: str, level: int) -> tuple[float, float]:
    """Median HU inside the label, and the share of enhancing voxels (> 70 HU) outside it, over minority cases."""
    attrs = [a for a in synthetic.draw_attributes(60, seed=1, minority=kind) if a["subtype"] != "majority"][:4]
    inside, outside = [], []
    for a in attrs:
        index = int(a["id"].split("_")[1])
        img, lab, _ = synthetic.make_case(a, 1, index, (64, 64, 32), difficulty=level)
        inside.append(np.median(img[lab > 0]))
        outside.append(np.mean(img[lab == 0] > 70))
    return float(np.median(inside)), float(np.mean(outside))


def test_minority_kinds_depart_from_the_majority_rule():
    # necrotic: the target's median HU falls from enhancing (above 40 HU soft tissue) to about soft tissue or below
    # (hypodense core, enhancing rim and the margin ring) as the level rises
    placebo, _ = _target_hu("necrotic", 0)
    mid, _ = _target_hu("necrotic", 2)
    deep, _ = _target_hu("necrotic", 3)
    assert placebo > 60 and placebo - deep > 30 and deep < mid, (placebo, mid, deep)
    # distractor: enhancing voxels outside the label appear (and grow with the level)
    _, none = _target_hu("distractor", 0)
    _, some = _target_hu("distractor", 1)
    _, most = _target_hu("distractor", 3)
    assert none < some < most, (none, some, most)


def test_same_arguments_same_bytes_for_each_kind(tmp_path):
    for kind in synthetic.MINORITY_KINDS:
        a, b = tmp_path / f"{kind}_a", tmp_path / f"{kind}_b"
        synthetic.generate_cohort(a, n_cases=6, seed=0, shape=SHAPE, minority=kind)
        synthetic.generate_cohort(b, n_cases=6, seed=0, shape=SHAPE, minority=kind)
        assert _digest(a) == _digest(b)


def test_files_types_affine_and_label_inside_body(cohort):
    out, datalist = cohort
    for it in _all_items(datalist)[:10]:
        img = nib.load(out / it["image"])
        lab = nib.load(out / it["label"])
        assert img.get_data_dtype() == np.int16
        assert lab.get_data_dtype() == np.uint8
        assert img.shape == SHAPE and lab.shape == SHAPE
        np.testing.assert_allclose(img.affine, lab.affine)
        inst = next(i for i in synthetic.INSTITUTIONS if i.name == it["institution"])
        np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), (1.0, 1.0, inst.slice_mm))
        hu = np.asarray(img.dataobj)
        mask = np.asarray(lab.dataobj)
        assert set(np.unique(mask)) == {0, 1}
        assert mask.sum() > 50
        # the target lies inside the body: no target voxel in air (HU < -500 would be air/lung)
        assert np.median(hu[mask > 0]) > -100
        assert (hu[mask > 0] > -700).all()


def test_institutions_differ_in_noise(cohort):
    out, datalist = cohort
    noise = {}
    for it in _all_items(datalist):
        hu = np.asarray(nib.load(out / it["image"]).dataobj).astype(float)
        # robust noise estimate: median absolute difference of x-neighbours inside soft tissue
        tissue = (hu[1:] > -150) & (hu[1:] < 200) & (hu[:-1] > -150) & (hu[:-1] < 200)
        diff = np.abs(np.diff(hu, axis=0))[tissue]
        noise.setdefault(it["institution"], []).append(np.median(diff) / 0.6745 / np.sqrt(2))
    med = {k: np.median(v) for k, v in noise.items()}
    assert med["A"] < med["B"] < med["C"]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        synthetic.generate_cohort(tmp_path, n_cases=2)
    with pytest.raises(ValueError, match="shape"):
        synthetic.generate_cohort(tmp_path, n_cases=8, shape=(8, 64, 64))
    with pytest.raises(ValueError, match="grouping"):
        synthetic.generate_cohort(tmp_path, n_cases=8, grouping="age")
    with pytest.raises(ValueError, match="minority must be one of"):
        synthetic.generate_cohort(tmp_path, n_cases=8, minority="cyst")
    with pytest.raises(ValueError, match="minority_frac"):
        synthetic.generate_cohort(tmp_path, n_cases=8, minority_frac=0.01)
    with pytest.raises(ValueError, match="difficulty"):
        synthetic.generate_cohort(tmp_path, n_cases=8, difficulty=4)
    with pytest.raises(ValueError, match="split"):
        synthetic.generate_cohort(tmp_path, n_cases=8, split=(0.5, 0.3, 0.3))


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, str(REPO / "bundle/scripts/synthetic.py"), "--out", str(out), "--n-cases", "6",
         "--seed", "1", "--shape", "32", "32", "16", "--minority", "distractor", "--difficulty", "1",
         "--split", "0.5", "0.25", "0.25"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(_all_items(datalist)) == 6
    assert (datalist["minority"], datalist["difficulty"], datalist["split"]) == ("distractor", 1, [0.5, 0.25, 0.25])
    bad = subprocess.run(
        [sys.executable, str(REPO / "bundle/scripts/synthetic.py"), "--out", str(out), "--n-cases", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "n_cases" in bad.stderr
