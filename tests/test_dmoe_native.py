"""The native CPU kernels of the dMoE experts (scripts/dmoe_cpu.cpp via scripts/dmoe_native.py) against the dense
dispatch, finite differences and the gated sum written token by token; their build modes and fallback.

The kernels are built on first use (about 20 s). Where a C++ compiler exists the tests require the build
(``FAIRDRO_DMOE_NATIVE=1`` semantics), so a broken kernel fails here instead of silently using the Python path.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import needs_tool
from dmoe_check import assert_equal_to_scale, assert_runs_equal, run_layer, sum_in_forked_child
from scripts import dmoe_native
from scripts.dmoe import DMoE, _lane_mask, lane_draws
from scripts.dmoe_native import native_experts, native_route

G = 4
pytestmark = needs_tool("c++")  # torch builds the kernels with c++ (or $CXX)


@pytest.fixture(autouse=True)
def _built(monkeypatch):
    """The kernels built (required), two torch threads; restored afterwards."""
    monkeypatch.setenv(dmoe_native.ENV_VAR, "1")
    assert dmoe_native.available()
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def make_layer(c: int, native: bool, dispatch: str = "sparse", seed: int = 0) -> DMoE:
    torch.manual_seed(seed)
    layer = DMoE(c, num_subgroups=G, dispatch=dispatch)
    layer.experts.reset_parameters(zero_output=False)  # non-zero experts, as after training
    layer.native = native
    return layer


@pytest.mark.parametrize("c", [8, 12, 64])  # 8: compile-time sizes; 12, 64: the generic loops
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("subgroup", [[0, 2], [3, 4], None])  # named; one unknown (dense fallback gates); none
def test_native_equals_dense(c, mode, subgroup):
    """Outputs and all gradients of the native path equal the dense dispatch to 1e-5 (noise and dropout on)."""
    x = torch.randn(2, c, 12, 10, 6) if c < 64 else torch.randn(2, c, 4, 4, 2)
    g = None if subgroup is None else torch.tensor(subgroup)
    native, dense = make_layer(c, True).train(mode == "train"), make_layer(c, False, "dense").train(mode == "train")
    assert native.uses_native(x.view(2, c, -1)) and not dense.uses_native(x.view(2, c, -1))
    assert_runs_equal(run_layer(native, x, g), run_layer(dense, x, g))


def _inputs(c: int, e: int, k: int, n: int, dtype=torch.float64, zero_some: bool = False):
    torch.manual_seed(3)
    h = torch.randn(2, c, n, dtype=dtype)
    w = torch.rand(2, k, n, dtype=dtype)
    if zero_some:
        w[:, 0, ::3] = 0.0
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(2 * n)]).view(2, n, k).transpose(1, 2).contiguous()
    params = (
        torch.randn(e, c, 4 * c, dtype=dtype),
        torch.randn(e, 4 * c, dtype=dtype),
        torch.randn(e, 4 * c, c, dtype=dtype),
        torch.randn(e, c, dtype=dtype),
    )
    return h, w, experts, params


@pytest.mark.parametrize("c", [3, 8])
@pytest.mark.parametrize("skip_zero", [False, True])
def test_native_gradcheck(c, skip_zero):
    """The hand-written backward against finite differences in float64: h, all expert parameters, and the gate
    weights (not with ``skip_zero``: there a zero weight is a switch, a perturbed one turns its pair on)."""
    h, w, experts, params = _inputs(c, e=4 if c == 3 else 8, k=2, n=70, zero_some=skip_zero)  # 70: two blocks
    inputs = [t.requires_grad_() for t in (h, *params)] + ([] if skip_zero else [w.requires_grad_()])

    def fn(h, w1, b1, w2, b2, *gates):
        return native_experts(h, gates[0] if gates else w, experts, (w1, b1, w2, b2), skip_zero)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("skip_zero", [False, True])
def test_native_is_the_gated_sum(skip_zero):
    """Forward equals h + the gated sum evaluated token by token in Python (zero-weight pairs skipped or not)."""
    h, w, experts, (w1, b1, w2, b2) = _inputs(5, e=6, k=3, n=9, zero_some=True)
    y = native_experts(h, w, experts, (w1, b1, w2, b2), skip_zero)
    ref = h.clone()  # the residual
    for b in range(2):
        for n in range(9):
            for j in range(3):
                e = int(experts[b, j, n])
                z = torch.relu(h[b, :, n] @ w1[e] + b1[e])
                ref[b, :, n] += w[b, j, n] * (z @ w2[e] + b2[e])
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)


def test_native_dropout_is_the_lane_mask():
    """With dropout draws: h + mask * mixture, the mask being _lane_mask's for the same draws in token order."""
    h, w, experts, params = _inputs(8, e=8, k=2, n=50)
    torch.manual_seed(5)
    out = native_experts(h, w, experts, params, False, lane_draws(h.numel(), h.device), 0.3)
    torch.manual_seed(5)
    mask = _lane_mask(h.numel(), 0.3, h.dtype, h.device).view(2, 50, 8).transpose(1, 2)  # (B, C, N)
    mixture = native_experts(h, w, experts, params, False) - h
    torch.testing.assert_close(out, h + mask * mixture, atol=1e-12, rtol=1e-12)
    assert 0.2 < float((mask == 0).double().mean()) < 0.4


def test_native_gradcheck_with_dropout():
    """The backward with a dropout mask (and the residual) against finite differences, float64."""
    h, w, experts, params = _inputs(8, e=8, k=2, n=40)
    draws = lane_draws(h.numel(), h.device)
    inputs = [t.requires_grad_() for t in (h, w, *params)]

    def fn(h, w, w1, b1, w2, b2):
        return native_experts(h, w, experts, (w1, b1, w2, b2), False, draws, 0.25)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("noise", [True, False])
def test_native_router_equals_the_python_router(noise):
    """Same seed, same noise: the native router's gates, experts and gradients equal SubgroupNoisyTopKRouter's."""
    layer = make_layer(8, True).double().train()
    router, idx = layer.router, torch.tensor([1, 3])
    h = torch.randn(2, 8, 300, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(2, 2, 300, dtype=torch.float64)
    results = []
    for native in (True, False):
        torch.manual_seed(4)
        if native:
            nz = torch.randn(2, 8, 300, dtype=h.dtype) if noise else None
            weights, experts = native_route(h, router.weight, router.noise_weight, idx, nz, 2)
        else:
            router.noise = noise
            weights, experts, _ = router(h, idx)
        params = [h, router.weight] + ([router.noise_weight] if noise else [])
        results.append((weights, experts, torch.autograd.grad((weights * gw).sum(), params)))
    (w_n, e_n, g_n), (w_p, e_p, g_p) = results
    assert torch.equal(e_n, e_p)
    torch.testing.assert_close(w_n, w_p, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_n, g_p):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_bad_indices_are_refused_with_a_clear_error():
    """The kernels index memory with the expert and subgroup numbers: out-of-range values raise, naming them."""
    h, w, experts, params = _inputs(8, e=8, k=2, n=10)
    bad = experts.clone()
    bad[0, 0, 3] = 8
    with pytest.raises(RuntimeError, match=r"expert indices must lie in \[0, 8\)"):
        native_experts(h, w, bad, params, False)
    weight = torch.randn(4, 8, 8, dtype=h.dtype)
    with pytest.raises(RuntimeError, match=r"subgroup indices must be int64 in \[0, 4\)"):
        native_route(h, weight, weight, torch.tensor([0, 4]), None, 2)


def test_native_is_deterministic_per_thread_count():
    """Same thread count: the same bits twice; 1 and 2 threads: equal to float rounding."""
    h, w, experts, params = _inputs(8, e=8, k=2, n=3000, dtype=torch.float32)
    params = tuple(p.requires_grad_() for p in params)

    def grads():
        out = native_experts(h, w, experts, params, False)
        return [out.detach()] + list(torch.autograd.grad((out * out).sum(), params))

    first, again = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.set_num_threads(1)
    for a, b in zip(grads(), first):
        assert_equal_to_scale(a, b, "one thread vs two")


def test_mode_zero_means_the_python_path(monkeypatch):
    """FAIRDRO_DMOE_NATIVE=0: nothing built or used; the layer computes the same output on the Python path."""
    x, g = torch.randn(2, 8, 8, 8, 4), torch.tensor([0, 1])
    layer = make_layer(8, True).eval()
    with torch.no_grad():
        native_out = layer(x, g)
        monkeypatch.setenv(dmoe_native.ENV_VAR, "0")
        assert not dmoe_native.available() and not layer.uses_native(x.view(2, 8, -1))
        torch.testing.assert_close(layer(x, g), native_out, atol=1e-5, rtol=1e-5)


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(dmoe_native.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="FAIRDRO_DMOE_NATIVE='yes'"):
        dmoe_native.available()


def _broken_build(verbose: bool = False) -> None:
    raise RuntimeError("Ninja is required to load C++ extensions")


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    """auto: a failed build logs why, once, and the layer uses the Python path; 1: the failure raises."""
    monkeypatch.setattr(dmoe_native, "_state", {})
    monkeypatch.setattr(dmoe_native, "load", _broken_build)
    monkeypatch.setenv(dmoe_native.ENV_VAR, "auto")
    x = torch.randn(2, 8, 8, 8, 4)
    with caplog.at_level(logging.WARNING, logger="scripts.dmoe_native"):
        assert not make_layer(8, True).uses_native(x.view(2, 8, -1))
        assert not dmoe_native.available()
    assert [r.getMessage().count("Ninja is required") for r in caplog.records] == [1]
    with torch.no_grad():
        assert make_layer(8, True).eval()(x, torch.tensor([0, 1])).shape == x.shape
    monkeypatch.setenv(dmoe_native.ENV_VAR, "1")
    with pytest.raises(dmoe_native.NativeKernelError, match="Ninja is required"):
        dmoe_native.available()


def test_not_used_under_autocast_or_for_other_dtypes():
    """bf16 autocast and half tensors keep the Python path (the kernels compute in float32/float64 only)."""
    layer = make_layer(8, True)
    h = torch.randn(2, 8, 64)
    assert layer.uses_native(h) and not layer.uses_native(h.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.uses_native(h)
    assert not make_layer(8, True, dispatch="dense").uses_native(h)


def test_forked_child_runs_the_native_layer():
    """A child forked after the parent ran the kernels on two threads computes the same output on one."""
    x, g = torch.ones(2, 8, 8, 8, 4), torch.tensor([0, 1])
    with torch.no_grad():
        parent = float(make_layer(8, True).eval()(x, g).sum())
    assert sum_in_forked_child(lambda: make_layer(8, True), x, g) == pytest.approx(parent, rel=1e-6)


def _two_step(layer: DMoE):
    """The layer with its native forward in the two Python steps (native_route, then the native experts of _eager_mix)
    that its one-call op replaced."""

    def forward_indexed(x, idx):
        h = x.reshape(x.shape[0], x.shape[1], -1)
        r = layer.router
        shape = (h.shape[0], r.num_experts, h.shape[2])
        noise = dmoe_native.randn(shape, h.dtype, h.device) if r.training else None  # = torch.randn
        weights, experts = native_route(h, r.weight, r.noise_weight, idx, noise, r.top_k)
        return layer._eager_mix(x, h, weights, experts, False, False, True)

    layer.forward_indexed = forward_indexed
    return layer


@pytest.mark.parametrize("c,dtype", [(8, torch.float32), (16, torch.float32), (8, torch.float64)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_one_call_layer_equals_the_two_steps(c, dtype, mode):
    """The native layer in one call (scripts/dmoe_layer_cpu.cpp) gives the bits of the route-then-mix steps: output,
    input gradient, every parameter gradient (noise and dropout from the same seed in training)."""
    x = torch.randn(2, c, 12, 10, 6, dtype=dtype)
    g = torch.tensor([1, 3])
    one, two = (make_layer(c, True).to(dtype).train(mode == "train") for _ in range(2))
    calls = []
    one._native_layer = lambda h, idx, f=one._native_layer: calls.append(1) or f(h, idx)
    out_a, gx_a, gp_a = run_layer(one, x, g)
    out_b, gx_b, gp_b = run_layer(_two_step(two), x, g)
    assert calls, "the one-call op did not run"
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert all(torch.equal(gp_a[k], gp_b[k]) for k in gp_b if gp_b[k] is not None)
    assert gp_a["router.noise_weight"] is not None or mode == "eval"


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """torch's builder waits forever on a lock an interrupted build left: one older than STALE_LOCK_S is removed with
    a warning naming it; a recent one (a build running in another process) and a missing one are left alone."""
    lock = tmp_path / "lock"
    assert dmoe_native.clear_stale_lock(lock) is False
    lock.touch()
    assert dmoe_native.clear_stale_lock(lock) is False and lock.exists()
    old = time.time() - dmoe_native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="scripts.dmoe_native"):
        assert dmoe_native.clear_stale_lock(lock) is True
    assert not lock.exists() and str(lock) in caplog.text and "interrupted build" in caplog.text


def test_load_clears_the_lock_of_its_own_build_directory(monkeypatch):
    """load() looks for a stale lock in the folder torch builds this extension in, before building."""
    from torch.utils import cpp_extension

    seen = []
    monkeypatch.setattr(dmoe_native, "clear_stale_lock", lambda lock: seen.append(lock))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append(kw["name"]))
    dmoe_native.load()
    name = dmoe_native.build_name()
    assert seen == [Path(cpp_extension._get_build_directory(name, False)) / "lock", name]
