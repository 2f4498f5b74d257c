"""Tests of the 2D synthetic cohort (``scripts/synthetic_2d.py``, METHOD.md section 5, "2D probe")."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scripts import synthetic, synthetic_2d

REPO = Path(__file__).resolve().parents[1]
NO_MARGIN = (0, 0, 0, 0)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _items(datalist):
    return [it for part in synthetic.SPLIT_NAMES for it in datalist[part]]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort2d")
    return out, synthetic_2d.generate_cohort(out, n_cases=100, seed=3)


def _attrs(n=200, seed=0, frac=0.1):
    return synthetic.draw_attributes(n, seed, "ring", frac, synthetic_2d.HARD_KINDS)


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` dilated by ``px`` 4-neighbour steps (wrapping at the border, as :func:`_box` does)."""
    out = mask.copy()
    for _ in range(px):
        out = out | np.roll(out, 1, 0) | np.roll(out, -1, 0) | np.roll(out, 1, 1) | np.roll(out, -1, 1)
    return out


def _box(image: np.ndarray, half: int) -> np.ndarray:
    """Mean over a (2 half + 1)^2 box (wrapping at the border)."""
    steps = range(-half, half + 1)
    return sum(np.roll(image.astype(float), (i, j), (0, 1)) for i in steps for j in steps) / len(steps) ** 2


def _contrasts(image: np.ndarray, disk: np.ndarray) -> tuple[float, float]:
    """Mean inside ``disk`` and on the 1 px ring around it, minus the tissue (median far from it), in grey levels."""
    tissue = np.median(image[~_grow(disk, 3)])
    ring = _grow(disk, 1) & ~disk
    return float(image[disk].mean() - tissue), float(image[ring].mean() - tissue)


def test_same_arguments_same_bytes_and_plain_png(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic_2d.generate_cohort(a, n_cases=12, seed=5)
    synthetic_2d.generate_cohort(b, n_cases=12, seed=5)
    synthetic_2d.generate_cohort(c, n_cases=12, seed=6)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # no time stamp or text chunk: only the header, the data and the end
    raw = (a / "images" / "case_000.png").read_bytes()
    chunks, pos = [], 8
    while pos < len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        chunks.append(raw[pos + 4 : pos + 8].decode())
        pos += 12 + length
    assert set(chunks) == {"IHDR", "IDAT", "IEND"}, chunks


def test_counts_and_datalist_fields(cohort):
    _, datalist = cohort
    items = _items(datalist)
    assert len(items) == 100 and len({it["id"] for it in items}) == 100
    # exact stage frequencies 0.35/0.30/0.20/0.15 of 100; minority floor(0.05 n + 0.5): 1.75, 1.5, 1.0, 0.75 -> 2 2 1 1
    for stage, n, n_min in zip(synthetic.STAGES, (35, 30, 20, 15), (2, 2, 1, 1)):
        group = [it for it in items if it["stage"] == stage]
        assert len(group) == n
        assert sum(it["subtype"] == "ring" for it in group) == n_min, stage
    assert len(datalist["training"]) == 60 and len(datalist["validation"]) == 20 and len(datalist["testing"]) == 20
    for it in items:
        assert it["subtype"] in ("majority", "ring") and it["institution"] in synthetic_2d.SITES
        assert it["hard_kind"] == ("low_contrast" if it["hard"] else "")
        assert it["image"] == f"images/{it['id']}.png" and it["label"] == f"labels/{it['id']}.png"
    expected = {"spatial_dims": 2, "class_names": ["background", "target"], "shape": [64, 64], "minority": "ring",
                "minority_frac": 0.05, "difficulty": 3, "stage_margin_px": [0, 1, 1, 2], "split": [0.6, 0.2, 0.2],
                "seed": 3, "grouping": "stage"}  # fmt: skip
    assert {k: datalist[k] for k in expected} == expected


def test_minority_frac_floor_is_002_in_2d_and_005_in_3d(tmp_path):
    # 1000 cases: stages 350/300/200/150, floor(0.02 n + 0.5) = 7, 6, 4, 3
    items = _attrs(1000, seed=1, frac=0.02)
    got = [sum(it["stage"] == s and it["subtype"] == "ring" for it in items) for s in synthetic.STAGES]
    assert got == [7, 6, 4, 3]
    # a group of 4 or more keeps one minority case although round(0.02 x 4) is 0: 12 cases are 4/4/2/2 -> 1/1/0/0
    small = _items(synthetic_2d.generate_cohort(tmp_path / "ok", n_cases=12, seed=0, minority_frac=0.02))
    got = [sum(it["stage"] == s and it["subtype"] == "ring" for it in small) for s in synthetic.STAGES]
    assert got == [1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"minority_frac must be in \[0.02"):
        synthetic_2d.generate_cohort(tmp_path / "low", n_cases=8, minority_frac=0.019)
    with pytest.raises(ValueError, match=r"minority_frac must be in \[0.05"):
        synthetic.generate_cohort(tmp_path / "3d", n_cases=8, shape=(16, 16, 16), minority_frac=0.02)


def test_placebo_draws_the_minority_with_the_majority_rule():
    attrs = _attrs()
    index = next(i for i, a in enumerate(attrs) if a["subtype"] != "majority")
    placebo = synthetic_2d.make_case(attrs[index], 0, index, difficulty=0, margins=NO_MARGIN)
    reference = synthetic_2d.make_case({**attrs[index], "subtype": "majority"}, 0, index, margins=NO_MARGIN)
    for a, b in zip(placebo, reference):
        np.testing.assert_array_equal(a, b)
    target, _ = _contrasts(placebo[0], placebo[1] > 0)
    # bright target: +0.30 x site (>= 0.80) x case (>= 0.9) of 255 grey levels >= 55
    assert target > 45, target
    # the minority's own rule changes the image, never the label
    deep = synthetic_2d.make_case(attrs[index], 0, index, difficulty=3, margins=NO_MARGIN)
    assert not np.array_equal(deep[0], placebo[0])
    np.testing.assert_array_equal(deep[1], placebo[1])


def test_level_3_minority_has_a_dark_target_a_bright_ring_and_a_decoy():
    attrs = _attrs()
    minority = [i for i, a in enumerate(attrs) if a["subtype"] != "majority"][:6]
    targets, rings = [], []
    for i in minority:
        image, label = synthetic_2d.make_case(attrs[i], 0, i, difficulty=3, margins=NO_MARGIN)
        target, ring = _contrasts(image, label > 0)
        targets.append(target)
        rings.append(ring)
        # the decoy: a bright disk (+0.30 x >= 0.72: >= 55 grey levels) away from the target, seen through a
        # 5x5 mean (noise sd <= 0.11 x 255 / 5 = 5.6); the placebo has none (its cyst is dark)
        far = ~_grow(label > 0, 3)
        tissue = np.median(image[far])
        assert _box(image, 2)[far].max() - tissue > 40, i
        placebo, _ = synthetic_2d.make_case(attrs[i], 0, i, difficulty=0, margins=NO_MARGIN)
        assert _box(placebo, 2)[far].max() - np.median(placebo[far]) < 30, i
    # hand-computed: target -0.30 and ring +0.15 times 0.72..1.21, in grey levels: -55..-93 and +28..+46
    assert all(t < -40 for t in targets), targets
    assert 20 < np.mean(rings) < 55 and all(r > t + 50 for r, t in zip(rings, targets)), rings


def test_ring_contrast_falls_and_decoy_brightens_with_the_level():
    assert synthetic_2d.RING_CONTRAST[1:] == (0.35, 0.25, 0.15)
    assert synthetic_2d.DECOY_CONTRAST[1:] == (0.10, 0.20, 0.30)
    attrs = _attrs()
    i = next(i for i, a in enumerate(attrs) if a["subtype"] != "majority" and a["stage"] == "T4")
    rings = []
    for level in (1, 2, 3):
        image, label = synthetic_2d.make_case(attrs[i], 0, i, difficulty=level, margins=NO_MARGIN)
        rings.append(_contrasts(image, label > 0)[1])
    assert rings[0] > rings[1] > rings[2], rings


def test_stage_margin_grows_the_label_and_is_invisible():
    attrs = _attrs()
    for stage, margin in zip(synthetic.STAGES, (0, 1, 1, 2)):
        for i in [i for i, a in enumerate(attrs) if a["stage"] == stage][:3]:
            image, label = synthetic_2d.make_case(attrs[i], 0, i)
            bare_image, disk = synthetic_2d.make_case(attrs[i], 0, i, margins=NO_MARGIN)
            np.testing.assert_array_equal(image, bare_image)
            assert (label >= disk).all()
            # equivalent radius sqrt(area / pi) grows by the margin: 0 / 1 / 1 / 2 px
            grown = np.sqrt(label.sum() / np.pi) - np.sqrt(disk.sum() / np.pi)
            assert abs(grown - margin) < 0.3, (stage, i, grown)


def test_hard_cases_have_low_contrast_and_sites_differ_in_noise(cohort):
    out, datalist = cohort
    from PIL import Image

    hard, plain, noise = [], [], {}
    for it in _items(datalist):
        image = np.asarray(Image.open(out / it["image"])).astype(float)
        label = np.asarray(Image.open(out / it["label"])) > 0
        if it["subtype"] == "majority":
            (hard if it["hard"] else plain).append(image[label].mean() - np.median(image[~_grow(label, 3)]))
        diff = np.abs(np.diff(image, axis=0))  # mostly plain tissue: the median ignores the disks' edges
        noise.setdefault(it["institution"], []).append(np.median(diff) / 0.6745 / np.sqrt(2))
    # hard: +0.09 x (0.72..1.21) x 255 = 17..28 grey levels (a little less where the label's margin is tissue)
    assert hard and max(hard) < 35 and min(plain) > 35, (hard, min(plain))
    med = {k: np.median(v) for k, v in noise.items()}
    assert med["A"] < med["B"] < med["C"], med


def test_png_loads_with_monai_as_the_arrays(tmp_path):
    from monai.transforms import LoadImage

    datalist = synthetic_2d.generate_cohort(tmp_path, n_cases=4, seed=2, shape=(64, 48))
    load = LoadImage(image_only=True, ensure_channel_first=True)
    attrs = synthetic.draw_attributes(4, 2, "ring", synthetic_2d.DEFAULT_MINORITY_FRAC, synthetic_2d.HARD_KINDS)
    for it in _items(datalist):
        image, label = load(str(tmp_path / it["image"])), load(str(tmp_path / it["label"]))
        assert tuple(image.shape) == (1, 64, 48) and tuple(label.shape) == (1, 64, 48)
        index = int(it["id"].split("_")[1])
        want = synthetic_2d.make_case(attrs[index], 2, index, shape=(64, 48))
        np.testing.assert_array_equal(np.asarray(image[0]), want[0])
        np.testing.assert_array_equal(np.asarray(label[0]), want[1])
        assert set(np.unique(np.asarray(label))) == {0, 1}


def test_invalid_arguments(tmp_path):
    bad = [
        ({"n_cases": 3}, "n_cases"),
        ({"shape": (32, 64)}, "shape"),
        ({"shape": (64, 64, 32)}, "shape"),
        ({"minority": "necrotic"}, "minority must be one of"),
        ({"difficulty": 4}, "difficulty"),
        ({"margins": (0, 1, 1, 4)}, "margins"),
        ({"grouping": "age"}, "grouping"),
        ({"split": (0.5, 0.3, 0.3)}, "split"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            synthetic_2d.generate_cohort(tmp_path, **{"n_cases": 8, **kwargs})


def test_cli_spatial_dims_2_and_refusals(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n-cases", "8", "--seed", "1", "--shape", "64", "64", "--minority", "ring",
            "--minority-frac", "0.05", "--difficulty", "2", "--split", "0.5", "0.25", "0.25"]  # fmt: skip
    res = subprocess.run([sys.executable, str(REPO / "bundle/scripts/synthetic.py"), "--spatial-dims", "2", *args],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    datalist = json.loads((out / "datalist.json").read_text())
    assert (datalist["spatial_dims"], datalist["difficulty"], datalist["split"]) == (2, 2, [0.5, 0.25, 0.25])
    assert len(_items(datalist)) == 8 and (out / "images" / "case_007.png").is_file()
    # the module itself, run as a file, gives the same bytes
    direct = subprocess.run([sys.executable, str(REPO / "bundle/scripts/synthetic_2d.py"), *args[2:], "--out",
                             str(tmp_path / "direct")], capture_output=True, text=True, check=False)  # fmt: skip
    assert direct.returncode == 0, direct.stderr
    assert _digest(out) == _digest(tmp_path / "direct")
    assert synthetic.main(["--spatial-dims", "2", "--out", str(tmp_path / "d"), "--n-cases", "8", "--dicom"]) == 2
    assert "--dicom" in capsys.readouterr().err and not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):  # 2D takes two sizes
        synthetic.main(["--spatial-dims", "2", "--out", str(tmp_path / "e"), "--shape", "64", "64", "32"])


def test_3d_cli_unchanged_by_the_spatial_dims_option(tmp_path):
    common = ["--n-cases", "4", "--seed", "2", "--shape", "16", "16", "16"]
    assert synthetic.main(["--out", str(tmp_path / "a"), *common]) == 0
    assert synthetic.main(["--spatial-dims", "3", "--out", str(tmp_path / "b"), *common]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    datalist = json.loads((tmp_path / "a" / "datalist.json").read_text())
    assert "spatial_dims" not in datalist and _items(datalist)[0]["image"].endswith(".nii.gz")
    with pytest.raises(SystemExit):  # 3D takes three sizes
        synthetic.main(["--out", str(tmp_path / "c"), "--n-cases", "4", "--shape", "64", "64"])
