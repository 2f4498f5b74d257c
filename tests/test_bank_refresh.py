"""The eval-mode FairDRO bank refresh: the weights after a refresh equal an explicit recomputation."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from scripts import synthetic
from scripts.fairdro import composite_weights, cvar_weights, effective_sample_size
from scripts.transforms import LabelCentredCropd, label_centred_window

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
TINY = {"patch_size": [64, 64, 32], "features": 4, "num_experts": 4, "batch_size": 2, "num_samples": 1}


def test_label_centred_window_by_hand():
    label = torch.zeros(1, 10, 8, 6)
    label[0, 2:5, 6:8, 1] = 1  # bounding box x 2..4 (centre 3), y 6..7 (centre 6.5), z 1
    start, end = label_centred_window(label, [4, 4, 6])
    # x: round(3 - 1.5) = 2 (rounds half to even: 1.5 -> 2); y: 6.5 - 1.5 = 5 -> clipped to 8 - 4 = 4; z: whole axis
    assert start == [2, 4, 0] and end == [6, 8, 6]
    # empty label: the volume's centre; a window as large as the volume: the whole volume
    assert label_centred_window(torch.zeros(1, 10, 8, 6), [10, 8, 6]) == ([0, 0, 0], [10, 8, 6])
    with pytest.raises(ValueError, match="pad first"):
        label_centred_window(label, [12, 4, 4])
    out = LabelCentredCropd(["image", "label"], "label", [4, 4, 6])({"image": torch.ones(1, 10, 8, 6), "label": label})
    assert out["image"].shape == (1, 4, 4, 6) and float(out["label"].sum()) == float(label[0, 2:6, 4:8].sum())


@pytest.fixture(scope="module")
def refreshed_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("cohort")
    synthetic.generate_cohort(data, n_cases=12, seed=3, shape=(48, 48, 24))
    run = tmp_path_factory.mktemp("run")
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", run_id="training", dataset_dir=str(data),
        output_dir=str(run), ckpt_dir=str(run / "models"), epochs=2, val_interval=2,
        **{"dro#warmup_epochs": 1, "dro#refresh_every": 1, "dro#min_ess": 0.5, "dro#floor": 0.0}, **TINY,
    )  # fmt: skip
    wf.initialize()
    snap = {}

    def snapshot(engine):  # registered after the bundle's handlers: sees the bank right after the refresh
        snap["model"] = copy.deepcopy(engine.network.state_dict())
        snap["bank"] = wf.parser.get_parsed_content("dro").bank.clone()
        snap["weights"] = wf.parser.get_parsed_content("dro").case_weights()

    wf.trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), snapshot)
    wf.run()
    return wf, snap


def test_weights_after_refresh_equal_explicit_recomputation(refreshed_run):
    wf, snap = refreshed_run
    dro = wf.parser.get_parsed_content("dro")
    assert dro.num_refreshes == 1  # after epoch 1 (warm-up over); none after the last epoch
    # explicit recomputation: every training case, deterministic transforms only, whole volume, eval mode
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(snap["model"])
    net.eval()
    load = wf.parser.get_parsed_content("load_transforms")
    loss_fn = wf.parser.get_parsed_content("loss")
    items = wf.parser.get_parsed_content("train#dataset").data
    losses = {}
    with torch.no_grad():
        for item in items:
            d = dict(item)
            for t in load:
                d = t(d)
            assert tuple(d["image"].shape[1:]) == tuple(TINY["patch_size"])  # fits in one patch: the whole volume
            pred = net(d["image"][None].float(), subgroup=torch.as_tensor([d["subgroup"]]))
            losses[str(item["id"])] = float(loss_fn(pred, d["label"][None].float())[0])
    expected_bank = torch.tensor([losses[c] for c in dro.ids], dtype=torch.float64)
    assert torch.allclose(snap["bank"], expected_bank, atol=1e-5)
    # the weights from those losses: CVaR (alpha 0.2) per stage group, uniform pi, then the ESS floor by a grid search
    groups = dro.dro_groups()
    pi = dro.current_pi()
    w_cvar = torch.zeros(dro.num_cases, dtype=torch.float64)
    for g in range(dro.num_dro_groups):
        rows = torch.nonzero(groups == g).flatten()
        if rows.numel():
            w_cvar[rows] = float(pi[g]) * cvar_weights(expected_bank[rows], alpha=0.2)
    w_uni = composite_weights(expected_bank, groups, pi, "none")
    target = 0.5 * dro.num_cases
    lam = next(
        (x for x in np.linspace(0, 1, 20001) if effective_sample_size((1 - x) * w_cvar + x * w_uni) >= target), 1.0
    )
    expected = (1 - lam) * w_cvar + lam * w_uni
    assert torch.allclose(snap["weights"], expected, atol=1e-4)
    assert effective_sample_size(snap["weights"]) >= target - 1e-6 or math.isclose(lam, 1.0)


def test_refresh_is_logged_with_its_time(refreshed_run, caplog):
    wf, _ = refreshed_run
    handler = next(
        h for h in wf.parser.get_parsed_content("train#handlers") if type(h).__name__ == "BankRefreshHandler"
    )
    assert handler.last_seconds > 0
