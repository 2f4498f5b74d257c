"""Inputs and calls of the native expert kernels for the tests that compare their bits (test_dmoe_fast_path.py: the
register code against the per-pair code; test_dmoe_lanes.py: the router's block code against its lane code;
test_dmoe_wide.py: the AVX2 build against the AVX-512 build, in a child process that imports this module)."""

from __future__ import annotations

import contextlib

import torch
from scripts.dmoe_native import lane_threshold


@contextlib.contextmanager
def register_path(enabled: bool):
    """The kernels' register code on or off (off: the code it replaced), restored after."""
    before = torch.ops.fairdro_dmoe.set_register_path(enabled)
    try:
        yield
    finally:
        torch.ops.fairdro_dmoe.set_register_path(before)


@contextlib.contextmanager
def torch_threads(n: int):
    """n torch intra-op threads, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kernel_inputs(n: int, k: int, dtype: torch.dtype, skip: bool, seed: int, c: int = 8):
    """Tokens h (2, c, n), gates of k of 8 experts (some zero with ``skip``), expert parameters (hidden 4c), dropout
    draws and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    e, hid = 8, 4 * c
    h = torch.randn(2, c, n, generator=g, dtype=dtype)
    top = torch.randn(2, e, n, generator=g).topk(k, 1)
    w = torch.softmax(top.values, 1).to(dtype)
    if skip:  # pairs of weight zero are skipped (the fallback gates of unknown subgroups)
        w[torch.rand(w.shape, generator=g) < 0.3] = 0.0
    params = [torch.randn(*s, generator=g, dtype=dtype) * 0.3 for s in ((e, c, hid), (e, hid), (e, hid, c), (e, c))]
    draws = torch.randint(-(2**62), 2**62, ((h.numel() + 2) // 3,), generator=g)
    gy = torch.randn(2, c, n, generator=g, dtype=dtype)
    return h, w.contiguous(), top.indices.contiguous(), params, draws, gy


def kernels(h, w, experts, params, draws, gy, skip, register: bool):
    """Forward and backward of the expert kernels: [y, kept outputs of the pairs not skipped, the six gradients]."""
    ops = torch.ops.fairdro_dmoe
    drop = (draws, lane_threshold(0.1), 1.0 / 0.9)
    with register_path(register):
        y, outs = ops.experts_forward(h, w, experts, *params, skip, *drop, True)
        grads = ops.experts_backward(gy, h, w, experts, *params, skip, *drop, outs)
    b, k, n = w.shape
    kept = (w != 0).unsqueeze(-1).expand(b, k, n, h.shape[1]).reshape(-1)  # outs is (B, K, N, C): skipped = garbage
    return [y, outs[kept], *grads]


#: (n voxels, k experts per voxel, dtype, skip zero-weight pairs, torch threads) of the cross-build comparison
BUILD_CASES = [
    (4133, 2, torch.float32, False, 1),
    (4133, 2, torch.float32, False, 2),
    (100, 3, torch.float32, True, 1),
    (1000, 1, torch.float64, False, 2),
    (257, 2, torch.float64, True, 1),
]


def build_case_outputs() -> list:
    """For every BUILD_CASES entry: the expert kernels' outputs (register code) followed by the router kernels' on
    the same tokens, and whether the experts' per-pair code gave the same bits."""
    results = []
    for n, k, dtype, skip, threads in BUILD_CASES:
        inputs = kernel_inputs(n, k, dtype, skip, seed=n + k)
        with torch_threads(threads):
            fast = kernels(*inputs, skip, register=True)
            slow = kernels(*inputs, skip, register=False)
        results.append((fast + router(inputs[0], k, seed=n), all(torch.equal(a, b) for a, b in zip(fast, slow))))
    return results


def router(h: torch.Tensor, k: int, seed: int) -> list:
    """The router kernels' forward and backward outputs on h (B, C, N) for 4 subgroups of 8 experts, with noise."""
    g = torch.Generator().manual_seed(seed)
    b, c, n = h.shape
    weight = torch.randn(4, c, 8, generator=g, dtype=h.dtype)
    offset = torch.randn(b, 8, n, generator=g, dtype=h.dtype)
    grad = torch.randn(b, k, n, generator=g, dtype=h.dtype)
    sub = torch.tensor([1, 3])
    ops = torch.ops.fairdro_dmoe
    weights, experts = ops.router_forward(h, weight, sub, offset, k)
    return [weights, experts, *ops.router_backward(grad, h, weight, sub, experts, weights, True)]


if __name__ == "__main__":  # the child of test_dmoe_wide.py: python dmoe_kernel_cases.py OUT.pt
    import os
    import sys

    from scripts import dmoe_native

    os.environ[dmoe_native.ENV_VAR] = "1"
    dmoe_native.available()
    level = torch.backends.cpu.get_cpu_capability()
    rng = {kind: dmoe_native.rng_agrees(kind) for kind in ("normal", "random64")}  # the bulk draws equal torch's
    torch.save(
        {"level": level, "flags": dmoe_native.cflags(), "results": build_case_outputs(), "rng": rng}, sys.argv[1]
    )
