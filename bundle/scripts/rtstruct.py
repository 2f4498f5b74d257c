"""RTSTRUCT <-> binary mask on a CT grid, using the series' real geometry (any orientation, any slice order).

Conventions (see :mod:`scripts.dicom_series`): masks are ``(X, Y, Z)`` arrays indexed ``(i, j, k)`` = (DICOM
column, DICOM row, slice along the normal) of a :class:`~scripts.dicom_series.SeriesInfo`; contour points are
DICOM patient coordinates, **LPS** mm.

* Reading (:func:`rasterise_roi`): each contour is assigned to the slice whose plane it lies on, mapped to
  in-plane index coordinates with that slice's ImagePositionPatient and the orientation cosines, and filled at
  pixel centres with the even-odd rule; all contours of a slice are combined by XOR, so a contour inside another
  is a hole (and an island inside a hole is filled again).
* Writing (:func:`build_rtstruct`): each slice of the mask is contoured at level 0.5 on the pixel-centre grid
  (contourpy, the contour engine of matplotlib), after padding so every contour is closed. Such a contour
  separates the centres of foreground pixels from those of background pixels, so even-odd filling at pixel
  centres gives the mask back exactly. Holes are written as separate CLOSED_PLANAR contours (even-odd / XOR
  convention, as most planning systems read them).

Only the patient/study attributes the RT Structure Set IOD requires are copied from the CT. Nothing here logs
patient-identifying attributes.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from scripts.dicom_series import SeriesInfo, register_refusal, resample_slices
from scripts.safe_io import atomic_write_dicom

logger = logging.getLogger(__name__)

DEFAULT_CTV_SYNONYMS: tuple[str, ...] = ("CTV", "CTV_High", "CTV_HR", "CTV1", "CTV_1", "CTVp", "CTV_p")
"""ROI names accepted for the target, in order of preference (matched case-insensitively)."""

#: attributes copied from the CT (Patient and General Study modules, type 1/2; SpecificCharacterSet decodes names)
COPIED_CT_ATTRIBUTES: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)
_TYPE1_COPIED = ("StudyInstanceUID",)

# RT Referenced Study Sequence items name the study with this (retired, but universally used) SOP Class.
_STUDY_REFERENCE_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"


class RTStructError(ValueError):
    """Base class of RTSTRUCT errors."""


class RoiNotFoundError(RTStructError):
    """No ROI of the structure set matches the requested names."""


class ReferenceMismatchError(RTStructError):
    """The structure set references another frame of reference, series or image."""


class MissingReferenceError(RTStructError):
    """The CT lacks (or has empty) a Type 1 value the RTSTRUCT must carry (FrameOfReferenceUID, ...)."""


def check_type1_references(info: SeriesInfo, error: type[Exception], what: str) -> None:
    """Refuse to write an object whose Type 1 references (UIDs of the CT) would be empty.

    Args:
        info: the CT series the object references.
        error: exception type to raise.
        what: the object (``"RTSTRUCT"``, ``"DICOM SEG"``) for the message.
    """
    values = {
        "StudyInstanceUID": info.study_instance_uid,
        "SeriesInstanceUID": info.series_instance_uid,
        "FrameOfReferenceUID": info.frame_of_reference_uid,
        "SOPClassUID": info.sop_class_uid,
    }
    values.update({f"SOPInstanceUID of slice {k}": uid for k, uid in enumerate(info.sop_instance_uids)})
    for name, value in values.items():
        if not str(value or "").strip():
            raise error(
                f"Cannot write the {what} for {info.describe()}: the CT's {name} is empty, and the {what} must "
                "carry it (Type 1). Export the CT again with complete headers."
            )


class ContourGeometryError(RTStructError):
    """A contour is not planar or does not lie on a slice of the series."""


register_refusal(RTStructError)  # an uncaught RTSTRUCT refusal ends stderr with one ERROR line


# ------------------------------------------------------------------------------------------------ file helpers


def read_rtstruct(path: str | Path) -> Dataset:
    """Read an RTSTRUCT file.

    Raises:
        RTStructError: naming the file if it is not readable DICOM or not an RTSTRUCT.
    """
    try:  # force: read an RTSTRUCT saved without preamble and File Meta too, as plastimatch does
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise RTStructError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err}).") from err
    if str(ds.get("Modality", "")).upper() != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise RTStructError(f"{path}: not an RT Structure Set (Modality {ds.get('Modality', '?')}).")
    return ds


# ------------------------------------------------------------------------------------------------ ROI lookup


def roi_names(rtstruct: Dataset) -> list[str]:
    """Names of the ROIs of a structure set, in file order."""
    return [str(item.get("ROIName", "")) for item in rtstruct.StructureSetROISequence]


def _normalise(name: str) -> str:
    return str(name).strip().casefold()


def find_roi(rtstruct: Dataset, names: str | Sequence[str] = DEFAULT_CTV_SYNONYMS) -> tuple[int, str]:
    """Find the ROI to use: the first of ``names`` (case-insensitive, surrounding spaces ignored) present.

    Args:
        rtstruct: the structure set.
        names: a name or names in order of preference (e.g. ``["CTV", "CTV_High"]``).

    Returns:
        ``(roi_number, roi_name)`` as stored.

    Raises:
        RoiNotFoundError: listing the ROI names available.
        RTStructError: when two ROIs share the preferred name.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    stored = [(int(item.ROINumber), str(item.get("ROIName", ""))) for item in rtstruct.StructureSetROISequence]
    for name in wanted:
        hits = [(number, roi) for number, roi in stored if _normalise(roi) == _normalise(name)]
        if len(hits) > 1:
            raise RTStructError(f"Several ROIs are named {name!r} (numbers {[n for n, _ in hits]}); rename one.")
        if hits:
            return hits[0]
    raise RoiNotFoundError(
        f"No ROI named any of {wanted} (case-insensitive); available ROIs: {[roi for _, roi in stored]}."
    )


def check_references(rtstruct: Dataset, info: SeriesInfo, roi_number: int | None = None) -> None:
    """Check that a structure set was drawn on ``info``'s series.

    Checks the frame of reference (of the structure set and of the ROI), the referenced series UID when the
    structure set names one, and that every referenced image is a slice of the series.

    Raises:
        ReferenceMismatchError: naming the UIDs that differ.
    """
    source = info.resampled_from or info
    for_uids = [str(item.FrameOfReferenceUID) for item in rtstruct.get("ReferencedFrameOfReferenceSequence", [])]
    if for_uids and info.frame_of_reference_uid not in for_uids:
        raise ReferenceMismatchError(
            f"RTSTRUCT {rtstruct.get('SOPInstanceUID', '?')} references frame(s) of reference {for_uids}, but CT "
            f"{info.describe()} has FrameOfReferenceUID {info.frame_of_reference_uid}."
        )
    for item in rtstruct.StructureSetROISequence:
        if roi_number is not None and int(item.ROINumber) != roi_number:
            continue
        ref = str(item.get("ReferencedFrameOfReferenceUID", ""))
        if ref and ref != info.frame_of_reference_uid:
            raise ReferenceMismatchError(
                f"ROI {item.get('ROIName', '?')!r} lies in frame of reference {ref}, but CT {info.describe()} has "
                f"FrameOfReferenceUID {info.frame_of_reference_uid}."
            )
    series_uids = [
        str(series.SeriesInstanceUID)
        for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
    ]
    if series_uids and info.series_instance_uid not in series_uids:
        raise ReferenceMismatchError(
            f"RTSTRUCT {rtstruct.get('SOPInstanceUID', '?')} references series {series_uids}, not CT {info.describe()}."
        )
    known = set(source.sop_instance_uids)
    unknown = sorted({image for image in _referenced_images(rtstruct, roi_number) if image not in known})
    if unknown and info.resampled_from is not None:
        # slices missing from a resampled series are expected to be referenced; geometry decides instead
        logger.warning("RTSTRUCT references %d image(s) absent from %s (missing slices)", len(unknown), info.describe())
        return
    if unknown and known:
        raise ReferenceMismatchError(
            f"RTSTRUCT {rtstruct.get('SOPInstanceUID', '?')} references {len(unknown)} image(s) that are not slices "
            f"of CT {info.describe()}, e.g. {unknown[0]}."
        )


def _referenced_images(rtstruct: Dataset, roi_number: int | None) -> Iterable[str]:
    """SOP Instance UIDs referenced by the contours of one ROI (or of all ROIs)."""
    for roi in rtstruct.get("ROIContourSequence", []):
        if roi_number is not None and int(roi.ReferencedROINumber) != roi_number:
            continue
        for contour in roi.get("ContourSequence", []):
            for image in contour.get("ContourImageSequence", []):
                yield str(image.ReferencedSOPInstanceUID)


# ------------------------------------------------------------------------------------------------ rasterising


def fill_polygon_even_odd(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of an ``(X, Y)`` slice whose centre lies inside a polygon, by the even-odd (crossing) rule.

    Args:
        polygon: ``(N, 2)`` vertices in index coordinates ``(i, j)`` (pixel centres at integers); closed
            implicitly (last vertex joins the first).
        shape: ``(X, Y)`` slice shape.

    Returns:
        ``(X, Y)`` bool array.
    """
    out = np.zeros(shape, dtype=bool)
    if len(polygon) < 3:
        return out
    start = polygon
    end = np.roll(polygon, -1, axis=0)
    j_lo = max(int(np.ceil(polygon[:, 1].min())), 0)
    j_hi = min(int(np.floor(polygon[:, 1].max())), shape[1] - 1)
    centres = np.arange(shape[0], dtype=np.float64)
    for j in range(j_lo, j_hi + 1):
        # half-open rule: an edge crosses row j when one end is <= j and the other > j
        crosses = (start[:, 1] <= j) != (end[:, 1] <= j)
        if not np.any(crosses):
            continue
        s, e = start[crosses], end[crosses]
        xs = np.sort(s[:, 0] + (j - s[:, 1]) * (e[:, 0] - s[:, 0]) / (e[:, 1] - s[:, 1]))
        right = len(xs) - np.searchsorted(xs, centres, side="right")  # crossings strictly right of each centre
        out[:, j] = right % 2 == 1
    return out


def contour_to_slice(points_lps: np.ndarray, info: SeriesInfo) -> tuple[int, np.ndarray]:
    """Find the slice a planar contour lies on and map its points to in-plane index coordinates.

    Args:
        points_lps: ``(N, 3)`` contour points, LPS mm.
        info: the grid (for a resampled grid, pass ``info.resampled_from``: contours lie on stored slices).

    Returns:
        ``(k, uv)``: slice index and ``(N, 2)`` index coordinates ``(i, j)`` (pixel centres at integers).

    Raises:
        ContourGeometryError: the contour is not in a slice plane of the series.
    """
    offsets = info.slice_offsets
    heights = points_lps @ info.normal
    gaps = np.diff(offsets)
    tol = 0.3 * float(gaps.min()) if gaps.size else 0.5
    k = int(np.abs(offsets - heights.mean()).argmin())
    if np.max(np.abs(heights - offsets[k])) > tol:
        raise ContourGeometryError(
            f"A contour spans {heights.min():.2f} to {heights.max():.2f} mm along the slice normal, which is not a "
            f"slice plane of CT {info.describe()} (nearest slice at {offsets[k]:.2f} mm): the contour is not planar, "
            "lies outside the series, or was drawn on another series."
        )
    rel = points_lps - info.positions[k]
    uv = np.stack(
        [rel @ info.row_cosine / info.pixel_spacing[1], rel @ info.col_cosine / info.pixel_spacing[0]], axis=1
    )
    return k, uv


def rasterise_roi(
    rtstruct: Dataset | str | Path,
    info: SeriesInfo,
    names: str | Sequence[str] = DEFAULT_CTV_SYNONYMS,
    check: bool = True,
) -> np.ndarray:
    """Rasterise one ROI of a structure set onto the CT grid of ``info``.

    Args:
        rtstruct: the structure set (dataset or path).
        info: geometry of the CT. For a grid made uniform by resampling, contours are filled on the stored
            slices and resampled to the nearest slice of the uniform grid, except that contours lying on a slice
            missing from the series (e.g. drawn on the complete series) fill that uniform slice directly.
        names: ROI name or synonyms in order of preference (case-insensitive).
        check: verify that the structure set references this series (see :func:`check_references`).

    Returns:
        ``(X, Y, Z)`` uint8 mask (1 inside) on ``info``'s grid.

    Raises:
        RoiNotFoundError, ReferenceMismatchError, ContourGeometryError, RTStructError.
    """
    ds = read_rtstruct(rtstruct) if isinstance(rtstruct, (str, Path)) else rtstruct
    number, name = find_roi(ds, names)
    if check:
        check_references(ds, info, number)
    source = info.resampled_from or info
    stored = np.zeros(source.shape, dtype=bool)  # contours on the stored slices
    direct = np.zeros(info.shape, dtype=bool)  # resampled grid only: contours on slices missing from the series
    has_direct = np.zeros(info.shape[2], dtype=bool)
    n_contours = 0
    for points in _closed_contours(ds, number, name):
        try:
            k, uv = contour_to_slice(points, source)
            stored[:, :, k] ^= fill_polygon_even_odd(uv, source.shape[:2])
        except ContourGeometryError:
            if info.resampled_from is None:
                raise
            k, uv = contour_to_slice(points, info)
            direct[:, :, k] ^= fill_polygon_even_odd(uv, info.shape[:2])
            has_direct[k] = True
        n_contours += 1
    if n_contours == 0:
        logger.warning("ROI %r of RTSTRUCT %s has no closed contours: empty mask", name, ds.get("SOPInstanceUID", "?"))
    if info.resampled_from is None:
        return stored.astype(np.uint8)
    mask = resample_slices(stored, source, info, order=0)
    mask[:, :, has_direct] = direct[:, :, has_direct]
    return mask.astype(np.uint8)


def _closed_contours(ds: Dataset, roi_number: int, roi_name: str) -> Iterable[np.ndarray]:
    """``(N, 3)`` LPS points of each CLOSED_PLANAR contour of one ROI (other types are skipped with a warning)."""
    for roi in ds.get("ROIContourSequence", []):
        if int(roi.ReferencedROINumber) != roi_number:
            continue
        for contour in roi.get("ContourSequence", []):
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
            if kind != "CLOSED_PLANAR":
                logger.warning("ROI %r: skipping a contour of type %s (only CLOSED_PLANAR is filled)", roi_name, kind)
                continue
            yield np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)


# ------------------------------------------------------------------------------------------------ contouring


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices of a closed polygon that lie on the straight line through their neighbours."""
    while len(points) > 3:
        prev = np.roll(points, 1, axis=0)
        nxt = np.roll(points, -1, axis=0)
        cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - points[:, 1]) - (points[:, 1] - prev[:, 1]) * (
            nxt[:, 0] - points[:, 0]
        )
        keep = np.abs(cross) > 1e-9
        if keep.all():
            break
        points = points[keep]
    return points


def slice_contours(slice_mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of one ``(X, Y)`` binary slice at level 0.5, in index coordinates ``(i, j)``.

    Outer boundaries and hole boundaries are all returned as separate polygons (even-odd convention).

    Args:
        slice_mask: ``(X, Y)`` array; nonzero is foreground.

    Returns:
        List of ``(N, 2)`` float arrays, without the repeated closing vertex.
    """
    import contourpy  # matplotlib's contour engine; imported here so reading RTSTRUCTs does not need it

    binary = np.asarray(slice_mask) > 0
    if not binary.any():
        return []
    n_i, n_j = binary.shape
    field = np.pad(binary.T.astype(np.float64), 1)  # (j, i) layout for contourpy, zero border closes contours
    generator = contourpy.contour_generator(
        x=np.arange(-1, n_i + 1, dtype=np.float64),
        y=np.arange(-1, n_j + 1, dtype=np.float64),
        z=field,
        name="serial",
        line_type=contourpy.LineType.Separate,
    )
    polygons = []
    for line in generator.lines(0.5):
        line = np.asarray(line, dtype=np.float64)
        if len(line) > 1 and np.allclose(line[0], line[-1]):
            line = line[:-1]
        line = _drop_collinear(line)
        if len(line) >= 3:
            polygons.append(line)
    return polygons


def mask_to_contours(mask: np.ndarray, info: SeriesInfo) -> list[tuple[int, np.ndarray]]:
    """Contours of an ``(X, Y, Z)`` mask on ``info``'s grid, in patient coordinates.

    Returns:
        ``[(k, points_lps (N, 3)), ...]`` in slice order.
    """
    out = []
    for k in range(mask.shape[2]):
        for uv in slice_contours(mask[:, :, k]):
            points = (
                info.positions[k]
                + np.outer(uv[:, 0] * info.pixel_spacing[1], info.row_cosine)
                + np.outer(uv[:, 1] * info.pixel_spacing[0], info.col_cosine)
            )
            out.append((k, points))
    return out


# ------------------------------------------------------------------------------------------------ writing


def _format_ds(values: np.ndarray) -> list[str]:
    """Format coordinates as DICOM DS strings (at most 16 characters, 0.0001 mm resolution)."""
    out = []
    for value in np.round(np.asarray(values, dtype=np.float64).ravel(), 4):
        text = f"{value:.4f}".rstrip("0").rstrip(".")
        out.append("0" if text in ("-0", "") else text)
    return out


def _item(**attributes) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _image_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    return _item(ReferencedSOPClassUID=sop_class_uid, ReferencedSOPInstanceUID=sop_instance_uid)


def _copy_ct_attributes(ct: Dataset, ds: Dataset) -> None:
    """Copy the Patient / General Study attributes (type 2 ones stay present, possibly empty)."""
    for keyword in COPIED_CT_ATTRIBUTES:
        if keyword in ct:
            setattr(ds, keyword, ct.data_element(keyword).value)
        elif keyword in _TYPE1_COPIED:
            raise RTStructError(f"The CT has no {keyword}; cannot reference its study.")
        elif keyword != "SpecificCharacterSet":
            setattr(ds, keyword, "")


def build_rtstruct(
    mask: np.ndarray,
    info: SeriesInfo,
    *,
    roi_name: str = "CTV",
    interpreted_type: str = "CTV",
    color: tuple[int, int, int] = (255, 0, 0),
    algorithm_name: str = "FairDRO",
    algorithm_version: str = "0.1.0",
    description: str = "Automatic CTV segmentation (FairDRO MONAI bundle); review before clinical use.",
    structure_set_label: str = "AUTO_CTV",
    series_number: int = 9901,
    manufacturer: str = "FairDRO MONAI bundle",
) -> Dataset:
    """Build an RT Structure Set holding one ROI drawn from a mask on a CT grid.

    Args:
        mask: ``(X, Y, Z)`` binary mask on ``info``'s grid (nonzero is inside).
        info: geometry and references of the CT (must not be a resampled grid: pass the stored series).
        roi_name: ROIName.
        interpreted_type: RTROIInterpretedType (e.g. ``"CTV"``, ``"PTV"``, ``"ORGAN"``).
        color: ROIDisplayColor (RGB 0-255).
        algorithm_name: name recorded in ROIGenerationDescription and the series description.
        algorithm_version: version recorded with it.
        description: free text recorded in ROIGenerationDescription.
        structure_set_label: StructureSetLabel (at most 16 characters).
        series_number: SeriesNumber of the new series.
        manufacturer: Manufacturer (General Equipment module).

    Returns:
        The dataset (with ``file_meta``), new Series and SOP Instance UIDs, ApprovalStatus UNAPPROVED.

    Raises:
        ValueError: if the mask does not match the grid or the grid has no stored slices.
    """
    mask = np.asarray(mask)
    if mask.shape != tuple(info.shape):
        raise ValueError(f"mask shape {mask.shape} does not match the CT grid {tuple(info.shape)} ((X, Y, Z)).")
    if not info.sop_instance_uids:
        raise ValueError("info describes a resampled grid; write on the stored series (info.resampled_from).")
    check_type1_references(info, MissingReferenceError, "RTSTRUCT")
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ct = info.reference_header
    _copy_ct_attributes(ct, ds)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{algorithm_name} {roi_name} (automatic)"[:64]
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = algorithm_name
    ds.SoftwareVersions = algorithm_version
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = structure_set_label[:16]
    ds.StructureSetName = f"{algorithm_name} {roi_name}"[:64]
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_frame_reference(info)])
    ds.StructureSetROISequence = DicomSequence(
        [
            _item(
                ROINumber=1,
                ReferencedFrameOfReferenceUID=info.frame_of_reference_uid,
                ROIName=roi_name,
                ROIGenerationAlgorithm="AUTOMATIC",
                ROIGenerationDescription=f"{algorithm_name} {algorithm_version}: {description}"[:64],
            )
        ]
    )
    ds.ROIContourSequence = DicomSequence([_roi_contour(mask, info, color)])
    ds.RTROIObservationsSequence = DicomSequence(
        [
            _item(
                ObservationNumber=1,
                ReferencedROINumber=1,
                ROIObservationLabel=roi_name[:16],
                RTROIInterpretedType=interpreted_type,
                ROIInterpreter="",
            )
        ]
    )
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def _frame_reference(info: SeriesInfo) -> Dataset:
    """ReferencedFrameOfReferenceSequence item naming the study, the series and every slice."""
    images = [_image_reference(info.sop_class_uid, uid) for uid in info.sop_instance_uids]
    series = _item(SeriesInstanceUID=info.series_instance_uid, ContourImageSequence=DicomSequence(images))
    study = _item(
        ReferencedSOPClassUID=_STUDY_REFERENCE_SOP_CLASS,
        ReferencedSOPInstanceUID=info.study_instance_uid,
        RTReferencedSeriesSequence=DicomSequence([series]),
    )
    return _item(FrameOfReferenceUID=info.frame_of_reference_uid, RTReferencedStudySequence=DicomSequence([study]))


def _roi_contour(mask: np.ndarray, info: SeriesInfo, color: Sequence[int]) -> Dataset:
    """ROIContourSequence item: one CLOSED_PLANAR contour per boundary, each referencing its slice."""
    contours = []
    for number, (k, points) in enumerate(mask_to_contours(mask, info), start=1):
        contours.append(
            _item(
                ContourImageSequence=DicomSequence([_image_reference(info.sop_class_uid, info.sop_instance_uids[k])]),
                ContourGeometricType="CLOSED_PLANAR",
                NumberOfContourPoints=len(points),
                ContourNumber=number,
                ContourData=_format_ds(points),
            )
        )
    if not contours:
        logger.warning("Empty mask: the RTSTRUCT ROI of %s has no contours", info.describe())
    item = _item(ROIDisplayColor=[int(c) for c in color], ReferencedROINumber=1)
    if contours:
        item.ContourSequence = DicomSequence(contours)
    return item


def write_rtstruct(mask: np.ndarray, info: SeriesInfo, path: str | Path, **kwargs) -> Path:
    """Build an RTSTRUCT with :func:`build_rtstruct` and save it atomically (temporary file, fsync, rename).

    Args:
        mask: ``(X, Y, Z)`` binary mask on ``info``'s grid.
        info: the CT series (stored grid).
        path: destination file.
        kwargs: passed to :func:`build_rtstruct`.

    Returns:
        The path written.
    """
    ds = build_rtstruct(mask, info, **kwargs)
    path = atomic_write_dicom(ds, path)
    logger.info("Wrote RTSTRUCT %s for %s", ds.SOPInstanceUID, info.describe())
    return path
