"""Writing the bundle's clinical outputs: the predicted target as DICOM SEG and RTSTRUCT beside the source CT.

:func:`write_dicom_outputs` and the post-processing transform :class:`SaveDicomOutputsd` write both objects
(each atomically, with fsync: ``scripts.safe_io.atomic_write_dicom``) referencing the CT series the prediction
was made on; :class:`CaseOutputsAllOrNothing` removes what a case wrote when one of its writers fails, and
:func:`ensure_output_outside` refuses an output folder inside the input. Masks are ``(X, Y, Z)`` arrays on the CT
grid as :class:`~scripts.dicom_series.LoadDicomSeriesd` loads it. The synthetic cohort's DICOM (phantom CT
series) is written by :mod:`scripts.synthetic_dicom`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from scripts.dicom_series import (
    META_RECURSIVE,
    META_RESAMPLED,
    META_SERIES_DIR,
    META_SERIES_UID,
    SeriesInfo,
    read_series_info,
    resample_slices,
)
from scripts.rtstruct import write_rtstruct

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- outputs


def _as_mask(mask: Any, label_value: int | None) -> np.ndarray:
    """``(X, Y, Z)`` uint8 mask from a tensor/array shaped ``(X, Y, Z)`` or ``(1, X, Y, Z)``."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 3:
        raise ValueError(f"mask must be (X, Y, Z) or (1, X, Y, Z) on the CT grid, got shape {mask.shape}.")
    hit = mask == label_value if label_value is not None else mask > 0
    return hit.astype(np.uint8)


def _single(value: Any) -> Any:
    """Unwrap a metadata value that a DataLoader collated into a one-element list/tuple/array."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    if hasattr(value, "numel") and value.numel() == 1:  # a collated tensor
        return value.item()
    return value


def _resolve_series(series_info: SeriesInfo | Mapping[str, Any] | str | Path) -> SeriesInfo:
    """A SeriesInfo from itself, from a MONAI meta dict (``dicom_series_dir`` ...) or from a folder."""
    if isinstance(series_info, SeriesInfo):
        return series_info
    if isinstance(series_info, Mapping):
        folder = _single(series_info.get(META_SERIES_DIR))
        if folder is None:
            raise ValueError(f"metadata has no {META_SERIES_DIR!r}: load the series with LoadDicomSeriesd.")
        uid = _single(series_info.get(META_SERIES_UID))
        resampled = bool(_single(series_info.get(META_RESAMPLED, False)))
        recursive = bool(_single(series_info.get(META_RECURSIVE, False)))
        # the loader already applied the configured min_slices; 2 is the least that has a slice spacing
        uid = None if uid is None else str(uid)
        return read_series_info(str(folder), uid, allow_resample=resampled, recursive=recursive, min_slices=2)
    return read_series_info(series_info)


def write_dicom_outputs(
    mask_on_ct_grid: Any,
    series_info: SeriesInfo | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    roi_name: str = "CTV",
    *,
    formats: Sequence[str] = ("seg", "rtstruct"),
    label_value: int | None = None,
    algorithm_name: str = "FairDRO",
    algorithm_version: str = "0.1.0",
) -> dict[str, Path]:
    """Write the predicted target as DICOM SEG and/or RTSTRUCT referencing the source CT.

    Args:
        mask_on_ct_grid: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` mask on the CT grid as loaded by
            :class:`~scripts.dicom_series.LoadDicomSeriesd` (i.e. after ``Invertd``).
        series_info: the CT: a :class:`SeriesInfo`, the MetaTensor's meta dict, or the series folder.
        out_dir: output folder; must not be (inside) the CT series folder.
        roi_name: ROI / segment label.
        formats: any of ``"seg"``, ``"rtstruct"``.
        label_value: voxel value of the target in a multi-label mask (default: every nonzero voxel).
        algorithm_name: algorithm name recorded in the objects.
        algorithm_version: algorithm version recorded in the objects.

    Returns:
        ``{"seg": path, "rtstruct": path}`` for the formats written (each written atomically).

    Raises:
        ValueError: unknown format, mask not on the grid, or ``out_dir`` inside the input series folder.
    """
    unknown = set(formats) - {"seg", "rtstruct"}
    if unknown:
        raise ValueError(f"formats must be among 'seg', 'rtstruct'; got {sorted(unknown)}.")
    info = _resolve_series(series_info)
    out_dir = Path(out_dir).resolve()
    series_dir = Path(info.series_dir).resolve()
    if out_dir == series_dir or series_dir in out_dir.parents:
        raise ValueError(f"out_dir {out_dir} is inside the input series folder {series_dir}; choose another folder.")
    mask = _as_mask(mask_on_ct_grid, label_value)
    if mask.shape != tuple(info.shape):
        raise ValueError(
            f"mask shape {mask.shape} is not the CT grid {tuple(info.shape)} ((X, Y, Z)); invert the "
            "preprocessing (Invertd) before writing."
        )
    stored = info.resampled_from or info
    if info.resampled_from is not None:
        mask = resample_slices(mask, info, stored, order=0)
    uid = info.series_instance_uid
    paths: dict[str, Path] = {}
    if "seg" in formats:
        from scripts.dicom_seg import write_seg  # highdicom is needed only here

        paths["seg"] = write_seg(
            mask,
            stored,
            out_dir / f"SEG_{uid}.dcm",
            segment_label=roi_name,
            algorithm_name=algorithm_name,
            algorithm_version=algorithm_version,
        )
    if "rtstruct" in formats:
        paths["rtstruct"] = write_rtstruct(
            mask,
            stored,
            out_dir / f"RS_{uid}.dcm",
            roi_name=roi_name,
            algorithm_name=algorithm_name,
            algorithm_version=algorithm_version,
        )
    return paths


class SaveDicomOutputsd(MapTransform):
    """Post-processing transform: write ``d[key]`` (the mask on the CT grid) as DICOM SEG and RTSTRUCT.

    Place it after ``Invertd`` and ``AsDiscreted`` in an inference config whose input was loaded with
    :class:`~scripts.dicom_series.LoadDicomSeriesd`. The reference metadata (``dicom_series_dir``,
    ``dicom_series_instance_uid``) is taken from ``d[meta_src_key].meta`` (or ``d[f"{meta_src_key}_meta_dict"]``).
    The written paths are stored as strings under ``d[f"{key}_dicom_outputs"]``.

    Args:
        keys: key(s) of the mask(s) to write.
        output_dir: folder for the files (never the input series folder).
        meta_src_key: key of the loaded CT whose metadata names the series.
        roi_name: ROI / segment label.
        formats: any of ``"seg"``, ``"rtstruct"``.
        label_value: voxel value of the target in a multi-label mask (default: every nonzero voxel).
        algorithm_name: algorithm name recorded in the objects.
        algorithm_version: algorithm version recorded in the objects.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: Any,
        output_dir: str | Path,
        meta_src_key: str = "image",
        roi_name: str = "CTV",
        formats: Sequence[str] = ("seg", "rtstruct"),
        label_value: int | None = None,
        algorithm_name: str = "FairDRO",
        algorithm_version: str = "0.1.0",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.meta_src_key = meta_src_key
        self.options = {
            "roi_name": roi_name,
            "formats": tuple(formats),
            "label_value": label_value,
            "algorithm_name": algorithm_name,
            "algorithm_version": algorithm_version,
        }

    def _meta(self, d: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        for candidate in (d.get(self.meta_src_key), d.get(key)):
            meta = getattr(candidate, "meta", None)
            if meta is not None and META_SERIES_DIR in meta:
                return meta
        meta = d.get(f"{self.meta_src_key}_meta_dict")
        if meta is None:
            raise ValueError(f"No DICOM reference metadata under {self.meta_src_key!r}; load with LoadDicomSeriesd.")
        return meta

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = write_dicom_outputs(d[key], self._meta(d, key), self.output_dir, **self.options)
            d[f"{key}_dicom_outputs"] = {name: str(path) for name, path in paths.items()}
        return d


def ensure_output_outside(output_dir: str | Path, input_dir: str | Path) -> str:
    """Refuse an output folder that is the input series folder or inside it (inputs are never written to).

    Args:
        output_dir: where results will be written.
        input_dir: the DICOM series folder being read.

    Returns:
        ``output_dir`` as a string, so a config can use the checked value.

    Raises:
        ValueError: naming both folders.
    """
    out, src = Path(output_dir).resolve(), Path(input_dir).resolve()
    if out == src or src in out.parents:
        raise ValueError(
            f"output_dir {out} is inside the input series folder {src}; choose another folder "
            "(inference never writes into its input)."
        )
    return str(output_dir)


class CaseOutputsAllOrNothing:
    """Run a case's output transforms so that a failure leaves no output of that case behind.

    Files that appear under ``output_dir`` while the transforms run are removed when one of them raises (e.g.
    the NIfTI mask and the SEG already written when the RTSTRUCT writer refuses); the error is re-raised.
    Give each case its own ``output_dir`` when cases run concurrently.

    Args:
        transforms: the output transforms (``SaveImaged``, :class:`SaveDicomOutputsd`, ...), run in order.
        output_dir: the folder they write into.
    """

    def __init__(self, transforms: Sequence[Any], output_dir: str | Path):
        from monai.transforms import Compose

        self.transform = Compose(list(transforms))
        self.output_dir = Path(output_dir)

    def _files(self) -> set[Path]:
        return {p for p in self.output_dir.rglob("*") if p.is_file()} if self.output_dir.is_dir() else set()

    def __call__(self, data: Any) -> Any:
        """Apply the transforms; on failure remove what they wrote, then re-raise."""
        before = self._files()
        existed = self.output_dir.exists()
        try:
            return self.transform(data)
        except BaseException:
            written = sorted(self._files() - before)
            for path in written:
                path.unlink(missing_ok=True)
            if written:
                logger.error("Writing the outputs failed; removed %d file(s) this case wrote to %s", len(written),
                             self.output_dir)  # fmt: skip
            if not existed and self.output_dir.is_dir() and not any(self.output_dir.iterdir()):
                self.output_dir.rmdir()
            raise
