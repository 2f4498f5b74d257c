"""bf16 autocast (the GPU profile's ``amp``) through the dMoE network, and the dMoE benchmark's bf16 mode.

A GPU is not needed: CPU autocast casts the same operations (convolutions, matmuls) to bf16, so a dtype mismatch in
the dMoE dispatch (index/scatter of bf16 expert outputs into float buffers) fails here as it would on CUDA.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from scripts.dmoe import ExpertBank
from scripts.dmoe_unet import DMoEResUNet

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_dmoe.py"


@pytest.fixture
def without_onednn():
    """Training under CPU bf16 autocast with oneDNN off. torch 2.13's oneDNN (v3.12) bf16 weight gradient of a 3x3x3
    convolution over 2x2x1 voxels (the network's deepest stage) sometimes holds NaN: about 1 in 25 fresh
    Conv3d(64, 128) modules on random inputs, 256 entries each, while the same module and input run again give finite
    values, so the kernel reads memory it did not write (seen 2026-12-07 on Zen 5 and on the CI machine). With oneDNN
    off, 0 of 300. Not bundle code, and the bundle never autocasts on the CPU; these tests check the dMoE dispatch."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # not mkldnn.flags(), which also sets oneDNN's TF32 switch and warns
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _net(dispatch: str) -> DMoEResUNet:
    torch.manual_seed(0)
    net = DMoEResUNet(features=4, num_subgroups=4, num_experts=4, use_dmoe=True, dispatch=dispatch)
    for m in net.modules():
        if isinstance(m, ExpertBank):
            m.reset_parameters(zero_output=False)  # non-trivial experts: the dMoE branch contributes
    return net


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("subgroups", [[0, 2], [1, 4]], ids=["named", "one-unknown"])
def test_dmoe_network_under_bf16_autocast_matches_fp32(dispatch, subgroups):
    net = _net(dispatch).eval()
    x, g = torch.rand(2, 1, 64, 64, 32, generator=torch.Generator().manual_seed(1)), torch.tensor(subgroups)
    with torch.no_grad():
        ref = torch.softmax(net(x, g), dim=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, g)
    assert low.dtype == torch.bfloat16
    diff = (torch.softmax(low.float(), dim=1) - ref).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.005, (diff.max().item(), diff.mean().item())


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.usefixtures("without_onednn")
def test_dmoe_network_trains_under_bf16_autocast(dispatch):
    net = _net(dispatch).train()
    x = torch.rand(2, 1, 64, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x, torch.tensor([0, 3])).float().square().mean()
    loss.backward()
    banks = [m for m in net.modules() if isinstance(m, ExpertBank)]
    assert banks and all(m.w2.grad is not None and m.w2.grad.abs().sum() > 0 for m in banks)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) == len(list(net.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.usefixtures("without_onednn")
def test_bench_dmoe_train_step_with_amp_updates_the_network():
    spec = importlib.util.spec_from_file_location("bench_dmoe", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    net = _net("auto")
    before = [p.detach().clone() for p in net.parameters()]
    x, y = torch.rand(2, 1, 64, 64, 32), (torch.rand(2, 1, 64, 64, 32) > 0.7).float()
    step = bench.make_train_step(net, x, y, torch.tensor([0, 2]), amp=True)
    losses = [step(), step()]
    assert all(0.0 < v < 10.0 for v in losses), losses  # DiceCE of 2 classes: finite and positive
    moved = sum(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert moved == len(before)  # AdamW moves every parameter that got a gradient; all do here
