"""Helpers shared by the dMoE path tests (test_dmoe_kernels.py, test_dmoe_native.py): one training-style forward and
backward of a layer, and a comparison to the scale of the expected values."""

from __future__ import annotations

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
