"""Cohort validation: one row per bad input, all problems at once, the command line and the config hook."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts import synthetic
from scripts.check_data import CohortCheck, Problem, check_datalist, format_report, main

REPO = Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 4)
SUBGROUPS = ["T1", "T2", "T3", "T4"]


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _image(shape=SHAPE, dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 50 - 25).astype(dtype)


def _label(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 2:5, 1:3] = 1
    return lab


def make_cohort(root: Path) -> dict:
    """A clean cohort: training c0..c3 (one per stage), validation v0, testing t0; 8x8x4 volumes."""
    datalist = {"training": [], "validation": [], "testing": []}
    cases = [("training", f"c{i}", s) for i, s in enumerate(SUBGROUPS)] + [
        ("validation", "v0", "T1"),
        ("testing", "t0", "T2"),
    ]
    for list_key, case, stage in cases:
        _save(root / "images" / f"{case}.nii.gz", _image())
        _save(root / "labels" / f"{case}.nii.gz", _label())
        item = {"id": case, "image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz", "stage": stage}
        datalist[list_key].append(item)
    write_datalist(root, datalist)
    return datalist


def write_datalist(root: Path, datalist) -> Path:
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


def _item(datalist, case):
    return next(it for items in datalist.values() for it in items if it.get("id") == case)


# ---- mutations, one per bad input: each takes (root, datalist) and breaks the cohort


def bad_json(root, dl):
    (root / "datalist.json").write_text('{\n  "training": [\n    {"id": "c0",}\n  ]\n}\n')


def not_object(root, dl):
    (root / "datalist.json").write_text("[1, 2]")


def missing_list(root, dl):
    del dl["validation"]


def item_not_object(root, dl):
    dl["training"].append("images/c9.nii.gz")


def missing_image(root, dl):
    del _item(dl, "c1")["image"]


def missing_label(root, dl):
    del _item(dl, "c1")["label"]


def duplicate_id(root, dl):
    _item(dl, "t0")["id"] = "c1"


def missing_file(root, dl):
    _item(dl, "c1")["image"] = "images/nowhere.nii.gz"


def zero_byte(root, dl):
    (root / "labels" / "c1.nii.gz").write_bytes(b"")


def truncated_gz(root, dl):
    path = root / "images" / "c1.nii.gz"
    _save(path, np.zeros((16, 16, 8), np.int16))
    _save(root / "labels" / "c1.nii.gz", np.zeros((16, 16, 8), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 12])  # header intact, end of the compressed data gone


def not_nifti(root, dl):
    (root / "images" / "c1.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI file"))


def image_2d(root, dl):
    _save(root / "images" / "c1.nii.gz", _image((8, 8)))


def single_slice(root, dl):
    _save(root / "images" / "c1.nii.gz", _image((8, 8, 1)))


def image_4d(root, dl):
    _save(root / "images" / "c1.nii.gz", _image((8, 8, 4, 3)))


def shape_mismatch(root, dl):
    _save(root / "labels" / "c1.nii.gz", _label((8, 8, 5)))


def affine_mismatch(root, dl):
    affine = np.eye(4)
    affine[0, 3] = 0.5  # half a millimetre off
    _save(root / "labels" / "c1.nii.gz", _label(), affine)


def label_values(root, dl, case="c1"):
    lab = _label()
    lab[0, 0, 0] = 2
    _save(root / "labels" / f"{case}.nii.gz", lab)


def empty_label(root, dl):
    _save(root / "labels" / "c1.nii.gz", np.zeros(SHAPE, np.uint8))


def nan_image(root, dl):
    img = _image(dtype=np.float32)
    img[1, 1, 1] = np.nan
    img[2, 2, 2] = np.inf
    _save(root / "images" / "c1.nii.gz", img)


def small_image(root, dl):
    _save(root / "images" / "c1.nii.gz", _image((6, 8, 4)))
    _save(root / "labels" / "c1.nii.gz", _label((6, 8, 4)))


def missing_subgroup(root, dl):
    del _item(dl, "c1")["stage"]


def unknown_subgroup(root, dl):
    _item(dl, "c1")["stage"] = "T9"


def empty_training_subgroup(root, dl):
    _item(dl, "c3")["stage"] = "T1"  # no training case of T4 left


def escaping_path(root, dl):
    outside = root.parent / f"{root.name}_outside"
    _save(outside / "c1.nii.gz", _image())
    _item(dl, "c1")["image"] = f"../{outside.name}/c1.nii.gz"


def escaping_symlink(root, dl):
    outside = root.parent / f"{root.name}_outside"
    _save(outside / "c1.nii.gz", _image())
    os.remove(root / "images" / "c1.nii.gz")
    os.symlink(outside / "c1.nii.gz", root / "images" / "c1.nii.gz")


BAD_INPUTS = [
    # (mutation, check_datalist kwargs, code, severity, list, case, fragment of the file named in the report)
    (bad_json, {}, "invalid_json", "error", None, None, "datalist.json:3:"),
    (not_object, {}, "not_object", "error", None, None, "datalist.json"),
    (missing_list, {}, "missing_list", "error", "validation", None, "datalist.json"),
    (item_not_object, {}, "not_object", "error", "training", "#4", "datalist.json"),
    (missing_image, {}, "missing_image", "error", "training", "c1", "datalist.json"),
    (missing_label, {}, "missing_label", "error", "training", "c1", "datalist.json"),
    (duplicate_id, {}, "duplicate_id", "error", "testing", "c1", "datalist.json"),
    (missing_file, {}, "missing_file", "error", "training", "c1", "nowhere.nii.gz"),
    (zero_byte, {}, "empty_file", "error", "training", "c1", "labels/c1.nii.gz"),
    (truncated_gz, {}, "corrupt", "error", "training", "c1", "images/c1.nii.gz"),
    (not_nifti, {}, "unreadable", "error", "training", "c1", "images/c1.nii.gz"),
    (image_2d, {}, "not_3d", "error", "training", "c1", "images/c1.nii.gz"),
    (single_slice, {}, "not_3d", "error", "training", "c1", "images/c1.nii.gz"),
    (image_4d, {}, "not_3d", "error", "training", "c1", "images/c1.nii.gz"),
    (shape_mismatch, {}, "shape_mismatch", "error", "training", "c1", "labels/c1.nii.gz"),
    (affine_mismatch, {}, "affine_mismatch", "error", "training", "c1", "labels/c1.nii.gz"),
    (label_values, {}, "label_values", "error", "training", "c1", "labels/c1.nii.gz"),
    (empty_label, {}, "empty_label", "warning", "training", "c1", "labels/c1.nii.gz"),
    (nan_image, {}, "non_finite", "error", "training", "c1", "images/c1.nii.gz"),
    (small_image, {"patch_size": SHAPE}, "smaller_than_patch", "info", "training", "c1", "images/c1.nii.gz"),
    (missing_subgroup, {"subgroups": SUBGROUPS}, "missing_subgroup", "warning", "training", "c1", "datalist.json"),
    (unknown_subgroup, {"subgroups": SUBGROUPS}, "unknown_subgroup", "warning", "training", "c1", "datalist.json"),
    (empty_training_subgroup, {"subgroups": SUBGROUPS}, "empty_subgroup", "warning", "training", None, "datalist"),
    (escaping_path, {"strict_paths": True}, "path_escapes", "error", "training", "c1", "_outside/c1.nii.gz"),
    (escaping_symlink, {"strict_paths": True}, "path_escapes", "error", "training", "c1", "images/c1.nii.gz"),
]


@pytest.mark.parametrize(
    "mutate, kwargs, code, severity, list_key, case, fragment",
    BAD_INPUTS,
    ids=[row[0].__name__ for row in BAD_INPUTS],
)
def test_bad_input_is_reported(tmp_path, mutate, kwargs, code, severity, list_key, case, fragment):
    root = tmp_path / "cohort"
    datalist = make_cohort(root)
    mutate(root, datalist)
    if mutate not in (bad_json, not_object):
        write_datalist(root, datalist)
    problems = check_datalist(root / "datalist.json", **kwargs)
    found = [p for p in problems if p.code == code]
    assert found, f"no {code!r} problem in:\n{format_report(problems)}"
    p = found[0]
    assert (p.severity, p.list_key, p.case) == (severity, list_key, case)
    assert fragment in str(p)  # the report line names the file
    if severity == "error":  # the bad input is reported once, without knock-on errors
        assert [q for q in problems if q.is_error] == [p], format_report(problems)
    if case is not None:
        assert case in str(p)


def test_clean_cohort_has_no_problem(tmp_path):
    make_cohort(tmp_path)
    assert check_datalist(tmp_path / "datalist.json", subgroups=SUBGROUPS, patch_size=(8, 8, 4)) == []


def test_within_tolerance_and_relaxed_settings_pass(tmp_path):
    datalist = make_cohort(tmp_path)
    affine = np.eye(4)
    affine[0, 3] = 1e-4  # float noise of an export, below the 1e-3 mm tolerance
    _save(tmp_path / "labels" / "c1.nii.gz", _label(), affine)
    del _item(datalist, "t0")["label"]
    escaping_path(tmp_path, datalist)
    write_datalist(tmp_path, datalist)
    problems = check_datalist(tmp_path / "datalist.json", require_label=False, strict_paths=False)
    assert problems == []
    # but a testing item without a label is an error when labels are required (evaluation)
    codes = [p.code for p in check_datalist(tmp_path / "datalist.json")]
    assert codes == ["missing_label"]


def test_no_subgroup_attribute_at_all_is_one_warning_per_list(tmp_path):
    datalist = make_cohort(tmp_path)
    for item in datalist["training"]:
        del item["stage"]
    write_datalist(tmp_path, datalist)
    problems = check_datalist(tmp_path / "datalist.json")
    assert [(p.code, p.list_key, p.case) for p in problems] == [("missing_subgroup", "training", None)]


def test_all_problems_reported_at_once(tmp_path):
    datalist = make_cohort(tmp_path)
    missing_file(tmp_path, datalist)  # c1
    _item(datalist, "c2")["label"] = "labels/c2_multi.nii.gz"
    lab = _label()
    lab[0, 0, 0] = 3
    _save(tmp_path / "labels" / "c2_multi.nii.gz", lab)
    img = _image(dtype=np.float32)
    img[0, 0, 0] = np.nan
    _save(tmp_path / "images" / "v0.nii.gz", img)
    write_datalist(tmp_path, datalist)
    errors = [p for p in check_datalist(tmp_path / "datalist.json") if p.is_error]
    assert [(p.case, p.code) for p in errors] == [("c1", "missing_file"), ("c2", "label_values"), ("v0", "non_finite")]
    assert "[3]" in errors[1].message


def test_an_already_loaded_datalist_is_checked_too(tmp_path):
    datalist = make_cohort(tmp_path)
    label_values(tmp_path, datalist)
    problems = check_datalist(datalist, tmp_path, keys=["training"])
    assert [(p.code, p.case, p.file) for p in problems] == [
        ("label_values", "c1", str(tmp_path / "labels" / "c1.nii.gz"))
    ]


def test_invalid_arguments_raise(tmp_path):
    make_cohort(tmp_path)
    with pytest.raises(ValueError, match="patch_size"):
        check_datalist(tmp_path / "datalist.json", patch_size=(8,))  # (8, 8) is a 2D patch
    with pytest.raises(ValueError, match="keys"):
        check_datalist(tmp_path / "datalist.json", keys="training")
    with pytest.raises(ValueError, match="subgroups"):
        check_datalist(tmp_path / "datalist.json", subgroups="T1")


def test_missing_datalist_and_threads(tmp_path):
    problems = check_datalist(tmp_path / "nope.json")
    assert [p.code for p in problems] == ["no_datalist"]
    datalist = make_cohort(tmp_path)
    label_values(tmp_path, datalist)
    serial = check_datalist(tmp_path / "datalist.json")
    assert check_datalist(tmp_path / "datalist.json", num_workers=3) == serial


# ---- command line


def test_cli_exit_codes_and_report(tmp_path, capsys):
    datalist = make_cohort(tmp_path)
    assert main(["--datalist", str(tmp_path / "datalist.json"), "--subgroups", ",".join(SUBGROUPS)]) == 0
    assert "OK: 0 errors" in capsys.readouterr().out
    missing_file(tmp_path, datalist)  # c1
    label_values(tmp_path, datalist, "c2")
    _item(datalist, "c3")["stage"] = "T9"
    write_datalist(tmp_path, datalist)
    assert main(["--datalist", str(tmp_path / "datalist.json"), "--subgroups", ",".join(SUBGROUPS)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("ERROR") and " c1 " in line and "nowhere.nii.gz" in line for line in lines)
    assert any(line.startswith("ERROR") and " c2 " in line and "labels/c2.nii.gz" in line for line in lines)
    assert any(line.startswith("WARNING") and " c3 " in line and "T9" in line for line in lines)
    assert lines[-1].startswith("FAILED: 2 errors, 2 warnings")  # T4 now has no training case either


def test_cli_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        main(["--datalist", str(tmp_path / "d.json"), "--patch-size", "0", "8", "8"])
    assert excinfo.value.code == 2
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2


def test_script_runs_from_repo_root_on_synthetic_cohort(tmp_path):
    synthetic.generate_cohort(tmp_path / "syn", n_cases=4, seed=0, shape=(16, 16, 16))
    cmd = [sys.executable, "bundle/scripts/check_data.py", "--datalist", str(tmp_path / "syn" / "datalist.json")]
    good = subprocess.run([*cmd, "--subgroups", "T1,T2,T3,T4", "-q"], cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    (tmp_path / "syn" / "labels" / "case_000.nii.gz").write_bytes(b"")
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "case_000" in bad.stdout and "empty (0 bytes)" in bad.stdout


# ---- config hook


def test_cohort_check_raises_listing_every_error(tmp_path, caplog):
    datalist = make_cohort(tmp_path)
    missing_file(tmp_path, datalist)  # c1
    _save(tmp_path / "labels" / "c2.nii.gz", _label((8, 8, 5)))  # c2: label on another grid
    _item(datalist, "v0")["stage"] = "T9"
    write_datalist(tmp_path, datalist)
    check = CohortCheck(tmp_path / "datalist.json", tmp_path, "stage", SUBGROUPS, (8, 8, 4))
    with pytest.raises(ValueError) as excinfo:
        check()
    text = str(excinfo.value)
    assert "2 error(s)" in text and " c1 " in text and " c2 " in text and "nowhere.nii.gz" in text
    assert any("T9" in r.getMessage() for r in caplog.records)  # the warning is logged, not raised


def test_cohort_check_from_a_bundle_config(tmp_path):
    from monai.bundle import ConfigParser

    make_cohort(tmp_path)
    config = {
        "dataset_dir": str(tmp_path),
        "datalist": "$@dataset_dir + '/datalist.json'",
        "subgroups": SUBGROUPS,
        "cohort_check": {
            "_target_": "scripts.check_data.CohortCheck",
            "datalist": "@datalist",
            "dataset_dir": "@dataset_dir",
            "subgroup_key": "stage",
            "subgroups": "@subgroups",
            "patch_size": [8, 8, 4],
        },
        "initialize": ["$@cohort_check.run()"],
    }
    parser = ConfigParser(config)
    assert parser.get_parsed_content("initialize") == [[]]
    zero_byte(tmp_path, None)
    with pytest.raises(RuntimeError) as excinfo:  # MONAI wraps what an expression raises
        ConfigParser(config).get_parsed_content("initialize")
    assert isinstance(excinfo.value.__cause__, ValueError) and " c1 " in str(excinfo.value.__cause__)


def test_problem_line_format():
    p = Problem("warning", "something odd", "training", "c7", "/d/images/c7.nii.gz", "image", "x")
    assert str(p).split() == ["WARNING", "training", "c7", "/d/images/c7.nii.gz:", "something", "odd"]
    assert not p.is_error
