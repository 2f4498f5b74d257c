"""Refused DICOM input: the documented inference command ends stderr with one ERROR line and writes nothing.

One subprocess run of the real command per row of ``bundle/docs/bad_input.md`` (DICOM section); each series is
made with the bundle's own writer and then damaged with pydicom.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.dicom_series import find_refusal, read_series_info
from scripts.rtstruct import RTStructError, build_rtstruct
from scripts.synthetic_dicom import phantom_case, write_case_dicom, write_ct_series

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
NET = {"features": 4, "num_experts": 4}


def _ct_files(folder: Path) -> list[Path]:
    """CT slice files of a case folder, in slice order."""
    return list(read_series_info(folder).files)


def _edit(path: Path, **attributes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _single_slice(case: Path) -> None:
    for path in _ct_files(case)[1:]:
        path.unlink()


def _missing_type1(case: Path) -> None:
    _edit(_ct_files(case)[3], FrameOfReferenceUID=None)


def _undecodable(case: Path) -> None:
    victim = _ct_files(case)[4]
    victim.write_bytes(victim.read_bytes()[:-300])


def _missing_slice(case: Path) -> None:
    _ct_files(case)[5].unlink()


def _mixed(case: Path) -> None:
    image, _, affine = phantom_case((32, 32, 10), (1.0, 1.0, 3.0), seed=9)
    write_ct_series(image, affine, case / "other", seed=9, series_number=2)
    for path in (case / "other").iterdir():
        path.rename(case / f"other_{path.name}")
    (case / "other").rmdir()


def _tilt(case: Path) -> None:
    _edit(_ct_files(case)[2], GantryDetectorTilt="12")


def _non_ct(case: Path) -> None:
    for path in _ct_files(case):
        _edit(path, Modality="MR")


# row of bad_input.md -> (damage, words the last stderr line must hold)
ROWS = {
    "single slice": (_single_slice, ["TooFewSlicesError", "1 slice(s)", "at least 3", "Export the whole series"]),
    "missing Type 1 attribute": (_missing_type1, ["MissingAttributeError", "FrameOfReferenceUID", ".dcm", "Export"]),
    "undecodable slice": (_undecodable, ["CorruptDicomError", "cannot decode pixel data", ".dcm", "again"]),
    "missing slice": (_missing_slice, ["MissingSliceError", "1 missing slice", "Re-export the complete series"]),
    "mixed series": (_mixed, ["AmbiguousSeriesError", "2 image series", "series_uid"]),
    "gantry tilt": (_tilt, ["GantryTiltError", "GantryDetectorTilt 12", "dcm2niix"]),
    "non-CT": (_non_ct, ["UnsupportedModalityError", "Modality ['MR']", "planning CT"]),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update(NET)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(ROWS))
def test_refused_series_ends_stderr_with_one_error_line_and_writes_nothing(row, checkpoint, tmp_path):
    damage, words = ROWS[row]
    image, label, affine = phantom_case((32, 32, 10), (1.0, 1.0, 3.0), seed=1)
    case, _ = write_case_dicom(image, label, affine, tmp_path / "in", "case")
    damage(case)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "bundle")}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
         f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'inference_dicom.json'}']", "--input_dir", str(case),
         "--output_dir", str(out), "--ckpt_path", str(checkpoint), "--features", "4", "--num_experts", "4"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ERROR "), lines[-3:]
    assert sum(line.startswith("ERROR ") and "Error: " in line for line in lines[-1:]) == 1
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_writers_refuse_an_empty_type1_value(tmp_path):
    image, _, affine = phantom_case((32, 32, 10), (1.0, 1.0, 3.0), seed=1)
    written = write_ct_series(image, affine, tmp_path / "ct", seed=1)
    info = read_series_info(written.series_dir)
    from dataclasses import replace

    bad = replace(info, frame_of_reference_uid="")
    mask = (image > 0).astype("uint8")
    with pytest.raises(RTStructError, match="FrameOfReferenceUID is empty"):
        build_rtstruct(mask, bad)
    from scripts.dicom_seg import SegError, build_seg

    with pytest.raises(SegError, match="FrameOfReferenceUID is empty"):
        build_seg(mask, bad)


def test_a_failing_writer_removes_what_the_case_already_wrote(tmp_path):
    from scripts.dicom_write import CaseOutputsAllOrNothing

    out = tmp_path / "out"

    def first(data):
        out.mkdir(exist_ok=True)
        (out / "case_seg.nii.gz").write_bytes(b"x")
        return data

    def second(data):
        raise RTStructError("refused")

    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the writer's error
        CaseOutputsAllOrNothing([first, second], out)({"pred": 1})
    assert isinstance(find_refusal(err.value), RTStructError)
    assert not out.exists()
    out.mkdir()
    (out / "other_case.dcm").write_bytes(b"y")  # written before: kept
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the writer's error
        CaseOutputsAllOrNothing([first, second], out)({"pred": 1})
    assert isinstance(find_refusal(err.value), RTStructError)
    assert sorted(p.name for p in out.iterdir()) == ["other_case.dcm"]
    shutil.rmtree(out)
