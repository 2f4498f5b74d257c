"""Dictionary transforms that carry the patient subgroup and the case id to the network and the loss."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

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
            for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
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
