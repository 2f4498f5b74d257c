"""Smoke tests: the bundle's configs run through MONAI's ConfigWorkflow on a tiny synthetic cohort."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_bundle_workflow as _run
from monai.bundle import ConfigWorkflow
from scripts import synthetic

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
VARIANTS = ["erm", "groupdro", "dmoe", "fairdro", "fairdro_groupdro", "oracle", "erm_cvar", "fairdro_empirical"]

#: settings that make one epoch take seconds on a CPU
TINY = {
    "epochs": 1,
    "val_interval": 1,
    "patch_size": [64, 64, 32],
    "features": 4,
    "num_experts": 4,
    "batch_size": 2,
    "num_samples": 1,
}
#: the inference config takes the network settings only
TINY_INFER = {k: TINY[k] for k in ("patch_size", "features", "num_experts")}


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_cohort")
    synthetic.generate_cohort(out, n_cases=10, seed=7, shape=(48, 48, 24))
    return out


@pytest.fixture(scope="session")
def trained_default(tiny_cohort, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_default")
    wf = _run(["train.json"], "train", "training", dataset_dir=str(tiny_cohort), output_dir=str(run_dir),
              ckpt_dir=str(run_dir / "models"), **TINY)  # fmt: skip
    return wf, run_dir


def test_train_default_one_epoch(trained_default):
    wf, run_dir = trained_default
    ckpt = run_dir / "models" / "model.pt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(state)  # strict: every key of the network is in the checkpoint
    assert not any(k.startswith("module.") for k in state)
    assert wf.trainer.state.epoch == 1
    # the resumable checkpoint carries the DRO state beside model, optimizer and trainer counters
    full = torch.load(run_dir / "checkpoints" / "checkpoint_final.pt", weights_only=True, map_location="cpu")
    assert set(full) == {"model", "optimizer", "lr_scheduler", "dro", "selection", "trainer", "rng"}
    assert wf.parser.get_parsed_content("dro").intra == "cvar"


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_variant_one_epoch(variant, tiny_cohort, tmp_path):
    out_root = tmp_path / "runs"
    wf = _run(["train.json", f"variants/{variant}.json"], "train", "training", dataset_dir=str(tiny_cohort),
              output_dir=f"$'{out_root}/' + @run_name", **TINY)  # fmt: skip
    run_dir = out_root / variant
    assert (run_dir / "models" / "model.pt").is_file(), "each variant writes into its own folder"
    net = wf.parser.get_parsed_content("network_def")
    expect_moe = variant in ("dmoe", "fairdro", "fairdro_groupdro", "fairdro_empirical")
    assert net.use_dmoe == expect_moe
    dro = wf.parser.get_parsed_content("dro")
    expected = {
        "erm": ("none", "empirical"),
        "groupdro": ("none", "groupdro"),
        "dmoe": ("none", "empirical"),
        "fairdro": ("cvar", "uniform"),
        "fairdro_groupdro": ("cvar", "groupdro"),
        "oracle": ("oracle", "empirical"),
        "erm_cvar": ("cvar", "empirical"),
        "fairdro_empirical": ("cvar", "empirical"),
    }[variant]
    assert (dro.intra, dro.inter) == expected
    # the variant's model evaluates (train + variant + evaluate) and serves (inference.json with its network switch)
    _run(["train.json", f"variants/{variant}.json", "evaluate.json"], "train", "evaluating",
         dataset_dir=str(tiny_cohort), output_dir=f"$'{out_root}/' + @run_name", **TINY)  # fmt: skip
    assert (run_dir / "fairness" / "metrics.json").is_file()
    pred = tmp_path / "pred"
    _run(["inference.json"], "infer", "inference", dataset_dir=str(tiny_cohort), output_dir=str(pred),
         ckpt_path=str(run_dir / "models" / "model.pt"), use_dmoe=expect_moe, **TINY_INFER)  # fmt: skip
    datalist = json.loads((tiny_cohort / "datalist.json").read_text())
    assert sorted(p.name for p in pred.glob("*_seg.nii.gz")) == sorted(
        f"{i['id']}_seg.nii.gz" for i in datalist["testing"]
    )


def test_train_then_evaluate_writes_fairness_outputs(trained_default, tiny_cohort):
    _, run_dir = trained_default
    _run(["train.json", "evaluate.json"], "train", "evaluating", dataset_dir=str(tiny_cohort),
         output_dir=str(run_dir), ckpt_dir=str(run_dir / "models"), **TINY)  # fmt: skip
    fair = run_dir / "fairness"
    for name in ("per_case.csv", "metrics.json", "report.html"):
        assert (fair / name).is_file(), name
    metrics = json.loads((fair / "metrics.json").read_text())
    assert set(metrics["groupings"]) == {"stage", "institution"}
    rows = (fair / "per_case.csv").read_text().splitlines()
    datalist = json.loads((tiny_cohort / "datalist.json").read_text())
    assert len(rows) - 1 == len(datalist["testing"])
    # the routing audit of the dMoE network is in metrics.json
    assert metrics["routing"] is not None and len(metrics["routing"]["layers"]) == 5
    # the page references only files beside it, all present, and its headline equals metrics.json
    from test_fairness_report import _Page

    page = _Page()
    page.feed((fair / "report.html").read_text())
    assert page.images and all((fair / src).is_file() for src in page.images), page.images
    for attribute in ("stage", "institution"):
        d = metrics["groupings"][attribute]["dice"]
        for name in ("dice_all", "worst_group_dice", "es_dice", "worst_group_cvar"):
            assert page.values[f"{attribute}.dice.{name}"] == f"{d[name]:.4f}", (attribute, name)


def test_inference_writes_masks_on_original_grid(trained_default, tiny_cohort, tmp_path):
    _, run_dir = trained_default
    out = tmp_path / "pred"
    _run(["inference.json"], "infer", "inference", dataset_dir=str(tiny_cohort), output_dir=str(out),
         ckpt_path=str(run_dir / "models" / "model.pt"), **TINY_INFER)  # fmt: skip
    datalist = json.loads((tiny_cohort / "datalist.json").read_text())
    for item in datalist["testing"]:
        src = nib.load(tiny_cohort / item["image"])
        seg = nib.load(out / f"{item['id']}_seg.nii.gz")
        assert seg.shape[:3] == src.shape
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


def test_training_command_from_inside_bundle(tiny_cohort, tmp_path):
    """`python -m monai.bundle run training` works from bundle/ as model-zoo users run it."""
    run_dir = tmp_path / "run_cwd"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        "--dataset_dir",
        str(tiny_cohort),
        "--output_dir",
        str(run_dir),
        "--ckpt_dir",
        str(run_dir / "models"),
    ]
    for key, value in TINY.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    res = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (run_dir / "models" / "model.pt").is_file()


def test_training_loss_decreases_over_a_short_schedule(tiny_cohort, tmp_path):
    from ignite.engine import Events

    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", run_id="training",
        dataset_dir=str(tiny_cohort), output_dir=str(tmp_path), ckpt_dir=str(tmp_path / "models"),
        **{**TINY, "epochs": 6, "val_interval": 6},
    )  # fmt: skip
    wf.initialize()
    per_epoch, current = [], []

    def record_iteration(engine):
        out = engine.state.output
        current.append(float((out[0] if isinstance(out, list) else out)["loss"]))

    def record_epoch(engine):
        per_epoch.append(float(np.mean(current)))
        current.clear()

    wf.trainer.add_event_handler(Events.ITERATION_COMPLETED, record_iteration)
    wf.trainer.add_event_handler(Events.EPOCH_COMPLETED, record_epoch)
    wf.run()
    wf.finalize()
    assert len(per_epoch) == 6 and all(np.isfinite(per_epoch))
    # the epoch-mean training loss falls steadily: at least 4 of the 5 epoch-to-epoch changes are decreases, and the
    # last two epochs are lower than the first two by more than 0.1 (the tiny run starts near 1.6)
    assert sum(b < a for a, b in zip(per_epoch, per_epoch[1:])) >= 4, per_epoch
    assert np.mean(per_epoch[-2:]) < np.mean(per_epoch[:2]) - 0.1, per_epoch
