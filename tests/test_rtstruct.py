"""RTSTRUCT: mask -> RTSTRUCT -> mask on every storage variant, rasterising rules, ROI lookup, references,
and independent checks with plastimatch and dciodvfy (skipped when those tools are not installed)."""

from __future__ import annotations

import copy
import re
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import needs_tool
from plastimatch_check import needs_plastimatch, plastimatch_mask
from scipy.ndimage import binary_fill_holes
from scripts.dicom_series import read_series_info
from scripts.rtstruct import (
    ContourGeometryError,
    ReferenceMismatchError,
    RoiNotFoundError,
    RTStructError,
    build_rtstruct,
    fill_polygon_even_odd,
    find_roi,
    rasterise_roi,
    read_rtstruct,
    slice_contours,
    write_rtstruct,
)
from scripts.synthetic_dicom import VARIANTS, align_to_grid, phantom_case, write_ct_series

GRIDS = {"1x1x3mm": (1.0, 1.0, 3.0), "0.9x0.9x2.5mm": (0.9, 0.9, 2.5)}
CASES = [(v, g) for v in sorted(VARIANTS) for g in GRIDS]
ALLOWED_TOP_LEVEL = {
    # copied from the CT (Patient, General Study, Frame of Reference)
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
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    # our own
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "OperatorsName",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "InstanceNumber",
    "StructureSetLabel",
    "StructureSetName",
    "StructureSetDate",
    "StructureSetTime",
    "ReferencedFrameOfReferenceSequence",
    "StructureSetROISequence",
    "ROIContourSequence",
    "RTROIObservationsSequence",
    "ApprovalStatus",
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask > 0).mean(axis=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(variant, grid) -> (info, mask on the read grid, rtstruct path), written once."""
    root = tmp_path_factory.mktemp("rt")
    out = {}
    for variant, grid in CASES:
        image, label, affine = phantom_case((56, 48, 14), GRIDS[grid], seed=1)
        folder = root / f"{variant}_{grid}"
        series = write_ct_series(image, affine, folder / "ct", variant=variant, seed=2, institution="Site A")
        info = read_series_info(folder / "ct")
        mask = align_to_grid(label, series.affine_ras, info.affine_ras)
        out[(variant, grid)] = (info, mask, write_rtstruct(mask, info, folder / "rtstruct.dcm"))
    return out


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("variant,grid", CASES)
def test_round_trip_on_every_variant(written, variant, grid):
    info, mask, path = written[(variant, grid)]
    back = rasterise_roi(path, info, "CTV")
    score = dice(back, mask)
    shift = np.abs(centroid(back) - centroid(mask)).max()
    print(f"round trip {variant} {grid}: Dice {score:.4f}, centroid error {shift:.4f} voxel")
    assert score >= 0.98
    assert shift < 1.0
    np.testing.assert_array_equal(back, mask)  # the level-0.5 contours make the round trip exact


def test_round_trip_keeps_holes_islands_and_components(written):
    info, mask, path = written[("identity", "1x1x3mm")]
    ds = read_rtstruct(path)
    per_slice: dict[str, int] = {}
    for contour in ds.ROIContourSequence[0].ContourSequence:
        uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
        per_slice[uid] = per_slice.get(uid, 0) + 1
    counts = [per_slice.get(uid, 0) for uid in info.sop_instance_uids]
    assert max(counts) == 3 and 2 in counts  # outer + hole (+ island or second component)
    centre = [s // 2 for s in mask.shape]
    assert mask[centre[0] - 3, centre[1], centre[2]] == 0  # the hole is there, and survives
    assert rasterise_roi(ds, info)[centre[0] - 3, centre[1], centre[2]] == 0


def test_contour_points_are_in_patient_coordinates(written):
    info, _, path = written[("oblique", "1x1x3mm")]
    ds = read_rtstruct(path)
    by_uid = dict(zip(info.sop_instance_uids, range(len(info.sop_instance_uids))))
    for contour in ds.ROIContourSequence[0].ContourSequence:
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        k = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        assert int(contour.NumberOfContourPoints) == len(points)
        np.testing.assert_allclose((points - info.positions[k]) @ info.normal, 0, atol=1e-3)  # on slice k
        assert not np.allclose(points[0], points[-1])  # closing point implicit


# ---------------------------------------------------------------------------------------------- contents


def test_written_structure_set_contents(written):
    info, _, path = written[("flip_xy", "1x1x3mm")]
    ds = read_rtstruct(path)
    assert set(ds.dir()) <= ALLOWED_TOP_LEVEL, set(ds.dir()) - ALLOWED_TOP_LEVEL
    assert "InstitutionName" not in ds and "PatientName" in ds
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    assert ds.SeriesInstanceUID != info.series_instance_uid and ds.StudyInstanceUID == info.study_instance_uid
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == info.frame_of_reference_uid
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == info.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == list(info.sop_instance_uids)
    roi = ds.StructureSetROISequence[0]
    assert (roi.ROIName, roi.ROIGenerationAlgorithm) == (
        "CTV",
        "AUTOMATIC",
    ) and "FairDRO" in roi.ROIGenerationDescription
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "CTV"
    assert list(ds.ROIContourSequence[0].ROIDisplayColor) == [255, 0, 0]
    assert ds.ApprovalStatus == "UNAPPROVED"


def test_empty_mask_gives_an_roi_without_contours(written):
    info, mask, _ = written[("identity", "1x1x3mm")]
    ds = build_rtstruct(np.zeros_like(mask), info)
    assert "ContourSequence" not in ds.ROIContourSequence[0]
    assert not rasterise_roi(ds, info).any()


def test_wrong_mask_shape_is_refused(written):
    info, mask, _ = written[("identity", "1x1x3mm")]
    with pytest.raises(ValueError, match="does not match the CT grid"):
        build_rtstruct(mask[:, :, :-1], info)


# ---------------------------------------------------------------------------------------------- rasterising


def test_even_odd_fill_hand_computed():
    square = np.array([[1.5, 1.5], [5.5, 1.5], [5.5, 4.5], [1.5, 4.5]])  # covers centres i 2..5, j 2..4
    filled = fill_polygon_even_odd(square, (8, 7))
    expected = np.zeros((8, 7), bool)
    expected[2:6, 2:5] = True
    np.testing.assert_array_equal(filled, expected)
    inner = np.array([[2.5, 2.5], [3.5, 2.5], [3.5, 3.5], [2.5, 3.5]])  # centre (3, 3)
    ring = filled ^ fill_polygon_even_odd(inner, (8, 7))
    assert ring.sum() == 11 and not ring[3, 3]
    assert not fill_polygon_even_odd(square[:2], (8, 7)).any()


def test_slice_contours_of_a_ring_and_a_single_pixel():
    ring = np.zeros((9, 9), np.uint8)
    ring[2:7, 2:7] = 1
    ring[4, 4] = 0
    polygons = slice_contours(ring)
    assert len(polygons) == 2
    rebuilt = np.zeros((9, 9), bool)
    for polygon in polygons:
        rebuilt ^= fill_polygon_even_odd(polygon, (9, 9))
    np.testing.assert_array_equal(rebuilt, ring > 0)
    dot = np.zeros((5, 5), np.uint8)
    dot[0, 4] = 1  # touching the border
    (polygon,) = slice_contours(dot)
    np.testing.assert_array_equal(fill_polygon_even_odd(polygon, (5, 5)), dot > 0)


def test_off_plane_contour_is_refused(written):
    info, _, path = written[("identity", "1x1x3mm")]
    ds = read_rtstruct(path)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
    points[:, 2] += 1.4  # between slices (spacing 3 mm)
    contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
    with pytest.raises(ContourGeometryError, match="not a slice plane"):
        rasterise_roi(ds, info)


# ---------------------------------------------------------------------------------------------- ROI lookup


def test_roi_lookup_is_case_insensitive_with_synonyms_in_order(written):
    info, _, path = written[("identity", "1x1x3mm")]
    ds = read_rtstruct(path)
    ds.StructureSetROISequence[0].ROIName = " ctv_high "
    assert find_roi(ds, ["CTV", "CTV_High"]) == (1, " ctv_high ")
    second = copy.deepcopy(ds.StructureSetROISequence[0])
    second.ROINumber, second.ROIName = 2, "CTV"
    ds.StructureSetROISequence.append(second)
    assert find_roi(ds, ["CTV", "CTV_High"]) == (2, "CTV")
    with pytest.raises(RoiNotFoundError) as err:
        rasterise_roi(ds, info, ["GTV", "PTV"])
    assert "' ctv_high '" in str(err.value) and "'CTV'" in str(err.value)
    second.ROIName = "CTV_HIGH"
    with pytest.raises(RTStructError, match="Several ROIs"):
        find_roi(ds, ["ctv_high"])


def test_not_an_rtstruct(written, tmp_path):
    info, _, _ = written[("identity", "1x1x3mm")]
    with pytest.raises(RTStructError, match="not an RT Structure Set"):
        read_rtstruct(info.files[0])
    (tmp_path / "x.dcm").write_bytes(b"garbage")
    with pytest.raises(RTStructError, match="x.dcm"):
        read_rtstruct(tmp_path / "x.dcm")


# ---------------------------------------------------------------------------------------------- references


def test_rtstruct_of_another_series_is_refused(written):
    info, _, _ = written[("identity", "1x1x3mm")]
    _, _, other_path = written[("flip_xy", "1x1x3mm")]
    with pytest.raises(ReferenceMismatchError) as err:
        rasterise_roi(other_path, info)
    assert info.frame_of_reference_uid in str(err.value)
    ds = read_rtstruct(other_path)  # same frame of reference, but another series
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = info.frame_of_reference_uid
    ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = info.frame_of_reference_uid
    with pytest.raises(ReferenceMismatchError, match="references series"):
        rasterise_roi(ds, info)


def test_rtstruct_referencing_an_unknown_image_is_refused(written):
    info, _, path = written[("identity", "1x1x3mm")]
    ds = read_rtstruct(path)
    ds.ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    with pytest.raises(ReferenceMismatchError, match="1.2.3.4"):
        rasterise_roi(ds, info)


# ---------------------------------------------------------------------------------------------- independent checks


def _plastimatch_mask(path, info, out, *extra):
    """Rasterise ``path``'s CTV with plastimatch on the CT of ``info``; return its mask sampled on our grid."""
    return plastimatch_mask(path, info, out, "CTV", *extra)[0]


@needs_plastimatch
@pytest.mark.parametrize("variant,grid", CASES)
def test_plastimatch_agrees(written, tmp_path, variant, grid):
    info, mask, path = written[(variant, grid)]
    theirs = _plastimatch_mask(path, info, tmp_path / "pm", "--xor-contours")  # holes by even-odd, as we write
    score = dice(theirs, mask)
    print(f"plastimatch --xor-contours {variant} {grid}: Dice {score:.4f}")
    assert score >= 0.97


@needs_plastimatch
def test_plastimatch_default_or_mode_fills_the_holes(written, tmp_path):
    """plastimatch ORs contours by default: it must then see our mask with every hole filled."""
    info, mask, path = written[("oblique", "1x1x3mm")]
    theirs = _plastimatch_mask(path, info, tmp_path / "pm")
    filled = np.stack([binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)
    assert dice(theirs, filled) >= 0.97 and theirs.sum() > mask.sum()


@needs_plastimatch
@pytest.mark.parametrize("variant", ["identity", "reverse_slices", "oblique"])
def test_we_read_plastimatch_written_rtstructs(written, tmp_path, variant):
    """The other direction: plastimatch writes (holes 'keyholed' into the outer contour), we rasterise."""
    info, mask, _ = written[(variant, "1x1x3mm")]
    (tmp_path / "prefix").mkdir()
    nib.save(nib.Nifti1Image(mask, info.affine_ras), tmp_path / "prefix" / "CTV.nii.gz")
    subprocess.run(
        [
            "plastimatch",
            "convert",
            "--input-prefix",
            str(tmp_path / "prefix"),
            "--referenced-ct",
            str(info.series_dir),
            "--output-dicom",
            str(tmp_path / "out"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (path,) = (tmp_path / "out").glob("rtss*.dcm")
    score = dice(rasterise_roi(path, info), mask)
    print(f"plastimatch-written {variant}: Dice {score:.4f}")
    assert score >= 0.97


@needs_tool("dciodvfy")
def test_dciodvfy_reports_no_errors(written):
    _, _, path = written[("oblique", "0.9x0.9x2.5mm")]
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    warnings = [line for line in report.splitlines() if line.startswith("Warning")]
    print("dciodvfy RTSTRUCT warnings:", warnings)
    assert not re.search(r"^Error", report, re.MULTILINE), report
