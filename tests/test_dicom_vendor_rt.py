"""A real vendor RTSTRUCT (MIM Software 7.0.3) on its real CT (GE Discovery MI phantom), from rt-utils' test data.

The CT holds only 2 of the 5 slices the structure set references (rt-utils' maintainers kept 2), so:

* ``prepare_cohort`` must refuse the case as it is (too few slices for a planning CT), and the RTSTRUCT reader must
  refuse the structure set against those 2 slices (it references images that are not in the series);
* the contours on the 2 slices that are present are still real vendor contours: after dropping, at run time and in a
  temporary copy, the contours and references of the 3 absent slices, our rasteriser must agree with plastimatch's
  rasterisation of the same ROI (Dice >= 0.99).

Source, licence and what is missing: ``tests/data/dicom_real/README.md``.
"""

from __future__ import annotations

import copy
import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from plastimatch_check import needs_plastimatch, plastimatch_mask
from scripts.dicom_series import TooFewSlicesError, read_series_info
from scripts.prepare_cohort import prepare_cohort
from scripts.rtstruct import ReferenceMismatchError, rasterise_roi, read_rtstruct

DATA = Path(__file__).resolve().parent / "data" / "dicom_real"
CASE = DATA / "mim_phantom_rtstruct"
RTSTRUCT = CASE / "invalid_reference_rt.dcm"
CT_FILES = ("ct_1.dcm", "ct_2.dcm")
ROI = "ROI-4"  # the largest of the 4 closed-planar ROIs, about 36 x 32 mm per slice


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_the_files_are_the_vendor_export():
    """Guard the data: a MIM structure set on the GE CT's frame of reference, with 4 closed-planar ROIs."""
    rs = read_rtstruct(RTSTRUCT)
    assert rs.Manufacturer == "MIM Software Inc." and str(rs.SoftwareVersions) == "7.0.3"
    cts = [pydicom.dcmread(CASE / name, stop_before_pixels=True) for name in CT_FILES]
    assert {ct.Manufacturer for ct in cts} == {"GE MEDICAL SYSTEMS"}
    assert {ct.FrameOfReferenceUID for ct in cts} == {rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID}
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["ROI-1", "ROI-2", "ROI-3", "ROI-4"]
    types = {c.ContourGeometricType for rc in rs.ROIContourSequence for c in rc.ContourSequence}
    assert types == {"CLOSED_PLANAR"}


def test_prepare_cohort_refuses_the_incomplete_series(tmp_path):
    csv_path = tmp_path / "cases.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "dicom_dir", "site"])
        writer.writeheader()
        writer.writerow({"id": "mim1", "dicom_dir": CASE.name, "site": "A"})
    report = prepare_cohort(DATA, csv_path, tmp_path / "out", [ROI])
    assert report.prepared == [] and report.datalist is None
    [(case_id, error)] = report.failed
    assert case_id == "mim1"
    assert "2 slice(s)" in error and "at least 3" in error, error
    assert not (tmp_path / "out" / "labels" / "mim1.nii.gz").exists()


def test_rtstruct_reader_refuses_references_to_absent_slices():
    with pytest.raises(TooFewSlicesError):
        read_series_info(CASE)
    info = read_series_info(CASE, min_slices=2)
    assert info.shape[2] == 2
    with pytest.raises(ReferenceMismatchError, match=r"1\.995\.90"):
        rasterise_roi(RTSTRUCT, info, ROI)


def _present_slices_only(tmp_path: Path) -> Path:
    """Copy the case, dropping from the structure set every contour and reference to an absent CT slice."""
    folder = tmp_path / "case"
    folder.mkdir()
    present = set()
    for name in CT_FILES:
        shutil.copy2(CASE / name, folder / name)
        present.add(pydicom.dcmread(CASE / name, stop_before_pixels=True).SOPInstanceUID)
    rs = copy.deepcopy(pydicom.dcmread(RTSTRUCT))
    for series in rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence:
        series.ContourImageSequence = [i for i in series.ContourImageSequence if i.ReferencedSOPInstanceUID in present]
    dropped = 0
    for roi in rs.ROIContourSequence:
        kept = [c for c in roi.ContourSequence if c.ContourImageSequence[0].ReferencedSOPInstanceUID in present]
        dropped += len(roi.ContourSequence) - len(kept)
        roi.ContourSequence = kept
    assert dropped == 4  # one contour per ROI on z = 70 mm, the only absent slice that has contours
    rs.save_as(folder / "rtss.dcm")
    return folder


@needs_plastimatch
def test_vendor_contours_agree_with_plastimatch(tmp_path):
    folder = _present_slices_only(tmp_path)
    info = read_series_info(folder, min_slices=2)
    ours = rasterise_roi(folder / "rtss.dcm", info, ROI)
    assert ours.sum() > 2000  # about 36 x 32 mm on 0.49 mm pixels, on both slices
    assert ours[..., 0].any() and ours[..., 1].any()
    theirs, n_theirs = plastimatch_mask(folder / "rtss.dcm", info, tmp_path / "pm", ROI)
    assert theirs.sum() == n_theirs  # nothing cut off
    score = dice(ours, theirs)
    print(f"MIM {ROI} vs plastimatch: Dice {score:.4f} ({int(ours.sum())} vs {int(theirs.sum())} voxels)")
    assert score >= 0.99
