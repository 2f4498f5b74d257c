"""Fairness metrics for 3D and 2D segmentation, binary or multi-class: per-case scores, subgroup statistics and a
MONAI/Ignite metric.

Three layers, each usable on its own:

1. **Per case** (:func:`compute_case_metrics`): Dice, HD95 in mm and normalised surface Dice (NSD) at a
   tolerance in mm, on the grid the masks are given on, with voxel spacing. In an evaluation,
   :class:`CaseMetricsHandler` scores each case once and keeps the scores in the engine output, where the
   metrics below and the fairness report read them.
2. **Per subgroup** (:func:`compute_group_metrics`): a pure function over a table of per-case records
   (``id``, attribute columns such as ``stage``, ``dice`` ...) that returns the group means, worst-group
   score, gap, equity-scaled Dice (ES-Dice), and the intra-group statistics (std, CVaR of the worst
   ``alpha`` fraction, hidden failures, failures among cases flagged ``hard``).
3. **Engine level**: :class:`FairnessMetric` (a :class:`monai.metrics.CumulativeIterationMetric`: buffers
   per-case scores, gathers them and the cases' group labels across DDP ranks) and
   :class:`FairnessMetricHandler` (its Ignite adapter, usable as ``key_metric`` or ``additional_metrics``
   of a MONAI evaluator).

Conventions for empty masks (``P`` prediction, ``L`` label; the foreground of each case):

==========================  ======  ===========================================  =====
case                        Dice    HD95                                         NSD
==========================  ======  ===========================================  =====
``P`` and ``L`` both empty  1.0     0.0 mm                                       1.0
exactly one of them empty   0.0     the image diagonal in mm (worst value)       0.0
==========================  ======  ===========================================  =====

The "image diagonal" is ``sqrt(sum_i (n_i * s_i) ** 2)`` for an image of ``n_i`` voxels of spacing ``s_i``
mm along axis ``i``: no distance measured on that grid can exceed it, so a missed or hallucinated target
scores the worst possible finite value (the "worst possible value" recommendation of Metrics Reloaded,
Maier-Hein et al. 2024) instead of a NaN that group means would silently drop.

HD95 follows MONAI's definition: the larger of the two directed 95th percentiles of the distances from
the boundary voxels of one mask to the boundary of the other. NSD follows Nikolov et al. 2021
(https://arxiv.org/abs/1809.04430): the fraction of boundary voxels of both masks lying within the
tolerance of the other boundary (MONAI's ``compute_surface_dice`` without sub-voxels).

Multi-class cases (a prediction of ``C > 2`` channels, or ``class_names`` given; :func:`multiclass_case_metrics`):
each foreground class ``k = 1 .. C-1`` is scored as the binary masks ``class == k`` with the conventions above
(per class: both empty: Dice 1, IoU 1; exactly one empty: 0), giving ``dice_<class>`` and ``iou_<class>``
(IoU = ``|P & L| / |P | L|``); the case's ``dice``, ``iou``, ``hd95`` and ``nsd`` are the means over the
foreground classes, so everything that reads ``dice`` (key metric, worst-group Dice, verdicts) reads the mean.
Binary cases keep their columns (no ``iou``, no per-class column).

Distance units: in mm from the spacing (NIfTI/DICOM affines); in pixels for images without geometry (a
MetaTensor whose ``filename_or_obj`` ends in .png, .jpg, .jpeg or .npz, or ``distance_unit="px"``), where the
keys are ``hd95_px`` and ``nsd_px`` and the NSD tolerance is in pixels (:func:`resolve_distance_unit`).

Subgroup statistics (for a higher-is-better score ``m`` such as Dice; ``m_i`` per case, ``G`` subgroups,
``n_g`` cases in subgroup ``g``, ``N`` cases in all):

- ``m_g = mean_{i in g} m_i``; ``m_all = mean_i m_i`` (over cases, not over groups);
- ``worst_group_m = min_g m_g``; ``group_gap = max_g m_g - min_g m_g``;
- ``es_m = m_all / (1 + sum_g |m_all - m_g|)`` (FairSeg, Tian et al. ICLR 2024,
  https://arxiv.org/abs/2311.02189, as in its released code);
- ``es_m_std = m_all / (1 + sd_g(m_g))`` with ``sd`` the sample standard deviation (``ddof=1``) of the
  ``G`` group means, as FairSeg's ``equity_scaled_std_perf``; with a single group ``sd`` is taken as 0;
- ``std_g``: population standard deviation (``ddof=0``) of the per-case scores of ``g``;
- ``cvar_g``: mean of the worst ``alpha`` fraction of ``g``: the ``k = alpha * n_g`` lowest scores, the
  boundary case with fractional weight (``n_g = 7``, ``alpha = 0.2``: ``k = 1.4``, the lowest score has
  weight 1, the next 0.4, the sum is divided by 1.4); ``worst_group_cvar = min_g cvar_g``;
- ``hidden_failures_g``: number of cases of ``g`` with ``m_i < threshold`` (default 0.5); when the records
  carry a ``hard`` flag, ``hard_cases_g`` and ``hard_failures_g`` (hard cases of ``g`` below threshold).

Hidden minority (:func:`minority_metrics`, when the records carry a ``subtype``: ``"majority"`` or the name
of a minority kind such as ``"necrotic"``): per group the mean Dice of its minority and of its majority
cases, and the minority failure rate (share of its minority cases with Dice below the threshold).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.exceptions import NotComputableError
from ignite.metrics.metric import reinit__is_reduced
from monai.data import MetaTensor, decollate_batch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, compute_hausdorff_distance, compute_surface_dice

__all__ = [
    "CASE_METRICS",
    "CASE_METRICS_KEY",
    "CaseMetricsHandler",
    "FairnessMetric",
    "FairnessMetricHandler",
    "NotComputableError",
    "as_binary_mask",
    "case_metadata",
    "class_map",
    "class_names_for",
    "class_names_of",
    "compute_case_metrics",
    "compute_group_metrics",
    "cvar",
    "group_statistics",
    "image_diagonal_mm",
    "infer_spatial_dims",
    "metric_output_names",
    "minority_metrics",
    "multiclass_case_metrics",
    "num_channels",
    "records_to_table",
    "resolve_distance_unit",
    "spacing_of",
    "subtype_kind",
]

logger = logging.getLogger(__name__)

#: Per-case metrics computed by :func:`compute_case_metrics`, in this order.
CASE_METRICS: tuple[str, ...] = ("dice", "hd95", "nsd")
#: Key of the per-case scores that :class:`CaseMetricsHandler` adds to each item of ``engine.state.output``.
CASE_METRICS_KEY = "case_metrics"
#: Per-case metrics for which higher is better and that lie in [0, 1]: the ones group statistics accept.
BOUNDED_METRICS: tuple[str, ...] = ("dice", "nsd")
#: Per-case score columns of a report besides the per-class ``dice_<class>``, ``iou_<class>``, in column order
#: (``iou`` only for multi-class cases; ``hd95_px``, ``nsd_px`` when distances are in pixels).
SCORE_COLUMNS: tuple[str, ...] = ("dice", "iou", "hd95", "hd95_px", "nsd", "nsd_px")
#: Values of ``distance_unit``: ``auto`` picks ``px`` for images from files without geometry, else ``mm``.
DISTANCE_UNITS: tuple[str, ...] = ("auto", "mm", "px")
#: File suffixes (``filename_or_obj`` of a MetaTensor) whose images carry no physical spacing.
PIXEL_FILE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".npz")
#: Group label given to a case whose attribute value is missing.
UNKNOWN_GROUP = "unknown"
#: Per-case column naming the case's hidden subtype: ``MAJORITY`` or a minority kind (read by evaluation only).
SUBTYPE_KEY = "subtype"
#: The ``subtype`` value of the majority; every other non-missing value is a minority kind.
MAJORITY = "majority"

_warned_unit_spacing = False


# --------------------------------------------------------------------------------------------------------------
# per-case metrics
# --------------------------------------------------------------------------------------------------------------
def _as_cpu_tensor(x: Any) -> torch.Tensor:
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    t = t.detach().cpu()
    return t.to(torch.uint8) if t.dtype == torch.bool else t


def _shape_error(shape: Sequence[int], spatial_dims: int) -> ValueError:
    axes = "HWD"[:spatial_dims]
    return ValueError(
        f"a case must have shape C{axes} or {axes} ({spatial_dims} spatial dims), got shape {tuple(shape)}; "
        "pass one case at a time, channel-first."
    )


def as_binary_mask(x: Any, spatial_dims: int = 3) -> torch.Tensor:
    """Reduce a prediction or label of one case to its foreground mask.

    Args:
        x: one case, channel-first ``C[spatial]`` or without channel ``[spatial]`` (tensor, MetaTensor or
            array). With ``C >= 2`` channels (one-hot or probabilities) the foreground is where the arg-max is
            not channel 0 (all foreground classes merged); with one channel or none (a label map, a binary
            mask or a foreground probability) it is where the value exceeds 0.5.
        spatial_dims: number of spatial dimensions.

    Returns:
        Boolean tensor of shape ``[spatial]`` on the CPU.

    Raises:
        ValueError: when ``x`` has neither ``spatial_dims`` nor ``spatial_dims + 1`` dimensions.
    """
    t = _as_cpu_tensor(x)
    if t.ndim == spatial_dims:
        return t.float() > 0.5
    if t.ndim == spatial_dims + 1:
        if t.shape[0] == 1:
            return t[0].float() > 0.5
        # arg-max != 0 without an arg-max over the channel axis (slow on the CPU): some foreground channel
        # strictly above channel 0 (a tie goes to channel 0, as in argmax)
        t = t.float()
        return t[1:].amax(dim=0) > t[0]
    raise _shape_error(t.shape, spatial_dims)


def infer_spatial_dims(x: Any) -> int:
    """Spatial dimensions of one channel-first case ``C[spatial]``: its number of dimensions minus one.

    Raises:
        ValueError: when ``x`` has fewer than 3 dimensions (a case is at least ``C H W``).
    """
    ndim = len(x.shape) if hasattr(x, "shape") else np.ndim(x)
    if ndim < 3:
        raise ValueError(f"cannot infer `spatial_dims` from a case of shape {tuple(np.shape(x))}: expected CHW(D).")
    return ndim - 1


def num_channels(x: Any, spatial_dims: int) -> int:
    """Channels of one case: ``C`` for ``C[spatial]``, 1 for a case without channel axis."""
    ndim = len(x.shape) if hasattr(x, "shape") else np.ndim(x)
    return int(x.shape[0]) if ndim == spatial_dims + 1 else 1


def class_names_for(class_names: Sequence[str] | None, channels: int) -> tuple[str, ...]:
    """The ``C`` class names of a prediction with ``channels`` channels (index 0: the background).

    Args:
        class_names: names of all classes, background first (e.g. ``["background", "rim", "cup"]``), or
            ``None`` for ``background, class1, class2, ...``. Each name is letters, digits, ``_``, ``.`` or
            ``-`` (it becomes part of the column names ``dice_<name>`` and ``iou_<name>``).
        channels: channels of the prediction; 1 (a label map) takes the number of classes from ``class_names``.

    Raises:
        TypeError: when ``class_names`` is a string.
        ValueError: fewer than two names, invalid or repeated names, or a count unequal to ``channels``.
    """
    if class_names is None:
        if channels < 2:
            raise ValueError("a label-map prediction (one channel) needs `class_names` to know the classes.")
        return ("background", *(f"class{k}" for k in range(1, channels)))
    if isinstance(class_names, str):
        raise TypeError(f"`class_names` must be a list of names, got the string {class_names!r}.")
    names = tuple(class_names)
    bad = [n for n in names if not isinstance(n, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
    if len(names) < 2 or bad or len(set(names)) != len(names):
        raise ValueError(
            f"`class_names` must hold at least two distinct names of letters, digits, '_', '.', '-' "
            f"(background first), got {list(names)}."
        )
    if channels > 1 and len(names) != channels:
        raise ValueError(
            f"`class_names` has {len(names)} names {list(names)} but the prediction has {channels} channels: "
            "give one name per channel, background first."
        )
    return names


def class_map(x: Any, n_classes: int, spatial_dims: int) -> torch.Tensor:
    """Class index of every voxel of one case: ``[spatial]`` int64 on the CPU.

    ``x`` is one-hot or per-class probabilities ``C[spatial]`` with ``C == n_classes`` (arg-max, a tie going
    to the lower class), or a label map ``1[spatial]`` or ``[spatial]`` holding integers ``0 .. n_classes - 1``.

    Raises:
        ValueError: a wrong number of dimensions or channels, or label-map values that are not class indices.
    """
    t = _as_cpu_tensor(x)
    if t.ndim == spatial_dims + 1 and t.shape[0] > 1:
        if t.shape[0] != n_classes:
            raise ValueError(f"a case has {t.shape[0]} channels but there are {n_classes} classes.")
        return t.float().argmax(dim=0)
    if t.ndim == spatial_dims + 1:
        t = t[0]
    elif t.ndim != spatial_dims:
        raise _shape_error(t.shape, spatial_dims)
    values = t.double()
    labels = torch.round(values).long()
    if labels.numel() and (
        not torch.equal(labels.double(), values) or int(labels.min()) < 0 or int(labels.max()) >= n_classes
    ):
        raise ValueError(f"a label map must hold the class indices 0..{n_classes - 1} only.")
    return labels


def class_names_of(columns: Any) -> list[str]:
    """The class names of per-class score columns: ``X`` for every ``dice_X`` that has its ``iou_X``."""
    keys = list(columns)
    return [k[len("dice_") :] for k in keys if k.startswith("dice_") and f"iou_{k[len('dice_') :]}" in keys]


def spacing_of(x: Any, spatial_dims: int = 3) -> tuple[float, ...] | None:
    """Voxel spacing in mm from a MetaTensor's affine, or ``None`` when ``x`` carries no geometry."""
    if isinstance(x, MetaTensor) and x.affine is not None and x.affine.ndim == 2:
        return tuple(float(s) for s in x.pixdim[:spatial_dims])
    return None


def _from_pixel_file(x: Any) -> bool:
    if not isinstance(x, MetaTensor):
        return False
    name = x.meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name or "").lower().endswith(PIXEL_FILE_SUFFIXES)


def resolve_distance_unit(distance_unit: str, spacing: Any, *cases: Any) -> str:
    """``"mm"`` or ``"px"``: the unit of the distances (HD95, NSD tolerance) of a case.

    ``"auto"`` gives ``"px"`` when no ``spacing`` is given and a case's MetaTensor comes from a file without
    geometry (``filename_or_obj`` ending in .png, .jpg, .jpeg or .npz), else ``"mm"``.

    Raises:
        ValueError: an unknown unit, or ``"px"`` with an explicit ``spacing``.
    """
    if distance_unit not in DISTANCE_UNITS:
        raise ValueError(f"`distance_unit` must be one of {DISTANCE_UNITS}, got {distance_unit!r}.")
    if distance_unit == "px" and spacing is not None:
        raise ValueError("`distance_unit` 'px' measures in pixels: it takes no `spacing`.")
    if distance_unit != "auto":
        return distance_unit
    if spacing is None and any(_from_pixel_file(c) for c in cases):
        return "px"
    return "mm"


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of an image of ``shape`` voxels with ``spacing`` mm: ``sqrt(sum (n*s)^2)``."""
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def _resolve_spacing(spacing: Any, y_pred: Any, y: Any, spatial_dims: int) -> tuple[float, ...]:
    global _warned_unit_spacing
    if spacing is None:
        spacing = spacing_of(y_pred, spatial_dims) or spacing_of(y, spatial_dims)
    if spacing is None:
        if not _warned_unit_spacing:
            logger.warning(
                "no voxel spacing given and the inputs carry no affine: distances are in voxels, not mm. "
                "Pass `spacing` or MetaTensors on the original image grid."
            )
            _warned_unit_spacing = True
        spacing = 1.0
    if np.isscalar(spacing):
        spacing = (float(spacing),) * spatial_dims
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != spatial_dims or any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"`spacing` must hold {spatial_dims} positive finite numbers (mm), got {spacing}.")
    return spacing


def _overlap(p: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of two boolean masks: 1 when both are empty, 0 when exactly one is."""
    inter = float(torch.logical_and(p, g).sum())
    total = float(p.sum()) + float(g.sum())
    dice = 1.0 if total == 0 else 2.0 * inter / total
    union = total - inter
    return dice, (1.0 if union == 0 else inter / union)


def _distances(
    p: torch.Tensor, g: torch.Tensor, spacing: tuple[float, ...], wants: Sequence[str], tolerance: float, pct: float
) -> dict[str, float]:
    """HD95 and NSD of two boolean masks (those of ``wants``), with the empty-mask conventions."""
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return {m: (0.0 if m == "hd95" else 1.0) for m in wants}
    if p_any != g_any:
        return {m: (image_diagonal_mm(p.shape, spacing) if m == "hd95" else 0.0) for m in wants}
    p5, g5 = p[None, None], g[None, None]
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own deprecated internal argument on every call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        if "hd95" in wants:
            hd = compute_hausdorff_distance(p5, g5, include_background=True, percentile=pct, spacing=spacing)
            out["hd95"] = float(hd.reshape(-1)[0])
        if "nsd" in wants:
            nsd = compute_surface_dice(
                p5, g5, class_thresholds=[float(tolerance)], include_background=True, spacing=spacing
            )
            out["nsd"] = float(nsd.reshape(-1)[0])
    return out


def _check_case_args(metrics: Sequence[str], tolerance_mm: float, percentile: float) -> None:
    unknown = [m for m in metrics if m not in CASE_METRICS]
    if unknown:
        raise ValueError(f"`metrics` must be among {CASE_METRICS}, got unknown {unknown}.")
    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
        raise ValueError(f"`tolerance_mm` must be a finite number >= 0, got {tolerance_mm}.")
    if not 0 < percentile <= 100:
        raise ValueError(f"`percentile` must be in (0, 100], got {percentile}.")


def _grid_error(p: torch.Tensor, g: torch.Tensor) -> ValueError:
    return ValueError(
        f"prediction and label must share one grid, got spatial shapes {tuple(p.shape)} and {tuple(g.shape)}; "
        "invert the prediction to the label's grid first (e.g. monai.transforms.Invertd)."
    )


def compute_case_metrics(
    y_pred: Any,
    y: Any,
    spacing: float | Sequence[float] | None = None,
    tolerance_mm: float = 2.0,
    percentile: float = 95.0,
    metrics: Sequence[str] = CASE_METRICS,
    spatial_dims: int | None = 3,
    class_names: Sequence[str] | None = None,
    distance_unit: str = "mm",
) -> dict[str, float]:
    """Dice, HD95 and normalised surface Dice (NSD) of one case, binary or multi-class.

    Args:
        y_pred: prediction of one case, ``C[spatial]`` or ``[spatial]`` (see :func:`as_binary_mask`).
        y: label of the same case on the same grid.
        spacing: voxel spacing in mm along the tensor axes, one number per axis or one for all. ``None``: read
            from ``y_pred`` (or ``y``) when it is a MetaTensor, else 1 (with a warning: distances in voxels).
        tolerance_mm: NSD tolerance in mm (a boundary voxel within this distance of the other boundary counts);
            in pixels when the distances are.
        percentile: percentile of the Hausdorff distance (95 gives HD95, 100 the maximum).
        metrics: which of ``("dice", "hd95", "nsd")`` to compute; distances are skipped when not asked for.
        spatial_dims: number of spatial dimensions; ``None``: ``y_pred.ndim - 1`` (``y_pred`` channel-first).
        class_names: all class names, background first; given, or with ``C > 2`` prediction channels, the case
            is scored per class (see :func:`multiclass_case_metrics`); else binary (foreground vs background).
        distance_unit: ``"mm"`` (spacing as above), ``"px"`` (spacing 1, keys ``hd95_px``, ``nsd_px``) or
            ``"auto"`` (see :func:`resolve_distance_unit`).

    Returns:
        ``{name: value}`` for the requested metrics, with the empty-mask conventions of the module docstring:
        both masks empty: dice 1, hd95 0, nsd 1; exactly one empty: dice 0, hd95 = image diagonal in mm, nsd 0.
        Multi-class adds ``iou`` and ``dice_<class>``, ``iou_<class>`` per foreground class.

    Raises:
        ValueError: on an unknown metric name, mismatched shapes, a negative tolerance or invalid spacing.
    """
    _check_case_args(metrics, tolerance_mm, percentile)
    sd = infer_spatial_dims(y_pred) if spatial_dims is None else int(spatial_dims)
    unit = resolve_distance_unit(distance_unit, spacing, y_pred, y)
    channels = num_channels(y_pred, sd)
    if class_names is not None or channels > 2:
        names = class_names_for(class_names, channels)
        out = multiclass_case_metrics(y_pred, y, names, spacing, tolerance_mm, percentile, metrics, sd, unit)
    else:
        out = _binary_case_metrics(y_pred, y, spacing, tolerance_mm, percentile, metrics, sd, unit)
    return out if unit == "mm" else {(f"{k}_px" if k in ("hd95", "nsd") else k): v for k, v in out.items()}


def _case_spacing(unit: str, spacing: Any, y_pred: Any, y: Any, spatial_dims: int) -> tuple[float, ...]:
    return (1.0,) * spatial_dims if unit == "px" else _resolve_spacing(spacing, y_pred, y, spatial_dims)


def _binary_case_metrics(
    y_pred: Any, y: Any, spacing: Any, tolerance: float, pct: float, metrics: Sequence[str], sd: int, unit: str
) -> dict[str, float]:
    p = as_binary_mask(y_pred, sd)
    g = as_binary_mask(y, sd)
    if p.shape != g.shape:
        raise _grid_error(p, g)
    out: dict[str, float] = {}
    if "dice" in metrics:
        out["dice"] = _overlap(p, g)[0]
    wants = [m for m in ("hd95", "nsd") if m in metrics]
    if not wants:
        return out
    sp = _case_spacing(unit, spacing, y_pred, y, sd)
    out.update(_distances(p, g, sp, wants, tolerance, pct))
    return {m: out[m] for m in metrics}


def multiclass_case_metrics(
    y_pred: Any,
    y: Any,
    class_names: Sequence[str],
    spacing: Any = None,
    tolerance: float = 2.0,
    percentile: float = 95.0,
    metrics: Sequence[str] = CASE_METRICS,
    spatial_dims: int = 3,
    unit: str = "mm",
) -> dict[str, float]:
    """Per-class scores of one case and their means over the foreground classes ``1 .. C-1``.

    Each foreground class ``k`` is scored as a binary case of the masks ``class == k`` (the prediction's
    arg-max, the label's one-hot arg-max or label-map value; see :func:`class_map`), with the empty-mask
    conventions of the binary case for that class: both empty: Dice 1, IoU 1, HD95 0, NSD 1; exactly one
    empty: Dice 0, IoU 0, HD95 the image diagonal, NSD 0.

    Returns:
        ``dice``, ``iou`` (with ``"dice"`` in ``metrics``), ``hd95``, ``nsd`` (when asked): the means over the
        foreground classes; then ``dice_<name>``, ``iou_<name>`` per foreground class (with ``"dice"``).
        Distances are in mm, or in pixels with ``unit="px"`` (the keys stay ``hd95``, ``nsd`` here).
    """
    n = len(class_names)
    pm, gm = class_map(y_pred, n, spatial_dims), class_map(y, n, spatial_dims)
    if pm.shape != gm.shape:
        raise _grid_error(pm, gm)
    wants = [m for m in ("hd95", "nsd") if m in metrics]
    sp = _case_spacing(unit, spacing, y_pred, y, spatial_dims) if wants else ()
    per_class: dict[str, float] = {}
    sums = dict.fromkeys(("dice", "iou", *wants), 0.0)
    for k in range(1, n):
        p, g = pm == k, gm == k
        dice, iou = _overlap(p, g)
        per_class[f"dice_{class_names[k]}"], per_class[f"iou_{class_names[k]}"] = dice, iou
        for name, value in (("dice", dice), ("iou", iou), *_distances(p, g, sp, wants, tolerance, percentile).items()):
            sums[name] += value
    means = {name: total / (n - 1) for name, total in sums.items()}
    out = {m: means[m] for m in ("dice", "iou", "hd95", "nsd") if m in metrics or (m == "iou" and "dice" in metrics)}
    return {**out, **per_class} if "dice" in metrics else out


class CaseMetricsHandler:
    """Score each evaluated case once and keep its scores in the engine output, for every reader to share.

    The one place where an evaluation computes per-case Dice (and HD95, NSD): each case of the decollated and
    post-transformed ``engine.state.output`` (a list of dicts, MONAI's default) is scored with
    :func:`compute_case_metrics` and its scores ``{"dice": ..., "hd95": ..., "nsd": ...}`` are stored in the
    case's output item under ``output_key``. :class:`FairnessMetricHandler` and
    :class:`scripts.fairness_report.FairnessReportHandler` given this handler as ``scores`` read them there
    (through :meth:`case_scores`) instead of scoring the case again.

    On a MONAI workflow, :meth:`attach` runs it at ``IterationEvents.MODEL_COMPLETED``: after MONAI's own
    decollation and post-processing (registered on that event when the workflow is built) and before every
    ``ITERATION_COMPLETED`` handler, the metrics among them. On a plain Ignite engine it runs at
    ``ITERATION_COMPLETED``; a reader attached before it calls :meth:`case_scores` itself. Either way a case is
    scored once: a case whose item already holds ``output_key`` is not scored again.

    Multi-class (a prediction of ``C > 2`` channels, or ``class_names`` given): ``dice`` is the mean over the
    foreground classes, beside ``iou`` and the per-class ``dice_<class>``, ``iou_<class>``; ``hd95`` and ``nsd``
    are means over the foreground classes too (see :func:`multiclass_case_metrics`). Distances in pixels
    (``distance_unit``) are stored as ``hd95_px`` and ``nsd_px`` (NSD tolerance ``tolerance_mm`` pixels).

    Args:
        metrics: which of :data:`CASE_METRICS` to compute (HD95 and NSD cost far more than Dice).
        tolerance_mm: NSD tolerance in mm (in pixels when the distances are in pixels).
        percentile: Hausdorff percentile (95 gives HD95).
        spacing: voxel spacing in mm; ``None``: from the prediction's (or label's) MetaTensor affine.
        pred_key: output key of the prediction (one-hot ``C[spatial]`` or a label map, on the grid the scores
            should be computed on: invert the prediction to the original image first).
        label_key: output key of the label, on the same grid (one-hot, or a label map of class indices).
        output_key: output key the scores are stored under.
        spatial_dims: number of spatial dimensions; ``None``: from each prediction, channel-first ``C[spatial]``
            (``ndim - 1``: 3 for ``CHWD``, as before, 2 for ``CHW``).
        class_names: all class names, background first (``["background", "rim", "cup"]`` gives the columns
            ``dice_rim``, ``iou_rim``, ``dice_cup``, ``iou_cup``), one per prediction channel; ``None``:
            ``class1, class2, ...`` for predictions of more than two channels, binary scoring otherwise.
        distance_unit: ``"mm"``, ``"px"`` or ``"auto"`` (``px`` for images read from .png, .jpg, .jpeg or .npz
            files when no ``spacing`` is given, else ``mm``; see :func:`resolve_distance_unit`).

    Example::

        scores = CaseMetricsHandler(tolerance_mm=2.0)
        evaluator = SupervisedEvaluator(..., key_val_metric={"mean_dice": FairnessMetricHandler(
            attribute="stage", output="dice_all", scores=scores)}, val_handlers=[scores])
    """

    def __init__(
        self,
        metrics: Sequence[str] = CASE_METRICS,
        tolerance_mm: float = 2.0,
        percentile: float = 95.0,
        spacing: float | Sequence[float] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        output_key: str = CASE_METRICS_KEY,
        spatial_dims: int | None = None,
        class_names: Sequence[str] | None = None,
        distance_unit: str = "auto",
    ) -> None:
        if isinstance(metrics, str):
            raise TypeError(f"`metrics` must be a list of metric names, got the string {metrics!r}.")
        unknown = [m for m in metrics if m not in CASE_METRICS]
        if unknown or not metrics:
            raise ValueError(f"`metrics` must be a non-empty list among {CASE_METRICS}, got {list(metrics)}.")
        if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
            raise ValueError(f"`tolerance_mm` must be a finite number >= 0, got {tolerance_mm}.")
        if not 0 < percentile <= 100:
            raise ValueError(f"`percentile` must be in (0, 100], got {percentile}.")
        self.metrics = tuple(metrics)
        self.tolerance_mm = tolerance_mm
        self.percentile = percentile
        self.spacing = spacing
        self.pred_key, self.label_key, self.output_key = pred_key, label_key, output_key
        if spatial_dims is not None and spatial_dims not in (2, 3):
            raise ValueError(f"`spatial_dims` must be 2, 3 or None (from the data), got {spatial_dims!r}.")
        self.spatial_dims = spatial_dims
        self.class_names = None if class_names is None else class_names_for(class_names, 1)
        resolve_distance_unit(distance_unit, spacing)  # checks the unit and its agreement with `spacing`
        self.distance_unit = distance_unit

    def attach(self, engine: Any) -> None:
        """Run :meth:`__call__` once per iteration, before the ``ITERATION_COMPLETED`` handlers where possible."""
        from ignite.engine import Events
        from monai.engines import Workflow
        from monai.engines.utils import IterationEvents

        event = IterationEvents.MODEL_COMPLETED if isinstance(engine, Workflow) else Events.ITERATION_COMPLETED
        if not engine.has_event_handler(self, event):
            engine.add_event_handler(event, self)

    def __call__(self, engine: Any) -> None:
        """Score the cases of this iteration that are not scored yet."""
        self.case_scores(engine)

    def case_scores(self, engine: Any) -> list[dict[str, float]]:
        """The scores of every case of the current iteration, in output order, each case scored only once.

        Raises:
            TypeError: when ``engine.state.output`` is not a list of dicts (set the evaluator's ``decollate``).
            KeyError: when a case has no ``pred_key`` or ``label_key``.
        """
        outputs = engine.state.output
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise TypeError(
                "CaseMetricsHandler needs the decollated engine output, a list of one dict per case (MONAI's "
                f"default decollate=True), got {type(outputs).__name__}."
            )
        for item in outputs:
            if self.output_key in item:
                continue
            if self.pred_key not in item or self.label_key not in item:
                raise KeyError(
                    f"engine output has no {self.pred_key!r}/{self.label_key!r} (keys: {sorted(item)}); set "
                    "`pred_key`/`label_key` or keep the label in the post-transforms."
                )
            item[self.output_key] = compute_case_metrics(
                item[self.pred_key],
                item[self.label_key],
                spacing=self.spacing,
                tolerance_mm=self.tolerance_mm,
                percentile=self.percentile,
                metrics=self.metrics,
                spatial_dims=self.spatial_dims,
                class_names=self.class_names,
                distance_unit=self.distance_unit,
            )
        return [item[self.output_key] for item in outputs]


# --------------------------------------------------------------------------------------------------------------
# group statistics
# --------------------------------------------------------------------------------------------------------------
def cvar(values: Any, alpha: float = 0.2) -> np.ndarray | float:
    """Lower-tail conditional value at risk: mean of the worst ``alpha`` fraction of the last axis.

    With ``n`` values the ``k = alpha * n`` lowest count, the boundary value with the fractional weight
    ``k - floor(k)``; the weighted sum is divided by ``k``. ``alpha = 1`` gives the mean; ``alpha * n <= 1``
    gives the minimum.

    Args:
        values: array ``[..., n]`` (higher is better); leading axes are kept (e.g. bootstrap draws).
        alpha: tail fraction in (0, 1].

    Returns:
        Array ``[...]`` (a float for 1-D input).

    Raises:
        ValueError: when ``alpha`` is not in (0, 1].
        NotComputableError: when the last axis is empty.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
    v = np.asarray(values, dtype=float)
    n = v.shape[-1]
    if n == 0:
        raise NotComputableError("CVaR needs at least one value.")
    k = round(alpha * n, 9)
    weights = np.clip(k - np.arange(n), 0.0, 1.0)
    result = (np.sort(v, axis=-1) * weights).sum(axis=-1) / k
    return float(result) if np.ndim(result) == 0 else result


def metric_output_names(metric: str = "dice") -> tuple[str, ...]:
    """Names of the scalar summaries :func:`compute_group_metrics` returns for ``metric`` (e.g. ``es_dice``)."""
    return (
        f"{metric}_all",
        f"worst_group_{metric}",
        "group_gap",
        f"es_{metric}",
        f"es_{metric}_std",
        "worst_group_cvar",
        "hidden_failures",
    )


def group_statistics(
    values_by_group: Mapping[str, Any], metric: str = "dice", alpha: float = 0.2, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Vectorised subgroup statistics; the maths shared by point estimates and bootstrap draws.

    Args:
        values_by_group: ``{group: array [..., n_g]}``; all arrays share their leading axes (e.g. ``B``
            bootstrap draws), the last axis holds the per-case scores of the group.
        metric: name used for the output keys (``dice`` gives ``dice_all``, ``es_dice`` ...).
        alpha: CVaR tail fraction.
        threshold: failure threshold for ``hidden_failures``.

    Returns:
        ``{name: array [...]}`` for every name of :func:`metric_output_names`, plus ``group_mean``,
        ``group_std``, ``group_cvar``, ``group_hidden_failures`` of shape ``[..., G]`` (groups in the order of
        ``values_by_group``).

    Raises:
        NotComputableError: when there is no group or a group has no case.
    """
    if not values_by_group:
        raise NotComputableError("no subgroup to compute fairness metrics on.")
    arrays = {g: np.asarray(v, dtype=float) for g, v in values_by_group.items()}
    empty = [g for g, v in arrays.items() if v.shape[-1] == 0]
    if empty:
        raise NotComputableError(f"subgroup(s) {empty} have no case: fairness metrics need every group non-empty.")
    means = np.stack([v.mean(axis=-1) for v in arrays.values()], axis=-1)
    stds = np.stack([v.std(axis=-1) for v in arrays.values()], axis=-1)
    cvars = np.stack([np.asarray(cvar(v, alpha)) for v in arrays.values()], axis=-1)
    fails = np.stack([(v < threshold).sum(axis=-1) for v in arrays.values()], axis=-1)
    n_total = sum(v.shape[-1] for v in arrays.values())
    overall = sum(v.sum(axis=-1) for v in arrays.values()) / n_total
    between_sd = means.std(axis=-1, ddof=1) if means.shape[-1] > 1 else np.zeros_like(overall)
    return {
        f"{metric}_all": overall,
        f"worst_group_{metric}": means.min(axis=-1),
        "group_gap": means.max(axis=-1) - means.min(axis=-1),
        f"es_{metric}": overall / (1.0 + np.abs(overall[..., None] - means).sum(axis=-1)),
        f"es_{metric}_std": overall / (1.0 + between_sd),
        "worst_group_cvar": cvars.min(axis=-1),
        "hidden_failures": fails.sum(axis=-1),
        "group_mean": means,
        "group_std": stds,
        "group_cvar": cvars,
        "group_hidden_failures": fails,
    }


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and v.strip() in ("", "nan", "None")


def _as_bool(v: Any) -> bool | None:
    if _is_missing(v):
        return None
    if torch.is_tensor(v):
        v = v.reshape(-1)[0].item()
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1", "yes", "y", "t"):
            return True
        if s in ("false", "0", "no", "n", "f"):
            return False
        raise ValueError(f"cannot read {v!r} as a true/false flag.")
    return bool(v)


def _group_label(v: Any) -> str:
    if _is_missing(v):
        return UNKNOWN_GROUP
    if torch.is_tensor(v) or isinstance(v, np.ndarray):
        v = np.asarray(v.detach().cpu() if torch.is_tensor(v) else v).reshape(-1)[0].item()
    return str(v)


def is_bounded_metric(metric: str) -> bool:
    """Whether a per-case score column is higher-is-better in [0, 1]: Dice, IoU, NSD, per-class Dice and IoU."""
    return metric in (*BOUNDED_METRICS, "iou", "nsd_px") or metric.startswith(("dice_", "iou_"))


def records_to_table(records: Any) -> list[dict[str, Any]]:
    """Normalise per-case records (a sequence of mappings or a pandas DataFrame) to a list of dicts."""
    if hasattr(records, "to_dict") and hasattr(records, "columns"):
        return [dict(r) for r in records.to_dict(orient="records")]
    if isinstance(records, Mapping):
        raise TypeError("`records` must be a sequence of per-case mappings or a DataFrame, got a single mapping.")
    return [dict(r) for r in records]


def compute_group_metrics(
    records: Any,
    attribute: str,
    metric: str = "dice",
    alpha: float = 0.2,
    threshold: float = 0.5,
    groups: Sequence[str] | None = None,
    hard_key: str = "hard",
) -> dict[str, Any]:
    """Subgroup fairness statistics of one per-case score over one grouping attribute.

    Args:
        records: per-case records, a sequence of mappings or a DataFrame with at least the columns
            ``attribute`` and ``metric`` (and optionally ``id`` and ``hard_key``). A missing attribute value
            makes the case's group ``"unknown"``.
        attribute: the grouping column, e.g. ``"stage"`` or ``"institution"``.
        metric: the per-case score, higher is better and in [0, 1]: ``"dice"``, ``"nsd"`` (or one of
            :func:`is_bounded_metric`: ``iou``, ``nsd_px``, ``dice_<class>``, ``iou_<class>``).
        alpha: CVaR tail fraction in (0, 1].
        threshold: a case with ``metric < threshold`` is a (hidden) failure.
        groups: expected group names in report order; ``None``: the groups present, sorted by name. A listed
            group with no case raises :class:`NotComputableError`; a case of an unlisted group is an error too.
        hard_key: column flagging planted/known hard cases; used when at least one record has it.

    Returns:
        A JSON-ready dict: ``attribute``, ``metric``, ``alpha``, ``threshold``, ``n_cases``, ``n_groups``,
        the scalars of :func:`metric_output_names` (e.g. ``dice_all``, ``worst_group_dice``, ``group_gap``,
        ``es_dice``, ``es_dice_std``, ``worst_group_cvar``, ``hidden_failures``), ``worst_group``,
        ``best_group``, ``worst_cvar_group``, with a hard flag ``hard_cases`` and ``hard_failures``, and
        ``groups``: ``{g: {"n", metric, "std", "cvar", "hidden_failures"[, "hard_cases", "hard_failures"]}}``.

    Raises:
        NotComputableError: no record, or a listed group without cases.
        ValueError: invalid arguments, a missing column or a non-finite score (with the case ids).
    """
    if not is_bounded_metric(metric):
        raise ValueError(
            f"`metric` must be one of {BOUNDED_METRICS}, 'iou', 'nsd_px' or a per-class 'dice_<class>' / "
            f"'iou_<class>' (higher is better), got {metric!r}."
        )
    if not 0 < alpha <= 1:
        raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
    rows = records_to_table(records)
    if not rows:
        raise NotComputableError("fairness metrics need at least one case; got no record.")
    missing_cols = [c for c in (attribute, metric) if all(c not in r for r in rows)]
    if missing_cols:
        raise ValueError(f"records have no column(s) {missing_cols}; columns present: {sorted(rows[0])}.")
    labels = [_group_label(r.get(attribute)) for r in rows]
    values = np.array([float(r.get(metric, float("nan"))) for r in rows], dtype=float)
    bad = [str(r.get("id", i)) for i, (r, v) in enumerate(zip(rows, values)) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite {metric} for case(s) {bad}: every case needs a score.")
    present = sorted(set(labels))
    order = list(groups) if groups is not None else present
    unlisted = sorted(set(present) - set(order))
    if unlisted:
        raise ValueError(f"cases with {attribute} value(s) {unlisted} not in `groups` {order}.")
    hard = [_as_bool(r.get(hard_key)) for r in rows]
    has_hard = any(h is not None for h in hard)
    label_arr = np.array(labels, dtype=object)
    by_group = {g: values[label_arr == g] for g in order}
    stats = group_statistics(by_group, metric=metric, alpha=alpha, threshold=threshold)
    result: dict[str, Any] = {
        "attribute": attribute,
        "metric": metric,
        "alpha": float(alpha),
        "threshold": float(threshold),
        "n_cases": len(rows),
        "n_groups": len(order),
    }
    for name in metric_output_names(metric):
        result[name] = int(stats[name]) if name == "hidden_failures" else float(stats[name])
    means = stats["group_mean"]
    result["worst_group"] = order[int(np.argmin(means))]
    result["best_group"] = order[int(np.argmax(means))]
    result["worst_cvar_group"] = order[int(np.argmin(stats["group_cvar"]))]
    per_group: dict[str, dict[str, Any]] = {}
    for j, g in enumerate(order):
        entry: dict[str, Any] = {
            "n": len(by_group[g]),
            metric: float(means[j]),
            "std": float(stats["group_std"][j]),
            "cvar": float(stats["group_cvar"][j]),
            "hidden_failures": int(stats["group_hidden_failures"][j]),
        }
        if has_hard:
            in_g = label_arr == g
            hard_g = np.array([bool(h) for h in hard], dtype=bool) & in_g
            entry["hard_cases"] = int(hard_g.sum())
            entry["hard_failures"] = int((hard_g & (values < threshold)).sum())
        per_group[g] = entry
    if has_hard:
        result["hard_cases"] = sum(e["hard_cases"] for e in per_group.values())
        result["hard_failures"] = sum(e["hard_failures"] for e in per_group.values())
    result["groups"] = per_group
    return result


def subtype_kind(value: Any) -> str | None:
    """The hidden subtype of a case: ``"majority"``, the minority kind's name, or ``None`` when not known.

    Missing values (``None``, NaN, ``""``) and ``"unknown"`` (the label :func:`_group_label` gives a missing
    value) carry no subtype information; ``"majority"`` is matched without regard to case or spaces.
    """
    if _is_missing(value):
        return None
    kind = _group_label(value).strip()
    if kind == UNKNOWN_GROUP:
        return None
    return MAJORITY if kind.lower() == MAJORITY else kind


def _minority_cell(kinds: Sequence[str | None], values: np.ndarray, threshold: float) -> dict[str, Any]:
    minority = np.array([k not in (None, MAJORITY) for k in kinds], dtype=bool)
    majority = np.array([k == MAJORITY for k in kinds], dtype=bool)
    failures = int((values[minority] < threshold).sum())
    n_min = int(minority.sum())
    return {
        "n_minority": n_min,
        "n_majority": int(majority.sum()),
        "minority_dice": float(values[minority].mean()) if n_min else None,
        "majority_dice": float(values[majority].mean()) if majority.any() else None,
        "minority_failure_rate": failures / n_min if n_min else None,
        "minority_failures": failures,
    }


def minority_metrics(
    records: Any, attribute: str, threshold: float = 0.5, subtype_key: str = SUBTYPE_KEY
) -> dict[str, Any] | None:
    """Hidden-minority statistics per group of ``attribute``: minority vs majority Dice and minority failures.

    A case is a minority case when its ``subtype_key`` value is neither missing nor ``"majority"`` (see
    :func:`subtype_kind`); cases without subtype information count in neither set.

    Args:
        records: per-case records (sequence of mappings or DataFrame) with ``attribute``, ``dice`` and, for
            some cases at least, ``subtype_key``.
        attribute: grouping column, e.g. ``"stage"``; a missing value is the group ``"unknown"``.
        threshold: a minority case with Dice below ``threshold`` is a failure.
        subtype_key: column of the hidden subtype.

    Returns:
        ``None`` when no record has subtype information, else ``{"threshold", "groups": {g: cell}, "overall":
        cell, "worst_group_minority_dice", "worst_minority_group", "kinds": {kind: {"n", "dice",
        "failure_rate", "failures"}}}`` where a cell is ``{"n_minority", "n_majority", "minority_dice",
        "majority_dice", "minority_failure_rate", "minority_failures"}`` (Dice and rate ``None`` without
        cases); groups sorted by name, the worst group is the lowest minority Dice among groups with
        minority cases (``None`` if none has), ``kinds`` covers all cases, one entry per minority kind.

    Raises:
        ValueError: a record without a finite Dice.
    """
    rows = records_to_table(records)
    kinds = [subtype_kind(r.get(subtype_key)) for r in rows]
    if all(k is None for k in kinds):
        return None
    values = np.array([float(r.get("dice", float("nan"))) for r in rows], dtype=float)
    bad = [str(r.get("id", i)) for i, (r, v) in enumerate(zip(rows, values)) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite dice for case(s) {bad[:10]}: every case needs a score.")
    labels = np.array([_group_label(r.get(attribute)) for r in rows], dtype=object)
    kind_arr = np.array(kinds, dtype=object)
    groups = {g: _minority_cell(kind_arr[labels == g], values[labels == g], threshold) for g in sorted(set(labels))}
    with_minority = {g: c["minority_dice"] for g, c in groups.items() if c["n_minority"]}
    worst = min(with_minority, key=lambda g: (with_minority[g], g)) if with_minority else None
    by_kind = {}
    for kind in sorted({k for k in kinds if k not in (None, MAJORITY)}):
        v = values[kind_arr == kind]
        failures = int((v < threshold).sum())
        by_kind[kind] = {"n": len(v), "dice": float(v.mean()), "failure_rate": failures / len(v), "failures": failures}
    return {
        "threshold": float(threshold),
        "groups": groups,
        "overall": _minority_cell(kinds, values, threshold),
        "worst_group_minority_dice": with_minority[worst] if worst is not None else None,
        "worst_minority_group": worst,
        "kinds": by_kind,
    }


# --------------------------------------------------------------------------------------------------------------
# MONAI metric (maths + DDP sync) and its Ignite adapter
# --------------------------------------------------------------------------------------------------------------
def _all_gather_objects(local: list[Any]) -> list[Any]:
    """Concatenate a picklable list over all DDP ranks in rank order (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return list(local)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(local))
    return [item for part in gathered for item in part]


def _as_case_list(data: Any) -> list[Any]:
    """A batch-first tensor, or a list of channel-first cases, as a list of channel-first cases."""
    if isinstance(data, (list, tuple)):
        return list(data)
    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        return list(decollate_batch(data, detach=True)) if torch.is_tensor(data) else list(data)
    raise TypeError(f"expected a batch-first tensor or a list of channel-first cases, got {type(data).__name__}.")


def _as_item_list(data: Any) -> list[Any] | None:
    if isinstance(data, (list, tuple)):
        return list(data)
    if isinstance(data, Mapping):
        return list(decollate_batch(dict(data), detach=True))
    return None


def case_metadata(batch: Any, output: Any, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per-case values of ``keys`` from an engine's ``state.batch`` and ``state.output``.

    Both may be decollated (lists of dicts, MONAI's default) or batch dicts (then decollated here).
    The batch is looked up first (data-loader metadata such as ``id``, ``stage``), then the output.
    A key absent from both gives ``None``.
    """
    b_items = _as_item_list(batch) or []
    o_items = _as_item_list(output) or []
    n = max(len(b_items), len(o_items))
    result = []
    for i in range(n):
        entry: dict[str, Any] = {}
        for k in keys:
            value = None
            for items in (b_items, o_items):
                if i < len(items) and isinstance(items[i], Mapping) and k in items[i]:
                    value = items[i][k]
                    break
            if torch.is_tensor(value) and value.numel() == 1:
                value = value.reshape(-1)[0].item()
            elif isinstance(value, (list, tuple)) and len(value) == 1:
                value = value[0]
            entry[k] = value
        result.append(entry)
    return result


class FairnessMetric(CumulativeIterationMetric):
    """Subgroup fairness of per-case segmentation scores, accumulated over an evaluation and synced over DDP.

    Each call scores every case of the batch (:func:`compute_case_metrics`) and buffers the score; the case's
    group label, id and hard flag are buffered beside it. :meth:`aggregate` all-gathers the scores (MONAI's
    tensor buffers) and the labels (``torch.distributed.all_gather_object``) in rank order, drops repeated
    ids (padding of a ``DistributedSampler``), and returns :func:`compute_group_metrics`'s ``output`` entry.

    Args:
        attribute: grouping attribute, e.g. ``"stage"``.
        metric: per-case score, ``"dice"`` or ``"nsd"``.
        output: which summary :meth:`aggregate` returns, one of :func:`metric_output_names` (for Dice:
            ``dice_all``, ``worst_group_dice``, ``group_gap``, ``es_dice``, ``es_dice_std``,
            ``worst_group_cvar``, ``hidden_failures``) or ``"all"`` for the whole dict.
        alpha: CVaR tail fraction.
        threshold: failure threshold.
        groups: expected group names (see :func:`compute_group_metrics`); ``None``: those seen.
        tolerance_mm: NSD tolerance in mm.
        spacing: voxel spacing in mm, ``None`` to read it from MetaTensor inputs.
        spatial_dims: number of spatial dimensions; ``None``: from each channel-first prediction (``ndim - 1``).

    Example::

        metric = FairnessMetric(attribute="stage", output="worst_group_dice")
        for batch in loader:
            preds = [post(p) for p in decollate_batch(model(batch["image"]))]
            metric(preds, decollate_batch(batch["label"]), subgroups=batch["stage"], ids=batch["id"])
        worst = metric.aggregate()
    """

    def __init__(
        self,
        attribute: str,
        metric: str = "dice",
        output: str = "worst_group_dice",
        alpha: float = 0.2,
        threshold: float = 0.5,
        groups: Sequence[str] | None = None,
        tolerance_mm: float = 2.0,
        spacing: float | Sequence[float] | None = None,
        spatial_dims: int | None = None,
    ) -> None:
        super().__init__()
        if metric not in BOUNDED_METRICS:
            raise ValueError(f"`metric` must be one of {BOUNDED_METRICS}, got {metric!r}.")
        valid = metric_output_names(metric)
        if output not in (*valid, "all"):
            raise ValueError(f"`output` must be one of {valid} or 'all' for metric {metric!r}, got {output!r}.")
        if not 0 < alpha <= 1:
            raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
        self.attribute = attribute
        self.metric = metric
        self.output = output
        self.alpha = alpha
        self.threshold = threshold
        self.groups = list(groups) if groups is not None else None
        self.tolerance_mm = tolerance_mm
        self.spacing = spacing
        self.spatial_dims = spatial_dims
        self._meta: list[tuple[str, str | None, bool | None]] = []

    def reset(self) -> None:
        """Clear the buffered scores and labels."""
        super().reset()
        self._meta = []

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Per-case scores of a batch-first pair ``B C [spatial]``: a float tensor ``(B,)``."""
        if y is None:
            raise ValueError("`y` (the label) is required.")
        preds, labels = _as_case_list(y_pred), _as_case_list(y)
        return self._score_cases(preds, labels)

    def _score_cases(self, preds: list[Any], labels: list[Any]) -> torch.Tensor:
        if len(preds) != len(labels):
            raise ValueError(f"got {len(preds)} predictions and {len(labels)} labels.")
        scores = [
            compute_case_metrics(
                p,
                t,
                spacing=self.spacing,
                tolerance_mm=self.tolerance_mm,
                metrics=(self.metric,),
                spatial_dims=self.spatial_dims,
            )[self.metric]
            for p, t in zip(preds, labels)
        ]
        return torch.tensor(scores, dtype=torch.float64)

    def __call__(  # type: ignore[override]
        self,
        y_pred: Any,
        y: Any,
        subgroups: Sequence[Any] | None = None,
        ids: Sequence[Any] | None = None,
        hard: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Score a batch and buffer the scores with the cases' group labels.

        Args:
            y_pred: batch-first tensor ``B C [spatial]`` or list of ``B`` channel-first cases.
            y: labels in the same layout.
            subgroups: ``B`` values of the grouping attribute (strings, numbers or 0-d tensors; ``None``
                entries become ``"unknown"``). Required.
            ids: optional ``B`` case ids (used to drop DDP padding duplicates).
            hard: optional ``B`` hard-case flags.

        Returns:
            The per-case scores of this batch, shape ``(B,)``.
        """
        preds, labels = _as_case_list(y_pred), _as_case_list(y)
        if subgroups is None:
            raise ValueError(f"`subgroups` (the per-case {self.attribute!r} values) is required.")
        if len(subgroups) != len(preds):
            raise ValueError(f"got {len(preds)} cases but {len(subgroups)} subgroup values.")
        return self.add_scores(self._score_cases(preds, labels), subgroups, ids=ids, hard=hard)

    def add_scores(
        self,
        scores: Sequence[float] | torch.Tensor,
        subgroups: Sequence[Any],
        ids: Sequence[Any] | None = None,
        hard: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Buffer per-case scores computed elsewhere (e.g. by :class:`CaseMetricsHandler`) with their labels.

        Args:
            scores: ``B`` per-case values of ``metric``.
            subgroups: ``B`` values of the grouping attribute (see :meth:`__call__`).
            ids: optional ``B`` case ids.
            hard: optional ``B`` hard-case flags.

        Returns:
            The scores as a float tensor ``(B,)``.

        Raises:
            ValueError: when the lengths differ.
        """
        values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        subgroups = list(subgroups.tolist() if torch.is_tensor(subgroups) else subgroups)
        n = len(values)
        ids_l = list(ids) if ids is not None else [None] * n
        hard_l = list(hard.tolist() if torch.is_tensor(hard) else hard) if hard is not None else [None] * n
        if not len(subgroups) == len(ids_l) == len(hard_l) == n:
            raise ValueError(
                f"got {n} cases but {len(subgroups)} subgroup values, {len(ids_l)} ids and {len(hard_l)} hard flags."
            )
        self.extend(values)
        for g, i, h in zip(subgroups, ids_l, hard_l):
            self._meta.append((_group_label(g), None if _is_missing(i) else _group_label(i), _as_bool(h)))
        return values

    def records(self) -> list[dict[str, Any]]:
        """All buffered cases of all ranks as records ``{id, <attribute>, <metric>, hard}``, duplicates dropped."""
        buffer = self.get_buffer()
        meta = _all_gather_objects(self._meta)
        if buffer is None or len(meta) == 0:
            return []
        values = buffer.reshape(-1).tolist() if torch.is_tensor(buffer) else list(buffer)
        if len(values) != len(meta):
            raise RuntimeError(f"{len(values)} gathered scores but {len(meta)} gathered labels: ranks out of step.")
        seen: set[str] = set()
        rows = []
        for v, (g, case_id, h) in zip(values, meta):
            if case_id is not None:
                if case_id in seen:
                    continue
                seen.add(case_id)
            rows.append({"id": case_id, self.attribute: g, self.metric: float(v), "hard": h})
        return rows

    def aggregate(self, output: str | None = None) -> float | dict[str, Any]:  # type: ignore[override]
        """Gather all ranks' cases and compute the fairness summary.

        Args:
            output: overrides the ``output`` given at construction.

        Raises:
            NotComputableError: when no case has been buffered on any rank.
        """
        rows = self.records()
        if not rows:
            raise NotComputableError(f"{self.__class__.__name__} must have at least one case before aggregate().")
        result = compute_group_metrics(
            rows, self.attribute, metric=self.metric, alpha=self.alpha, threshold=self.threshold, groups=self.groups
        )
        key = output or self.output
        return result if key == "all" else result[key]


def _score_of(scores: Mapping[str, float], metric: str) -> float:
    """A case's ``metric`` score, or its pixel-unit twin (``nsd_px`` for ``nsd``) when only that is there."""
    return scores[metric] if metric in scores else scores[f"{metric}_px"]


class FairnessMetricHandler(IgniteMetricHandler):
    """Ignite adapter of :class:`FairnessMetric`: a MONAI evaluator ``key_metric`` or ``additional_metrics``.

    At every iteration it takes the per-case scores from ``scores`` (a :class:`CaseMetricsHandler`, the
    evaluation's one scorer of each case) when given; otherwise it scores the cases itself from the
    ``(y_pred, y)`` that ``output_transform`` takes from ``engine.state.output`` (default
    ``from_engine(["pred", "label"])``: decollated, post-transformed, channel-first, on the grid the metric
    should be computed on). The case metadata ``attribute``, ``id_key``, ``hard_key`` come from
    ``engine.state.batch`` (falling back to ``engine.state.output``). At epoch end every rank gathers all
    cases, so attach it on **every** rank. Its value is the scalar ``output`` (e.g. worst-group Dice, or
    ``dice_all``, the mean over cases); note that ``group_gap`` and ``hidden_failures`` are lower-is-better
    (set the evaluator's ``metric_cmp_fn``).

    Args:
        attribute: grouping attribute key in the batch, e.g. ``"stage"``.
        output: the scalar to report, see :class:`FairnessMetric`.
        metric: ``"dice"`` or ``"nsd"``.
        alpha: CVaR tail fraction.
        threshold: failure threshold.
        groups: expected group names, ``None`` for those seen.
        tolerance_mm: NSD tolerance in mm.
        spacing: voxel spacing in mm, ``None`` to read it from the MetaTensor prediction.
        id_key: batch key of the case id.
        hard_key: batch key of the hard-case flag (optional in the data).
        pred_key: output key of the prediction (used by the default ``output_transform``).
        label_key: output key of the label (used by the default ``output_transform``).
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``; default
            ``from_engine([pred_key, label_key])``. Not used with ``scores``.
        save_details: store the per-case scores in ``engine.state.metric_details[name]``.
        scores: the evaluation's :class:`CaseMetricsHandler`, whose per-case ``metric`` this handler reads
            instead of computing it (then ``tolerance_mm``, ``spacing``, the keys and ``output_transform`` are
            the scorer's business; ``nsd`` reads ``nsd_px`` when the scorer measures in pixels); ``None``: score
            each case here.
        spatial_dims: number of spatial dimensions when scoring here; ``None``: from each prediction.

    Raises:
        ValueError: when ``output`` is ``"all"``, or ``scores`` does not compute ``metric``.
    """

    def __init__(
        self,
        attribute: str,
        output: str = "worst_group_dice",
        metric: str = "dice",
        alpha: float = 0.2,
        threshold: float = 0.5,
        groups: Sequence[str] | None = None,
        tolerance_mm: float = 2.0,
        spacing: float | Sequence[float] | None = None,
        id_key: str = "id",
        hard_key: str = "hard",
        pred_key: str = "pred",
        label_key: str = "label",
        output_transform: Callable | None = None,
        save_details: bool = True,
        scores: CaseMetricsHandler | None = None,
        spatial_dims: int | None = None,
    ) -> None:
        if output == "all":
            raise ValueError("`output` must name one scalar for an engine metric, not 'all'.")
        if scores is not None and metric not in scores.metrics:
            raise ValueError(f"`scores` computes {list(scores.metrics)}, not this metric's {metric!r}.")
        metric_fn = FairnessMetric(
            attribute=attribute,
            metric=metric,
            output=output,
            alpha=alpha,
            threshold=threshold,
            groups=groups,
            tolerance_mm=tolerance_mm,
            spacing=spacing,
            spatial_dims=spatial_dims,
        )
        self.attribute = attribute
        self.metric = metric
        self.id_key = id_key
        self.hard_key = hard_key
        self.scores = scores
        if output_transform is None:
            output_transform = from_engine([pred_key, label_key])
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    def iteration_completed(self, engine: Any) -> None:
        """Read this iteration's scores (or predictions and labels) and case metadata, and update the metric."""
        meta = case_metadata(engine.state.batch, engine.state.output, (self.attribute, self.id_key, self.hard_key))
        if self.scores is not None:
            self.update_scores([_score_of(s, self.metric) for s in self.scores.case_scores(engine)], meta)
            return
        y_pred, y = self._output_transform(engine.state.output)
        self.update((y_pred, y, meta))

    @reinit__is_reduced
    def update_scores(self, scores: Sequence[float], meta: Sequence[Mapping[str, Any]]) -> None:
        """Update with per-case scores computed elsewhere and their metadata (one dict per case).

        Raises:
            ValueError: when the numbers of scores and metadata entries differ.
        """
        if len(meta) != len(scores):
            raise ValueError(f"got metadata for {len(meta)} cases but {len(scores)} scores.")
        self.metric_fn.add_scores(
            scores,
            subgroups=[m.get(self.attribute) for m in meta],
            ids=[m.get(self.id_key) for m in meta],
            hard=[m.get(self.hard_key) for m in meta],
        )

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Update with ``(y_pred, y, metadata)``; ``metadata`` is one dict per case (see :func:`case_metadata`).

        Raises:
            ValueError: when ``output`` is not a triple.
        """
        if len(output) != 3:
            raise ValueError(f"output must be (y_pred, y, metadata), got {len(output)} items.")
        y_pred, y, meta = output
        n = len(_as_case_list(y_pred))
        if len(meta) != n:
            raise ValueError(f"got metadata for {len(meta)} cases but {n} predictions.")
        self.metric_fn(
            y_pred,
            y,
            subgroups=[m.get(self.attribute) for m in meta],
            ids=[m.get(self.id_key) for m in meta],
            hard=[m.get(self.hard_key) for m in meta],
        )
