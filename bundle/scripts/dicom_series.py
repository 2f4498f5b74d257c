"""Reading a planning-CT DICOM series that a clinic can trust.

Conventions used throughout this module (and by :mod:`scripts.rtstruct`, :mod:`scripts.dicom_seg`):

* **Volume arrays** are indexed ``(X, Y, Z) = (i, j, k)``, the nibabel / MONAI-ITKReader order:
  ``i`` is the DICOM *column* index (it moves along the row direction cosine, the first three values of
  ImageOrientationPatient), ``j`` is the DICOM *row* index (it moves along the column direction cosine,
  the last three values) and ``k`` is the slice index, increasing along the slice normal
  ``n = row_cosine x col_cosine``. A DICOM pixel array ``(rows, cols)`` of slice ``k`` is ``volume[:, :, k].T``.
* **Patient coordinates** are DICOM **LPS** millimetres unless a name says ``ras``.
* ``SeriesInfo.affine_lps`` maps a voxel index ``(i, j, k, 1)`` to LPS mm; ``SeriesInfo.affine_ras`` is
  ``diag(-1, -1, 1, 1) @ affine_lps``, the nibabel/MONAI convention (what ``LoadImage`` gives for a NIfTI and
  what ``ITKReader(affine_lps_to_ras=True)`` gives for a DICOM folder), so the same Orientation/Spacing/
  Invertd chain works for NIfTI and DICOM input.

Slices are ordered by their position along the normal, never by file name or InstanceNumber. A series is
refused (with an exception naming the file or UID) when it is not CT, mixes orientations or matrix sizes, has
gantry tilt, duplicate positions, missing slices or non-uniform spacing; the last two can instead be resampled
onto a uniform grid with ``allow_resample=True`` (the original slices stay available as
``SeriesInfo.resampled_from`` so writers can reference them).

Nothing here logs patient-identifying attributes: logs and errors carry file names and UIDs only.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.transforms import LoadImaged
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Matrix that turns an LPS affine into a RAS one (and back: it is its own inverse)."""

NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "SR", "KO", "PR", "REG", "RWV", "DOC", "PLAN"}
)
"""Modalities of objects that may sit beside an image series in an export folder and are set aside."""

#: metadata keys that :class:`DicomSeriesReader` adds for the DICOM writers
META_SERIES_DIR = "dicom_series_dir"
META_SERIES_UID = "dicom_series_instance_uid"
META_STUDY_UID = "dicom_study_instance_uid"
META_FOR_UID = "dicom_frame_of_reference_uid"
META_RESAMPLED = "dicom_resampled"

_ORIENTATION_TOL = 1e-4  # direction cosine agreement between slices
_ORTHO_TOL = 1e-3  # unit length / orthogonality of the cosines
_POSITION_TOL_MM = 0.02  # absolute tolerance on slice positions
_SPACING_REL_TOL = 0.01  # slice gaps may differ from the nominal one by 1 %


class DicomSeriesError(ValueError):
    """Base class of every error raised while reading a DICOM series."""


class CorruptDicomError(DicomSeriesError):
    """A file is not readable DICOM, or its pixel data cannot be decoded."""


class NoSeriesError(DicomSeriesError):
    """A folder holds no image series (or no series with the requested UID)."""


class AmbiguousSeriesError(DicomSeriesError):
    """A folder holds several image series and none was chosen."""


class UnsupportedModalityError(DicomSeriesError):
    """The series is not of a supported modality (CT)."""


class GantryTiltError(DicomSeriesError):
    """The series was acquired with gantry tilt (slices are sheared against their normal)."""


class InconsistentGeometryError(DicomSeriesError):
    """Slices disagree on orientation, matrix size or pixel spacing, or share a position."""


class NonUniformSpacingError(DicomSeriesError):
    """The distance between consecutive slices is not constant."""


class MissingSliceError(NonUniformSpacingError):
    """A gap between slices is a whole multiple of the nominal spacing: slices are missing."""


@dataclass(frozen=True, eq=False)
class SeriesInfo:
    """Geometry and references of a CT series; every vector is in LPS mm.

    Attributes:
        series_dir: folder the series was read from.
        series_instance_uid: SeriesInstanceUID.
        study_instance_uid: StudyInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID.
        modality: Modality (``"CT"``).
        sop_class_uid: SOPClassUID of the slices.
        sop_instance_uids: SOPInstanceUID of each slice, in slice order ``k`` (empty for a resampled grid).
        files: file of each slice, in slice order ``k`` (empty for a resampled grid).
        headers: header of each slice without pixel data, in slice order ``k`` (empty for a resampled grid).
        row_cosine: ``(3,)`` direction of increasing column index ``i`` (ImageOrientationPatient[0:3]).
        col_cosine: ``(3,)`` direction of increasing row index ``j`` (ImageOrientationPatient[3:6]).
        pixel_spacing: ``(row_spacing, col_spacing)`` in mm, as DICOM PixelSpacing stores it.
        positions: ``(Z, 3)`` ImagePositionPatient of each slice, in slice order ``k``.
        shape: ``(X, Y, Z) = (Columns, Rows, number of slices)``.
        resampled_from: for a grid made uniform by resampling, the series as stored; else ``None``.
    """

    series_dir: Path
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...] = field(repr=False)
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    positions: np.ndarray
    shape: tuple[int, int, int]
    resampled_from: SeriesInfo | None = None

    @property
    def normal(self) -> np.ndarray:
        """``(3,)`` slice normal ``row_cosine x col_cosine`` (LPS); ``k`` increases along it."""
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def slice_offsets(self) -> np.ndarray:
        """``(Z,)`` position of each slice along the normal, in mm (increasing)."""
        return self.positions @ self.normal

    @property
    def slice_spacing(self) -> float:
        """Mean distance between consecutive slices in mm (1.0 for a single slice)."""
        offsets = self.slice_offsets
        return float(np.mean(np.diff(offsets))) if len(offsets) > 1 else 1.0

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along ``(i, j, k)`` in mm: ``(col_spacing, row_spacing, slice_spacing)``."""
        return (float(self.pixel_spacing[1]), float(self.pixel_spacing[0]), self.slice_spacing)

    @property
    def affine_lps(self) -> np.ndarray:
        """``(4, 4)`` map from voxel index ``(i, j, k, 1)`` to LPS mm."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_cosine * self.pixel_spacing[1]
        affine[:3, 1] = self.col_cosine * self.pixel_spacing[0]
        affine[:3, 2] = self.normal * self.slice_spacing
        affine[:3, 3] = self.positions[0]
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """``(4, 4)`` map from voxel index ``(i, j, k, 1)`` to RAS mm (nibabel / MONAI convention)."""
        return LPS_TO_RAS @ self.affine_lps

    @property
    def reference_header(self) -> Dataset:
        """Header of the first stored slice: patient/study attributes for derived objects."""
        source = self.resampled_from or self
        return source.headers[0]

    def describe(self) -> str:
        """One line naming the series by UID and folder (no patient attributes)."""
        return f"series {self.series_instance_uid} in {self.series_dir}"


# ----------------------------------------------------------------------------------------------- file level


def list_candidate_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """List the files of a folder that should be DICOM.

    Hidden files (name starting with ``.``) and ``DICOMDIR`` are skipped; everything else must be DICOM.

    Args:
        folder: the folder to scan.
        recursive: also scan sub-folders.

    Returns:
        Sorted file paths.

    Raises:
        NoSeriesError: if ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NoSeriesError(f"DICOM folder {folder} does not exist or is not a directory.")
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )


def read_header(path: str | Path) -> Dataset:
    """Read a DICOM header (no pixel data).

    Args:
        path: the file.

    Returns:
        The dataset without PixelData.

    Raises:
        CorruptDicomError: naming the file when it is not readable DICOM.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error, ...)
        raise CorruptDicomError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err}).") from err


def group_by_series(files: Sequence[Path]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Read the headers of ``files`` and group them by SeriesInstanceUID.

    Raises:
        CorruptDicomError: naming the first unreadable file, or a file without SeriesInstanceUID.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        ds = read_header(path)
        uid = ds.get("SeriesInstanceUID")
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise CorruptDicomError(f"{path}: DICOM file has no {keyword}.")
        groups.setdefault(str(uid), []).append((path, ds))
    return groups


def summarise_series(groups: dict[str, list[tuple[Path, Dataset]]]) -> list[str]:
    """One line per series: UID, modality, number of files (no patient attributes)."""
    lines = []
    for uid, members in groups.items():
        ds = members[0][1]
        lines.append(f"{uid} (Modality {ds.get('Modality', '?')}, {len(members)} files)")
    return lines


def select_image_series(
    groups: dict[str, list[tuple[Path, Dataset]]], folder: Path, series_uid: str | None = None
) -> tuple[str, list[tuple[Path, Dataset]]]:
    """Choose the image series to read among the series of a folder.

    Objects such as RTSTRUCT, SEG or RTPLAN (see :data:`NON_IMAGE_MODALITIES`) are set aside unless chosen.

    Args:
        groups: output of :func:`group_by_series`.
        folder: the folder (for messages).
        series_uid: the SeriesInstanceUID to read; required when there are several image series.

    Returns:
        ``(series_uid, members)``.

    Raises:
        NoSeriesError: no image series, or ``series_uid`` is not in the folder.
        AmbiguousSeriesError: several image series and ``series_uid`` is None (the message lists them).
    """
    if series_uid is not None:
        if series_uid not in groups:
            found = "; ".join(summarise_series(groups)) or "none"
            raise NoSeriesError(f"Series {series_uid} is not in {folder}; series found: {found}.")
        return series_uid, groups[series_uid]
    images = {
        uid: members
        for uid, members in groups.items()
        if str(members[0][1].get("Modality", "")).upper() not in NON_IMAGE_MODALITIES
    }
    if not images:
        raise NoSeriesError(
            f"No image series in {folder}; objects found: {'; '.join(summarise_series(groups)) or 'none'}."
        )
    if len(images) > 1:
        raise AmbiguousSeriesError(
            f"{folder} holds {len(images)} image series: {'; '.join(summarise_series(images))}. "
            "Choose one with series_uid=... (or move the others to their own folders)."
        )
    return next(iter(images.items()))


# ------------------------------------------------------------------------------------------- geometry checks


def _float_vector(ds: Dataset, keyword: str, length: int, path: Path) -> np.ndarray:
    """Read a numeric multi-valued attribute, raising a clear error when absent or malformed."""
    value = ds.get(keyword)
    try:
        vec = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InconsistentGeometryError(f"{path}: missing or malformed {keyword} ({value!r}).") from err
    if vec.shape != (length,) or not np.all(np.isfinite(vec)):
        raise InconsistentGeometryError(f"{path}: {keyword} must hold {length} finite numbers, got {value!r}.")
    return vec


def _check_modality(members: Sequence[tuple[Path, Dataset]], uid: str, modalities: Sequence[str]) -> str:
    """Check that every slice has an accepted modality and is a single-frame image."""
    found = {str(ds.get("Modality", "")).upper() for _, ds in members}
    if len(found) != 1 or not found <= {m.upper() for m in modalities}:
        raise UnsupportedModalityError(
            f"Series {uid} (first file {members[0][0]}) has Modality {sorted(found)}; "
            f"only {list(modalities)} is supported (planning CT)."
        )
    for path, ds in members:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise UnsupportedModalityError(
                f"{path}: multi-frame (enhanced) images are not supported; export the series as single-frame CT."
            )
    return found.pop()


def _check_gantry_tilt(members: Sequence[tuple[Path, Dataset]], uid: str) -> None:
    """Refuse a series whose header says it was acquired with a tilted gantry."""
    for path, ds in members:
        tilt = ds.get("GantryDetectorTilt")
        if tilt is not None and str(tilt).strip() != "" and abs(float(tilt)) > 1e-3:
            raise GantryTiltError(
                f"Series {uid}: {path} has GantryDetectorTilt {float(tilt)} degrees. Tilted-gantry series are "
                "not supported: resample it onto an orthogonal grid first."
            )


def _common_orientation(members: Sequence[tuple[Path, Dataset]], uid: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(row_cosine, col_cosine)`` shared by all slices (LPS), checking they are orthonormal."""
    first_path, first = members[0]
    iop = _float_vector(first, "ImageOrientationPatient", 6, first_path)
    for path, ds in members[1:]:
        other = _float_vector(ds, "ImageOrientationPatient", 6, path)
        if np.max(np.abs(other - iop)) > _ORIENTATION_TOL:
            raise InconsistentGeometryError(
                f"Series {uid}: {path} has ImageOrientationPatient {other.tolist()} but {first_path} has "
                f"{iop.tolist()}; a series must have one orientation."
            )
    row, col = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > _ORTHO_TOL
        or abs(np.linalg.norm(col) - 1) > _ORTHO_TOL
        or abs(row @ col) > _ORTHO_TOL
    ):
        raise InconsistentGeometryError(
            f"Series {uid}: ImageOrientationPatient {iop.tolist()} ({first_path}) is not two orthonormal vectors."
        )
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _common_matrix(members: Sequence[tuple[Path, Dataset]], uid: str) -> tuple[int, int, tuple[float, float]]:
    """Return ``(rows, columns, pixel_spacing)`` shared by all slices."""
    first_path, first = members[0]
    ref = None
    for path, ds in members:
        try:
            this = (int(ds.Rows), int(ds.Columns))
        except AttributeError as err:
            raise InconsistentGeometryError(f"{path}: missing Rows/Columns.") from err
        spacing = tuple(_float_vector(ds, "PixelSpacing", 2, path).tolist())
        if min(spacing) <= 0:
            raise InconsistentGeometryError(f"{path}: PixelSpacing must be positive, got {spacing}.")
        if ref is None:
            ref = (this, spacing)
        elif this != ref[0] or not np.allclose(spacing, ref[1], atol=1e-4):
            raise InconsistentGeometryError(
                f"Series {uid}: {path} has Rows/Columns {this}, PixelSpacing {spacing} but {first_path} has "
                f"{ref[0]}, {ref[1]}."
            )
    (rows, cols), spacing = ref
    return rows, cols, spacing


def _sort_along_normal(
    members: Sequence[tuple[Path, Dataset]], normal: np.ndarray, uid: str
) -> tuple[list[tuple[Path, Dataset]], np.ndarray]:
    """Sort slices by position along ``normal``; return the members and their ``(Z, 3)`` positions (LPS)."""
    positions = np.stack([_float_vector(ds, "ImagePositionPatient", 3, path) for path, ds in members])
    order = np.argsort(positions @ normal, kind="stable")
    members = [members[i] for i in order]
    positions = positions[order]
    offsets = positions @ normal
    for k in np.nonzero(np.diff(offsets) < _POSITION_TOL_MM)[0]:
        raise InconsistentGeometryError(
            f"Series {uid}: {members[k][0]} and {members[k + 1][0]} lie at the same slice position "
            f"({offsets[k]:.3f} mm along the normal); duplicate slices or several acquisitions in one series."
        )
    return members, positions


def _check_no_tilt(
    members: Sequence[tuple[Path, Dataset]], positions: np.ndarray, normal: np.ndarray, uid: str
) -> None:
    """Refuse slices whose positions drift sideways from the normal (gantry tilt or shear)."""
    displacement = positions - positions[0]
    along = displacement @ normal
    sideways = np.linalg.norm(displacement - np.outer(along, normal), axis=1)
    allowed = _POSITION_TOL_MM + 1e-3 * np.abs(along)
    bad = np.nonzero(sideways > allowed)[0]
    if bad.size:
        k = int(bad[-1])
        angle = float(np.degrees(np.arctan2(sideways[k], abs(along[k]))))
        raise GantryTiltError(
            f"Series {uid}: slice positions do not follow the slice normal {np.round(normal, 4).tolist()}: "
            f"{members[k][0]} is {sideways[k]:.2f} mm off the line through the first slice (about {angle:.2f} "
            "degrees): gantry tilt or sheared acquisition. Resample it onto an orthogonal grid first."
        )


def _check_uniform_spacing(members: Sequence[tuple[Path, Dataset]], offsets: np.ndarray, uid: str) -> None:
    """Raise :class:`MissingSliceError` / :class:`NonUniformSpacingError` on an irregular slice stack."""
    if len(offsets) < 3:
        return
    gaps = np.diff(offsets)
    nominal = float(np.median(gaps))
    tol = max(_POSITION_TOL_MM, _SPACING_REL_TOL * nominal)
    bad = np.nonzero(np.abs(gaps - nominal) > tol)[0]
    if not bad.size:
        return
    k = int(bad[0])
    ratio = gaps[k] / nominal
    where = (
        f"gap of {gaps[k]:.3f} mm between slice positions {offsets[k]:.3f} and {offsets[k + 1]:.3f} mm along the "
        f"normal (files {members[k][0].name} and {members[k + 1][0].name}; nominal spacing {nominal:.3f} mm; "
        f"{bad.size} irregular gap(s) in all)"
    )
    advice = "Re-export the complete series, or pass allow_resample=True to resample onto a uniform grid."
    if ratio > 1.5 and abs(ratio - round(ratio)) * nominal <= tol:
        raise MissingSliceError(
            f"Series {uid} in {members[0][0].parent}: {int(round(ratio)) - 1} missing slice(s): {where}. {advice}"
        )
    raise NonUniformSpacingError(
        f"Series {uid} in {members[0][0].parent}: non-uniform slice spacing: {where}. {advice}"
    )


def build_series_info(
    members: Sequence[tuple[Path, Dataset]],
    folder: Path,
    modalities: Sequence[str] = ("CT",),
    require_uniform: bool = True,
) -> SeriesInfo:
    """Check the headers of one series and build its :class:`SeriesInfo` (slices sorted along the normal).

    Args:
        members: ``(path, header)`` of every slice of one series, in any order.
        folder: the folder read (kept in the info).
        modalities: accepted Modality values.
        require_uniform: raise on missing slices / non-uniform spacing (otherwise only sort).

    Raises:
        UnsupportedModalityError, GantryTiltError, InconsistentGeometryError, NonUniformSpacingError,
        MissingSliceError: with the series UID and the offending file.
    """
    uid = str(members[0][1].SeriesInstanceUID)
    modality = _check_modality(members, uid, modalities)
    _check_gantry_tilt(members, uid)
    row, col = _common_orientation(members, uid)
    rows, cols, pixel_spacing = _common_matrix(members, uid)
    normal = np.cross(row, col)
    members, positions = _sort_along_normal(members, normal, uid)
    _check_no_tilt(members, positions, normal, uid)
    if require_uniform:
        _check_uniform_spacing(members, positions @ normal, uid)
    first = members[0][1]
    return SeriesInfo(
        series_dir=Path(folder),
        series_instance_uid=uid,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=modality,
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for _, ds in members),
        files=tuple(path for path, _ in members),
        headers=tuple(ds for _, ds in members),
        row_cosine=row,
        col_cosine=col,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        positions=positions,
        shape=(cols, rows, len(members)),
    )


# ------------------------------------------------------------------------------------------------ resampling


def uniform_grid(source: SeriesInfo) -> SeriesInfo:
    """A uniform slice grid spanning ``source`` at its median slice spacing (endpoints kept exactly).

    The returned info has no files/UIDs of its own; ``resampled_from`` points to ``source``.
    """
    offsets = source.slice_offsets
    nominal = float(np.median(np.diff(offsets)))
    count = int(round((offsets[-1] - offsets[0]) / nominal)) + 1
    steps = np.linspace(0.0, offsets[-1] - offsets[0], count)
    positions = source.positions[0] + np.outer(steps, source.normal)
    return replace(
        source,
        sop_instance_uids=(),
        files=(),
        headers=(),
        positions=positions,
        shape=(source.shape[0], source.shape[1], count),
        resampled_from=source,
    )


def resample_slices(volume: np.ndarray, source: SeriesInfo, target: SeriesInfo, order: int = 1) -> np.ndarray:
    """Resample a volume along the slice axis from ``source`` slice positions to ``target`` ones.

    Both grids must share the in-plane geometry (same cosines, spacing, matrix and in-plane origin).

    Args:
        volume: ``(X, Y, Z_source)`` array on the ``source`` grid.
        source: grid of ``volume``.
        target: grid to produce.
        order: 1 for linear interpolation (images), 0 for nearest slice (masks).

    Returns:
        ``(X, Y, Z_target)`` array, same dtype as ``volume``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}.")
    src = source.slice_offsets
    dst = target.slice_offsets
    if order == 0:
        idx = np.abs(dst[:, None] - src[None, :]).argmin(axis=1)
        return volume[:, :, idx]
    upper = np.clip(np.searchsorted(src, dst, side="right"), 1, len(src) - 1)
    lower = upper - 1
    weight = np.clip((dst - src[lower]) / (src[upper] - src[lower]), 0.0, 1.0)
    out = volume[:, :, lower] * (1.0 - weight) + volume[:, :, upper] * weight
    return out.astype(volume.dtype, copy=False)


# ---------------------------------------------------------------------------------------------- pixel data


def read_pixels(info: SeriesInfo, dtype: Any = np.float32) -> np.ndarray:
    """Read the pixel data of every slice of ``info`` and apply RescaleSlope/RescaleIntercept.

    Returns:
        ``(X, Y, Z)`` volume in Hounsfield units (for CT).

    Raises:
        CorruptDicomError: naming the file whose pixel data cannot be decoded.
    """
    cols, rows, depth = info.shape
    volume = np.empty((cols, rows, depth), dtype=dtype)
    for k, path in enumerate(info.files):
        try:
            ds = pydicom.dcmread(path)
            pixels = np.asarray(ds.pixel_array)
        except Exception as err:  # pydicom raises many types for truncated or unsupported pixel data
            raise CorruptDicomError(f"{path}: cannot decode pixel data ({type(err).__name__}: {err}).") from err
        if pixels.shape != (rows, cols):
            raise CorruptDicomError(
                f"{path}: pixel array shape {pixels.shape} does not match Rows/Columns {(rows, cols)}."
            )
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        volume[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return volume


# ---------------------------------------------------------------------------------------------- public API


def read_series_info(
    folder: str | Path,
    series_uid: str | None = None,
    *,
    allow_resample: bool = False,
    recursive: bool = False,
    modalities: Sequence[str] = ("CT",),
) -> SeriesInfo:
    """Read and check the headers of a series (no pixel data).

    Args:
        folder: folder holding the series (other series and RT objects may sit beside it).
        series_uid: SeriesInstanceUID to read; needed when the folder holds several image series.
        allow_resample: accept missing slices / non-uniform spacing and describe a uniform grid instead
            (``resampled_from`` then holds the stored slices).
        recursive: also scan sub-folders.
        modalities: accepted modalities.

    Returns:
        The series geometry and references.

    Raises:
        DicomSeriesError: a subclass naming the file or UID (see the module docstring).
    """
    folder = Path(folder)
    groups = group_by_series(list_candidate_files(folder, recursive))
    uid, members = select_image_series(groups, folder, series_uid)
    info = build_series_info(members, folder, modalities, require_uniform=not allow_resample)
    if allow_resample:
        try:
            _check_uniform_spacing(list(zip(info.files, info.headers)), info.slice_offsets, uid)
        except NonUniformSpacingError as err:
            logger.warning("Resampling onto a uniform slice grid: %s", err)
            return uniform_grid(info)
    logger.debug("Read %d slices of %s", info.shape[2], info.describe())
    return info


def read_ct_series(
    folder: str | Path,
    series_uid: str | None = None,
    *,
    allow_resample: bool = False,
    recursive: bool = False,
    modalities: Sequence[str] = ("CT",),
    dtype: Any = np.float32,
) -> tuple[np.ndarray, SeriesInfo]:
    """Read a CT series into an ``(X, Y, Z)`` HU volume with its exact geometry.

    Args:
        folder: folder holding the series.
        series_uid: SeriesInstanceUID to read; needed when the folder holds several image series.
        allow_resample: resample missing slices / non-uniform spacing linearly onto a uniform grid
            instead of raising.
        recursive: also scan sub-folders.
        modalities: accepted modalities.
        dtype: dtype of the returned volume.

    Returns:
        ``(volume, info)``: volume ``(X, Y, Z)`` in HU indexed as ``info.affine_lps`` / ``info.affine_ras`` say.

    Raises:
        DicomSeriesError: a subclass naming the file or UID.
    """
    info = read_series_info(
        folder, series_uid, allow_resample=allow_resample, recursive=recursive, modalities=modalities
    )
    if info.resampled_from is None:
        return read_pixels(info, dtype), info
    stored = read_pixels(info.resampled_from, np.float32)
    return resample_slices(stored, info.resampled_from, info, order=1).astype(dtype), info


def reference_meta(info: SeriesInfo) -> dict[str, Any]:
    """Metadata entries that let the DICOM writers find the source series again (UIDs and folder only)."""
    return {
        META_SERIES_DIR: str(info.series_dir),
        META_SERIES_UID: info.series_instance_uid,
        META_STUDY_UID: info.study_instance_uid,
        META_FOR_UID: info.frame_of_reference_uid,
        META_RESAMPLED: info.resampled_from is not None,
    }


# ----------------------------------------------------------------------------------------- MONAI integration


class DicomSeriesReader(ImageReader):
    """MONAI ``ImageReader`` for a folder holding one CT series, with the checks of :func:`read_ct_series`.

    ``get_data`` returns the ``(X, Y, Z)`` volume and a metadata dict with ``affine``/``original_affine`` in
    RAS (``space`` = ``"RAS"``), as MONAI's ITKReader and NibabelReader do, plus the keys of
    :func:`reference_meta` for the writers.

    Prefer :class:`LoadDicomSeriesd`: ``LoadImage(reader=DicomSeriesReader())`` falls back to MONAI's other
    readers when this one raises, and ITKReader would then silently read a refused series.

    Args:
        series_uid: SeriesInstanceUID to read when a folder holds several image series.
        allow_resample: resample irregular slice stacks instead of raising.
        recursive: also scan sub-folders.
    """

    def __init__(self, series_uid: str | None = None, allow_resample: bool = False, recursive: bool = False):
        self.series_uid = series_uid
        self.allow_resample = allow_resample
        self.recursive = recursive

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True when ``filename`` names exactly one existing folder."""
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return len(names) == 1 and Path(names[0]).is_dir()

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> tuple[np.ndarray, SeriesInfo]:
        """Read one series folder; returns ``(volume, info)`` as :func:`read_ct_series`."""
        names = [data] if isinstance(data, (str, Path)) else list(data)
        if len(names) != 1:
            raise DicomSeriesError(f"DicomSeriesReader reads one series folder at a time, got {len(names)} paths.")
        return read_ct_series(names[0], self.series_uid, allow_resample=self.allow_resample, recursive=self.recursive)

    def get_data(self, img: tuple[np.ndarray, SeriesInfo]) -> tuple[np.ndarray, dict]:
        """Return ``(volume (X, Y, Z), meta)`` in MONAI's conventions (RAS affine, no channel)."""
        volume, info = img
        affine = info.affine_ras
        meta: dict[str, Any] = {
            "affine": affine.copy(),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(volume.shape),
            "original_channel_dim": float("nan"),
            "space": "RAS",
            "spacing": np.asarray(info.spacing),
        }
        meta.update(reference_meta(info))
        return volume, meta


class LoadDicomSeriesd(LoadImaged):
    """``LoadImaged`` that reads a CT series folder with :class:`DicomSeriesReader` and never falls back.

    Use it in place of ``LoadImaged`` for DICOM input: ``{"_target_": "scripts.dicom_series.LoadDicomSeriesd",
    "keys": "image", "ensure_channel_first": true}``. The MetaTensor has the same array order and RAS affine
    as ``LoadImaged`` gives for the equivalent NIfTI, so Orientation/Spacing/Invertd behave the same; its meta
    also holds :func:`reference_meta` (``dicom_series_dir``, ``dicom_series_instance_uid``, ...).

    Args:
        keys: keys holding series folders.
        series_uid: SeriesInstanceUID to read when a folder holds several image series.
        allow_resample: resample irregular slice stacks instead of raising.
        recursive: also scan sub-folders.
        kwargs: passed to ``LoadImaged`` (``dtype``, ``ensure_channel_first``, ``image_only``, ...).
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        series_uid: str | None = None,
        allow_resample: bool = False,
        recursive: bool = False,
        **kwargs,
    ):
        self.dicom_reader = DicomSeriesReader(series_uid, allow_resample, recursive)
        super().__init__(keys, reader=self.dicom_reader, **kwargs)

    def __call__(self, data, reader: ImageReader | None = None):
        """Load every key with the DICOM reader (a runtime reader is refused)."""
        if reader is not None and reader is not self.dicom_reader:
            raise ValueError("LoadDicomSeriesd always reads with its own DicomSeriesReader; do not pass a reader.")
        return super().__call__(data, self.dicom_reader)
