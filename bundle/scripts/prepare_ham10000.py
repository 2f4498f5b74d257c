"""Turn HAM10000 (dermatoscopic JPEGs, metadata CSV, lesion masks) into the 2D datalist the bundle trains on.

Usage::

    python bundle/scripts/prepare_ham10000.py --data-dir DIR --out DATALIST [--seed 0]
        [--age-bins 30 60] [--mask-dir DIR] [--overwrite]

The data set (10,015 images, CC BY-NC 4.0: non-commercial use, with attribution) is obtained from the Harvard
Dataverse, https://doi.org/10.7910/DVN/DBW86T (``HAM10000_images_part1.zip``, ``HAM10000_images_part2.zip``,
``HAM10000_metadata``, and the lesion masks ``HAM10000_segmentations_lesion_tsao``); it is not shipped with the
bundle.

Read under ``--data-dir`` (recursively, as the data set ships its images in two folders): ``ISIC_XXXXXXX.jpg``
images, ``HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx, dx_type, age, sex, localization``; extra
columns are accepted) and the masks ``ISIC_XXXXXXX_segmentation.png`` (under ``--mask-dir``, default
``--data-dir``), where 255 is the lesion and 0 the skin. Images not named in the CSV are skipped (and counted).

Written next to ``--out`` (the datalist JSON): ``labels/<image_id>.png`` (0 skin, 1 lesion). Images are referenced
in place by absolute path (JPEG, RGB). Items hold ``id`` (the image id), ``image``, ``label`` (relative to the
datalist folder), ``lesion_id``, ``sex`` as in the CSV, ``age`` (a number, ``unknown`` when empty), ``age_group``
from ``--age-bins`` (default ``[0, 30)``, ``[30, 60)``, ``[60, inf)`` named ``0-30``, ``30-60``, ``60+``;
``unknown`` when the age is missing), ``dx`` and ``localization``. The dMoE authors used other age bins, so
numbers from this datalist are not comparable with theirs.

There is no official split: 60/10/30 (training/validation/testing) at the lesion level (all images of a
``lesion_id`` go to the same split), stratified by the lesion's ``age_group`` (the routing key; the most common
one among its images) with ``--seed``.

Any bad input (a missing CSV column or value, an unknown sex or a bad age, a CSV row without an image or a mask,
an image listed twice, a mask whose size differs from its image, mask values other than 0 and 255) stops the run
with one line naming the file and the problem, exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the bundle root importable, as `monai.bundle run` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from scripts.split_2d import (  # noqa: E402
    DEFAULT_FRACTIONS,
    SPLIT_NAMES,
    UNKNOWN,
    PrepareError,
    age_text,
    check_targets,
    count_lines,
    majority_value,
    split_groups,
    write_outputs,
)

NAME = "HAM10000"
ROUTING_KEY = "age_group"
CLASS_NAMES = ["background", "lesion"]
METADATA = "HAM10000_metadata.csv"
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
SEXES = ("male", "female", UNKNOWN)
DEFAULT_AGE_BINS = (30.0, 60.0)
IMAGE_NAME = re.compile(r"^(ISIC_\d{7})\.jpe?g$", re.IGNORECASE)
MASK_NAME = re.compile(r"^(ISIC_\d{7})_segmentation\.png$", re.IGNORECASE)
LESION = 255


def find_by_id(folder: Path, pattern: re.Pattern, what: str) -> dict[str, Path]:
    """Files under ``folder`` whose name matches ``pattern``, by image id; refuses an id found twice."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("ISIC_*") if p.is_file()):
        match = pattern.match(path.name)
        if match is None:
            continue
        image_id = match.group(1)
        if image_id in found:
            raise PrepareError(f"{path}: {what} {image_id} listed twice (also {found[image_id]}).")
        found[image_id] = path
    return found


def find_metadata(data_dir: Path) -> Path:
    """The one ``HAM10000_metadata.csv`` under ``data_dir``."""
    found = sorted(data_dir.rglob(METADATA))
    if len(found) != 1:
        raise PrepareError(f"{data_dir}: needs exactly one {METADATA}, found {len(found)}: {[str(p) for p in found]}.")
    return found[0]


def read_metadata(csv_path: Path) -> list[dict[str, str]]:
    """Rows of the metadata CSV (stripped strings); refuses a missing column, empty ids or a repeated image."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PrepareError(f"{csv_path}: missing key (column) {missing[0]!r}; columns: {reader.fieldnames}.")
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        for key in ("lesion_id", "image_id"):
            if not row[key]:
                raise PrepareError(f"{csv_path} line {number}: missing {key}.")
        if row["image_id"] in seen:
            raise PrepareError(
                f"{csv_path} line {number}: image {row['image_id']} listed twice (also line {seen[row['image_id']]})."
            )
        seen[row["image_id"]] = number
    return rows


def bin_name(low: float, high: float) -> str:
    """``"30-60"``, or ``"60+"`` for the open last bin (integral edges written without decimals)."""
    text = [f"{e:g}" for e in (low, high)]
    return f"{text[0]}+" if math.isinf(high) else f"{text[0]}-{text[1]}"


def age_group(age: float | str, bins: Sequence[float]) -> str:
    """The name of the bin ``[e_i, e_{i+1})`` holding ``age`` (edges 0, ``bins``..., inf); ``unknown`` if no age."""
    if age == UNKNOWN:
        return UNKNOWN
    edges = [0.0, *bins, math.inf]
    for low, high in zip(edges[:-1], edges[1:]):
        if low <= age < high:
            return bin_name(low, high)
    raise ValueError(f"age {age} is outside the bins {edges}.")


def parse_age(where: str, text: str) -> float | str:
    if not text or text.lower() in ("unknown", "nan"):
        return UNKNOWN
    try:
        age = float(text)
    except ValueError:
        raise PrepareError(f"{where}: age {text!r} is not a number.") from None
    if not math.isfinite(age) or age < 0:
        raise PrepareError(f"{where}: age {text!r} is not a valid age.")
    return age


def check_mask(mask_path: Path, image_path: Path) -> None:
    """Same size as the image, single channel, values only 0 and 255 (counts of others named)."""
    with Image.open(image_path) as image:
        size = image.size
    with Image.open(mask_path) as mask_image:
        mask = np.asarray(mask_image.convert("L") if mask_image.mode == "1" else mask_image)
    if mask.ndim != 2:
        raise PrepareError(f"{mask_path}: mask must be single-channel, has shape {mask.shape}.")
    if (mask.shape[1], mask.shape[0]) != size:
        raise PrepareError(
            f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image {size[0]}x{size[1]}."
        )
    values, counts = np.unique(mask, return_counts=True)
    bad = [(v, c) for v, c in zip(values.tolist(), counts.tolist()) if v not in (0, LESION)]
    if bad:
        listed = ", ".join(f"{v} ({c} pixels)" for v, c in bad)
        raise PrepareError(f"{mask_path}: values other than 0 and {LESION}: {listed}.")


def make_item(row: dict[str, str], where: str, image: Path, mask: Path, bins: Sequence[float]) -> dict:
    """Check one CSV row's image and mask and build its datalist item."""
    sex = row["sex"] or UNKNOWN
    if sex not in SEXES:
        raise PrepareError(f"{where}: unknown sex code {sex!r} (known: {list(SEXES)}).")
    age = parse_age(where, row["age"])
    check_mask(mask, image)
    return {
        "id": row["image_id"],
        "image": str(image.resolve()),
        "label": f"labels/{row['image_id']}.png",
        "lesion_id": row["lesion_id"],
        "sex": sex,
        "age": age_text(age),
        "age_group": age_group(age, bins),
        "dx": row["dx"],
        "localization": row["localization"] or UNKNOWN,
    }


def collect_items(data_dir: Path, mask_dir: Path, bins: Sequence[float]) -> tuple[list[dict], dict[str, Path], int]:
    """Every CSV row as a checked item, the masks by image id, and the number of images the CSV does not name."""
    csv_path = find_metadata(data_dir)
    rows = read_metadata(csv_path)
    images = find_by_id(data_dir, IMAGE_NAME, "image")
    masks = find_by_id(mask_dir, MASK_NAME, "mask")
    items = []
    for number, row in enumerate(rows, start=2):
        where, image_id = f"{csv_path} line {number}", row["image_id"]
        if image_id not in images:
            raise PrepareError(f"{where}: no image {image_id}.jpg under {data_dir}.")
        if image_id not in masks:
            raise PrepareError(f"{where}: no mask {image_id}_segmentation.png under {mask_dir}.")
        items.append(make_item(row, where, images[image_id], masks[image_id], bins))
    return items, masks, len(set(images) - {row["image_id"] for row in rows})


def split_by_lesion(items: list[dict], seed: int) -> dict[str, list[dict]]:
    """60/10/30 split of lesions, stratified by each lesion's (most common) age group."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        groups[item["lesion_id"]].append(item)
    strata = {lesion: majority_value(members, ROUTING_KEY) for lesion, members in groups.items()}
    return split_groups(groups, strata, seed, DEFAULT_FRACTIONS)


def label_png(mask_path: Path) -> bytes:
    """The mask as an 8-bit label map: 1 where it is 255, else 0."""
    with Image.open(mask_path) as mask_image:
        mask = np.asarray(mask_image.convert("L") if mask_image.mode == "1" else mask_image)
    buffer = io.BytesIO()
    Image.fromarray((mask == LESION).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def check_bins(bins: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(b) for b in bins)
    if not values or any(not math.isfinite(b) or b <= 0 for b in values) or list(values) != sorted(set(values)):
        raise PrepareError(f"--age-bins {list(bins)}: need increasing finite edges > 0 (e.g. 30 60).")
    return values


def prepare_ham10000(
    data_dir: Path,
    out: Path,
    seed: int = 0,
    bins: Sequence[float] = DEFAULT_AGE_BINS,
    mask_dir: Path | None = None,
    overwrite: bool = False,
) -> tuple[dict[str, list[dict]], int]:
    """Validate every row, then write the labels and the datalist (see the module docstring).

    Returns:
        the three splits and the number of images skipped (not named in the CSV).

    Raises:
        PrepareError: bad input or output (nothing is written then).
    """
    bins = check_bins(bins)
    mask_dir = mask_dir or data_dir
    for folder in (data_dir, mask_dir):
        if not folder.is_dir():
            raise PrepareError(f"{folder}: not a folder.")
    items, masks, skipped = collect_items(data_dir, mask_dir, bins)
    folder = out.parent
    check_targets([out] + [folder / it["label"] for it in items], [data_dir, mask_dir], overwrite)
    splits = split_by_lesion(items, seed)
    names = [bin_name(lo, hi) for lo, hi in zip([0.0, *bins], [*bins, math.inf])]
    datalist = {
        "name": NAME,
        "source": str(data_dir.resolve()),
        "routing_key": ROUTING_KEY,
        "class_names": CLASS_NAMES,
        "age_bins": names,
        "split": "60/10/30 by lesion",
        "seed": seed,
        **splits,
    }
    jobs = ((folder / it["label"], lambda m=masks[it["id"]]: label_png(m)) for it in items)
    write_outputs(jobs, datalist, out)
    return splits, skipped


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="folder holding the images and the CSV")
    parser.add_argument("--out", required=True, type=Path, help="datalist JSON; labels/ goes beside it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument(
        "--age-bins", type=float, nargs="+", default=list(DEFAULT_AGE_BINS), help="inner age edges (default 30 60)"
    )
    parser.add_argument("--mask-dir", type=Path, default=None, help="folder of the masks (default --data-dir)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datalist and labels")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        splits, skipped = prepare_ham10000(
            args.data_dir, args.out, args.seed, args.age_bins, args.mask_dir, args.overwrite
        )
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{len(splits[n])} {n}" for n in SPLIT_NAMES))
    if skipped:
        print(f"skipped {skipped} image(s) that {METADATA} does not name")
    for line in count_lines(splits, (ROUTING_KEY, "sex", "dx")):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
