"""Turn Harvard-FairSeg (one ``.npz`` per patient) into the 2D datalist the bundle trains on.

Usage::

    python bundle/scripts/prepare_fairseg.py --data-dir DIR --out DATALIST [--seed 0]
        [--coding readme|training] [--overwrite]

The data set (10,000 SLO fundus images with optic disc and cup masks, CC BY-NC-ND 4.0: non-commercial research
only, no derivatives may be shared) is obtained from https://ophai.hms.harvard.edu/datasets/harvard-fairseg10k/
(see https://github.com/Harvard-Ophthalmology-AI-Lab/FairSeg); it is not shipped with the bundle.

Two layouts of the ``.npz`` files are read (found recursively under ``--data-dir``); each file's layout is
recognised by its keys:

- **readme** (the data set's README): ``slo_fundus``, ``disc_cup_mask``, ``age`` in years, ``gender``
  (0 Female, 1 Male), ``race`` (0 Asian, 1 Black, 2 White), ``ethnicity`` (0 Non-Hispanic, 1 Hispanic),
  ``language`` (0 English, 1 Spanish, 2 Others), ``maritalstatus`` (0 Married or Partnered, 1 Single,
  2 Divorced, 3 Widowed, 4 Legally Separated); -1 is unknown.
- **training** (the authors' training code): ``fundus_slo``, ``disc_cup``, ``age`` in days, ``race`` coded
  2 Asian, 3 Black, 7 White, ``hispanic`` instead of ``ethnicity``, ``pid``. Source:
  Harvard-Ophthalmology-AI-Lab/FairSeg, ``TransUNet/datasets/dataset_fairseg.py`` and
  ``SAMed/datasets/dataset_fairseg.py`` (``attr_to_race = {2: 0, 3: 1, 7: 2}`` onto the README's order Asian,
  Black, White; ``language`` mapped unchanged with -1 unknown, a comment giving English 0, Spanish 1,
  unavailable -1, other 2; ``age / 365`` for years; ``maritalstatus`` only split into 0, -1 and the rest;
  ``gender`` and ``hispanic`` used as two classes without a table; keys listed in a comment: fundus_slo,
  disc_cup, ..., pid, maritalstatus, hispanic, language, gender, race, age). The FairDomain loader of the same
  lab maps ``hispanic`` -1 and 0 together and 1 apart. The code gives no names for gender, hispanic and
  maritalstatus 1-4, so the README's codes are applied to them.

``--coding`` forces one layout's codes on every file. Lists ``train.txt`` and ``test.txt`` in ``--data-dir``
(one ``.npz`` file name per line, relative to the data folder, as the authors' loader reads them) give the
split;
validation is then 10 % of the training list. Without lists the split is 60/10/30 (training/validation/testing).
Both are stratified by ``race`` (the routing key) with ``--seed``.

Written next to ``--out`` (the datalist JSON): ``images/<id>.png``, the SLO fundus as 8-bit grey (an array that
is not ``uint8`` is scaled min-max onto 0..255), and ``labels/<id>.png``: 0 background, 1 rim (mask code -1),
2 cup (mask code -2). Items hold ``id`` (the file stem), ``image`` and ``label`` (relative to the datalist
folder), ``gender``, ``race``, ``ethnicity``, ``language``, ``maritalstatus`` as names (``unknown`` for -1 or a
missing key) and ``age`` in years (a number; ``unknown`` when missing or -1).

Any bad input (a file fitting neither layout, a missing image or mask key, an unknown code, mask values
outside 0/-1/-2, a mask whose size differs from its image, an image listed twice, a listed file that is
missing) stops the run with one line naming the file and the problem, exit status 2, before anything is
written. ``.npz`` files are read without pickle.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the bundle root importable, as `monai.bundle run` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from scripts.split_2d import (  # noqa: E402
    DEFAULT_FRACTIONS,
    SPLIT_NAMES,
    TRAIN_ONLY_VALIDATION,
    UNKNOWN,
    PrepareError,
    age_text,
    check_targets,
    count_lines,
    split_items,
    write_outputs,
)

NAME = "Harvard-FairSeg"
ROUTING_KEY = "race"
CLASS_NAMES = ["background", "rim", "cup"]
#: image key and mask key of each layout
LAYOUT_KEYS = {"readme": ("slo_fundus", "disc_cup_mask"), "training": ("fundus_slo", "disc_cup")}
MASK_CODES = {0: 0, -1: 1, -2: 2}
_COMMON = {
    "gender": {0: "Female", 1: "Male"},
    "ethnicity": {0: "Non-Hispanic", 1: "Hispanic"},
    "language": {0: "English", 1: "Spanish", 2: "Others"},
    "maritalstatus": {0: "Married or Partnered", 1: "Single", 2: "Divorced", 3: "Widowed", 4: "Legally Separated"},
}
CODES = {
    "readme": {**_COMMON, "race": {0: "Asian", 1: "Black", 2: "White"}},
    "training": {**_COMMON, "race": {2: "Asian", 3: "Black", 7: "White"}},
}
#: the key each attribute is read from, per coding (the first one present)
ATTRIBUTE_KEYS = {"ethnicity": ("ethnicity", "hispanic")}
ATTRIBUTES = ("gender", "race", "ethnicity", "language", "maritalstatus")
#: days per year of the training layout's ages (the authors divide by 365)
DAYS_PER_YEAR = 365.0
LISTS = ("train.txt", "test.txt")


@dataclass
class Case:
    """One validated ``.npz`` file."""

    path: Path
    layout: str
    item: dict


def _open(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise PrepareError(f"{path}: cannot be read as .npz ({err}).") from err


def _get(path: Path, data, key: str) -> np.ndarray:
    try:
        return np.asarray(data[key])
    except ValueError as err:  # an object array needs pickle
        raise PrepareError(f"{path}: key {key!r} holds a pickled object; only plain arrays are read.") from err


def detect_layout(path: Path, keys: Sequence[str]) -> str:
    """The layout whose image or mask key the file has; refuses a file fitting neither or missing one of the two."""
    for layout, wanted in LAYOUT_KEYS.items():
        if any(k in keys for k in wanted):
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise PrepareError(f"{path}: missing key {missing[0]!r} of the {layout} layout; keys: {sorted(keys)}.")
            return layout
    raise PrepareError(f"{path}: fits neither layout (needs {LAYOUT_KEYS}); keys: {sorted(keys)}.")


def _code(path: Path, key: str, value: np.ndarray) -> int | None:
    """The integer code of a scalar (None for -1); refuses non-scalars and non-integers."""
    if value.size != 1 or value.dtype.kind not in "biuf" or not float(value.item()).is_integer():
        raise PrepareError(f"{path}: {key} {value.tolist()!r} is not an integer code.")
    code = int(value.item())
    return None if code == -1 else code


def decode_attribute(path: Path, data, name: str, coding: str) -> str:
    """The documented name of one coded attribute (``unknown`` for -1 or a missing key)."""
    key = next((k for k in ATTRIBUTE_KEYS.get(name, (name,)) if k in data.files), None)
    if key is None:
        return UNKNOWN
    code = _code(path, key, _get(path, data, key))
    if code is None:
        return UNKNOWN
    table = CODES[coding][name]
    if code not in table:
        raise PrepareError(f"{path}: unknown {key} code {code} for the {coding} coding (known: {sorted(table)}, -1).")
    return table[code]


def decode_age(path: Path, data, coding: str) -> float | str:
    """Age in years (training coding: from days), rounded to 0.01; ``unknown`` when missing or -1."""
    if "age" not in data.files:
        return UNKNOWN
    value = _get(path, data, "age")
    if value.size != 1 or value.dtype.kind not in "biuf" or not np.isfinite(value.item()):
        raise PrepareError(f"{path}: age {value.tolist()!r} is not a number.")
    age = float(value.item())
    if age == -1:
        return UNKNOWN
    if age < 0:
        raise PrepareError(f"{path}: age {age} is negative.")
    return round(age / DAYS_PER_YEAR if coding == "training" else age, 2)


def check_arrays(path: Path, data, layout: str) -> None:
    """A 2-D image, a mask of the same size, mask values only 0/-1/-2."""
    image_key, mask_key = LAYOUT_KEYS[layout]
    image, mask = _get(path, data, image_key), _get(path, data, mask_key)
    if image.ndim != 2 or image.dtype.kind not in "biuf":
        raise PrepareError(f"{path}: {image_key} must be a 2-D grey image, has shape {image.shape} ({image.dtype}).")
    if mask.shape != image.shape:
        raise PrepareError(f"{path}: {mask_key} has size {mask.shape}, its image {image_key} {image.shape}.")
    values, counts = np.unique(mask, return_counts=True)
    bad = [(v, c) for v, c in zip(values.tolist(), counts.tolist()) if v not in MASK_CODES]
    if bad:
        listed = ", ".join(f"{v} ({c} pixels)" for v, c in bad)
        raise PrepareError(f"{path}: {mask_key} has values outside 0/-1/-2: {listed}.")


def read_case(path: Path, case_id: str, coding: str | None) -> Case:
    """Validate one file and build its datalist item (image and label paths relative to the datalist folder)."""
    with _open(path) as data:
        layout = detect_layout(path, data.files)
        codes = coding or layout
        check_arrays(path, data, layout)
        item = {"id": case_id, "image": f"images/{case_id}.png", "label": f"labels/{case_id}.png"}
        item.update({name: decode_attribute(path, data, name, codes) for name in ATTRIBUTES})
        item["age"] = age_text(decode_age(path, data, codes))
    return Case(path, layout, item)


def find_files(data_dir: Path) -> dict[str, Path]:
    """Every ``.npz`` under ``data_dir`` by stem; refuses a stem found twice."""
    found: dict[str, Path] = {}
    for path in sorted(data_dir.rglob("*.npz")):
        if path.stem in found:
            raise PrepareError(f"{path}: image {path.stem} listed twice (also {found[path.stem]}).")
        found[path.stem] = path
    if not found:
        raise PrepareError(f"{data_dir}: no .npz file found.")
    return found


def read_lists(data_dir: Path) -> dict[str, list[Path]] | None:
    """``train.txt``/``test.txt`` as paths (None when neither exists); refuses one alone, a repeat, a missing file."""
    present = [name for name in LISTS if (data_dir / name).is_file()]
    if not present:
        return None
    if len(present) == 1:
        missing = data_dir / LISTS[1 - LISTS.index(present[0])]
        raise PrepareError(f"{missing}: missing; {present[0]} needs it.")
    lists, seen = {}, {}
    for name in LISTS:
        entries = []
        for number, line in enumerate((data_dir / name).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            path = (data_dir / line.strip()).resolve()
            where = f"{data_dir / name} line {number}"
            if path in seen:
                raise PrepareError(f"{where}: image {line.strip()} listed twice (also {seen[path]}).")
            if not path.is_file():
                raise PrepareError(f"{where}: image {line.strip()} not found under {data_dir}.")
            seen[path] = where
            entries.append(path)
        lists[name] = entries
    return lists


def assign_splits(cases: list[Case], lists: dict[str, list[Path]] | None, seed: int) -> dict[str, list[dict]]:
    """The given lists with 10 % of training as validation, or a 60/10/30 split; stratified by race."""
    items = [c.item for c in cases]
    if lists is None:
        return split_items(items, ROUTING_KEY, seed, DEFAULT_FRACTIONS)
    by_path = {c.path.resolve(): c.item for c in cases}
    train = [by_path[p] for p in lists["train.txt"]]
    carved = split_items(train, ROUTING_KEY, seed, TRAIN_ONLY_VALIDATION)
    test = sorted((by_path[p] for p in lists["test.txt"]), key=lambda it: it["id"])
    return {"training": carved["training"], "validation": carved["validation"], "testing": test}


def to_grey8(image: np.ndarray) -> np.ndarray:
    """``uint8`` as is; anything else scaled min-max onto 0..255 (a constant image becomes 0)."""
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float64)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) * 255.0 if high > low else np.zeros_like(image)
    return np.round(scaled).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def convert(case: Case) -> tuple[bytes, bytes]:
    """PNG bytes of the image (8-bit grey) and the label map (0 background, 1 rim, 2 cup)."""
    image_key, mask_key = LAYOUT_KEYS[case.layout]
    with _open(case.path) as data:
        image, mask = _get(case.path, data, image_key), _get(case.path, data, mask_key)
    label = np.zeros(mask.shape, dtype=np.uint8)
    for code, value in MASK_CODES.items():
        label[mask == code] = value
    return _png(to_grey8(image)), _png(label)


def _file_jobs(cases: list[Case], folder: Path):
    """``(target, make_bytes)`` pairs, converting each case once for its two files."""
    for case in cases:
        image, label = convert(case)
        yield folder / case.item["image"], lambda data=image: data
        yield folder / case.item["label"], lambda data=label: data


def prepare_fairseg(
    data_dir: Path, out: Path, seed: int = 0, coding: str | None = None, overwrite: bool = False
) -> dict[str, list[dict]]:
    """Validate every file, then write images, labels and the datalist (see the module docstring).

    Returns:
        the three splits.

    Raises:
        PrepareError: bad input or output (nothing is written then).
    """
    if not data_dir.is_dir():
        raise PrepareError(f"{data_dir}: not a folder.")
    lists = read_lists(data_dir)
    found = find_files(data_dir)
    if lists is not None:
        listed = {p for part in lists.values() for p in part}
        found = {stem: p for stem, p in found.items() if p.resolve() in listed}
    cases = [read_case(path, stem, coding) for stem, path in sorted(found.items())]
    folder = out.parent
    targets = [out] + [folder / c.item[k] for c in cases for k in ("image", "label")]
    check_targets(targets, [data_dir], overwrite)
    splits = assign_splits(cases, lists, seed)
    datalist = {
        "name": NAME,
        "source": str(data_dir.resolve()),
        "coding": coding or sorted({c.layout for c in cases}),
        "routing_key": ROUTING_KEY,
        "class_names": CLASS_NAMES,
        "split": "train.txt/test.txt, 10% of training as validation" if lists else "60/10/30",
        "seed": seed,
        **splits,
    }
    write_outputs(_file_jobs(cases, folder), datalist, out)
    return splits


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="folder holding the .npz files")
    parser.add_argument("--out", required=True, type=Path, help="datalist JSON; images/ and labels/ go beside it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--coding", choices=sorted(CODES), default=None, help="force one layout's codes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datalist and PNGs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        splits = prepare_fairseg(args.data_dir, args.out, args.seed, args.coding, args.overwrite)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{len(splits[n])} {n}" for n in SPLIT_NAMES))
    for line in count_lines(splits, ATTRIBUTES):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
