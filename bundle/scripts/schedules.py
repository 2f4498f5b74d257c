"""Learning-rate schedule of the training config: linear warm-up, then cosine decay to a floor.

``lr(t) = base * t / w`` for the first ``w`` optimisation steps, then
``lr(t) = base * (m + (1 - m) * (1 + cos(pi * (t - w) / (T - w))) / 2)`` down to ``base * m`` at step ``T``
(``m`` = ``min_factor``). Stepped once per iteration by MONAI's ``LrScheduleHandler`` (``epoch_level: false``);
its state (the step count) is in the resumable checkpoint, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine", "warmup_cosine_factor"]


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (0-based); see the module notes."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with :func:`warmup_cosine_factor`.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        total_steps: number of optimisation steps of the whole run (epochs x iterations per epoch), >= 1.
        warmup_steps: steps of linear warm-up, in [0, total_steps].
        min_factor: final learning rate as a fraction of the base, in [0, 1].

    Raises:
        ValueError: for a value out of range (named).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}], got {warmup_steps!r}.")
    if not 0.0 <= float(min_factor) <= 1.0:
        raise ValueError(f"min_factor must be in [0, 1], got {min_factor!r}.")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, float(min_factor))
    )
