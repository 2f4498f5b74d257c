"""The native kernels' random numbers (scripts/dmoe_rng_cpu.cpp via scripts.dmoe_native.randn / random64) against
torch's own ``randn`` / ``random_()`` from the same generator state: the same values and the same state after, for
sizes around the generator's 624-word blocks and the 16-value Box-Muller chunks; the check that turns them off on a
machine where they would differ; and a dMoE network's training steps with and without them, bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.profiler
from conftest import needs_tool
from scripts import dmoe_native
from scripts.dmoe import lane_draws
from scripts.dmoe_unet import DMoEResUNet

pytestmark = needs_tool("c++")  # torch builds the kernels with c++ (or $CXX)

SIZES = [16, 17, 31, 100, 311, 312, 313, 623, 624, 625, 1000, 1248, 4095, 4096, 4097, 12345, 40000]


@pytest.fixture(autouse=True)
def _built(monkeypatch):
    """The kernels built (required) and the once-per-process check passed here."""
    monkeypatch.setenv(dmoe_native.ENV_VAR, "1")
    assert dmoe_native.available()
    assert dmoe_native.rng_agrees("normal") and dmoe_native.rng_agrees("random64")


def _from_same_state(seed: int, skip: int, draw):
    """draw() after seeding and moving ``skip`` words into the generator's block, and the next torch.rand after."""
    torch.manual_seed(seed)
    torch.rand(skip)  # one word per float: start anywhere inside a 624-word block
    return draw(), torch.rand(3)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("skip", [0, 1, 300, 623])
def test_randn_equals_torch(n, skip):
    """randn (float32, >= 16 values: the kernels' fill) equals torch.randn bit for bit, and so does what follows."""
    ours, after = _from_same_state(n, skip, lambda: dmoe_native.randn((n,), torch.float32, torch.device("cpu")))
    theirs, after_theirs = _from_same_state(n, skip, lambda: torch.randn(n))
    assert torch.equal(_bits(ours), _bits(theirs))
    assert torch.equal(after, after_theirs)


@pytest.mark.parametrize("n", [0, 1, 2, 311, 312, 313, 624, 1000, 40000])
@pytest.mark.parametrize("skip", [0, 1, 623])
def test_random64_equals_torch(n, skip):
    """random64 (two words a draw, high word first, 63 bits) equals int64 random_(), and so does what follows."""
    ours, after = _from_same_state(n, skip, lambda: dmoe_native.random64(n, torch.device("cpu")))
    theirs, after_theirs = _from_same_state(n, skip, lambda: torch.empty(n, dtype=torch.int64).random_())
    assert torch.equal(ours, theirs)
    assert bool((ours >= 0).all())
    assert torch.equal(after, after_theirs)


def _ops_called(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("fast", [True, False])
def test_the_layer_draws_with_the_kernels(fast):
    """A dMoE training forward (one native call per layer) draws its noise and dropout with the kernels' generator
    when the check passed (no aten::normal_ / random_ op), with torch's ops when it did not."""
    net = DMoEResUNet(features=8, num_subgroups=4).train()
    x, g = torch.randn(2, 1, 64, 64, 32), torch.tensor([0, 2])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmoe_native, "_rng_checked", {"normal": fast, "random64": fast})
        called = _ops_called(lambda: net(x, g))
    assert "fairdro_dmoe::layer" in called
    torch_draws = {"aten::normal_", "aten::random_"} & called
    assert torch_draws == (set() if fast else {"aten::normal_", "aten::random_"})


def test_randn_draws_with_the_kernels():
    """randn of a float32 tensor of 16+ values calls the kernels' fill; of 15 values, torch's normal_."""
    cpu = torch.device("cpu")
    assert "fairdro_dmoe::fill_normal" in _ops_called(lambda: dmoe_native.randn((16,), torch.float32, cpu))
    assert "aten::normal_" in _ops_called(lambda: dmoe_native.randn((15,), torch.float32, cpu))


@pytest.mark.parametrize("dtype,n", [(torch.float64, 1000), (torch.float32, 15)])
def test_randn_falls_back_to_torch(dtype, n):
    """float64, and fewer than 16 values (torch's serial path), are torch's own draws."""
    torch.manual_seed(1)
    ours = dmoe_native.randn((n,), dtype, torch.device("cpu"))
    torch.manual_seed(1)
    assert torch.equal(ours, torch.randn(n, dtype=dtype)) and ours.dtype == dtype


def test_lane_draws_native_equals_torch():
    """The dropout draws of the native path equal the Python path's."""
    torch.manual_seed(2)
    ours = lane_draws(3 * 5000 + 1, torch.device("cpu"), native=True)
    torch.manual_seed(2)
    assert torch.equal(ours, lane_draws(3 * 5000 + 1, torch.device("cpu")))


@pytest.mark.parametrize("kind", ["normal", "random64"])
def test_rng_agrees_rejects_a_wrong_filler_and_keeps_the_state(kind, caplog):
    """A filler off by one value is caught and named in a warning; the generator's state is left as it was."""
    good = torch.ops.fairdro_dmoe.fill_normal if kind == "normal" else torch.ops.fairdro_dmoe.fill_random64

    def off_by_one(t: torch.Tensor) -> None:
        good(t)
        t[567] += 1

    torch.manual_seed(9)
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="scripts.dmoe_native"):
        assert dmoe_native.rng_agrees(kind, off_by_one) is False
        assert dmoe_native.rng_agrees(kind, good) is True
    assert f"{kind} draws differ from torch's" in caplog.text
    assert torch.equal(torch.get_rng_state(), state)


def _train(fast: bool, steps: int = 3):
    """A small dMoE network's parameters and losses after ``steps`` AdamW steps (noise and dropout on), its random
    numbers drawn by the kernels (``fast``) or by torch."""
    checked = {"normal": fast, "random64": fast}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmoe_native, "_rng_checked", checked)
        torch.manual_seed(0)
        net = DMoEResUNet(features=8, num_subgroups=4)
        for layer in net.moe_layers().values():
            layer.experts.reset_parameters(zero_output=False)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        x, g = torch.randn(2, 1, 64, 64, 32), torch.tensor([0, 2])
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = net(x, g).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, [p.detach().clone() for p in net.parameters()]


def test_training_steps_are_bit_identical():
    """Training with the kernels' random numbers gives the same losses and weights as with torch's."""
    (loss_fast, params_fast), (loss_torch, params_torch) = _train(True), _train(False)
    assert loss_fast == loss_torch
    assert all(torch.equal(a, b) for a, b in zip(params_fast, params_torch))
    assert any(not torch.equal(a, b) for a, b in zip(params_fast, _train(True, steps=2)[1]))  # the steps did move
