"""Unit tests of the dMoE layer (scripts/dmoe.py) and the dMoE residual U-Net (scripts/dmoe_unet.py).

Conventions: G = 4 named subgroups (indices 0..3), index 4 = unknown; tiny inputs so the suite stays fast on CPU.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F
from scripts.dmoe import DMoE, ExpertBank, fast_dropout, normalize_subgroup, top_k_along
from scripts.dmoe_unet import DMoEResUNet

G = 4
SHAPE = (2, 1, 64, 32, 32)  # smallest cheap input whose deepest feature map (2x1x1) allows instance norm in training


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tiny networks run fastest on one thread (and do not fight over a shared CPU); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_experts(module: torch.nn.Module) -> None:
    """Draw the experts' output layers like ``nn.Linear`` (they start at zero), so the dMoE branches are non-zero."""
    for m in module.modules():
        if isinstance(m, ExpertBank):
            m.reset_parameters(zero_output=False)


def make_net(seed: int = 0, identity: bool = False, **kw) -> DMoEResUNet:
    """A small network; ``identity=False`` re-draws the expert output layers (as after training, non-zero branch)."""
    torch.manual_seed(seed)
    kw.setdefault("features", 4)
    kw.setdefault("num_subgroups", G)
    net = DMoEResUNet(**kw)
    if not identity:
        randomize_experts(net)
    return net


def make_layer(seed: int = 0, c: int = 4, identity: bool = False, **kw) -> DMoE:
    """A dMoE layer on C = ``c`` channels; ``identity=False`` as in :func:`make_net`."""
    torch.manual_seed(seed)
    kw.setdefault("num_subgroups", G)
    layer = DMoE(c, **kw)
    if not identity:
        randomize_experts(layer)
    return layer


def reference_layer(layer: DMoE, x: torch.Tensor, subgroup: list[int]) -> torch.Tensor:
    """The dMoE formula written out voxel by voxel (eval mode): h + sum_{i in topk} softmax(topk logits)_i E_i(h)."""
    eb, r = layer.experts, layer.router
    out = x.clone()
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    for bi in range(b):
        for v in range(flat.shape[2]):
            h = flat[bi, :, v]
            a = subgroup[bi]
            routers = [a] if a < G else list(range(G))  # unknown: average of all routers' gate vectors
            gates = torch.zeros(layer.num_experts)
            for ra in routers:
                logits = h @ r.weight[ra]
                top, idx = logits.topk(layer.top_k)
                gates[idx] += torch.softmax(top, 0) / len(routers)
            y = torch.zeros(c)
            for i in range(layer.num_experts):
                if gates[i] > 0:
                    expert = F.relu(h @ eb.w1[i] + eb.b1[i]) @ eb.w2[i] + eb.b2[i]
                    y += gates[i] * expert
            out.view(b, c, -1)[bi, :, v] += y
    return out


# --- layer maths


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("subgroup", [[0, 3], [2, 4], [4, 4]])
def test_layer_matches_formula(dispatch, subgroup):
    layer = make_layer(dispatch=dispatch).eval()
    x = torch.randn(2, 4, 3, 2, 2)
    with torch.no_grad():
        out = layer(x, torch.tensor(subgroup))
        ref = reference_layer(layer, x, subgroup)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_top_k_along_matches_topk_and_breaks_ties_low_first():
    a = torch.randn(2, 8, 50)
    for k in (1, 2, 8):
        v, i = top_k_along(a, k, 1)
        v2, i2 = a.topk(k, 1)
        assert torch.equal(v, v2) and torch.equal(i, i2)
    v, i = top_k_along(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 2, 1)
    assert i.tolist() == [[1, 2]] and v.tolist() == [[3.0, 3.0]]


def test_fast_dropout_rate_and_scale():
    torch.manual_seed(0)
    x = torch.ones(200, 500)
    y = fast_dropout(x, 0.1, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 100k draws: std of the rate ~0.001
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert fast_dropout(x, 0.1, False) is x
    kept = torch.jit.script(fast_dropout)(x, 0.1, True) != 0  # TorchScript falls back to F.dropout
    assert abs(kept.float().mean().item() - 0.9) < 0.005


# --- network I/O


@pytest.mark.parametrize("shape", [SHAPE, (1, 1, 48, 40, 20)])
def test_output_shape_and_dtype(shape):
    net = make_net().eval()
    with torch.no_grad():
        out = net(torch.rand(shape), torch.tensor([1] * shape[0]))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (shape[0], 2, *shape[2:])
    assert out.dtype == torch.float32


def test_eval_is_deterministic_and_train_is_noisy():
    net = make_net()
    x, g = torch.rand(SHAPE), torch.tensor([0, 1])
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, g), net(x, g))
    net.train()
    for m in net.moe_layers().values():
        m.dropout = 0.0  # isolate the router noise
    with torch.no_grad():
        assert not torch.equal(net(x, g), net(x, g))


def test_routing_depends_on_subgroup():
    net = make_net().eval()
    x = torch.rand(SHAPE)
    with torch.no_grad():
        a = net(x, torch.tensor([0, 0]))
        b = net(x, torch.tensor([1, 1]))
        a2 = net(x, torch.tensor([0, 0]))
    assert torch.equal(a, a2)
    assert (a - b).abs().max() > 1e-4


def test_size_one_and_scalar_subgroup_broadcast():
    net = make_net().eval()
    x = torch.rand(SHAPE)
    with torch.no_grad():
        full = net(x, torch.tensor([2, 2]))
        assert torch.equal(net(x, torch.tensor([2])), full)
        assert torch.equal(net(x, torch.tensor(2)), full)


def test_unknown_and_none_fallback(caplog):
    layer = make_layer().eval()
    x = torch.randn(2, 4, 4, 4, 2)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="scripts.dmoe"):
        unknown = layer(x, torch.tensor([G, G]))
        none = layer(x, None)
        named = [layer(x, torch.tensor([a, a])) for a in range(G)]
    # documented definition: branch(unknown) = mean over the G named subgroups of branch(a)
    expected = x + torch.stack([o - x for o in named]).mean(0)
    torch.testing.assert_close(unknown, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(unknown, none)
    assert sum("unknown" in r.getMessage() for r in caplog.records) == 1  # once per layer


def test_network_unknown_warns_once(caplog):
    net = make_net().eval()
    x = torch.rand(SHAPE)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="scripts.dmoe_unet"):
        a = net(x, None)
        b = net(x, torch.tensor([G, G]))
    assert torch.equal(a, b)
    assert sum("unknown" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("bad", [-1, G + 1, 17])
def test_out_of_range_subgroup_raises(bad):
    net = make_net().eval()
    with pytest.raises(ValueError, match=str(bad)):
        net(torch.rand(SHAPE), torch.tensor([0, bad]))


def test_bad_subgroup_shape_or_dtype_raises():
    with pytest.raises(ValueError, match="shape"):
        normalize_subgroup(torch.tensor([0, 1, 2]), 2, G, torch.device("cpu"))
    with pytest.raises(TypeError, match="integer"):
        normalize_subgroup(torch.tensor([0.0, 1.0]), 2, G, torch.device("cpu"))
    with pytest.raises(ValueError, match="shape"):
        make_net()(torch.rand(2, 3, 64, 32, 32))  # wrong channel count


# --- gradients


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_gradients_reach_chosen_experts_and_used_router_only(dispatch):
    layer = make_layer(dispatch=dispatch, noise=False, dropout=0.0)
    with torch.no_grad():  # positive inputs and a very negative column: expert 7 is never in the top 2
        layer.router.weight.abs_()
        layer.router.weight[:, :, 7] = -10.0
    x = torch.rand(2, 4, 4, 4, 2)
    layer(x, torch.tensor([1, 1])).square().sum().backward()
    rg = layer.router.weight.grad
    assert rg[1].abs().sum() > 0
    assert rg[[0, 2, 3]].abs().sum() == 0  # routers of unused subgroups get nothing
    for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2):
        assert p.grad[7].abs().sum() == 0  # never-chosen expert
        assert p.grad[:7].abs().sum() > 0


# --- backbone


def test_use_dmoe_false_is_the_backbone():
    dmoe = make_net(use_dmoe=True).eval()
    plain = make_net(use_dmoe=False).eval()
    dmoe_sd = dmoe.state_dict()
    moe_keys = {k for k in dmoe_sd if ".moe." in k}
    assert moe_keys and set(plain.state_dict()) == set(dmoe_sd) - moe_keys  # same names, minus the dMoE ones
    plain.load_state_dict({k: v for k, v in dmoe_sd.items() if k not in moe_keys}, strict=True)
    assert plain.moe_layers() == {} and plain.routing_stats() == {}


# --- dMoE starts as the identity (the dMoE network starts as its backbone)


@pytest.mark.parametrize("seed", [0, 7])
def test_same_seed_gives_the_same_backbone_weights(seed):
    dmoe = make_net(seed, identity=True, use_dmoe=True)
    plain = make_net(seed, identity=True, use_dmoe=False)
    dmoe_params = dict(dmoe.named_parameters())
    plain_params = dict(plain.named_parameters())
    assert set(plain_params) == {k for k in dmoe_params if ".moe." not in k}
    for name, p in plain_params.items():
        assert torch.equal(p, dmoe_params[name]), name
    for m in dmoe.moe_layers().values():  # zero output layers, random input layers and routers
        assert m.experts.w2.abs().sum() == 0 and m.experts.b2.abs().sum() == 0
        assert m.experts.w1.abs().sum() > 0 and m.router.weight.abs().sum() > 0


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_layer_starts_as_the_identity(dispatch, mode):
    layer = make_layer(identity=True, dispatch=dispatch).train(mode == "train")
    x = torch.randn(2, 4, 4, 4, 2)
    with torch.no_grad():
        for g in (torch.tensor([0, 3]), torch.tensor([2, G]), torch.tensor([G, G]), None):
            assert torch.equal(layer(x, g), x)


def _as_path(net: DMoEResUNet, path: str, x: torch.Tensor):
    """The network run through ``path``: eager, TorchScript-scripted or traced (with subgroups (B,))."""
    if path == "script":
        return torch.jit.script(net)
    if path == "trace":
        return torch.jit.trace(net, (x, torch.tensor([0, 1])))
    return net


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize(
    "path, mode",
    [("dense", "eval"), ("sparse", "eval"), ("auto", "eval"), ("script", "eval"), ("trace", "eval"),
     ("dense", "train"), ("sparse", "train"), ("script", "train")],
)  # fmt: skip
def test_network_starts_as_its_backbone(path, mode):
    dispatch = path if path in ("dense", "sparse") else "auto"
    dmoe = make_net(3, identity=True, dispatch=dispatch).train(mode == "train")
    plain = make_net(3, identity=True, use_dmoe=False).train(mode == "train")
    x = torch.rand(SHAPE)
    with torch.no_grad():
        run = _as_path(dmoe, path, x)
        for g in (torch.tensor([0, 3]), torch.tensor([1, G]), torch.tensor([2]), None):
            if path == "trace" and g is None:
                continue  # a trace keeps the example's (tensor) signature
            torch.testing.assert_close(run(x, g), plain(x, g), atol=1e-6, rtol=0)


def test_training_leaves_the_identity():
    torch.manual_seed(11)
    x, y = torch.rand(SHAPE), torch.randint(0, 2, (2, *SHAPE[2:]))
    g = torch.tensor([0, G])
    nets = {"dmoe": make_net(5, identity=True).train(), "plain": make_net(5, identity=True, use_dmoe=False).train()}
    opts = {k: torch.optim.AdamW(n.parameters(), lr=1e-3) for k, n in nets.items()}
    for k, net in nets.items():  # one optimiser step on the same batch
        F.cross_entropy(net(x, g), y).backward()
        opts[k].step()
    layers = nets["dmoe"].moe_layers()
    for name, m in layers.items():
        assert m.router.weight.grad.abs().sum() == 0, name  # experts output zero: no routing signal yet
        assert m.experts.w2.abs().sum() > 0 and m.experts.b2.abs().sum() > 0, name  # ... but they moved off zero
    backbone = dict(nets["plain"].named_parameters())
    for name, p in nets["dmoe"].named_parameters():  # the backbone took the same step as without dMoE
        if name in backbone:
            torch.testing.assert_close(p, backbone[name], atol=1e-6, rtol=1e-5)
    nets["dmoe"].eval(), nets["plain"].eval()
    with torch.no_grad():
        assert (nets["dmoe"](x, g) - nets["plain"](x, g)).abs().max() > 1e-5
    nets["dmoe"].train()
    opts["dmoe"].zero_grad()
    F.cross_entropy(nets["dmoe"](x, g), y).backward()
    for name, m in layers.items():  # second step: the routers learn
        assert m.router.weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"top_k": 9}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 0, "top_k": 1}, "num_experts"),
        ({"features": 0}, "features"),
        ({"num_subgroups": 0}, "num_subgroups"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 0}, "out_channels"),
        ({"dropout": 1.0}, "dropout"),
        ({"dispatch": "fast"}, "dispatch"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
        ({"pad_mode": "reflect"}, "pad_mode"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_net(**kwargs)


# --- state, dispatch, export


def test_state_dict_round_trip():
    net = make_net(seed=0).eval()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh = make_net(seed=1).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x, g = torch.rand(SHAPE), torch.tensor([3, 0])
    with torch.no_grad():
        assert torch.equal(net(x, g), fresh(x, g))


@pytest.mark.parametrize("subgroup", [[0, 3], [1, 4], None])
def test_dense_and_sparse_dispatch_agree(subgroup):
    nets = {d: make_net(dispatch=d, features=8) for d in ("dense", "sparse", "auto")}
    x = torch.rand(SHAPE)
    g = None if subgroup is None else torch.tensor(subgroup)
    with torch.no_grad():
        outs = {d: n.eval()(x, g) for d, n in nets.items()}
    torch.testing.assert_close(outs["dense"], outs["sparse"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["auto"], outs["sparse"], atol=1e-5, rtol=1e-5)
    grads = {}
    for d, n in nets.items():  # training gradients too, with the random parts switched off
        n.train()
        for m in n.moe_layers().values():
            m.router.noise, m.dropout = False, 0.0
        n(x, g).square().mean().backward()
        grads[d] = {k: p.grad for k, p in n.named_parameters() if p.grad is not None}
    assert grads["dense"].keys() == grads["sparse"].keys()
    for k, gd in grads["dense"].items():
        torch.testing.assert_close(gd, grads["sparse"][k], atol=1e-4, rtol=1e-3)  # float summation order


def test_auto_dispatch_resolution():
    layer = make_layer(c=8)
    cpu = torch.device("cpu")
    assert layer.resolve_dispatch(cpu, 32768) == "sparse"
    assert layer.resolve_dispatch(cpu, 64) == "dense"
    assert layer.resolve_dispatch(torch.device("cuda"), 32768) == "dense"
    assert make_layer(dispatch="sparse").resolve_dispatch(cpu, 8) == "sparse"


def test_torchscript_matches_eager():
    net = make_net().eval()
    scripted = torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.rand(SHAPE)
    with torch.no_grad():
        for g in (torch.tensor([0, 2]), torch.tensor([1]), None):
            torch.testing.assert_close(loaded(x, g), net(x, g), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded(x), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_matches_eager_for_other_subgroups():
    """``ckpt_export --use_trace`` works too: the trace takes the general routing path, exact for every subgroup."""
    net = make_net().eval()
    x = torch.rand(SHAPE)
    traced = torch.jit.trace(net, (x, torch.tensor([0, 1])))
    x4 = torch.rand(4, *SHAPE[1:])
    with torch.no_grad():
        for g in (torch.tensor([3, 0, 4, 2]), torch.tensor([2])):
            torch.testing.assert_close(traced(x4, g), net(x4, g), atol=1e-4, rtol=1e-4)


# --- audit and aux loss


def test_routing_stats_counts():
    net = make_net().eval()
    x = torch.rand(SHAPE)
    with torch.no_grad():
        net(x, torch.tensor([1, 1]))
    assert all(c.sum() == 0 for c in net.routing_stats().values())  # off by default
    net.set_routing_stats(True)
    with torch.inference_mode():
        net(x, torch.tensor([1, 1]))
        net(x, None)
    stats = net.routing_stats()
    assert list(stats) == [f"stages.{i}.moe" for i in range(5)]
    voxels = [64 * 32 * 32 // 8 ** (i + 1) for i in range(5)]  # every stage halves each side
    for (name, counts), v in zip(stats.items(), voxels):
        assert counts.shape == (G + 1, 8) and counts.dtype == torch.int64
        expected = 2 * max(v, 1) * 2  # B * voxels * k
        assert counts[1].sum() == expected, name
        assert counts[G].sum() == expected, name  # the unknown row
        assert counts[[0, 2, 3]].sum() == 0
    net.reset_routing_stats()
    assert all(c.sum() == 0 for c in net.routing_stats().values())


def test_aux_loss_is_separate_and_finite():
    net = make_net(aux_loss_weight=0.01).train()
    out = net(torch.rand(SHAPE), torch.tensor([0, 1]))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 64, 32, 32)
    aux = net.aux_loss()
    assert aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    (out.mean() + aux).backward()
    assert net.aux_loss() == 0  # read once, then released
    plain = make_net()
    plain.train()(torch.rand(SHAPE), torch.tensor([0, 1]))
    assert plain.aux_loss() == 0  # off by default
