"""DICOM SEG (binary, one segment) of the target on a CT series, written and read with highdicom.

Conventions (see :mod:`scripts.dicom_series`): masks are ``(X, Y, Z)`` arrays on a
:class:`~scripts.dicom_series.SeriesInfo` grid; highdicom works in ``(frames, rows, columns)``, one frame per
source CT slice, so frame ``k`` is ``mask[:, :, k].T`` and references the slice's SOP Instance UID.

This is the only module of the bundle that imports highdicom.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from scripts.dicom_series import SeriesInfo, register_refusal
from scripts.rtstruct import check_type1_references
from scripts.safe_io import atomic_write_dicom

logger = logging.getLogger(__name__)


class SegError(ValueError):
    """A DICOM SEG cannot be written or read against the given CT."""


register_refusal(SegError)  # an uncaught SEG refusal ends stderr with one ERROR line


def build_seg(
    mask: np.ndarray,
    info: SeriesInfo,
    *,
    segment_label: str = "CTV",
    algorithm_name: str = "FairDRO",
    algorithm_version: str = "0.1.0",
    series_number: int = 9902,
    manufacturer: str = "FairDRO MONAI bundle",
) -> hd.seg.Segmentation:
    """Build a binary DICOM SEG with one segment (the target) referencing every CT slice.

    Args:
        mask: ``(X, Y, Z)`` binary mask on ``info``'s stored grid (nonzero is inside).
        info: the CT series (not a resampled grid).
        segment_label: SegmentLabel.
        algorithm_name: AlgorithmName of the segment's algorithm identification.
        algorithm_version: AlgorithmVersion.
        series_number: SeriesNumber of the new series.
        manufacturer: Manufacturer.

    Returns:
        The highdicom Segmentation (a pydicom Dataset).

    Raises:
        SegError: mask does not match the grid, the grid has no stored slices, or a Type 1 reference is empty.
    """
    mask = np.asarray(mask)
    if mask.shape != tuple(info.shape):
        raise SegError(f"mask shape {mask.shape} does not match the CT grid {tuple(info.shape)} ((X, Y, Z)).")
    if not info.headers:
        raise SegError("info describes a resampled grid; write on the stored series (info.resampled_from).")
    check_type1_references(info, SegError, "DICOM SEG")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.DCM.ArtificialIntelligence, version=algorithm_version
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.DCM.RTTarget,
        segmented_property_type=codes.SCT.ClinicalTargetVolume,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    frames = np.ascontiguousarray(np.transpose(mask > 0, (2, 1, 0))).astype(np.uint8)  # (slice, row, col)
    seg = hd.seg.Segmentation(
        source_images=list(info.headers),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=f"{algorithm_name} {segment_label} (automatic)"[:64],
        content_description="Automatic segmentation; review before clinical use"[:64],
        content_label="AUTOSEG",
    )
    _strip_source_equipment(seg)
    return seg


#: optional attributes highdicom copies from the source CT into ContributingEquipmentSequence: they identify the
#: acquiring site and are not needed to use the SEG (the output copies only what the IOD requires)
_EQUIPMENT_PRIVATE = ("InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName")


def _strip_source_equipment(seg) -> None:
    for item in getattr(seg, "ContributingEquipmentSequence", []):
        for keyword in _EQUIPMENT_PRIVATE:
            if keyword in item:
                delattr(item, keyword)


def write_seg(mask: np.ndarray, info: SeriesInfo, path: str | Path, **kwargs) -> Path:
    """Build a DICOM SEG with :func:`build_seg` and save it atomically (temporary file, fsync, rename).

    Args:
        mask: ``(X, Y, Z)`` binary mask on ``info``'s grid.
        info: the CT series.
        path: destination file.
        kwargs: passed to :func:`build_seg`.

    Returns:
        The path written.
    """
    seg = build_seg(mask, info, **kwargs)
    path = atomic_write_dicom(seg, path)
    logger.info("Wrote DICOM SEG %s for %s", seg.SOPInstanceUID, info.describe())
    return path


def read_seg(path: str | Path, info: SeriesInfo, segment_number: int = 1) -> np.ndarray:
    """Read one segment of a DICOM SEG back onto the CT grid.

    Args:
        path: the SEG file.
        info: the CT series it references (stored grid).
        segment_number: segment to read.

    Returns:
        ``(X, Y, Z)`` uint8 mask.

    Raises:
        SegError: the file is not a SEG of this series (names the UIDs).
    """
    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # highdicom/pydicom raise many types for a bad file
        raise SegError(f"{path}: not a readable DICOM SEG ({type(err).__name__}: {err}).") from err
    if str(seg.FrameOfReferenceUID) != info.frame_of_reference_uid:
        raise SegError(
            f"{path}: SEG frame of reference {seg.FrameOfReferenceUID} differs from CT {info.describe()} "
            f"({info.frame_of_reference_uid})."
        )
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(info.sop_instance_uids),
        segment_numbers=[segment_number],
        combine_segments=False,
        assert_missing_frames_are_empty=True,
    )  # (slice, row, col, segment)
    return np.ascontiguousarray(np.transpose(frames[..., 0], (2, 1, 0))).astype(np.uint8)
