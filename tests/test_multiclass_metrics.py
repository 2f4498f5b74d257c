"""Tests of multi-class and 2D scoring: per-class Dice/IoU, per-class ES-Dice/ES-IoU, distance units, 2D reports."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from scripts.fairness_metrics import (
    CASE_METRICS_KEY,
    CaseMetricsHandler,
    FairnessMetricHandler,
    class_map,
    compute_case_metrics,
    resolve_distance_unit,
)
from scripts.fairness_report import (
    FairnessReportHandler,
    ReportSettings,
    make_thumbnail,
    per_class_metrics,
    write_fairness_report,
)
from scripts.fairness_stats import main as stats_main
from scripts.fairness_stats import read_per_case_csv
from test_fairness_report import _Page

NAMES = ["background", "rim", "cup"]


def _disc_case():
    """A 4x4 image, classes 0 background, 1 rim, 2 cup (rows are the first axis):

    label        prediction
    0 0 0 0      0 0 0 0
    0 1 1 0      0 1 1 0
    0 1 2 0      0 2 2 0
    0 0 0 0      0 0 0 0
    """
    label = np.zeros((4, 4), dtype=np.int64)
    label[1, 1] = label[1, 2] = label[2, 1] = 1
    label[2, 2] = 2
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[1, 1] = pred[1, 2] = 1
    pred[2, 1] = pred[2, 2] = 2
    return pred, label


def _onehot(m, n=3):
    return np.stack([m == k for k in range(n)]).astype(np.float32)


# ------------------------------------------------------------------------------------------------ per case
def test_per_class_dice_and_iou_by_hand():
    pred, label = _disc_case()
    m = compute_case_metrics(_onehot(pred), label[None], spacing=1.0, percentile=100, tolerance_mm=0.5,
                             spatial_dims=None, class_names=NAMES)  # fmt: skip
    # rim: P = {(1,1),(1,2)}, L = {(1,1),(1,2),(2,1)}: |P&L| = 2, dice = 2*2/(2+3) = 0.8, IoU = 2/3 (union 3)
    assert m["dice_rim"] == pytest.approx(0.8) and m["iou_rim"] == pytest.approx(2 / 3)
    # cup: P = {(2,1),(2,2)}, L = {(2,2)}: |P&L| = 1, dice = 2*1/(2+1) = 2/3, IoU = 1/2 (union 2)
    assert m["dice_cup"] == pytest.approx(2 / 3) and m["iou_cup"] == pytest.approx(0.5)
    # the case's scores are the means over the foreground classes: (0.8 + 2/3)/2 = 11/15, (2/3 + 1/2)/2 = 7/12
    assert m["dice"] == pytest.approx(11 / 15) and m["iou"] == pytest.approx(7 / 12)
    # HD (percentile 100): rim: (2,1) is 1 px from P; cup: (2,1) is 1 px from L -> both 1, mean 1
    assert m["hd95"] == pytest.approx(1.0)
    # NSD at 0.5: every pixel is boundary; rim: 2 of P and 2 of 3 of L within 0.5 -> 4/5; cup: 1 of 2 of P and
    # 1 of L -> 2/3; mean (4/5 + 2/3)/2 = 11/15
    assert m["nsd"] == pytest.approx(11 / 15, abs=1e-6)
    assert list(m) == ["dice", "iou", "hd95", "nsd", "dice_rim", "iou_rim", "dice_cup", "iou_cup"]
    # a one-hot label and a label map without channel axis give the same scores; default names class1, class2
    m_hot = compute_case_metrics(_onehot(pred), _onehot(label), spacing=1.0, percentile=100, tolerance_mm=0.5,
                                 spatial_dims=2)  # fmt: skip
    assert m_hot["dice_class1"] == pytest.approx(0.8) and m_hot["iou_class2"] == pytest.approx(0.5)
    assert m_hot["dice"] == pytest.approx(m["dice"]) and m_hot["nsd"] == pytest.approx(m["nsd"])
    assert compute_case_metrics(_onehot(pred), label, metrics=["dice"], spatial_dims=2)["dice"] == pytest.approx(
        11 / 15
    )


def test_empty_class_conventions():
    pred, label = _disc_case()
    label[label == 2] = 0  # no cup in the label, a cup of 2 pixels predicted
    no_cup = pred.copy()
    no_cup[no_cup == 2] = 0  # neither has a cup
    diag = np.sqrt(4**2 + 4**2)  # the image diagonal in pixels
    m = compute_case_metrics(_onehot(pred), label, spacing=1.0, percentile=100, spatial_dims=2)
    assert (m["dice_class2"], m["iou_class2"]) == (0.0, 0.0)  # exactly one empty: 0
    m2 = compute_case_metrics(_onehot(no_cup), label, spacing=1.0, percentile=100, spatial_dims=2)
    assert (m2["dice_class2"], m2["iou_class2"]) == (1.0, 1.0)  # both empty: 1
    # rim of no_cup: P = {(1,1),(1,2)} vs L = {(1,1),(1,2),(2,1)}: HD 1; cup both empty: HD 0 -> mean 0.5
    # NSD at the default tolerance 2: the rim's pixels are all within 1 of the other mask: 1; cup both empty: 1
    assert m2["hd95"] == pytest.approx(0.5) and m2["nsd"] == pytest.approx(1.0)
    assert m["nsd"] == pytest.approx(0.5)  # rim 1, cup only predicted: 0
    # a cup predicted but absent: HD of the cup is the image diagonal; rim P = {(1,1),(1,2)}: HD 1
    assert m["hd95"] == pytest.approx((1.0 + diag) / 2)


def test_invalid_inputs_name_the_argument():
    pred, label = _disc_case()
    with pytest.raises(ValueError, match="class_names.*2 names.*3 channels"):
        compute_case_metrics(_onehot(pred), label, spatial_dims=2, class_names=["background", "rim"])
    with pytest.raises(ValueError, match="class_names"):
        CaseMetricsHandler(class_names=["background", "rim", "rim"])
    with pytest.raises(ValueError, match="class_names"):
        CaseMetricsHandler(class_names=["background", "optic cup"])  # a space cannot be part of a column name
    with pytest.raises(TypeError, match="class_names"):
        CaseMetricsHandler(class_names="rim")
    with pytest.raises(ValueError, match="distance_unit"):
        CaseMetricsHandler(distance_unit="cm")
    with pytest.raises(ValueError, match="spacing"):
        CaseMetricsHandler(distance_unit="px", spacing=0.5)
    with pytest.raises(ValueError, match="spatial_dims"):
        CaseMetricsHandler(spatial_dims=4)
    with pytest.raises(ValueError, match="class indices 0..2"):
        class_map(np.full((1, 4, 4), 3), 3, 2)  # value 3 is no class of 3
    with pytest.raises(ValueError, match="class indices"):
        class_map(np.full((4, 4), 0.5), 3, 2)  # not an integer
    engine = _engine([[{"pred": _onehot(pred)[:2], "label": label[None]}]])  # 2-channel pred, 3 names
    CaseMetricsHandler(class_names=NAMES).attach(engine)
    with pytest.raises(ValueError, match="class_names.*3 names.*2 channels"):
        engine.run([0], max_epochs=1)


# ------------------------------------------------------------------------------------------------ distance units
def _meta(array, name, pixdim=0.5):
    affine = torch.diag(torch.tensor([pixdim, pixdim, 1.0]))
    return MetaTensor(torch.as_tensor(array), affine=affine, meta={"filename_or_obj": name})


def test_hd95_px_or_mm_from_the_file_or_the_argument():
    pred, label = _disc_case()
    # one foreground class, the rim: HD (percentile 100) is 1 pixel = 0.5 mm at 0.5 mm spacing
    p1, l1 = (pred == 1)[None].astype(np.float32), (label == 1)[None].astype(np.float32)
    kw = {"percentile": 100, "spatial_dims": None, "distance_unit": "auto"}
    png = compute_case_metrics(_meta(p1, "eye.png"), _meta(l1, "eye_seg.png"), **kw)
    assert set(png) == {"dice", "hd95_px", "nsd_px"} and png["hd95_px"] == pytest.approx(1.0)
    nii = compute_case_metrics(_meta(p1, "eye.nii.gz"), _meta(l1, "eye_seg.nii.gz"), **kw)
    assert set(nii) == {"dice", "hd95", "nsd"} and nii["hd95"] == pytest.approx(0.5)
    # the explicit argument wins over the file name
    kw["distance_unit"] = "px"
    assert compute_case_metrics(_meta(p1, "eye.nii.gz"), _meta(l1, "a.nii"), **kw)["hd95_px"] == pytest.approx(1.0)
    kw["distance_unit"] = "mm"
    assert compute_case_metrics(_meta(p1, "eye.jpg"), _meta(l1, "a.jpg"), **kw)["hd95"] == pytest.approx(0.5)
    # NSD in pixels: tolerance 0.5 px: rim P 2/2 within, L 2/3 within -> 4/5; tolerance 1 px: all -> 1
    kw["distance_unit"] = "auto"
    m = compute_case_metrics(_meta(p1, "eye.npz"), _meta(l1, "a.npz"), tolerance_mm=0.5, **kw)
    assert m["nsd_px"] == pytest.approx(0.8, abs=1e-6)
    assert resolve_distance_unit("auto", None, _meta(p1, "EYE.JPEG")) == "px"
    assert resolve_distance_unit("auto", 0.5, _meta(p1, "eye.png")) == "mm"  # an explicit spacing is in mm
    assert resolve_distance_unit("auto", None, torch.zeros(1, 4, 4)) == "mm"  # no file: as before


# ------------------------------------------------------------------------------------------------ binary unchanged
def test_binary_case_keeps_its_columns_and_values(tmp_path):
    label = np.zeros((1, 8, 8, 4), dtype=np.float32)
    label[0, 2:6, 2:6, 1:3] = 1
    pred = np.roll(label, 1, axis=1)  # shifted one voxel along axis 0
    affine = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
    p = MetaTensor(torch.from_numpy(np.concatenate([1 - pred, pred])), affine=affine, meta={"filename_or_obj": "a.nii"})
    t = MetaTensor(torch.from_numpy(label), affine=affine)
    old_style = compute_case_metrics(p, t)  # the defaults of before: 3 spatial dims, mm
    engine = _engine([[{"pred": p, "label": t, "id": "c0", "stage": "T1"}]])
    scorer = CaseMetricsHandler()  # spatial_dims None, distance_unit auto, no class names
    scorer.attach(engine)
    report = FairnessReportHandler(tmp_path, ReportSettings(["stage"], n_boot=10, thumbnails=False), scores=scorer)
    report.attach(engine)
    engine.run([0], max_epochs=1)
    scores = engine.state.output[0][CASE_METRICS_KEY]
    assert list(scores) == ["dice", "hd95", "nsd"] and scores == old_style
    # 4x4x2 block shifted by one voxel: overlap 3*4*2 = 24 of 32 each: dice = 48/64 = 0.75; HD95 1 mm along axis 0
    assert scores["dice"] == pytest.approx(0.75) and scores["hd95"] == pytest.approx(1.0)
    text = (tmp_path / "fairness" / "per_case.csv").read_text()
    assert text.splitlines()[0] == "id,stage,dice,hd95,nsd"
    assert text.splitlines()[1] == f"c0,T1,{scores['dice']!r},{scores['hd95']!r},{scores['nsd']!r}"
    metrics = json.loads((tmp_path / "fairness" / "metrics.json").read_text())
    assert "classes" not in metrics and "per_class" not in metrics["groupings"]["stage"]
    assert metrics["settings"]["nsd_tolerance_mm"] == 2.0


# ------------------------------------------------------------------------------------------------ per class ES
def _class_records():
    """Four cases in two groups with per-class scores (the case-level dice/iou: means over the two classes)."""
    values = {  # id: (group, dice_rim, iou_rim, dice_cup, iou_cup)
        "a1": ("A", 0.8, 0.5, 0.4, 0.2),
        "a2": ("A", 0.6, 0.5, 0.6, 0.4),
        "b1": ("B", 1.0, 1.0, 0.5, 0.1),
        "b2": ("B", 0.9, 0.7, 0.5, 0.3),
    }
    rows = []
    for cid, (g, dr, ir, dc, ic) in values.items():
        rows.append({"id": cid, "site": g, "dice": (dr + dc) / 2, "iou": (ir + ic) / 2, "hd95_px": 2.0,
                     "dice_rim": dr, "iou_rim": ir, "dice_cup": dc, "iou_cup": ic})  # fmt: skip
    return rows


# ES-M = M_all / (1 + sum_g |M_all - M_g|), M_all over the 4 cases:
# rim Dice: A (0.8+0.6)/2 = 0.7, B (1.0+0.9)/2 = 0.95, all 3.3/4 = 0.825 -> 0.825 / (1 + 0.125 + 0.125) = 0.66
# rim IoU:  A 0.5, B 0.85, all 2.7/4 = 0.675 -> 0.675 / (1 + 0.175 + 0.175) = 0.5
# cup Dice: A 0.5, B 0.5, all 0.5 -> 0.5 / 1 = 0.5
# cup IoU:  A 0.3, B 0.2, all 0.25 -> 0.25 / (1 + 0.05 + 0.05) = 0.25 / 1.1
EXPECTED_ES = {"rim": (0.66, 0.5), "cup": (0.5, 0.25 / 1.1)}


def test_es_dice_and_es_iou_per_class_by_hand():
    pc = per_class_metrics(_class_records(), "site", ["rim", "cup"])
    for c, (es_dice, es_iou) in EXPECTED_ES.items():
        assert pc[c]["es_dice"] == pytest.approx(es_dice) and pc[c]["es_iou"] == pytest.approx(es_iou), c
    assert pc["rim"]["dice_all"] == pytest.approx(0.825) and pc["rim"]["iou_all"] == pytest.approx(0.675)
    assert pc["rim"]["groups"]["A"] == {"n": 2, "dice": pytest.approx(0.7), "iou": pytest.approx(0.5)}
    assert pc["rim"]["worst_group"] == "A" and pc["rim"]["worst_group_dice"] == pytest.approx(0.7)
    assert pc["cup"]["worst_group_iou"] == pytest.approx(0.2)


def test_per_class_group_means_match_fairlearn():
    from fairlearn.metrics import MetricFrame  # pinned in requirements-dev.txt

    rows = _class_records()
    pc = per_class_metrics(rows, "site", ["rim", "cup"])
    groups = [r["site"] for r in rows]
    for c in ("rim", "cup"):
        for m in ("dice", "iou"):
            y = np.array([r[f"{m}_{c}"] for r in rows])
            frame = MetricFrame(
                metrics=lambda yt, yp: float(np.mean(yt)), y_true=y, y_pred=y, sensitive_features=groups
            )
            by_group = frame.by_group.to_dict()
            es = frame.overall / (1 + sum(abs(frame.overall - v) for v in by_group.values()))
            assert pc[c][f"{m}_all"] == pytest.approx(frame.overall)
            assert {g: e[m] for g, e in pc[c]["groups"].items()} == pytest.approx(by_group)
            assert pc[c][f"es_{m}"] == pytest.approx(es)


def test_2d_report_has_per_class_columns_and_es_values(tmp_path, capsys):
    rows = _class_records()
    rng = np.random.default_rng(0)
    thumbs = {r["id"]: (rng.integers(0, 255, (8, 6, 3), dtype=np.uint8), rng.integers(0, 3, (8, 6), dtype=np.uint8),
                        rng.integers(0, 3, (8, 6), dtype=np.uint8)) for r in rows}  # fmt: skip
    paths = write_fairness_report(tmp_path, rows, ["site"], thumbnails=thumbs, n_boot=20)
    with paths["per_case"].open() as f:
        reader = csv.DictReader(f)
        header, lines = reader.fieldnames, list(reader)
    assert header == ["id", "site", "dice", "iou", "hd95_px", "dice_rim", "iou_rim", "dice_cup", "iou_cup"]
    assert float(lines[0]["dice_rim"]) == 0.8 and float(lines[3]["iou_cup"]) == 0.3
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["classes"] == ["rim", "cup"]
    block = metrics["groupings"]["site"]
    for c, (es_dice, es_iou) in EXPECTED_ES.items():
        assert block["per_class"][c]["es_dice"] == pytest.approx(es_dice)
        assert block["per_class"][c]["es_iou"] == pytest.approx(es_iou)
    # the case-level dice is the mean over classes: A (0.6, 0.6) -> 0.6, B (0.75, 0.7) -> 0.725, all 0.6625
    assert block["dice"]["worst_group_dice"] == pytest.approx(0.6)
    assert block["dice"]["dice_all"] == pytest.approx(0.6625)
    assert "hd95_px" in block and "hd95" not in block and block["hd95_px"]["groups"]["A"]["mean"] == 2.0
    page = _Page()
    text = paths["report"].read_text()
    page.feed(text)
    for c, (es_dice, es_iou) in EXPECTED_ES.items():
        assert float(page.values[f"site.per_class.{c}.es_dice"]) == pytest.approx(es_dice, abs=1e-4)
        assert float(page.values[f"site.per_class.{c}.es_iou"]) == pytest.approx(es_iou, abs=1e-4)
    assert float(page.values["site.per_class.rim.groups.B.dice"]) == pytest.approx(0.95)
    assert "Per class by site" in text and "HD95 mean (px)" in text and "hd95_px (px)" in text
    assert any(src.startswith("thumbs/") for src in page.images)
    assert all((paths["report"].parent / src).is_file() for src in page.images)
    # the CSV reads back with numbers, and the summary prints the per-class Dice and ES values
    back = read_per_case_csv(tmp_path)
    assert back[0]["dice_cup"] == 0.4 and back[0]["site"] == "A"
    assert stats_main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "HD95 2.0 px" in out
    assert "per-class Dice (mean over cases): rim 0.825, cup 0.500" in out
    assert "site: per-class ES-Dice / ES-IoU: rim 0.660 / 0.500, cup 0.500 / 0.227" in out


# ------------------------------------------------------------------------------------------------ thumbnails
def test_2d_thumbnails_rgb_and_class_maps():
    pred, label = _disc_case()
    image = np.zeros((3, 4, 4), dtype=np.float32)
    image[0] = 200.0  # red everywhere ...
    image[:, 0, 0] = 255.0  # ... white at pixel (0, 0)
    img, lab, prd = make_thumbnail(image, label[None], _onehot(pred), spatial_dims=None)
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8
    # 2D: the second axis is reversed for display (row 0 on top): pixel (0, 0) is at [0, -1]
    assert tuple(img[0, -1]) == (255, 255, 255) and img[1, 1, 0] > img[1, 1, 1]  # red stays red
    assert lab.dtype == np.uint8 and np.array_equal(lab, label[:, ::-1]) and np.array_equal(prd, pred[:, ::-1])
    # a grey 2D image, binary masks: as for 3D, bool masks; stride 2 for max_size 2
    grey, blab, _ = make_thumbnail(np.arange(16.0).reshape(1, 4, 4), (label > 0)[None], _onehot(pred > 0, 2),
                                   max_size=2, spatial_dims=2)  # fmt: skip
    assert grey.shape == blab.shape == (2, 2) and blab.dtype == bool
    # a 3D multi-class case: the slice through the classes' extent, class indices kept
    vol = np.zeros((6, 6, 5), dtype=np.int64)
    vol[1:3, 1:3, 3] = 1
    vol[2, 2, 3] = 2
    _, lab3, prd3 = make_thumbnail(None, vol[None], _onehot(vol), spatial_dims=3)
    assert set(np.unique(lab3)) == {0, 1, 2} and np.array_equal(lab3, prd3)


# ------------------------------------------------------------------------------------------------ handlers in 2D
def _engine(batches):
    def step(engine, batch):
        return [dict(b) for b in batches[engine.state.iteration - 1]]

    return Engine(step)


def test_2d_multiclass_evaluation_end_to_end(tmp_path):
    pred, label = _disc_case()
    perfect = _meta(_onehot(label), "p0.png"), _meta(label[None].astype(np.float32), "p0_seg.png")
    imperfect = _meta(_onehot(pred), "p1.png"), _meta(label[None].astype(np.float32), "p1_seg.png")
    items = [
        {"pred": perfect[0], "label": perfect[1], "image": torch.rand(3, 4, 4), "site": "A"},
        {"pred": imperfect[0], "label": imperfect[1], "image": torch.rand(3, 4, 4), "site": "B"},
    ]
    engine = _engine([items])
    scorer = CaseMetricsHandler(class_names=NAMES, percentile=100, tolerance_mm=0.5)
    metric = FairnessMetricHandler(attribute="site", output="worst_group_dice", scores=scorer)
    nsd = FairnessMetricHandler(attribute="site", metric="nsd", output="nsd_all", scores=scorer)
    report = FairnessReportHandler(tmp_path, ReportSettings(["site"], n_boot=10), scores=scorer)
    for h in (scorer, report):
        h.attach(engine)
    metric.attach(engine, "worst_site_dice")
    nsd.attach(engine, "nsd_all")
    engine.run([0], max_epochs=1)
    # p0 perfect: dice 1; p1: 11/15 (first test); worst group B; NSD read from nsd_px: (1 + 11/15)/2
    assert engine.state.metrics["worst_site_dice"] == pytest.approx(11 / 15)
    assert engine.state.metrics["nsd_all"] == pytest.approx((1 + 11 / 15) / 2, abs=1e-6)
    fair = Path(tmp_path) / "fairness"
    with (fair / "per_case.csv").open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["p0", "p1"]  # ids from the file names, .png dropped
    assert list(rows["p1"]) == ["id", "site", "dice", "iou", "hd95_px", "nsd_px", "dice_rim", "iou_rim",
                                "dice_cup", "iou_cup"]  # fmt: skip
    assert float(rows["p1"]["dice_rim"]) == pytest.approx(0.8) and float(rows["p1"]["hd95_px"]) == 1.0
    metrics = json.loads((fair / "metrics.json").read_text())
    assert metrics["settings"]["nsd_tolerance_px"] == 0.5 and "nsd_tolerance_mm" not in metrics["settings"]
    # rim Dice: A 1, B 0.8, all 0.9 -> ES 0.9 / (1 + 0.1 + 0.1) = 0.75
    assert metrics["groupings"]["site"]["per_class"]["rim"]["es_dice"] == pytest.approx(0.75)
    assert "nsd_px" in metrics["groupings"]["site"]
    page = _Page()
    page.feed((fair / "report.html").read_text())
    assert any(src.startswith("thumbs/") for src in page.images)
    assert all((fair / src).is_file() for src in page.images)
