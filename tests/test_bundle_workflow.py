"""Smoke tests: the bundle's configs run through MONAI's ConfigWorkflow on a tiny synthetic cohort."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from scripts import synthetic

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"

#: settings that make one epoch take seconds on a CPU
TINY = {
    "epochs": 1,
    "val_interval": 1,
    "patch_size": [32, 32, 32],
    "features": 4,
    "num_experts": 4,
    "batch_size": 2,
    "num_samples": 1,
}


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_cohort")
    synthetic.generate_cohort(out, n_cases=10, seed=7, shape=(48, 48, 24))
    return out


def test_train_config_properties_and_one_epoch(tiny_cohort, tmp_path):
    run_dir = tmp_path / "run"
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        workflow_type="train",
        run_id="training",
        dataset_dir=str(tiny_cohort),
        output_dir=str(run_dir),
        ckpt_dir=str(run_dir / "models"),
        **TINY,
    )
    assert wf.check_properties() == []
    wf.initialize()
    wf.run()
    wf.finalize()
    ckpt = run_dir / "models" / "model.pt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    net = wf.network_def
    net.load_state_dict(state)  # strict: every key of the network is in the checkpoint
    assert wf.trainer.state.epoch == 1


def test_training_command_from_inside_bundle(tiny_cohort, tmp_path):
    """`python -m monai.bundle run training` works from bundle/ as model-zoo users run it."""
    run_dir = tmp_path / "run_cwd"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(tiny_cohort), "--output_dir", str(run_dir), "--ckpt_dir", str(run_dir / "models")]
    for key, value in TINY.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    res = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (run_dir / "models" / "model.pt").is_file()
