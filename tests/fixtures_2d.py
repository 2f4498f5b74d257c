"""Small stand-ins for Harvard-FairSeg and HAM10000 in their own formats, written at test time, and their bad inputs.

FairSeg (:func:`write_fairseg`): ``data_XXXXXX.npz`` files, case ``i`` having

- race index ``i % 3`` (Asian, Black, White; coded 0/1/2 in the README layout, 2/3/7 in the training layout),
- gender ``i % 2`` (0 Female, 1 Male), ethnicity code ``(0, 1, 0, -1)[i % 4]``, language code
  ``(0, 1, 2, -1)[(i // 3) % 4]``, marital status code ``(-1, 0, 1, 2, 3, 4)[i % 6]``,
- age ``40 + i`` years (README layout) or ``(40 + i) * 365`` days (training layout),
- a mask with background 0, a disc ring coded -1 and a cup coded -2 (the cup is the centre pixels),
- a ``uint8`` image (README layout) or a float image in ``[0, 1000]`` (training layout).

In the README layout case ``MISSING_KEY_CASE`` has no ``maritalstatus`` key. The training layout has ``hispanic``
instead of ``ethnicity``, a ``pid`` and, unless ``lists=False``, ``train.txt``/``test.txt`` (one file name per line):
case ``i`` is in the test list when ``(i // 3) % 3 == 0``.

HAM10000 (:func:`write_ham10000`): lesion ``j`` of ``n_lesions`` has two images when ``j % 4 == 0``, else one;
its age is ``AGES[j % 3][k % 2]`` (group 0-30, 30-60, 60+ by ``j % 3``) for ``j < 30`` and empty after; image ``k``
(numbered over all images) has sex ``("male", "female", "unknown")[k % 3]``. Images are split over two folders as
the data set ships them, plus one image that the CSV does not name (``UNLISTED_IMAGE``); masks are 0/255 PNGs.

``break_fairseg`` and ``break_ham10000`` turn a good folder into one bad input and return the text the error
line must name.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FAIRSEG_LAYOUTS = ("readme", "training")
RACE_CODES = {"readme": (0, 1, 2), "training": (2, 3, 7)}
MISSING_KEY_CASE = 4
FAIRSEG_PROBLEMS = ("neither_layout", "missing_key", "unknown_code", "mask_size", "mask_values", "listed_twice")
HAM_PROBLEMS = (
    "missing_key",
    "unknown_code",
    "mask_size",
    "mask_values",
    "listed_twice",
    "row_without_image",
    "image_found_twice",
)
AGES = ((5.0, 29.0), (30.0, 59.0), (60.0, 85.0))
FIRST_IMAGE = 24306
UNLISTED_IMAGE = "ISIC_0099999"
HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")


# ------------------------------------------------------------------------------------------------ FairSeg


def fairseg_id(i: int) -> str:
    return f"data_{i:06d}"


def _disc_cup_mask(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    r2 = ((rows - shape[0] / 2) / (shape[0] / 4)) ** 2 + ((cols - shape[1] / 2) / (shape[1] / 4)) ** 2
    mask = np.zeros(shape, dtype=np.int8)
    mask[r2 <= 1.0] = -1
    mask[r2 <= 0.25] = -2
    return mask


def _fairseg_arrays(i: int, layout: str, rng: np.random.Generator, shape: tuple[int, int]) -> dict:
    if layout == "readme":
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        image = rng.uniform(0.0, 1000.0, size=shape)
    image_key, mask_key = ("slo_fundus", "disc_cup_mask") if layout == "readme" else ("fundus_slo", "disc_cup")
    arrays = {
        image_key: image,
        mask_key: _disc_cup_mask(shape),
        "race": np.array(RACE_CODES[layout][i % 3]),
        "gender": np.array(i % 2),
        "language": np.array((0, 1, 2, -1)[(i // 3) % 4]),
        "maritalstatus": np.array((-1, 0, 1, 2, 3, 4)[i % 6]),
    }
    ethnicity = np.array((0, 1, 0, -1)[i % 4])
    if layout == "readme":
        arrays.update(ethnicity=ethnicity, age=np.array(40.0 + i))
        if i == MISSING_KEY_CASE:
            del arrays["maritalstatus"]
    else:
        arrays.update(hispanic=ethnicity, age=np.array((40 + i) * 365), pid=np.array(f"P{i:05d}"))
    return arrays


def in_test_list(i: int) -> bool:
    return (i // 3) % 3 == 0


def write_fairseg(
    folder: Path, layout: str = "readme", n: int = 30, seed: int = 0, shape=(32, 40), lists: bool | None = None
) -> Path:
    """Write ``n`` FairSeg cases in ``layout`` into ``folder`` (lists default: only for the training layout)."""
    if layout not in FAIRSEG_LAYOUTS:
        raise ValueError(f"layout must be one of {FAIRSEG_LAYOUTS}, got {layout!r}.")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.savez(folder / f"{fairseg_id(i)}.npz", **_fairseg_arrays(i, layout, rng, tuple(shape)))
    if lists if lists is not None else layout == "training":
        for name, wanted in (("train.txt", False), ("test.txt", True)):
            lines = [f"{fairseg_id(i)}.npz\n" for i in range(n) if in_test_list(i) == wanted]
            (folder / name).write_text("".join(lines))
    return folder


def rewrite_npz(path: Path, drop=(), **values) -> None:
    """Rewrite one ``.npz`` without the keys ``drop`` and with ``values`` set."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k not in drop}
    arrays.update(values)
    np.savez(path, **arrays)


def break_fairseg(folder: Path, problem: str, layout: str = "readme") -> str:
    """Give the data set in ``folder`` one problem of ``FAIRSEG_PROBLEMS``; returns what the error must name."""
    name = f"{fairseg_id(1)}.npz"
    path = folder / name
    image_key, mask_key = ("slo_fundus", "disc_cup_mask") if layout == "readme" else ("fundus_slo", "disc_cup")
    with np.load(path) as data:
        image = data[image_key]
    if problem == "neither_layout":
        rewrite_npz(path, drop=(image_key, mask_key), image=image)
    elif problem == "missing_key":
        rewrite_npz(path, drop=(mask_key,))
    elif problem == "unknown_code":
        rewrite_npz(path, race=np.array(5))
    elif problem == "mask_size":
        rewrite_npz(path, **{mask_key: _disc_cup_mask((image.shape[0] - 2, image.shape[1]))})
    elif problem == "mask_values":
        mask = _disc_cup_mask(image.shape)
        mask[0, :3] = 3
        rewrite_npz(path, **{mask_key: mask})
    elif problem == "listed_twice" and layout == "training":
        with open(folder / "train.txt", "a") as handle:
            handle.write(f"{name}\n")
        return "train.txt"
    elif problem == "listed_twice":
        (folder / "copy").mkdir()
        shutil.copy(path, folder / "copy" / name)
    else:
        raise ValueError(f"problem must be one of {FAIRSEG_PROBLEMS}, got {problem!r}.")
    return name


# ------------------------------------------------------------------------------------------------ HAM10000


def ham_id(k: int) -> str:
    return f"ISIC_{FIRST_IMAGE + k:07d}"


def _lesion_mask(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    r2 = ((rows - shape[0] / 2) / (shape[0] / 3)) ** 2 + ((cols - shape[1] / 2) / (shape[1] / 3)) ** 2
    return np.where(r2 <= 1.0, 255, 0).astype(np.uint8)


def _write_jpeg(path: Path, rng: np.random.Generator, shape: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)).save(path, format="JPEG")


def _write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path, format="PNG")


def ham_rows(n_lesions: int = 32) -> list[dict[str, str]]:
    """The metadata rows :func:`write_ham10000` writes."""
    rows, k = [], 0
    for j in range(n_lesions):
        for _copy in range(2 if j % 4 == 0 else 1):
            age = f"{AGES[j % 3][k % 2]:.1f}" if j < 30 else ""
            rows.append(
                {
                    "lesion_id": f"HAM_{j:07d}",
                    "image_id": ham_id(k),
                    "dx": ("nv", "mel", "bkl")[j % 3],
                    "dx_type": "histo",
                    "age": age,
                    "sex": ("male", "female", "unknown")[k % 3],
                    "localization": ("back", "face", "lower extremity")[k % 3],
                    "dataset": "vidir_modern",
                }
            )
            k += 1
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], columns=HAM_COLUMNS) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_ham10000(folder: Path, n_lesions: int = 32, seed: int = 0, shape=(24, 32)) -> Path:
    """Write the HAM10000 stand-in into ``folder`` (two image folders, the CSV, a mask folder)."""
    rng = np.random.default_rng(seed)
    rows = ham_rows(n_lesions)
    for k, row in enumerate(rows):
        part = "HAM10000_images_part1" if k < len(rows) // 2 else "HAM10000_images_part2"
        _write_jpeg(folder / part / f"{row['image_id']}.jpg", rng, tuple(shape))
        _write_mask(folder / "HAM10000_segmentations_lesion_tsao" / f"{row['image_id']}_segmentation.png",
                    _lesion_mask(tuple(shape)))  # fmt: skip
    _write_jpeg(folder / "HAM10000_images_part2" / f"{UNLISTED_IMAGE}.jpg", rng, tuple(shape))
    write_csv(folder / "HAM10000_metadata.csv", rows)
    return folder


def break_ham10000(folder: Path, problem: str) -> str:
    """Give the data set in ``folder`` one problem of ``HAM_PROBLEMS``; returns what the error must name."""
    rows = ham_rows(len({r["lesion_id"] for r in _read_rows(folder)}))
    csv_path, first = folder / "HAM10000_metadata.csv", ham_id(0)
    mask_path = folder / "HAM10000_segmentations_lesion_tsao" / f"{first}_segmentation.png"
    if problem == "missing_key":
        write_csv(csv_path, rows, [c for c in HAM_COLUMNS if c != "sex"])
        return "HAM10000_metadata.csv"
    if problem == "unknown_code":
        rows[0]["sex"] = "x"
        write_csv(csv_path, rows)
        return "HAM10000_metadata.csv line 2"
    if problem == "listed_twice":
        write_csv(csv_path, rows + [rows[0]])
        return f"HAM10000_metadata.csv line {len(rows) + 2}"
    if problem == "row_without_image":
        (folder / "HAM10000_images_part1" / f"{first}.jpg").unlink()
        return first
    if problem == "image_found_twice":
        shutil.copy(folder / "HAM10000_images_part1" / f"{first}.jpg", folder / "HAM10000_images_part2")
        return first
    if problem == "mask_size":
        with Image.open(mask_path) as mask:
            size = mask.size
        _write_mask(mask_path, _lesion_mask((size[1] + 1, size[0])))
        return mask_path.name
    if problem == "mask_values":
        mask = np.asarray(Image.open(mask_path)).copy()
        mask[0, :5] = 128
        _write_mask(mask_path, mask)
        return mask_path.name
    raise ValueError(f"problem must be one of {HAM_PROBLEMS}, got {problem!r}.")


def _read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "HAM10000_metadata.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ shared checks


def tree_digest(root: Path) -> str:
    """sha256 over every file below ``root`` (relative path and bytes): equal digests, nothing written or changed."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def items_by_id(datalist: dict) -> dict[str, dict]:
    """Every item of a datalist's three lists, by id."""
    return {it["id"]: it for name in ("training", "validation", "testing") for it in datalist[name]}
