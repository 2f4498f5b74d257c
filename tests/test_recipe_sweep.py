"""The recipe sweep (bench/recipe_sweep.py): its choice rule, its validation summary and its two steps, no training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import recipe_sweep as rs  # noqa: E402
import runcache  # noqa: E402

LOG = (
    "INFO Epoch[1] Metrics -- val_mean_dice: 0.5000 val_worst_group_dice: 0.3000 val_worst_group_cvar: 0.2000\n"
    "INFO Epoch[1] Metrics -- dro_ess_frac: 1.0000 dro_lam: 0.0000\n"
    "INFO Epoch[2] Metrics -- val_mean_dice: 0.7000 val_worst_group_dice: 0.6000 val_worst_group_cvar: 0.2500\n"
    "INFO Epoch[2] Metrics -- dro_ess_frac: 0.5200 dro_lam: 0.3000\n"
    "INFO Epoch[3] Metrics -- val_mean_dice: 0.6900 val_worst_group_dice: 0.6200 val_worst_group_cvar: 0.2400\n"
    "INFO Epoch[3] Metrics -- dro_ess_frac: 0.6100 dro_lam: 0.2000\n"
)


def write_run(run_dir: Path, worst: float, minority: float, log: str = LOG) -> Path:
    """A finished run folder with a training log and a validation evaluation."""
    (run_dir / "validation").mkdir(parents=True)
    (run_dir / "train_log.json").write_text(json.dumps(runcache.parse_train_log(log)))
    stage = {
        "dice": {"dice_all": 0.8, "worst_group_dice": worst, "es_dice": 0.7, "worst_group_cvar": 0.5},
        "minority": {"overall": {"minority_dice": minority, "minority_failure_rate": 0.1}, "groups": {}},
    }
    (run_dir / "validation" / "metrics.json").write_text(json.dumps({"groupings": {"stage": stage}}))
    return run_dir


def test_summarize_reads_validation_and_the_log(tmp_path):
    s = rs.summarize(write_run(tmp_path / "r", 0.66, 0.55))
    assert (s["mean_dice"], s["worst_group_dice"], s["minority_dice"]) == (0.8, 0.66, 0.55)
    assert s["lowest_ess_frac"] == 0.52  # the minimum over every epoch of the log
    assert s["val_curve"] == {"1": 0.5, "2": 0.7, "3": 0.69}
    assert s["selected_epoch"] == {"val_mean_dice": 2, "val_worst_group_dice": 3, "val_worst_group_cvar": 2,
                                   "last": 3}  # fmt: skip


def setting(apply: str, ess: float) -> dict:
    return {"dro#apply": apply, "dro#min_ess": ess}


@pytest.mark.parametrize(
    "numbers, winner",
    [
        ({"sample_ess50": (0.70, 0.50), "loss_ess50": (0.704, 0.503)}, "sample_ess50"),  # ties: the incumbent stays
        ({"sample_ess50": (0.70, 0.50), "loss_ess50": (0.71, 0.40)}, "loss_ess50"),  # worst-group Dice decides
        ({"sample_ess50": (0.70, 0.50), "loss_ess50": (0.698, 0.51)}, "loss_ess50"),  # the tie broken by minority
        ({"sample_ess50": (0.70, 0.50), "loss_ess50": (0.69, 0.80)}, "sample_ess50"),
    ],
)
def test_choose(numbers, winner):
    results = {k: {"worst_group_dice": w, "minority_dice": m} for k, (w, m) in numbers.items()}
    best, why = rs.choose(results, [setting("sample", 0.5), setting("loss", 0.5)])
    assert rs.setting_name(best) == winner and why.startswith(winner)


def test_sweep_chooses_apply_then_min_ess_under_it(monkeypatch, tmp_path):
    numbers = {"erm": (0.60, 0.40), "sample_ess50": (0.62, 0.45), "loss_ess50": (0.66, 0.44),
               "loss_ess25": (0.67, 0.50), "erm_12ep": (0.61, 0.42)}  # fmt: skip
    calls = []

    def fake(spec, out, work, runs, sources):
        assert sources == [tmp_path / "calibration"]
        name = out.name
        calls.append((spec.variant, name, dict(spec.overrides)))
        return write_run(out / spec.name, *numbers[name])

    monkeypatch.setattr(rs, "run_with_validation", fake)
    report = rs.sweep(tmp_path / "out", tmp_path / "work", report_only=False)
    assert [c[1] for c in calls] == ["erm", "sample_ess50", "loss_ess50", "loss_ess25", "erm_12ep"]
    assert calls[2][2]["dro#apply"] == "loss" and calls[3][2]["dro#min_ess"] == 0.25
    assert all(c[2]["epochs"] == rs.fa.RECIPE["epochs"] for c in calls[:-1]) and calls[-1][2]["epochs"] == 12
    assert report["choices"]["dro#apply"].startswith("loss_ess50")
    assert report["choices"]["dro#min_ess"].startswith("loss_ess25")  # 0.67 beats 0.66 by more than the tie
    assert set(report["results"]) == set(numbers)
    assert "6 against 12 epochs" in report["choices"]["schedule"] and "0.600 / 0.610" in report["choices"]["schedule"]
    again = rs.sweep(tmp_path / "out", tmp_path / "work", report_only=True)  # reads the folders, runs nothing
    assert len(calls) == 5 and again["choices"] == report["choices"]
