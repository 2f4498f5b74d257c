"""Tests of scripts.fairness_metrics: per-case metrics, group statistics, the MONAI metric and its Ignite handler."""

import math
import os
import socket

import numpy as np
import pytest
import torch
from fairlearn.metrics import MetricFrame
from ignite.engine import Engine
from monai.data import MetaTensor
from scripts.fairness_metrics import (
    CASE_METRICS_KEY,
    CaseMetricsHandler,
    FairnessMetric,
    FairnessMetricHandler,
    NotComputableError,
    as_binary_mask,
    case_metadata,
    compute_case_metrics,
    compute_group_metrics,
    cvar,
    image_diagonal_mm,
)

# 3-group example used by several tests (hand-computed values below)
#   A: 0.9, 0.7      -> mean 0.8
#   B: 0.6           -> mean 0.6
#   C: 1.0, 0.8, 0.9 -> mean 0.9
#   dice_all = 4.9 / 6
HAND = [
    {"id": "a1", "stage": "A", "dice": 0.9, "hard": False},
    {"id": "a2", "stage": "A", "dice": 0.7, "hard": True},
    {"id": "b1", "stage": "B", "dice": 0.6, "hard": True},
    {"id": "c1", "stage": "C", "dice": 1.0, "hard": False},
    {"id": "c2", "stage": "C", "dice": 0.8, "hard": True},
    {"id": "c3", "stage": "C", "dice": 0.9, "hard": False},
]


# ------------------------------------------------------------------------------------------------ group metrics
def test_es_dice_three_groups_by_hand():
    r = compute_group_metrics(HAND, "stage", alpha=0.5, threshold=0.75)
    # sum_g |dice_all - dice_g| = |4.9/6-0.8| + |4.9/6-0.6| + |4.9/6-0.9| = (0.1 + 1.3 + 0.5) / 6 = 1.9/6
    # es_dice = (4.9/6) / (1 + 1.9/6) = 4.9 / 7.9
    assert r["dice_all"] == pytest.approx(4.9 / 6)
    assert r["es_dice"] == pytest.approx(4.9 / 7.9)
    # group means 0.8, 0.6, 0.9: mean 2.3/3; squared deviations (1 + 25 + 16)/900; sample var 21/900
    # es_dice_std = (4.9/6) / (1 + sqrt(21)/30)
    assert r["es_dice_std"] == pytest.approx((4.9 / 6) / (1 + math.sqrt(21) / 30))
    assert r["worst_group_dice"] == pytest.approx(0.6)
    assert r["worst_group"] == "B" and r["best_group"] == "C"
    assert r["group_gap"] == pytest.approx(0.3)
    # CVaR, alpha 0.5: A k=1 -> 0.7; B k=0.5 -> 0.6; C k=1.5 -> (0.8 + 0.5*0.9)/1.5 = 0.8333
    assert r["groups"]["A"]["cvar"] == pytest.approx(0.7)
    assert r["groups"]["B"]["cvar"] == pytest.approx(0.6)
    assert r["groups"]["C"]["cvar"] == pytest.approx(1.25 / 1.5)
    assert r["worst_group_cvar"] == pytest.approx(0.6)
    # failures below 0.75: a2 (0.7, hard), b1 (0.6, hard); c2 (0.8, hard) is no failure
    assert [r["groups"][g]["hidden_failures"] for g in "ABC"] == [1, 1, 0]
    assert r["hidden_failures"] == 2
    # a failure is strictly below the threshold: at 0.7, a2 (0.7) is no failure, b1 (0.6) is
    assert compute_group_metrics(HAND, "stage", threshold=0.7)["hidden_failures"] == 1
    assert [(r["groups"][g]["hard_cases"], r["groups"][g]["hard_failures"]) for g in "ABC"] == [(1, 1), (1, 1), (1, 0)]
    assert (r["hard_cases"], r["hard_failures"]) == (3, 2)
    # population std of group A (0.9, 0.7) = 0.1
    assert r["groups"]["A"]["std"] == pytest.approx(0.1)


def test_cvar_fractional_boundary_case():
    v = [0.9, 0.5, 0.1, 0.95, 0.8, 0.7, 0.99]  # n=7, alpha=0.2 -> k=1.4: worst 0.1 (w=1) + next 0.5 (w=0.4)
    assert cvar(v, 0.2) == pytest.approx((0.1 + 0.4 * 0.5) / 1.4)
    assert cvar(v, 1.0) == pytest.approx(np.mean(v))
    assert cvar(v, 0.1) == pytest.approx(0.1)  # k = 0.7 <= 1: the minimum
    assert cvar([0.2, 0.4, 0.6, 0.8, 1.0], 0.4) == pytest.approx(0.3)  # k = 2 exactly
    draws = np.array([v, v[::-1]])  # leading axis kept (bootstrap draws)
    np.testing.assert_allclose(cvar(draws, 0.2), [0.3 / 1.4] * 2)
    with pytest.raises(ValueError, match="alpha"):
        cvar(v, 0.0)
    with pytest.raises(NotComputableError):
        cvar([], 0.2)


def test_group_metrics_match_fairlearn_metricframe():
    rng = np.random.default_rng(3)
    n = 60
    groups = rng.choice(["T1", "T2", "T3", "T4"], size=n, p=[0.4, 0.3, 0.2, 0.1])
    dice = rng.beta(5, 2, size=n)
    records = [{"id": f"c{i}", "stage": g, "dice": float(d)} for i, (g, d) in enumerate(zip(groups, dice))]
    r = compute_group_metrics(records, "stage", alpha=0.2)

    def mean_score(y_true, y_pred):
        return float(np.mean(y_true))

    def cvar_score(y_true, y_pred):
        return float(cvar(y_true, 0.2))

    mf = MetricFrame(
        metrics={"dice": mean_score, "cvar": cvar_score},
        y_true=dice,
        y_pred=np.zeros(n),
        sensitive_features=groups,
    )
    for g in sorted(set(groups)):
        assert r["groups"][g]["dice"] == pytest.approx(mf.by_group.loc[g, "dice"])
        assert r["groups"][g]["cvar"] == pytest.approx(mf.by_group.loc[g, "cvar"])
    assert r["dice_all"] == pytest.approx(mf.overall["dice"])
    assert r["worst_group_dice"] == pytest.approx(mf.group_min()["dice"])
    assert r["worst_group_cvar"] == pytest.approx(mf.group_min()["cvar"])
    assert r["group_gap"] == pytest.approx(mf.difference(method="between_groups")["dice"])
    assert r["worst_group_dice"] + r["group_gap"] == pytest.approx(mf.group_max()["dice"])


def test_group_metrics_errors_and_single_group():
    with pytest.raises(NotComputableError):
        compute_group_metrics([], "stage")
    with pytest.raises(NotComputableError, match="T4"):
        compute_group_metrics(HAND, "stage", groups=["A", "B", "C", "T4"])
    with pytest.raises(ValueError, match="not in `groups`"):
        compute_group_metrics(HAND, "stage", groups=["A", "B"])
    with pytest.raises(ValueError, match="c9"):
        compute_group_metrics([*HAND, {"id": "c9", "stage": "C", "dice": float("nan")}], "stage")
    with pytest.raises(ValueError, match="metric"):
        compute_group_metrics(HAND, "stage", metric="hd95")
    with pytest.raises(ValueError, match="no column"):
        compute_group_metrics(HAND, "institution")
    one = compute_group_metrics([{"id": 1, "site": "X", "dice": 0.5}, {"id": 2, "site": "X", "dice": 0.7}], "site")
    # single group: no between-group dispersion, so ES-Dice variants equal the mean
    assert one["group_gap"] == 0 and one["es_dice"] == pytest.approx(0.6) and one["es_dice_std"] == pytest.approx(0.6)
    missing = compute_group_metrics([{"id": 1, "site": None, "dice": 0.5}], "site")
    assert list(missing["groups"]) == ["unknown"]


# ------------------------------------------------------------------------------------------------ per-case metrics
def _plates(offset_axis: int, offset: int, shape=(12, 12, 10)):
    """Two one-voxel-thick plates, normal to `offset_axis`, `offset` voxels apart: every surface distance equals
    offset * spacing[offset_axis]."""
    a, b = np.zeros(shape), np.zeros(shape)
    sl = [slice(2, 8)] * 3
    sl_a, sl_b = list(sl), list(sl)
    sl_a[offset_axis], sl_b[offset_axis] = 3, 3 + offset
    a[tuple(sl_a)], b[tuple(sl_b)] = 1, 1
    return a, b


def test_hd95_and_nsd_on_plates_with_anisotropic_spacing():
    a, b = _plates(offset_axis=2, offset=2)
    # 2 voxels along z at 3 mm -> every distance is 6 mm
    m = compute_case_metrics(a, b, spacing=(1.0, 1.0, 3.0), tolerance_mm=5.9)
    assert m == {"dice": 0.0, "hd95": pytest.approx(6.0), "nsd": 0.0}
    assert compute_case_metrics(a, b, spacing=(1.0, 1.0, 3.0), tolerance_mm=6.0)["nsd"] == pytest.approx(1.0)
    # the same offset along x at 1.5 mm -> 3 mm: spacing is applied per axis, in tensor axis order
    a, b = _plates(offset_axis=0, offset=2)
    m = compute_case_metrics(a, b, spacing=(1.5, 1.0, 3.0), tolerance_mm=2.9)
    assert m["hd95"] == pytest.approx(3.0) and m["nsd"] == 0.0
    assert compute_case_metrics(a, b, spacing=(1.5, 1.0, 3.0), tolerance_mm=3.0)["nsd"] == pytest.approx(1.0)


def test_boxes_offset_along_z():
    a, b = np.zeros((12, 12, 12)), np.zeros((12, 12, 12))
    a[2:8, 2:8, 2:8] = 1
    b[2:8, 2:8, 4:10] = 1  # shifted by 2 slices
    m = compute_case_metrics(a, b, spacing=(1, 1, 3), percentile=100)
    # overlap 6*6*4 = 144 voxels of 216 each: dice = 288 / 432; the bottom face of a is 2 slices (6 mm) from b
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["hd95"] == pytest.approx(6.0)
    assert m["nsd"] == pytest.approx(compute_case_metrics(b, a, spacing=(1, 1, 3), percentile=100)["nsd"])
    assert compute_case_metrics(a, b, spacing=(1, 1, 3), tolerance_mm=6.0)["nsd"] == pytest.approx(1.0)


def test_spacing_read_from_metatensor_affine():
    a, b = _plates(offset_axis=2, offset=2)
    affine = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
    pa, pb = MetaTensor(torch.tensor(a)[None], affine=affine), MetaTensor(torch.tensor(b)[None], affine=affine)
    assert compute_case_metrics(pa, pb)["hd95"] == pytest.approx(6.0)


def test_empty_mask_conventions():
    shape, spacing = (12, 12, 10), (1.0, 1.0, 3.0)
    empty, full = np.zeros(shape), np.zeros(shape)
    full[4:6, 4:6, 4:6] = 1
    diag = math.sqrt(12**2 + 12**2 + 30**2)
    assert image_diagonal_mm(shape, spacing) == pytest.approx(diag)
    assert compute_case_metrics(empty, empty, spacing=spacing) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    assert compute_case_metrics(empty, full, spacing=spacing) == {"dice": 0.0, "hd95": pytest.approx(diag), "nsd": 0.0}
    assert compute_case_metrics(full, empty, spacing=spacing) == {"dice": 0.0, "hd95": pytest.approx(diag), "nsd": 0.0}


def test_onehot_and_label_map_inputs_agree():
    a, b = np.zeros((10, 10, 6)), np.zeros((10, 10, 6))
    a[2:6, 2:6, 1:4], b[3:7, 2:6, 1:4] = 1, 1
    onehot = lambda m: np.stack([1 - m, m])  # noqa: E731
    m_map = compute_case_metrics(a[None], b[None], spacing=1.0)
    m_hot = compute_case_metrics(onehot(a), onehot(b), spacing=1.0)
    assert m_map == pytest.approx(m_hot)
    assert m_map["dice"] == pytest.approx(2 * 36 / 96)  # overlap 3*4*3 of 48 voxels each
    assert as_binary_mask(torch.ones(1, 2, 2, 2)).all()
    with pytest.raises(ValueError, match="one grid"):
        compute_case_metrics(a, b[:5])
    with pytest.raises(ValueError, match="shape"):
        as_binary_mask(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="metrics"):
        compute_case_metrics(a, b, metrics=("assd",))


# ------------------------------------------------------------------------------------------------ metric + handler
def _case(dice_target: str):
    """A 1x8x8x4 label map pair with a known Dice: 'perfect' (1.0), 'half' (2*8/(16+16) = 0.5), 'miss' (0.0)."""
    label = torch.zeros(1, 8, 8, 4)
    label[0, 2:6, 2:6, 1] = 1  # 16 voxels
    pred = torch.zeros_like(label)
    if dice_target == "perfect":
        pred = label.clone()
    elif dice_target == "half":
        pred[0, 2:6, 4:8, 1] = 1  # 16 voxels, 8 shared
    return pred, label


def test_fairness_metric_aggregate_and_reset():
    metric = FairnessMetric(attribute="stage", output="worst_group_dice")
    with pytest.raises(NotComputableError):
        metric.aggregate()
    cases = [_case("perfect"), _case("half"), _case("miss"), _case("perfect")]
    preds, labels = [c[0] for c in cases], [c[1] for c in cases]
    scores = metric(preds, labels, subgroups=["T1", "T1", "T2", "T2"], ids=["1", "2", "3", "4"])
    np.testing.assert_allclose(scores.numpy(), [1.0, 0.5, 0.0, 1.0])
    # batch-first tensors work too; a repeated id (DDP padding) is dropped
    metric(torch.stack([preds[0]]), torch.stack([labels[0]]), subgroups=["T1"], ids=["1"])
    # T1: (1 + 0.5)/2 = 0.75; T2: (0 + 1)/2 = 0.5
    assert metric.aggregate() == pytest.approx(0.5)
    full = metric.aggregate("all")
    assert full["n_cases"] == 4 and full["dice_all"] == pytest.approx(0.625)
    metric.reset()
    with pytest.raises(NotComputableError):
        metric.aggregate()
    with pytest.raises(ValueError, match="output"):
        FairnessMetric(attribute="stage", output="worst_group_nsd")
    with pytest.raises(ValueError, match="subgroups"):
        FairnessMetric(attribute="stage")(preds, labels)


def _fake_evaluator(batches):
    """An ignite Engine shaped like a MONAI evaluator after decollate + post-transforms: state.batch and
    state.output are lists of per-case dicts."""

    def step(engine, batch):
        return [{"pred": item["pred"], "label": item["label"], "image": item["image"]} for item in batch]

    return Engine(step)


def _batches():
    kinds = [("perfect", "T1", "X"), ("half", "T1", "Y"), ("miss", "T2", "X"), ("perfect", "T2", "Y")]
    batches, k = [], 0
    for start in (0, 2):
        batch = []
        for kind, stage, inst in kinds[start : start + 2]:
            pred, label = _case(kind)
            affine = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
            batch.append(
                {
                    "pred": MetaTensor(pred, affine=affine),
                    "label": MetaTensor(label, affine=affine),
                    "image": torch.rand(1, 8, 8, 4),
                    "id": f"case{k}",
                    "stage": stage,
                    "institution": inst,
                    "hard": kind == "miss",
                }
            )
            k += 1
        batches.append(batch)
    return batches


def test_metric_handler_on_fake_evaluator():
    engine = _fake_evaluator(_batches())
    FairnessMetricHandler(attribute="stage", output="worst_group_dice").attach(engine, "worst_stage_dice")
    FairnessMetricHandler(attribute="institution", output="es_dice").attach(engine, "es_inst")
    engine.run(_batches(), max_epochs=1)
    # stage: T1 (1, 0.5) -> 0.75, T2 (0, 1) -> 0.5
    assert engine.state.metrics["worst_stage_dice"] == pytest.approx(0.5)
    # institution: X (1, 0) -> 0.5, Y (0.5, 1) -> 0.75; all 0.625; es = 0.625 / (1 + 0.125 + 0.125) = 0.5
    assert engine.state.metrics["es_inst"] == pytest.approx(0.5)
    np.testing.assert_allclose(engine.state.metric_details["worst_stage_dice"].numpy().ravel(), [1, 0.5, 0, 1])


def _count_case_scoring(monkeypatch):
    """Count the calls of compute_case_metrics made by scripts.fairness_metrics (the scorer and the metric)."""
    import scripts.fairness_metrics as fm

    calls = []
    original = fm.compute_case_metrics

    def counted(*args, **kwargs):
        calls.append(kwargs.get("metrics"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fm, "compute_case_metrics", counted)
    return calls


def test_case_metrics_handler_scores_each_case_once(monkeypatch):
    calls = _count_case_scoring(monkeypatch)
    engine = _fake_evaluator(_batches())
    scorer = CaseMetricsHandler(metrics=["dice", "nsd"])
    # the metrics are attached before the scorer: the first reader of an iteration scores it, the others reuse it
    FairnessMetricHandler(attribute="stage", output="worst_group_dice", scores=scorer).attach(engine, "worst_stage")
    FairnessMetricHandler(attribute="institution", output="es_dice", scores=scorer).attach(engine, "es_inst")
    FairnessMetricHandler(attribute="stage", output="dice_all", scores=scorer).attach(engine, "mean_dice")
    scorer.attach(engine)
    engine.run(_batches(), max_epochs=1)
    assert len(calls) == 4  # four cases, each scored once for three metrics
    # the same hand-computed values as when each metric scores the cases itself (test above):
    # per case dice 1, 0.5, 0, 1; stage T1 0.75, T2 0.5; institution X 0.5, Y 0.75; all 0.625
    assert engine.state.metrics["worst_stage"] == pytest.approx(0.5)
    assert engine.state.metrics["es_inst"] == pytest.approx(0.5)
    assert engine.state.metrics["mean_dice"] == pytest.approx(0.625)
    # the scores of the last iteration stay in the output for any other reader
    last = engine.state.output
    assert [o[CASE_METRICS_KEY]["dice"] for o in last] == pytest.approx([0.0, 1.0])
    assert set(last[0][CASE_METRICS_KEY]) == {"dice", "nsd"}
    assert scorer.case_scores(engine) == [o[CASE_METRICS_KEY] for o in last] and len(calls) == 4  # not rescored


def test_case_metrics_handler_input_errors():
    with pytest.raises(TypeError, match="metrics"):
        CaseMetricsHandler(metrics="dice")
    with pytest.raises(ValueError, match="metrics"):
        CaseMetricsHandler(metrics=["dice", "iou"])
    with pytest.raises(ValueError, match="metrics"):
        CaseMetricsHandler(metrics=[])
    with pytest.raises(ValueError, match="tolerance_mm"):
        CaseMetricsHandler(tolerance_mm=-1)
    with pytest.raises(ValueError, match="percentile"):
        CaseMetricsHandler(percentile=0)
    dice_only = CaseMetricsHandler(metrics=["dice"])
    with pytest.raises(ValueError, match="nsd"):  # the metric would read a score the scorer does not compute
        FairnessMetricHandler(attribute="stage", metric="nsd", output="worst_group_nsd", scores=dice_only)

    class _State:
        output = {"pred": torch.zeros(2, 1, 4, 4, 4), "label": torch.zeros(2, 1, 4, 4, 4)}  # not decollated

    engine = type("E", (), {"state": _State()})()
    with pytest.raises(TypeError, match="decollate"):
        CaseMetricsHandler().case_scores(engine)
    engine.state.output = [{"pred": torch.zeros(1, 4, 4, 4)}]
    with pytest.raises(KeyError, match="label"):
        CaseMetricsHandler().case_scores(engine)


def test_case_metadata_from_batch_dict_or_lists():
    batch = {"id": ["a", "b"], "stage": ["T1", "T2"], "hard": torch.tensor([True, False])}
    meta = case_metadata(batch, [{"pred": 0}, {"pred": 1}], ["id", "stage", "hard", "absent"])
    assert meta == [
        {"id": "a", "stage": "T1", "hard": True, "absent": None},
        {"id": "b", "stage": "T2", "hard": False, "absent": None},
    ]


def _ddp_worker(rank: int, world: int, port: int, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = FairnessMetric(attribute="stage", output="all")
        # rank 0 holds T1 cases and 1 T2 case; rank 1 holds 1 T2 case plus a padding repeat of case "0"
        mine = [("perfect", "T1", "0"), ("half", "T1", "1"), ("miss", "T2", "2")] if rank == 0 else []
        mine += [("perfect", "T2", "3"), ("perfect", "T1", "0")] if rank == 1 else []
        cases = [_case(k) for k, _, _ in mine]
        metric(
            [c[0] for c in cases], [c[1] for c in cases], subgroups=[s for _, s, _ in mine], ids=[i for *_, i in mine]
        )
        r = metric.aggregate()
        results[rank] = (r["n_cases"], r["worst_group_dice"], r["dice_all"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes: about 10 s on 2 shared cores
def test_fairness_metric_syncs_across_two_ranks():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    # all 4 distinct cases on both ranks: T1 (1, 0.5) -> 0.75, T2 (0, 1) -> 0.5; all 2.5/4
    for rank in (0, 1):
        assert results[rank] == (4, pytest.approx(0.5), pytest.approx(0.625))
