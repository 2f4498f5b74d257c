"""DICOM SEG round trip on every storage variant, dciodvfy, and the write_dicom_outputs entry point."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import needs_tool
from monai.data import DataLoader, Dataset, decollate_batch
from monai.transforms import Compose, EnsureTyped, Invertd, Orientationd, Spacingd
from scripts.dicom_seg import SegError, read_seg, write_seg
from scripts.dicom_series import LoadDicomSeriesd, read_ct_series, read_series_info
from scripts.dicom_write import SaveDicomOutputsd, write_dicom_outputs
from scripts.rtstruct import rasterise_roi
from scripts.synthetic_dicom import VARIANTS, align_to_grid, phantom_case, write_ct_series

REPO_BUNDLE = str(Path(__file__).resolve().parents[1] / "bundle")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """variant -> (info, mask on the read grid)."""
    root = tmp_path_factory.mktemp("seg")
    out = {}
    for variant in VARIANTS:
        spacing = (0.9, 0.9, 2.5) if variant == "oblique" else (1.0, 1.0, 3.0)
        image, label, affine = phantom_case((48, 40, 12), spacing, seed=4)
        written = write_ct_series(image, affine, root / variant, variant=variant, seed=6)
        info = read_series_info(root / variant)
        out[variant] = (info, align_to_grid(label, written.affine_ras, info.affine_ras))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_seg_round_trip_is_exact(cases, tmp_path, variant):
    info, mask = cases[variant]
    path = write_seg(mask, info, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_seg(path, info), mask)
    seg = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == info.study_instance_uid and seg.FrameOfReferenceUID == info.frame_of_reference_uid
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "CTV" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "FairDRO"
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == set(info.sop_instance_uids)


def test_seg_of_another_series_is_refused(cases, tmp_path):
    info, mask = cases["identity"]
    other, _ = cases["flip_xy"]
    path = write_seg(mask, info, tmp_path / "seg.dcm")
    with pytest.raises(SegError, match="frame of reference"):
        read_seg(path, other)
    with pytest.raises(SegError, match="does not match the CT grid"):
        write_seg(mask[:-1], info, tmp_path / "bad.dcm")


@needs_tool("dciodvfy")
def test_dciodvfy_reports_no_errors(cases, tmp_path):
    info, mask = cases["oblique"]
    path = write_seg(mask, info, tmp_path / "seg.dcm")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    print("dciodvfy SEG warnings:", [line for line in report.splitlines() if line.startswith("Warning")])
    assert not re.search(r"^Error", report, re.MULTILINE), report


def test_write_dicom_outputs_from_monai_metadata(cases, tmp_path):
    info, mask = cases["transpose_xy"]
    loaded = LoadDicomSeriesd(keys="image", ensure_channel_first=True)({"image": str(info.series_dir)})["image"]
    prediction = torch.as_tensor(mask[None] * 2)  # (1, X, Y, Z), label value 2 as after AsDiscrete
    paths = write_dicom_outputs(prediction, loaded.meta, tmp_path / "out", "CTV", label_value=2)
    assert set(paths) == {"seg", "rtstruct"} and all(p.parent == (tmp_path / "out").resolve() for p in paths.values())
    np.testing.assert_array_equal(read_seg(paths["seg"], info), mask)
    np.testing.assert_array_equal(rasterise_roi(paths["rtstruct"], info), mask)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_write_dicom_outputs_refuses_the_input_folder_and_wrong_grids(cases):
    info, mask = cases["identity"]
    with pytest.raises(ValueError, match="inside the input series folder"):
        write_dicom_outputs(mask, info, info.series_dir)
    with pytest.raises(ValueError, match="inside the input series folder"):
        write_dicom_outputs(mask, info, info.series_dir / "out")
    with pytest.raises(ValueError, match="Invertd"):
        write_dicom_outputs(mask[:, :, 1:], info, info.series_dir.parent / "out")
    with pytest.raises(ValueError, match="formats"):
        write_dicom_outputs(mask, info, info.series_dir.parent / "out", formats=("nifti",))


def test_write_dicom_outputs_on_a_resampled_grid_references_the_stored_slices(cases, tmp_path):
    info, mask = cases["identity"]
    folder = tmp_path / "ct"
    shutil.copytree(info.series_dir, folder)
    (folder / info.files[4].name).unlink()
    resampled = read_series_info(folder, allow_resample=True)
    assert resampled.resampled_from is not None and resampled.shape == mask.shape
    meta = LoadDicomSeriesd(keys="image", allow_resample=True)({"image": str(folder)})["image"].meta
    assert bool(meta["dicom_resampled"])
    paths = write_dicom_outputs(mask, meta, tmp_path / "out")  # mask on the uniform (resampled) grid
    stored = resampled.resampled_from
    expected = np.delete(mask, 4, axis=2)
    np.testing.assert_array_equal(read_seg(paths["seg"], stored), expected)
    np.testing.assert_array_equal(rasterise_roi(paths["rtstruct"], stored), expected)


def test_inference_modules_do_not_import_highdicom():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import scripts.dicom_series, scripts.rtstruct, scripts.dicom_write, scripts.prepare_cohort;"
        "sys.exit('highdicom' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code, REPO_BUNDLE], timeout=120).returncode == 0


def test_inference_chain_with_dataloader_invertd_and_save_transform(cases, tmp_path):
    """LoadDicomSeriesd -> Orientationd -> batch/decollate -> 'network' -> Invertd -> SaveDicomOutputsd."""
    info, _ = cases["flip_xy"]
    volume, _ = read_ct_series(info.series_dir)
    pre = Compose(
        [
            LoadDicomSeriesd(keys="image", ensure_channel_first=True),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(1.0, 1.0, 3.0), mode="nearest"),
        ]
    )
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True),
            EnsureTyped(keys="pred"),
            SaveDicomOutputsd(keys="pred", output_dir=tmp_path / "out", formats=("seg",)),
        ]
    )
    loader = DataLoader(Dataset([{"image": str(info.series_dir)}], transform=pre), batch_size=1)
    batch = next(iter(loader))
    batch["pred"] = (batch["image"] > 55).to(torch.uint8)  # stands in for the network + AsDiscrete
    (item,) = [post(d) for d in decollate_batch(batch)]
    written = read_seg(item["pred_dicom_outputs"]["seg"], info)
    np.testing.assert_array_equal(written, (volume > 55).astype(np.uint8))
