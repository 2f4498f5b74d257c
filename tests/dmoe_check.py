"""Helpers shared by the dMoE path tests (test_dmoe_kernels.py, test_dmoe_native.py): one training-style forward and
backward of a layer, a comparison to the scale of the expected values, and a layer run in a forked child."""

from __future__ import annotations

import multiprocessing as mp
from typing import Callable

import torch
from scripts.dmoe import DMoE


def run_layer(layer: DMoE, x: torch.Tensor, g: torch.Tensor | None, seed: int = 7):
    """Output, input gradient and parameter gradients ({name: grad}) of ``sum(out * w)`` for a fixed w, with the
    router noise and dropout of ``seed``."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = layer(x, g)
    w = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape)
    (out * w).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in layer.named_parameters()}


def assert_equal_to_scale(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    """max |actual - expected| <= rel * max |expected|: equal up to float32 summation order (a weight gradient sums
    thousands of terms, so element-wise relative error is meaningless where the sum nearly cancels)."""
    err, scale = float((actual - expected).abs().max()), float(expected.abs().max())
    assert err <= rel * max(scale, 1.0), f"{what}: max |diff| {err:.3g} > {rel:g} x max |value| {scale:.3g}"


def assert_runs_equal(actual, expected) -> None:
    """Two :func:`run_layer` results equal: outputs and input gradients to 1e-5, every parameter gradient present in
    both or neither and equal to the scale of the expected one (the experts' and the router's gradients exist)."""
    (out_a, gx_a, gp_a), (out_e, gx_e, gp_e) = actual, expected
    torch.testing.assert_close(out_a, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_a, gx_e, atol=1e-5, rtol=1e-5)
    assert gp_a["experts.w1"] is not None and gp_a["router.weight"] is not None
    for k, v in gp_e.items():
        assert (gp_a[k] is None) == (v is None), k
        if v is not None:
            assert_equal_to_scale(gp_a[k], v, f"gradient of {k}")


def _sum_in_child(q, make: Callable[[], DMoE], x: torch.Tensor, g: torch.Tensor) -> None:
    torch.set_num_threads(1)  # as in DataLoader workers; GNU OpenMP cannot run a 2-thread team in a forked child
    with torch.no_grad():
        q.put(float(make().eval()(x, g).sum()))


def sum_in_forked_child(make: Callable[[], DMoE], x: torch.Tensor, g: torch.Tensor) -> float:
    """``sum(make().eval()(x, g))`` computed in a child forked from this process, with one torch thread."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_sum_in_child, args=(q, make, x, g), daemon=True)
    p.start()
    p.join(timeout=120)
    assert p.exitcode == 0, "the forked child did not finish"
    return q.get(timeout=5)
