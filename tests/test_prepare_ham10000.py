"""prepare_ham10000: JPEGs in two folders, metadata CSV and 0/255 masks -> 0/1 label PNGs and a datalist split by
lesion, stratified by age group; every bad input refused with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from fixtures_2d import (
    HAM_PROBLEMS,
    UNLISTED_IMAGE,
    break_ham10000,
    ham_id,
    items_by_id,
    tree_digest,
    write_ham10000,
)
from PIL import Image
from scripts.prepare_ham10000 import main

SCRIPT = Path(__file__).resolve().parents[1] / "bundle" / "scripts" / "prepare_ham10000.py"
SPLITS = ("training", "validation", "testing")
PROBLEM_WORDS = {
    "missing_key": "missing key (column) 'sex'",
    "unknown_code": "unknown sex code 'x'",
    "mask_size": "mask size 32x25 differs from image 32x24",
    "mask_values": "128 (5 pixels)",
    "listed_twice": "listed twice",
    "row_without_image": "no image",
    "image_found_twice": "listed twice",
}


def _run(data: Path, out: Path, *extra: str) -> int:
    return main(["--data-dir", str(data), "--out", str(out), *extra])


def _lesions(datalist: dict, split: str, group: str) -> int:
    return len({it["lesion_id"] for it in datalist[split] if it["age_group"] == group})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ham")
    data = write_ham10000(root / "data")
    out = root / "out" / "datalist.json"
    assert _run(data, out) == 0
    return data, out, json.loads(out.read_text())


def test_items_keys_and_values(prepared):
    data, out, datalist = prepared
    assert (datalist["name"], datalist["routing_key"], datalist["seed"]) == ("HAM10000", "age_group", 0)
    assert datalist["class_names"] == ["background", "lesion"]
    assert datalist["age_bins"] == ["0-30", "30-60", "60+"]
    items = items_by_id(datalist)
    # 32 lesions, those with j % 4 == 0 (8 of them) have two images: 40 images; the unlisted one is skipped
    assert len(items) == 40 and UNLISTED_IMAGE not in items
    keys = {"id", "image", "label", "lesion_id", "sex", "age", "age_group", "dx", "localization"}
    assert all(set(it) == keys for it in items.values())
    # image 0: lesion 0, age 5; image 1: lesion 0, age 29; image 2: lesion 1, age 30; image 3: lesion 2, age 85
    first = items[ham_id(0)]
    assert first["image"] == str((data / "HAM10000_images_part1" / f"{ham_id(0)}.jpg").resolve())
    assert first["label"] == f"labels/{ham_id(0)}.png"
    assert [first[k] for k in ("lesion_id", "sex", "age", "age_group", "dx")] == [
        "HAM_0000000",
        "male",
        "5",
        "0-30",
        "nv",
    ]
    assert [items[ham_id(k)]["age_group"] for k in (1, 2, 3)] == ["0-30", "30-60", "60+"]
    assert [items[ham_id(k)]["sex"] for k in (1, 2)] == ["female", "unknown"]
    assert items[ham_id(3)]["localization"] == "back" and items[ham_id(2)]["localization"] == "lower extremity"
    # image 5 is lesion 4 (age 59, group 30-60); the last two lesions (30, 31) have no age
    assert (items[ham_id(5)]["age"], items[ham_id(5)]["age_group"]) == ("59", "30-60")
    assert (items[ham_id(39)]["age"], items[ham_id(39)]["age_group"]) == ("unknown", "unknown")
    assert items[ham_id(39)]["lesion_id"] == "HAM_0000031"


def test_labels_are_lesion_one_background_zero(prepared):
    data, out, datalist = prepared
    item = items_by_id(datalist)[ham_id(5)]
    label = np.asarray(Image.open(out.parent / item["label"]))
    mask = np.asarray(Image.open(data / "HAM10000_segmentations_lesion_tsao" / f"{ham_id(5)}_segmentation.png"))
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) == {0, 1}
    np.testing.assert_array_equal(label == 1, mask == 255)


def test_split_by_lesion_stratified_by_age_group(prepared):
    _, _, datalist = prepared
    split_of = defaultdict(set)
    for name in SPLITS:
        for item in datalist[name]:
            split_of[item["lesion_id"]].add(name)
    assert len(split_of) == 32 and all(len(names) == 1 for names in split_of.values())
    # 10 lesions per age group: 6/1/3; the 2 lesions without age: 1.2/0.2/0.6 -> 1/0/1
    for group in ("0-30", "30-60", "60+"):
        assert [_lesions(datalist, n, group) for n in SPLITS] == [6, 1, 3]
    assert [_lesions(datalist, n, "unknown") for n in SPLITS] == [1, 0, 1]


def test_counts_and_skipped_image_printed(tmp_path, capsys):
    data = write_ham10000(tmp_path / "data", n_lesions=12)
    assert _run(data, tmp_path / "datalist.json") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "skipped 1 image(s) that HAM10000_metadata.csv does not name" in lines
    # 4 lesions per age group: 2.4/0.4/1.2 -> 3/0/1; lesions 0, 3, 6, 9 (group 0-30) have 2, 1, 1, 1 images
    assert any(line.split()[:1] == ["age_group"] for line in lines)
    row = next(line.split() for line in lines if line.split()[:1] == ["0-30"])
    assert (row[2], row[4]) == ("0", "5")


def test_split_deterministic_by_seed_and_age_bins_option(tmp_path):
    data = write_ham10000(tmp_path / "data")
    runs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "5"]), ("d", ["--age-bins", "50"])):
        assert _run(data, tmp_path / name / "datalist.json", *extra) == 0
        runs[name] = json.loads((tmp_path / name / "datalist.json").read_text())
    ids = {k: [[it["id"] for it in dl[n]] for n in SPLITS] for k, dl in runs.items()}
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    assert runs["d"]["age_bins"] == ["0-50", "50+"]
    items = items_by_id(runs["d"])
    assert [items[ham_id(k)]["age_group"] for k in (1, 2, 3, 5)] == ["0-50", "0-50", "50+", "50+"]


@pytest.mark.parametrize("problem", HAM_PROBLEMS)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, problem):
    data = write_ham10000(tmp_path / "data", n_lesions=6)
    named = break_ham10000(data, problem)
    before = tree_digest(data)
    out = tmp_path / "out" / "datalist.json"
    assert _run(data, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert named in err and PROBLEM_WORDS[problem] in err
    assert not (tmp_path / "out").exists()
    assert tree_digest(data) == before


def test_bad_age_and_bins_refused(tmp_path, capsys):
    data = write_ham10000(tmp_path / "data", n_lesions=3)
    out = tmp_path / "out" / "datalist.json"
    assert _run(data, out, "--age-bins", "60", "30") == 2
    assert "--age-bins" in capsys.readouterr().err
    csv_path = data / "HAM10000_metadata.csv"
    csv_path.write_text(csv_path.read_text().replace(",5.0,", ",old,", 1))
    assert _run(data, out) == 2
    assert "HAM10000_metadata.csv line 2: age 'old' is not a number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_out_refused_unless_overwrite(tmp_path, capsys):
    data = write_ham10000(tmp_path / "data", n_lesions=3)
    out = tmp_path / "datalist.json"
    assert _run(data, out) == 0
    assert _run(data, out) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert _run(data, out, "--overwrite") == 0
    before = tree_digest(data)
    assert _run(data, data / "HAM10000_images_part1" / "datalist.json", "--overwrite") == 2
    assert "inside the data folder" in capsys.readouterr().err and tree_digest(data) == before


def test_image_and_label_load_with_monai(prepared):
    from monai.transforms import LoadImage

    _, out, datalist = prepared
    item = datalist["testing"][0]
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    image, label = loader(item["image"]), loader(str(out.parent / item["label"]))
    assert image.shape[0] == 3 and label.shape[0] == 1
    assert image.shape[1:] == label.shape[1:] and sorted(image.shape[1:]) == [24, 32]


def test_command_line(tmp_path):
    data = write_ham10000(tmp_path / "data", n_lesions=3)
    out = tmp_path / "datalist.json"
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(data), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "age_group" in result.stdout and out.is_file()
