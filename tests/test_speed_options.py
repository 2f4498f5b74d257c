"""The single-machine speed switches (channels_last, compile, amp_kwargs, sw_*, cache_rate, persistent_cache_dir)
and the speed benchmark script."""

import copy
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import CacheDataset, PersistentDataset
from scripts import synthetic
from scripts.dmoe_unet import DMoEResUNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
BENCH = REPO / "bench" / "bench_speed.py"
CL = torch.channels_last_3d
#: network settings that keep the configs fast on a CPU
TINY = {"patch_size": [64, 64, 32], "features": 4, "num_experts": 4}


def _bench_module():
    if "bench_speed" not in sys.modules:  # registered before running it: its dataclasses look themselves up there
        spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_speed"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_speed"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed_cohort")
    synthetic.generate_cohort(out, n_cases=6, seed=3, shape=(48, 48, 24))
    return out


def _parser(name, **override):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    parser.update(override)
    return parser


def _with_active_experts(net):
    """The network with non-zero expert output layers (they start at zero: the dMoE net starts as its backbone), so the
    dMoE branch is exercised; no randomness in the forward is added (dropout/noise settings stay as built)."""
    for layer in net.moe_layers().values():
        layer.experts.reset_parameters(zero_output=False)
    return net


@pytest.mark.parametrize("use_dmoe", [True, False], ids=["dmoe", "backbone"])
def test_channels_last_network_gives_the_same_output(use_dmoe):
    torch.manual_seed(0)
    net = _with_active_experts(DMoEResUNet(features=4, num_experts=4, use_dmoe=use_dmoe)).eval()
    net_cl = copy.deepcopy(net).to(memory_format=CL)
    assert net_cl.head.conv.weight.is_contiguous(memory_format=CL)
    x = torch.rand(2, 1, 64, 32, 32)  # the first stage's 16k tokens take the sparse dispatch, deeper ones the dense
    g = torch.tensor([0, 3])
    with torch.no_grad():
        ref = net(x, g)
        for inp in (x, x.contiguous(memory_format=CL)):
            out = net_cl(inp, g)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # unknown subgroups take the fallback routing: same there
        torch.testing.assert_close(net_cl(x, None), net(x, None), atol=1e-5, rtol=1e-5)


def test_channels_last_training_gradients_match():
    torch.manual_seed(0)
    net = _with_active_experts(DMoEResUNet(features=4, num_experts=4, dropout=0.0, noise=False)).train()
    net_cl = copy.deepcopy(net).to(memory_format=CL)
    x = torch.rand(2, 1, 64, 32, 32)
    g = torch.tensor([1, 2])
    for m in (net, net_cl):
        m(x, g).square().mean().backward()
    for (name, p), p_cl in zip(net.named_parameters(), net_cl.parameters()):
        torch.testing.assert_close(p_cl.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda s, n=name: f"{n}: {s}")


def test_defaults_keep_the_previous_behaviour(cohort):
    parser = _parser("train.json", dataset_dir=str(cohort), **TINY)
    assert not parser["channels_last"] and not parser["compile"] and not parser["amp"]
    assert parser["persistent_cache_dir"] is None and parser["cache_rate"] == 1.0
    net = parser.get_parsed_content("network")
    assert all(p.is_contiguous() for p in net.parameters())
    loader = parser.get_parsed_content("train#dataloader")
    assert type(loader.dataset) is CacheDataset and loader.dataset.cache_num == len(loader.dataset)
    assert parser.get_parsed_content("train#trainer").compile is False
    inferer = parser.get_parsed_content("validate#inferer")
    infer = _parser("inference.json")
    assert (inferer.sw_batch_size, inferer.overlap) == (infer["sw_batch_size"], infer["sw_overlap"]) == (4, 0.25)
    expected = {"dtype": torch.bfloat16} if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else {}
    assert parser.get_parsed_content("amp_kwargs") == expected


def test_train_config_with_channels_last_builds_and_trains(cohort, tmp_path):
    parser = _parser("train.json", dataset_dir=str(cohort), output_dir=str(tmp_path), ckpt_dir=str(tmp_path / "m"),
                     channels_last=True, compile=False, epochs=1, val_interval=10, batch_size=2, num_samples=1,
                     sw_batch_size=2, sw_overlap=0.5, **TINY)  # fmt: skip
    parser["train#trainer#epoch_length"] = 1
    net = parser.get_parsed_content("network")
    assert all(p.is_contiguous(memory_format=CL) for p in net.parameters() if p.dim() == 5)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.compile is False and trainer.network is net
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert (evaluator.inferer.sw_batch_size, evaluator.inferer.overlap) == (2, 0.5)
    trainer.run()
    assert trainer.state.iteration == 1
    assert torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))


def test_compile_switch_wraps_the_network(cohort):
    parser = _parser("train.json", dataset_dir=str(cohort), compile=True, **TINY)
    net = parser.get_parsed_content("network")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    for engine in (trainer, evaluator):  # compiled lazily: nothing is compiled until the first iteration
        assert engine.compile is True and engine.network is not net and engine.network._orig_mod is net
    infer = _parser("inference.json", dataset_dir=str(cohort), compile=True, channels_last=True, **TINY)
    evaluator = infer.get_parsed_content("evaluator")
    assert evaluator.compile is True
    assert infer.get_parsed_content("network").head.conv.weight.is_contiguous(memory_format=CL)


def test_persistent_cache_dir_switch(cohort, tmp_path):
    cache = tmp_path / "cache"
    parser = _parser("train.json", dataset_dir=str(cohort), persistent_cache_dir=str(cache), **TINY)
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.dataset, PersistentDataset)
    assert parser.get_parsed_content("train#dataset").cache_num == 0  # the in-memory cache is skipped
    batch = next(iter(loader))
    assert batch["image"].shape[1:] == (1, 64, 64, 32) and "subgroup" in batch
    assert len(list(cache.glob("*.pt"))) >= 1
    # cache_rate also controls the in-memory caches
    parser = _parser("train.json", dataset_dir=str(cohort), cache_rate=0.0, **TINY)
    assert parser.get_parsed_content("train#dataset").cache_num == 0
    assert parser.get_parsed_content("validate#dataset").cache_num == 0


def test_bench_window_count_matches_monai():
    from monai.inferers import sliding_window_inference

    bench = _bench_module()
    calls = []

    def net(x):
        calls.append(x.shape[0])
        return x

    shape, roi = (94, 70, 34), (64, 64, 32)
    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, net, overlap=0.25)
    assert sum(calls) == bench.n_windows(shape, roi, 0.25)


def test_bench_peak_memory_sees_an_allocation():
    bench = _bench_module()
    with bench.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
        del x
    if not mem.exact:
        pytest.skip("no resettable peak-RSS counter on this system")
    assert 28 <= mem.mib < 200


@pytest.mark.slow
def test_bench_speed_quick_runs():
    cmd = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--channels-last"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for header in ("## Training step", "## Sliding-window inference", "## End-to-end inference", "## Data loading"):
        assert header in out
    assert "| mode | network | params | train step (s) | voxels/s |" in out
    assert "| channels-last | dMoE (bundle default) |" in out
    assert "torch " + torch.__version__ in out
    # the end-to-end section runs the new and the previous post-processing on one prediction: same mask
    assert "| fp32 eager, previous path |" in out and "New vs previous path on the same prediction: 0 voxels" in out
    assert "Goals (fp32 eager, new path): invert + save" in out


def test_bench_profile_overlays_the_configs():
    bench = _bench_module()
    cfg = bench.load_cfg("gpu")
    assert (cfg["features"], cfg["patch_size"], cfg["amp"]) == (32, [128, 128, 64], True)
    assert bench.load_cfg()["features"] == 8 and bench.load_cfg()["amp"] is False
    args = bench.parse_args(["--profile", "gpu", "--short"], cfg)
    assert args.sections == ["train"] and args.patch == [128, 128, 64] and (args.repeats, args.warmup) == (1, 1)
    with pytest.raises(SystemExit):  # --short measures a profile
        bench.parse_args(["--short"], bench.load_cfg())


def test_bench_target_logits_mark_the_phantom_target():
    """The e2e section's stand-in for a trained model marks the phantom's target sphere: as many voxels as the
    sphere's volume over the voxel volume, centred where ct_phantom draws it."""
    from monai.data import MetaTensor

    bench = _bench_module()
    args = bench.parse_args(["--quick"], bench.load_cfg())  # 96x96x40 CT at 0.98x0.98x2.5 mm
    spacing = [1.0, 1.0, 3.0]
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    shape = [int(n * s / t) for n, s, t in zip(args.raw_shape, args.raw_spacing, spacing)]
    offset = bench.target_logits(MetaTensor(torch.zeros(1, 1, *shape), affine=affine), args)
    marked = offset[0, 1] > 0
    assert not offset[0, 0].any() and set(offset[0, 1].unique().tolist()) == {0.0, 16.0}
    radius = 0.15 * 0.30 * 96 * 0.98  # mm, as in ct_phantom
    expected = 4 / 3 * math.pi * radius**3 / math.prod(spacing)
    assert abs(int(marked.sum()) - expected) < 0.25 * expected, (int(marked.sum()), expected)
    centre_mm = [float(i.float().mean()) * s for i, s in zip(torch.nonzero(marked).T, spacing)]
    expected_centre = [95 / 2 * 0.98 + 0.3 * 0.42 * 96 * 0.98, 95 / 2 * 0.98, 39 / 2 * 2.5]
    assert all(abs(a - b) < 1.5 for a, b in zip(centre_mm, expected_centre)), (centre_mm, expected_centre)
