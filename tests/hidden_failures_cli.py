"""``bench/hidden_failures.py`` run the way a user runs it, for the smoke tests of its parts: a subprocess on the
smoke bench, one thread, normal priority, that must succeed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_smoke(work: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python bench/hidden_failures.py ARGS --bench smoke --work WORK --no-nice``; fails the test on a non-zero exit
    (with the output), else returns the finished process (results under ``WORK/smoke_results``)."""
    cmd = [sys.executable, str(REPO / "bench" / "hidden_failures.py"), *args, "--bench", "smoke", "--work", str(work),
           "--no-nice"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res
