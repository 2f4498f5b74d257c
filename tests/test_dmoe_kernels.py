"""The fused sparse expert path (scripts/dmoe_kernels.py) against the dense dispatch, the scripted sparse dispatch,
finite differences and the dMoE formula as it was computed before the fused path existed.

Sizes: a first-stage-like layer (C = 8, 2 x 16 x 16 x 8 voxels = 4096 tokens, 8192 pairs) is above
``SPLIT_MIN_PAIRS``, so with two torch threads the experts run in two halves on two threads.
"""

from __future__ import annotations

import threading

import pytest
import torch
from dmoe_check import assert_equal_to_scale, run_layer, sum_in_forked_child
from scripts import dmoe_kernels
from scripts.dmoe import DMoE, ExpertBank, fast_dropout
from scripts.dmoe_kernels import SPLIT_MIN_PAIRS, expert_routing, sparse_experts

G = 4
X_SHAPE = (2, 8, 16, 16, 8)


@pytest.fixture(autouse=True)
def _two_threads():
    """Two torch threads (the split path); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def make_layer(dispatch: str, seed: int = 0, c: int = 8) -> DMoE:
    """A layer on the Python paths (``native`` off: this file tests the fused Python node; the native kernels are
    tested in test_dmoe_native.py)."""
    torch.manual_seed(seed)
    layer = DMoE(c, num_subgroups=G, dispatch=dispatch)
    layer.experts.reset_parameters(zero_output=False)  # non-zero experts, as after training
    layer.native = False
    return layer


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("subgroup", [[0, 2], [3, 4], None])
def test_fused_equals_dense_and_scripted_sparse(mode, subgroup):
    """Outputs and gradients of the fused path equal the dense path to 1e-5, with the router noise and dropout on."""
    x = torch.randn(X_SHAPE)
    g = None if subgroup is None else torch.tensor(subgroup)
    res = {}
    for dispatch in ("dense", "sparse"):
        layer = make_layer(dispatch)
        layer.train(mode == "train")
        res[dispatch] = run_layer(layer, x, g)
    assert not make_layer("sparse").uses_native(x.view(2, 8, -1))  # the fused Python node, not the native kernels
    scripted = torch.jit.script(make_layer("sparse").train(mode == "train"))  # forward_sparse, TorchScript
    with torch.no_grad():
        torch.manual_seed(7)
        out_script = scripted(x, g)
    (out_d, gx_d, gp_d), (out_f, gx_f, gp_f) = res["dense"], res["sparse"]
    torch.testing.assert_close(out_f, out_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_f, gx_d, atol=1e-5, rtol=1e-5)
    assert {k for k, v in gp_f.items() if v is None} == {k for k, v in gp_d.items() if v is None}
    assert gp_f["experts.w1"] is not None and gp_f["router.weight"] is not None
    for k in gp_d:
        if gp_d[k] is not None:
            assert_equal_to_scale(gp_f[k], gp_d[k], f"gradient of {k}")
    if mode == "eval":  # TorchScript draws dropout with F.dropout: equal only without dropout
        torch.testing.assert_close(out_script, out_d, atol=1e-5, rtol=1e-5)


def test_fused_training_output_is_the_formula_before_fusion():
    """Same seed, same random numbers, same elements: x + fast_dropout(dense experts on tokens), as computed before."""
    layer = make_layer("sparse").train()
    x, g = torch.randn(X_SHAPE), torch.tensor([1, 3])
    torch.manual_seed(11)
    out = layer(x, g)
    torch.manual_seed(11)
    b, c = x.shape[:2]
    h = x.reshape(b, c, -1)
    weights, experts, _ = layer.router(h, g)
    tokens = h.transpose(1, 2).reshape(-1, c)
    y = fast_dropout(layer.experts.forward_dense(tokens, weights, experts), layer.dropout, True)
    ref = x + y.view(b, -1, c).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, layer.eval()(x, g))  # dropout and noise did act


def _bank(c: int = 3, e: int = 4) -> ExpertBank:
    torch.manual_seed(3)
    bank = ExpertBank(c, e, hidden_ratio=2).double()
    bank.reset_parameters(zero_output=False)
    return bank


@pytest.mark.parametrize("drop_zero", [False, True])
def test_sparse_experts_gradcheck(drop_zero):
    """The hand-written backward against finite differences (float64), with and without skipped zero-weight pairs."""
    bank = _bank()
    t, k, e = 10, 2, bank.num_experts
    gen = torch.Generator().manual_seed(5)
    experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)], 1)  # (k, T), distinct per token
    key = experts.reshape(-1)
    w = torch.rand(k, t, dtype=torch.float64, generator=gen)
    if drop_zero:
        w[1, ::3] = 0.0
        key = torch.where(w.reshape(-1) == 0, torch.full_like(key, e), key)
    ht = torch.randn(3, t, dtype=torch.float64, generator=gen)
    routing = expert_routing(key, e, t)
    params = [p.detach().clone().requires_grad_() for p in (bank.w1, bank.b1, bank.w2, bank.b2)]

    def f(ht_, w_, w1, b1, w2, b2):
        return sparse_experts(ht_, w_, (w1, b1, w2, b2), routing)

    assert torch.autograd.gradcheck(f, (ht.requires_grad_(), w.requires_grad_(), *params), eps=1e-6, atol=1e-6)


def test_sparse_experts_is_the_gated_sum():
    """Forward against the sum written out token by token."""
    bank = _bank()
    t, k, e = 12, 2, bank.num_experts
    gen = torch.Generator().manual_seed(9)
    experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)], 1)
    w = torch.rand(k, t, dtype=torch.float64, generator=gen)
    ht = torch.randn(3, t, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        y = sparse_experts(ht, w, (bank.w1, bank.b1, bank.w2, bank.b2), expert_routing(experts.reshape(-1), e, t))
        ref = torch.zeros(3, t, dtype=torch.float64)
        for ti in range(t):
            for j in range(k):
                i = int(experts[j, ti])
                z = torch.relu(ht[:, ti] @ bank.w1[i] + bank.b1[i])
                ref[:, ti] += w[j, ti] * (z @ bank.w2[i] + bank.b2[i])
    torch.testing.assert_close(y, ref)


def test_split_changes_no_bit(monkeypatch):
    """The two-thread split computes each expert exactly as the single-thread loop does."""
    layer = make_layer("sparse").train()
    x, g = torch.randn(X_SHAPE), torch.tensor([0, 1])
    assert 2 * x[:, 0].numel() >= SPLIT_MIN_PAIRS
    split = run_layer(layer, x, g)
    monkeypatch.setattr(dmoe_kernels, "SPLIT_MIN_PAIRS", 10**12)
    serial = run_layer(layer, x, g)
    assert torch.equal(split[0], serial[0]) and torch.equal(split[1], serial[1])
    for k in split[2]:
        assert torch.equal(split[2][k], serial[2][k]), k


def test_autocast_runs_in_the_input_dtype():
    """Under CPU bf16 autocast the fused experts compute in their input's dtype on both threads (no mixed halves)."""
    layer = make_layer("sparse").train()
    x, g = torch.randn(X_SHAPE), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, g)
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_forked_child_runs_the_layer():
    """A child forked after the helper thread started computes the same output (one thread: no split)."""
    x, g = torch.ones(X_SHAPE), torch.tensor([0, 1])
    with torch.no_grad():
        parent = float(make_layer("sparse").eval()(x, g).sum())  # starts the helper thread
    assert sum_in_forked_child(lambda: make_layer("sparse"), x, g) == pytest.approx(parent, rel=1e-6)


def test_helper_thread_is_made_again_in_a_new_process(monkeypatch):
    """The helper executor is per process: after a fork (another PID) a new one is made and runs work."""
    first = dmoe_kernels._helper()
    assert dmoe_kernels._helper() is first
    monkeypatch.setattr(dmoe_kernels.os, "getpid", lambda: -12345)
    second = dmoe_kernels._helper()
    assert second is not first
    assert second.submit(lambda: 6 * 7).result(timeout=10) == 42


def test_helper_thread_runs_one_intra_op_thread_and_leaves_the_rest_as_they_were(monkeypatch):
    """The helper runs torch with one thread (no OpenMP team of its own beside the caller's); the caller keeps its
    count, and so does a thread made afterwards."""
    monkeypatch.setattr(dmoe_kernels.os, "getpid", lambda: -54321)  # a fresh helper for this test
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        helper = dmoe_kernels._helper()
        assert helper.submit(torch.get_num_threads).result(timeout=10) == 1
        assert helper.submit(lambda: float(torch.relu(torch.ones(10**6)).sum())).result(timeout=10) == 1e6
        assert helper.submit(torch.get_num_threads).result(timeout=10) == 1  # a parallel op did not reset it
        assert torch.get_num_threads() == 2
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "threads,pairs,on_cpu,expect",
    [
        (2, 8192, True, True),
        (1, 8192, True, False),
        (8, 8192, True, False),
        (2, 100, True, False),
        (2, 8192, False, False),
    ],
)
def test_split_only_where_measured(monkeypatch, threads, pairs, on_cpu, expect):
    """The helper thread is used for CPU tensors with 2..SPLIT_MAX_THREADS torch threads and enough pairs, never
    otherwise."""
    used = []
    monkeypatch.setattr(dmoe_kernels, "_helper", lambda: used.append(1) or dmoe_kernels.ThreadPoolExecutor(1))
    torch.set_num_threads(threads)
    segs = [(0, 0, pairs // 2), (1, pairs // 2, pairs - pairs // 2)]
    out = dmoe_kernels._run_split(lambda part: [torch.tensor([float(i)]) for i, _, _ in part], segs, on_cpu)
    assert [float(t) for t in out] == [0.0, 1.0]  # expert order kept either way
    assert bool(used) == expect
