"""prepare_cohort: DICOM cohort -> NIfTI + datalist, with failures reported and no partial output."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scripts.prepare_cohort import main, prepare_cohort
from scripts.synthetic_dicom import align_to_grid, phantom_case, write_case_dicom

SCRIPT = Path(__file__).resolve().parents[1] / "bundle" / "scripts" / "prepare_cohort.py"
GOOD = {"c01": "identity", "c02": "oblique", "c03": "reverse_slices"}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A DICOM root with three good cases, one without the ROI and one with a missing slice."""
    root = tmp_path_factory.mktemp("cohort") / "dicom"
    truth = {}
    for n, (case_id, variant) in enumerate({**GOOD, "c04": "flip_xy", "c05": "identity"}.items()):
        image, label, affine = phantom_case((40, 36, 10), (1.0, 1.0, 3.0), seed=n)
        roi = "GTV" if case_id == "c04" else ("ctv_high" if case_id == "c03" else "CTV")
        write_case_dicom(
            image,
            label,
            affine,
            root,
            case_id,
            roi_name=roi,
            variant=variant,
            seed=n,
            patient_name="SECRETNAME^X",
            patient_id=f"SECRETID{n}",
        )
        truth[case_id] = (image, label, affine)
    victim = sorted(
        (p for p in (root / "c05").glob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"),
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )[4]
    victim.unlink()
    rows = [
        {"id": case_id, "institution": "A" if i % 2 else "B", "stage": f"T{i + 1}"}
        for i, case_id in enumerate(["c01", "c02", "c03", "c04", "c05"])
    ]
    return root, _write_csv(root.parent / "cases.csv", rows), truth


def test_good_cases_round_trip_to_nifti(cohort, tmp_path):
    root, _, truth = cohort
    rows = [
        {"id": "p1", "dicom_dir": "c01", "site": "A"},
        {"id": "p2", "dicom_dir": str(root / "c02"), "site": "B"},
        {"id": "p3", "dicom_dir": "c03", "site": "B"},
    ]
    csv_path = _write_csv(tmp_path / "cases.csv", rows)
    before = _tree_digest(root)
    assert main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(tmp_path / "out")]) == 0
    assert _tree_digest(root) == before  # input untouched
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert set(datalist) == {"training", "validation", "testing"}  # random seeded split without --split-by
    items = sorted((it for part in datalist.values() for it in part), key=lambda it: it["id"])
    assert [item["id"] for item in items] == ["p1", "p2", "p3"]
    for item, source in zip(items, ["c01", "c02", "c03"]):
        assert set(item) == {"id", "image", "label", "site"}
        image = nib.load(tmp_path / "out" / item["image"])
        label = nib.load(tmp_path / "out" / item["label"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, label.affine)
        want_image, want_label, affine = truth[source]
        if source == "c02":  # oblique: stored geometry is the rotated affine, checked in test_dicom_series
            assert np.asarray(label.dataobj).sum() == want_label.sum()
            continue
        np.testing.assert_array_equal(np.asarray(label.dataobj), align_to_grid(want_label, affine, label.affine))
        np.testing.assert_array_equal(np.asarray(image.dataobj), align_to_grid(want_image, affine, image.affine))


def test_bad_cases_are_reported_and_leave_nothing(cohort, tmp_path, caplog):
    root, csv_path, _ = cohort
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    assert main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(out)]) == 1
    assert not (out / "datalist.json").exists()
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["prepared"] == ["c01", "c02", "c03"]
    failed = {item["id"]: item["error"] for item in report["failed"]}
    assert set(failed) == {"c04", "c05"}
    assert "No ROI named" in failed["c04"] and "GTV" in failed["c04"]
    assert "missing slice" in failed["c05"]
    for case_id in failed:
        assert not list(out.rglob(f"*{case_id}*"))
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    assert "SECRETNAME" not in caplog.text and "SECRETID" not in caplog.text
    assert "FAILED c04" in caplog.text and "FAILED c05" in caplog.text


def test_skip_bad_and_allow_resample(cohort, tmp_path):
    root, csv_path, truth = cohort
    out = tmp_path / "out"
    report = prepare_cohort(root, csv_path, out, ["CTV", "CTV_High"], skip_bad=True)
    assert [item["id"] for item in report.prepared] == ["c01", "c02", "c03"] and report.datalist is not None
    datalist = json.loads(report.datalist.read_text())
    items = sorted((it for part in datalist.values() for it in part), key=lambda it: it["id"])
    assert items[0] == {
        "id": "c01",
        "image": "images/c01.nii.gz",
        "label": "labels/c01.nii.gz",
        "institution": "B",
        "stage": "T1",
    }
    report = prepare_cohort(root, csv_path, out, ["CTV"], allow_resample=True, overwrite=True)
    assert [i for i, _ in report.failed] == ["c03", "c04"]  # "ctv_high" is not a synonym of "CTV" alone
    label = nib.load(out / "labels" / "c05.nii.gz")
    image, want_label, affine = truth["c05"]
    assert label.shape == image.shape  # the missing slice was interpolated back into a uniform grid
    # the RTSTRUCT was drawn on the complete series: its contour on the missing slice fills that slice exactly
    np.testing.assert_array_equal(np.asarray(label.dataobj), align_to_grid(want_label, affine, label.affine))
    assert not (out / "labels" / "c03.nii.gz").exists()  # stale output of a now-failed case removed


def test_refuses_output_inside_input_and_non_empty_output(cohort, tmp_path):
    root, csv_path, _ = cohort
    assert main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(root / "out")]) == 2
    assert not (root / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(tmp_path / "out")]) == 2


def test_bad_attribute_tables(cohort, tmp_path):
    root, _, _ = cohort
    for rows in ([{"case": "c01"}], [{"id": "c01"}, {"id": "c01"}], [{"id": "../c01"}]):
        csv_path = _write_csv(tmp_path / "bad.csv", rows)
        assert main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(tmp_path / "o")]) == 2


def test_runs_as_a_script(cohort, tmp_path):
    root, _, _ = cohort
    csv_path = _write_csv(tmp_path / "one.csv", [{"id": "c01", "stage": "T1"}])
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dicom-root",
            str(root),
            "--attributes",
            str(csv_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "datalist.json").exists()


def test_split_by_attribute_gives_disjoint_stratified_lists(cohort, tmp_path):
    root, _, _ = cohort
    rows = [{"id": f"p{i}", "dicom_dir": case, "site": "A" if i < 6 else "B"} for i, case in
            enumerate(["c01", "c02", "c03"] * 3)]  # fmt: skip
    csv_path = _write_csv(tmp_path / "cases.csv", rows)
    out = tmp_path / "out"
    assert (
        main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(out), "--split-by", "site"]) == 0
    )
    datalist = json.loads((out / "datalist.json").read_text())
    parts = {k: [it["id"] for it in datalist[k]] for k in ("training", "validation", "testing")}
    ids = sum(parts.values(), [])
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(set(ids)) == len(ids)
    # site A has 6 cases: 60/20/20 dealing gives 4 training, 1 validation, 1 testing
    site_a = {k: sum(1 for it in datalist[k] if it["site"] == "A") for k in parts}
    assert site_a == {"training": 4, "validation": 1, "testing": 1}
    bad = main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(tmp_path / "o2"),
                "--split-by", "nosuchcolumn"])  # fmt: skip
    assert bad == 2
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir()), "nothing written on a usage error"


def test_random_split_is_seeded_and_passes_check_data(cohort, tmp_path):
    root, _, _ = cohort
    rows = [{"id": f"p{i}", "dicom_dir": case} for i, case in enumerate(["c01", "c02", "c03"] * 2)]
    csv_path = _write_csv(tmp_path / "cases.csv", rows)
    lists = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["--dicom-root", str(root), "--attributes", str(csv_path), "--out", str(out), "--seed", "3"]) == 0
        datalist = json.loads((out / "datalist.json").read_text())
        assert set(datalist) == {"training", "validation", "testing"} and datalist["training"]
        lists.append({k: [it["id"] for it in v] for k, v in datalist.items()})
    assert lists[0] == lists[1]  # same seed, same split
    assert sorted(sum(lists[0].values(), [])) == sorted(r["id"] for r in rows)
    check = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "check_data.py"), "--datalist", str(tmp_path / "a" / "datalist.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_failed_run_ends_stderr_with_one_error_line_naming_the_cause(cohort, tmp_path):
    root, _, _ = cohort
    csv_path = _write_csv(tmp_path / "cases.csv", [{"id": "c01"}, {"id": "c05"}])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dicom-root", str(root), "--attributes", str(csv_path), "--out",
         str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR ") and "c05" in last and "missing slice" in last and "--skip-bad" in last, last
    assert "Re-export the complete series" in last and not list((tmp_path / "out").rglob("*c05*"))
