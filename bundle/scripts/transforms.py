"""Dictionary transforms of the bundle's pipelines: the patient subgroup and the case id for the network and the loss,
label-centred crops for the bank refresh, and the prediction's foreground mask back on the grid the image was loaded
on."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd, InvertibleTransform, MapTransform, SpatialResample

from scripts.inferers import SUBGROUP_META_KEY

logger = logging.getLogger(__name__)


class SubgroupIndexd(MapTransform):
    """Map a datalist attribute (e.g. ``stage``) to the subgroup index the dMoE router uses.

    The subgroup values are named once in the config (``subgroups: ["T1", "T2", "T3", "T4"]``);
    value ``subgroups[i]`` becomes index ``i``. A value that is missing, ``None`` or not in the list
    becomes the *unknown* index ``len(subgroups)``: the network then uses its documented fallback
    routing and the DRO loss its unknown-subgroup policy. Each distinct unknown value is logged once.

    Args:
        attribute: datalist key holding the subgroup value (the config's ``subgroup_key``).
        subgroups: the subgroup values in index order; non-empty, no duplicates.
        output_key: key the index is written to, as a 0-d int64 tensor (collated to ``(B,)``).
        case_sensitive: compare values exactly (default) or case-insensitively.
        default: value used when an item has no ``attribute`` (e.g. the ``--subgroup`` of a single
            inference case); ``None`` means unknown.
        image_key: if this item is a MetaTensor, the index is also written into its metadata (key
            ``scripts.inferers.SUBGROUP_META_KEY``), so :class:`scripts.inferers.SubgroupSlidingWindowInferer`
            routes by it when a host calls ``inferer(image, network)`` only (MONAI Label, MONAI Deploy).
    """

    def __init__(
        self,
        attribute: str,
        subgroups: Sequence[str],
        output_key: str = "subgroup",
        case_sensitive: bool = True,
        default: str | None = None,
        image_key: str | None = "image",
    ) -> None:
        super().__init__(keys=[attribute], allow_missing_keys=True)
        if isinstance(subgroups, str) or not isinstance(subgroups, Sequence) or len(subgroups) == 0:
            raise ValueError(f"subgroups must be a non-empty list of names, got {subgroups!r}.")
        names = [str(s) if case_sensitive else str(s).lower() for s in subgroups]
        if len(set(names)) != len(names):
            raise ValueError(f"subgroups must not repeat a value, got {list(subgroups)}.")
        self.attribute = attribute
        self.subgroups = [str(s) for s in subgroups]
        self.output_key = output_key
        self.case_sensitive = case_sensitive
        self.default = default
        self.image_key = image_key
        self._index = {n: i for i, n in enumerate(names)}
        self._warned: set[str] = set()

    @property
    def unknown_index(self) -> int:
        """Index given to missing or unlisted values (``len(subgroups)``)."""
        return len(self.subgroups)

    def index_of(self, value: Any) -> int:
        """Index of one subgroup value (the unknown index for ``None`` or an unlisted value)."""
        if value is None or (isinstance(value, str) and value == ""):
            return self.unknown_index
        key = str(value) if self.case_sensitive else str(value).lower()
        idx = self._index.get(key)
        if idx is None:
            if key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "subgroup value %r of '%s' is not one of %s: using the unknown-subgroup routing (index %d).",
                    value,
                    self.attribute,
                    self.subgroups,
                    self.unknown_index,
                )
            return self.unknown_index
        return idx

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        value = d.get(self.attribute)
        if value is None:
            value = self.default
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else None
        d[self.output_key] = torch.tensor(self.index_of(value), dtype=torch.int64)
        image = d.get(self.image_key) if self.image_key is not None else None
        if isinstance(image, MetaTensor):
            image.meta[SUBGROUP_META_KEY] = int(d[self.output_key])
        return d


class CaseIdd(MapTransform):
    """Make sure every item has a case id (the key the DRO loss bank and the reports use).

    Items from our datalists carry ``id``; items from other tools (MONAI Label sends only
    ``image``/``label``) get the file name of ``source_key`` without its extensions.

    Args:
        key: id key.
        source_key: key whose file path names the case when the id is missing.
    """

    def __init__(self, key: str = "id", source_key: str = "image") -> None:
        super().__init__(keys=[key], allow_missing_keys=True)
        self.key = key
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get(self.key) in (None, ""):
            src = d.get(self.source_key)
            if isinstance(src, (list, tuple)) and src:
                src = src[0]
            if hasattr(src, "meta"):
                src = src.meta.get("filename_or_obj", "")
            name = os.path.basename(str(src)) if src is not None else ""
            for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".png", ".jpg", ".jpeg", ".npz"):
                if name.endswith(ext):
                    name = name[: -len(ext)]
                    break
            if not name:
                raise ValueError(
                    f"item has no '{self.key}' and no usable '{self.source_key}' path to name it "
                    f"(item keys: {sorted(map(str, d))}); add an 'id' to the datalist item."
                )
            d[self.key] = name
        else:
            d[self.key] = str(d[self.key])
        return d


def label_centred_window(label: torch.Tensor, roi_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """Start and end of the ``roi_size`` window centred on the label's bounding box, shifted to lie inside the volume.

    Args:
        label: one case, channel-first ``C[spatial]``; foreground is any channel > 0. An empty label centres the
            window on the volume.
        roi_size: window size per spatial axis; each must be <= the volume's size (pad first).

    Returns:
        ``(start, end)`` voxel indices per spatial axis.

    Raises:
        ValueError: when the volume is smaller than the window.
    """
    shape = list(label.shape[1:])
    if len(roi_size) != len(shape) or any(r > s for r, s in zip(roi_size, shape)):
        raise ValueError(f"the volume {shape} must be at least the window {list(roi_size)} on every axis (pad first).")
    fg = torch.nonzero(torch.as_tensor(label).reshape(label.shape[0], *shape).gt(0).any(0))
    if fg.numel():
        centre = [(int(lo) + int(hi)) / 2.0 for lo, hi in zip(fg.min(0).values, fg.max(0).values)]
    else:
        centre = [(s - 1) / 2.0 for s in shape]
    start = [min(max(int(round(c - (r - 1) / 2.0)), 0), s - r) for c, r, s in zip(centre, roi_size, shape)]
    return start, [b + r for b, r in zip(start, roi_size)]


class LabelCentredCropd(MapTransform):
    """Deterministic crop of ``roi_size`` centred on the label's bounding box (kept inside the volume).

    Used for the eval-mode FairDRO bank refresh (:mod:`scripts.bank_refresh`): one fixed crop per case, the whole
    volume when the volume is no larger than the window. The keys must share the label's grid; pad to at least
    ``roi_size`` first (``SpatialPadd``).

    Args:
        keys: keys to crop (e.g. ``["image", "label"]``).
        label_key: key of the label that places the window.
        roi_size: window size (X, Y, Z voxels).
    """

    def __init__(self, keys: Any, label_key: str, roi_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.roi_size = [int(r) for r in roi_size]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        start, end = label_centred_window(d[self.label_key], self.roi_size)
        window = tuple(slice(b, e) for b, e in zip(start, end))
        for key in self.key_iterator(d):
            d[key] = d[key][(slice(None), *window)]
        return d


def loaded_grid(image: MetaTensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The ``(affine (4, 4) float64, spatial shape)`` of the grid ``image`` was loaded on, from the metadata that
    MONAI's readers (and :class:`scripts.dicom_series.LoadDicomSeriesd`, and MONAI Deploy) write at load time.

    Raises:
        ValueError: when ``original_affine`` or ``spatial_shape`` is missing from the metadata.
    """
    meta = getattr(image, "meta", None) or {}
    missing = [k for k in ("original_affine", "spatial_shape") if meta.get(k) is None]
    if missing:
        raise ValueError(
            f"the image's metadata lacks {missing}: load it with a MONAI reader (LoadImaged) so that the original "
            "grid is known, or invert with Invertd."
        )
    affine = torch.as_tensor(meta["original_affine"]).detach().to("cpu", torch.float64)
    return affine, tuple(int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1)[:3])


#: how ``torch.nn.functional.pad`` reproduces what a resampling's padding mode reads outside its source grid
PAD_AS = {"border": {"mode": "replicate"}, "zeros": {"mode": "constant", "value": 0.0}}


def _is_resampling(op: Mapping[str, Any]) -> bool:
    """A record of MONAI's ``SpatialResample`` family (``Spacing``, ``ResampleToMatch``): it holds ``src_affine``."""
    return "src_affine" in (op.get("extra_info") or {})


def single_resampling(image: MetaTensor) -> dict[str, Any] | None:
    """The settings (``extra_info``: mode, padding_mode, align_corners, dtype) of the one resampling among the
    operations applied to ``image``, when every operation before it is an ``Orientation`` and its interpolation
    reaches one voxel at most (linear or nearest); else ``None``."""
    ops = list(getattr(image, "applied_operations", []))
    at = [i for i, op in enumerate(ops) if _is_resampling(op)]
    if len(at) != 1 or any(op.get("class") != "Orientation" for op in ops[: at[0]]):
        return None
    settings = ops[at[0]]["extra_info"]
    local = str(settings.get("mode")) in ("bilinear", "nearest", "0", "1")
    return settings if local and settings.get("padding_mode", "border") in PAD_AS else None


def undo_crops(values: torch.Tensor, image: MetaTensor, transform: Any, key: Hashable) -> MetaTensor | None:
    """``values`` (``(C, X, Y, Z)`` on ``image``'s grid) on the grid before the crops and pads that followed the
    resampling, by MONAI's own inverses of those transforms (exact: they only pad and crop); ``None`` when a
    transform after the resampling cannot be matched to its record."""
    x = MetaTensor(values, meta=copy.deepcopy(image.meta))  # copies: MONAI's inverses edit the records they read
    x.applied_operations = copy.deepcopy(image.applied_operations)
    data: dict[Hashable, Any] = {key: x}
    for t in reversed(list(getattr(transform, "transforms", []))):
        if not data[key].applied_operations or _is_resampling(data[key].applied_operations[-1]):
            return data[key]
        if isinstance(t, InvertibleTransform) and key in getattr(t, "keys", ()):
            try:
                data = t.inverse(data)
            except RuntimeError:  # records and transforms do not line up
                return None
    return None


def foreground_window(foreground: torch.Tensor, margin: int) -> tuple[list[int], list[int]] | None:
    """Bounding box of ``foreground`` (``X, Y, Z`` bool) grown by ``margin`` voxels: ``(first, last)`` indices,
    inclusive, clipped to the volume; ``None`` when there is no foreground."""
    lo, hi = [], []
    for axis, size in enumerate(foreground.shape):
        hit = torch.nonzero(foreground.any(dim=[a for a in range(3) if a != axis]))
        if hit.numel() == 0:
            return None
        lo.append(max(int(hit[0]) - margin, 0))
        hi.append(min(int(hit[-1]) + margin, size - 1))
    return lo, hi


def foreground_windows(
    foreground: torch.Tensor, margin: int, block: int = 16, most: int = 64
) -> list[tuple[list[int], list[int]]]:
    """One window per cluster of the foreground (``X, Y, Z`` bool): the foreground is split into ``block``-sized
    blocks, touching occupied blocks form a cluster, and each cluster's window is the bounding box of its foreground
    grown by ``margin`` (as :func:`foreground_window`). Every foreground voxel lies ``margin`` deep in some window.
    More than ``most`` clusters give one window around everything (scattered specks are not worth a call each)."""
    from scipy import ndimage  # in the bundle's optional packages (metadata.json) and every environment that runs it

    occupied = torch.nn.functional.max_pool3d(foreground[None, None].float(), block, ceil_mode=True)[0, 0] > 0
    labels, n = ndimage.label(occupied.cpu().numpy(), structure=np.ones((3, 3, 3)))
    if n == 0 or n > most:
        window = foreground_window(foreground, margin)
        return [] if window is None else [window]
    windows = []
    for region in ndimage.find_objects(labels):
        start = [r.start * block for r in region]
        part = foreground[tuple(slice(r.start * block, r.stop * block) for r in region)]
        lo, hi = foreground_window(part, 0)  # the cluster's blocks hold foreground by construction
        windows.append(
            (
                [max(a + o - margin, 0) for a, o in zip(lo, start)],
                [min(b + o + margin, size - 1) for b, o, size in zip(hi, start, foreground.shape)],
            )
        )
    return windows


def _affine(values: MetaTensor) -> torch.Tensor:
    """The ``(4, 4)`` affine of ``values`` as float64 on the CPU (where the geometry is computed)."""
    return torch.as_tensor(values.affine).detach().to("cpu", torch.float64)


def _translate(start: Sequence[int]) -> torch.Tensor:
    t = torch.eye(4, dtype=torch.float64)
    t[:3, 3] = torch.as_tensor([float(v) for v in start], dtype=torch.float64)
    return t


def map_corners(box: tuple[Sequence[int], Sequence[int]], from_affine: torch.Tensor, to_affine: torch.Tensor):
    """The 8 corners of the voxel ``box`` (``(first, last)`` inclusive) of the grid ``from_affine``, in voxel
    coordinates of the grid ``to_affine``: a ``(3, 8)`` float64 tensor."""
    corners = torch.cartesian_prod(*[torch.tensor([a, b], dtype=torch.float64) for a, b in zip(*box)])
    corners = torch.cat([corners, torch.ones(len(corners), 1, dtype=torch.float64)], 1)
    return (torch.linalg.solve(to_affine, from_affine) @ corners.T)[:3]


def target_box(
    window: tuple[list[int], list[int]], src_affine: torch.Tensor, dst_affine: torch.Tensor, dst_shape: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    """The voxels of the destination grid that can see the source ``window`` (``(first, last)`` inclusive): the
    bounding box of the window's corners mapped into destination voxels, clipped; ``None`` when none remain."""
    mapped = map_corners(window, src_affine, dst_affine)
    first = [max(int(np.floor(float(v))), 0) for v in mapped.min(1).values]
    last = [min(int(np.ceil(float(v))), s - 1) for v, s in zip(mapped.max(1).values, dst_shape)]
    return None if any(a > b for a, b in zip(first, last)) else (first, last)


def positive_in_box(
    values: MetaTensor, window, dst_affine: torch.Tensor, box, settings: Mapping[str, Any], floor: float = -1.0
) -> torch.Tensor:
    """Where the interpolation of ``values`` (``(1, X, Y, Z)``, all ``>= floor``) is positive on the destination
    voxels ``box``, computed from ``window`` only, as the recorded resampling interpolates (its mode, align_corners
    and computation dtype).

    Outside the window the values count as ``floor`` (the values are shifted by ``-floor`` and padded with zeros), so
    the result is never positive where the whole-volume interpolation is not, and it is exact wherever the stencil
    lies inside the window.
    """
    (lo, hi), (first, last) = window, box
    dtype = getattr(torch, str(settings.get("dtype", "float64")))
    src = MetaTensor(values.as_tensor()[(slice(None), *(slice(a, b + 1) for a, b in zip(lo, hi)))].to(dtype) - floor)
    src.affine = _affine(values) @ _translate(lo)
    align = settings.get("align_corners", False)
    resample = SpatialResample(
        mode=settings.get("mode", "bilinear"),
        padding_mode="zeros",
        align_corners=False if align in (None, "none") else bool(align),
        dtype=dtype,
    )
    size = [b - a + 1 for a, b in zip(first, last)]
    with resample.trace_transform(False):
        out = resample(src, dst_affine=dst_affine @ _translate(first), spatial_size=size)
    return torch.as_tensor(out)[0] > -floor


def pad_as_resampling(values: MetaTensor, width: int, padding_mode: str) -> MetaTensor:
    """``values`` (``(C, X, Y, Z)``) grown by ``width`` voxels on every side with what the resampling's
    ``padding_mode`` (``border`` or ``zeros``) reads there, with the affine moved to match."""
    padded = torch.nn.functional.pad(values.as_tensor()[None], [width] * 6, **PAD_AS[padding_mode])[0]
    out = MetaTensor(padded, meta=dict(values.meta))
    out.affine = _affine(values) @ _translate([-width] * 3)
    return out


def grid_within(src_affine: torch.Tensor, src_shape: Sequence[int], dst_affine: torch.Tensor, dst_shape) -> bool:
    """Every destination voxel maps inside the source grid (voxel centres, corners of the destination checked)."""
    mapped = map_corners(([0, 0, 0], [int(s) - 1 for s in dst_shape]), dst_affine, src_affine)
    return bool(((mapped >= 0) & (mapped <= torch.tensor(src_shape, dtype=torch.float64)[:, None] - 1)).all())


class InvertForegroundd(MapTransform):
    """Foreground mask of a two-class softmax on the grid the image was loaded on, computed only near the foreground.

    The result equals MONAI's ``Invertd`` of both softmax channels (the preprocessing's own interpolation, e.g.
    ``Spacingd`` bilinear) followed by ``argmax``, at a fraction of its cost:

    - interpolation is linear and the padding of crops is zero in both channels, so ``argmax(interp(p0),
      interp(p1))`` is foreground exactly where ``interp(p1 - p0) > 0``: one channel is resampled, not two;
    - a linear (or nearest) interpolation is positive only where a voxel of its stencil (one voxel either way) is, so
      only the destination voxels that see a cluster of the foreground (its bounding box grown by ``margin``) are
      resampled, from that box, and the rest is background; outside the box the values count as -1 (their lower
      bound), so a box never adds foreground, and every destination voxel whose stencil meets foreground has its
      whole stencil in some box; the scan's edges are padded as the recorded resampling pads them;
    - orientation changes are index permutations, so the one resampling goes straight from the network's grid to the
      loaded grid; crops and pads after it are undone first by MONAI's own inverses (exact).

    Ties go to background, as with ``argmax``. The whole-volume ``Invertd`` (then ``p1 > p0``) is used instead when
    these conditions do not hold: more than one resampling, an operation other than ``Orientation`` before it, an
    interpolation wider than one voxel, or records that do not match ``transform``.

    Args:
        keys: prediction keys: ``(2, X, Y, Z)`` softmax probabilities on the network's grid (``Activationsd``).
        transform: the preprocessing (``Compose``) the prediction's grid came from.
        orig_keys: the preprocessed image whose grid, applied operations and load-time metadata
            (``original_affine``, ``spatial_shape``) the prediction shares.
        margin: voxels kept around the foreground's bounding box (at least 2).

    Returns the mask as ``(1, X, Y, Z)`` float32 (0/1) ``MetaTensor`` with the loaded image's affine, as ``Invertd``
    + ``AsDiscreted(argmax=True)`` did.
    """

    def __init__(
        self,
        keys: Any,
        transform: InvertibleTransform,
        orig_keys: Any = "image",
        margin: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(margin) < 2:
            raise ValueError(f"margin must be at least 2 voxels (the interpolation stencil), got {margin}.")
        self.margin = int(margin)
        self.orig_keys = [orig_keys] * len(self.keys) if isinstance(orig_keys, str) else list(orig_keys)
        if len(self.orig_keys) != len(self.keys):
            raise ValueError(f"orig_keys {self.orig_keys} must name one image per key of {list(self.keys)}.")
        self.transform = transform
        self.invert = Invertd(self.keys, transform, orig_keys=self.orig_keys, nearest_interp=False)
        #: how the last call was computed per key: "empty", "window" or "whole volume" (read by tests and benchmarks)
        self.last_path: dict[Hashable, str] = {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, orig_key in self.key_iterator(d, self.orig_keys):
            probs, image = d[key], d[orig_key]
            if probs.shape[0] != 2:
                raise ValueError(f"'{key}' must hold 2 softmax channels (background, target), got {probs.shape[0]}.")
            affine, shape = loaded_grid(image)
            mask = self._window_mask(probs, image, orig_key, affine, shape)
            if mask is None:
                self.last_path[key] = "whole volume"
                inverted = self.invert({**d, key: probs})[key]
                mask = torch.as_tensor(inverted[1] > inverted[0])
            else:
                self.last_path[key] = "window" if mask.any() else "empty"
            d[key] = MetaTensor(mask[None].float(), meta={**image.meta, "affine": affine})
        return d

    def _window_mask(self, probs, image, orig_key, affine, shape) -> torch.Tensor | None:
        """The mask by the shortcut, or ``None`` where the shortcut is not exact."""
        settings = single_resampling(image)
        if settings is None:
            return None
        diff = torch.as_tensor(probs[1:2] - probs[0:1])
        diff = undo_crops(diff.as_tensor() if isinstance(diff, MetaTensor) else diff, image, self.transform, orig_key)
        if diff is None:
            return None
        diff = pad_as_resampling(diff, self.margin, settings.get("padding_mode", "border"))  # the scan's edges
        if not grid_within(_affine(diff), diff.shape[1:], affine, shape):
            return None  # the loaded grid reaches beyond the network's: its padding rule would matter
        mask = torch.zeros(shape, dtype=torch.bool, device=diff.device)  # on the prediction's device, as Invertd
        for window in foreground_windows(diff[0] > 0, self.margin):
            box = target_box(window, _affine(diff), affine, shape)
            if box is not None:
                where = tuple(slice(a, b + 1) for a, b in zip(*box))
                mask[where] |= positive_in_box(diff, window, affine, box, settings)
        return mask


class ReloadOriginald(MapTransform):
    """Replace each key's array with the file it was loaded from, on that file's own grid.

    Used by the 2D evaluation (``configs/profiles/2d_evaluate.json``): a label resized to the network's size with
    nearest-neighbour interpolation and inverted back is not the label that was given (a few pixels move at the
    edges), so the scores are taken against the label file itself. The file is read with MONAI's ``LoadImage``
    (``ensure_channel_first``), as the pipeline read it.

    Args:
        keys: keys whose MetaTensor carries ``filename_or_obj`` in its metadata (e.g. ``"label"``).

    Raises:
        ValueError: a key's value has no file name in its metadata.
    """

    def __init__(self, keys: Any, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        from monai.transforms import LoadImage

        self.loader = LoadImage(image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = d[key].meta.get("filename_or_obj") if isinstance(d[key], MetaTensor) else None
            if not name:
                raise ValueError(f"'{key}' carries no file name in its metadata, so its original cannot be reloaded.")
            d[key] = self.loader(str(name))
        return d


class LabelMapMetad(MapTransform):
    """Mark each key's array as a one-channel label map whose channel MONAI added (``original_channel_dim`` "no
    channel"), so that writers save an ``(1, H, W)`` mask predicted from an RGB image as one grey plane; the
    metadata of the RGB source says its channels were last, and MONAI's NIfTI writer then fails on the mask.

    Args:
        keys: keys of label maps, shape ``(1, *spatial)``.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["original_channel_dim"] = float("nan")
        return d
