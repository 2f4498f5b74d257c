"""Tests of scripts.fairness_report: report files, HTML consistency, thumbnails, routing and the Ignite handler."""

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from scripts.fairness_report import (
    FairnessReportHandler,
    ReportSettings,
    make_thumbnail,
    routing_from_network,
    routing_summary,
    worst_cases,
    write_fairness_report,
)


class _Page(HTMLParser):
    """Collects <img src> and the text of elements carrying data-key."""

    def __init__(self):
        super().__init__()
        self.images, self.values, self._key = [], {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if "data-key" in a:
            self._key = a["data-key"]
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.images.append(a.get("href") or a.get("src"))  # no external resource may be referenced

    def handle_data(self, data):
        if self._key is not None:
            self.values[self._key] = data
            self._key = None


def _records(n=36, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        stage = ["T1", "T2", "T3"][i % 3]
        inst = ["A", "B"][i % 2]
        hard = i % 7 == 0
        dice = float(np.clip(rng.normal(0.8, 0.1) - (0.5 if hard else 0), 0, 1))
        rows.append(
            {"id": f"case{i:03d}", "stage": stage, "institution": inst, "age": 50 + i, "dice": dice,
             "hd95": float(rng.uniform(1, 20)), "nsd": float(np.clip(dice + 0.05, 0, 1)), "hard": hard}
        )  # fmt: skip
    return rows


def _routing():
    rng = np.random.default_rng(1)
    return {
        "counts": {f"enc{k}": rng.integers(0, 50, size=(4, 6)) for k in range(3)},  # G=3 stages + unknown, E=6
        "subgroups": ["T1", "T2", "T3"],
    }


def test_report_files_images_and_headline_match_json(tmp_path):
    records = _records()
    rng = np.random.default_rng(2)
    thumbs = {
        r["id"]: (
            rng.integers(0, 255, (20, 16), dtype=np.uint8),
            rng.random((20, 16)) > 0.5,
            rng.random((20, 16)) > 0.5,
        )
        for r in records
    }
    paths = write_fairness_report(
        tmp_path, records, ["stage", "institution"], routing=_routing(), thumbnails=thumbs, n_boot=100, seed=0
    )
    fair = tmp_path / "fairness"
    assert paths == {
        "per_case": fair / "per_case.csv",
        "metrics": fair / "metrics.json",
        "report": fair / "report.html",
    }
    # per-case table: id, every attribute, metrics, hard
    with paths["per_case"].open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "stage", "institution", "age", "dice", "hd95", "nsd", "hard"]
    assert len(rows) == len(records) and rows[0]["hard"] == "true" and float(rows[1]["dice"]) == records[1]["dice"]

    metrics = json.loads(paths["metrics"].read_text())
    assert set(metrics["groupings"]) == {"stage", "institution"}
    assert metrics["routing"]["subgroups"] == ["T1", "T2", "T3", "unknown"]
    assert np.allclose(np.sum(metrics["routing"]["layers"]["enc0"]["fractions"], axis=1), 1.0)

    page = _Page()
    page.feed(paths["report"].read_text())
    assert page.images, "the report shows images"
    for src in page.images:
        assert not src.startswith(("http:", "https:", "//", "/")), src
        assert (fair / src).is_file(), src
    assert "plots/routing.png" in page.images
    assert any(src.startswith("thumbs/") for src in page.images)
    # every headline number in the page equals metrics.json (4 decimals)
    for attribute in ("stage", "institution"):
        d = metrics["groupings"][attribute]["dice"]
        for name in ("dice_all", "worst_group_dice", "group_gap", "es_dice", "es_dice_std", "worst_group_cvar"):
            assert page.values[f"{attribute}.dice.{name}"] == f"{d[name]:.4f}", (attribute, name)
        assert page.values[f"{attribute}.dice.hidden_failures"] == str(d["hidden_failures"])
        for g, ge in d["groups"].items():
            assert page.values[f"{attribute}.dice.groups.{g}.cvar"] == f"{ge['cvar']:.4f}"


def test_report_input_errors(tmp_path):
    records = _records(6)
    with pytest.raises(ValueError, match="repeated"):
        write_fairness_report(tmp_path, records + records[:1], ["stage"], n_boot=10)
    with pytest.raises(ValueError, match="non-finite"):
        write_fairness_report(tmp_path, [dict(records[0], hd95=float("inf")), *records[1:]], ["stage"], n_boot=10)
    with pytest.raises(ValueError, match="in no record"):
        write_fairness_report(tmp_path, records, ["sex"], n_boot=10)


def test_worst_cases_are_the_cvar_tail():
    rows = [{"id": str(i), "g": "x", "dice": d} for i, d in enumerate([0.9, 0.2, 0.8, 0.5, 0.7, 0.6, 0.95])]
    # n=7, alpha=0.2 -> ceil(1.4) = 2 cases: 0.2 then 0.5
    assert [r["id"] for r in worst_cases(rows, "g", alpha=0.2)["x"]] == ["1", "3"]
    assert len(worst_cases(rows, "g", alpha=1.0, n_worst=3)["x"]) == 3


def test_make_thumbnail_slices_through_the_target():
    label = np.zeros((40, 30, 20))
    label[10:20, 5:15, 12:17] = 1  # target on slices 12..16: the middle is slice 14
    image = np.zeros_like(label)
    image[..., 14] = np.arange(40)[:, None] * 10.0  # only slice 14 has contrast
    img, lab, prd = make_thumbnail(image, label[None], np.zeros((2, 40, 30, 20)), max_size=20)
    assert img.shape == lab.shape == prd.shape == (20, 15)  # stride 2
    assert img.dtype == np.uint8 and img.max() == 255  # slice 14 holds the bright values
    assert lab.sum() == 5 * 5 and not prd.any()
    # image on another grid: black background, no error
    img2, _, _ = make_thumbnail(np.ones((10, 10, 10)), label, label, max_size=40)
    assert not img2.any()


def test_routing_summary_and_network():
    s = routing_summary({"l0": torch.tensor([[3, 1], [0, 0], [1, 1]])}, ["T1", "T2"])
    assert s["subgroups"] == ["T1", "T2", "unknown"] and s["n_experts"] == 2
    assert s["layers"]["l0"]["fractions"] == [[0.75, 0.25], [0.0, 0.0], [0.5, 0.5]]
    with pytest.raises(ValueError, match="routing rows"):
        routing_summary({"l0": np.ones((5, 2))}, ["T1", "T2"])

    class Net(torch.nn.Module):
        def routing_stats(self):
            return {"enc0": torch.ones(3, 4, dtype=torch.int64)}

    assert routing_from_network(Net(), ["T1", "T2"])["layers"]["enc0"]["fractions"][0] == [0.25] * 4
    assert routing_from_network(torch.nn.Linear(1, 1)) is None


class _RoutingNet(torch.nn.Module):
    """Stands in for DMoEResUNet: routing counters with reset/enable switches."""

    def __init__(self):
        super().__init__()
        self.enabled, self.resets = False, 0

    def set_routing_stats(self, enabled=True):
        self.enabled = enabled

    def reset_routing_stats(self):
        self.resets += 1

    def routing_stats(self):
        return {"enc0": torch.tensor([[4, 0, 1], [0, 5, 0], [1, 1, 1]]), "enc1": torch.tensor([[1, 1, 0]] * 3)}


def _evaluator_batches():
    """Two iterations of two decollated cases each, as MONAI's evaluator leaves them after post-transforms."""
    affine = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
    batches = []
    for it in range(2):
        batch = []
        for j in range(2):
            k = 2 * it + j
            label = torch.zeros(1, 12, 12, 6)
            label[0, 3:9, 3:9, 2:4] = 1
            pred = torch.roll(label, shifts=k, dims=1)  # case k: shifted by k voxels
            batch.append(
                {
                    "image": torch.rand(1, 12, 12, 6),
                    "label": MetaTensor(torch.cat([1 - label, label]), affine=affine),  # one-hot label
                    "pred": MetaTensor(pred, affine=affine),  # label-map prediction
                    "id": f"p{k}",
                    "stage": ["T1", "T2"][k % 2],
                    "institution": "A",
                    "hard": torch.tensor(k == 3),
                }
            )
        batches.append(batch)
    return batches


def test_report_handler_on_fake_evaluator(tmp_path):
    def step(engine, batch):
        return [{"image": b["image"], "label": b["label"], "pred": b["pred"]} for b in batch]

    engine = Engine(step)
    net = _RoutingNet()
    settings = ReportSettings(["stage"], attribute_keys=["institution"], n_boot=50)
    handler = FairnessReportHandler(tmp_path, settings, network=net, routing_subgroups=["T1", "T2"])
    handler.attach(engine)
    engine.run(_evaluator_batches(), max_epochs=1)
    fair = Path(tmp_path) / "fairness"
    for name in ("per_case.csv", "metrics.json", "report.html"):
        assert (fair / name).is_file(), name
    with (fair / "per_case.csv").open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["p0", "p1", "p2", "p3"]
    assert rows["p0"]["dice"] == "1.0" and rows["p3"]["hard"] == "true" and rows["p1"]["institution"] == "A"
    assert "subtype" not in rows["p0"]  # cases without a subtype: no column, no minority block
    # case 1: a 6x6x2 block shifted by one voxel: dice = 2*5*6*2 / (2*72) = 5/6; HD95 = 1 mm along axis 0
    assert float(rows["p1"]["dice"]) == pytest.approx(5 / 6)
    assert float(rows["p1"]["hd95"]) == pytest.approx(1.0)
    metrics = json.loads((fair / "metrics.json").read_text())
    assert metrics["settings"]["nsd_tolerance_mm"] == 2.0
    assert "minority" not in metrics["groupings"]["stage"]
    assert metrics["routing"]["layers"]["enc0"]["counts"][1] == [0, 5, 0]
    assert net.resets == 1 and net.enabled is False  # reset at start, recording switched off at the end
    page = _Page()
    page.feed((fair / "report.html").read_text())
    assert all((fair / src).is_file() for src in page.images)
    assert any(src.startswith("thumbs/") for src in page.images)


def test_handlers_in_a_monai_supervised_evaluator(tmp_path):
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.transforms import AsDiscreted
    from scripts.fairness_metrics import FairnessMetricHandler

    class Net(torch.nn.Module):  # logits favour the foreground where the image is bright
        def forward(self, x):
            return torch.cat([1 - x, x], dim=1) * 10

    affine = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
    data = []
    for k in range(5):
        label = torch.zeros(1, 10, 10, 4)
        label[0, 2:6, 2:6, 1:3] = 1
        image = torch.roll(label, shifts=2 * (k % 2), dims=1)  # odd cases: shifted by 2 -> dice 0.5
        data.append(
            {"image": MetaTensor(image, affine=affine), "label": MetaTensor(label, affine=affine), "id": f"s{k}",
             "stage": "T1" if k < 3 else "T2", "hard": k == 1, "subtype": "necrotic" if k == 1 else "majority"}
        )  # fmt: skip
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=Net(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[2, 2]),
        key_val_metric={"worst_stage_dice": FairnessMetricHandler(attribute="stage")},
        additional_metrics={"stage_cvar": FairnessMetricHandler(attribute="stage", output="worst_group_cvar")},
        val_handlers=[FairnessReportHandler(tmp_path, ReportSettings(["stage"], n_boot=20))],
    )
    evaluator.run()
    # T1: s0 1, s1 0.5, s2 1 -> 2.5/3; T2: s3 0.5, s4 1 -> 0.75; CVaR(0.2): T1 k=0.6 -> 0.5, T2 k=0.4 -> 0.5
    assert evaluator.state.metrics["worst_stage_dice"] == pytest.approx(0.75)
    assert evaluator.state.metrics["stage_cvar"] == pytest.approx(0.5)
    metrics = json.loads((tmp_path / "fairness" / "metrics.json").read_text())
    assert metrics["groupings"]["stage"]["dice"]["worst_group_dice"] == pytest.approx(0.75)
    assert metrics["groupings"]["stage"]["dice"]["hard_failures"] == 0  # s1 (hard) scores 0.5, not below
    assert metrics["n_cases"] == 5
    # the subtype strings survive collation: T1's minority is s1 (Dice 0.5), its majority s0 and s2 (Dice 1)
    t1 = metrics["groupings"]["stage"]["minority"]["groups"]["T1"]
    assert (t1["minority_dice"], t1["majority_dice"], t1["n_majority"]) == (pytest.approx(0.5), 1.0, 2)


def _cohort(n=7, seed=0):
    """Synthetic cases with varied overlaps on an anisotropic grid; the image is the prediction's mask."""
    rng = np.random.default_rng(seed)
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0]))
    data = []
    for k in range(n):
        label = np.zeros((1, 16, 14, 6), dtype=np.float32)
        x, y = rng.integers(2, 6, size=2)
        label[0, x : x + 8, y : y + 6, 1:5] = 1
        pred = label.copy()
        flip = rng.random(label.shape) < 0.06 + 0.04 * k  # more voxels flipped in later cases: lower Dice
        pred[flip] = 1 - pred[flip]
        data.append(
            {"image": MetaTensor(torch.from_numpy(pred), affine=affine),
             "label": MetaTensor(torch.from_numpy(label), affine=affine), "id": f"c{k}",
             "stage": ["T1", "T2", "T3"][k % 3], "institution": ["A", "B"][k % 2], "hard": k == 4}
        )  # fmt: skip
    return data


def _run_evaluator(data, out_dir, shared: bool):
    """Evaluate ``data`` with the report, a mean-Dice key metric and a worst-group metric: scored once and shared
    (``shared``, as evaluate.json), or the earlier layout (MONAI's MeanDice and every handler scoring itself)."""
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.transforms import AsDiscreted
    from scripts.fairness_metrics import CaseMetricsHandler, FairnessMetricHandler

    class Net(torch.nn.Module):  # foreground where the image is 1
        def forward(self, x):
            return torch.cat([1 - x, x], dim=1) * 10

    scorer = CaseMetricsHandler() if shared else None
    if shared:
        mean = FairnessMetricHandler(attribute="stage", output="dice_all", scores=scorer)
    else:
        mean = MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
    settings = ReportSettings(["stage", "institution"], n_boot=50, thumbnails=False)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=Net(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[2, 2]),
        key_val_metric={"mean_dice": mean},
        additional_metrics={"worst": FairnessMetricHandler(attribute="stage", scores=scorer)},
        val_handlers=[*([scorer] if shared else []), FairnessReportHandler(out_dir, settings, scores=scorer)],
    )
    evaluator.run()
    return evaluator, scorer


def _assert_close_tree(a, b, where=""):
    """Equal JSON trees, numbers to 1e-6."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_close_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, where


def test_evaluation_scores_each_case_once_and_shares_the_scores(tmp_path, monkeypatch):
    import scripts.fairness_metrics as fm
    from monai.engines.utils import IterationEvents

    data = _cohort()
    # Dice of each case by hand, from the masks themselves: 2 |P & L| / (|P| + |L|)
    expected = {}
    for d in data:
        p, t = d["image"].numpy() > 0.5, d["label"].numpy() > 0.5
        expected[d["id"]] = 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
    assert len({round(v, 3) for v in expected.values()}) == len(data)  # the cases differ
    calls = []
    original = fm.compute_case_metrics
    monkeypatch.setattr(fm, "compute_case_metrics", lambda *a, **k: calls.append(1) or original(*a, **k))

    shared, scorer = _run_evaluator(data, tmp_path / "shared", shared=True)
    assert len(calls) == len(data)  # one scoring per case for the key metric, the fairness metric and the report
    assert shared.has_event_handler(scorer, IterationEvents.MODEL_COMPLETED)  # after post-processing, before metrics
    calls.clear()
    separate, _ = _run_evaluator(data, tmp_path / "separate", shared=False)
    assert len(calls) == 2 * len(data)  # the earlier layout: the fairness metric and the report (MeanDice: a third)

    with (tmp_path / "shared" / "fairness" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["id"]: float(r["dice"]) for r in rows} == pytest.approx(expected, abs=1e-6)
    by_stage = {}
    for d in data:
        by_stage.setdefault(d["stage"], []).append(expected[d["id"]])
    assert shared.state.metrics["mean_dice"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    assert shared.state.metrics["worst"] == pytest.approx(min(np.mean(v) for v in by_stage.values()), abs=1e-6)
    # the same numbers as the earlier layout, MONAI's own MeanDice included
    for name in ("mean_dice", "worst"):
        assert shared.state.metrics[name] == pytest.approx(separate.state.metrics[name], abs=1e-6), name
    with (tmp_path / "separate" / "fairness" / "per_case.csv").open() as f:
        before = list(csv.DictReader(f))
    assert [r.keys() for r in rows] == [r.keys() for r in before]
    for r, b in zip(rows, before):
        for k in r:
            if k in ("dice", "hd95", "nsd"):
                assert float(r[k]) == pytest.approx(float(b[k]), abs=1e-6), (r["id"], k)
            else:
                assert r[k] == b[k], (r["id"], k)
    _assert_close_tree(
        json.loads((tmp_path / "shared" / "fairness" / "metrics.json").read_text()),
        json.loads((tmp_path / "separate" / "fairness" / "metrics.json").read_text()),
    )


def test_report_settings_and_handler_errors(tmp_path):
    from scripts.fairness_metrics import CaseMetricsHandler

    with pytest.raises(TypeError, match="groupings"):
        ReportSettings("stage")
    with pytest.raises(ValueError, match="groupings"):
        ReportSettings([])
    with pytest.raises(ValueError, match="alpha"):
        ReportSettings(["stage"], alpha=0)
    assert ReportSettings(["stage", "institution"], attribute_keys=["age", "stage"]).columns == (
        "age",
        "stage",
        "institution",
    )
    with pytest.raises(TypeError, match="settings"):
        FairnessReportHandler(tmp_path, ["stage"])
    with pytest.raises(ValueError, match="dice"):
        FairnessReportHandler(tmp_path, ReportSettings(["stage"]), scores=CaseMetricsHandler(metrics=["nsd"]))
    handler = FairnessReportHandler(tmp_path, {"groupings": ["stage"], "n_boot": 5})
    assert handler.settings == ReportSettings(["stage"], n_boot=5) and handler.scores.metrics == ("dice", "hd95", "nsd")


def _subtype_records():
    """Cases with known Dice and hidden subtype; T2 has no minority case, t4b has no subtype at all."""
    cases = [  # id, stage, institution, subtype, dice
        ("t1a", "T1", "A", "majority", 0.9),
        ("t1b", "T1", "B", "majority", 0.8),
        ("t1c", "T1", "A", "necrotic", 0.3),
        ("t1d", "T1", "B", "distractor", 0.6),
        ("t2a", "T2", "A", "majority", 0.7),
        ("t2b", "T2", "B", "majority", 0.75),
        ("t2c", "T2", "A", "majority", 0.4),
        ("t3a", "T3", "B", "margin", 0.2),
        ("t3b", "T3", "A", "margin", 0.45),
        ("t3c", "T3", "B", "majority", 0.95),
        ("t4a", "T4", "A", "necrotic", 0.5),
        ("t4b", "T4", "B", None, 0.1),
    ]
    rows = []
    for cid, stage, inst, subtype, dice in cases:
        row = {"id": cid, "stage": stage, "institution": inst, "dice": dice}
        if subtype is not None:
            row["subtype"] = subtype
        rows.append(row)
    return rows


def _recompute_minority(rows, attribute, threshold):
    """Minority/majority Dice and minority failure rate per group and overall, from per_case.csv rows."""

    def cell(members):
        minority = [float(r["dice"]) for r in members if r["subtype"] not in ("", "majority")]
        majority = [float(r["dice"]) for r in members if r["subtype"] == "majority"]
        failures = sum(d < threshold for d in minority)
        return {
            "n_minority": len(minority),
            "n_majority": len(majority),
            "minority_dice": sum(minority) / len(minority) if minority else None,
            "majority_dice": sum(majority) / len(majority) if majority else None,
            "minority_failure_rate": failures / len(minority) if minority else None,
            "minority_failures": failures,
        }

    groups = sorted({r[attribute] for r in rows})
    return {g: cell([r for r in rows if r[attribute] == g]) for g in groups}, cell(rows)


def _assert_cells_equal(actual, expected, where):
    assert set(actual) == set(expected), where
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, (where, key)
        else:
            assert actual[key] == pytest.approx(value), (where, key)


def test_report_minority_block_recomputed_from_per_case_csv(tmp_path):
    paths = write_fairness_report(tmp_path, _subtype_records(), ["stage", "institution"], threshold=0.5, n_boot=20)
    with paths["per_case"].open() as f:
        rows = list(csv.DictReader(f))
    assert "subtype" in rows[0]
    assert {r["id"]: r["subtype"] for r in rows}["t4b"] == ""  # no subtype information: an empty cell
    metrics = json.loads(paths["metrics"].read_text())
    for attribute in ("stage", "institution"):
        block = metrics["groupings"][attribute]["minority"]
        groups, overall = _recompute_minority(rows, attribute, metrics["settings"]["threshold"])
        assert list(block["groups"]) == list(groups)
        for g, expected in groups.items():
            _assert_cells_equal(block["groups"][g], expected, (attribute, g))
        _assert_cells_equal(block["overall"], overall, (attribute, "overall"))
        with_minority = {g: c["minority_dice"] for g, c in groups.items() if c["n_minority"]}
        assert block["worst_group_minority_dice"] == pytest.approx(min(with_minority.values()))
        assert block["threshold"] == 0.5

    stage = metrics["groupings"]["stage"]["minority"]
    # T1: minority necrotic 0.3 + distractor 0.6 -> 0.45, majority (0.9 + 0.8) / 2 = 0.85, 0.3 < 0.5: 1 of 2 fails
    assert stage["groups"]["T1"] == pytest.approx(
        {"n_minority": 2, "n_majority": 2, "minority_dice": 0.45, "majority_dice": 0.85,
         "minority_failure_rate": 0.5, "minority_failures": 1}
    )  # fmt: skip
    # T2: no minority case: Dice and rate are null, majority (0.7 + 0.75 + 0.4) / 3
    assert stage["groups"]["T2"]["n_minority"] == 0 and stage["groups"]["T2"]["minority_dice"] is None
    assert stage["groups"]["T2"]["minority_failure_rate"] is None
    assert stage["groups"]["T2"]["majority_dice"] == pytest.approx(1.85 / 3)
    # T4: necrotic 0.5 does not fail (Dice < 0.5 fails); t4b without subtype counts in neither set
    assert (stage["groups"]["T4"]["n_minority"], stage["groups"]["T4"]["n_majority"]) == (1, 0)
    assert stage["groups"]["T4"]["minority_failures"] == 0 and stage["groups"]["T4"]["majority_dice"] is None
    # overall: minority 0.3, 0.6, 0.2, 0.45, 0.5 -> 2.05 / 5 = 0.41, failures 0.3, 0.2, 0.45 -> 3 / 5 = 0.6;
    # majority 0.9, 0.8, 0.7, 0.75, 0.4, 0.95 -> 4.5 / 6 = 0.75; worst group T3: (0.2 + 0.45) / 2 = 0.325
    assert stage["overall"]["minority_dice"] == pytest.approx(0.41)
    assert stage["overall"]["minority_failure_rate"] == pytest.approx(0.6)
    assert stage["overall"]["majority_dice"] == pytest.approx(0.75)
    assert stage["worst_group_minority_dice"] == pytest.approx(0.325) and stage["worst_minority_group"] == "T3"
    # kinds over all cases: necrotic 0.3, 0.5 -> 0.4 (1 failure); margin 0.2, 0.45 -> 0.325 (2 failures)
    assert set(stage["kinds"]) == {"necrotic", "distractor", "margin"}
    assert stage["kinds"]["necrotic"] == pytest.approx({"n": 2, "dice": 0.4, "failure_rate": 0.5, "failures": 1})
    assert stage["kinds"]["margin"] == pytest.approx({"n": 2, "dice": 0.325, "failure_rate": 1.0, "failures": 2})

    text = paths["report"].read_text()
    assert "Hidden minority (subtype) by stage" in text and "Hidden minority (subtype) by institution" in text
    page = _Page()
    page.feed(text)
    assert page.values["stage.minority.groups.T1.minority_dice"] == "0.4500"
    assert page.values["stage.minority.groups.T1.minority_failure_rate"] == "0.5000"
    assert page.values["stage.minority.groups.T2.minority_dice"] == "\u2013"  # no minority case: a dash
    assert page.values["stage.minority.overall.minority_dice"] == "0.4100"
    assert page.values["stage.minority.overall.majority_dice"] == "0.7500"
    assert page.values["stage.minority.worst_group_minority_dice"] == "0.3250"


def test_report_without_subtype_has_no_minority_block(tmp_path):
    records = [{k: v for k, v in r.items() if k != "subtype"} for r in _subtype_records()]
    paths = write_fairness_report(tmp_path, records, ["stage"], n_boot=10)
    with paths["per_case"].open() as f:
        assert "subtype" not in next(csv.DictReader(f))
    assert "minority" not in json.loads(paths["metrics"].read_text())["groupings"]["stage"]
    assert "Hidden minority" not in paths["report"].read_text()


def test_report_handler_copies_subtype(tmp_path):
    def step(engine, batch):
        return [{"image": b["image"], "label": b["label"], "pred": b["pred"]} for b in batch]

    batches = _evaluator_batches()
    for case, subtype in zip([c for b in batches for c in b], ["majority", "necrotic", None, "margin"]):
        case["subtype"] = subtype  # p2: no subtype information
    engine = Engine(step)
    FairnessReportHandler(tmp_path, {"groupings": ["stage"], "n_boot": 20, "thumbnails": False}).attach(engine)
    engine.run(batches, max_epochs=1)
    fair = Path(tmp_path) / "fairness"
    with (fair / "per_case.csv").open() as f:
        rows = {r["id"]: r["subtype"] for r in csv.DictReader(f)}
    assert rows == {"p0": "majority", "p1": "necrotic", "p2": "", "p3": "margin"}
    block = json.loads((fair / "metrics.json").read_text())["groupings"]["stage"]["minority"]
    # T2 = p1 (shift 1: dice 5/6) and p3 (shift 3: dice 3/6), both minority: mean 2/3, none below 0.5
    assert block["groups"]["T2"]["minority_dice"] == pytest.approx(2 / 3)
    assert block["groups"]["T2"]["minority_failures"] == 0
    assert (block["overall"]["n_minority"], block["overall"]["n_majority"]) == (2, 1)
