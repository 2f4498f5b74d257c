"""``bench/bench_dmoe_kernels.py``: its table has a row per dMoE layer and a total, and its bit check passes against
its own saved outputs and fails against changed ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from conftest import needs_tool

pytestmark = needs_tool("c++")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_dmoe_kernels.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dmoe_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_save_and_check(tmp_path, capsys):
    bench = _bench()
    saved = tmp_path / "outputs.pt"
    assert bench.main(["--repeats", "1", "--save", str(saved)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 2 * (1 + len(bench.LAYERS) + 1)  # kernels, random numbers: header, per layer, the total
    assert table[len(table) // 2 - 1].startswith("| all |") and table[-1].startswith("| all |")
    assert "noise, kernels" in table[len(table) // 2]
    assert bench.main(["--repeats", "1", "--check", str(saved)]) == 0
    outputs = torch.load(saved)
    key = next(iter(outputs))
    outputs[key][0] = outputs[key][0] + 1.0  # a changed kernel output must be reported
    torch.save(outputs, saved)
    assert bench.main(["--repeats", "1", "--check", str(saved)]) == 1
    assert key in capsys.readouterr().out
