"""The native router kernels' lane paths (``scripts/dmoe_router_cpu.cpp``: full blocks of 64 voxels computed 8 voxels
at a time, one per SIMD lane) give the bits of their per-voxel paths (partial blocks), and the dropout factors of the
expert kernels are those of the lane mask; so the committed training runs keep their results.

A block of 64 voxels takes the lane path and the same voxels as a block of 63 the per-voxel path: every output of a
voxel must be bitwise equal between the two runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_tool
from dmoe_kernel_cases import register_path, torch_threads
from scripts import dmoe_native
from scripts.dmoe import _lane_mask, lane_draws
from scripts.dmoe_native import lane_threshold

pytestmark = needs_tool("c++")
FULL, PARTIAL = 64, 63  # voxels: one full block (lanes); the same voxels but one, a partial block (per voxel)


@pytest.fixture(autouse=True)
def _built(monkeypatch):
    monkeypatch.setenv(dmoe_native.ENV_VAR, "1")
    assert dmoe_native.available()


def _router_inputs(c: int, e: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, c, FULL, generator=g, dtype=dtype)
    weight = torch.randn(4, c, e, generator=g, dtype=dtype)
    sub = torch.tensor([1, 3])
    offset = torch.randn(2, e, FULL, generator=g, dtype=dtype)
    h[0, :, 5] = h[0, :, 6]  # two voxels with equal logits: ties go to the lowest expert on both paths
    offset[0, :, 5] = offset[0, :, 6]
    offset[1, :, 9] = 0.0
    weight[3, :, 2] = weight[3, :, 5]  # and two experts with equal logits for every voxel of case 1 without offset
    grad = torch.randn(2, k, FULL, generator=g, dtype=dtype)
    return h, weight, sub, offset, grad


def _run(h, weight, sub, offset, grad, k, n):
    """Router forward and backward on the first n voxels: (weights, experts, gh, gweight, goffset)."""
    ops = torch.ops.fairdro_dmoe
    cut = lambda t: t[..., :n].contiguous()  # noqa: E731
    off = cut(offset) if offset is not None else h.new_empty(0)
    weights, experts = ops.router_forward(cut(h), weight, sub, off, k)
    gh, gweight, goffset = ops.router_backward(cut(grad), cut(h), weight, sub, experts, weights, offset is not None)
    return weights, experts, gh, gweight, goffset


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("c", [8, 13, 16])
@pytest.mark.parametrize("with_offset", [True, False])
def test_router_lanes_give_the_bits_of_the_per_voxel_path(dtype, k, c, with_offset):
    h, weight, sub, offset, grad = _router_inputs(c, 8, k, dtype, seed=k * 100 + c)
    offset = offset if with_offset else None
    full = _run(h, weight, sub, offset, grad, k, FULL)
    part = _run(h, weight, sub, offset, grad, k, PARTIAL)
    for name, a, b in zip(("weights", "experts", "gh", "goffset"), (*full[:3], full[4]), (*part[:3], part[4])):
        if b.numel():
            assert torch.equal(a[..., :PARTIAL], b), name
    # the router-weight gradient of the full block minus its last voxel's share is the partial block's: checked
    # through one voxel whose gate gradients are zero (it adds nothing)
    grad_quiet = grad.clone()
    grad_quiet[..., PARTIAL:] = 0.0
    full_q, part_q = _run(h, weight, sub, offset, grad_quiet, k, FULL), _run(h, weight, sub, offset, grad, k, PARTIAL)
    assert torch.equal(full_q[3], part_q[3])
    # ties: the lowest expert first, as scripts.dmoe.top_k_along
    assert torch.equal(full[1][0, :, 5], full[1][0, :, 6])


def test_router_lanes_by_hand():
    """Two experts, one channel, top-1: the larger logit wins, its gate is 1; ties take expert 0."""
    h = torch.tensor([[[1.0, -1.0, 0.0] * 21 + [2.0]]])  # 64 voxels
    weight = torch.tensor([0.5, -0.5] * 4).view(1, 1, 8)  # one subgroup, one channel, 8 experts
    weights, experts = torch.ops.fairdro_dmoe.router_forward(h, weight, torch.tensor([0]), h.new_empty(0), 1)
    # logits of voxel value v: 0.5 v for even experts, -0.5 v for odd ones
    expected = torch.where(h[0, 0] < 0, 1, 0)  # v > 0: expert 0; v < 0: expert 1; v = 0: all tie, expert 0
    assert torch.equal(experts[0, 0], expected) and torch.equal(weights, torch.ones_like(weights))


@pytest.mark.parametrize("first", [0, 1, 2, 5, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_dropout_factors_are_the_lane_mask(first, dtype):
    """The experts kernel masks the mixture with the lane mask: an identity mixture (zero experts but the output
    bias 1) shows the factor of every element, from any element offset of a block."""
    torch.manual_seed(first)
    c, n = 8, 64 + first  # the second case's elements start at token n: offsets in the middle of a lane triple
    h = torch.zeros(2, c, n, dtype=dtype)
    w = torch.ones(2, 1, n, dtype=dtype)
    experts = torch.zeros(2, 1, n, dtype=torch.int64)
    params = (torch.zeros(8, c, 32, dtype=dtype), torch.zeros(8, 32, dtype=dtype), torch.zeros(8, 32, c, dtype=dtype),
              torch.ones(8, c, dtype=dtype))  # fmt: skip
    draws = lane_draws(h.numel(), h.device)
    y, _ = torch.ops.fairdro_dmoe.experts_forward(h, w, experts, *params, False, draws, lane_threshold(0.3),
                                                  1.0 / 0.7, False)  # fmt: skip
    torch.manual_seed(first)
    mask = _lane_mask(h.numel(), 0.3, dtype, h.device).view(2, n, c).transpose(1, 2)
    assert torch.equal(y, mask)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_offset", [True, False])
def test_router_block_code_for_8_channels_gives_the_bits_of_the_lane_code(threads, k, with_offset):
    """float32, C = 8, E = 8 (the default network's first stages) run their own backward block code (permuted weight
    rows, gradients added as rows per expert); with the register code off, the same blocks take the general lane
    code. Many blocks and both cases' subgroups, so the router-weight accumulator crosses blocks, cases and threads."""
    g = torch.Generator().manual_seed(k)
    n = 64 * 37 + 5  # full blocks and a partial one per case
    h = torch.randn(2, 8, n, generator=g)
    weight = torch.randn(4, 8, 8, generator=g)
    sub = torch.tensor([2, 2]) if k == 2 else torch.tensor([0, 3])
    offset = torch.randn(2, 8, n, generator=g) if with_offset else h.new_empty(0)
    grad = torch.randn(2, k, n, generator=g)
    ops = torch.ops.fairdro_dmoe
    with torch_threads(threads):
        weights, experts = ops.router_forward(h, weight, sub, offset, k)
        runs = []
        for block8 in (True, False):
            with register_path(block8):
                runs.append(ops.router_backward(grad, h, weight, sub, experts, weights, with_offset))
    for name, a, b in zip(("gh", "gweight", "goffset"), *runs):
        assert torch.equal(a, b), name
    # k = 1: the one gate is always 1, so no gradient reaches the router weights (by hand); else some does
    assert (runs[0][1].abs().sum() > 0) == (k > 1)
