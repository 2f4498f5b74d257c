"""Small helpers shared by the end-to-end check scripts and benchmarks (tools/, bench/bench_pacs.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checks:
    """PASS/FAIL lines, remembering the failures."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        log(("PASS " if ok else "FAIL ") + what)
        if not ok:
            self.failures.append(what)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def bundle_dicom_inference(series: Path, out: Path, subgroup: str | None) -> np.ndarray:
    """The documented DICOM inference command on one series; returns its NIfTI mask on the CT grid."""
    configs = REPO / "bundle" / "configs"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
        f"['{configs / 'inference.json'}','{configs / 'inference_dicom.json'}']",
        "--input_dir", str(series), "--output_dir", str(out), "--subgroup", repr(subgroup),
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    (nifti,) = out.glob("*_seg.nii.gz")
    return np.asarray(nib.load(nifti).dataobj) > 0
