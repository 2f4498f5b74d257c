"""The intra-group CVaR diagnostic (issue 29, item 2): precision, recall and base rate by hand, the handler on a tiny
engine, and a ``dmoe`` run whose weights and training are the same with and without ``dro#diagnose``."""

import contextlib
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import run_bundle_workflow
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from scripts import synthetic_2d
from scripts.bank_refresh import BankRefreshHandler
from scripts.cvar_diagnostic import IntraGroupDiagnostic, intra_group_diagnostic, top_alpha_membership
from scripts.fairdro import FairDRO, cvar_weights

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"

# group 0: ten distinct losses, minority at 0.9, 0.6 and 0.05 (base rate 3/10)
LOSS_0 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
MIN_0 = [True, False, False, True, False, False, False, False, False, True]
# group 1: five losses with a tie at the top (2.0, 2.0), the first of them a minority case (base rate 1/5)
LOSS_1 = [1.0, 2.0, 2.0, 0.5, 0.1]
MIN_1 = [False, True, False, False, False]


def _cohort():
    return LOSS_0 + LOSS_1, [0] * 10 + [1] * 5, MIN_0 + MIN_1


# ---------------------------------------------------------------------------------------------------------------
# the pure function, by hand
# ---------------------------------------------------------------------------------------------------------------
def test_membership_counts_the_boundary_case_whole_and_shares_ties():
    x = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]
    # alpha 0.15 of 10 = 1.5: the top two, the boundary case (rank 1) counted whole; the CVaR weights' support too
    assert top_alpha_membership(x, 0.15).tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert int((cvar_weights(torch.tensor(x), alpha=0.15) > 0).sum()) == 2
    # alpha 0.1 of 30 is 3.0000000000000004 in floating point: three cases, not four
    assert float(top_alpha_membership(torch.arange(30.0), 0.1).sum()) == 3.0
    # one place left for a tie of two: each counts one half; the order of the cohort does not matter
    assert top_alpha_membership([1.0, 2.0, 2.0, 0.5, 0.1], 0.2).tolist() == [0, 0.5, 0.5, 0, 0]
    assert top_alpha_membership([2.0, 0.1, 1.0, 2.0, 0.5], 0.2).tolist() == [0.5, 0, 0, 0.5, 0]
    # alpha small: at least one case (the CVaR puts all its mass on the worst)
    assert top_alpha_membership([0.3, 0.7], 0.1).tolist() == [0, 1]
    with pytest.raises(ValueError, match="alpha"):
        top_alpha_membership(x, 0.0)


def test_precision_recall_base_rate_by_hand_alpha_02():
    out = intra_group_diagnostic(*_cohort(), alpha=0.2)
    # group 0: top ceil(2) = {0.9 minority, 0.8}: precision 1/2, recall 1/3
    assert out[0]["precision"] == pytest.approx(0.5) and out[0]["recall"] == pytest.approx(1 / 3)
    assert out[0]["base_rate"] == pytest.approx(0.3) and out[0]["n_top"] == 2
    # group 1: top ceil(1) = one place for the tie {2.0 minority, 2.0}: half a minority case in a set of one
    assert out[1]["precision"] == pytest.approx(0.5) and out[1]["recall"] == pytest.approx(0.5)
    assert out[1]["base_rate"] == pytest.approx(0.2)
    # pooled: 1.5 minority cases in a top set of 3, of 4 minority cases among 15
    assert out["pooled"]["precision"] == pytest.approx(0.5) and out["pooled"]["recall"] == pytest.approx(0.375)
    assert out["pooled"]["base_rate"] == pytest.approx(4 / 15)


def test_precision_recall_base_rate_by_hand_alpha_05():
    out = intra_group_diagnostic(*_cohort(), alpha=0.5)
    # group 0: top 5 = {0.9, 0.8, 0.7, 0.6, 0.5}: two minority cases
    assert out[0]["precision"] == pytest.approx(0.4) and out[0]["recall"] == pytest.approx(2 / 3)
    # group 1: top ceil(2.5) = 3 = {2.0, 2.0, 1.0}: the tie is inside, one minority case
    assert out[1]["precision"] == pytest.approx(1 / 3) and out[1]["recall"] == pytest.approx(1.0)
    assert out[1]["n_top"] == 3
    assert out["pooled"]["precision"] == pytest.approx(3 / 8) and out["pooled"]["recall"] == pytest.approx(3 / 4)


def test_no_minority_gives_no_recall_and_unknown_cases_are_left_out():
    out = intra_group_diagnostic([0.3, 0.2, 0.1, 9.0], [0, 0, 0, -1], [False, False, False, True], alpha=0.5)
    assert set(out) == {0, "pooled"} and out[0]["precision"] == 0.0 and math.isnan(out[0]["recall"])
    diag = IntraGroupDiagnostic(["a", "b", "c", "d"], [0, 0, 0, 1], [False, False, False, True], ["T1"], alpha=0.5)
    metrics = diag.metrics(diag.compute(["a", "b", "c", "d"], [0.3, 0.2, 0.1, 9.0]))
    assert metrics == {"cvar_precision": 0.0, "cvar_base_rate": 0.0, "cvar_precision_T1": 0.0,
                       "cvar_base_rate_T1": 0.0}  # fmt: skip
    with pytest.raises(ValueError, match="did not measure"):
        diag.compute(["a", "b"], [0.3, 0.2])
    with pytest.raises(ValueError, match="one entry per case"):
        intra_group_diagnostic([0.1, 0.2], [0], [True, False])


# ---------------------------------------------------------------------------------------------------------------
# the handler on a tiny engine: the image of a case holds its loss, so the bank losses are known by hand
# ---------------------------------------------------------------------------------------------------------------
class _Loader(list):
    """Batches of two cases; ``dataset.data`` holds the datalist items (with the subtype) as a CacheDataset does."""

    def __init__(self, items, losses):
        self.dataset = type("D", (), {"data": items})()
        rows = [(it["id"], loss) for it, loss in zip(items, losses)]
        super().__init__(
            {"id": [c for c, _ in rows[k : k + 2]], "image": torch.tensor([[v] for _, v in rows[k : k + 2]])}
            for k in range(0, len(rows), 2)
        )


class _Count(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def _engine(dro, loader, epochs=3):
    engine = Engine(lambda e, b: 0.0)
    engine.dro, engine.network, engine.non_blocking = dro, _Count(), False
    engine.prepare_batch = lambda batch, device, non_blocking: (batch["image"], None, (), {})
    engine.inferer = lambda image, network: network(image)
    engine.sample_loss_function = lambda pred, label: pred.flatten()
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "device", "cpu"))
    handler = BankRefreshHandler(dro, loader)
    handler.attach(engine)
    seen = {}
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.setdefault(e.state.epoch, dict(e.state.metrics)))
    engine.run([0, 1, 2], max_epochs=epochs)
    return engine, handler, seen


def _items():
    names = ["T1", "T2"]
    return [{"id": f"c{k}", "stage": names[k >= 10], "subtype": "ring" if m else "majority"}
            for k, m in enumerate(MIN_0 + MIN_1)]  # fmt: skip


@pytest.mark.parametrize("intra", ["none", "cvar"])
def test_handler_reports_every_epoch_and_leaves_plain_weights_alone(intra, caplog):
    items = _items()
    dro = FairDRO(2, items, intra=intra, inter="empirical", alpha=0.2, group_key="stage", group_names=["T1", "T2"],
                  apply="sample", warmup_epochs=1, refresh_every=1, diagnose=True)  # fmt: skip
    caplog.set_level("INFO")
    engine, handler, seen = _engine(dro, _Loader(items, LOSS_0 + LOSS_1))
    # warm-up epoch 1 (its end is the first refresh), epoch 2, last epoch 3: the diagnostic at each, in that epoch's
    # metrics
    assert sorted(seen) == [1, 2, 3]
    for metrics in seen.values():
        assert metrics["cvar_precision_T1"] == pytest.approx(0.5) and metrics["cvar_recall_T1"] == pytest.approx(1 / 3)
        assert metrics["cvar_precision_T2"] == pytest.approx(0.5) and metrics["cvar_base_rate_T2"] == pytest.approx(0.2)
        assert metrics["cvar_precision"] == pytest.approx(0.5) and metrics["cvar_recall"] == pytest.approx(0.375)
    assert sum("Intra-group CVaR diagnostic after epoch" in r.getMessage() for r in caplog.records) == 3
    # one pass per epoch (8 batches of two): the refreshes due after epochs 1 and 2 reused the diagnostic's losses
    assert engine.network.calls == 3 * 8
    if intra == "none":  # the bank is never written, the weights stay uniform
        assert dro.num_refreshes == 0 and not bool(dro.seen.any())
        assert torch.equal(dro.case_weights(), torch.full((15,), 1 / 15, dtype=torch.float64))
    else:  # the refreshes after epochs 1 and 2 (not after the last) wrote the same losses
        assert dro.num_refreshes == 2
        assert torch.allclose(dro.bank, torch.tensor(LOSS_0 + LOSS_1, dtype=torch.float64))


def test_diagnosis_schedule_and_off_by_default():
    items = _items()
    dro = FairDRO(2, items, intra="cvar", group_key="stage", group_names=["T1", "T2"], warmup_epochs=2,
                  refresh_every=3, diagnose=True)  # fmt: skip
    handler = BankRefreshHandler(dro, _Loader(items, LOSS_0 + LOSS_1))
    # warm-up 1, 2 (2 is also the first refresh), then every 3rd epoch: 5, 8, and the last (10)
    assert [e for e in range(1, 11) if handler.diagnosis_due(e, 10)] == [1, 2, 5, 8, 10]
    plain = FairDRO(2, items, intra="cvar", group_key="stage", group_names=["T1", "T2"], refresh_every=1)
    assert plain.diagnose is False and BankRefreshHandler(plain, _Loader(items, LOSS_0 + LOSS_1)).diagnostic is None
    with pytest.raises(ValueError, match="refresh_every"):
        FairDRO(2, items, group_key="stage", group_names=["T1", "T2"], diagnose=True)
    with pytest.raises(ValueError, match="diagnose"):
        FairDRO(2, items, group_key="stage", group_names=["T1", "T2"], refresh_every=1, diagnose="yes")
    blind = [{k: v for k, v in it.items() if k != "subtype"} for it in items]
    with pytest.raises(ValueError, match="lack"):
        BankRefreshHandler(dro, _Loader(blind, LOSS_0 + LOSS_1))


# ---------------------------------------------------------------------------------------------------------------
# the configs: dmoe + diagnose resolves, and trains exactly as dmoe
# ---------------------------------------------------------------------------------------------------------------
def test_dmoe_with_diagnose_config_parses():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "variants" / "dmoe.json")])
    parser.update({"dro#diagnose": True})
    config = parser.get()
    assert config["dro"]["diagnose"] is True and config["dro"]["intra"] == "none"
    items = [{"id": f"c{k}", "stage": "T1", "subtype": "majority"} for k in range(4)]
    parser["dro#cohort"] = items
    dro = parser.get_parsed_content("dro", instantiate=True)
    assert dro.diagnose is True and dro.refresh_every == 1 and not dro.uses_bank


TINY_2D = {"epochs": 2, "val_interval": 2, "features": 4, "num_experts": 4, "batch_size": 8,
           "dro#warmup_epochs": 1}  # fmt: skip


@contextlib.contextmanager
def _log_records():
    """Every INFO record that reaches the root logger while the block runs, formatted as its message."""
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    # MONAI's StatsHandler logs the "Epoch[n] Metrics --" lines to its own logger, which does not propagate
    loggers, handler = [logging.getLogger(), logging.getLogger("StatsHandler")], _Collect(logging.INFO)
    old_level = loggers[0].level
    for lg in loggers:
        lg.addHandler(handler)
    loggers[0].setLevel(min(old_level or logging.INFO, logging.INFO))
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        loggers[0].setLevel(old_level)


@pytest.fixture(scope="module")
def cohort_2d(tmp_path_factory):
    data = tmp_path_factory.mktemp("cohort2d")
    synthetic_2d.generate_cohort(data, n_cases=24, seed=0)
    return data


def _train(data, run, variant="dmoe", **extra):
    files = ["train.json", f"variants/{variant}.json", "profiles/2d.json"]
    return run_bundle_workflow(files, "train", "training", dataset_dir=str(data), output_dir=str(run),
                               ckpt_dir=str(run / "models"), **TINY_2D, **extra)  # fmt: skip


@pytest.mark.parametrize("variant", ["dmoe", "fairdro"])
def test_diagnose_trains_bit_identically(variant, cohort_2d, tmp_path):
    plain = _train(cohort_2d, tmp_path / "plain", variant)
    with _log_records() as records:  # the log as the handlers write it, whatever stream an earlier test left them
        # logging_file False: the bundle's logging.conf (fileConfig) would remove the collecting handler
        diag = _train(cohort_2d, tmp_path / "diag", variant, logging_file=False, **{"dro#diagnose": True})
    dro_p, dro_d = plain.parser.get_parsed_content("dro"), diag.parser.get_parsed_content("dro")
    assert dro_d.diagnose and not dro_p.diagnose
    # the same weights and sampler draws, the same bank state, the same trained network
    assert torch.equal(dro_p.case_weights(), dro_d.case_weights())
    sampler_p, sampler_d = (wf.parser.get_parsed_content("train#sampler") for wf in (plain, diag))
    assert torch.equal(sampler_p.probabilities(), sampler_d.probabilities())
    assert list(sampler_p) == list(sampler_d)
    if variant == "dmoe":  # the bank is never written
        assert dro_d.num_refreshes == 0 and not bool(dro_d.seen.any())
    else:  # fairdro: the refresh after epoch 1 reused the diagnostic's pass, with the same values
        assert dro_d.num_refreshes == dro_p.num_refreshes == 1 and torch.equal(dro_p.bank, dro_d.bank)
    net_p, net_d = plain.parser.get_parsed_content("network"), diag.parser.get_parsed_content("network")
    for (name, a), (_, b) in zip(net_p.state_dict().items(), net_d.state_dict().items()):
        assert torch.equal(a, b), name
    # the diagnostic's metrics are in the trainer's per-epoch metrics
    metrics = diag.trainer.state.metrics
    assert 0.0 <= metrics["cvar_precision"] <= 1.0 and "cvar_base_rate_T1" in metrics
    assert "cvar_precision" not in plain.trainer.state.metrics
    # one diagnostic log line per epoch (the per-epoch Metrics lines go through MONAI's StatsHandler, whose stream
    # depends on which test configured logging first; bench/runcache's parsing of them is tested on fixed lines)
    assert sum("Intra-group CVaR diagnostic after epoch" in r for r in records) == 2
