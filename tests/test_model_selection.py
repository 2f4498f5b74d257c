"""key_metric model selection: which validation epoch becomes model.pt."""

import json

import pytest
import torch
from ignite.engine import Engine, Events
from scripts.model_selection import KEY_METRICS, ModelSelection, read_selection, select_epoch

# a scripted sequence of validation results (epoch: metrics): each key metric peaks at another epoch
SCRIPT = [
    (2, {"val_mean_dice": 0.70, "val_worst_group_dice": 0.50, "val_worst_group_cvar": 0.30}),
    (4, {"val_mean_dice": 0.80, "val_worst_group_dice": 0.62, "val_worst_group_cvar": 0.35}),
    (6, {"val_mean_dice": 0.78, "val_worst_group_dice": 0.66, "val_worst_group_cvar": 0.34}),
    (8, {"val_mean_dice": 0.80, "val_worst_group_dice": 0.60, "val_worst_group_cvar": 0.41}),  # mean Dice ties 4
    (10, {"val_mean_dice": 0.75, "val_worst_group_dice": 0.55, "val_worst_group_cvar": 0.40}),
]
EXPECTED = {"val_mean_dice": 4, "val_worst_group_dice": 6, "val_worst_group_cvar": 8, "last": 10}


@pytest.mark.parametrize("key_metric", KEY_METRICS)
def test_select_epoch_on_a_scripted_sequence(key_metric):
    assert select_epoch(SCRIPT, key_metric) == EXPECTED[key_metric]


def test_select_epoch_rejects_unknown_key():
    with pytest.raises(ValueError, match="key_metric must be one of"):
        select_epoch(SCRIPT, "val_loss")
    assert select_epoch([], "val_mean_dice") is None


@pytest.mark.parametrize("key_metric", KEY_METRICS)
def test_handler_saves_the_selected_epoch(key_metric, tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    selection = ModelSelection(net, str(tmp_path), key_metric=key_metric)
    script = dict(SCRIPT)
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def scripted_metrics(engine):  # registered first: the metrics of this validation, weights tagged by epoch
        engine.state.metrics = dict(script[engine.state.epoch])
        with torch.no_grad():
            net.weight.fill_(float(engine.state.epoch))

    selection.attach(evaluator)
    for epoch in script:  # the trainer runs the evaluator once per validation, with its own epoch
        evaluator.state.epoch = epoch - 1
        evaluator.state.max_epochs = epoch
        evaluator.run([0], max_epochs=epoch)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert float(saved["weight"]) == EXPECTED[key_metric]
    record = json.loads((tmp_path / "model_selection.json").read_text())
    assert record["selected_epoch"] == EXPECTED[key_metric] and len(record["history"]) == len(SCRIPT)
    assert read_selection(str(tmp_path))["selected_epoch"] == EXPECTED[key_metric]
    # resume: a fresh handler loaded from the state keeps the same best
    again = ModelSelection(net, str(tmp_path), key_metric=key_metric)
    again.load_state_dict(selection.state_dict())
    assert (again.best_epoch, again.best_value) == (selection.best_epoch, selection.best_value)


def test_missing_key_metric_is_named(tmp_path):
    selection = ModelSelection(torch.nn.Linear(1, 1), str(tmp_path), key_metric="val_worst_group_cvar")
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def metrics(engine):
        engine.state.metrics = {"val_mean_dice": 0.5}

    selection.attach(evaluator)
    with pytest.raises(KeyError, match="val_worst_group_cvar"):
        evaluator.run([0], max_epochs=1)
    assert read_selection(str(tmp_path / "none")) is None
