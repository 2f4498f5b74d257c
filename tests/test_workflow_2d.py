"""Smoke tests of the 2D bundle: training, evaluation with the fairness report, and inference through MONAI's
ConfigWorkflow on the synthetic 2D cohort and on the FairSeg and HAM10000 stand-ins (tests/fixtures_2d.py).

The inference masks are checked against the evaluation independently: the Dice of each written PNG mask against
the label PNG (read with Pillow, not MONAI) must equal the Dice the evaluation scored on the original pixel grid,
which fails for a mask that is transposed, flipped or left at the network's size.
"""

import csv
import json
from pathlib import Path

import fixtures_2d
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_bundle_workflow as _run
from PIL import Image
from scripts import prepare_fairseg, prepare_ham10000, synthetic_2d

#: a few seconds per run on a CPU; image_size differs from the images' own size so resizing and its inversion run
TINY_2D = {"epochs": 2, "val_interval": 1, "features": 4, "num_experts": 4, "batch_size": 8, "image_size": [64, 64]}
TRAIN = ["train.json", "profiles/2d.json"]
EVALUATE = ["train.json", "evaluate.json", "profiles/2d.json", "profiles/2d_evaluate.json"]
INFER = ["inference.json", "profiles/2d_inference.json"]
NET_KEYS = ("features", "num_experts", "image_size")


def _train_eval_infer(data: Path, datalist: Path, run: Path, overlay: list[str], **extra) -> None:
    common = {"dataset_dir": str(data), "datalist": str(datalist), **extra}
    ckpt = {"output_dir": str(run), "ckpt_dir": str(run / "models")}
    _run(TRAIN + overlay, "train", "training", **common, **ckpt, **TINY_2D)
    _run(EVALUATE + overlay, "train", "evaluating", **common, **ckpt, **TINY_2D)
    net = {k: TINY_2D[k] for k in NET_KEYS}
    _run(INFER + overlay, "infer", "inference", **common, output_dir=str(run / "inference"),
         ckpt_path=str(run / "models" / "model.pt"), **net)  # fmt: skip


def _per_case(run: Path) -> dict[str, dict[str, str]]:
    with (run / "fairness" / "per_case.csv").open() as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _dice(pred: np.ndarray, label: np.ndarray, cls: int) -> float:
    p, g = pred == cls, label == cls
    total = p.sum() + g.sum()
    return 1.0 if total == 0 else 2.0 * float((p & g).sum()) / float(total)


def _testing(datalist: Path) -> list[dict]:
    return json.loads(datalist.read_text())["testing"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("cohort_2d")
    # 64 x 48 images (not square, not the network's 64 x 64): a transposed or unresized mask cannot pass
    synthetic_2d.generate_cohort(data, n_cases=40, seed=3, shape=(64, 48), minority_frac=0.1)
    run = tmp_path_factory.mktemp("run_2d")
    _train_eval_infer(data, data / "datalist.json", run, [])
    return data, run


def test_synthetic_2d_report(synthetic_run):
    data, run = synthetic_run
    cases = _per_case(run)
    testing = _testing(data / "datalist.json")
    assert sorted(cases) == sorted(it["id"] for it in testing)  # every testing case scored once
    row = next(iter(cases.values()))
    assert {"dice", "hd95_px", "stage", "subtype"} <= set(row)  # PNG input: distances in pixels, not mm
    assert "hd95" not in row
    metrics = json.loads((run / "fairness" / "metrics.json").read_text())
    dice = [float(r["dice"]) for r in cases.values()]
    assert metrics["groupings"]["stage"]["dice"]["dice_all"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert metrics["overall"]["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert (run / "fairness" / "report.html").is_file()


def test_synthetic_2d_masks_match_the_evaluation(synthetic_run):
    data, run = synthetic_run
    cases = _per_case(run)
    for item in _testing(data / "datalist.json"):
        label = _png(data / item["label"])
        png = _png(run / "inference" / f"{item['id']}_seg.png")
        assert png.shape == label.shape == (48, 64)  # PIL: rows x columns of the original image
        nii = np.asarray(nib.load(run / "inference" / f"{item['id']}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(np.squeeze(nii).T, png)  # NIfTI in MONAI's (X, Y) order, PNG in image order
        assert _dice(png, label, 1) == pytest.approx(float(cases[item["id"]]["dice"]), abs=1e-6)


def test_fairseg_fixture_multiclass(tmp_path):
    raw = fixtures_2d.write_fairseg(tmp_path / "raw", layout="readme", n=30, shape=(32, 40))
    datalist = tmp_path / "prepared" / "datalist.json"
    assert prepare_fairseg.main(["--data-dir", str(raw), "--out", str(datalist)]) == 0
    run = tmp_path / "run"
    _train_eval_infer(datalist.parent, datalist, run, ["profiles/fairseg.json"])
    cases = _per_case(run)
    assert sorted(cases) == sorted(it["id"] for it in _testing(datalist))
    for item in _testing(datalist):
        row = cases[item["id"]]
        # the case's Dice is the mean of its two foreground classes, each scored against the label PNG by hand
        png, label = _png(run / "inference" / f"{item['id']}_seg.png"), _png(datalist.parent / item["label"])
        assert png.shape == label.shape and set(np.unique(png)) <= {0, 1, 2}
        for cls, name in ((1, "rim"), (2, "cup")):
            assert float(row[f"dice_{name}"]) == pytest.approx(_dice(png, label, cls), abs=1e-6)
        assert float(row["dice"]) == pytest.approx((float(row["dice_rim"]) + float(row["dice_cup"])) / 2, abs=1e-9)
    metrics = json.loads((run / "fairness" / "metrics.json").read_text())
    per_class = metrics["groupings"]["race"]["per_class"]
    assert set(per_class) == {"rim", "cup"}
    assert {"es_dice", "es_iou"} <= set(per_class["cup"])
    assert set(metrics["groupings"]) == {"race", "gender", "ethnicity", "language"}


def test_ham10000_fixture_rgb(tmp_path):
    raw = fixtures_2d.write_ham10000(tmp_path / "raw", n_lesions=32, shape=(24, 32))
    datalist = tmp_path / "prepared" / "datalist.json"
    assert prepare_ham10000.main(["--data-dir", str(raw), "--out", str(datalist)]) == 0
    run = tmp_path / "run"
    _train_eval_infer(datalist.parent, datalist, run, ["profiles/ham10000.json"])
    cases = _per_case(run)
    for item in _testing(datalist):
        image = _png(item["image"]) if Path(item["image"]).is_absolute() else _png(datalist.parent / item["image"])
        png = _png(run / "inference" / f"{item['id']}_seg.png")
        assert image.shape == (24, 32, 3) and png.shape == (24, 32)  # RGB in, one mask on the JPEG's own grid
        label = _png(datalist.parent / item["label"])
        assert float(cases[item["id"]]["dice"]) == pytest.approx(_dice(png, label, 1), abs=1e-6)
    assert {"age_group", "sex"} <= set(json.loads((run / "fairness" / "metrics.json").read_text())["groupings"])


def test_reload_original_label(tmp_path):
    from monai.data import MetaTensor
    from monai.transforms import LoadImage, Resize
    from scripts.transforms import LabelMapMetad, ReloadOriginald

    label = np.zeros((5, 7), dtype=np.uint8)
    label[1:3, 2:6] = 2
    Image.fromarray(label).save(tmp_path / "l.png")
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "l.png"))
    resized = Resize((16, 16), mode="nearest")(loaded)
    out = ReloadOriginald(keys="label")({"label": resized})["label"]
    assert tuple(out.shape) == (1, 7, 5)  # MONAI's (X, Y): the file's 7 columns, 5 rows
    np.testing.assert_array_equal(out[0].numpy().T, label)
    with pytest.raises(ValueError, match="no file name"):
        ReloadOriginald(keys="label")({"label": MetaTensor(torch.zeros(1, 4, 4))})
    assert np.isnan(LabelMapMetad(keys="label")({"label": out})["label"].meta["original_channel_dim"])
