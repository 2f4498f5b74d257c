"""The synthetic cohort's DICOM: phantom CT series in several storage variants, and phantom cases with an RTSTRUCT.

Used by ``synthetic.py --dicom`` and by the tests; the bundle's clinical outputs (SEG and RTSTRUCT of a
prediction) are written by :mod:`scripts.dicom_write`.

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
is reproducible. Slices are written plainly; :func:`write_case_dicom` builds a case in a temporary folder and
renames it into place, so a case folder is complete or absent.
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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scripts.dicom_series import LPS_TO_RAS, read_series_info
from scripts.rtstruct import write_rtstruct

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


def _series_attributes(
    *,
    uids: tuple[str, str, str],
    row_cosine: np.ndarray,
    col_cosine: np.ndarray,
    pixel_spacing: tuple[float, float],
    thickness: float,
    patient_name: str,
    patient_id: str,
    institution: str | None,
    series_number: int,
    series_description: str,
) -> dict[str, Any]:
    """The attributes every slice of a phantom series shares (patient, study, series, frame, pixel format)."""
    study_uid, series_uid, for_uid = uids
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
    return common


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
    common = _series_attributes(
        uids=(study_uid, series_uid, for_uid),
        row_cosine=row_cosine,
        col_cosine=col_cosine,
        pixel_spacing=pixel_spacing,
        thickness=thickness,
        patient_name=patient_name,
        patient_id=patient_id,
        institution=institution,
        series_number=series_number,
        series_description=series_description,
    )
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
        ds.save_as(out_dir / name, enforce_file_format=True)  # test data: the case folder is renamed in whole
        files.append(out_dir / name)
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
