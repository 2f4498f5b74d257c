"""prepare_fairseg: both .npz layouts -> 8-bit PNGs and a stratified datalist; each bad input refused, none written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_2d import (
    FAIRSEG_PROBLEMS,
    MISSING_KEY_CASE,
    break_fairseg,
    fairseg_id,
    in_test_list,
    items_by_id,
    rewrite_npz,
    tree_digest,
    write_fairseg,
)
from PIL import Image
from scripts.prepare_fairseg import main

SCRIPT = Path(__file__).resolve().parents[1] / "bundle" / "scripts" / "prepare_fairseg.py"
RACES = ("Asian", "Black", "White")
#: what each bad input's error line says besides the file
PROBLEM_WORDS = {
    "neither_layout": "fits neither layout",
    "missing_key": "missing key",
    "unknown_code": "unknown race code 5",
    "mask_size": "has size (30, 40)",
    "mask_values": "3 (3 pixels)",
    "listed_twice": "listed twice",
}


def _run(data: Path, out: Path, *extra: str) -> int:
    return main(["--data-dir", str(data), "--out", str(out), *extra])


def _per_race(datalist: dict, split: str) -> list[int]:
    return [sum(it["race"] == race for it in datalist[split]) for race in RACES]


def test_readme_layout_items_labels_and_split(tmp_path, capsys):
    data = write_fairseg(tmp_path / "data", "readme", n=30)
    out = tmp_path / "out" / "datalist.json"
    assert _run(data, out) == 0
    datalist = json.loads(out.read_text())
    assert (datalist["name"], datalist["routing_key"], datalist["seed"]) == ("Harvard-FairSeg", "race", 0)
    assert datalist["class_names"] == ["background", "rim", "cup"]
    assert datalist["source"] == str(data.resolve())
    # 10 cases per race, 60/10/30 of 10 = 6/1/3 in every race
    assert [len(datalist[n]) for n in ("training", "validation", "testing")] == [18, 3, 9]
    assert _per_race(datalist, "training") == [6, 6, 6]
    assert _per_race(datalist, "validation") == [1, 1, 1]
    assert _per_race(datalist, "testing") == [3, 3, 3]
    items = items_by_id(datalist)
    assert sorted(items) == [fairseg_id(i) for i in range(30)]
    keys = {"id", "image", "label", "gender", "race", "ethnicity", "language", "maritalstatus", "age"}
    assert all(set(it) == keys for it in items.values())
    # case 7: race 1, gender 1, ethnicity -1, language 2, marital 0, age 47
    assert {k: v for k, v in items[fairseg_id(7)].items() if k not in ("id", "image", "label")} == {
        "race": "Black", "gender": "Male", "ethnicity": "unknown", "language": "Others",
        "maritalstatus": "Married or Partnered", "age": "47",
    }  # fmt: skip
    # case 11: race 2, gender 1, ethnicity -1, language -1, marital 4; case 0: marital -1; case 4 lacks the key
    assert [items[fairseg_id(11)][k] for k in ("race", "language", "maritalstatus")] == [
        "White", "unknown", "Legally Separated",
    ]  # fmt: skip
    assert items[fairseg_id(0)]["maritalstatus"] == "unknown"
    assert items[fairseg_id(MISSING_KEY_CASE)]["maritalstatus"] == "unknown"
    assert items[fairseg_id(6)]["maritalstatus"] == "unknown" and items[fairseg_id(3)]["maritalstatus"] == "Divorced"
    printed = capsys.readouterr().out
    assert any(line.split() == ["Asian", "6", "1", "3", "10"] for line in printed.splitlines())


def test_readme_layout_pngs_hold_image_and_rim_cup_labels(tmp_path):
    data = write_fairseg(tmp_path / "data", "readme", n=6)
    out = tmp_path / "datalist.json"
    assert _run(data, out) == 0
    item = items_by_id(json.loads(out.read_text()))[fairseg_id(2)]
    assert (item["image"], item["label"]) == (f"images/{fairseg_id(2)}.png", f"labels/{fairseg_id(2)}.png")
    with np.load(data / f"{fairseg_id(2)}.npz") as source:
        image, mask = source["slo_fundus"], source["disc_cup_mask"]
    label = np.asarray(Image.open(tmp_path / item["label"]))
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(label == 1, mask == -1)
    np.testing.assert_array_equal(label == 2, mask == -2)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / item["image"])), image)


def test_training_layout_lists_honoured_with_ten_percent_validation(tmp_path):
    data = write_fairseg(tmp_path / "data", "training", n=30)
    out = tmp_path / "out" / "datalist.json"
    assert _run(data, out) == 0
    datalist = json.loads(out.read_text())
    tested = {fairseg_id(i) for i in range(30) if in_test_list(i)}
    assert {it["id"] for it in datalist["testing"]} == tested and len(tested) == 12
    # 6 training cases per race: 10 % of 6 is 0.6, rounded to 1 per race
    assert _per_race(datalist, "training") == [5, 5, 5]
    assert _per_race(datalist, "validation") == [1, 1, 1]
    assert not tested & {it["id"] for n in ("training", "validation") for it in datalist[n]}
    items = items_by_id(datalist)
    # case 5: race code 7 (White), hispanic code 1, age 45 * 365 days; case 10: race code 3, hispanic 0
    assert [items[fairseg_id(5)][k] for k in ("race", "ethnicity", "age")] == ["White", "Hispanic", "45"]
    assert [items[fairseg_id(10)][k] for k in ("race", "ethnicity", "age")] == ["Black", "Non-Hispanic", "50"]
    assert datalist["coding"] == ["training"]


def test_training_layout_float_image_scaled_min_max(tmp_path):
    data = write_fairseg(tmp_path / "data", "training", n=3)
    out = tmp_path / "datalist.json"
    assert _run(data, out) == 0
    with np.load(data / f"{fairseg_id(0)}.npz") as source:
        image = source["fundus_slo"]
    expected = np.round((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)
    written = np.asarray(Image.open(tmp_path / "images" / f"{fairseg_id(0)}.png"))
    np.testing.assert_array_equal(written, expected)
    assert (written.min(), written.max()) == (0, 255)


def test_split_is_deterministic_by_seed(tmp_path):
    data = write_fairseg(tmp_path / "data", "readme", n=30)
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert _run(data, tmp_path / name / "datalist.json", "--seed", seed) == 0
        datalist = json.loads((tmp_path / name / "datalist.json").read_text())
        runs[name] = [[it["id"] for it in datalist[n]] for n in ("training", "validation", "testing")]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_coding_option_overrides_the_layout(tmp_path, capsys):
    data = write_fairseg(tmp_path / "data", "readme", n=6)
    for i in range(6):
        rewrite_npz(data / f"{fairseg_id(i)}.npz", race=np.array((2, 3, 7)[i % 3]))
    assert _run(data, tmp_path / "a" / "datalist.json") == 2
    assert "unknown race code 3" in capsys.readouterr().err
    assert _run(data, tmp_path / "b" / "datalist.json", "--coding", "training") == 0
    items = items_by_id(json.loads((tmp_path / "b" / "datalist.json").read_text()))
    assert [items[fairseg_id(i)]["race"] for i in range(3)] == ["Asian", "Black", "White"]


@pytest.mark.parametrize("layout", ["readme", "training"])
@pytest.mark.parametrize("problem", FAIRSEG_PROBLEMS)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, layout, problem):
    data = write_fairseg(tmp_path / "data", layout, n=9)
    named = break_fairseg(data, problem, layout)
    before = tree_digest(data)
    out = tmp_path / "out" / "datalist.json"
    assert _run(data, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert named in err and PROBLEM_WORDS[problem] in err
    assert not (tmp_path / "out").exists()
    assert tree_digest(data) == before


def test_one_list_alone_refused(tmp_path, capsys):
    data = write_fairseg(tmp_path / "data", "training", n=6)
    (data / "test.txt").unlink()
    assert _run(data, tmp_path / "out" / "datalist.json") == 2
    assert "test.txt: missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_out_refused_unless_overwrite_and_never_inside_data(tmp_path, capsys):
    data = write_fairseg(tmp_path / "data", "readme", n=3)
    out = tmp_path / "datalist.json"
    assert _run(data, out) == 0
    first = out.read_bytes()
    assert _run(data, out, "--seed", "3") == 2
    assert "datalist.json: exists" in capsys.readouterr().err and out.read_bytes() == first
    assert _run(data, out, "--seed", "3", "--overwrite") == 0
    assert json.loads(out.read_text())["seed"] == 3
    before = tree_digest(data)
    assert _run(data, data / "datalist.json", "--overwrite") == 2
    assert "inside the data folder" in capsys.readouterr().err and tree_digest(data) == before


def test_pngs_load_with_monai(tmp_path):
    from monai.transforms import LoadImage

    data = write_fairseg(tmp_path / "data", "readme", n=3, shape=(32, 40))
    out = tmp_path / "datalist.json"
    assert _run(data, out) == 0
    item = items_by_id(json.loads(out.read_text()))[fairseg_id(0)]
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    image, label = loader(str(tmp_path / item["image"])), loader(str(tmp_path / item["label"]))
    assert image.shape[0] == 1 and image.shape == label.shape and sorted(image.shape[1:]) == [32, 40]
    assert set(np.unique(np.asarray(label)).tolist()) == {0, 1, 2}


def test_command_line(tmp_path):
    data = write_fairseg(tmp_path / "data", "readme", n=3)
    out = tmp_path / "datalist.json"
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(data), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "race" in result.stdout and out.is_file()
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_apportion_largest_remainder_with_float_ties():
    from scripts.split_2d import apportion

    # 4 x (0.6, 0.1, 0.3) = 2.4/0.4/1.2: one unit left, training and validation tie at 0.4 -> training
    assert apportion(4, (0.6, 0.1, 0.3)) == [3, 0, 1]
    assert apportion(10, (0.6, 0.1, 0.3)) == [6, 1, 3]
    assert apportion(6, (0.9, 0.1, 0.0)) == [5, 1, 0]
    assert apportion(0, (0.6, 0.1, 0.3)) == [0, 0, 0]
    with pytest.raises(ValueError, match="fractions"):
        apportion(3, (0.5, 0.5))
