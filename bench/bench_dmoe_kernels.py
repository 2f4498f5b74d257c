"""Time the native dMoE CPU kernels alone, layer by layer, and check their bits against a saved run.

The default network (f = 8) at a 64x64x32 patch, batch 2, has five dMoE layers: C = 8 at 16,384 and 2,048 voxels per
case, C = 16 at 256, C = 32 at 32 and C = 64 at 4 (hidden 4C, top-2 of 8 experts). For each layer this prints the
median time of the experts' forward (with the dropout of a training step) and backward, and of the router's forward
(with a noise offset) and backward, on fixed random inputs, and a total per training step; then the layer's random
numbers (router noise, dropout draws) drawn by torch and by the kernels' generator (:func:`scripts.dmoe_native.randn`,
:func:`scripts.dmoe_native.random64`: the same values).

``--save FILE`` writes every output and gradient; ``--check FILE`` compares them with a saved file bit for bit (a
kernel change that must keep the committed runs' results: save with the old sources, check with the new; the
thread count must match, as the parameter gradients are summed per thread).

Usage::

    python bench/bench_dmoe_kernels.py                 # 1 thread, thread CPU time
    python bench/bench_dmoe_kernels.py --threads 2     # wall time
    python bench/bench_dmoe_kernels.py --save /tmp/before.pt    # then, after a change: --check /tmp/before.pt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dmoe import in_blocks  # noqa: E402
from scripts import dmoe_native  # noqa: E402
from scripts.dmoe import lane_draws  # noqa: E402  (also sets the process's malloc thresholds, as in training)
from scripts.dmoe_native import lane_threshold  # noqa: E402

#: (channels, voxels per case) of the default network's dMoE layers at 64x64x32
LAYERS = [(8, 16384), (8, 2048), (16, 256), (32, 32), (64, 4)]
B, K, E, P = 2, 2, 8, 0.1  # batch, experts per voxel, experts, dropout


def layer_inputs(c: int, n: int) -> Dict[str, torch.Tensor]:
    """Fixed random inputs of one layer (seeded by its size)."""
    g = torch.Generator().manual_seed(c * 1000 + n)
    hid = 4 * c
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * n)]).view(B, n, K)
    torch.manual_seed(c)
    return {
        "h": torch.randn(B, c, n, generator=g),
        "w": torch.rand(B, K, n, generator=g),
        "e": experts.permute(0, 2, 1).contiguous(),
        "w1": torch.randn(E, c, hid, generator=g) * 0.3,
        "b1": torch.randn(E, hid, generator=g) * 0.1,
        "w2": torch.randn(E, hid, c, generator=g) * 0.3,
        "b2": torch.randn(E, c, generator=g) * 0.1,
        "gy": torch.randn(B, c, n, generator=g),
        "router_w": torch.randn(4, c, E, generator=g),
        "offset": torch.randn(B, E, n, generator=g),
        "gp": torch.randn(B, K, n, generator=g),
        "draws": lane_draws(B * c * n, torch.device("cpu")),
    }


def layer_calls(x: Dict[str, torch.Tensor]) -> Dict[str, Callable[[], list]]:
    """The four kernel calls of a layer; each returns its outputs."""
    ops = torch.ops.fairdro_dmoe
    drop = (x["draws"], lane_threshold(P), 1.0 / (1.0 - P))
    params = (x["w1"], x["b1"], x["w2"], x["b2"])
    sub = torch.tensor([0, 2])
    y, outs = ops.experts_forward(x["h"], x["w"], x["e"], *params, False, *drop, True)
    gates, chosen = ops.router_forward(x["h"], x["router_w"], sub, x["offset"], K)
    return {
        "experts fwd": lambda: list(ops.experts_forward(x["h"], x["w"], x["e"], *params, False, *drop, True)),
        "experts bwd": lambda: list(ops.experts_backward(x["gy"], x["h"], x["w"], x["e"], *params, False, *drop, outs)),
        "router fwd": lambda: list(ops.router_forward(x["h"], x["router_w"], sub, x["offset"], K)),
        "router bwd": lambda: list(ops.router_backward(x["gp"], x["h"], x["router_w"], sub, chosen, gates, True)),
    }


def median_time(fn: Callable[[], list], repeats: int, clock: Callable[[], float]) -> float:
    """Median of ``repeats`` timed calls after an untimed one (one block of ``bench_dmoe.in_blocks``)."""
    return in_blocks({"call": fn}, 1, repeats, clock)["call"][0]


def timed_rows(calls: Dict[Tuple[int, int], Dict[str, Callable[[], object]]], repeats: int, clock) -> List[str]:
    """A table's rows: for each layer (C, voxels) the median ms of each of its calls, and a total row."""
    rows, total = [], {}
    for (c, n), fns in calls.items():
        ms = {name: median_time(fn, repeats, clock) * 1e3 for name, fn in fns.items()}
        rows.append(f"| {c} | {n} | " + " | ".join(f"{v:.3f}" for v in ms.values()) + " |")
        total = {k: total.get(k, 0.0) + v for k, v in ms.items()}
    return rows + ["| all | | " + " | ".join(f"{v:.3f}" for v in total.values()) + " |"]


def run(repeats: int, clock: Callable[[], float]) -> Tuple[List[str], Dict[str, List[torch.Tensor]]]:
    """The kernel table's rows and every call's outputs, keyed 'C=<c> N=<n> <call>'."""
    calls = {(c, n): layer_calls(layer_inputs(c, n)) for c, n in LAYERS}
    rows = timed_rows(calls, repeats, clock)
    outputs = {f"C={c} N={n} {name}": fn() for (c, n), fns in calls.items() for name, fn in fns.items()}
    return rows, outputs


def draw_calls(c: int, n: int) -> Dict[str, Callable[[], object]]:
    """A layer's random numbers in a training step, drawn by torch and by the kernels (the same values): the router
    noise (B, E, N) and the dropout draws of its B*C*N elements."""
    cpu = torch.device("cpu")
    return {
        "noise, torch": lambda: torch.randn(B, E, n),
        "noise, kernels": lambda: dmoe_native.randn((B, E, n), torch.float32, cpu),
        "dropout draws, torch": lambda: lane_draws(B * c * n, cpu),
        "dropout draws, kernels": lambda: lane_draws(B * c * n, cpu, native=True),
    }


def compare(outputs: Dict[str, List[torch.Tensor]], path: Path) -> List[str]:
    """The calls whose outputs differ from the saved ones (bit for bit)."""
    saved = torch.load(path)
    return [k for k in saved if k not in outputs or not all(torch.equal(a, b) for a, b in zip(saved[k], outputs[k]))]


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: thread CPU time, else wall time)")
    parser.add_argument("--repeats", type=int, default=31, help="timed calls per kernel (median)")
    parser.add_argument("--save", type=Path, help="write every output and gradient to this file")
    parser.add_argument("--check", type=Path, help="compare every output and gradient with this saved file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault(dmoe_native.ENV_VAR, "1")
    dmoe_native.available()
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    kind = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {kind}, flags {' '.join(dmoe_native.cflags())}")
    print(f"median ms of {args.repeats} calls, batch {B}, top-{K} of {E} experts, dropout {P}\n")
    print("| C | voxels per case | experts fwd | experts bwd | router fwd | router bwd |")
    print("|---|---|---|---|---|---|")
    rows, outputs = run(args.repeats, clock)
    print("\n".join(rows))
    print("\nrandom numbers of a training step (the same values either way; scripts.dmoe_native.randn, random64)\n")
    print("| C | voxels per case | noise, torch | noise, kernels | dropout draws, torch | dropout draws, kernels |")
    print("|---|---|---|---|---|---|")
    print("\n".join(timed_rows({(c, n): draw_calls(c, n) for c, n in LAYERS}, args.repeats, clock)))
    if args.save:
        torch.save(outputs, args.save)
        print(f"\nsaved every output to {args.save}")
    if args.check:
        differ = compare(outputs, args.check)
        print(f"\nagainst {args.check}: " + ("the same bits" if not differ else "DIFFERENT: " + ", ".join(differ)))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
