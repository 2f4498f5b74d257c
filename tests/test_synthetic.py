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


def test_groups_are_imbalanced_and_hard_cases_in_every_group(cohort):
    _, datalist = cohort
    items = _all_items(datalist)
    stages = Counter(it["stage"] for it in items)
    insts = Counter(it["institution"] for it in items)
    assert set(stages) == {"T1", "T2", "T3", "T4"}
    assert set(insts) == {"A", "B", "C"}
    assert max(stages.values()) >= 2 * min(stages.values())
    assert max(insts.values()) >= 2 * min(insts.values())
    for key in ("stage", "institution"):
        for value in {it[key] for it in items}:
            group = [it for it in items if it[key] == value]
            n_hard = sum(it["hard"] for it in group)
            if len(group) >= 2:
                assert 1 <= n_hard < len(group) / 2, (key, value, n_hard, len(group))
    for it in items:
        assert set(it) >= {"id", "image", "label", "stage", "institution", "hard"}
        assert (it["hard_kind"] in synthetic.HARD_KINDS) == it["hard"]


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


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, str(REPO / "bundle/scripts/synthetic.py"), "--out", str(out), "--n-cases", "6",
         "--seed", "1", "--shape", "32", "32", "16"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(_all_items(datalist)) == 6
    bad = subprocess.run(
        [sys.executable, str(REPO / "bundle/scripts/synthetic.py"), "--out", str(out), "--n-cases", "1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "n_cases" in bad.stderr
