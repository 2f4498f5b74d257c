"""``scripts.allocator``: glibc's malloc keeps freed memory for reuse (measured by page faults in a fresh process),
the opt-out and the user's own settings are respected, and other C libraries are left alone."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from scripts import allocator

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a fresh process: training steps of the backbone network (64x64x32, batch 2, one thread); prints the minor page
# faults per step after four warm-up steps
_FAULTS = """
import resource, sys
sys.path.insert(0, {bundle!r})
import torch
from monai.losses import DiceCELoss
from scripts.dmoe_unet import DMoEResUNet
torch.set_num_threads(1)
torch.manual_seed(0)
net = DMoEResUNet(features=8, use_dmoe=False)
x, y = torch.rand(2, 1, 64, 64, 32), (torch.rand(2, 1, 64, 64, 32) > 0.7).float()
opt, loss_fn = torch.optim.AdamW(net.parameters()), DiceCELoss(to_onehot_y=True, softmax=True)
for i in range(8):
    if i == 4:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad()
    loss_fn(net(x), y).backward()
    opt.step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _faults_per_step(**env: str) -> float:
    code = _FAULTS.format(bundle=str(BUNDLE))
    drop = allocator.USER_SETTINGS + ("GLIBC_TUNABLES", allocator.ENV_VAR)
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_training_steps_reuse_freed_memory():
    # importing the network (scripts.dmoe) applies the setting: the steps reuse the heap; with the opt-out, glibc's
    # defaults return the large tensors to the system and every step faults their pages in again (measured: 64-640
    # faults per step against 1,700-4,700; the heap still grows now and then on a shared machine)
    kept, default = _faults_per_step(), _faults_per_step(**{allocator.ENV_VAR: "1"})
    assert kept < 1000
    assert default > 2 * kept  # measured here: 0-640 against 1,700-4,700


@pytest.fixture
def fresh(monkeypatch):
    """The module as if not applied yet in this process (the real mallopt is replaced: nothing is changed)."""
    monkeypatch.setattr(allocator, "_applied", None)
    for name in allocator.USER_SETTINGS + ("GLIBC_TUNABLES", allocator.ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    calls = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator, "_glibc", lambda: FakeLibc())
    return calls


def test_sets_both_thresholds_once(fresh):
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert fresh == [(-3, 32 * 2**20), (-1, 64 * 2**20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)


@pytest.mark.parametrize(
    "name, value",
    [
        ("FAIRDRO_DEFAULT_MALLOC", "1"),
        ("MALLOC_TRIM_THRESHOLD_", "1000000"),
        ("MALLOC_MMAP_THRESHOLD_", "1000000"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000"),
    ],
)
def test_opt_out_and_user_settings_are_kept(fresh, monkeypatch, caplog, name, value):
    monkeypatch.setenv(name, value)
    with caplog.at_level(logging.DEBUG, logger="scripts.allocator"):
        assert allocator.keep_freed_memory() is False
    assert fresh == []
    assert name in caplog.text


def test_other_tunables_do_not_block(fresh, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert allocator.keep_freed_memory() is True


def test_no_glibc_is_a_logged_no_op(fresh, monkeypatch, caplog):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with caplog.at_level(logging.DEBUG, logger="scripts.allocator"):
        assert allocator.keep_freed_memory() is False
    assert "not glibc" in caplog.text


def test_refused_thresholds_are_reported(fresh, monkeypatch, caplog):
    class Refusing:
        def mallopt(self, param: int, value: int) -> int:
            return 0

    monkeypatch.setattr(allocator, "_glibc", lambda: Refusing())
    with caplog.at_level(logging.DEBUG, logger="scripts.allocator"):
        assert allocator.keep_freed_memory() is False
    assert "refused" in caplog.text
