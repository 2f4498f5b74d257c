"""Privacy of the DICOM inference command: patient identifiers reach only the DICOM objects that must carry them.

A CT series is written with a planted PatientName/PatientID and planted values in attributes that no output needs
(operator, institution address, other patient ids ...). The documented command then runs in a subprocess; its whole
log and every output file other than the DICOM SEG/RTSTRUCT (which carry the Patient module by their IOD) must not
contain the planted name or id, and the SEG/RTSTRUCT must not contain the attributes they have no reason to copy.
"""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.synthetic_dicom import phantom_case, write_case_dicom

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
NET = {"features": 4, "num_experts": 4}
NAME, PATIENT_ID = "PLANTED^SECRETNAME", "SECRETID123"
#: attributes of the CT that neither SEG nor RTSTRUCT needs, with planted values (none may appear in any output)
NOT_COPIED = {
    "InstitutionName": "PLANTED_INSTITUTION",  # General Equipment of the CT, not of the algorithm's objects
    "InstitutionAddress": "PLANTED_ADDRESS_1_MAIN_STREET",
    "OperatorsName": "PLANTED^OPERATOR",  # General Series
    "PerformingPhysicianName": "PLANTED^PERFORMER",
    "StationName": "PLANTEDSTATION",
    "OtherPatientIDs": "PLANTEDOTHERID",  # retired Patient attribute
    "PatientAddress": "PLANTED_PATIENT_ADDRESS",  # Patient Demographic module
    "PatientTelephoneNumbers": "555PLANTED",
}


@pytest.fixture(scope="module")
def planted_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    image, label, affine = phantom_case(shape=(48, 48, 12), seed=2)
    series_dir, _ = write_case_dicom(
        image, label, affine, root / "series", "case_priv", patient_name=NAME, patient_id=PATIENT_ID,
        institution=NOT_COPIED["InstitutionName"],
    )  # fmt: skip
    for path in sorted(series_dir.iterdir()):
        ds = pydicom.dcmread(path)
        if ds.Modality != "CT":
            continue
        for keyword, value in NOT_COPIED.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update(NET)
    torch.manual_seed(0)
    ckpt = root / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    return series_dir, ckpt


@pytest.fixture(scope="module")
def inference_run(planted_case, tmp_path_factory):
    series_dir, ckpt = planted_case
    out = tmp_path_factory.mktemp("privacy_out")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
        f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'inference_dicom.json'}']", "--input_dir", str(series_dir),
        "--subgroup", "T2", "--output_dir", str(out), "--ckpt_path", str(ckpt),
    ]  # fmt: skip
    for key, value in NET.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "bundle"), env.get("PYTHONPATH")) if p)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    return out, log


def _dicom_outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name.startswith(("SEG_", "RS_")))


def _content(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("latin-1")


def test_logs_and_non_dicom_outputs_hold_no_patient_identifier(inference_run):
    out, log = inference_run
    assert "Wrote DICOM SEG" in log and "Wrote RTSTRUCT" in log  # the whole run's log was captured
    for secret in (NAME, "SECRETNAME", PATIENT_ID, *NOT_COPIED.values()):
        assert secret not in log, f"the inference log contains the planted {secret!r}"
    others = [p for p in out.rglob("*") if p.is_file() and p not in _dicom_outputs(out)]
    assert any(p.name.endswith(".nii.gz") for p in others), sorted(p.name for p in others)
    for path in others:  # the NIfTI mask (decompressed) and any json/csv/log written beside it
        text = _content(path)
        for secret in ("SECRETNAME", PATIENT_ID, *NOT_COPIED.values()):
            assert secret not in text, f"{path.name} contains the planted {secret!r}"
        assert "SECRETNAME" not in path.name and PATIENT_ID not in path.name


#: highdicom 0.28 puts the CT's acquisition equipment (InstitutionName, InstitutionAddress, StationName ...) into the
#: SEG's ContributingEquipmentSequence; scripts/dicom_seg.py must strip those identifying fields after building it
@pytest.mark.parametrize("kind", ["RS", "SEG"])
def test_dicom_outputs_copy_only_the_patient_and_study_attributes(inference_run, kind):
    out, _ = inference_run
    (path,) = [p for p in _dicom_outputs(out) if p.name.startswith(f"{kind}_")]
    ds = pydicom.dcmread(path)
    assert str(ds.PatientName) == NAME and ds.PatientID == PATIENT_ID  # required by the IOD, copied exactly
    raw = path.read_bytes().decode("latin-1")  # the whole file: nested sequences included
    leaked = [keyword for keyword, value in NOT_COPIED.items() if value in raw]
    assert not leaked, f"{path.name} copies {leaked} from the CT"
