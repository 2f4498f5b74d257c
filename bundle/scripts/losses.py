"""Per-sample Dice + cross-entropy loss, the base loss ``l_i`` of the FairDRO objective.

MONAI's :class:`monai.losses.DiceCELoss` reduces over the batch (its cross-entropy is a mean over every voxel of the
batch, MONAI issue 3917), so it cannot give the per-case losses that the DRO weights need. This loss computes the
same two terms per sample: the Dice term with MONAI's :class:`~monai.losses.DiceLoss` (``reduction="none"``, averaged
over channels) and the cross-entropy averaged over the voxels of each sample.

For a batch of one it equals ``DiceCELoss`` with the same arguments. For ``B > 1`` samples of equal size, the mean of
the per-sample values equals ``DiceCELoss`` too (its Dice is a per-sample mean, and a voxel mean over equal-sized
samples is the mean of per-sample voxel means), except with a class ``weight`` on a class-index target: there the
cross-entropy of ``DiceCELoss`` is normalised by the summed voxel weights of the whole batch, here by those of each
sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch.nn.modules.loss import _Loss

__all__ = ["PerSampleDiceCELoss"]


class PerSampleDiceCELoss(_Loss):
    """Dice loss + cross-entropy, reduced per sample: ``lambda_dice * dice_b + lambda_ce * ce_b`` for each sample b.

    Arguments follow :class:`monai.losses.DiceCELoss` (``batch`` is not offered: it mixes samples). The
    cross-entropy needs no activation: ``CrossEntropyLoss`` on logits for a multi-channel input (class-index target
    ``B1HWD`` or one-hot/probability target ``BCHWD``), ``BCEWithLogitsLoss`` for a single-channel input.

    Args:
        include_background: if False, channel 0 is left out of the Dice term.
        to_onehot_y: one-hot encode a class-index target for the Dice term.
        sigmoid: sigmoid on the input of the Dice term.
        softmax: softmax on the input of the Dice term.
        other_act: other activation for the Dice term.
        squared_pred: squared terms in the Dice denominator.
        jaccard: soft Jaccard instead of Dice.
        reduction: ``"none"`` (default, output ``(B,)``), ``"mean"`` or ``"sum"`` over the samples.
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.
        weight: class weights ``(C,)`` (cross-entropy and Dice), or ``pos_weight`` for the single-channel case.
        lambda_dice: weight of the Dice term, >= 0.
        lambda_ce: weight of the cross-entropy term, >= 0.
        label_smoothing: cross-entropy label smoothing in [0, 1] (multi-channel input).

    Shapes:
        input ``(B, C, H, W[, D])`` logits; target ``(B, 1, ...)`` class indices or ``(B, C, ...)``; output ``(B,)``
        (a scalar for ``reduction="mean"|"sum"``).
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "none",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        weight: torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be one of ['none', 'mean', 'sum'], got {reduction!r}.")
        super().__init__(reduction=reduction)
        if lambda_dice < 0.0:
            raise ValueError(f"lambda_dice must be >= 0, got {lambda_dice!r}.")
        if lambda_ce < 0.0:
            raise ValueError(f"lambda_ce must be >= 0, got {lambda_ce!r}.")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}.")
        if weight is not None:
            weight = torch.as_tensor(weight)
            weight = weight if torch.is_floating_point(weight) else weight.to(torch.float32)
        dice_weight = weight[1:] if weight is not None and not include_background and weight.ndim > 0 else weight
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            squared_pred=squared_pred,
            jaccard=jaccard,
            reduction="none",
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            weight=dice_weight,
        )
        self.register_buffer("weight", weight)
        self.weight: torch.Tensor | None
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.label_smoothing = float(label_smoothing)

    def ce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each sample, ``(B,)``: mean over its voxels (weighted mean with class weights)."""
        b = input.shape[0]
        weight = None if self.weight is None else self.weight.to(input)
        if input.shape[1] == 1:
            t = target if torch.is_floating_point(target) else target.to(input.dtype)
            voxel = F.binary_cross_entropy_with_logits(input, t, pos_weight=weight, reduction="none")
            return voxel.reshape(b, -1).mean(dim=1)
        if target.shape[1] == 1 and input.shape[1] != 1:
            t = target[:, 0].long()
            voxel = F.cross_entropy(input, t, weight=weight, reduction="none", label_smoothing=self.label_smoothing)
            if weight is None:
                return voxel.reshape(b, -1).mean(dim=1)
            return voxel.reshape(b, -1).sum(dim=1) / weight[t].reshape(b, -1).sum(dim=1)
        t = target if torch.is_floating_point(target) else target.to(input.dtype)
        voxel = F.cross_entropy(input, t, weight=weight, reduction="none", label_smoothing=self.label_smoothing)
        return voxel.reshape(b, -1).mean(dim=1)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss.

        Args:
            input: logits ``(B, C, H, W[, D])``.
            target: ``(B, 1, H, W[, D])`` class indices or ``(B, C, H, W[, D])``.

        Returns:
            ``(B,)`` per-sample losses (or their mean/sum).

        Raises:
            ValueError: when the shapes do not match.
        """
        if input.dim() != target.dim():
            raise ValueError(
                f"input and target must have the same number of dimensions, got {tuple(input.shape)} and "
                f"{tuple(target.shape)}; give the target as B1H[WD]."
            )
        if target.shape[1] not in (1, input.shape[1]) or target.shape[0] != input.shape[0]:
            raise ValueError(
                f"target must have shape (B, 1, ...) or (B, C, ...) matching input, got {tuple(target.shape)} for "
                f"input {tuple(input.shape)}."
            )
        dice = self.dice(input, target).reshape(input.shape[0], -1).mean(dim=1)
        loss = self.lambda_dice * dice + self.lambda_ce * self.ce(input, target)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
