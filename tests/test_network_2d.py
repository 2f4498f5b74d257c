"""DMoEResUNet in 2D (``spatial_dims=2``) and the 3D network unchanged by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tool_skip_reason
from dmoe_check import assert_equal_to_scale, assert_runs_equal, run_layer
from scripts import dmoe_native
from scripts.dmoe import DMoE
from scripts.dmoe_unet import DMoEResUNet

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "bundle" / "models"
REFERENCE_3D = Path(__file__).resolve().parent / "data" / "reference_3d" / "output.npz"
#: the fixed input of the 3D reference: torch.rand of this shape from a torch.Generator seeded with REFERENCE_SEED
#: (odd sizes, so the padding to multiples of 32 and the crop back are part of the reference)
REFERENCE_SHAPE = (1, 1, 40, 36, 20)
REFERENCE_SEED = 0
REFERENCE_SUBGROUP = 2
G = 4


def shipped_3d_network() -> DMoEResUNet:
    """The network of ``bundle/configs/inference.json``'s network_def with ``bundle/models/model.pt``, eval mode."""
    net = DMoEResUNet(in_channels=1, out_channels=2, features=8, num_experts=8, top_k=2, num_subgroups=4,
                      use_dmoe=True)  # fmt: skip
    net.load_state_dict(torch.load(MODELS / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()


def reference_input(shape=REFERENCE_SHAPE, seed: int = REFERENCE_SEED) -> torch.Tensor:
    """The reference input, (1, 1, H, W, D) float32 in [0, 1)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def init_fingerprint(net: torch.nn.Module) -> tuple[list[str], np.ndarray]:
    """Parameter names and, per parameter, [sum, sum of |values|, first 4 values] (float64): the initial draws."""
    names, rows = [], []
    for name, p in net.named_parameters():
        flat = p.detach().double().flatten()
        names.append(name)
        head = flat[:4].tolist()
        rows.append([float(flat.sum()), float(flat.abs().sum()), *head, *[0.0] * (4 - len(head))])
    return names, np.array(rows)


def seed0_3d_network() -> DMoEResUNet:
    """A 3D network with inference.json's sizes, initialised after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return DMoEResUNet(1, 2, 8, 8, 2, 4, True)


def write_reference_3d(path: Path = REFERENCE_3D) -> None:
    """Regenerate ``tests/data/reference_3d/output.npz``: the shipped 3D network's logits on the reference input and
    the fingerprint of a seed-0 initialisation.

    Run from the repository root:
    ``PYTHONPATH=bundle:tests .venv/bin/python -c "import test_network_2d as t; t.write_reference_3d()"``.
    """
    with torch.no_grad():
        logits = shipped_3d_network()(reference_input(), torch.tensor([REFERENCE_SUBGROUP]))
    names, init = init_fingerprint(seed0_3d_network())
    np.savez_compressed(path, logits=logits.numpy().astype(np.float32), shape=np.array(REFERENCE_SHAPE),
                        seed=np.array(REFERENCE_SEED), subgroup=np.array(REFERENCE_SUBGROUP),
                        init_names=np.array(names), init_fingerprint=init)  # fmt: skip


def make_2d(seed: int = 0, **kwargs) -> DMoEResUNet:
    """A small 2D network with non-zero experts (as after training, so the dMoE layers act), eval mode."""
    torch.manual_seed(seed)
    net = DMoEResUNet(features=8, num_subgroups=G, spatial_dims=2, **kwargs)
    for layer in net.moe_layers().values():
        layer.experts.reset_parameters(zero_output=False)
    return net.eval()


def _image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_2d_network_is_built_from_2d_blocks_with_the_3d_names():
    """spatial_dims=2: 2D convolutions, the same parameter names as the 3D network, the shape kept."""
    net2d = make_2d()
    torch.manual_seed(0)
    net3d = DMoEResUNet(features=8, num_subgroups=G)
    assert [n for n, _ in net2d.named_parameters()] == [n for n, _ in net3d.named_parameters()]
    assert net2d.stages[0].block.conv1.conv.weight.shape == (8, 1, 3, 3)
    assert net2d.head.conv.weight.shape == (8, 2, 2, 2) and net3d.head.conv.weight.shape == (8, 2, 2, 2, 2)
    with torch.no_grad():
        assert net2d(_image(2, 1, 70, 50), torch.tensor([0, 3])).shape == (2, 2, 70, 50)


@pytest.mark.parametrize("pad_mode", ["replicate", "constant"])
def test_2d_padding_and_crop_back(pad_mode):
    """A 70x50 image gives the logits of the padded 96x64 image (padded by hand) cut back to the original box."""
    net = make_2d(pad_mode=pad_mode)
    x, g = _image(1, 1, 70, 50), torch.tensor([1])
    padded = F.pad(x, [7, 7, 13, 13], mode=pad_mode)  # 50 -> 64 (7 + 7), 70 -> 96 (13 + 13)
    with torch.no_grad():
        expected = net(padded, g)[:, :, 13:83, 7:57]
        torch.testing.assert_close(net(x, g), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the trace is checked on its example's size
@pytest.mark.parametrize("subgroup", [[1, 3], [2, 4], None])
def test_2d_eager_equals_torchscript(subgroup):
    """Scripted (any size) and traced (ckpt_export's use_trace: the example's size) 2D networks equal eager."""
    net = make_2d()
    x = _image(2, 1, 70, 50)
    g = None if subgroup is None else torch.tensor(subgroup)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        eager = net(x, g)
        torch.testing.assert_close(scripted(x, g), eager, atol=1e-5, rtol=1e-5)
        x64 = _image(2, 1, 64, 96, seed=2)
        torch.testing.assert_close(scripted(x64, g), net(x64, g), atol=1e-5, rtol=1e-5)
        traced = torch.jit.trace(net, (x,) if g is None else (x, g))
        torch.testing.assert_close(traced(x) if g is None else traced(x, g), eager, atol=1e-5, rtol=1e-5)


def _run_net(net: DMoEResUNet, x: torch.Tensor, g, seed: int = 7):
    """Logits and input gradient of ``sum(logits * w)`` for a fixed w, with the random numbers of ``seed``."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = net(x, g)
    w = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape)
    (out * w).sum().backward()
    return out.detach(), x.grad


def _set_path(net: DMoEResUNet, native: bool, dispatch: str) -> DMoEResUNet:
    for layer in net.moe_layers().values():
        layer.native, layer.dispatch = native, dispatch
    return net


def make_layer(c: int, native: bool, dispatch: str) -> DMoE:
    """A dMoE layer with non-zero experts on the chosen path (as in test_dmoe_native.py / test_dmoe_kernels.py)."""
    torch.manual_seed(0)
    layer = DMoE(c, num_subgroups=G, dispatch=dispatch)
    layer.experts.reset_parameters(zero_output=False)
    layer.native = native
    return layer


@pytest.fixture
def native_required(monkeypatch):
    """The native kernels built (``FAIRDRO_DMOE_NATIVE=1``: a failed build fails the test), two torch threads."""
    reason = tool_skip_reason("c++")  # torch builds the kernels with c++ (or $CXX)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(dmoe_native.ENV_VAR, "1")
    assert dmoe_native.available()
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("c", [8, 12])  # 8: the kernels' compile-time size; 12: their generic loops
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("subgroup", [[0, 2], [3, 4], None])
def test_2d_layer_native_and_fused_equal_dense(native_required, c, mode, subgroup):
    """On a 2D feature map (B, C, H, W) the native kernels and the fused Python sparse path give the dense path's
    output and gradients (router noise and dropout on in training)."""
    x = torch.randn(2, c, 24, 20)
    g = None if subgroup is None else torch.tensor(subgroup)
    train = mode == "train"
    native, fused = make_layer(c, True, "sparse").train(train), make_layer(c, False, "sparse").train(train)
    dense = make_layer(c, False, "dense").train(train)
    h = x.view(2, c, -1)
    assert native.uses_native(h) and not fused.uses_native(h) and not dense.uses_native(h)
    expected = run_layer(dense, x, g)
    assert expected[0].shape == x.shape
    assert_runs_equal(run_layer(native, x, g), expected)
    assert_runs_equal(run_layer(fused, x, g), expected)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_2d_network_native_equals_python_paths(native_required, mode):
    """The whole 2D network (odd size, padded) on the native kernels equals it on the dense and the fused sparse
    Python paths: logits and input gradient."""
    x, g = _image(2, 1, 40, 36), torch.tensor([0, 3])
    runs = {}
    for name, native, dispatch in (("native", True, "auto"), ("dense", False, "dense"), ("fused", False, "sparse")):
        net = _set_path(make_2d(), native, dispatch).train(mode == "train")
        runs[name] = _run_net(net, x, g)
    assert make_2d().stages[0].moe.uses_native(torch.zeros(2, 8, 400))
    for name in ("native", "fused"):
        torch.testing.assert_close(runs[name][0], runs["dense"][0], atol=1e-5, rtol=1e-5, msg=f"{name} logits")
        assert_equal_to_scale(runs[name][1], runs["dense"][1], f"{name} input gradient")


def test_2d_layer_python_path_when_native_is_off(monkeypatch):
    """FAIRDRO_DMOE_NATIVE=0 on a 2D feature map: the Python path, the same output as the dense dispatch."""
    monkeypatch.setenv(dmoe_native.ENV_VAR, "0")
    x, g = torch.randn(2, 8, 24, 20), torch.tensor([1, 2])
    layer = make_layer(8, True, "sparse").eval()
    assert not layer.uses_native(x.view(2, 8, -1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, g), make_layer(8, False, "dense").eval()(x, g), atol=1e-5, rtol=1e-5)


def test_3d_network_equals_the_committed_reference_and_model_ts():
    """The shipped weights in the 3D network give the logits of tests/data/reference_3d (made before spatial_dims
    existed) and of the committed TorchScript bundle/models/model.ts; scripting today's class gives them too."""
    ref = np.load(REFERENCE_3D)
    assert tuple(ref["shape"]) == REFERENCE_SHAPE and int(ref["seed"]) == REFERENCE_SEED
    x, g = reference_input(), torch.tensor([int(ref["subgroup"])])
    expected = torch.from_numpy(ref["logits"])
    net = shipped_3d_network()
    with torch.no_grad():
        eager = net(x, g)
        torch.testing.assert_close(eager, expected, atol=1e-5, rtol=1e-5)
        shipped_ts = torch.jit.load(str(MODELS / "model.ts"), map_location="cpu")
        torch.testing.assert_close(eager, shipped_ts(x, g), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.jit.script(net)(x, g), expected, atol=1e-5, rtol=1e-5)


def test_3d_initialisation_draws_are_unchanged():
    """After torch.manual_seed(0) the 3D network has the parameter names and initial values recorded before
    spatial_dims existed (so seeded training runs and the shipped weights stay reproducible)."""
    ref = np.load(REFERENCE_3D)
    names, fingerprint = init_fingerprint(seed0_3d_network())
    assert names == ref["init_names"].tolist()
    np.testing.assert_allclose(fingerprint, ref["init_fingerprint"], rtol=1e-12, atol=0)
    torch.manual_seed(0)
    explicit = DMoEResUNet(1, 2, 8, 8, 2, 4, True, spatial_dims=3)
    np.testing.assert_array_equal(init_fingerprint(explicit)[1], fingerprint)


@pytest.mark.parametrize("bad", [4, 1, 0, True, 2.0, "2", None])
def test_bad_spatial_dims_is_refused(bad):
    with pytest.raises(ValueError, match=r"spatial_dims=.*must be 2 \(images\) or 3 \(volumes\)"):
        DMoEResUNet(features=8, spatial_dims=bad)


@pytest.mark.parametrize(
    "spatial_dims,shape,expected",
    [
        (2, (1, 1, 64, 64, 32), r"\(B, 1, H, W\) for spatial_dims=2, got \[1, 1, 64, 64, 32\]"),
        (2, (1, 64, 64), r"\(B, 1, H, W\) for spatial_dims=2, got \[1, 64, 64\]"),
        (3, (1, 1, 64, 64), r"\(B, 1, H, W, D\) for spatial_dims=3, got \[1, 1, 64, 64\]"),
        (2, (1, 3, 64, 64), r"\(B, 1, H, W\) for spatial_dims=2, got \[1, 3, 64, 64\]"),
    ],
)
def test_wrong_input_rank_is_refused(spatial_dims, shape, expected):
    net = DMoEResUNet(features=8, spatial_dims=spatial_dims)
    with pytest.raises(ValueError, match=expected):
        net(torch.zeros(shape))
