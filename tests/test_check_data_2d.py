"""Cohort validation of 2D cohorts (PNG, JPEG, NPZ, 2D NIfTI) and of multi-class labels (``num_classes``)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scripts.check_data import CohortCheck, check_datalist, format_report, main

SUBGROUPS = ["T1", "T2", "T3", "T4"]
CASES = [("training", f"c{i}", s) for i, s in enumerate(SUBGROUPS)]
CASES += [("validation", "v0", "T1"), ("testing", "t0", "T2")]
SUFFIX = {"png": ".png", "jpeg": ".jpg", "npz": ".npz", "nifti": ".nii.gz"}


def _write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Save ``array`` in the format its file name says (PNG/JPEG: grey for (H, W), RGB for (H, W, 3))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith(".npz"):
        np.savez(path, array)
    elif name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    else:
        Image.fromarray(array).save(path, **({"quality": 95} if name.endswith(".jpg") else {}))


def _grey(shape=(16, 16)) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 200).astype(np.uint8)


def _rgb(shape=(16, 16)) -> np.ndarray:
    grey = _grey(shape)
    return np.stack([grey, grey[::-1], 255 - grey], axis=-1)


def _mask(num_classes: int = 2, shape=(16, 16)) -> np.ndarray:
    """A 6x6 square of class 1 (36 pixels) holding a 2x2 square of class 2 when ``num_classes`` is 3."""
    lab = np.zeros(shape, np.uint8)
    lab[4:10, 4:10] = 1
    if num_classes > 2:
        lab[6:8, 6:8] = 2
    return lab


def make_cohort(root: Path, image_fmt="png", label_fmt="png", num_classes=2) -> dict:
    """Six 16x16 cases (training c0..c3, validation v0, testing t0): images grey (RGB for JPEG), labels 0..C-1."""
    datalist = {"training": [], "validation": [], "testing": []}
    for list_key, case, stage in CASES:
        image = f"images/{case}{SUFFIX[image_fmt]}"
        label = f"labels/{case}{SUFFIX[label_fmt]}"
        _write(root / image, _rgb() if image_fmt == "jpeg" else _grey())
        _write(root / label, _mask(num_classes))
        datalist[list_key].append({"id": case, "image": image, "label": label, "stage": stage})
    write_datalist(root, datalist)
    return datalist


def write_datalist(root: Path, datalist: dict) -> Path:
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


def _item(datalist, case):
    return next(it for items in datalist.values() for it in items if it["id"] == case)


def _check(root: Path, **kwargs):
    return check_datalist(root / "datalist.json", subgroups=SUBGROUPS, **kwargs)


# ---- good cohorts


@pytest.mark.parametrize(
    "image_fmt, label_fmt",
    [("png", "png"), ("jpeg", "png"), ("npz", "npz"), ("nifti", "nifti"), ("png", "npz"), ("nifti", "png")],
)
def test_good_2d_cohort_has_no_problem(tmp_path, image_fmt, label_fmt):
    make_cohort(tmp_path, image_fmt, label_fmt)
    assert _check(tmp_path, patch_size=(16, 16)) == []
    assert _check(tmp_path) == []  # 2D inferred from the files


def test_good_three_class_cohort(tmp_path):
    make_cohort(tmp_path, num_classes=3)
    assert _check(tmp_path, patch_size=(16, 16), num_classes=3) == []


def test_npz_with_image_and_label_keys_and_rgb_npz(tmp_path):
    datalist = make_cohort(tmp_path, "npz", "npz")
    np.savez(tmp_path / "both.npz", image=_rgb(), label=_mask())  # one file, read by key per role
    _item(datalist, "c1").update(image="both.npz", label="both.npz")
    for case in ("c0", "c2", "c3", "v0", "t0"):  # all images RGB (H, W, 3): no mixed-channel warning
        _write(tmp_path / "images" / f"{case}.npz", _rgb())
    write_datalist(tmp_path, datalist)
    assert _check(tmp_path, patch_size=(16, 16)) == []


# ---- bad inputs, one per row: each takes (root, datalist) and breaks case c1


def size_mismatch(root, dl):
    _write(root / "labels" / "c1.png", _mask(shape=(15, 16)))  # PIL size (16, 15): 16 wide, 15 high


def transposed_npz_label(root, dl):
    _write(root / "images" / "c1.png", _grey((12, 16)))  # read as (W, H) = (16, 12)
    _write(root / "labels" / "c1.npz", _mask(shape=(12, 16)))  # read as stored: (12, 16)
    _item(dl, "c1")["label"] = "labels/c1.npz"


def values_outside_classes(root, dl):
    lab = _mask(3)
    lab[0, 0:3] = 5
    lab[1, 0] = 7
    _write(root / "labels" / "c1.png", lab)


def mask_0_255(root, dl):
    _write(root / "labels" / "c1.png", _mask() * 255)


def jpeg_label(root, dl):
    _write(root / "labels" / "c1.jpg", _mask() * 255)
    _item(dl, "c1")["label"] = "labels/c1.jpg"


def volume_in_2d_cohort(root, dl):
    _write(root / "images" / "c1.nii.gz", np.zeros((16, 16, 4), np.int16))
    _item(dl, "c1")["image"] = "images/c1.nii.gz"


def single_slice_nifti(root, dl):
    _write(root / "labels" / "c1.nii.gz", _mask()[..., None])
    _item(dl, "c1")["label"] = "labels/c1.nii.gz"


def unreadable_png(root, dl):
    (root / "images" / "c1.png").write_bytes(b"this is not a PNG file")


def truncated_png(root, dl):
    path = root / "images" / "c1.png"
    _write(path, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    _write(root / "labels" / "c1.png", _mask(shape=(64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rgb_label(root, dl):
    _write(root / "labels" / "c1.png", np.repeat(_mask()[..., None], 3, axis=-1))


def npz_two_arrays(root, dl):
    np.savez(root / "images" / "c1.npz", a=_grey(), b=_grey())
    _item(dl, "c1")["image"] = "images/c1.npz"


def nan_npz_image(root, dl):
    img = _grey().astype(np.float32)
    img[0, 0], img[1, 1], img[2, 2] = np.nan, np.nan, np.inf
    np.savez(root / "images" / "c1.npz", img)
    _item(dl, "c1")["image"] = "images/c1.npz"


def single_row(root, dl):
    _write(root / "images" / "c1.png", _grey((1, 16)))


BAD_INPUTS = [
    # (mutation, check_datalist kwargs, code, file named, fragments of the message)
    (size_mismatch, {}, "shape_mismatch", "labels/c1.png", ["16x16 pixels", "is 16x15"]),
    (transposed_npz_label, {}, "shape_mismatch", "labels/c1.npz", ["16x12 pixels", "is 12x16", "transposed"]),
    (
        values_outside_classes,
        {"num_classes": 3},
        "label_values",
        "labels/c1.png",
        ["outside 0..2 (num_classes 3)", "5 (3 pixel(s)), 7 (1 pixel(s)), 4 pixel(s) in all"],
    ),
    (mask_0_255, {}, "label_values", "labels/c1.png", ["0/255 mask", "36 pixel(s) of 255", "label // 255"]),
    (mask_0_255, {"num_classes": 2}, "label_values", "labels/c1.png", ["0/255 mask"]),
    (jpeg_label, {}, "label_values", "labels/c1.jpg", ["other than 0 and 1", "save labels as PNG"]),
    (volume_in_2d_cohort, {}, "not_2d", "images/c1.nii.gz", ["(16, 16, 4)", "cohort is 2D (5 of 6 images are 2D)"]),
    (volume_in_2d_cohort, {"patch_size": (16, 16)}, "not_2d", "images/c1.nii.gz", ["2D (patch_size 16x16)"]),
    (single_slice_nifti, {}, "not_2d", "labels/c1.nii.gz", ["(16, 16, 1)", "saved as (H, W)"]),
    (unreadable_png, {}, "unreadable", "images/c1.png", ["cannot read image 'images/c1.png' as PNG"]),
    (truncated_png, {}, "corrupt", "images/c1.png", ["truncated or corrupt", "PNG data"]),
    (rgb_label, {}, "label_channels", "labels/c1.png", ["3 channels (mode RGB)", "one channel"]),
    (npz_two_arrays, {}, "unreadable", "images/c1.npz", ["arrays ['a', 'b']", "'image' and 'label'"]),
    (nan_npz_image, {}, "non_finite", "images/c1.npz", ["2 NaN and 1 infinite pixels"]),
    (single_row, {}, "not_2d", "images/c1.png", ["size 16x1", "single row or column"]),
]


@pytest.mark.parametrize(
    "mutate, kwargs, code, fragment, message_parts",
    BAD_INPUTS,
    ids=[f"{row[0].__name__}-{i}" for i, row in enumerate(BAD_INPUTS)],
)
def test_bad_2d_input_is_one_error_naming_the_file(tmp_path, mutate, kwargs, code, fragment, message_parts):
    datalist = make_cohort(tmp_path)
    mutate(tmp_path, datalist)
    write_datalist(tmp_path, datalist)
    problems = _check(tmp_path, **kwargs)
    errors = [p for p in problems if p.is_error]
    assert [(p.code, p.list_key, p.case) for p in errors] == [(code, "training", "c1")], format_report(problems)
    assert errors[0].file.endswith(fragment) and fragment in str(errors[0])
    for part in message_parts:
        assert part in errors[0].message


def test_png_in_a_3d_cohort_is_an_error(tmp_path):
    datalist = make_cohort(tmp_path, "nifti", "nifti")
    for _list_key, case, _stage in CASES:
        _write(tmp_path / "images" / f"{case}.nii.gz", np.zeros((16, 16, 4), np.int16))
        _write(tmp_path / "labels" / f"{case}.nii.gz", np.ones((16, 16, 4), np.uint8))
    _write(tmp_path / "images" / "c1.png", _grey())
    _item(datalist, "c1")["image"] = "images/c1.png"
    write_datalist(tmp_path, datalist)
    for kwargs in ({}, {"patch_size": (16, 16, 4)}):
        errors = [p for p in _check(tmp_path, **kwargs) if p.is_error]
        assert [(p.code, p.case) for p in errors] == [("not_3d", "c1")]
        assert "has shape (16, 16): a 2D image" in errors[0].message and errors[0].file.endswith("images/c1.png")


def test_patch_size_decides_the_dimension_and_a_tie_is_3d(tmp_path):
    datalist = make_cohort(tmp_path)
    for case in ("c0", "c1", "c2"):  # 3 of 6 images 3D: a tie
        _write(tmp_path / "images" / f"{case}.nii.gz", np.zeros((16, 16, 4), np.int16))
        _item(datalist, case)["image"] = f"images/{case}.nii.gz"
    write_datalist(tmp_path, datalist)
    not_3d = [(p.case, p.key) for p in _check(tmp_path) if p.code == "not_3d"]
    assert not_3d[:3] == [("c0", "label"), ("c1", "label"), ("c2", "label")]  # PNG files in a cohort taken as 3D
    assert not_3d[3:] == [(case, role) for case in ("c3", "v0", "t0") for role in ("image", "label")]
    not_2d = [p.case for p in _check(tmp_path, patch_size=(16, 16)) if p.code == "not_2d"]
    assert not_2d == ["c0", "c1", "c2"]


def test_2d_nifti_affine_mismatch(tmp_path):
    make_cohort(tmp_path, "nifti", "nifti")
    affine = np.eye(4)
    affine[1, 3] = 0.5  # half a millimetre off in plane
    _write(tmp_path / "labels" / "c1.nii.gz", _mask(), affine)
    affine_z = np.eye(4)
    affine_z[2, 3] = 7.0  # out of plane: not part of a 2D image's grid
    _write(tmp_path / "labels" / "c2.nii.gz", _mask(), affine_z)
    problems = _check(tmp_path)
    assert [(p.code, p.case) for p in problems] == [("affine_mismatch", "c1")]
    assert "0.5 mm apart" in problems[0].message


def test_binary_default_rejects_three_class_labels(tmp_path):
    make_cohort(tmp_path, num_classes=3)
    errors = [p for p in _check(tmp_path) if p.is_error]
    assert [p.code for p in errors] == ["label_values"] * 6
    assert "values other than 0 and 1: [2] in 4 pixel(s)" in errors[0].message
    assert errors[0].message.endswith("or pass num_classes (--num-classes) for a multi-class label")


def test_class_missing_from_the_whole_cohort_is_a_warning(tmp_path):
    make_cohort(tmp_path, num_classes=2)
    problems = _check(tmp_path, num_classes=4)
    assert [(p.severity, p.code, p.case) for p in problems] == [("warning", "missing_class", None)] * 2
    assert "class 2 (of num_classes 4) appears in none of the 6 labels" in problems[0].message
    assert problems[1].message.startswith("class 3 ")


def test_empty_label_and_smaller_than_patch_in_2d(tmp_path):
    make_cohort(tmp_path, num_classes=3)
    _write(tmp_path / "labels" / "c1.png", np.zeros((16, 16), np.uint8))
    problems = _check(tmp_path, num_classes=3, patch_size=(32, 16))
    found = [p for p in problems if p.case in ("c1", "c2")]
    assert [(p.severity, p.code, p.case) for p in found] == [
        ("info", "smaller_than_patch", "c1"),
        ("warning", "empty_label", "c1"),
        ("info", "smaller_than_patch", "c2"),
    ]
    assert "(16x16 pixels) is smaller than the patch 32x16" in found[0].message
    assert "every pixel is 0" in found[1].message


def test_mixed_channels_and_palette_images_are_warnings(tmp_path):
    datalist = make_cohort(tmp_path)
    _write(tmp_path / "images" / "c1.jpg", _rgb())
    _item(datalist, "c1")["image"] = "images/c1.jpg"
    Image.fromarray(_grey()).convert("P").save(tmp_path / "images" / "c2.png")
    write_datalist(tmp_path, datalist)
    problems = _check(tmp_path)
    assert [(p.severity, p.code, p.case) for p in problems] == [
        ("warning", "mixed_channels", "c1"),
        ("warning", "palette_image", "c2"),
    ]
    assert "has 3 channel(s) but most images have 1" in problems[0].message


def test_palette_label_holds_class_indices(tmp_path):
    make_cohort(tmp_path, num_classes=3)
    Image.fromarray(_mask(3)).convert("P").save(tmp_path / "labels" / "c1.png")  # indices 0, 1, 2
    assert _check(tmp_path, num_classes=3) == []


def test_invalid_num_classes_raise(tmp_path):
    make_cohort(tmp_path)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            _check(tmp_path, num_classes=bad)


# ---- command line and config hook


def test_cli_exit_codes_and_num_classes(tmp_path, capsys):
    make_cohort(tmp_path, num_classes=3)
    args = ["--datalist", str(tmp_path / "datalist.json"), "--subgroups", ",".join(SUBGROUPS)]
    assert main([*args, "--num-classes", "3", "--patch-size", "16", "16"]) == 0
    assert "OK: 0 errors, 0 warnings, 0 infos" in capsys.readouterr().out
    assert main(args) == 1  # binary by default: class 2 is a bad value
    out = capsys.readouterr().out
    assert "FAILED: 6 errors" in out and "labels/c1.png" in out
    for bad in (["--patch-size", "16"], ["--patch-size", "16", "0"], ["--num-classes", "1"]):
        with pytest.raises(SystemExit) as excinfo:
            main([*args, *bad])
        assert excinfo.value.code == 2


def test_cohort_check_with_a_2d_patch_and_num_classes(tmp_path, caplog):
    datalist = make_cohort(tmp_path, num_classes=3)
    check = CohortCheck(tmp_path / "datalist.json", tmp_path, "stage", SUBGROUPS, patch_size=[64, 64], num_classes=3)
    problems = check.run()
    assert [p.code for p in problems] == ["smaller_than_patch"] * 5  # training and validation: infos only
    rgb_label(tmp_path, datalist)
    with pytest.raises(ValueError, match=r"1 error\(s\)") as excinfo:
        check.run()
    assert " c1 " in str(excinfo.value) and "labels/c1.png" in str(excinfo.value)


def test_cohort_check_from_a_2d_bundle_config(tmp_path):
    from monai.bundle import ConfigParser

    make_cohort(tmp_path, "npz", "npz", num_classes=3)
    config = {
        "dataset_dir": str(tmp_path),
        "patch_size": [64, 64],
        "out_channels": 3,
        "cohort_check": {
            "_target_": "scripts.check_data.CohortCheck",
            "datalist": "$@dataset_dir + '/datalist.json'",
            "dataset_dir": "@dataset_dir",
            "subgroups": SUBGROUPS,
            "patch_size": "@patch_size",
        },
        "initialize": ["$@cohort_check.run()"],
    }
    parser = ConfigParser(config)
    parser.update({"cohort_check#num_classes": "@out_channels"})  # as the 2D profile sets it
    [problems] = parser.get_parsed_content("initialize")
    assert [p.code for p in problems] == ["smaller_than_patch"] * 5
