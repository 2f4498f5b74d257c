"""The official model-zoo checks of the network: verify_net_in_out and ckpt_export (TorchScript)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
NET = ["--features", "4", "--num_experts", "4"]


def _env():
    import os

    env = dict(os.environ)
    # MONAI's verify/export commands do not add the bundle to sys.path (`make setup` registers it in .venv)
    env["PYTHONPATH"] = str(REPO / "bundle") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _bundle_cmd(*args):
    res = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, env=_env(), capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"features": 4, "num_experts": 4})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    for m in net.moe_layers().values():  # non-zero dMoE branches (they start as the identity), as after training
        m.experts.reset_parameters(zero_output=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def test_verify_net_in_out():
    out = _bundle_cmd("verify_net_in_out", "network_def", "--meta_file", "bundle/configs/metadata.json",
                      "--config_file", "bundle/configs/inference.json", *NET)  # fmt: skip
    assert "verified with no error" in out


def test_ckpt_export_matches_eager_with_and_without_subgroup(checkpoint, tmp_path):
    net, ckpt = checkpoint
    ts = tmp_path / "model.ts"
    _bundle_cmd("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--meta_file",
                "bundle/configs/metadata.json", "--config_file", "bundle/configs/inference.json", *NET)  # fmt: skip
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert b'"network_data_format"' in extra["metadata.json"] and b'"network_def"' in extra["inference.json"]
    x = torch.rand(2, 1, 64, 64, 32)
    with torch.no_grad():
        for subgroup in (torch.tensor([0, 3]), torch.tensor([2]), None, torch.tensor([4, 1])):
            torch.testing.assert_close(scripted(x, subgroup), net(x, subgroup), atol=1e-4, rtol=1e-4)
