"""Tests of the per-sample Dice + cross-entropy loss (scripts/losses.py) against MONAI's DiceCELoss and by hand."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss
from scripts.losses import PerSampleDiceCELoss

ARGS = [
    {"to_onehot_y": True, "softmax": True},
    {"to_onehot_y": True, "softmax": True, "include_background": False, "lambda_dice": 0.7, "lambda_ce": 0.3},
    {"to_onehot_y": True, "softmax": True, "squared_pred": True, "smooth_nr": 0.0, "smooth_dr": 1e-6},
    {"to_onehot_y": True, "softmax": True, "jaccard": True},
    {"to_onehot_y": True, "softmax": True, "label_smoothing": 0.1},
    {"to_onehot_y": True, "softmax": True, "weight": torch.tensor([0.3, 2.0, 1.0])},
]


def _batch(b, c=3, shape=(6, 5, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *shape, generator=gen)
    y = torch.randint(0, c, (b, 1, *shape), generator=gen).float()
    return x, y


@pytest.mark.parametrize("kwargs", ARGS)
def test_batch_of_one_equals_monai_dicece(kwargs):
    x, y = _batch(1)
    expected = DiceCELoss(**kwargs)(x, y)
    got = PerSampleDiceCELoss(**kwargs)(x, y)
    assert got.shape == (1,)
    assert abs(float(got[0]) - float(expected)) < 1e-6


def test_single_channel_sigmoid_equals_monai_dicece():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 5, 5, 5, generator=gen)
    y = (torch.rand(1, 1, 5, 5, 5, generator=gen) > 0.5).float()
    assert abs(float(PerSampleDiceCELoss(sigmoid=True)(x, y)[0]) - float(DiceCELoss(sigmoid=True)(x, y))) < 1e-6


@pytest.mark.parametrize("kwargs", ARGS[:5])
def test_mean_over_equal_sized_samples_equals_monai_dicece(kwargs):
    # DiceCELoss: dice is a per-sample mean, CE a mean over every voxel of the batch; with equal-sized samples the
    # mean of per-sample losses is the same number (not true with class weights: see the module docstring).
    x, y = _batch(4, seed=2)
    per_sample = PerSampleDiceCELoss(**kwargs)(x, y)
    assert per_sample.shape == (4,)
    assert abs(float(per_sample.mean()) - float(DiceCELoss(**kwargs)(x, y))) < 1e-6
    assert abs(float(PerSampleDiceCELoss(reduction="mean", **kwargs)(x, y)) - float(per_sample.mean())) < 1e-6
    assert abs(float(PerSampleDiceCELoss(reduction="sum", **kwargs)(x, y)) - float(per_sample.sum())) < 1e-5


def test_samples_are_independent():
    # each sample's loss is what it gets alone: no leakage across the batch
    x, y = _batch(3, seed=3)
    loss = PerSampleDiceCELoss(to_onehot_y=True, softmax=True)
    batched = loss(x, y)
    alone = torch.cat([loss(x[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone)
    assert batched.std() > 0


def test_by_hand_zero_logits():
    # sigmoid(0) = 0.5 everywhere, 8 voxels, no smoothing. BCE = ln 2 per voxel.
    # Dice loss = 1 - 2 tp / (2 tp + fp + fn) with tp = 0.5 P, fp = 0.5 (8 - P), fn = 0.5 P -> 1 - P / (P + 4).
    # sample 0: P = 4 -> 1/2; sample 1: P = 2 -> 2/3.
    x = torch.zeros(2, 1, 2, 2, 2)
    y = torch.zeros(2, 1, 2, 2, 2)
    y[0].view(-1)[:4] = 1
    y[1].view(-1)[:2] = 1
    got = PerSampleDiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=0.0)(x, y)
    torch.testing.assert_close(got, torch.tensor([0.5 + math.log(2), 2 / 3 + math.log(2)]))


def test_gradient_flows():
    x, y = _batch(2, seed=4)
    x.requires_grad_(True)
    PerSampleDiceCELoss(to_onehot_y=True, softmax=True)(x, y)[1].backward()
    assert x.grad is not None and float(x.grad[0].abs().sum()) == 0.0 and float(x.grad[1].abs().sum()) > 0.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lambda_dice": -1.0}, "lambda_dice"),
        ({"lambda_ce": -0.5}, "lambda_ce"),
        ({"reduction": "batch"}, "reduction"),
        ({"label_smoothing": 2.0}, "label_smoothing"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PerSampleDiceCELoss(**kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="dimensions"):
        PerSampleDiceCELoss()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="target must have shape"):
        PerSampleDiceCELoss()(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
