"""Speed of the bundle on one machine: training step, sliding-window inference, end-to-end inference, data loading.

Every section prints a markdown table (timings are wall-clock medians of interleaved rounds, so that all the variants
of a table see the same machine load; ratios are taken within the run):

- ``train``: one training step (forward, ``PerSampleDiceCELoss``, backward, AdamW step) at the bundle's default
  patch and batch (``train.json``: ``batch_size`` volumes x ``num_samples`` patches of ``patch_size``) for the dMoE
  network, its plain backbone (``use_dmoe`` false) and MONAI's ``UNet`` of similar size (channels 8..128, 4 strides
  of 2, one residual unit); voxels/s count the patch voxels of the batch.
- ``infer``: sliding-window inference (``SlidingWindowInferer``, roi ``patch_size``) of a CT of ``--raw-shape`` voxels
  at ``--raw-spacing`` mm after resampling to the configs' ``spacing``: 512x512x160 at 0.98x0.98x2.5 mm becomes the
  502x502x133 volume the preprocessing hands to the network (worst case: no foreground crop), dMoE and backbone.
- ``e2e``: the ``inference.json`` pipeline end to end on that CT written as NIfTI: load, orientation, ``Spacingd``,
  intensity window and foreground crop; sliding window (dMoE); ``postprocessing`` (softmax, ``InvertForegroundd``
  back to the raw grid, ``SaveImaged``), timed as ``invert`` and ``save``. The network has random weights whose head
  bias favours background, and the phantom's target sphere gets a logit offset, so the mask holds a target as a
  trained model's does and inverting and writing it costs what it costs in practice. In the first mode the previous
  post-processing (``postprocessing_whole_volume``: ``Invertd`` of both channels on the whole grid, argmax) runs on
  the same prediction: its times, and how many voxels of the two masks differ. The last line checks the goals
  (invert + save <= 20% of the total; total <= 2x the sliding window).
- ``prep``: the ``inference.json`` preprocessing of that CT transform by transform (load, orientation, spacing,
  intensity window, crop), written as ``.nii.gz`` and as a DICOM series (``scripts.synthetic_dicom``), against the
  same configs with the MONAI transforms that ``scripts/fast_preprocess.py`` stands in for (interleaved rounds); the
  images of the two chains compared voxel by voxel, their transform records, the DICOM read on its own line, and the
  goal (preprocessing <= 1.5 s: the NIfTI with its load, the series after its read).
- ``data``: items/s of ``train.json``'s ``train#preprocessing`` (the deterministic load chain and the random crops) on
  synthetic volumes through ``Dataset``, ``CacheDataset`` and ``PersistentDataset``, against the volumes/s a training
  step of the dMoE network consumes.

Memory (``peak mem``): on CPU the peak resident memory of the measured call above the resident memory just before it
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; where that is not possible the increase of
``ru_maxrss``, a lower bound, marked ``>=``); on a GPU ``torch.cuda.max_memory_allocated`` above the memory allocated
before. Weights, optimizer state and inputs held before the call are not counted.

Modes: ``fp32 eager`` always; ``--channels-last`` (network in ``torch.channels_last_3d``), ``--amp`` (bf16 autocast
as the bundle's ``amp``: CUDA only) and ``--compile`` (``torch.compile`` of the network with the configs'
``compile_kwargs``) each add a mode, and with two or more of them one more mode with all of them together. On CPU,
compiling the dMoE network takes minutes per network and shape and was not faster than eager: leave ``--compile`` to
GPU runs.

Profiles: ``--profile gpu`` stacks ``configs/profiles/gpu.json`` on both configs (network features, patch, window
batch, and its ``amp``: the bf16 autocast mode on CUDA). With ``--short`` only its training step runs, dMoE only, one
untimed and one timed step: a CPU check of the profile (its GPU numbers need a GPU run without ``--short``).

Usage::

    python bench/bench_speed.py                          # CPU, all sections, 2 threads
    python bench/bench_speed.py --channels-last          # also the channels-last mode
    python bench/bench_speed.py --quick                  # tiny sizes, one round: a smoke test (< 1 minute)
    python bench/bench_speed.py --device cuda --amp --channels-last --compile
    python bench/bench_speed.py --sections train,data --repeats 9
    python bench/bench_speed.py --sections prep --threads 1   # the CT preprocessing only
    python bench/bench_speed.py --profile gpu --short     # the GPU profile's training step, measured on the CPU
    python bench/bench_speed.py --profile gpu --device cuda --channels-last   # the profile on a GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import monai
import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
sys.path.insert(0, str(BUNDLE))
sys.path.insert(0, str(REPO / "tools"))

from checklib import dice  # noqa: E402
from scripts import synthetic  # noqa: E402
from scripts.dmoe_unet import DMoEResUNet  # noqa: E402
from scripts.losses import PerSampleDiceCELoss  # noqa: E402

SECTIONS = ("train", "infer", "e2e", "prep", "data")
#: overlays in configs/profiles/ that --profile stacks on train.json and inference.json
PROFILES = tuple(sorted(p.stem for p in (CONFIGS / "profiles").glob("*.json")))
#: the profile keys the benchmark reads (network size, patch, window batch, autocast)
PROFILE_KEYS = ("features", "patch_size", "sw_batch_size", "amp")
DMOE, BACKBONE, MONAI_UNET = "dMoE (bundle default)", "backbone", "MONAI UNet 8..128"
#: torch.compile arguments of the bundle (train.json ``compile_kwargs``)
COMPILE_KWARGS: dict = json.loads((CONFIGS / "train.json").read_text())["compile_kwargs"]


# ----------------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_lines(device: torch.device) -> List[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    return [
        f"- device: `{device}`, GPU: {gpu}",
        f"- CPU: {cpu_model()}, {cores} cores usable, torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, MONAI {monai.__version__}, Python {platform.python_version()}",
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that reused pages do not hide a peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Context manager: peak memory of the block above the level at its start, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")
        self.exact = True

    def __enter__(self) -> "PeakMemory":
        sync(self.device)
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            rss = _status_kib("VmRSS")
            self.exact = rss is not None and _reset_peak_rss()
            self._base = rss if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            peak = _status_kib("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.mib = (peak - self._base) / 1024 if peak is not None else float("nan")

    def text(self) -> str:
        if math.isnan(self.mib):
            return "n/a"
        return f"{self.mib:.0f}" if self.exact else f">= {self.mib:.0f}"


def rss_mib() -> float:
    """Current resident memory in MiB (after releasing freed heap pages), NaN off Linux."""
    _release_free_memory()
    kib = _status_kib("VmRSS")
    return float("nan") if kib is None else kib / 1024


# ------------------------------------------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    channels_last: bool = False
    amp: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        names = ("channels-last", "bf16", "compile")
        parts = [n for n, on in zip(names, (self.channels_last, self.amp, self.compile)) if on]
        return " + ".join(parts) if parts else "fp32 eager"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, net: nn.Module, device: torch.device) -> Tuple[nn.Module, nn.Module]:
        """``(module, callable)``: the network on ``device`` in this mode's memory format, and what to call."""
        net = net.to(device, memory_format=torch.channels_last_3d) if self.channels_last else net.to(device)
        return net, (torch.compile(net, **COMPILE_KWARGS) if self.compile else net)


BASE = Mode()


def build_modes(args: argparse.Namespace, device: torch.device) -> List[Mode]:
    flags = {"channels_last": args.channels_last, "amp": args.amp, "compile": args.compile}
    if args.amp and device.type != "cuda":
        print("note: --amp is bf16 autocast on CUDA only (as the bundle's amp); skipped on CPU.\n")
        flags["amp"] = False
    on = [k for k, v in flags.items() if v]
    modes = [BASE] + [Mode(**{k: True}) for k in on]
    if len(on) > 1:
        modes.append(Mode(**{k: True for k in on}))
    return modes


# ---------------------------------------------------------------------------------------------------------- networks
class IgnoreSubgroup(nn.Module):
    """Wraps a network without a subgroup input so that it takes ``(x, subgroup)`` like the dMoE network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, subgroup: Optional[Tensor] = None) -> Tensor:
        return self.net(x)


def build_network(name: str, cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    if name == MONAI_UNET:
        return IgnoreSubgroup(UNet(3, 1, 2, channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=1))
    return DMoEResUNet(
        in_channels=1,
        out_channels=2,
        features=cfg["features"],
        num_experts=cfg["num_experts"],
        top_k=cfg["top_k"],
        num_subgroups=len(cfg["subgroups"]),
        use_dmoe=name == DMOE,
    )


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------------------ timing
def interleaved(
    fns: Dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> Tuple[Dict[str, List[float]], Dict[str, PeakMemory]]:
    """Time every function ``repeats`` times round-robin after ``warmup`` untimed rounds.

    The peak memory of each function is taken in its first timed call (outside its timing).
    """
    times: Dict[str, List[float]] = {k: [] for k in fns}
    mems: Dict[str, PeakMemory] = {}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            mem = PeakMemory(device) if r == warmup else contextlib.nullcontext()
            with mem:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                dt = time.perf_counter() - t0
            if r == warmup:
                mems[name] = mem  # type: ignore[assignment]
            if r >= warmup:
                times[name].append(dt)
            print(f"  [{r + 1}/{warmup + repeats}] {name}: {dt:.3f} s", file=sys.stderr, flush=True)
    return times, mems


def ratio(times: Dict[str, List[float]], name: str, base: str) -> str:
    """Ratio of medians of ``name`` to ``base`` and, in brackets, the median of the per-round ratios."""
    if base not in times:
        return "-"
    a, b = times[name], times[base]
    per_round = statistics.median(x / y for x, y in zip(a, b))
    return f"{statistics.median(a) / statistics.median(b):.2f} ({per_round:.2f})"


# ------------------------------------------------------------------------------------------------------------- train
def make_train_step(
    call: nn.Module, params: Sequence[Tensor], x: Tensor, y: Tensor, g: Tensor, mode: Mode, cfg: dict
) -> Callable[[], None]:
    """One step as ``scripts.engine.FairDROTrainer`` runs it (MONAI SupervisedTrainer: zero_grad(set_to_none=False),
    autocast around forward + loss, GradScaler with amp), with the uniform mean of the per-sample losses."""
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"], weight_decay=cfg["optimizer"]["weight_decay"])
    loss_fn = PerSampleDiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    scaler = torch.amp.GradScaler("cuda") if mode.amp and x.device.type == "cuda" else None

    def step() -> None:
        call.train()
        opt.zero_grad(set_to_none=False)
        with mode.autocast(x.device):
            loss = loss_fn(call(x, g), y).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return step


def bench_train(args, cfg: dict, modes: List[Mode], device: torch.device) -> Dict[str, float]:
    patch = tuple(args.patch)
    b = cfg["batch_size"] * cfg["num_samples"]
    torch.manual_seed(1)
    x = torch.rand(b, 1, *patch, device=device)
    y = (torch.rand(b, 1, *patch, device=device) > 0.7).float()
    # the collated batch: each volume's subgroup repeated for its num_samples patches
    g = torch.arange(cfg["batch_size"], device=device).repeat_interleave(cfg["num_samples"]) % len(cfg["subgroups"])
    nets = (DMOE,) if args.short else (DMOE, BACKBONE, MONAI_UNET)
    fns: Dict[str, Callable[[], None]] = {}
    params: Dict[str, int] = {}
    for mode in modes:
        for name in nets:
            module, call = mode.prepare(build_network(name, cfg), device)
            params[name] = n_params(module)
            fns[f"{mode.name}|{name}"] = make_train_step(call, list(module.parameters()), x, y, g, mode, cfg)
    warmup = args.warmup if args.warmup is not None else (2 if any(m.compile for m in modes) else 1)
    print(
        f"## Training step ({b} patches of {'x'.join(map(str, patch))} per step, features {cfg['features']}, "
        f"{args.repeats} rounds after {warmup} untimed)\n"
    )
    times, mems = interleaved(fns, args.repeats, warmup, device)
    print("| mode | network | params | train step (s) | voxels/s | x backbone | x fp32 eager | peak mem (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    voxels = b * math.prod(patch)
    for mode in modes:
        for name in nets:
            key = f"{mode.name}|{name}"
            med = statistics.median(times[key])
            print(
                f"| {mode.name} | {name} | {params[name]:,} | {med:.3f} | {voxels / med / 1e6:.2f} M "
                f"| {ratio(times, key, f'{mode.name}|{BACKBONE}')} | {ratio(times, key, f'{BASE.name}|{name}')} "
                f"| {mems[key].text()} |"
            )
    print(flush=True)
    return {"dmoe_step_s": statistics.median(times[f"{BASE.name}|{DMOE}"])}


# ------------------------------------------------------------------------------------------------------------- infer
def ct_phantom(shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> np.ndarray:
    """An int16 HU volume that looks like a planning CT to the preprocessing: air, an elliptic body (84% x 60% of the
    field of view) of soft tissue with noise, a spine-like bone cylinder, a couch slab, a brighter target sphere."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)[None, :, None]
    z = ((np.arange(nz) - (nz - 1) / 2) * spacing[2]).astype(np.float32)[None, None, :]
    ax, ay = 0.42 * nx * spacing[0], 0.30 * ny * spacing[1]
    img = rng.standard_normal((nx, ny, nz), dtype=np.float32)
    img *= 15.0
    body = (x / ax) ** 2 + (y / ay) ** 2 <= 1.0  # (nx, ny, 1)
    img += np.where(body, np.float32(40.0), np.float32(-1000.0))
    img += np.where((x / (0.08 * ax)) ** 2 + ((y + 0.6 * ay) / (0.1 * ay)) ** 2 <= 1.0, np.float32(660.0), 0)
    couch = (y < -1.08 * ay) & (y > -1.08 * ay - 8.0 * spacing[1])
    img += np.where(couch & ~body, np.float32(800.0), 0)
    r = 0.15 * ay
    img += np.where((x - 0.3 * ax) ** 2 + y**2 + z**2 <= r * r, np.float32(50.0), 0)
    return np.clip(img, -1024, 3071).astype(np.int16)


def raw_affine(spacing: Sequence[float]) -> np.ndarray:
    return np.diag([*map(float, spacing), 1.0])


def n_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of sliding windows MONAI uses (scan interval ``int(roi * (1 - overlap))``, at least 1)."""
    total = 1
    for s, r in zip(shape, roi):
        if s <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        total *= math.ceil((s - r) / step) + 1
    return total


def preprocessed_volume(args, cfg: dict) -> Tuple[Tensor, float, Tuple[int, ...]]:
    """The raw CT resampled to the configs' spacing and intensity-windowed: ``(volume (1, 1, X, Y, Z), resample s)``."""
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRange, Spacing

    raw = ct_phantom(args.raw_shape, args.raw_spacing)
    affine = torch.from_numpy(raw_affine(args.raw_spacing))
    img = MetaTensor(torch.from_numpy(raw.astype(np.float32))[None], affine=affine)
    del raw
    t0 = time.perf_counter()
    vol = Spacing(pixdim=cfg["spacing"], mode="bilinear")(img)
    dt = time.perf_counter() - t0
    lo, hi = cfg["hu_window"]
    vol = ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=True)(vol)
    return vol.as_tensor()[None].contiguous(), dt, tuple(img.shape[1:])


def bench_infer(args, cfg: dict, modes: List[Mode], device: torch.device) -> None:
    vol, resample_s, raw_shape = preprocessed_volume(args, cfg)
    vol = vol.to(device)
    shape = tuple(vol.shape[2:])
    roi = tuple(args.patch)
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=args.sw_batch_size, overlap=args.sw_overlap)
    warm = vol[..., : 2 * roi[0], : 2 * roi[1], : 2 * roi[2]]
    g = torch.tensor([1], device=device)
    nets = (DMOE, BACKBONE)
    fns: Dict[str, Callable[[], None]] = {}
    for mode in modes:
        for name in nets:
            module, call = mode.prepare(build_network(name, cfg), device)
            module.eval()

            def infer(call=call, mode=mode, v=vol) -> None:
                with torch.no_grad(), mode.autocast(device):
                    inferer(v, call, g)

            def warmup(call=call, mode=mode) -> None:
                with torch.no_grad(), mode.autocast(device):
                    inferer(warm, call, g)

            warmup()
            fns[f"{mode.name}|{name}"] = infer
    windows = n_windows(shape, roi, args.sw_overlap)
    print(
        f"## Sliding-window inference ({'x'.join(map(str, raw_shape))} CT at "
        f"{'x'.join(f'{s:g}' for s in args.raw_spacing)} mm -> {'x'.join(map(str, shape))} at "
        f"{'x'.join(f'{s:g}' for s in cfg['spacing'])} mm; roi {'x'.join(map(str, roi))}, sw_batch_size "
        f"{args.sw_batch_size}, overlap {args.sw_overlap}: {windows} windows; {args.infer_repeats} rounds)\n"
    )
    print(f"Resampling the raw CT to that grid (`Spacing`, bilinear) took {resample_s:.2f} s.\n")
    times, mems = interleaved(fns, args.infer_repeats, 0, device)
    print("| mode | network | time (s) | windows/s | Mvoxels/s | x backbone | x fp32 eager | peak mem (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for name in nets:
            key = f"{mode.name}|{name}"
            med = statistics.median(times[key])
            print(
                f"| {mode.name} | {name} | {med:.2f} | {windows / med:.1f} | {math.prod(shape) / med / 1e6:.2f} "
                f"| {ratio(times, key, f'{mode.name}|{BACKBONE}')} | {ratio(times, key, f'{BASE.name}|{name}')} "
                f"| {mems[key].text()} |"
            )
    print(flush=True)


# --------------------------------------------------------------------------------------------------------------- e2e
def target_logits(image: Tensor, args) -> Tensor:
    """``(1, 2, X, Y, Z)`` logit offset that makes the phantom's target sphere (:func:`ct_phantom`) foreground on the
    network grid of ``image`` (a collated MetaTensor): a trained model's mask, not an empty one, so that inverting it
    costs what it costs in practice."""
    nx, ny, nz = args.raw_shape
    sp = args.raw_spacing
    centre = [(nx - 1) / 2 * sp[0] + 0.3 * 0.42 * nx * sp[0], (ny - 1) / 2 * sp[1], (nz - 1) / 2 * sp[2]]
    radius = 0.15 * 0.30 * ny * sp[1]
    affine = torch.as_tensor(image.affine).reshape(-1, 4, 4)[0].float()
    axes = [torch.arange(n, dtype=torch.float32) for n in image.shape[2:]]
    dist2 = torch.zeros(image.shape[2:])
    for d in range(3):  # world coordinate d of every voxel, by broadcasting over the three voxel axes
        w = affine[d, 3] - centre[d]
        w = w + affine[d, 0] * axes[0][:, None, None] + affine[d, 1] * axes[1][None, :, None]
        dist2 += (w + affine[d, 2] * axes[2][None, None, :]) ** 2
    offset = torch.zeros(1, 2, *image.shape[2:])
    offset[0, 1] = torch.where(dist2 <= radius**2, 16.0, 0.0)
    return offset


def e2e_parser(args, data_dir: Path, device: torch.device, mode: Mode) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json")] + ([str(args.profile_file)] if args.profile_file else []))
    parser.update(
        {
            "dataset_dir": str(data_dir),
            "output_dir": str(data_dir / "out"),
            "device": f"$torch.device('{device}')",
            "channels_last": mode.channels_last,
            "sw_batch_size": args.sw_batch_size,
            "sw_overlap": args.sw_overlap,
            "patch_size": list(args.patch),
        }
    )
    return parser


def quiet_saver(post) -> None:
    for t in post.transforms:
        if hasattr(t, "saver"):  # SaveImaged: no "writing ..." log line in the table
            t.saver.write_kwargs["verbose"] = False


def run_post(post, d: dict) -> Tuple[dict, float, float]:
    """Post-processing of one case, timed in two parts: ``(output, invert s, save s)``; the saver is the last
    transform, everything before it (softmax, inversion, discretisation) is "invert"."""
    t0 = time.perf_counter()
    for t in post.transforms[:-1]:
        d = t(d)
    t1 = time.perf_counter()
    post.transforms[-1](d)
    return d, t1 - t0, time.perf_counter() - t1


def mask_agreement(a: Tensor, b: Tensor) -> str:
    a, b = torch.as_tensor(a).cpu().numpy() > 0, torch.as_tensor(b).cpu().numpy() > 0
    return f"{int((a != b).sum())} voxels differ, Dice {dice(a, b):.6f} ({int(b.sum())} foreground voxels)"


def e2e_row(name: str, shape: str, med: Sequence[float], mem: str) -> str:
    total = sum(med)
    post = med[2] + med[3]
    return (
        f"| {name} | {shape} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} | {post:.2f} | {total:.2f} "
        f"| {100 * post / total:.0f}% | {total / med[1]:.2f} | {mem} |"
    )


def e2e_goals(med: Sequence[float]) -> str:
    total, post = sum(med), med[2] + med[3]
    share, times_sw = post / total, total / med[1]
    return (
        f"Goals ({BASE.name}, new path): invert + save {post:.2f} s = {100 * share:.0f}% of the total {total:.2f} s "
        f"(goal <= 20%: {'met' if share <= 0.2 else 'NOT met'}); total = {times_sw:.2f}x the sliding window's "
        f"{med[1]:.2f} s (goal <= 2.0x: {'met' if times_sw <= 2.0 else 'NOT met'})."
    )


def e2e_round(parts: dict, item: dict, mode: Mode, device: torch.device, args) -> Tuple[List[float], dict, dict]:
    """One case through ``parts`` (preprocessing, inferer, network call, postprocessing): ``(seconds of load +
    preprocess, sliding window, invert, save; the case before post-processing; after it)``."""
    from monai.data import decollate_batch, list_data_collate

    t0 = time.perf_counter()
    batch = list_data_collate([parts["pre"](dict(item))])
    t1 = time.perf_counter()
    offset = target_logits(batch["image"], args).to(device)  # not timed: it stands in for training
    image = batch["image"].to(device)
    t2 = time.perf_counter()
    with torch.no_grad(), mode.autocast(device):
        batch["pred"] = parts["inferer"](image, parts["call"], subgroup=batch["subgroup"].to(device)) + offset
    sync(device)
    t3 = time.perf_counter()
    (case,) = decollate_batch(batch)
    out, inv_s, save_s = run_post(parts["post"], dict(case))
    return [t1 - t0, t3 - t2, inv_s, save_s], case, out


def e2e_parts(args, data_dir: Path, device: torch.device, mode: Mode) -> Tuple[dict, ConfigParser]:
    parser = e2e_parser(args, data_dir, device, mode)
    parts = {k: parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing")}
    parts["pre"], parts["post"] = parts.pop("preprocessing"), parts.pop("postprocessing")
    quiet_saver(parts["post"])
    net = parser.get_parsed_content("network").eval()
    with torch.no_grad():
        net.head.conv.bias.copy_(torch.tensor([4.0, -4.0]))  # mostly background, like a trained model
    parts["call"] = torch.compile(net, **COMPILE_KWARGS) if mode.compile else net
    return parts, parser


def previous_path(parser: ConfigParser, case: dict, out: dict, med: Sequence[float], name: str, shape: str):
    """The previous post-processing on the same prediction: its table row and how its mask compares."""
    old = parser.get_parsed_content("postprocessing_whole_volume")
    quiet_saver(old)
    old_out, old_inv, old_save = run_post(old, dict(case))
    row = e2e_row(f"{name}, previous path", shape, [*med[:2], old_inv, old_save], "-")
    return row, f"New vs previous path on the same prediction: {mask_agreement(out['pred'], old_out['pred'])}."


E2E_HEADER = (
    "| mode | network input | load + preprocess (s) | sliding window (s) | invert (s) | save (s) | invert + save (s) "
    "| total (s) | invert + save share | total / sliding window | peak mem (MiB) |\n" + "|---" * 11 + "|"
)
E2E_NOTE = (
    "The network has random weights; its head bias favours background and the phantom's target sphere gets a logit "
    "offset, so the mask holds a target as a trained model's does. `invert` is softmax and the inversion to the CT's "
    "grid (`postprocessing`: `InvertForegroundd`), `save` the `SaveImaged` of the uint8 mask. The previous path "
    "(`postprocessing_whole_volume`: `Invertd` of both softmax channels on the whole grid, then `AsDiscreted` argmax) "
    "runs on the same prediction in the first mode.\n"
)


def bench_e2e(args, cfg: dict, modes: List[Mode], device: torch.device, workdir: Path) -> None:
    data_dir = workdir / "e2e"
    (data_dir / "out").mkdir(parents=True, exist_ok=True)
    path = data_dir / "ct.nii.gz"
    nib.Nifti1Image(ct_phantom(args.raw_shape, args.raw_spacing), raw_affine(args.raw_spacing)).to_filename(path)
    item = {"image": str(path), "id": "ct", cfg["subgroup_key"]: cfg["subgroups"][1]}
    print(
        f"## End-to-end inference (`inference.json` pipeline, dMoE, {'x'.join(map(str, args.raw_shape))} CT at "
        f"{'x'.join(f'{s:g}' for s in args.raw_spacing)} mm as .nii.gz; roi {'x'.join(map(str, args.patch))}, "
        f"sw_batch_size {args.sw_batch_size}, overlap {args.sw_overlap}; {args.e2e_repeats} round(s))\n"
    )
    print(E2E_NOTE)
    lines, notes, first = [E2E_HEADER], [], None
    for mode in modes:
        parts, parser = e2e_parts(args, data_dir, device, mode)
        rounds, mem = [], PeakMemory(device)
        for r in range(args.e2e_repeats):
            with mem if r == 0 else contextlib.nullcontext():
                times, case, out = e2e_round(parts, item, mode, device, args)
            rounds.append(times)
            print(f"  [e2e {r + 1}/{args.e2e_repeats}] {mode.name}: {sum(times):.2f} s", file=sys.stderr, flush=True)
        med = [statistics.median(c) for c in zip(*rounds)]
        shape = "x".join(map(str, case["image"].shape[1:]))
        lines.append(e2e_row(mode.name, shape, med, mem.text()))
        if first is None:
            first = med
            notes.append(f"New path: {parts['post'].transforms[-2].last_path['pred']} inversion.")
            row, note = previous_path(parser, case, out, med, mode.name, shape)
            lines.append(row)
            notes.append(note)
    print("\n".join(lines + [""] + notes) + "\n")
    print(e2e_goals(first) + "\n", flush=True)


# -------------------------------------------------------------------------------------------------------- prep
#: the columns of the preprocessing table, and the transforms (MONAI's and the bundle's) timed in each
PREP_COLUMNS = {
    "load": ("LoadImaged", "FastLoadImaged", "LoadDicomSeriesd"),
    "orientation": ("Orientationd",),
    "spacing": ("Spacingd", "FastSpacingd"),
    "intensity": ("ScaleIntensityRanged", "FastScaleIntensityRanged"),
    "crop": ("CropForegroundd", "FastCropForegroundd"),
}
PREVIOUS, SHIPPED = "MONAI transforms (previous)", "inference.json (scripts.fast_preprocess)"
PREP_GOAL_S = 1.5


def inference_parser(files: Sequence[str], monai_classes: bool, overrides: Optional[dict] = None) -> ConfigParser:
    """``files`` (under configs/) stacked, as shipped or with each ``scripts.fast_preprocess`` class replaced by the
    MONAI class it stands in for (the previous preprocessing)."""
    from scripts.fast_preprocess import MONAI_EQUIVALENT

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update(overrides or {})
    if monai_classes:
        for item in [parser["loader"], *parser["preprocessing"]["transforms"]]:
            name = item.get("_target_", "").rsplit(".", 1)[-1] if isinstance(item, dict) else ""
            if name in MONAI_EQUIVALENT:
                item["_target_"] = MONAI_EQUIVALENT[name]
    return parser


def timed_preprocessing(pre, item: dict) -> Tuple[Dict[str, float], dict]:
    """Run the ``Compose`` ``pre`` on ``item`` transform by transform: (seconds per column of
    :data:`PREP_COLUMNS`, the rest under ``other``; the output)."""
    times = {k: 0.0 for k in (*PREP_COLUMNS, "other")}
    d = dict(item)
    for t in pre.transforms:
        column = next((k for k, names in PREP_COLUMNS.items() if type(t).__name__ in names), "other")
        t0 = time.perf_counter()
        d = t(d)
        times[column] += time.perf_counter() - t0
    return times, d


def image_agreement(a: Tensor, b: Tensor) -> str:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        return f"shapes differ ({list(a.shape)} vs {list(b.shape)})"
    diff = (a - b).abs()
    return f"{int((diff > 0).sum())} of {a.numel()} voxels differ (max |difference| {float(diff.max()):.3g})"


def same_records(a, b) -> bool:
    """The transform records of two images agree apart from the objects that made them (ids, class names)."""
    strip = lambda op: {k: v for k, v in op.items() if k not in ("id", "class", "extra_info")}  # noqa: E731
    ops = list(zip(a.applied_operations, b.applied_operations))
    return len(a.applied_operations) == len(b.applied_operations) and all(
        strip(x) == strip(y) and set(x.get("extra_info", {})) == set(y.get("extra_info", {})) for x, y in ops
    )


def prep_inputs(args, cfg: dict, workdir: Path) -> Dict[str, Tuple[List[str], dict, dict]]:
    """The CT as .nii.gz and as a DICOM series: {input: (config files, overrides, item)}."""
    from scripts.synthetic_dicom import write_ct_series

    data_dir = workdir / "prep"
    data_dir.mkdir(parents=True, exist_ok=True)
    ct = ct_phantom(args.raw_shape, args.raw_spacing)
    nifti = data_dir / "ct.nii.gz"
    nib.Nifti1Image(ct, raw_affine(args.raw_spacing)).to_filename(nifti)
    series = data_dir / "ct_series"
    write_ct_series(ct, raw_affine(args.raw_spacing), series, seed=0)
    stage = {cfg["subgroup_key"]: cfg["subgroups"][1]}
    return {
        "NIfTI (.nii.gz)": (["inference.json"], {}, {"image": str(nifti), "id": "ct", **stage}),
        f"DICOM series ({args.raw_shape[2]} files)": (
            ["inference.json", "inference_dicom.json"],
            {"input_dir": str(series)},
            {"image": str(series), "id": "ct", **stage},
        ),
    }


def bench_prep(args, cfg: dict, workdir: Path) -> None:
    """The preprocessing of the CT, step by step: MONAI's transforms against the shipped ones, NIfTI and DICOM."""
    inputs = prep_inputs(args, cfg, workdir)
    chains = {}
    for source, (files, overrides, item) in inputs.items():
        for path in (PREVIOUS, SHIPPED):
            parser = inference_parser(files, path == PREVIOUS, overrides)
            chains[(source, path)] = (parser.get_parsed_content("preprocessing"), item)
    rounds: Dict[Tuple[str, str], List[Dict[str, float]]] = {k: [] for k in chains}
    outputs = {}
    for r in range(args.prep_repeats):
        for key, (pre, item) in chains.items():  # interleaved: every chain sees the same machine load
            times, out = timed_preprocessing(pre, item)
            rounds[key].append(times)
            outputs[key] = out["image"]
            print(f"  [prep {r + 1}/{args.prep_repeats}] {key[0]}, {key[1]}: {sum(times.values()):.2f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(
        f"## Preprocessing (`inference.json` `preprocessing`: load, orientation, spacing to "
        f"{'x'.join(f'{s:g}' for s in cfg['spacing'])} mm, HU window, foreground crop; "
        f"{'x'.join(map(str, args.raw_shape))} CT at {'x'.join(f'{s:g}' for s in args.raw_spacing)} mm; median of "
        f"{args.prep_repeats} interleaved round(s))\n"
    )
    print(PREP_NOTE)
    cols = [*PREP_COLUMNS, "other"]
    head = " | ".join(f"{c} (s)" for c in cols)
    print(f"| input | transforms | {head} | total (s) | without load (s) | x previous |")
    print("|---" * (len(cols) + 5) + "|")
    med = {k: {c: statistics.median(t[c] for t in v) for c in cols} for k, v in rounds.items()}
    for (source, path), m in med.items():
        total = sum(m.values())
        prev = sum(med[(source, PREVIOUS)].values())
        print(f"| {source} | {path} | {' | '.join(f'{m[c]:.2f}' for c in cols)} | {total:.2f} "
              f"| {total - m['load']:.2f} | {total / prev:.2f} |")  # fmt: skip
    print()
    print("\n".join(prep_notes(inputs, med, outputs)) + "\n", flush=True)


def prep_notes(inputs: dict, med: dict, outputs: dict) -> List[str]:
    """The lines under the preprocessing table: the DICOM read, the outputs compared, the goal."""
    nifti, dicom = list(inputs)
    read, read_prev = med[(dicom, SHIPPED)]["load"], med[(dicom, PREVIOUS)]["load"]
    notes = [f"DICOM read (`LoadDicomSeriesd`, the `load` column of the DICOM rows): {read:.2f} s ({read_prev:.2f} s "
             "in the previous row: the same reader)."]  # fmt: skip
    for source in inputs:
        a, b = outputs[(source, SHIPPED)], outputs[(source, PREVIOUS)]
        notes.append(f"{source}, shipped vs previous: {image_agreement(a, b)}; transform records "
                     f"{'agree' if same_records(a, b) else 'DIFFER'}.")  # fmt: skip
    same_ct = image_agreement(outputs[(dicom, SHIPPED)], outputs[(nifti, SHIPPED)])
    notes.append(f"DICOM vs NIfTI (shipped): {same_ct} (the NIfTI header holds the affine in float32, the series its "
                 "geometry in decimal strings: the grids differ in rounding, not the CT).")  # fmt: skip
    n_total = sum(med[(nifti, SHIPPED)].values())
    d_total = sum(med[(dicom, SHIPPED)].values()) - med[(dicom, SHIPPED)]["load"]
    verdict = lambda s: "met" if s <= PREP_GOAL_S else "NOT met"  # noqa: E731
    notes.append(f"Goal (preprocessing <= {PREP_GOAL_S} s): NIfTI, load included, {n_total:.2f} s: {verdict(n_total)}; "
                 f"DICOM after the read {d_total:.2f} s: {verdict(d_total)}.")  # fmt: skip
    return notes


PREP_NOTE = (
    "`previous`: the same configs with MONAI's `LoadImaged`, `Spacingd`, `ScaleIntensityRanged` and `CropForegroundd`; "
    "`inference.json`: the bundle's stand-ins for them (`scripts/fast_preprocess.py`). `other`: case id, subgroup, "
    "`EnsureTyped`. For the DICOM series `load` is the read of the series (the same reader in both rows).\n"
)


# -------------------------------------------------------------------------------------------------------------- data
def _epochs(loader, n: int) -> List[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _batch in loader:
            pass
        out.append(time.perf_counter() - t0)
    return out


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def bench_data(args, cfg: dict, device: torch.device, workdir: Path, train_step_s: Optional[float]) -> None:
    from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, load_decathlon_datalist
    from monai.data.utils import json_hashing
    from monai.utils import set_determinism

    cohort = workdir / "cohort"
    synthetic.generate_cohort(cohort, n_cases=args.cases, seed=0, shape=tuple(args.data_shape))
    items = []
    for key in ("training", "validation", "testing"):
        items += load_decathlon_datalist(str(cohort / "datalist.json"), True, key, base_dir=str(cohort))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"dataset_dir": str(cohort), "patch_size": list(args.patch)})
    transform = parser.get_parsed_content("train#preprocessing")
    n, epochs, bs = len(items), args.epochs, cfg["batch_size"]

    if train_step_s is None:  # the training section did not run: time a few dMoE steps here
        patch = tuple(args.patch)
        b = bs * cfg["num_samples"]
        module, call = BASE.prepare(build_network(DMOE, cfg), device)
        x = torch.rand(b, 1, *patch, device=device)
        y = (torch.rand(b, 1, *patch, device=device) > 0.7).float()
        g = torch.zeros(b, dtype=torch.long, device=device)
        step = make_train_step(call, list(module.parameters()), x, y, g, BASE, cfg)
        step()
        train_step_s = statistics.median(interleaved({"dMoE step": step}, 3, 0, device)[0]["dMoE step"])
    train_rate = bs / train_step_s  # volumes per second the training step consumes

    def loader(ds):
        return DataLoader(ds, batch_size=bs, shuffle=False, num_workers=args.num_workers)

    rows = []
    set_determinism(0)
    t = _epochs(loader(Dataset(items, transform)), epochs)
    rows.append(("Dataset (no cache)", "-", t, "0"))
    set_determinism(0)
    before = rss_mib()
    t0 = time.perf_counter()
    ds = CacheDataset(items, transform, cache_rate=1.0, num_workers=args.num_workers, progress=False)
    build = time.perf_counter() - t0
    held = rss_mib() - before
    t = _epochs(loader(ds), epochs + 1)
    rows.append(("CacheDataset (cache_rate 1)", f"{build:.2f}", t[1:], f"{held:.0f}"))
    del ds
    set_determinism(0)
    cache_dir = workdir / "persistent_cache"
    ds = PersistentDataset(items, transform, cache_dir=cache_dir, hash_transform=json_hashing)
    t = _epochs(loader(ds), epochs + 1)
    disk = f"0 (disk {_dir_mib(cache_dir):.0f})"
    rows.append(("PersistentDataset (persistent_cache_dir)", f"{t[0]:.2f} (epoch 1)", t[1:], disk))
    print(
        f"## Data loading (`train#preprocessing` of train.json on {n} synthetic volumes of "
        f"{'x'.join(map(str, args.data_shape))}, batch_size {bs}, num_samples {cfg['num_samples']}, num_workers "
        f"{args.num_workers}; {epochs} epoch(s) timed)\n"
    )
    print(
        f"Training consumes {train_rate:.2f} volumes/s (dMoE, fp32 eager: {train_step_s:.3f} s per step of {bs} "
        f"volumes). With num_workers 0 loading and training alternate, so the last column is the share of a training "
        f"epoch spent loading.\n"
    )
    print("| dataset | cache build (s) | items/s | x training rate | memory held (MiB) | loading share |")
    print("|---|---|---|---|---|---|")
    for name, build_s, ts, held_s in rows:
        rate = n * len(ts) / sum(ts)
        share = (1 / rate) / (1 / rate + 1 / train_rate)
        print(f"| {name} | {build_s} | {rate:.1f} | {rate / train_rate:.1f} | {held_s} | {100 * share:.0f}% |")
    print(flush=True)


# -------------------------------------------------------------------------------------------------------------- main
def _ints(text: str) -> List[int]:
    return [int(v) for v in text.replace("x", ",").split(",")]


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.replace("x", ",").split(",")]


def load_cfg(profile: Optional[str] = None) -> dict:
    """The settings the benchmark uses, from train.json and inference.json, with ``configs/profiles/<profile>.json``
    stacked on both."""
    overlay = json.loads((CONFIGS / "profiles" / f"{profile}.json").read_text()) if profile else {}
    train = {**json.loads((CONFIGS / "train.json").read_text()), **overlay}
    infer = {**json.loads((CONFIGS / "inference.json").read_text()), **overlay}
    cfg = {k: train[k] for k in ("patch_size", "batch_size", "num_samples", "features", "num_experts", "top_k")}
    cfg.update({k: train[k] for k in ("subgroups", "subgroup_key", "spacing", "hu_window", "learning_rate")})
    cfg["optimizer"] = train["optimizer"]
    cfg["sw_batch_size"], cfg["sw_overlap"] = infer["sw_batch_size"], infer["sw_overlap"]
    cfg["amp"] = bool(train["amp"])
    return cfg


def parse_args(argv: Optional[Sequence[str]], cfg: dict) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and one round per section (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (falls back to cpu without CUDA)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--channels-last", action="store_true", help="add the channels_last_3d mode")
    p.add_argument("--amp", action="store_true", help="add the bf16 autocast mode (CUDA only)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile mode")
    p.add_argument("--repeats", type=int, default=None, help="timed training-step rounds (default 7, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training rounds (default 1, 2 with --compile)")
    p.add_argument("--infer-repeats", type=int, default=None, help="sliding-window rounds (default 3, quick 1)")
    p.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end rounds (default 1)")
    p.add_argument("--prep-repeats", type=int, default=None, help="preprocessing rounds (default 3, quick 1)")
    p.add_argument("--sw-batch-size", type=int, default=cfg["sw_batch_size"], help="default: inference.json")
    p.add_argument("--sw-overlap", type=float, default=cfg["sw_overlap"], help="default: inference.json")
    p.add_argument("--patch", type=_ints, default=None, help="patch / roi size, default train.json patch_size")
    p.add_argument("--raw-shape", type=_ints, default=None, help="raw CT voxels (default 512x512x160, quick 96x96x40)")
    p.add_argument("--raw-spacing", type=_floats, default=[0.98, 0.98, 2.5], help="raw CT spacing mm (0.98x0.98x2.5)")
    p.add_argument("--cases", type=int, default=None, help="synthetic volumes for the data section (default 12)")
    p.add_argument("--data-shape", type=_ints, default=None, help="their shape (default 96x96x48, quick 64x64x32)")
    p.add_argument("--epochs", type=int, default=None, help="timed data epochs (default 3, quick 1)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers in the data section (default 0)")
    p.add_argument(
        "--profile", choices=PROFILES, default=None, help="stack configs/profiles/<name>.json on the configs"
    )
    p.add_argument("--short", action="store_true", help="with --profile: only its training step, 2 steps (CPU check)")
    args = p.parse_args(argv)
    if args.short and not args.profile:
        p.error("--short measures a profile: give --profile too")
    args.profile_file = CONFIGS / "profiles" / f"{args.profile}.json" if args.profile else None
    if args.short:
        args.sections, args.repeats, args.warmup = "train", args.repeats or 1, 1 if args.warmup is None else args.warmup
    q = args.quick
    args.repeats = args.repeats or (1 if q else 7)
    args.infer_repeats = args.infer_repeats or (1 if q else 3)
    args.prep_repeats = args.prep_repeats or (1 if q else 3)
    args.patch = args.patch or list(cfg["patch_size"])
    args.raw_shape = args.raw_shape or ([96, 96, 40] if q else [512, 512, 160])
    args.cases = args.cases or (4 if q else 12)
    args.data_shape = args.data_shape or ([64, 64, 32] if q else [96, 96, 48])
    args.epochs = args.epochs or (1 if q else 3)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {SECTIONS}")
    for name in ("patch", "raw_shape", "data_shape", "raw_spacing"):
        if len(getattr(args, name)) != 3:
            p.error(f"--{name.replace('_', '-')} needs three values (X,Y,Z)")
    return args


def profile_arg(argv: Optional[Sequence[str]]) -> Optional[str]:
    """The value of ``--profile`` (read before the full parse: the profile sets the other options' defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--profile", choices=PROFILES, default=None)
    return pre.parse_known_args(argv)[0].profile


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = load_cfg(profile_arg(argv))
    args = parse_args(argv, cfg)
    args.amp = args.amp or cfg["amp"]  # a profile with amp adds the bf16 mode (CUDA only)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("note: --device cuda requested but CUDA is not available; running on the CPU.\n")
        device = torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    modes = build_modes(args, device)
    print("# FairDRO bundle speed benchmark\n")
    print("\n".join(machine_lines(device)))
    print(f"- command: `python bench/bench_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"- modes: {', '.join(m.name for m in modes)}")
    if args.profile:
        print(f"- profile: `configs/profiles/{args.profile}.json` ({', '.join(f'{k} {cfg[k]}' for k in PROFILE_KEYS)})")
    print(flush=True)
    t_start = time.perf_counter()
    results: Dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        workdir = Path(tmp)
        if "train" in args.sections:
            results.update(bench_train(args, cfg, modes, device))
        if "infer" in args.sections:
            bench_infer(args, cfg, modes, device)
        if "e2e" in args.sections:
            bench_e2e(args, cfg, modes, device, workdir)
        if "prep" in args.sections:
            bench_prep(args, cfg, workdir)
        if "data" in args.sections:
            bench_data(args, cfg, device, workdir, results.get("dmoe_step_s"))
    print(f"Total benchmark time {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
