"""Fairness report of an evaluation run: per-case table, subgroup metrics with intervals, offline HTML page.

:func:`write_fairness_report` writes, into ``<out_dir>/fairness/``:

- ``per_case.csv``: one row per case: ``id``, every attribute (``subtype`` among them when the cases have
  one), ``dice``, ``hd95`` (mm), ``nsd``, ``hard``; multi-class cases add ``iou`` after ``dice`` and
  ``dice_<class>``, ``iou_<class>`` per foreground class after ``nsd``; distances in pixels are the columns
  ``hd95_px``, ``nsd_px`` instead of ``hd95``, ``nsd``;
- ``metrics.json``: ``settings``, ``overall`` (mean/median/std/min/max of each per-case metric) and, per
  grouping attribute, the subgroup statistics of Dice and NSD with 95% bootstrap intervals
  (:func:`scripts.fairness_stats.bootstrap_group_metrics`), the per-group HD95 mean and median, the
  intra-group worst cases and, when the cases carry a hidden ``subtype``, ``minority``: minority and
  majority Dice and the minority failure rate per group (:func:`scripts.fairness_metrics.minority_metrics`);
  for multi-class cases ``classes`` (the foreground class names) and, per grouping, ``per_class``: each class's
  Dice, IoU, ES-Dice and ES-IoU and group means (:func:`per_class_metrics`, as FairSeg reports them);
  plus ``routing``: expert usage per subgroup and dMoE layer (or ``null``);
- ``report.html``: a self-contained page (no network resource; PNGs beside it in ``plots/`` and
  ``thumbs/``, drawn with matplotlib's Agg canvas): the headline table, per-group Dice box plots, the
  per-class table of multi-class runs, the hidden-minority table, the worst cases of each group with
  image/label/prediction thumbnails (a slice of a 3D case, the whole 2D image, RGB in colour; one colour per
  class for multi-class masks), and the routing heat-map.

:class:`FairnessReportHandler` (settings in one :class:`ReportSettings`) collects the same per-case data from a
MONAI evaluator, reading each case's scores from the evaluation's
:class:`scripts.fairness_metrics.CaseMetricsHandler` (the one place they are computed), and calls
:func:`write_fairness_report` at the end of each evaluation epoch.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite import distributed as idist
from monai.data import MetaTensor

from scripts.fairness_metrics import (
    SCORE_COLUMNS,
    SUBTYPE_KEY,
    CaseMetricsHandler,
    _all_gather_objects,
    _as_bool,
    _group_label,
    _is_missing,
    as_binary_mask,
    case_metadata,
    class_map,
    class_names_of,
    group_statistics,
    infer_spatial_dims,
    metric_output_names,
    minority_metrics,
    num_channels,
    records_to_table,
)
from scripts.fairness_stats import FAIRNESS_DIR, METRICS_FILE, PER_CASE_FILE, bootstrap_group_metrics

__all__ = [
    "FairnessReportHandler",
    "ReportSettings",
    "make_thumbnail",
    "per_class_metrics",
    "routing_from_network",
    "routing_summary",
    "worst_cases",
    "write_fairness_report",
]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
Thumbnail = tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------------------------
# thumbnails and routing
# --------------------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _mask_volume(x: Any, spatial_dims: int, n_classes: int | None) -> np.ndarray:
    """Foreground mask (bool) of a binary case, class-index map (uint8) of a multi-class one, ``[spatial]``."""
    if n_classes is None:
        return as_binary_mask(x, spatial_dims).numpy()
    return class_map(x, n_classes, spatial_dims).numpy().astype(np.uint8)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale to ``uint8`` between the 1st and 99th percentiles of all values (all channels together)."""
    lo, hi = np.percentile(arr, [1, 99]) if arr.size else (0.0, 1.0)
    return (np.clip((arr - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255).astype(np.uint8)


def _thumbnail_image(image: Any | None, shape: tuple[int, ...], spatial_dims: int) -> np.ndarray | None:
    """The image on the mask grid: ``[spatial]``, or ``[spatial] + (3,)`` for a 2D RGB image; else ``None``."""
    if image is None:
        return None
    arr = _to_numpy(image).astype(np.float32)
    if arr.ndim == spatial_dims + 1:
        arr = np.moveaxis(arr, 0, -1) if spatial_dims == 2 and arr.shape[0] == 3 else arr[0]
    if arr.shape[:spatial_dims] == shape and arr.ndim in (spatial_dims, spatial_dims + 1):
        return arr
    logger.debug("thumbnail image grid %s differs from the label grid %s: no background", arr.shape, shape)
    return None


def _slice_index(masks: Sequence[np.ndarray], ax: int) -> int:
    """Centre of the first non-empty mask's extent along ``ax`` (the middle slice when all are empty)."""
    other = tuple(i for i in range(masks[0].ndim) if i != ax)
    for mask in masks:
        present = np.flatnonzero(mask.any(axis=other))
        if present.size:
            return int(round((present[0] + present[-1]) / 2))
    return masks[0].shape[ax] // 2


def make_thumbnail(
    image: Any | None,
    label: Any,
    pred: Any,
    axis: int = -1,
    max_size: int = 160,
    spatial_dims: int | None = 3,
    n_classes: int | None = None,
) -> Thumbnail:
    """Middle slice through the target of a 3D case, or the whole of a 2D case, downsampled for the report.

    3D: the slice index along ``axis`` is the centre of the label's extent on that axis (the prediction's
    when the label is empty, the middle slice when both are). 2D: the image itself, its second axis reversed
    so that the report (which draws axis 0 left to right and axis 1 upwards, as for volumes) shows row 0 of a
    picture read by MONAI (width axis first) at the top. The result is subsampled by an integer stride so its
    longer side is at most ``max_size``; the image is scaled to ``uint8`` between its 1st and 99th percentiles.

    Args:
        image: ``[spatial]`` or ``C[spatial]`` (channel 0 is shown; a 2D image of 3 channels is shown in colour,
            RGB), on the grid of ``label``; ``None`` or a different grid gives a black background.
        label: label of the case, ``[spatial]`` or ``C[spatial]`` (see ``as_binary_mask``; a class-index map
            or one-hot for multi-class).
        pred: prediction on the same grid.
        axis: slice axis among the spatial axes of a 3D case (``-1``: the last, axial for RAS/LPS volumes).
        max_size: longest side of the thumbnail in pixels.
        spatial_dims: number of spatial dimensions (2 or 3); ``None``: ``pred.ndim - 1`` (channel-first).
        n_classes: classes of a multi-class case; ``None``: ``C`` when ``pred`` has ``C > 2`` channels, else
            binary.

    Returns:
        ``(image2d uint8, label2d, pred2d)``: the image ``(h, w)`` or ``(h, w, 3)``; the masks ``(h, w)``, bool
        (foreground) for a binary case, uint8 class indices for a multi-class one.
    """
    sd = infer_spatial_dims(pred) if spatial_dims is None else int(spatial_dims)
    if sd not in (2, 3):
        raise ValueError(f"`spatial_dims` must be 2 or 3, got {sd}.")
    channels = num_channels(pred, sd)
    n_classes = channels if n_classes is None and channels > 2 else n_classes
    lab, prd = _mask_volume(label, sd, n_classes), _mask_volume(pred, sd, n_classes)
    if lab.shape != prd.shape:
        raise ValueError(f"label and prediction grids differ: {lab.shape} vs {prd.shape}.")
    img = _thumbnail_image(image, lab.shape, sd)
    if sd == 3:
        ax = axis % sd
        index = _slice_index([lab > 0, prd > 0], ax)
        lab, prd = np.take(lab, index, axis=ax), np.take(prd, index, axis=ax)
        img = None if img is None else np.take(img, index, axis=ax)
    else:
        lab, prd, img = lab[:, ::-1], prd[:, ::-1], None if img is None else img[:, ::-1]
    stride = max(1, math.ceil(max(lab.shape) / max_size))
    lab, prd = lab[::stride, ::stride], prd[::stride, ::stride]
    img2 = np.zeros(lab.shape, dtype=np.uint8) if img is None else _to_uint8(img[::stride, ::stride])
    return img2, np.ascontiguousarray(lab), np.ascontiguousarray(prd)


def routing_summary(counts: Mapping[str, Any], subgroups: Sequence[str]) -> dict[str, Any]:
    """Expert usage per subgroup and layer, as counts and as row fractions.

    Args:
        counts: ``{layer_name: (G + 1, E)}`` counts of how often each expert was chosen for each subgroup
            (last row: unknown subgroup), or ``(G, E)`` when ``subgroups`` names every row.
        subgroups: the ``G`` subgroup names (``"unknown"`` is appended for a ``G + 1``-th row).

    Returns:
        ``{"subgroups": [...], "n_experts": E, "layers": {layer: {"counts": [[...]], "fractions": [[...]]}}}``;
        a row with no count has fractions 0.

    Raises:
        ValueError: when a layer's row count matches neither ``G`` nor ``G + 1`` or the layers' expert counts
            differ, or there is no layer.
    """
    if not counts:
        raise ValueError("routing `counts` holds no layer.")
    names = [str(s) for s in subgroups]
    layers: dict[str, Any] = {}
    n_experts = None
    for layer, c in counts.items():
        arr = _to_numpy(c).astype(float)
        if arr.ndim != 2:
            raise ValueError(f"routing counts of layer {layer!r} must be (subgroups, experts), got {arr.shape}.")
        if arr.shape[0] == len(names) + 1:
            row_names = [*names, "unknown"]
        elif arr.shape[0] == len(names):
            row_names = names
        else:
            raise ValueError(
                f"layer {layer!r} has {arr.shape[0]} routing rows but {len(names)} subgroup names {names}: "
                "expected G or G + 1 (unknown) rows."
            )
        if n_experts is not None and arr.shape[1] != n_experts:
            raise ValueError(f"layer {layer!r} has {arr.shape[1]} experts, other layers {n_experts}.")
        n_experts = arr.shape[1]
        totals = arr.sum(axis=1, keepdims=True)
        fractions = np.divide(arr, totals, out=np.zeros_like(arr), where=totals > 0)
        layers[str(layer)] = {"counts": arr.tolist(), "fractions": fractions.tolist()}
        names_out = row_names
    return {"subgroups": names_out, "n_experts": int(n_experts or 0), "layers": layers}


def routing_from_network(network: Any, subgroups: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Read a dMoE network's routing statistics as a :func:`routing_summary`.

    The network (or ``network.module`` under DDP) must have ``routing_stats()`` returning either
    ``{layer: (G + 1, E) counts}``, a pair ``(counts, subgroup_names)`` or a dict with ``"counts"`` and
    ``"subgroups"``. Subgroup names come from ``subgroups``, else from the result, else from the network's
    ``subgroup_names`` or ``subgroups`` attribute. Returns ``None`` when the network has no routing stats.
    """
    net = getattr(network, "module", network)
    fn = getattr(net, "routing_stats", None)
    if fn is None:
        return None
    stats = fn()
    names = None
    if isinstance(stats, tuple) and len(stats) == 2:
        stats, names = stats
    elif isinstance(stats, Mapping) and "counts" in stats:
        names = stats.get("subgroups")
        stats = stats["counts"]
    if not stats:
        return None
    names = subgroups or names or getattr(net, "subgroup_names", None) or getattr(net, "subgroups", None)
    if names is None:
        raise ValueError("routing stats need subgroup names: pass `routing_subgroups` to the handler.")
    return routing_summary(stats, list(names))


# --------------------------------------------------------------------------------------------------------------
# report writing
# --------------------------------------------------------------------------------------------------------------
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "case"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _plot_groups(rows: list[dict], attribute: str, metric: str, order: list[str], threshold: float, path: Path):
    fig = _figure(max(3.5, 1.1 * len(order) + 1.5), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    data = [[r[metric] for r in rows if _group_label(r.get(attribute)) == g] for g in order]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(order) + 1), labels=order)
    rng = np.random.default_rng(0)
    for j, values in enumerate(data, start=1):
        ax.scatter(j + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.7, color="tab:blue", zorder=3)
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"failure threshold {threshold:g}")
    ax.set_xlabel(attribute)
    ax.set_ylabel(metric)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title(f"{metric} per {attribute} group")
    fig.tight_layout()
    fig.savefig(path)


def _overlay(ax: Any, mask: np.ndarray, colour: str) -> None:
    """Draw a foreground mask (bool: one colour map) or a class-index map (one ``tab10`` colour per class)."""
    shown = mask.T
    if mask.dtype == bool:
        data, cmap, vmax = shown.astype(float), colour, 1.2
    else:
        data, cmap, vmax = shown.astype(float), "tab10", 9.0
    ax.imshow(np.ma.masked_where(shown == 0, data), cmap=cmap, alpha=0.5, vmin=0, vmax=vmax, origin="lower")


def _plot_thumbnail(thumb: Thumbnail, title: str, path: Path) -> None:
    img, lab, prd = (np.asarray(t) for t in thumb)
    rgb = img.ndim == 3 and img.shape[-1] == 3
    if not (img.ndim == 2 or rgb) or lab.shape != img.shape[:2] or prd.shape != img.shape[:2]:
        raise ValueError(
            f"a thumbnail is an image (h, w) or (h, w, 3) and two (h, w) masks, got {img.shape}, {lab.shape}, "
            f"{prd.shape}."
        )
    fig = _figure(6.0, 2.3)
    for k, (overlay, name, colour) in enumerate(
        ((None, "image", None), (lab, "label", "Greens"), (prd, "prediction", "Reds"))
    ):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(img.transpose(1, 0, 2) if rgb else img.T, cmap=None if rgb else "gray", origin="lower")
        if overlay is not None:
            _overlay(ax, overlay, colour)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot_routing(summary: Mapping[str, Any], path: Path) -> None:
    layers = list(summary["layers"])
    names = summary["subgroups"]
    n_exp = summary["n_experts"]
    fig = _figure(max(4.0, (0.35 * n_exp + 1.6) * len(layers)), 0.35 * len(names) + 1.8)
    vmax = max([float(np.max(summary["layers"][name]["fractions"])) for name in layers] + [1e-6])
    im = None
    for k, layer in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), k + 1)
        im = ax.imshow(
            np.asarray(summary["layers"][layer]["fractions"]), vmin=0, vmax=vmax, cmap="viridis", aspect="auto"
        )
        ax.set_title(layer, fontsize=8)
        ax.set_xticks(range(n_exp), labels=[str(e) for e in range(n_exp)], fontsize=6)
        ax.set_yticks(range(len(names)), labels=names if k == 0 else [""] * len(names), fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, fraction=0.02, label="share of routing choices")
    fig.savefig(path)


def worst_cases(
    records: Any, attribute: str, metric: str = "dice", alpha: float = 0.2, n_worst: int | None = 5
) -> dict[str, list[dict[str, Any]]]:
    """The intra-group worst cases: per group the ``ceil(alpha * n_g)`` lowest-scoring cases (the CVaR tail,
    at least one), at most ``n_worst``, lowest first; ties broken by id."""
    rows = records_to_table(records)
    out: dict[str, list[dict[str, Any]]] = {}
    for g in sorted({_group_label(r.get(attribute)) for r in rows}):
        members = sorted(
            (r for r in rows if _group_label(r.get(attribute)) == g), key=lambda r: (r[metric], str(r.get("id")))
        )
        k = max(1, math.ceil(round(alpha * len(members), 9)))
        out[g] = members[: k if n_worst is None else min(k, n_worst)]
    return out


def _describe(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "&ndash;"
    return f"{x:.{digits}f}" if isinstance(x, float) else html.escape(str(x))


def _value(key: str, value: Any) -> str:
    return f'<span data-key="{html.escape(key)}">{_fmt(value)}</span>'


def _cell(key: str, value: Any, ci: Sequence[float] | None = None) -> str:
    ci_html = f' <span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span>' if ci is not None else ""
    return f"<td>{_value(key, value)}{ci_html}</td>"


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:0.6em 0 1.2em}
th,td{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
.ci{color:#777;font-size:11px}.fail{color:#b00}
img{max-width:100%}
"""


def write_fairness_report(
    out_dir: str | Path,
    records: Any,
    groupings: Sequence[str],
    routing: Mapping[str, Any] | None = None,
    thumbnails: Mapping[str, Thumbnail] | None = None,
    alpha: float = 0.2,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    n_worst: int | None = 5,
    settings: Mapping[str, Any] | None = None,
    title: str = "Fairness report",
) -> dict[str, Path]:
    """Write ``per_case.csv``, ``metrics.json`` and ``report.html`` (with its PNGs) into ``out_dir/fairness``.

    Args:
        out_dir: the run's output folder; files go to its ``fairness`` sub-folder (created).
        records: per-case records (sequence of mappings or DataFrame) with ``id``, the grouping attributes,
            ``dice`` and optionally ``hd95`` (or ``hd95_px``), ``nsd`` (or ``nsd_px``), ``hard``, ``subtype``
            (``"majority"`` or a hidden minority kind: adds the ``minority`` block), and for multi-class cases
            ``iou`` and the per-class ``dice_<class>``, ``iou_<class>`` (add ``classes`` and, per grouping,
            ``per_class``: see :func:`per_class_metrics`), and further attributes (all kept in the CSV).
        groupings: grouping attributes to analyse, e.g. ``["stage", "institution"]``.
        routing: optional expert usage: a :func:`routing_summary` dict, or ``{"counts": {layer: (G+1, E)},
            "subgroups": names}``.
        thumbnails: optional ``{case id: (image2d, label2d, pred2d)}`` (see :func:`make_thumbnail`); the worst
            cases that have one are shown with it.
        alpha: CVaR tail fraction (also the share of each group listed as worst cases).
        threshold: failure threshold on Dice / NSD (also of the minority failure rate).
        n_boot: bootstrap draws per interval.
        seed: bootstrap seed.
        confidence: interval level.
        n_worst: at most this many worst cases listed per group (``None``: the whole CVaR tail).
        settings: extra settings recorded in ``metrics.json`` (e.g. NSD tolerance, checkpoint).
        title: page title.

    Returns:
        ``{"per_case": path, "metrics": path, "report": path}``.

    Raises:
        NotComputableError: when there is no record.
        ValueError: missing ids or grouping columns, repeated ids, non-finite scores.
    """
    rows, present_metrics = _checked_rows(records, groupings)
    groupings = list(groupings)
    fair_dir = Path(out_dir) / FAIRNESS_DIR
    (fair_dir / "plots").mkdir(parents=True, exist_ok=True)
    (fair_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    per_case_path = fair_dir / PER_CASE_FILE
    attr_cols = _write_per_case(rows, present_metrics, per_case_path)

    for r in rows:
        for m in present_metrics:
            r[m] = float(r[m])
    bounded = [m for m in ("dice", "nsd", "nsd_px") if m in present_metrics]
    hd_key = next((m for m in ("hd95", "hd95_px") if m in present_metrics), None)
    classes = class_names_of(present_metrics)
    metrics: dict[str, Any] = {
        "format": "fairdro-fairness/1",
        "n_cases": len(rows),
        "settings": {
            "alpha": float(alpha),
            "threshold": float(threshold),
            "n_boot": int(n_boot),
            "seed": int(seed),
            "confidence": float(confidence),
            "groupings": groupings,
            **dict(settings or {}),
        },
        "overall": {m: _describe([r[m] for r in rows]) for m in present_metrics},
        "groupings": {},
        "routing": None,
    }
    if classes:
        metrics["classes"] = classes
    boot = {"n_boot": n_boot, "seed": seed, "confidence": confidence, "alpha": alpha, "threshold": threshold}
    worst: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for attribute in groupings:
        entry = _grouping_entry(rows, attribute, bounded, hd_key, boot)
        if classes:
            entry["per_class"] = per_class_metrics(rows, attribute, classes, list(entry["dice"]["groups"]))
        worst[attribute] = worst_cases(rows, attribute, "dice", alpha=alpha, n_worst=n_worst)
        entry["worst_cases"] = {g: [str(r["id"]) for r in cases] for g, cases in worst[attribute].items()}
        minority = minority_metrics(rows, attribute, threshold=threshold)
        if minority is not None:
            entry["minority"] = minority
        metrics["groupings"][attribute] = entry
    if routing is not None:
        metrics["routing"] = (
            dict(routing) if "layers" in routing else routing_summary(routing["counts"], routing["subgroups"])
        )
    metrics_path = fair_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")

    images, thumbs_written = _write_figures(fair_dir, rows, metrics, bounded, worst, thumbnails)
    report_path = fair_dir / REPORT_FILE
    report_path.write_text(_render_html(title, metrics, rows, groupings, worst, images, thumbs_written, attr_cols))
    logger.info("fairness report of %d cases written to %s", len(rows), report_path)
    return {"per_case": per_case_path, "metrics": metrics_path, "report": report_path}


def _checked_rows(records: Any, groupings: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records as rows, and the per-case metrics every row has; refuses what a report cannot use."""
    from scripts.fairness_metrics import NotComputableError

    rows = records_to_table(records)
    if not rows:
        raise NotComputableError("a fairness report needs at least one case; got no record.")
    ids = [r.get("id") for r in rows]
    if any(_is_missing(i) for i in ids):
        raise ValueError("every record needs an 'id'.")
    ids = [str(i) for i in ids]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"repeated case id(s) {dup[:10]}.")
    per_class = [f"{m}_{c}" for c in class_names_of(rows[0]) for m in ("dice", "iou")]
    candidates = [*SCORE_COLUMNS, *per_class]
    present_metrics = [m for m in candidates if all(m in r and not _is_missing(r[m]) for r in rows)]
    if "dice" not in present_metrics:
        raise ValueError("every record needs a 'dice' score.")
    for m in present_metrics:
        bad = [str(r["id"]) for r in rows if not math.isfinite(float(r[m]))]
        if bad:
            raise ValueError(f"non-finite {m} for case(s) {bad[:10]}.")
    missing = [g for g in groupings if all(g not in r for r in rows)]
    if missing:
        raise ValueError(f"grouping attribute(s) {missing} are in no record.")
    return rows, present_metrics


def _write_per_case(rows: list[dict[str, Any]], present_metrics: list[str], path: Path) -> list[str]:
    """Write ``per_case.csv`` (id, every attribute, the metrics, hard); returns the attribute columns.

    The metric columns are those of ``present_metrics``: ``dice``, ``iou``, ``hd95``/``hd95_px``,
    ``nsd``/``nsd_px`` (those present), then ``dice_<class>``, ``iou_<class>`` per foreground class."""
    attr_cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in ("id", "hard", *SCORE_COLUMNS, *present_metrics) and k not in attr_cols:
                attr_cols.append(k)
    has_hard = any(not _is_missing(r.get("hard")) for r in rows)
    columns = ["id", *attr_cols, *present_metrics, *(["hard"] if has_hard else [])]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            line = []
            for c in columns:
                v = r.get(c)
                if c in present_metrics:
                    line.append(repr(float(v)))
                elif c == "hard":
                    h = _as_bool(v)
                    line.append("" if h is None else str(h).lower())
                else:
                    line.append("" if _is_missing(v) else _group_label(v))
            writer.writerow(line)
    return attr_cols


def _grouping_entry(
    rows: list[dict[str, Any]], attribute: str, bounded: list[str], hd_key: str | None, boot: Mapping[str, Any]
) -> dict[str, Any]:
    """Group metrics with bootstrap intervals for each bounded metric (Dice, NSD), and HD95 means and medians
    (under ``hd_key``: ``hd95`` in mm or ``hd95_px`` in pixels; none when ``None``)."""
    entry: dict[str, Any] = {m: bootstrap_group_metrics(rows, attribute, metric=m, **boot) for m in bounded}
    if hd_key is not None:
        order = list(entry["dice"]["groups"])
        entry[hd_key] = {
            "groups": {
                g: {
                    "n": entry["dice"]["groups"][g]["n"],
                    "mean": float(np.mean([r[hd_key] for r in rows if _group_label(r.get(attribute)) == g])),
                    "median": float(np.median([r[hd_key] for r in rows if _group_label(r.get(attribute)) == g])),
                }
                for g in order
            }
        }
    return entry


def per_class_metrics(
    records: Any, attribute: str, class_names: Sequence[str], groups: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per-class Dice and IoU fairness over one grouping attribute, as FairSeg (Tian et al., ICLR 2024) reports.

    For every class ``c`` and ``M`` in Dice, IoU (the per-case columns ``dice_<c>``, ``iou_<c>``):
    ``M_all`` the mean over cases, ``M_g`` the mean over the cases of group ``g``, and
    ``ES-M = M_all / (1 + sum_g |M_all - M_g|)`` (point estimates, no interval).

    Args:
        records: per-case records with ``attribute`` and the per-class columns.
        attribute: grouping column; a missing value is the group ``"unknown"``.
        class_names: the foreground classes to report.
        groups: group order; ``None``: the groups present, sorted by name.

    Returns:
        ``{c: {"dice_all", "iou_all", "es_dice", "es_iou", "worst_group_dice", "worst_group_iou",
        "worst_group", "groups": {g: {"n", "dice", "iou"}}}}`` (``worst_group``: lowest group Dice).
    """
    rows = records_to_table(records)
    labels = np.array([_group_label(r.get(attribute)) for r in rows], dtype=object)
    order = list(groups) if groups is not None else sorted(set(labels))
    out: dict[str, dict[str, Any]] = {}
    for c in class_names:
        entry: dict[str, Any] = {}
        means = {}
        for m in ("dice", "iou"):
            values = np.array([float(r[f"{m}_{c}"]) for r in rows], dtype=float)
            st = group_statistics({g: values[labels == g] for g in order}, metric=m)
            entry.update({k: float(st[k]) for k in (f"{m}_all", f"es_{m}", f"worst_group_{m}")})
            means[m] = st["group_mean"]
        entry["worst_group"] = order[int(np.argmin(means["dice"]))]
        entry["groups"] = {
            g: {"n": int((labels == g).sum()), "dice": float(means["dice"][j]), "iou": float(means["iou"][j])}
            for j, g in enumerate(order)
        }
        out[c] = entry
    return out


def _write_figures(
    fair_dir: Path,
    rows: list[dict[str, Any]],
    metrics: Mapping[str, Any],
    bounded: list[str],
    worst: Mapping[str, Mapping[str, list[dict[str, Any]]]],
    thumbnails: Mapping[str, Thumbnail] | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Box plots per grouping and metric, thumbnails of the listed worst cases, the routing heat-map.

    Returns:
        ``(images, thumbnails written)``: report-relative paths keyed ``"<attribute>/<metric>"`` (and
        ``"routing"``), and by case id.
    """
    threshold = metrics["settings"]["threshold"]
    images: dict[str, str] = {}
    for attribute, entry in metrics["groupings"].items():
        order = list(entry["dice"]["groups"])
        for m in bounded:
            rel = f"plots/{m}_by_{_safe_name(attribute)}.png"
            _plot_groups(rows, attribute, m, order, threshold, fair_dir / rel)
            images[f"{attribute}/{m}"] = rel
    thumbs_written: dict[str, str] = {}
    listed = {str(r["id"]) for by_g in worst.values() for cases in by_g.values() for r in cases}
    for case_id in sorted(listed):
        if thumbnails and case_id in thumbnails:
            rel = f"thumbs/{_safe_name(case_id)}.png"
            row = next(r for r in rows if str(r["id"]) == case_id)
            _plot_thumbnail(thumbnails[case_id], f"{case_id}: dice {row['dice']:.3f}", fair_dir / rel)
            thumbs_written[case_id] = rel
    if metrics["routing"] is not None:
        _plot_routing(metrics["routing"], fair_dir / "plots" / "routing.png")
        images["routing"] = "plots/routing.png"
    return images, thumbs_written


def _selection_line(selection: Any) -> list[str]:
    """One paragraph saying which training epoch the evaluated weights come from (nothing when unknown)."""
    if not isinstance(selection, Mapping) or selection.get("selected_epoch") is None:
        return []
    value = selection.get("selected_value")
    shown = "" if value is None else f" = {float(value):.4f}"
    return [
        f"<p>Weights: training epoch {int(selection['selected_epoch'])}, selected by "
        f"{html.escape(str(selection.get('key_metric')))}{shown} on the validation split.</p>"
    ]


def _render_html(
    title: str,
    metrics: Mapping[str, Any],
    rows: list[dict[str, Any]],
    groupings: list[str],
    worst: Mapping[str, Mapping[str, list[dict[str, Any]]]],
    images: Mapping[str, str],
    thumbs: Mapping[str, str],
    attr_cols: list[str],
) -> str:
    s = metrics["settings"]
    level = round(100 * s["confidence"])
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{metrics['n_cases']} cases. Intervals: {level}% percentile bootstrap, {s['n_boot']} draws, cases "
        f"resampled within each group, seed {s['seed']}. CVaR over the worst {s['alpha']:g} of each group; a "
        f"case fails when its Dice is below {s['threshold']:g}. ES-Dice = Dice / (1 + &Sigma;<sub>g</sub> "
        "|Dice &minus; Dice<sub>g</sub>|); ES-Dice (std) = Dice / (1 + sample std of the group means).</p>",
        *_classes_line(metrics.get("classes")),
        *_selection_line(s.get("model_selection")),
        *_headline_html(metrics, groupings),
        *_overall_html(metrics["overall"]),
    ]
    for attribute in groupings:
        entry = metrics["groupings"][attribute]
        out += _groups_html(attribute, entry)
        if "per_class" in entry:
            out += _per_class_html(attribute, entry["per_class"])
        if "minority" in entry:
            out += _minority_table(attribute, entry["minority"])
        for m in ("dice", "nsd", "nsd_px"):
            if f"{attribute}/{m}" in images:
                out.append(
                    f'<img src="{html.escape(images[attribute + "/" + m])}" alt="{m} by {html.escape(attribute)}">'
                )
        out += _worst_cases_html(attribute, worst[attribute], thumbs, attr_cols, s["threshold"])
    out.append("<h2>Expert routing</h2>")
    if "routing" in images:
        out.append(
            "<p>Share of each expert among the routing choices, per subgroup (rows) and dMoE layer "
            "(panels). Different rows mean subgroups use different experts.</p>"
        )
        out.append(f'<img src="{images["routing"]}" alt="routing heat-map">')
    else:
        out.append("<p>No routing statistics (network without dMoE layers, or none given).</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _headline_html(metrics: Mapping[str, Any], groupings: list[str]) -> list[str]:
    """The headline table: one row per grouping attribute."""
    out = [
        "<h2>Headline</h2>",
        "<table><tr><th>grouping</th><th>groups</th><th>Dice (all)</th><th>worst-group Dice</th>"
        "<th>worst group</th><th>group gap</th><th>ES-Dice</th><th>ES-Dice (std)</th><th>worst-group CVaR</th>"
        "<th>hidden failures</th><th>hard failures / hard</th></tr>",
    ]
    names = metric_output_names("dice")
    for attribute in groupings:
        d = metrics["groupings"][attribute]["dice"]
        key = f"{attribute}.dice"
        cells = [f"<td>{html.escape(attribute)}</td>", f"<td>{d['n_groups']}</td>"]
        for name in names[:2]:
            cells.append(_cell(f"{key}.{name}", d[name], d["ci"].get(name)))
        cells.append(f"<td>{html.escape(d['worst_group'])}</td>")
        for name in names[2:6]:
            cells.append(_cell(f"{key}.{name}", d[name], d["ci"].get(name)))
        cells.append(_cell(f"{key}.hidden_failures", d["hidden_failures"]))
        hard = f"{d['hard_failures']} / {d['hard_cases']}" if "hard_cases" in d else "&ndash;"
        cells.append(f"<td>{hard}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _overall_html(overall: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Summary statistics of every per-case metric over all cases."""
    out = [
        "<h2>All cases</h2><table><tr><th>metric</th><th>mean</th><th>median</th><th>std</th><th>min</th>"
        "<th>max</th></tr>"
    ]
    for m, st in overall.items():
        unit = {"hd95": " (mm)", "hd95_px": " (px)", "nsd_px": " (px tolerance)"}.get(m, "")
        out.append(f"<tr><td>{m}{unit}</td>" + "".join(_cell(f"overall.{m}.{k}", st[k]) for k in st) + "</tr>")
    out.append("</table>")
    return out


def _groups_html(attribute: str, entry: Mapping[str, Any]) -> list[str]:
    """The per-group table of one grouping attribute."""
    d = entry["dice"]
    nsd_key = next((k for k in ("nsd", "nsd_px") if k in entry), None)
    hd_key = next((k for k in ("hd95", "hd95_px") if k in entry), None)
    unit = "px" if hd_key == "hd95_px" else "mm"
    out = [f"<h2>By {html.escape(attribute)}</h2>"]
    header = "<tr><th>group</th><th>n</th><th>Dice</th><th>std</th><th>CVaR</th><th>hidden failures</th>"
    header += "<th>hard failures / hard</th>" if "hard_cases" in d else ""
    header += "<th>NSD</th>" if nsd_key else ""
    header += f"<th>HD95 mean ({unit})</th><th>HD95 median ({unit})</th>" if hd_key else ""
    out.append("<table>" + header + "</tr>")
    for g, ge in d["groups"].items():
        k = f"{attribute}.dice.groups.{g}"
        cells = [
            f"<td>{html.escape(g)}</td>",
            f"<td>{ge['n']}</td>",
            _cell(f"{k}.dice", ge["dice"], ge["ci"]["dice"]),
            _cell(f"{k}.std", ge["std"]),
            _cell(f"{k}.cvar", ge["cvar"], ge["ci"]["cvar"]),
            _cell(f"{k}.hidden_failures", ge["hidden_failures"]),
        ]
        if "hard_cases" in ge:
            cells.append(f"<td>{ge['hard_failures']} / {ge['hard_cases']}</td>")
        if nsd_key:
            cells.append(_cell(f"{attribute}.{nsd_key}.groups.{g}.{nsd_key}", entry[nsd_key]["groups"][g][nsd_key]))
        if hd_key:
            h = entry[hd_key]["groups"][g]
            cells += [
                _cell(f"{attribute}.{hd_key}.groups.{g}.mean", h["mean"]),
                _cell(f"{attribute}.{hd_key}.groups.{g}.median", h["median"]),
            ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _worst_cases_html(
    attribute: str,
    worst: Mapping[str, list[dict[str, Any]]],
    thumbs: Mapping[str, str],
    attr_cols: list[str],
    threshold: float,
) -> list[str]:
    """The intra-group worst cases of one grouping attribute, with their thumbnails."""
    first = next((r for cases in worst.values() for r in cases), {})
    hd_key, nsd_key = ("hd95_px", "nsd_px") if "hd95_px" in first or "nsd_px" in first else ("hd95", "nsd")
    out = [
        f"<h3>Intra-group worst cases by {html.escape(attribute)}</h3>",
        "<table><tr><th>group</th><th>id</th>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in attr_cols if c != attribute)
        + f"<th>Dice</th><th>HD95 ({'px' if hd_key == 'hd95_px' else 'mm'})</th><th>NSD</th><th>hard</th>"
        "<th>slices</th></tr>",
    ]
    for g, cases in worst.items():
        for r in cases:
            cid = str(r["id"])
            cls = ' class="fail"' if r["dice"] < threshold else ""
            thumb = ""
            if cid in thumbs:
                thumb = f'<img src="{html.escape(thumbs[cid])}" alt="{html.escape(cid)}" width="420">'
            hard = _as_bool(r.get("hard"))
            out.append(
                f"<tr><td>{html.escape(g)}</td><td>{html.escape(cid)}</td>"
                + "".join(f"<td>{html.escape(_group_label(r.get(c)))}</td>" for c in attr_cols if c != attribute)
                + f"<td{cls}>{r['dice']:.4f}</td><td>{_fmt(r.get(hd_key, '-'), 2)}</td>"
                f"<td>{_fmt(r.get(nsd_key, '-'))}</td><td>{'' if hard is None else str(hard).lower()}</td>"
                f"<td>{thumb}</td></tr>"
            )
    out.append("</table>")
    return out


def _classes_line(classes: Sequence[str] | None) -> list[str]:
    """One paragraph on how multi-class cases are scored (nothing for binary cases)."""
    if not classes:
        return []
    names = ", ".join(html.escape(c) for c in classes)
    return [
        f"<p>Multi-class cases, foreground classes {names}: a case's Dice (and IoU, HD95, NSD) is the mean over "
        "these classes, each class scored as a binary mask (both masks of a class empty: Dice and IoU 1; exactly "
        "one empty: 0). Per class and grouping: ES-Dice = Dice<sub>c</sub> / (1 + &Sigma;<sub>g</sub> "
        "|Dice<sub>c</sub> &minus; Dice<sub>c,g</sub>|), ES-IoU likewise (FairSeg, Tian et al. ICLR 2024).</p>"
    ]


def _per_class_html(attribute: str, per_class: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The per-class table of one grouping: Dice, IoU, ES-Dice, ES-IoU and the group means of each class."""
    first = next(iter(per_class.values()))
    order = list(first["groups"])
    out = [
        f"<h3>Per class by {html.escape(attribute)}</h3>",
        "<table><tr><th>class</th><th>Dice</th><th>IoU</th><th>ES-Dice</th><th>ES-IoU</th>"
        "<th>worst-group Dice</th><th>worst group</th>"
        + "".join(f"<th>Dice / IoU {html.escape(g)}</th>" for g in order)
        + "</tr>",
    ]
    names = ("dice_all", "iou_all", "es_dice", "es_iou", "worst_group_dice")
    for c, e in per_class.items():
        key = f"{attribute}.per_class.{c}"
        cells = "".join(_cell(f"{key}.{n}", e[n]) for n in names) + f"<td>{html.escape(e['worst_group'])}</td>"
        for g in order:
            ge = e["groups"][g]
            dice, iou = _value(f"{key}.groups.{g}.dice", ge["dice"]), _value(f"{key}.groups.{g}.iou", ge["iou"])
            cells += f"<td>{dice} / {iou}</td>"
        out.append(f"<tr><td>{html.escape(c)}</td>{cells}</tr>")
    out.append("</table>")
    return out


def _minority_table(attribute: str, block: Mapping[str, Any]) -> list[str]:
    """The "Hidden minority (subtype)" table of one grouping: minority vs majority Dice per group and overall."""
    out = [
        f"<h3>Hidden minority (subtype) by {html.escape(attribute)}</h3>",
        f"<p>Cases whose <code>{SUBTYPE_KEY}</code> is not <code>majority</code> form the hidden minority; a "
        f"minority case fails when its Dice is below {block['threshold']:g}. Cases without a subtype count in "
        "neither set.</p>",
        "<table><tr><th>group</th><th>minority n</th><th>majority n</th><th>minority Dice</th>"
        "<th>majority Dice</th><th>minority failures</th><th>minority failure rate</th></tr>",
    ]
    fields = (
        "n_minority",
        "n_majority",
        "minority_dice",
        "majority_dice",
        "minority_failures",
        "minority_failure_rate",
    )
    lines = [(html.escape(g), f"groups.{g}", c) for g, c in block["groups"].items()]
    for label, path, cell in [*lines, ("<b>all cases</b>", "overall", block["overall"])]:
        cells = "".join(_cell(f"{attribute}.minority.{path}.{f}", cell[f]) for f in fields)
        out.append(f"<tr><td>{label}</td>{cells}</tr>")
    out.append("</table>")
    if block["worst_minority_group"] is not None:
        value = _value(f"{attribute}.minority.worst_group_minority_dice", block["worst_group_minority_dice"])
        out.append(f"<p>Worst-group minority Dice: {value} ({html.escape(block['worst_minority_group'])}).</p>")
    kinds = "; ".join(
        f"{html.escape(k)}: n {e['n']}, Dice {e['dice']:.4f}, failures {e['failures']}"
        for k, e in block["kinds"].items()
    )
    if kinds:
        out.append(f"<p>Minority kinds (all cases): {kinds}.</p>")
    return out


# --------------------------------------------------------------------------------------------------------------
# handler
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportSettings:
    """What :class:`FairnessReportHandler` reports and how: its settings in one object.

    From a bundle config: ``{"_target_": "scripts.fairness_report.ReportSettings", "groupings": ...}``.
    How each case is scored (NSD tolerance, Hausdorff percentile, spacing, prediction and label keys) is the
    business of the evaluation's :class:`scripts.fairness_metrics.CaseMetricsHandler`, not of the report.

    Args:
        groupings: grouping attributes to analyse, e.g. ``["stage", "institution"]``.
        alpha: CVaR tail fraction in (0, 1].
        threshold: failure threshold (a case with Dice below it fails).
        n_boot: bootstrap draws of the intervals.
        seed: bootstrap seed.
        confidence: interval level.
        n_worst: at most this many worst cases per group in the report (``None``: the whole CVaR tail).
        attribute_keys: attribute keys copied into ``per_case.csv`` besides ``groupings``.
        id_key: batch key of the case id (missing: the prediction's file name, else a counter).
        hard_key: batch key of the optional hard-case flag.
        subtype_key: batch key of the optional hidden subtype (``"majority"`` or a minority kind), kept as the
            ``subtype`` column when the case has one (cases of datalists without it get no column); ``None``:
            never read.
        image_key: output key of the image for thumbnails (only used when on the label's grid).
        thumbnails: keep thumbnails of the cases.
        thumbnail_size: longest thumbnail side in pixels.
        slice_axis: spatial axis of the thumbnail slices.
        extra: extra entries for ``metrics.json`` ``settings`` (e.g. ``model_selection``: which training epoch
            the evaluated ``model.pt`` comes from, shown on the report page).

    Raises:
        TypeError: when ``groupings`` is a string.
        ValueError: when ``groupings`` is empty or ``alpha`` is not in (0, 1].
    """

    groupings: Sequence[str]
    alpha: float = 0.2
    threshold: float = 0.5
    n_boot: int = 1000
    seed: int = 0
    confidence: float = 0.95
    n_worst: int | None = 5
    attribute_keys: Sequence[str] = ()
    id_key: str = "id"
    hard_key: str = "hard"
    subtype_key: str | None = SUBTYPE_KEY
    image_key: str | None = "image"
    thumbnails: bool = True
    thumbnail_size: int = 160
    slice_axis: int = -1
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.groupings, str):
            raise TypeError(f"`groupings` must be a list of attribute names, got the string {self.groupings!r}.")
        if not self.groupings:
            raise ValueError("`groupings` must name at least one attribute, e.g. ['stage'].")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"`alpha` must be in (0, 1], got {self.alpha}.")
        object.__setattr__(self, "groupings", tuple(self.groupings))
        object.__setattr__(self, "attribute_keys", tuple(self.attribute_keys or ()))
        object.__setattr__(self, "extra", dict(self.extra or {}))

    @property
    def columns(self) -> tuple[str, ...]:
        """The attribute columns of ``per_case.csv``: ``attribute_keys`` then the other ``groupings``."""
        return tuple(dict.fromkeys([*self.attribute_keys, *self.groupings]))


class FairnessReportHandler:
    """Collect per-case fairness data during a MONAI evaluation and write the fairness report at its end.

    At every ``ITERATION_COMPLETED`` it takes each case's Dice, HD95 and NSD from ``scores`` (the evaluation's
    :class:`scripts.fairness_metrics.CaseMetricsHandler`, the one place they are computed), the case metadata
    (``id_key``, ``attribute_keys``, ``groupings``, ``hard_key``, ``subtype_key`` of ``settings``) from
    ``engine.state.batch`` (else the output) and keeps a downsampled thumbnail of the image, label and
    prediction. At ``EPOCH_COMPLETED`` all ranks gather the cases (attach it on every rank), rank 0 writes
    ``<output_dir>/fairness/{per_case.csv, metrics.json, report.html}`` with :func:`write_fairness_report`.
    The thumbnails follow the scorer's ``spatial_dims`` (``None``: each prediction's) and ``class_names``;
    ``metrics.json`` records the NSD tolerance as ``nsd_tolerance_mm``, or ``nsd_tolerance_px`` when the cases
    were scored in pixels.

    Args:
        output_dir: the run's output folder (the report goes to its ``fairness`` sub-folder).
        settings: a :class:`ReportSettings` (or a mapping of its arguments).
        scores: the :class:`scripts.fairness_metrics.CaseMetricsHandler` that scores the cases (Dice at least;
            the HD95 and NSD columns and statistics are in the report when it computes them). ``None``: a
            private one with default settings (the cases are then scored for the report alone).
        network: optional network with ``routing_stats()`` (see :func:`routing_from_network`). At each epoch
            start its ``reset_routing_stats()`` is called (when ``reset_routing``) and ``set_routing_stats(True)``
            switches recording on; at epoch end recording is switched off again (methods used when present).
        routing_subgroups: subgroup names of the routing rows, if the network does not provide them.
        reset_routing: reset the network's routing counters at epoch start.

    Raises:
        TypeError: when ``settings`` is neither a :class:`ReportSettings` nor a mapping.
        ValueError: when ``scores`` does not compute Dice.
    """

    def __init__(
        self,
        output_dir: str | Path,
        settings: ReportSettings | Mapping[str, Any],
        scores: CaseMetricsHandler | None = None,
        network: Any | None = None,
        routing_subgroups: Sequence[str] | None = None,
        reset_routing: bool = True,
    ) -> None:
        if isinstance(settings, Mapping):
            settings = ReportSettings(**settings)
        if not isinstance(settings, ReportSettings):
            raise TypeError(f"`settings` must be a ReportSettings or a mapping, got {type(settings).__name__}.")
        scores = CaseMetricsHandler() if scores is None else scores
        if "dice" not in scores.metrics:
            raise ValueError(f"`scores` must compute 'dice' for the report, it computes {list(scores.metrics)}.")
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.scores = scores
        self.network, self.routing_subgroups, self.reset_routing = network, routing_subgroups, reset_routing
        self.records: list[dict[str, Any]] = []
        self.thumbnails: dict[str, Thumbnail] = {}
        self.last_paths: dict[str, Path] | None = None
        self._counter = 0

    def attach(self, engine: Any) -> None:
        """Register :meth:`epoch_started`, :meth:`iteration_completed` and ``__call__`` (epoch end)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def epoch_started(self, engine: Any) -> None:
        """Clear the collected cases and reset the network's routing counters."""
        self.records, self.thumbnails, self._counter = [], {}, 0
        net = getattr(self.network, "module", self.network)
        if net is None:
            return
        if self.reset_routing and callable(getattr(net, "reset_routing_stats", None)):
            net.reset_routing_stats()
        if callable(getattr(net, "set_routing_stats", None)):
            net.set_routing_stats(True)  # recording is off by default; switched off again at epoch end

    def _case_id(self, value: Any, pred: Any) -> str:
        if not _is_missing(value):
            return _group_label(value)
        if isinstance(pred, MetaTensor) and pred.meta.get("filename_or_obj"):
            name = Path(str(pred.meta["filename_or_obj"])).name
            return re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.dcm|\.png|\.jpe?g|\.npz)$", "", name)
        self._counter += 1
        return f"case_{self._counter:05d}"

    def iteration_completed(self, engine: Any) -> None:
        """Keep every case's record (its scores from ``scores`` and its metadata) and thumbnail."""
        s = self.settings
        scores = self.scores.case_scores(engine)
        outputs = engine.state.output
        keys = (s.id_key, s.hard_key, *s.columns, *([s.subtype_key] if s.subtype_key else []))
        meta = case_metadata(engine.state.batch, outputs, keys)
        for item, m, case_scores in zip(outputs, meta, scores):
            pred = item[self.scores.pred_key]
            record: dict[str, Any] = {"id": self._case_id(m.get(s.id_key), pred)}
            for k in s.columns:
                record[k] = _group_label(m.get(k))
            record.update(case_scores)
            hard = _as_bool(m.get(s.hard_key))
            if hard is not None:
                record["hard"] = hard
            if s.subtype_key and not _is_missing(m.get(s.subtype_key)):
                record[SUBTYPE_KEY] = _group_label(m[s.subtype_key])
            self.records.append(record)
            if s.thumbnails:
                image = item.get(s.image_key) if s.image_key else None
                self.thumbnails[record["id"]] = self._thumbnail(image, item[self.scores.label_key], pred)

    def _thumbnail(self, image: Any, label: Any, pred: Any) -> Thumbnail:
        s, names = self.settings, self.scores.class_names
        sd = self.scores.spatial_dims or infer_spatial_dims(pred)
        n_classes = len(names) if names is not None else None
        return make_thumbnail(
            image, label, pred, axis=s.slice_axis, max_size=s.thumbnail_size, spatial_dims=sd, n_classes=n_classes
        )

    def __call__(self, engine: Any) -> None:
        """Gather the cases over ranks and write the report on rank 0."""
        s = self.settings
        records = _all_gather_objects(self.records)
        unique: dict[str, dict[str, Any]] = {}
        for r in records:
            unique.setdefault(r["id"], r)  # DistributedSampler padding repeats cases
        records = list(unique.values())
        if not records:
            logger.warning("no case was evaluated: no fairness report written.")
            return
        listed = set()
        for attribute in s.groupings:
            for cases in worst_cases(records, attribute, "dice", s.alpha, s.n_worst).values():
                listed.update(str(r["id"]) for r in cases)
        local = [(cid, t) for cid, t in self.thumbnails.items() if cid in listed]
        thumbs = dict(_all_gather_objects(local))
        routing = self._routing()
        net = getattr(self.network, "module", self.network)
        if net is not None and callable(getattr(net, "set_routing_stats", None)):
            net.set_routing_stats(False)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank != 0:
            return
        pixels = any("hd95_px" in r or "nsd_px" in r for r in records)
        settings = {
            "nsd_tolerance_px" if pixels else "nsd_tolerance_mm": float(self.scores.tolerance_mm),
            "hd_percentile": float(self.scores.percentile),
            "epoch": int(getattr(engine.state, "epoch", 0) or 0),
            **s.extra,
        }
        self.last_paths = write_fairness_report(
            self.output_dir,
            records,
            list(s.groupings),
            routing=routing,
            thumbnails=thumbs,
            alpha=s.alpha,
            threshold=s.threshold,
            n_boot=s.n_boot,
            seed=s.seed,
            confidence=s.confidence,
            n_worst=s.n_worst,
            settings=settings,
        )
        getattr(engine, "logger", logger).info("fairness report written to %s", self.last_paths["report"])

    def _routing(self) -> dict[str, Any] | None:
        if self.network is None:
            return None
        summary = routing_from_network(self.network, self.routing_subgroups)
        if summary is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return summary
        for layer in summary["layers"].values():  # sum the counts of all ranks
            counts = torch.tensor(layer["counts"], dtype=torch.float64, device=idist.device())
            dist.all_reduce(counts)
            arr = counts.cpu().numpy()
            totals = arr.sum(axis=1, keepdims=True)
            layer["counts"] = arr.tolist()
            layer["fractions"] = np.divide(arr, totals, out=np.zeros_like(arr), where=totals > 0).tolist()
        return summary
