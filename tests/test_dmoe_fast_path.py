"""The register code of the native expert kernels (``scripts/dmoe_cpu.cpp``, C = 8 channels and H = 32 hidden units:
the first two stages of the default network) gives the bits of the per-pair code it replaced, so the committed
training runs keep their results.

``torch.ops.fairdro_dmoe.set_register_path(False)`` sends C = 8, H = 32 back through the per-pair code (the kernels
before the register code); every output and gradient must be bitwise equal between the two, for the kernels alone
and for training steps of the whole network.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_tool
from dmoe_kernel_cases import kernel_inputs, kernels, register_path, torch_threads
from monai.losses import DiceCELoss
from scripts import dmoe_native
from scripts.dmoe_native import lane_threshold
from scripts.dmoe_unet import DMoEResUNet

pytestmark = needs_tool("c++")


@pytest.fixture(autouse=True)
def _built(monkeypatch):
    monkeypatch.setenv(dmoe_native.ENV_VAR, "1")
    assert dmoe_native.available()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("n", [64, 100, 4133])
def test_register_kernels_give_the_bits_of_the_per_pair_code(threads, dtype, k, skip, n):
    inputs = kernel_inputs(n, k, dtype, skip, seed=n * 10 + k)
    with torch_threads(threads):
        fast = kernels(*inputs, skip, register=True)
        slow = kernels(*inputs, skip, register=False)
    names = ("y", "outs", "gh", "gw", "gw1", "gb1", "gw2", "gb2")
    for name, a, b in zip(names, fast, slow):
        assert torch.equal(a, b), name
    if n > 100:
        return  # the reference below is slow for many voxels
    # the per-pair code is a correct expert bank: y against a plain torch computation (to float rounding)
    h, w, experts, (w1, b1, w2, b2), draws, _ = inputs
    tokens = h.transpose(1, 2)  # (B, N, C)
    mix = torch.zeros_like(tokens)
    for j in range(k):
        e = experts[:, j]  # (B, N)
        z = torch.relu(torch.einsum("bnc,bnch->bnh", tokens, w1[e]) + b1[e])
        mix += w[:, j].unsqueeze(-1) * (torch.einsum("bnh,bnhc->bnc", z, w2[e]) + b2[e])
    lanes = draws.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[: h.numel()].view(2, n, 8)
    keep = (lanes >= lane_threshold(0.1)).to(dtype) / 0.9
    expected = (tokens + keep * mix).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(slow[0], expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [16, 24, 32, 64])
@pytest.mark.parametrize("n", [5, 300])
def test_register_rows_give_the_bits_of_the_row_by_row_code(threads, dtype, c, n):
    """The other sizes run the generic per-pair code, whose row-vector times matrix products hold the output in
    registers across the rows (vec_mat); switched off, they go row by row as before. c = 24: a hidden layer of 96
    units, not a multiple of the 4 vectors the register code holds."""
    inputs = kernel_inputs(n, 2, dtype, False, seed=c + n, c=c)
    with torch_threads(threads):
        fast = kernels(*inputs, False, register=True)
        slow = kernels(*inputs, False, register=False)
    for name, a, b in zip(("y", "outs", "gh", "gw", "gw1", "gb1", "gw2", "gb2"), fast, slow):
        assert torch.equal(a, b), name
    assert fast[4].abs().sum() > 0  # the experts' input-layer gradient is not trivially zero


def _train(register: bool, threads: int, steps: int = 3):
    """A few AdamW steps of the default network (f = 8: two stages of C = 8) on a fixed batch: the losses, the
    gradients of the last step and the parameters after it."""
    torch.manual_seed(0)
    net = DMoEResUNet(features=8, num_subgroups=4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.rand(2, 1, 64, 32, 32)
    y = (torch.rand(2, 1, 64, 32, 32) > 0.7).float()
    g = torch.tensor([0, 2])
    losses = []
    with torch_threads(threads), register_path(register):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x, g), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return losses, grads, {n: p.detach().clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("threads", [1, 2])
def test_training_steps_are_bit_identical(threads):
    fast, slow = _train(True, threads), _train(False, threads)
    assert all(torch.equal(a, b) for a, b in zip(fast[0], slow[0])), "losses"
    assert fast[1].keys() == slow[1].keys() and any("moe.experts" in n for n in fast[1])
    for name in slow[1]:
        assert torch.equal(fast[1][name], slow[1][name]), f"gradient of {name}"
    for name in slow[2]:
        assert torch.equal(fast[2][name], slow[2][name]), f"parameter {name}"
    # the steps trained the experts (a zero-output start would make the comparison trivial for w2)
    assert fast[2]["stages.0.moe.experts.w2"].abs().sum() > 0
