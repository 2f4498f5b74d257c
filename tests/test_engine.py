"""Tests of the FairDRO engine wiring (scripts/engine.py) with a one-layer network on 8^3 volumes."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import PrepareBatchExtraInput
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.losses import DiceCELoss
from monai.utils.enums import CommonKeys as Keys
from scripts.engine import DRO_WEIGHT, SAMPLE_LOSS, FairDROHandler, FairDROSampler, FairDROTrainer
from scripts.fairdro import FairDRO
from scripts.losses import PerSampleDiceCELoss
from torch import nn
from torch.utils.data import DataLoader

NUM_GROUPS = 2  # subgroup index 2 = unknown


class TinyNet(nn.Module):
    """One 3x3x3 convolution to 2 classes; remembers the subgroup it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.last_subgroup = None

    def forward(self, x: torch.Tensor, subgroup: torch.Tensor | None = None) -> torch.Tensor:
        self.last_subgroup = subgroup
        return self.conv(x)


def _items(n=6, nan_id=None):
    """n cases c0..c{n-1}, subgroup i % 3 (2 = unknown), labels of varying difficulty."""
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        image = torch.rand(1, 8, 8, 8, generator=gen)
        label = (image > 0.3 + 0.08 * i).float()
        if f"c{i}" == nan_id:
            image[0, 0, 0, 0] = float("nan")
        items.append({"image": image, "label": label, "id": f"c{i}", "subgroup": torch.tensor(i % 3)})
    return items


def _trainer(dro, items, max_epochs, seed=0, sampler=None, loss=None, handlers=(), **kwargs):
    torch.manual_seed(seed)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    loader = DataLoader(items, batch_size=2, shuffle=False, sampler=sampler)
    trainer = FairDROTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=loss if loss is not None else PerSampleDiceCELoss(to_onehot_y=True, softmax=True),
        dro=dro,
        train_handlers=list(handlers),
        **kwargs,
    )
    return trainer, net, opt


def _record_losses(trainer):
    losses = []

    def record(engine):
        out = engine.state.output
        loss = out[0][Keys.LOSS] if isinstance(out, list) else out[Keys.LOSS]  # decollated or not
        losses.append(float(torch.as_tensor(loss).detach()))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    return losses


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_training_fills_bank_and_changes_weights(caplog):
    items = _items()
    dro = FairDRO(NUM_GROUPS, items)  # cohort straight from the datalist items (0-d tensor subgroups)
    assert dro.groups.tolist() == [0, 1, 2, 0, 1, 2]
    seen_at_epoch_end = []
    trainer, _, _ = _trainer(dro, items, 3, decollate=False)
    # registered before FairDROHandler: still sees the current DRO metrics at epoch end
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen_at_epoch_end.append(dict(e.state.metrics)))
    FairDROHandler(dro).attach(trainer)
    weights_after_epoch1 = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: weights_after_epoch1.append(dro.case_weights()))
    losses = _record_losses(trainer)
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert len(losses) == 9 and all(torch.isfinite(torch.tensor(losses)))
    assert bool(dro.seen.all()) and dro.counts.tolist() == [3] * 6 and dro.num_updates == 9
    assert not dro.in_warmup
    w1, w3 = weights_after_epoch1[0], dro.case_weights()
    assert not torch.allclose(w1, torch.full((6,), 1 / 6, dtype=torch.float64))
    assert not torch.allclose(w1, w3)
    out = trainer.state.output
    for key in (Keys.IMAGE, Keys.LABEL, Keys.PRED, Keys.LOSS, SAMPLE_LOSS, DRO_WEIGHT, "id", "subgroup"):
        assert key in out, key
    assert out[Keys.LOSS].ndim == 0 and out[SAMPLE_LOSS].shape == (2,) and out["id"] == ["c4", "c5"]
    assert out["subgroup"].tolist() == [1, 2]
    # last batch (c4 in group 1, c5 unknown): multipliers N w / B, i.e. 3 w
    torch.testing.assert_close(out[DRO_WEIGHT], (3 * w3[4:]).float())
    torch.testing.assert_close(out[Keys.LOSS], (out[DRO_WEIGHT] * out[SAMPLE_LOSS]).sum())
    assert "dro_pi_g0" in seen_at_epoch_end[-1] and "dro_ess" in seen_at_epoch_end[-1]
    assert seen_at_epoch_end[-1]["dro_warmup"] == 0.0 and trainer.state.metrics["dro_mass_unknown"] > 0
    assert "FairDRO epoch 3" in caplog.text


def test_dro_none_equals_supervised_trainer():
    items = _items()
    torch.manual_seed(0)
    reference_net = TinyNet()
    reference = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(items, batch_size=2),
        network=reference_net,
        optimizer=torch.optim.Adam(reference_net.parameters(), lr=0.05),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
    )
    reference_losses = _record_losses(reference)
    reference.run()
    trainer, net, _ = _trainer(None, items, 1)
    losses = _record_losses(trainer)
    trainer.run()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-6, atol=1e-6)
    for p, q in zip(net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # FairDRO's warm-up is bit-for-bit the dro=None run: iterations 1-2 (the bank is complete after the update of
    # iteration 3, whose batch is then already DRO-weighted)
    warm, warm_net, _ = _trainer(FairDRO(NUM_GROUPS, items), items, 1, epoch_length=2)
    warm_losses = _record_losses(warm)
    warm.run()
    plain, plain_net, _ = _trainer(None, items, 1, epoch_length=2)
    plain.run()
    assert warm_losses == losses[:2]
    for p, q in zip(plain_net.parameters(), warm_net.parameters()):
        assert torch.equal(p, q)


def test_nan_loss_raises_with_case_id_and_does_not_step():
    items = _items(nan_id="c3")
    dro = FairDRO(NUM_GROUPS, items)
    trainer, net, _ = _trainer(dro, items, 1)
    snapshot = {}
    trainer.add_event_handler(
        Events.ITERATION_STARTED(once=2),
        lambda e: snapshot.update({k: v.clone() for k, v in net.state_dict().items()}),
    )
    with pytest.raises(FloatingPointError, match=r"iteration 2 \(epoch 1\) for case ids \['c3'\]"):
        trainer.run()
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert dro.num_updates == 1 and dro.seen.tolist() == [True, True, False, False, False, False]


def test_prepare_batch_extra_input_and_decollate():
    items = _items()
    dro = FairDRO(NUM_GROUPS, items, warmup_steps=0)
    trainer, net, _ = _trainer(
        dro, items, 1, prepare_batch=PrepareBatchExtraInput(extra_keys={"subgroup": "subgroup"}), decollate=True
    )
    trainer.run()
    assert net.last_subgroup.tolist() == [1, 2]
    out = trainer.state.output  # decollated: one dict per batch item
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["id"] == "c4" and out[1]["id"] == "c5"
    assert isinstance(out[0][SAMPLE_LOSS], float) and DRO_WEIGHT in out[1] and Keys.LOSS in out[0]


def test_dro_needs_per_sample_loss_and_ids():
    items = _items()
    trainer, _, _ = _trainer(FairDRO(NUM_GROUPS, items), items, 1, loss=DiceCELoss(to_onehot_y=True, softmax=True))
    with pytest.raises(ValueError, match="per-sample losses"):
        trainer.run()
    no_ids = [{k: v for k, v in d.items() if k != "id"} for d in items]
    trainer, _, _ = _trainer(FairDRO(NUM_GROUPS, items), no_ids, 1)
    with pytest.raises(ValueError, match="case ids"):
        trainer.run()


def test_handler_refuses_a_trainer_without_this_dro():
    items = _items()
    dro = FairDRO(NUM_GROUPS, items)
    trainer, _, _ = _trainer(FairDRO(NUM_GROUPS, items), items, 1)
    with pytest.raises(ValueError, match="same FairDRO"):
        FairDROHandler(dro).attach(trainer)
    with pytest.raises(ValueError, match="same FairDRO"):
        _trainer(None, items, 1, handlers=[FairDROHandler(dro)])


def test_sampler_is_deterministic_and_follows_the_weights():
    items = _items()
    dro = FairDRO(NUM_GROUPS, items, apply="sample", warmup_steps=0)
    dro.update([d["id"] for d in items], torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.7]))
    sampler = FairDROSampler(dro, items, num_samples=200, seed=5)
    torch.testing.assert_close(sampler.probabilities(), dro.case_weights())
    first = list(sampler)
    assert first == list(FairDROSampler(dro, items, num_samples=200, seed=5)) and len(first) == 200
    # CVaR (alpha 0.2, two cases per group) puts each named group's mass on its worse case: c3 (0.9) and c4 (0.8);
    # the unknown cases c2, c5 keep 1/6 each; c0 and c1 have weight 0 and are never drawn
    assert set(first) == {2, 3, 4, 5}
    dro.update(["c0"], torch.tensor([5.0]))  # the bank moved: the next epoch draws differently
    second = list(sampler)
    assert second != first and 0 in second
    with pytest.raises(ValueError, match="not in the FairDRO cohort"):
        FairDROSampler(dro, ["c0", "zz"])
    # the stream is seeded by the step count: epochs differ even while the weights stay uniform (warm-up)
    warm = FairDRO(NUM_GROUPS, items, apply="sample")
    warm_sampler = FairDROSampler(warm, items, num_samples=50, seed=5)
    epoch1 = list(warm_sampler)
    warm.update(["c0"], torch.tensor([1.0]))
    assert warm.in_warmup and list(warm_sampler) != epoch1


@pytest.mark.parametrize("apply", ["loss", "sample"])
def test_checkpoint_resume_is_identical(tmp_path, deterministic, apply):
    items = _items()

    def make(max_epochs, seed):
        dro = FairDRO(NUM_GROUPS, items, inter="groupdro", eta=0.5, floor=0.1, apply=apply, warmup_steps=2)
        sampler = FairDROSampler(dro, items, seed=11) if apply == "sample" else None
        trainer, net, opt = _trainer(dro, items, max_epochs, seed=seed, sampler=sampler, handlers=[FairDROHandler(dro)])
        return trainer, net, opt, dro

    # uninterrupted: 3 epochs
    full, full_net, _, full_dro = make(3, seed=0)
    full.run()
    # 2 epochs, checkpoint with MONAI's CheckpointSaver
    first, net, opt, dro = make(2, seed=0)
    save_dict = {"model": net, "optimizer": opt, "dro": dro, "trainer": first}
    CheckpointSaver(str(tmp_path), save_dict, save_interval=1, epoch_level=True, n_saved=None).attach(first)
    first.run()
    path = tmp_path / "checkpoint_epoch=2.pt"
    assert path.exists()
    # fresh objects (other initial weights) restored with MONAI's CheckpointLoader (weights_only=True), 1 more epoch
    resumed, net2, opt2, dro2 = make(3, seed=123)
    load_dict = {"model": net2, "optimizer": opt2, "dro": dro2, "trainer": resumed}
    CheckpointLoader(str(path), load_dict, map_location="cpu").attach(resumed)
    resumed.run()
    assert resumed.state.epoch == 3 and resumed.state.iteration == 9
    for (name, p), q in zip(full_net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(p, q), name
    a, b = full_dro.state_dict(), dro2.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    assert not torch.allclose(full_dro.pi, torch.full((2,), 0.5, dtype=torch.float64))


def _config(apply):
    """The train.json pieces handed to the lead, with in-memory data (stage names, one unlisted) instead of files."""
    gen = torch.Generator().manual_seed(0)
    stages = ["T1", "T2", "T1", "T3", "T2", None]  # T3 is not a configured subgroup, None is missing: both unknown
    data = []
    for i, stage in enumerate(stages):
        image = torch.rand(1, 8, 8, 8, generator=gen)
        data.append({"image": image, "label": (image > 0.5).float(), "id": f"case{i}", "stage": stage})
    return {
        "subgroups": ["T1", "T2"],
        "subgroup_key": "stage",
        "device": "cpu",
        "network": TinyNet(),  # an object in place of the bundle's network definition
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.01},
        "dro": {
            "_target_": "scripts.fairdro.FairDRO",
            "num_groups": "$len(@subgroups)",
            "cohort": "$@train#dataset.data",
            "group_key": "@subgroup_key",
            "group_names": "@subgroups",
            "intra": "cvar",
            "alpha": 0.2,
            "floor": 0.0,
            "inter": "uniform",
            "eta": 0.01,
            "ema": 0.5,
            "apply": apply,
            "warmup_steps": None,
            "unknown": "erm",
        },
        "loss": {"_target_": "scripts.losses.PerSampleDiceCELoss", "to_onehot_y": True, "softmax": True},
        "train": {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "scripts.transforms.CaseIdd"},
                    {
                        "_target_": "scripts.transforms.SubgroupIndexd",
                        "attribute": "@subgroup_key",
                        "subgroups": "@subgroups",
                    },
                    {"_target_": "DeleteItemsd", "keys": "@subgroup_key"},
                ],
            },
            "dataset": {"_target_": "Dataset", "data": data, "transform": "@train#preprocessing"},
            "sampler": {
                "_target_": "scripts.engine.FairDROSampler",
                "dro": "@dro",
                "ids": "$@train#dataset.data",
                "seed": 0,
                "_disabled_": apply != "sample",
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": 2,
                "shuffle": apply != "sample",
                "sampler": "@train#sampler" if apply == "sample" else None,
                "num_workers": 0,
            },
            "handlers": [{"_target_": "scripts.engine.FairDROHandler", "dro": "@dro"}],
            "trainer": {
                "_target_": "scripts.engine.FairDROTrainer",
                "device": "@device",
                "max_epochs": 2,
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "optimizer": "@optimizer",
                "loss_function": "@loss",
                "dro": "@dro",
                "prepare_batch": "$monai.engines.utils.PrepareBatchExtraInput(extra_keys={'subgroup': 'subgroup'})",
                "train_handlers": "@train#handlers",
            },
        },
        "checkpoint": {
            "_target_": "CheckpointSaver",
            "save_dir": "$str(@ckpt_dir)",
            "save_dict": {"model": "@network", "optimizer": "@optimizer", "dro": "@dro", "trainer": "@train#trainer"},
            "save_final": True,
        },
    }


@pytest.mark.parametrize("apply", ["loss", "sample"])
def test_config_snippet_builds_and_trains(tmp_path, apply):
    from monai.bundle import ConfigParser

    config = _config(apply)
    config["ckpt_dir"] = str(tmp_path)
    parser = ConfigParser(config)
    trainer = parser.get_parsed_content("train#trainer")
    parser.get_parsed_content("checkpoint").attach(trainer)
    trainer.run()
    dro = parser.get_parsed_content("dro")
    assert trainer.dro is dro and dro.groups.tolist() == [0, 1, 0, 2, 1, 2]
    assert dro.num_updates == 6 and trainer.state.metrics["dro_warmup"] in (0.0, 1.0)
    if apply == "loss":
        assert bool(dro.seen.all())
    state = torch.load(tmp_path / "checkpoint_final_iteration=6.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "dro", "trainer"} and state["dro"]["num_updates"] == 6


class AuxNet(TinyNet):
    """TinyNet exposing a load-balancing loss like DMoEResUNet.aux_loss (here a known constant with a gradient)."""

    def __init__(self, aux_value: float) -> None:
        super().__init__()
        self.aux_value = aux_value

    def aux_loss(self) -> torch.Tensor:
        return self.aux_value * self.conv.bias.sum() * 0 + torch.tensor(self.aux_value)


def test_network_auxiliary_loss_is_added_to_the_training_loss():
    items = _items()
    losses = {}
    for aux in (0.0, 0.75):
        torch.manual_seed(0)
        net = AuxNet(aux)
        trainer = FairDROTrainer(
            device="cpu",
            max_epochs=1,
            epoch_length=1,
            train_data_loader=DataLoader(items, batch_size=2),
            network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
            loss_function=PerSampleDiceCELoss(to_onehot_y=True, softmax=True),
            dro=None,
        )
        losses[aux] = _record_losses(trainer)
        trainer.run()
    # same weights (lr 0) and batch: the two losses differ by exactly the auxiliary value
    assert losses[0.75][0] == pytest.approx(losses[0.0][0] + 0.75, abs=1e-6)
