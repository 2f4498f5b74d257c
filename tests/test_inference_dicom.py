"""The documented DICOM inference command: CT series in; NIfTI mask, DICOM SEG and RTSTRUCT out."""

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import run_bundle_workflow
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts import synthetic
from scripts.dicom_seg import read_seg
from scripts.dicom_series import read_series_info
from scripts.rtstruct import rasterise_roi

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
NET = {"features": 4, "num_experts": 4}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_cohort")
    datalist = synthetic.generate_cohort(root, n_cases=4, seed=11, shape=(48, 48, 24), dicom=True)
    items = [it for part in ("training", "validation", "testing") for it in datalist[part]]
    # an untrained network with fixed weights is enough to check the geometry of the outputs
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update(NET)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    ckpt = root / "model.pt"
    torch.save(net.state_dict(), ckpt)
    return root, items, ckpt


@pytest.mark.parametrize("case_index", [0, 1, 2, 3])
def test_dicom_inference_outputs_agree_and_reference_the_series(dicom_case, case_index, tmp_path):
    root, items, ckpt = dicom_case
    item = items[case_index]
    series_dir = root / item["dicom_dir"]
    # the synthetic export keeps CT and RTSTRUCT in one folder, as planning systems export them
    before = _tree_digest(series_dir)
    out = tmp_path / "out"
    run_bundle_workflow(["inference.json", "inference_dicom.json"], "infer", "inference", input_dir=str(series_dir),
                        subgroup=item["stage"], output_dir=str(out), ckpt_path=str(ckpt), **NET)  # fmt: skip
    assert _tree_digest(series_dir) == before, "inference must never write into the input series folder"

    info = read_series_info(series_dir)
    uid = info.series_instance_uid
    nifti = out / f"{item['id']}_seg.nii.gz"
    seg_path, rs_path = out / f"SEG_{uid}.dcm", out / f"RS_{uid}.dcm"
    for p in (nifti, seg_path, rs_path):
        assert p.is_file(), p
    mask = np.asarray(nib.load(nifti).dataobj) > 0
    assert mask.shape == tuple(info.shape)
    np.testing.assert_allclose(nib.load(nifti).affine, info.affine_ras, atol=1e-3)
    # SEG is exact on the CT grid; RTSTRUCT polygons rasterise back to (almost) the same mask
    np.testing.assert_array_equal(read_seg(seg_path, info) > 0, mask)
    back = rasterise_roi(rs_path, info, names=["CTV"]) > 0
    if mask.sum() > 0:
        dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
        assert dice >= 0.98
    for path in (seg_path, rs_path):
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == info.study_instance_uid
        assert ds.FrameOfReferenceUID == info.frame_of_reference_uid if "FrameOfReferenceUID" in ds else True
    rs = pydicom.dcmread(rs_path)
    ref_series = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == uid
    assert rs.StructureSetROISequence[0].ROIName == "CTV"
    assert item["dicom_variant"] in ("identity", "flip_xy", "reverse_slices", "transpose_xy", "oblique")


def test_dicom_inference_refuses_output_inside_series(dicom_case):
    root, items, ckpt = dicom_case
    series_dir = root / items[0]["dicom_dir"]
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "inference_dicom.json")],
        workflow_type="infer", run_id="inference", input_dir=str(series_dir), output_dir=str(series_dir / "out"),
        ckpt_path=str(ckpt), **NET,
    )  # fmt: skip
    wf.initialize()
    with pytest.raises(RuntimeError) as info:
        wf.run()
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert any("inside the input series folder" in m for m in chain), chain
    assert not (series_dir / "out").exists() or not any((series_dir / "out").iterdir())
