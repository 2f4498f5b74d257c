"""Tests of the 3D ``ring`` minority kind of the synthetic cohort (``scripts/synthetic.py``, METHOD.md section 5).

The expected contrasts come from the 2D cohort's level table (``scripts/synthetic_2d.py`` docstring): dark target
-0.30, ring +0.35 / +0.25 / +0.15 and decoy +0.10 / +0.20 / +0.30 at levels 1 / 2 / 3, over a target contrast of
0.30. Shells and distances are measured with scipy's morphology, a second implementation of the generator's own.
"""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scripts import synthetic

REPO = Path(__file__).resolve().parents[1]
SHAPE = (48, 48, 24)  #: the cohorts whose bytes are compared
CASE_SHAPE = (64, 64, 32)  #: the rendered cases (the calibration size: room for cysts and decoy)
SEED = 1
#: the 2D table over its target contrast 0.30, per level 1..3
SHELL_RATIO = {1: 0.35 / 0.30, 2: 0.25 / 0.30, 3: 0.15 / 0.30}
DECOY_RATIO = {1: 0.10 / 0.30, 2: 0.20 / 0.30, 3: 0.30 / 0.30}

#: sha256 over (relative path, decompressed NIfTI bytes or datalist bytes) of every file of
#: ``generate_cohort(tmp, n_cases=8, seed=1, shape=(48, 48, 24), minority=kind, difficulty=level)``, computed with
#: ``bundle/scripts/synthetic.py`` as of commit becb11e, before the ring kind was added (numpy 2.4.6, nibabel 5.4.2).
#: The gzip layer is left out so that another zlib build cannot change the digest. The default arguments are
#: ``necrotic`` at level 3.
PRE_RING_DIGESTS = {
    ("necrotic", 0): "d30edcffa68651275af7867fd1a28ee11939e5eba94882c9b01b4de9d45f67d5",
    ("necrotic", 1): "3300e87552e0d12d8fe527c9190df997e7b1c96dab6fb0e5ec44b2abc4828211",
    ("necrotic", 2): "ddd4ec41ed2ded6d800189f97c6cd27fabd9b16d097292214aa9f154aabc1625",
    ("necrotic", 3): "00c1e9fd41a65895aa5e2182bc9550661d0e217db956cd96962daba753987dba",
    ("distractor", 0): "fb549c172c9ad54e90cf149f796ba61ad683f51342a1f8145b981377f32e697c",
    ("distractor", 1): "56c3f9c1c1490f3468f44593859f6493cb1c1cceb272dc2b46f08fd3c3f7686d",
    ("distractor", 2): "c6dd58772bce935201205628582b64395f1563f824f1bd5858dd6f895fd50d51",
    ("distractor", 3): "945a8cf2dce6bbdea5988a3ce3e149b3a4ddd97ae9c82f97525631229fa227cf",
}


def _cohort_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            h.update(str(p.relative_to(folder)).encode())
            h.update(gzip.decompress(data) if p.suffix == ".gz" else data)
    return h.hexdigest()


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Voxels within ``steps`` face-neighbour steps of ``mask`` (no wrap at the border)."""
    return ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=steps)


def _ring_cases(n: int = 4):
    attrs = synthetic.draw_attributes(60, SEED, "ring", 0.15)
    return [(i, a) for i, a in enumerate(attrs) if a["subtype"] == "ring"][:n]


def _render(index: int, attrs: dict, level: int):
    image, label, _ = synthetic.make_case(attrs, SEED, index, CASE_SHAPE, difficulty=level)
    return image.astype(float), label.astype(bool)


def _tissue(image: np.ndarray, label: np.ndarray) -> float:
    """Soft-tissue HU: median of the soft-tissue voxels more than 3 face-steps from the label."""
    far = ~_grow(label, 3) & (image > -150) & (image < 250)
    return float(np.median(image[far]))


@pytest.fixture(scope="module")
def rendered():
    """Per ring case: its institution's contrast and its image at levels 0..3, as majority, and its label."""
    out = []
    for index, attrs in _ring_cases():
        levels = {lvl: _render(index, attrs, lvl) for lvl in range(4)}
        majority = _render(index, {**attrs, "subtype": "majority"}, 3)
        inst = next(i for i in synthetic.INSTITUTIONS if i.name == attrs["institution"])
        out.append((inst.contrast_hu, levels, majority))
    return out


def test_the_label_is_the_dark_region(rendered):
    for contrast, levels, (major_img, major_lab) in rendered:
        for lvl in (1, 2, 3):
            img, lab = levels[lvl]
            np.testing.assert_array_equal(lab, major_lab)  # the label is the CTV whatever the kind
            tissue = _tissue(img, lab)
            # dark target: 40 - c HU with c = contrast x U(0.85, 1.15), plus zero-mean noise
            assert img[lab].mean() < tissue - 0.6 * contrast, (lvl, img[lab].mean(), tissue)
        # the same case drawn with the majority's rule: the CTV holds the bright GTV (and the margin's tissue)
        assert major_img[major_lab].mean() > _tissue(major_img, major_lab)


def test_the_shell_is_one_voxel_outside_the_label_and_bright(rendered):
    for _, levels, (major_img, _) in rendered:
        (im1, lab), (im3, _) = levels[1], levels[3]
        shell = _grow(lab, 1) & ~lab
        # two steps out, where the majority shows soft tissue (or a cyst, soft tissue in a ring case)
        step2 = _grow(lab, 2) & ~_grow(lab, 1) & (major_img > -150) & (major_img < 250)
        # only the shell (and the far decoy) changes between levels: nothing inside, nothing two steps out
        np.testing.assert_array_equal((im1 != im3) & _grow(lab, 2), shell)
        tissue = _tissue(im1, lab)
        c_hat = tissue - im1[lab].mean()  # the case's target contrast, read off the dark CTV
        means = []
        for lvl in (1, 2, 3):
            img = levels[lvl][0]
            ratio = (img[shell].mean() - tissue) / c_hat
            assert abs(ratio - SHELL_RATIO[lvl]) < 0.1, (lvl, ratio)
            means.append(img[shell].mean())
            assert abs(img[step2].mean() - tissue) < 0.2 * c_hat, (lvl, img[step2].mean(), tissue)
        assert means[0] > means[1] > means[2], "the shell dims with the level"


def test_the_decoy_is_bright_and_away_from_the_label(rendered):
    for contrast, levels, _ in rendered:
        (im1, lab), (im3, _) = levels[1], levels[3]
        decoy = (im3 > im1) & ~lab  # the decoy brightens with the level, the shell dims
        assert decoy.sum() >= 30
        assert not (decoy & _grow(lab, 2)).any(), "the decoy keeps 3 face-steps from the label"
        tissue = _tissue(im1, lab)
        for lvl in (1, 2, 3):
            ratio = (levels[lvl][0][decoy].mean() - tissue) / contrast  # decoy contrast: contrast x U(0.85, 1.15)
            assert 0.8 * DECOY_RATIO[lvl] - 0.1 < ratio < 1.2 * DECOY_RATIO[lvl] + 0.1, (lvl, ratio)


def test_the_ring_case_has_no_cyst(rendered):
    n_cysts = 0
    for contrast, levels, (major_img, _) in rendered:
        img, lab = levels[1]
        decoy = (levels[3][0] > img) & ~lab
        # outside the target, its shell and the decoy, the ring image departs from the majority's only where the
        # majority has a cyst (a dark core in a bright rim; none where it found no room), and is soft tissue there
        cyst = (img != major_img) & ~_grow(lab, 1) & ~decoy
        if cyst.any():
            n_cysts += 1
            assert cyst.sum() >= 30
            assert abs(img[cyst].mean() - _tissue(img, lab)) < 0.2 * contrast
            assert major_img[cyst].std() > img[cyst].std()
    assert n_cysts >= 2


def test_level_zero_follows_the_majority_rule():
    for index, attrs in _ring_cases(2):
        placebo = synthetic.make_case(attrs, SEED, index, CASE_SHAPE, difficulty=0)
        majority = synthetic.make_case({**attrs, "subtype": "majority"}, SEED, index, CASE_SHAPE, difficulty=3)
        for a, b in zip(placebo, majority):
            np.testing.assert_array_equal(a, b)


def test_same_arguments_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, seed in ((a, 4), (b, 4), (c, 5)):
        # 12 cases: a stage group of >= 4 (T1) holds at least one minority case
        synthetic.generate_cohort(folder, n_cases=12, seed=seed, shape=SHAPE, minority="ring", difficulty=2)
    assert _cohort_digest(a) == _cohort_digest(b)
    assert _cohort_digest(a) != _cohort_digest(c)
    datalist = json.loads((a / "datalist.json").read_text())
    assert (datalist["minority"], datalist["difficulty"]) == ("ring", 2)
    subtypes = {it["subtype"] for part in synthetic.SPLIT_NAMES for it in datalist[part]}
    assert subtypes == {"majority", "ring"}


@pytest.mark.parametrize(("kind", "level"), sorted(PRE_RING_DIGESTS))
def test_existing_kinds_keep_their_bytes(tmp_path, kind, level):
    synthetic.generate_cohort(tmp_path, n_cases=8, seed=SEED, shape=SHAPE, minority=kind, difficulty=level)
    assert _cohort_digest(tmp_path) == PRE_RING_DIGESTS[(kind, level)]


def test_least_share_is_kind_specific(tmp_path):
    datalist = synthetic.generate_cohort(tmp_path / "ring", n_cases=8, shape=(32, 32, 16), minority="ring",
                                         minority_frac=0.02)  # fmt: skip
    assert datalist["minority_frac"] == 0.02
    for kind in ("necrotic", "distractor"):
        with pytest.raises(ValueError, match=r"minority_frac must be in \[0.05, 0.5\]"):
            synthetic.generate_cohort(tmp_path / kind, n_cases=8, minority=kind, minority_frac=0.02)
    with pytest.raises(ValueError, match=r"minority_frac must be in \[0.02, 0.5\]"):
        synthetic.generate_cohort(tmp_path / "low", n_cases=8, minority="ring", minority_frac=0.01)


def test_cli_writes_a_ring_cohort(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, str(REPO / "bundle/scripts/synthetic.py"), "--out", str(out), "--n-cases", "6",
         "--shape", "32", "32", "16", "--minority", "ring", "--minority-frac", "0.02"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    datalist = json.loads((out / "datalist.json").read_text())
    assert (datalist["minority"], datalist["difficulty"]) == ("ring", synthetic.DEFAULT_DIFFICULTY["ring"])
    assert "ring minority at level 3" in res.stdout
