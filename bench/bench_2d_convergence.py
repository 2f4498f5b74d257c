"""Wall time of one 2D training run to convergence, next to a 3D run of the committed fairness ablation.

Generates the synthetic 2D cohort (64x64, ``--n-cases`` split 0.6/0.2/0.2: 999 training images for 1667), trains
the default FairDRO configuration with ``configs/profiles/2d.json`` for ``--epochs`` epochs with validation after
every epoch, and reads the validation mean Dice curve from the log. The run counts as converged when the curve
varies by at most ``--flat`` (max - min) over the last quarter of the epochs. The 3D reference is the committed
``bench/results/ablation/<run>/run.json`` (6 epochs, 240 training cases at 64x64x32). Prints a Markdown table::

    python bench/bench_2d_convergence.py [--epochs 40] [--n-cases 1667] [--work .bench_work/conv2d]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import runcache

REPO = runcache.REPO
ABLATION_RUN = REPO / "bench" / "results" / "ablation" / "fairdro_necrotic_l3_s0" / "run.json"
CONFIGS = ["bundle/configs/train.json", "bundle/configs/profiles/2d.json"]


def last_quarter_range(curve: list[float]) -> float:
    """max - min of the last quarter (at least one value) of ``curve``."""
    if not curve:
        raise ValueError("the training log holds no validation mean Dice.")
    tail = curve[-max(1, math.ceil(len(curve) / 4)) :]
    return max(tail) - min(tail)


def train_2d(work: Path, n_cases: int, epochs: int, seed: int) -> tuple[float, list[float], int]:
    """Generate the cohort and train once; returns (wall seconds of training, validation curve, training size)."""
    data, run = work / "data", work / "run"
    gen = [sys.executable, str(REPO / "bundle/scripts/synthetic.py"), "--spatial-dims", "2", "--out", str(data),
           "--n-cases", str(n_cases), "--seed", str(seed)]  # fmt: skip
    subprocess.run(gen, check=True, stdout=subprocess.DEVNULL)
    n_train = len(json.loads((data / "datalist.json").read_text())["training"])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(CONFIGS),
           "--dataset_dir", str(data), "--output_dir", str(run), "--ckpt_dir", str(run / "models"),
           "--epochs", str(epochs), "--val_interval", "1", "--seed", str(seed)]  # fmt: skip
    t0 = time.perf_counter()
    log = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    curve = list(runcache.parse_train_log(log.stdout + log.stderr)["val_mean_dice"].values())
    return wall, curve, n_train


def table(wall: float, curve: list[float], n_train: int, flat: float) -> str:
    ref = json.loads(ABLATION_RUN.read_text())
    spread = last_quarter_range(curve)
    n_3d = round(ref["cohort"]["n_cases"] * ref["cohort"]["split"][0])
    rows = [
        "| run | training cases | epochs | training wall time | final val mean Dice | last-quarter range |",
        "|---|---|---|---|---|---|",
        f"| 2D FairDRO, 64x64, profiles/2d.json | {n_train} | {len(curve)} | {wall / 60:.1f} min | {curve[-1]:.3f} | "
        f"{spread:.4f} ({'converged' if spread <= flat else 'not converged'}: <= {flat}) |",
        f"| 3D FairDRO, 64x64x32 (committed ablation run {ABLATION_RUN.parent.name}) | {n_3d} | "
        f"{ref['overrides']['epochs']} | {ref['train_s'] / 60:.1f} min | - | not run to convergence |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--n-cases", type=int, default=1667)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flat", type=float, default=0.005, help="largest last-quarter range that counts as flat")
    parser.add_argument("--work", type=Path, default=REPO / ".bench_work" / "conv2d")
    args = parser.parse_args(argv)
    wall, curve, n_train = train_2d(args.work, args.n_cases, args.epochs, args.seed)
    print(table(wall, curve, n_train, args.flat))
    print("\nvalidation mean Dice per epoch: " + " ".join(f"{v:.4f}" for v in curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
