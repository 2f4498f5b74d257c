"""Which epoch's weights become ``model.pt``: the validation key metric (``key_metric`` in train.json).

``key_metric`` is one of

- ``val_mean_dice``: mean foreground Dice over the validation cases;
- ``val_worst_group_dice``: the lowest subgroup mean Dice (``subgroup_key`` groups);
- ``val_worst_group_cvar``: the lowest subgroup CVaR of Dice (mean of the worst ``cvar_alpha`` fraction);
- ``last``: the final validation (the end of the schedule), whatever the metrics say.

For the metrics the first epoch that reaches the highest value is kept (a later tie does not replace it).
:class:`ModelSelection` saves the network atomically as ``model.pt`` when a validation epoch is selected and writes
``model_selection.json`` beside it (the key metric, the selected epoch and its value, and every validation's
metrics), which the evaluation copies into ``metrics.json`` and the model card reports.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from .safe_io import _unwrap, atomic_save, atomic_write_json

__all__ = ["KEY_METRICS", "ModelSelection", "read_selection", "select_epoch"]

logger = logging.getLogger(__name__)

KEY_METRICS = ("val_mean_dice", "val_worst_group_dice", "val_worst_group_cvar", "last")


def _check_key(key_metric: str) -> str:
    if key_metric not in KEY_METRICS:
        raise ValueError(f"key_metric must be one of {list(KEY_METRICS)}, got {key_metric!r}.")
    return key_metric


def _is_better(key_metric: str, value: float | None, best: float | None) -> bool:
    if key_metric == "last":
        return True
    if value is None or not math.isfinite(value):
        return False
    return best is None or value > best


def select_epoch(history: Sequence[tuple[int, Mapping[str, float]]], key_metric: str) -> int | None:
    """The epoch ``key_metric`` selects from a sequence of ``(epoch, validation metrics)``, or None if none can be.

    Raises:
        ValueError: for an unknown ``key_metric``.
    """
    _check_key(key_metric)
    chosen, best = None, None
    for epoch, metrics in history:
        value = metrics.get(key_metric)
        if _is_better(key_metric, value, best):
            chosen, best = int(epoch), value
    return chosen


def read_selection(save_dir: str) -> dict[str, Any] | None:
    """``model_selection.json`` of a run's ``ckpt_dir`` without its history, or None when there is none (weights
    trained elsewhere, the shipped weights)."""
    path = Path(save_dir) / "model_selection.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {k: record.get(k) for k in ("key_metric", "selected_epoch", "selected_value")}


class ModelSelection:
    """Saves ``model.pt`` at the validation epochs that ``key_metric`` selects; records the choice.

    Attach to the validation evaluator (its ``state.epoch`` is the trainer's epoch). Its state (best value, epoch and
    the history) is in :meth:`state_dict`, so a resumed run keeps selecting against the same best.

    Args:
        network: the network whose weights are saved (DDP/compile wrappers are unwrapped).
        save_dir: folder of ``model.pt`` and ``model_selection.json``.
        key_metric: one of ``KEY_METRICS``.
        filename: name of the weights file.
    """

    def __init__(self, network: torch.nn.Module, save_dir: str, key_metric: str = "val_mean_dice",
                 filename: str = "model.pt") -> None:  # fmt: skip
        self.network = network
        self.save_dir = Path(save_dir)
        self.key_metric = _check_key(key_metric)
        self.filename = filename
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        epoch = int(engine.state.epoch)
        self.history.append((epoch, metrics))
        value = metrics.get(self.key_metric)
        if self.key_metric != "last" and value is None:
            raise KeyError(
                f"key_metric {self.key_metric!r} is not among the validation metrics {sorted(metrics)}: add it to "
                "the evaluator's metrics or choose another key_metric."
            )
        if not _is_better(self.key_metric, value, self.best_value):
            self._record()
            return
        self.best_value, self.best_epoch = value, epoch
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(_unwrap(self.network).state_dict(), self.save_dir / self.filename)
        shown = "last epoch" if value is None else f"{self.key_metric} {value:.4f}"
        engine.logger.info(f"model selection: epoch {epoch} ({shown}) saved as {self.save_dir / self.filename}")
        self._record()

    def summary(self) -> dict[str, Any]:
        return {"key_metric": self.key_metric, "selected_epoch": self.best_epoch, "selected_value": self.best_value,
                "history": [{"epoch": e, **m} for e, m in self.history]}  # fmt: skip

    def _record(self) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.summary(), self.save_dir / "model_selection.json")

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "history": [[e, dict(m)] for e, m in self.history]}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value, self.best_epoch = state.get("best_value"), state.get("best_epoch")
        self.history = [(int(e), dict(m)) for e, m in state.get("history", [])]
