"""JTT (issue 29, item 3): the error set and the up-weighting by hand, determinism, the subtype kept out of
training, and a tiny end-to-end run: identification -> error set -> retraining."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_bundle_workflow
from monai.bundle import ConfigParser
from scripts import synthetic_2d
from scripts.engine import FairDROSampler
from scripts.jtt import JTTWeights, case_dice, jtt_weights, read_error_set, select_error_set

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE / "configs"
COHORT = [{"id": f"c{k}", "stage": ["T1", "T2"][k % 2]} for k in range(10)]


def _jtt(error_set, lambda_up=5.0, **kwargs):
    return JTTWeights(2, COHORT, group_key="stage", group_names=["T1", "T2"], intra="none", inter="empirical",
                      error_set=error_set, lambda_up=lambda_up, **kwargs)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# by hand
# ---------------------------------------------------------------------------------------------------------------
def test_error_set_is_strictly_below_tau():
    dice = {"a": 0.2, "b": 0.5, "c": 0.49, "d": 0.9, "e": 0.5000001, "f": 0.0}
    assert select_error_set(dice, 0.5) == ["a", "c", "f"]  # b (exactly tau) and e are not errors
    assert select_error_set(dice, 0.0) == []  # nothing is below 0
    assert select_error_set(dice, 1.0) == ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(ValueError, match="tau"):
        select_error_set(dice, 1.5)
    with pytest.raises(ValueError, match="non-finite"):
        select_error_set({"a": float("nan")}, 0.5)


def test_case_dice_by_hand():
    pred = torch.zeros(3, 2, 2, 2)
    pred[:, 0] = 1.0  # background everywhere ...
    pred[0, 1, 0, :] = 2.0  # case 0: foreground on the top row (2 pixels)
    label = torch.zeros(3, 1, 2, 2)
    label[0, 0, 0, 0] = label[0, 0, 1, 0] = 1  # case 0: one pixel shared of 2 + 2 -> 2 * 1 / 4 = 0.5
    label[1, 0, 1, 1] = 1  # case 1: missed -> 0
    assert case_dice(pred, label).tolist() == [0.5, 0.0, 1.0]  # case 2: empty in both -> 1


def test_upweighting_by_hand_lambda_5_two_errors_in_ten():
    w = jtt_weights([k in (3, 7) for k in range(10)], 5.0)
    # 2 * 5 + 8 * 1 = 18: an error weighs 5/18, another case 1/18
    expected = torch.tensor([5 / 18 if k in (3, 7) else 1 / 18 for k in range(10)], dtype=torch.float64)
    assert torch.allclose(w, expected, atol=1e-15) and float(w.sum()) == pytest.approx(1.0)
    dro = _jtt(["c7", "c3"], apply="loss")
    assert torch.allclose(dro.case_weights(), expected, atol=1e-15)
    assert not dro.in_warmup and not dro.uses_bank and dro.minority is None
    # through the loss path: m_j = N w_j / B; through the sampler: the probabilities
    assert torch.allclose(dro.loss_weights(["c3", "c0"]), torch.tensor([10 * 5 / 18 / 2, 10 / 18 / 2]).double())
    sampled = _jtt(["c3", "c7"], apply="sample")
    assert torch.allclose(FairDROSampler(sampled).probabilities(), expected, atol=1e-15)
    with pytest.raises(ValueError, match="lambda_up"):
        _jtt(["c3"], lambda_up=0)
    with pytest.raises(ValueError, match="not in the FairDRO cohort"):
        _jtt(["x9"]).case_weights()


def test_error_set_file_is_read_on_first_use(tmp_path):
    path = tmp_path / "error_set.json"
    dro = _jtt(str(path))  # builds before the file exists (the config is parsed before jtt_identify runs)
    with pytest.raises(FileNotFoundError, match="jtt_identify"):
        dro.case_weights()
    path.write_text(json.dumps({"tau": 0.5, "epochs": 1, "num_cases": 10, "ids": ["c3", "c7"]}))
    assert read_error_set(path) == ["c3", "c7"]
    assert dro.case_weights()[3] == pytest.approx(5 / 18)
    state = dro.state_dict()
    assert state["jtt_error_set"] == ["c3", "c7"] and state["hparams"]["lambda_up"] == 5.0


def test_same_seed_same_weights_and_draws():
    a, b = _jtt(["c3", "c7"], apply="sample"), _jtt(["c7", "c3"], apply="sample")
    assert torch.equal(a.case_weights(), b.case_weights())
    assert list(FairDROSampler(a, seed=4)) == list(FairDROSampler(b, seed=4))
    assert list(FairDROSampler(a, seed=4)) != list(FairDROSampler(a, seed=5))


# ---------------------------------------------------------------------------------------------------------------
# the subtype is read only by the oracles, the evaluation, the data generators and the diagnostic (reporting)
# ---------------------------------------------------------------------------------------------------------------
SUBTYPE_READERS = {
    "configs/variants/oracle.json", "configs/variants/oracle_dmoe.json",  # the oracles
    "scripts/fairdro.py",  # the oracle's weights (intra="oracle" only)
    "scripts/fairness_metrics.py", "scripts/fairness_report.py", "scripts/fairness_stats.py",  # the evaluation
    "scripts/synthetic.py", "scripts/synthetic_2d.py", "scripts/split_2d.py",  # the generators (split_2d: docs)
    "scripts/cvar_diagnostic.py", "scripts/bank_refresh.py",  # the intra-group diagnostic: reports only
}  # fmt: skip


def test_subtype_is_read_only_by_the_oracles_the_evaluation_and_the_diagnostic():
    files = sorted([*BUNDLE.glob("configs/**/*.json"), *BUNDLE.glob("scripts/*.py")])
    readers = {str(f.relative_to(BUNDLE)) for f in files if "subtype" in f.read_text()}
    assert readers == SUBTYPE_READERS
    assert "scripts/jtt.py" not in readers and "configs/variants/jtt.json" not in readers
    # the jtt variant builds on a cohort without subtypes, and keeps no minority flag
    blind = [{"id": f"c{k}", "stage": "T1"} for k in range(4)]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "variants" / "jtt.json")])
    parser["dro#cohort"] = blind
    parser["dro#error_set"] = ["c1"]
    dro = parser.get_parsed_content("dro", instantiate=True)
    assert isinstance(dro, JTTWeights) and dro.minority is None and dro.lambda_up == 5.0
    assert torch.allclose(dro.case_weights(), torch.tensor([1, 5, 1, 1], dtype=torch.float64) / 8)


def test_jtt_variant_resolves_on_the_dmoe_network():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "variants" / "jtt.json")])
    config = parser.get()
    assert config["use_dmoe"] is True and config["run_name"] == "jtt"
    assert set(config["jtt"]) >= {"epochs", "tau", "lambda_up", "error_set"}
    assert {"jtt_epochs", "jtt_tau", "jtt_lambda_up", "jtt_error_set"} <= set(config["settings_help"])
    assert parser.get_parsed_content("jtt#error_set").endswith("/runs/jtt/identify/error_set.json")


# ---------------------------------------------------------------------------------------------------------------
# end to end on a tiny 2D cohort: identification (ERM, 1 epoch) -> error set -> 1 epoch of retraining
# ---------------------------------------------------------------------------------------------------------------
TINY = {"features": 4, "num_experts": 4, "batch_size": 8, "val_interval": 1, "epochs": 1}


def _identification(data: Path, out: Path) -> Path:
    files = ["train.json", "variants/dmoe.json", "profiles/2d.json"]
    run_bundle_workflow(files, "train", "training", dataset_dir=str(data), output_dir=str(out),
                        ckpt_dir=str(out / "models"), key_metric="last", seed=0, **TINY)  # fmt: skip
    return out


def _jtt_run(run_id: str, data: Path, run: Path, **extra):
    files = ["train.json", "variants/jtt.json", "profiles/2d.json"]
    settings = {"jtt#epochs": 1, "jtt#tau": 0.5, **TINY, **extra}
    return run_bundle_workflow(files, "train", run_id, dataset_dir=str(data), output_dir=str(run),
                               ckpt_dir=str(run / "models"), **settings)  # fmt: skip


def test_end_to_end_identify_then_retrain(tmp_path):
    data = tmp_path / "cohort"
    synthetic_2d.generate_cohort(data, n_cases=24, seed=0)
    run = tmp_path / "jtt"
    _identification(data, run / "identify")
    _jtt_run("jtt_identify", data, run)
    record = json.loads((run / "identify" / "error_set.json").read_text())
    training_ids = {str(it["id"]) for it in json.loads((data / "datalist.json").read_text())["training"]}
    assert record["tau"] == 0.5 and record["epochs"] == 1 and record["num_cases"] == len(training_ids)
    assert set(record["ids"]) <= training_ids and record["ids"] == sorted(record["ids"])
    # determinism: the same seed gives the same identification model, hence the same error set
    again = _identification(data, tmp_path / "again")
    _jtt_run("jtt_identify", data, tmp_path / "again_jtt", **{"jtt#identify_dir": str(again)})
    assert json.loads((again / "error_set.json").read_text()) == record
    # a checkpoint of another length is refused
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the ValueError
        _jtt_run("jtt_identify", data, run, **{"jtt#epochs": 2})
    assert "trained for 1 epochs" in str(err.value.__cause__)
    wf = _jtt_run("training", data, run)
    dro = wf.parser.get_parsed_content("dro")
    flags = torch.tensor([c in set(record["ids"]) for c in dro.ids])
    assert torch.equal(dro.upweighted(), flags) and torch.equal(dro.case_weights(), jtt_weights(flags, 5.0))
    assert wf.trainer.state.epoch == 1 and (run / "models" / "model.pt").is_file()
