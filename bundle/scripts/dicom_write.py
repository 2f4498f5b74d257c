"""Writing DICOM: synthetic CT series (with storage variants) and the bundle's clinical outputs (SEG, RTSTRUCT).

Conventions: volumes are ``(X, Y, Z)`` nibabel-order arrays with a **RAS** affine (voxel index ``(i, j, k, 1)``
-> RAS mm), as nibabel and MONAI ``LoadImage`` use; DICOM files hold **LPS** coordinates
(``affine_lps = diag(-1, -1, 1, 1) @ affine_ras``).

Storage variants of :func:`write_ct_series` store the same voxels with different DICOM geometry, so readers
must use ImageOrientationPatient / ImagePositionPatient rather than file or instance order:

* ``identity``: DICOM columns along ``i``, rows along ``j``, normal along ``k``.
* ``flip_xy``: both in-plane axes reversed (ImageOrientationPatient negated; same normal).
* ``reverse_slices``: columns reversed, so the normal points against ``k`` and the slices come in reverse
  order along it (InstanceNumber still follows ``k``, i.e. disagrees with position order).
* ``transpose_xy``: DICOM columns along ``j`` and rows along ``i`` (normal against ``k`` too).
* ``oblique``: the affine is rotated (default 15 degrees about an oblique axis through the volume centre);
  the array stays the same, only the geometry changes.

File names are random (from ``seed``), never in slice order. UIDs derive from ``seed``/``patient_id`` so a run
is reproducible.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scripts.dicom_series import (
    LPS_TO_RAS,
    META_RECURSIVE,
    META_RESAMPLED,
    META_SERIES_DIR,
    META_SERIES_UID,
    SeriesInfo,
    read_series_info,
    resample_slices,
)
from scripts.rtstruct import save_atomic, write_rtstruct

logger = logging.getLogger(__name__)

#: (DICOM column axis, flipped), (DICOM row axis, flipped) of each variant; axes index (i, j) of the array
VARIANTS: dict[str, tuple[tuple[int, bool], tuple[int, bool]]] = {
    "identity": ((0, False), (1, False)),
    "flip_xy": ((0, True), (1, True)),
    "reverse_slices": ((0, True), (1, False)),
    "transpose_xy": ((1, False), (0, False)),
    "oblique": ((0, False), (1, False)),
}
_HU_INTERCEPT = -1024.0


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_ct_series` wrote.

    Attributes:
        series_dir: the folder.
        files: file of each slice ``k`` of the input volume (not in name order).
        sop_instance_uids: SOPInstanceUID of each slice ``k``.
        series_instance_uid: SeriesInstanceUID.
        study_instance_uid: StudyInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID.
        affine_ras: the RAS affine of the input volume as stored (rotated for ``oblique``).
    """

    series_dir: Path
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    affine_ras: np.ndarray


# ----------------------------------------------------------------------------------------------- geometry


def rotation_matrix(axis: Sequence[float], degrees: float) -> np.ndarray:
    """``(3, 3)`` rotation by ``degrees`` about ``axis`` (right-handed, Rodrigues' formula)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    theta = np.radians(degrees)
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * skew + (1 - np.cos(theta)) * skew @ skew


def rotate_affine(
    affine: np.ndarray, shape: Sequence[int], degrees: float, axis: Sequence[float] = (1.0, 0.5, 0.3)
) -> np.ndarray:
    """Rotate a voxel-to-world affine about the world point at the centre of the volume.

    Args:
        affine: ``(4, 4)`` voxel-to-world affine (RAS or LPS; the rotation is in that space).
        shape: ``(X, Y, Z)`` volume shape.
        degrees: rotation angle.
        axis: rotation axis in world coordinates.

    Returns:
        The rotated ``(4, 4)`` affine.
    """
    centre = affine @ np.append((np.asarray(shape[:3], dtype=np.float64) - 1) / 2, 1.0)
    move = np.eye(4)
    move[:3, :3] = rotation_matrix(axis, degrees)
    move[:3, 3] = centre[:3] - move[:3, :3] @ centre[:3]
    return move @ affine


def align_to_grid(array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """Re-index an ``(X, Y, Z)`` array from one grid to another covering the same voxels.

    The grids may differ only by axis permutation and flips (e.g. a volume and the same volume stored with
    another slice order). The mapping is exact (no interpolation).

    Args:
        array: ``(X, Y, Z)`` array on the source grid.
        src_affine: ``(4, 4)`` voxel-to-world affine of the source grid.
        dst_affine: ``(4, 4)`` voxel-to-world affine of the destination grid (same world space).

    Returns:
        The array indexed on the destination grid.

    Raises:
        ValueError: if the grids are not the same voxels.
    """
    transform = np.linalg.inv(dst_affine) @ src_affine  # source index -> destination index
    rounded = np.round(transform)
    if not np.allclose(transform, rounded, atol=1e-3):
        raise ValueError(f"The grids do not share voxels (index map {np.round(transform, 4).tolist()}).")
    linear = rounded[:3, :3]
    perm = [int(np.nonzero(linear[d])[0][0]) for d in range(3)]  # destination axis d <- source axis perm[d]
    if sorted(perm) != [0, 1, 2] or np.count_nonzero(linear) != 3:
        raise ValueError(f"The grids are not related by an axis permutation/flip ({linear.tolist()}).")
    out = np.transpose(array, perm)
    for d in range(3):
        sign, offset, size = linear[d, perm[d]], rounded[d, 3], out.shape[d]
        if sign < 0:
            out = np.flip(out, axis=d)
        if offset != (size - 1 if sign < 0 else 0):
            raise ValueError(f"The grids are shifted by {offset} voxels along destination axis {d}.")
    return np.ascontiguousarray(out)


def _stored_geometry(lps: np.ndarray, shape: Sequence[int], variant: str):
    """Row/column cosines, pixel spacing and the (i, j) index of DICOM pixel (row 0, column 0) for a variant."""
    steps = lps[:3, :3]
    spacing = np.linalg.norm(steps, axis=0)
    units = steps / spacing
    if np.max(np.abs(units.T @ units - np.eye(3))) > 1e-6:
        raise ValueError("affine columns must be orthogonal (no shear) to be stored as DICOM slices.")
    (col_axis, col_flip), (row_axis, row_flip) = VARIANTS[variant]
    row_cosine = units[:, col_axis] * (-1 if col_flip else 1)
    col_cosine = units[:, row_axis] * (-1 if row_flip else 1)
    origin_index = np.zeros(3)
    origin_index[col_axis] = shape[col_axis] - 1 if col_flip else 0
    origin_index[row_axis] = shape[row_axis] - 1 if row_flip else 0
    pixel_spacing = (float(spacing[row_axis]), float(spacing[col_axis]))
    return row_cosine, col_cosine, pixel_spacing, origin_index, float(spacing[2])


def _stored_pixels(plane: np.ndarray, variant: str) -> np.ndarray:
    """``(rows, cols)`` DICOM pixel array of an ``(X, Y)`` plane for a variant."""
    (col_axis, col_flip), (_, row_flip) = VARIANTS[variant]
    pixels = plane.T if col_axis == 0 else plane  # -> (rows, cols)
    if col_flip:
        pixels = pixels[:, ::-1]
    if row_flip:
        pixels = pixels[::-1, :]
    return np.ascontiguousarray(pixels)


# ----------------------------------------------------------------------------------------------- phantom


def phantom_case(
    shape: Sequence[int] = (64, 64, 20), spacing: Sequence[float] = (1.0, 1.0, 3.0), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small CT-like phantom for DICOM tests and demos (deterministic by ``seed``).

    An elliptic body (about 40 HU, noise) in air (-1000 HU) holding a CTV-like ellipsoid (about 70 HU) that has
    a hole through its middle slices (with a small island inside the hole on one slice) and a second, separate
    component on a few slices.

    Args:
        shape: ``(X, Y, Z)``; at least ``(32, 32, 10)``.
        spacing: voxel size in mm along ``(i, j, k)``.
        seed: noise seed.

    Returns:
        ``(image_hu int16 (X, Y, Z), label uint8 (X, Y, Z), affine (4, 4) RAS)``; the affine is diagonal with
        the volume centred on the origin.
    """
    nx, ny, nz = (int(s) for s in shape)
    if nx < 32 or ny < 32 or nz < 10:
        raise ValueError(f"shape must be at least (32, 32, 10), got {tuple(shape)}.")
    i, j, k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    cx, cy, cz = (nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2
    body = ((i - cx) / (0.45 * nx)) ** 2 + ((j - cy) / (0.38 * ny)) ** 2 <= 1
    target = ((i - cx + 0.05 * nx) / (0.17 * nx)) ** 2 + ((j - cy) / (0.14 * ny)) ** 2 + ((k - cz) / (0.3 * nz)) ** 2
    label = target <= 1
    hole = (np.abs(i - cx + 0.05 * nx) <= 0.05 * nx) & (np.abs(j - cy) <= 0.04 * ny) & (np.abs(k - cz) <= 0.1 * nz)
    label &= ~hole
    island_k = int(round(cz))
    label[int(round(cx - 0.05 * nx)), int(round(cy)), island_k] = True  # island inside the hole
    second = (
        (np.abs(i - 0.78 * nx) <= 0.05 * nx) & (np.abs(j - 0.35 * ny) <= 0.06 * ny) & (np.abs(k - 0.3 * nz) <= 0.1 * nz)
    )
    label |= second & body
    rng = np.random.default_rng(seed)
    image = np.where(body, 40.0, -1000.0) + np.where(label, 30.0, 0.0) + rng.normal(0.0, 5.0, size=label.shape)
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ np.array([cx, cy, cz])
    return np.round(image).astype(np.int16), label.astype(np.uint8), affine


# ----------------------------------------------------------------------------------------------- CT series


def _ct_dataset(common: Mapping[str, Any], sop_uid: str, pixels: np.ndarray) -> Dataset:
    """One CT Image Storage dataset (little endian, signed 16-bit, intercept -1024)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_ct_series(
    volume_hu: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    patient_name: str = "SYNTHETIC^PHANTOM",
    patient_id: str = "SYNTH0000",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    institution: str | None = None,
    variant: str = "identity",
    oblique_degrees: float = 15.0,
    seed: int = 0,
    series_number: int = 1,
    series_description: str = "Synthetic planning CT",
) -> WrittenSeries:
    """Write an ``(X, Y, Z)`` HU volume as a single-frame CT series.

    Args:
        volume_hu: ``(X, Y, Z)`` Hounsfield units (rounded to integers; stored with intercept -1024).
        affine: ``(4, 4)`` RAS voxel-to-world affine (nibabel convention), orthogonal columns.
        out_dir: folder to write into (created; files get random names).
        patient_name: PatientName (synthetic data only).
        patient_id: PatientID.
        study_uid: StudyInstanceUID (derived from seed/patient_id when None).
        series_uid: SeriesInstanceUID (derived when None).
        frame_of_reference_uid: FrameOfReferenceUID (derived when None).
        institution: InstitutionName, written when given.
        variant: storage variant, one of :data:`VARIANTS`.
        oblique_degrees: rotation of the ``oblique`` variant.
        seed: seeds file names and derived UIDs.
        series_number: SeriesNumber.
        series_description: SeriesDescription.

    Returns:
        :class:`WrittenSeries` (files and UIDs in the order of ``k`` of ``volume_hu``).

    Raises:
        ValueError: bad variant, shape, affine, or HU values out of the storable range.
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3:
        raise ValueError(f"volume_hu must be (X, Y, Z), got shape {volume.shape}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}.")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite (4, 4) matrix, got shape {affine.shape}.")
    if variant == "oblique":
        affine = rotate_affine(affine, volume.shape, oblique_degrees)
    stored = np.round(volume.astype(np.float64) - _HU_INTERCEPT)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"HU values {volume.min()}..{volume.max()} cannot be stored as int16 with intercept -1024.")
    lps = LPS_TO_RAS @ affine
    row_cosine, col_cosine, pixel_spacing, origin_index, thickness = _stored_geometry(lps, volume.shape, variant)
    normal = np.cross(row_cosine, col_cosine)

    def uid(*parts: object) -> str:
        return str(generate_uid(entropy_srcs=[str(seed), patient_id, variant, *map(str, parts)]))

    study_uid = study_uid or uid("study")
    series_uid = series_uid or uid("series", series_number)
    for_uid = frame_of_reference_uid or uid("frame")
    common: dict[str, Any] = {
        "SpecificCharacterSet": "ISO_IR 192",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "StudyDate": "20260101",
        "StudyTime": "120000",
        "AccessionNumber": "",
        "Modality": "CT",
        "Manufacturer": "FairDRO synthetic phantom",
        "ReferringPhysicianName": "",
        "StudyDescription": "Synthetic planning CT",
        "Laterality": "",
        "SeriesDescription": series_description,
        "PatientName": patient_name,
        "PatientID": patient_id,
        "PatientBirthDate": "",
        "PatientSex": "O",
        "SliceThickness": f"{thickness:.6g}",
        "KVP": "120",
        "GantryDetectorTilt": "0",
        "PatientPosition": "HFS",
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "StudyID": "1",
        "SeriesNumber": series_number,
        "AcquisitionNumber": 1,
        "ImageOrientationPatient": [f"{v:.8f}" for v in (*row_cosine, *col_cosine)],
        "FrameOfReferenceUID": for_uid,
        "PositionReferenceIndicator": "",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "PixelSpacing": [f"{v:.8g}" for v in pixel_spacing],
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,
        "RescaleIntercept": f"{_HU_INTERCEPT:g}",
        "RescaleSlope": "1",
        "RescaleType": "HU",
    }
    if institution is not None:
        common["InstitutionName"] = institution
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names: set[str] = set()
    files, sop_uids = [], []
    for k in range(volume.shape[2]):
        index = origin_index.copy()
        index[2] = k
        position = (lps @ np.append(index, 1.0))[:3]
        sop_uid = uid("sop", series_uid, k)
        ds = _ct_dataset(common, sop_uid, _stored_pixels(stored[:, :, k], variant))
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SliceLocation = f"{position @ normal:.6f}"
        name = f"{rng.bytes(6).hex()}.dcm"
        while name in names:
            name = f"{rng.bytes(6).hex()}.dcm"
        names.add(name)
        files.append(save_atomic(ds, out_dir / name))
        sop_uids.append(sop_uid)
    logger.info("Wrote CT series %s (%d slices, variant %s) to %s", series_uid, len(files), variant, out_dir)
    return WrittenSeries(out_dir, tuple(files), tuple(sop_uids), series_uid, study_uid, for_uid, affine)


def write_case_dicom(
    image_hu: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    case_id: str,
    *,
    roi_name: str = "CTV",
    patient_name: str | None = None,
    patient_id: str | None = None,
    institution: str | None = None,
    variant: str = "identity",
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write one synthetic case as a planning-system export: CT slices plus an RTSTRUCT in one folder.

    The folder is built under a temporary name beside it and renamed at the end, so a failed call leaves
    nothing behind.

    Args:
        image_hu: ``(X, Y, Z)`` int16 HU volume (nibabel order).
        label: ``(X, Y, Z)`` uint8 target mask on the same grid.
        affine: ``(4, 4)`` RAS affine of both.
        out_dir: parent folder; the case goes to ``out_dir/case_id``.
        case_id: case identifier (folder name; default PatientID and, with a prefix, PatientName).
        roi_name: ROIName of the target in the RTSTRUCT.
        patient_name: PatientName (default ``"SYNTHETIC^<case_id>"``).
        patient_id: PatientID (default ``case_id``).
        institution: InstitutionName of the CT.
        variant: storage variant of the CT (see :data:`VARIANTS`).
        seed: seeds file names and UIDs.
        overwrite: replace an existing case folder.

    Returns:
        ``(dicom_dir, rtstruct_path)``.
    """
    label = np.asarray(label)
    if label.shape != np.shape(image_hu):
        raise ValueError(f"label shape {label.shape} differs from image shape {np.shape(image_hu)}.")
    out_dir = Path(out_dir)
    case_dir = out_dir / case_id
    if case_dir.exists() and any(case_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{case_dir} exists and is not empty; pass overwrite=True to replace it.")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=out_dir))
    try:
        written = write_ct_series(
            image_hu,
            affine,
            tmp_dir,
            patient_name=patient_name or f"SYNTHETIC^{case_id}",
            patient_id=patient_id or case_id,
            institution=institution,
            variant=variant,
            seed=seed,
        )
        info = read_series_info(tmp_dir, written.series_instance_uid)
        mask = align_to_grid((label > 0).astype(np.uint8), written.affine_ras, info.affine_ras)
        write_rtstruct(mask, info, tmp_dir / "rtstruct.dcm", roi_name=roi_name)
        if case_dir.exists():
            shutil.rmtree(case_dir)
        tmp_dir.rename(case_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return case_dir, case_dir / "rtstruct.dcm"


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
