"""Benchmark the dMoE overhead: plain backbone vs dMoE with dense, sparse and auto (default) expert dispatch, and the
default on the Python paths the native CPU kernels (``scripts/dmoe_cpu.cpp``) replaced: the fused sparse node
(``scripts/dmoe_kernels.py``) and, before it, the per-expert autograd path, to compare in the same run.

On the CPU, ``sparse`` and ``auto`` run the native kernels; the benchmark requires them (``FAIRDRO_DMOE_NATIVE=1``
unless set otherwise), so it never times the fallback by mistake.

For each setting it times a training step (forward + backward + AdamW step, batch 2, MONAI DiceCELoss, subgroups
[0, 2]) and an eval-mode forward (batch 2, inference mode) of each network, interleaving the repeats (round-robin)
so that all of them see the same machine load, and prints a markdown table of medians and the dMoE/backbone ratios
(ratio of medians; in brackets the median of the per-round ratios, more robust on a shared machine).

Usage::

    python bench/bench_dmoe.py            # f=8 at 64x64x32 and 96x96x48, 2 threads
    python bench/bench_dmoe.py --quick    # 64x64x32 only, few repeats
    python bench/bench_dmoe.py --f24      # also f=24 at 64x64x64
    python bench/bench_dmoe.py --f32      # also f=32 at 128x128x64, the clinical profile's network and patch
    python bench/bench_dmoe.py --threads 1 --cpu-time   # CPU time of one thread: stable on a shared machine
    python bench/bench_dmoe.py --device cuda --amp      # on a GPU, bf16 autocast (the GPU goal: <= 1.2x)

Note: 96x96x48 is padded internally to 96x96x64 (the network needs multiples of 32).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from monai.losses import DiceCELoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts import dmoe_native  # noqa: E402
from scripts.dmoe import ExpertBank  # noqa: E402
from scripts.dmoe_unet import DMoEResUNet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import sync  # noqa: E402  (waits for queued CUDA work; a no-op on the CPU)

VARIANTS: Dict[str, dict] = {
    "backbone": {"use_dmoe": False},
    "dmoe dense": {"use_dmoe": True, "dispatch": "dense"},
    "dmoe sparse": {"use_dmoe": True, "dispatch": "sparse"},
    "dmoe auto (default)": {"use_dmoe": True, "dispatch": "auto"},
    "dmoe auto, Python fused node (previous)": {"use_dmoe": True, "dispatch": "auto", "native": False},
    "dmoe auto, Python unfused (before)": {"use_dmoe": True, "dispatch": "auto", "native": False, "unfused": True},
}


def build(features: int, kw: dict) -> DMoEResUNet:
    """The network of a variant. ``native: False`` turns the native CPU kernels off (the Python paths, as before
    them); ``unfused`` also swaps the fused sparse node for the per-expert autograd path (the eager path before
    ``scripts/dmoe_kernels.py``; TorchScript still uses it)."""
    kw = dict(kw)
    unfused, native = kw.pop("unfused", False), kw.pop("native", True)
    net = DMoEResUNet(features=features, num_subgroups=4, **kw)
    for layer in net.moe_layers().values():
        layer.native = native
        if unfused:
            layer.experts.forward_fused = _unfused(layer.experts)
    return net


def _unfused(bank: ExpertBank) -> Callable[..., torch.Tensor]:
    return lambda h, weights, experts, drop_zero=False: bank.forward_tokens(h, weights, experts, False, drop_zero)


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``amp``, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def make_train_step(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, amp: bool = False
) -> Callable[[], float]:
    """A closure running one forward + backward + AdamW step of ``net`` on (x, y, g); returns the loss."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step() -> float:
        net.train()
        opt.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            loss = loss_fn(net(x, g).float(), y)
        loss.backward()
        opt.step()
        sync(x.device)
        return loss.item()

    return step


def make_infer(net: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    """A closure running one eval-mode forward of ``net`` without autograd."""

    def infer() -> None:
        net.eval()
        with torch.inference_mode(), autocast(x.device, amp):
            net(x, g)
        sync(x.device)

    return infer


def interleaved(
    fns: Dict[str, Callable[[], None]], repeats: int, warmup: int, clock: Callable[[], float] = time.perf_counter
) -> Dict[str, List[float]]:
    """Time every function ``repeats`` times, round-robin, after ``warmup`` untimed rounds."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            dt = clock() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def summarize(times: Dict[str, List[float]], base: str = "backbone") -> Dict[str, Tuple[float, float, float]]:
    """{name: (median s, ratio of medians to ``base``, median of per-round ratios)}."""
    med_base = statistics.median(times[base])
    out = {}
    for name, ts in times.items():
        per_round = [t / b for t, b in zip(ts, times[base])]
        out[name] = (statistics.median(ts), statistics.median(ts) / med_base, statistics.median(per_round))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64x32 only, 3 repeats")
    parser.add_argument("--f24", action="store_true", help="also run f=24 at 64x64x64")
    parser.add_argument("--f32", action="store_true", help="also run f=32 at 128x128x64 (configs/profiles/gpu.json)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per setting (default 15, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="with --threads 1: time the thread's CPU time instead of wall time (robust on a shared machine)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for every network")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.cpu_time and device.type != "cpu":
        parser.error("--cpu-time measures CPU threads: it needs --device cpu")
    torch.set_num_threads(args.threads)
    os.environ.setdefault(dmoe_native.ENV_VAR, "1")  # time the native kernels, not a silent fallback
    native = device.type == "cpu" and dmoe_native.available()
    clock = time.perf_counter
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time needs --threads 1 (worker threads would not be counted)")
        clock = time.thread_time
    repeats = args.repeats or (3 if args.quick else 15)
    settings: List[Tuple[int, Tuple[int, int, int]]] = [(8, (64, 64, 32))]
    if not args.quick:
        settings.append((8, (96, 96, 48)))
    if args.f24:
        settings.append((24, (64, 64, 64)))
    if args.f32:
        settings.append((32, (128, 128, 64)))

    kind = "thread CPU time" if args.cpu_time else "wall time"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 autocast" if args.amp else "fp32"
    kernels = "native CPU kernels on" if native else "native CPU kernels off"
    print(
        f"torch {torch.__version__}, {where}, {precision}, {kind}, batch 2, {repeats} interleaved rounds, {kernels}\n"
    )
    print("| f | patch | network | train step (s) | x backbone | eval fwd (s) | x backbone |")
    print("|---|---|---|---|---|---|---|")
    for f, patch in settings:
        torch.manual_seed(0)
        x = torch.rand(2, 1, *patch, device=device)
        y = (torch.rand(2, 1, *patch, device=device) > 0.7).float()
        g = torch.tensor([0, 2], device=device)
        nets = {}
        for name, kw in VARIANTS.items():
            torch.manual_seed(0)
            nets[name] = build(f, kw).to(device)
        steps = {k: make_train_step(n, x, y, g, args.amp) for k, n in nets.items()}
        train = summarize(interleaved(steps, repeats, warmup=1, clock=clock))
        infers = {k: make_infer(n, x, g, args.amp) for k, n in nets.items()}
        infer = summarize(interleaved(infers, repeats, warmup=1, clock=clock))
        for name in VARIANTS:
            tr, ti = train[name], infer[name]
            print(
                f"| {f} | {'x'.join(map(str, patch))} | {name} | {tr[0]:.3f} | {tr[1]:.2f} ({tr[2]:.2f}) "
                f"| {ti[0]:.3f} | {ti[1]:.2f} ({ti[2]:.2f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
