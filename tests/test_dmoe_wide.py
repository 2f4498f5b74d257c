"""The native dMoE kernels' compile flags by CPU level, and the same bits from a build for a lower level.

On a CPU where torch runs AVX-512 code the kernels are built with AVX-512 (16-float vectors for the hidden layer of
C = 8, ``scripts/dmoe_cpu.cpp``), elsewhere with AVX2 or plain flags. The vector width must not change a result: a
child process built for the level below (``ATEN_CPU_CAPABILITY``) must give bitwise the outputs and gradients of this
process's build where both contract multiply-adds (AVX2 and AVX-512), and in every build the register code must give
the bits of the per-pair code; the kernels' random draws must equal torch's there as here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import needs_tool
from dmoe_kernel_cases import BUILD_CASES, build_case_outputs
from scripts import dmoe_native
from scripts.dmoe_native import AVX2_FLAGS, AVX512_FLAGS, CFLAGS, cflags

HERE = Path(__file__).resolve().parent
#: the level a child builds for: the one below this machine's (torch's names; ATEN_CPU_CAPABILITY takes lower case)
LOWER = {"AVX512": "AVX2", "AVX2": "DEFAULT", "DEFAULT": "DEFAULT"}
#: levels whose builds contract a * b + c into one fused multiply-add (so they round alike)
FMA_LEVELS = {"AVX2", "AVX512"}


def test_flags_follow_the_cpu_level():
    assert cflags("DEFAULT") == CFLAGS
    assert cflags("AVX2") == CFLAGS + AVX2_FLAGS
    assert cflags("AVX512") == CFLAGS + AVX2_FLAGS + AVX512_FLAGS
    assert {"-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"} <= set(AVX512_FLAGS)
    assert not any("avx512" in f for f in cflags("AVX2"))


def test_each_level_gets_its_own_build(monkeypatch):
    names = set()
    for level in ("DEFAULT", "AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda level=level: level)
        names.add(dmoe_native.build_name())
    assert len(names) == 3


@needs_tool("c++")
def test_a_build_for_the_lower_level_gives_the_same_bits(tmp_path, monkeypatch):
    monkeypatch.setenv(dmoe_native.ENV_VAR, "1")
    assert dmoe_native.available()
    here = torch.backends.cpu.get_cpu_capability()
    lower = LOWER[here]
    out = tmp_path / "child.pt"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=lower.lower(), PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run(
        [sys.executable, str(HERE / "dmoe_kernel_cases.py"), str(out)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    child = torch.load(out)
    assert child["level"] == lower and child["flags"] == cflags(lower)
    # the kernels' random draws equal torch's at the lower level too (torch's AVX2 Box-Muller there; the plain build
    # has no Box-Muller of its own and leaves the noise to torch)
    assert child["rng"] == {"normal": lower in FMA_LEVELS, "random64": True}
    mine = build_case_outputs()
    for case, (fast, same), (child_fast, child_same) in zip(BUILD_CASES, mine, child["results"]):
        assert same and child_same, f"register code != per-pair code for {case}"
        if here in FMA_LEVELS and lower in FMA_LEVELS:
            for a, b in zip(fast, child_fast):
                assert torch.equal(a, b), f"{here} and {lower} builds differ for {case}"
