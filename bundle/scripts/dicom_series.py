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

Files beside the series that are not its slices (not DICOM, DICOMDIR, RTSTRUCT, RTPLAN, SR, presentation
states, other series, objects saved without preamble/File Meta) are skipped with one INFO line; a damaged file
that is, or may be, a slice of the chosen series refuses it. Slices are ordered by their position along the
normal, never by file name or InstanceNumber. A series is refused (with an exception naming the file or UID)
when it is not CT, lacks a Type 1 attribute (:data:`REQUIRED_ATTRIBUTES`), has fewer than ``min_slices`` slices,
mixes orientations or matrix sizes, has gantry tilt, duplicate positions, missing slices or non-uniform
spacing; the last two can instead be resampled onto a uniform grid with ``allow_resample=True`` (the original
slices stay available as ``SeriesInfo.resampled_from`` so writers can reference them).

Importing this module installs :func:`refusal_excepthook` as ``sys.excepthook``: an uncaught refusal (a
:class:`DicomSeriesError`, also when wrapped by MONAI) ends stderr with one ``ERROR <cause>`` line after the
traceback.

Nothing here logs patient-identifying attributes: logs and errors carry file names and UIDs only.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
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
#: whether the series was found by scanning sub-folders too (the writers then look for it the same way)
META_RECURSIVE = "dicom_recursive"

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


class TooFewSlicesError(DicomSeriesError):
    """The series has fewer slices than a 3D planning CT needs (e.g. a single slice or a localiser)."""


class MissingAttributeError(DicomSeriesError):
    """A slice lacks a Type 1 attribute (or has it empty) that reading or the outputs need."""


#: Type 1 attributes every slice must have (non-empty): the geometry and the references the outputs carry
REQUIRED_ATTRIBUTES = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SOPInstanceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)

#: default smallest number of slices of a series (never below 2: a single slice has no slice spacing)
DEFAULT_MIN_SLICES = 3

_TILT_ADVICE = (
    "Tilted-gantry series are not supported (allow_resample does not correct tilt): convert the series with a "
    "tool that corrects gantry tilt, e.g. dcm2niix (it writes a NIfTI on an orthogonal grid; use the NIfTI "
    "inference), or re-export it from the scanner / planning system without tilt."
)


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
        """Mean distance between consecutive slices in mm (a single slice has none: ValueError)."""
        offsets = self.slice_offsets
        if len(offsets) < 2:
            raise TooFewSlicesError(f"{self.describe()} has {len(offsets)} slice(s): no slice spacing.")
        return float(np.mean(np.diff(offsets)))

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

#: SOP classes of objects that are never slices of an image series (set aside when they sit beside one)
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.1.3.10": "DICOMDIR",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.481.8": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",
    "1.2.840.10008.5.1.4.1.1.481.4": "RTRECORD",
    "1.2.840.10008.5.1.4.1.1.66": "RAW",
    "1.2.840.10008.5.1.4.1.1.66.1": "REG",
    "1.2.840.10008.5.1.4.1.1.66.3": "REG",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.104.1": "DOC",
}
_NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "SR",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.": "PR",  # presentation states
}
_DICOMDIR_NAMES = {"DICOMDIR", "DIRFILE"}
_DICM_OFFSET = 128
_FIRST_GROUPS = {b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"}  # first tag group of a file without preamble


@dataclass
class FolderScan:
    """What a folder holds: the image series, and the files set aside or damaged.

    Attributes:
        groups: image objects by SeriesInstanceUID (``""`` for images without one), each ``(path, header)``.
        set_aside: ``(path, kind)`` of files that are not images (kind: ``"not DICOM"``, ``"DICOMDIR"``,
            ``"RTSTRUCT"``, ``"SR"``, ...).
        damaged: ``(path, reason, kind)`` of DICOM files whose header cannot be read; ``kind`` is what their
            File Meta says (``"RTSTRUCT"``, ``"image"``) or ``None`` when unknown.
    """

    groups: dict[str, list[tuple[Path, Dataset]]] = field(default_factory=dict)
    set_aside: list[tuple[Path, str]] = field(default_factory=list)
    damaged: list[tuple[Path, str, str | None]] = field(default_factory=list)


def list_candidate_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """List the files of a folder, except hidden ones (name starting with ``.``).

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
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))


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


def sop_class_kind(sop_class_uid: str, modality: str = "") -> str:
    """``"image"`` for an image storage SOP class, else the kind of object (``"RTSTRUCT"``, ``"SR"``, ...)."""
    sop_class_uid = str(sop_class_uid)
    if sop_class_uid in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[sop_class_uid]
    for prefix, kind in _NON_IMAGE_SOP_PREFIXES.items():
        if sop_class_uid.startswith(prefix):
            return kind
    modality = str(modality).upper()
    return modality if modality in NON_IMAGE_MODALITIES else "image"


def _looks_like_dicom(path: Path) -> tuple[bool, bool]:
    """``(has_preamble, plausible)``: the ``DICM`` marker at byte 128, or a first tag of group 0002/0008."""
    with open(path, "rb") as handle:
        head = handle.read(_DICM_OFFSET + 4)
    has_preamble = head[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM"
    return has_preamble, has_preamble or head[:2] in _FIRST_GROUPS


def _meta_kind(path: Path) -> str | None:
    """Kind of object the File Meta of a damaged file names, or None when it is unreadable."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - a damaged file: the kind is simply unknown
        return None
    uid = meta.get("MediaStorageSOPClassUID")
    return sop_class_kind(str(uid)) if uid else None


def _classify(path: Path, scan: FolderScan) -> None:
    """Read one file's header and file it in ``scan`` (image group, set aside or damaged)."""
    if path.name.upper() in _DICOMDIR_NAMES:
        scan.set_aside.append((path, "DICOMDIR"))
        return
    has_preamble, plausible = _looks_like_dicom(path)
    if not plausible:
        scan.set_aside.append((path, "not DICOM"))
        return
    try:  # force: exports may hold objects saved without preamble and File Meta (e.g. some RTSTRUCTs)
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a damaged file
        scan.damaged.append((path, f"{type(err).__name__}: {err}", _meta_kind(path) if has_preamble else None))
        return
    if not ds.get("SOPClassUID"):
        if has_preamble:  # a DICOM file without its SOP Common module: truncated, pydicom stops quietly
            scan.damaged.append((path, "no SOPClassUID: truncated or damaged", _meta_kind(path)))
        else:
            scan.set_aside.append((path, "not DICOM"))
        return
    kind = sop_class_kind(ds.SOPClassUID, ds.get("Modality", ""))
    if kind != "image":
        scan.set_aside.append((path, kind))
        return
    scan.groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((path, ds))


def scan_folder(files: Sequence[Path]) -> FolderScan:
    """Read the headers of ``files``: image objects grouped by series, everything else set aside or damaged."""
    scan = FolderScan()
    for path in files:
        _classify(Path(path), scan)
    return scan


def group_by_series(files: Sequence[Path]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Read the headers of ``files`` and group every readable DICOM object by SeriesInstanceUID.

    Unlike :func:`scan_folder` this keeps non-image objects (RTSTRUCT, ...) too; files that are not DICOM,
    DICOMDIRs and damaged files are left out.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        path = Path(path)
        if path.name.upper() in _DICOMDIR_NAMES:
            continue
        has_preamble, plausible = _looks_like_dicom(path)
        if not plausible:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
        except Exception:  # noqa: BLE001 - damaged files are reported by scan_folder, not here
            continue
        if ds.get("SOPClassUID") and ds.get("SeriesInstanceUID"):
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    return groups


def summarise_series(groups: dict[str, list[tuple[Path, Dataset]]]) -> list[str]:
    """One line per series: UID, modality, number of files (no patient attributes)."""
    lines = []
    for uid, members in groups.items():
        ds = members[0][1]
        lines.append(f"{uid or '<no SeriesInstanceUID>'} (Modality {ds.get('Modality', '?')}, {len(members)} files)")
    return lines


def select_image_series(
    groups: dict[str, list[tuple[Path, Dataset]]], folder: Path, series_uid: str | None = None
) -> tuple[str, list[tuple[Path, Dataset]]]:
    """Choose the image series to read among the series of a folder.

    Objects such as RTSTRUCT, SEG or RTPLAN (see :data:`NON_IMAGE_MODALITIES`) are set aside unless chosen.

    Args:
        groups: output of :func:`group_by_series` or ``scan_folder(...).groups``.
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
            raise NoSeriesError(
                f"Series {series_uid} is not in {folder}; image series found: {found}. Check the series_uid."
            )
        return series_uid, groups[series_uid]
    images = {
        uid: members
        for uid, members in groups.items()
        if str(members[0][1].get("Modality", "")).upper() not in NON_IMAGE_MODALITIES
    }
    if not images:
        raise NoSeriesError(
            f"No image series in {folder}; objects found: {'; '.join(summarise_series(groups)) or 'none'}. "
            "Point the input at the folder holding the planning CT slices."
        )
    if len(images) > 1:
        raise AmbiguousSeriesError(
            f"{folder} holds {len(images)} image series: {'; '.join(summarise_series(images))}. "
            "Choose one with series_uid=... (or move the others to their own folders)."
        )
    return next(iter(images.items()))


def _refuse_damaged(scan: FolderScan, uid: str) -> None:
    """Refuse the series when a damaged file is, or may be, one of its slices (named in the error)."""
    for path, reason, kind in scan.damaged:
        if kind not in (None, "image"):
            continue  # e.g. a damaged RTPLAN beside the CT: not a slice of it
        claims = uid and uid.encode("ascii", "ignore") in path.read_bytes()
        what = f"claims to be a slice of series {uid}" if claims else f"may be a slice of series {uid}"
        raise CorruptDicomError(
            f"{path}: {what} but its header cannot be read ({reason}). Copy or export the series again; "
            "remove the file only if it does not belong to the series."
        )


def _log_set_aside(scan: FolderScan, uid: str, folder: Path) -> None:
    """One INFO line with the number and kinds of files that are not slices of the chosen series."""
    kinds = Counter(kind for _, kind in scan.set_aside)
    kinds.update(f"damaged {kind}" for _, _, kind in scan.damaged if kind not in (None, "image"))
    for other, members in scan.groups.items():
        if other != uid:
            kinds[f"image of another series ({members[0][1].get('Modality', '?')})"] += len(members)
    if kinds:
        listing = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        count = kinds.total()
        logger.info("Skipped %d file(s) in %s that are not slices of series %s: %s", count, folder, uid, listing)


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
            raise GantryTiltError(f"Series {uid}: {path} has GantryDetectorTilt {float(tilt)} degrees. {_TILT_ADVICE}")


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
            f"degrees): gantry tilt or sheared acquisition. {_TILT_ADVICE}"
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


def _check_required_attributes(members: Sequence[tuple[Path, Dataset]], uid: str) -> None:
    """Refuse a series whose slices lack a Type 1 attribute of :data:`REQUIRED_ATTRIBUTES` (names file and tag)."""
    for path, ds in members:
        for keyword in REQUIRED_ATTRIBUTES:
            value = ds.get(keyword)
            if (
                value is None
                or (isinstance(value, str) and not value.strip())
                or (not isinstance(value, str) and hasattr(value, "__len__") and len(value) == 0)
            ):
                _refuse_if_truncated(path, uid)
                raise MissingAttributeError(
                    f"Series {uid or '<no SeriesInstanceUID>'}: {path} has no {keyword} (a Type 1 attribute, "
                    "missing or empty); the series cannot be placed in patient space or referenced by the outputs. "
                    "Export the series again from the scanner / planning system with complete headers."
                )


def _refuse_if_truncated(path: Path, uid: str) -> None:
    """Raise :class:`CorruptDicomError` when a slice with a missing attribute is in fact cut short (no pixel data)."""
    try:
        complete = "PixelData" in pydicom.dcmread(path, force=True)
    except Exception:  # noqa: BLE001 - unreadable pixel data: the file is damaged
        complete = False
    if not complete:
        raise CorruptDicomError(
            f"{path}: claims to be a slice of series {uid} but is truncated or damaged (its header stops early, "
            "no pixel data). Copy or export the series again."
        )


def _check_slice_count(members: Sequence[tuple[Path, Dataset]], uid: str, folder: Path, min_slices: int) -> None:
    """Refuse a series with fewer than ``min_slices`` slices (a single slice has no slice spacing)."""
    if min_slices < 2:
        raise ValueError(f"min_slices must be at least 2 (a single slice has no slice spacing), got {min_slices}.")
    if len(members) < min_slices:
        raise TooFewSlicesError(
            f"Series {uid} in {folder} has {len(members)} slice(s) (first file {members[0][0]}) but at least "
            f"{min_slices} are needed: a planning CT is a 3D stack (a localiser or a single slice is not). "
            "Export the whole series, or lower min_slices (never below 2)."
        )


def build_series_info(
    members: Sequence[tuple[Path, Dataset]],
    folder: Path,
    modalities: Sequence[str] = ("CT",),
    require_uniform: bool = True,
    min_slices: int = DEFAULT_MIN_SLICES,
) -> SeriesInfo:
    """Check the headers of one series and build its :class:`SeriesInfo` (slices sorted along the normal).

    Args:
        members: ``(path, header)`` of every slice of one series, in any order.
        folder: the folder read (kept in the info).
        modalities: accepted Modality values.
        require_uniform: raise on missing slices / non-uniform spacing (otherwise only sort).
        min_slices: fewest slices accepted (at least 2).

    Raises:
        UnsupportedModalityError, MissingAttributeError, TooFewSlicesError, GantryTiltError,
        InconsistentGeometryError, NonUniformSpacingError, MissingSliceError: with the series UID and the file.
    """
    uid = str(members[0][1].get("SeriesInstanceUID", "") or "")
    modality = _check_modality(members, uid, modalities)
    _check_required_attributes(members, uid)
    _check_slice_count(members, uid, Path(folder), min_slices)
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
        study_instance_uid=str(first.StudyInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
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
            raise CorruptDicomError(
                f"{path}: cannot decode pixel data ({type(err).__name__}: {err}). This slice of series "
                f"{info.series_instance_uid} is truncated, damaged or uses an unsupported compression: copy or "
                "export the series again (uncompressed if in doubt)."
            ) from err
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
    min_slices: int = DEFAULT_MIN_SLICES,
) -> SeriesInfo:
    """Read and check the headers of a series (no pixel data).

    Files that are not slices of the chosen series (not DICOM, DICOMDIR, RTSTRUCT, RTPLAN, SR, presentation
    states, other series, ...) are skipped with one INFO line; a damaged file that is or may be one of its
    slices refuses the series.

    Args:
        folder: folder holding the series (other series and RT objects may sit beside it).
        series_uid: SeriesInstanceUID to read; needed when the folder holds several image series.
        allow_resample: accept missing slices / non-uniform spacing and describe a uniform grid instead
            (``resampled_from`` then holds the stored slices). It does not correct gantry tilt.
        recursive: also scan sub-folders.
        modalities: accepted modalities.
        min_slices: fewest slices accepted (default 3, at least 2).

    Returns:
        The series geometry and references.

    Raises:
        DicomSeriesError: a subclass naming the file or UID (see the module docstring).
    """
    folder = Path(folder)
    scan = scan_folder(list_candidate_files(folder, recursive))
    if not scan.groups and scan.damaged:
        _refuse_damaged(scan, "")
    uid, members = select_image_series(scan.groups, folder, series_uid)
    _refuse_damaged(scan, uid)
    _log_set_aside(scan, uid, folder)
    info = build_series_info(members, folder, modalities, require_uniform=not allow_resample, min_slices=min_slices)
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
    min_slices: int = DEFAULT_MIN_SLICES,
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
        min_slices: fewest slices accepted (default 3, at least 2).

    Returns:
        ``(volume, info)``: volume ``(X, Y, Z)`` in HU indexed as ``info.affine_lps`` / ``info.affine_ras`` say.

    Raises:
        DicomSeriesError: a subclass naming the file or UID.
    """
    info = read_series_info(
        folder,
        series_uid,
        allow_resample=allow_resample,
        recursive=recursive,
        modalities=modalities,
        min_slices=min_slices,
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
        min_slices: fewest slices accepted (default 3, at least 2).
    """

    def __init__(
        self,
        series_uid: str | None = None,
        allow_resample: bool = False,
        recursive: bool = False,
        min_slices: int = DEFAULT_MIN_SLICES,
    ):
        if int(min_slices) < 2:
            raise ValueError(f"min_slices must be at least 2 (a single slice has no slice spacing), got {min_slices}.")
        self.series_uid = series_uid
        self.allow_resample = allow_resample
        self.recursive = recursive
        self.min_slices = int(min_slices)

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True when ``filename`` names exactly one existing folder."""
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return len(names) == 1 and Path(names[0]).is_dir()

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> tuple[np.ndarray, SeriesInfo]:
        """Read one series folder; returns ``(volume, info)`` as :func:`read_ct_series`."""
        names = [data] if isinstance(data, (str, Path)) else list(data)
        if len(names) != 1:
            raise DicomSeriesError(f"DicomSeriesReader reads one series folder at a time, got {len(names)} paths.")
        return read_ct_series(
            names[0],
            self.series_uid,
            allow_resample=self.allow_resample,
            recursive=self.recursive,
            min_slices=self.min_slices,
        )

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
        meta[META_RECURSIVE] = bool(self.recursive)
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
        min_slices: fewest slices accepted (default 3, at least 2).
        kwargs: passed to ``LoadImaged`` (``dtype``, ``ensure_channel_first``, ``image_only``, ...).
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        series_uid: str | None = None,
        allow_resample: bool = False,
        recursive: bool = False,
        min_slices: int = DEFAULT_MIN_SLICES,
        **kwargs,
    ):
        self.dicom_reader = DicomSeriesReader(series_uid, allow_resample, recursive, min_slices)
        super().__init__(keys, reader=self.dicom_reader, **kwargs)

    def __call__(self, data, reader: ImageReader | None = None):
        """Load every key with the DICOM reader (a runtime reader is refused)."""
        if reader is not None and reader is not self.dicom_reader:
            raise ValueError("LoadDicomSeriesd always reads with its own DicomSeriesReader; do not pass a reader.")
        return super().__call__(data, self.dicom_reader)


# ------------------------------------------------------------------------------------------ refusal reporting

#: exception types whose message is the cause shown on the final ``ERROR`` line (see :func:`register_refusal`)
REFUSAL_TYPES: list[type[BaseException]] = [DicomSeriesError]


def register_refusal(*types: type[BaseException]) -> None:
    """Add exception types (e.g. the RTSTRUCT/SEG writers' errors) whose message :func:`refusal_line` reports."""
    for kind in types:
        if kind not in REFUSAL_TYPES:
            REFUSAL_TYPES.append(kind)


def find_refusal(error: BaseException | None) -> BaseException | None:
    """The first refusal in ``error``'s ``__cause__`` / ``__context__`` chain (MONAI wraps errors), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, tuple(REFUSAL_TYPES)):
            return error
        error = error.__cause__ or error.__context__
    return None


def refusal_line(error: BaseException) -> str:
    """One line ``ERROR <cause>`` for a refusal (a DataLoader worker's traceback text is cut to its last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    if len(lines) > 1 and "Traceback" in str(error):  # re-raised from a worker: "module.Class: message"
        text = text.split(": ", 1)[-1]
    return f"ERROR {type(error).__name__}: {text}"


def refusal_excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """``sys.excepthook``: the usual traceback, then one final ``ERROR <cause>`` line for a refusal."""
    _PREVIOUS_EXCEPTHOOK(kind, value, tb)
    refusal = find_refusal(value)
    if refusal is not None:
        sys.stderr.flush()
        sys.stderr.write(refusal_line(refusal) + "\n")
        sys.stderr.flush()


def install_refusal_excepthook() -> None:
    """Install :func:`refusal_excepthook` as ``sys.excepthook`` (once; the previous hook still runs first)."""
    global _PREVIOUS_EXCEPTHOOK
    if sys.excepthook is not refusal_excepthook:
        _PREVIOUS_EXCEPTHOOK = sys.excepthook
        sys.excepthook = refusal_excepthook


_PREVIOUS_EXCEPTHOOK = sys.excepthook
install_refusal_excepthook()
