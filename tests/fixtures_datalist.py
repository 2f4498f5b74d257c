"""A small cohort with its datalist written the way a user writes one, and its bad inputs (the fairness benchmark on a
user's datalist, ``bench/benchmark_datalist.py``; the FairSeg and HAM10000 stand-ins are in ``fixtures_2d.py``).

:func:`write_user_datalist` draws the synthetic 2D cohort (``scripts.synthetic_2d``; ``spatial_dims=3``: the 3D
NIfTI cohort of ``scripts.synthetic``) into ``folder/data`` and writes ``folder/cohort.json`` as a department would:

- **absolute** image and label paths;
- no ``subtype``, ``hard`` or ``institution`` (the synthetic bookkeeping is dropped);
- the subgroup ``stage`` (T1-T4), a patient id ``patient`` (two consecutive cases of one stage in one list make
  one patient: ``P000``, ``P001`` ...), and extra attributes: ``scanner`` (``S1``/``S2``/``S3`` from the cohort's
  institution A/B/C), ``sex`` (``F``/``M``, alternating over the cases in id order) and ``age`` (``30 + (3 * i) %
  55``: 55 distinct values, too many to break down without binning);
- the cohort's own training, validation and testing lists.

:func:`break_user_datalist` gives such a cohort one bad input and returns the text its error line must name.

Command line (the example of the README's *Your own data*)::

    python tests/fixtures_datalist.py --out DIR [--n-cases 120] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts import synthetic, synthetic_2d  # noqa: E402

DATALIST_NAME = "cohort.json"
SUBGROUP_KEY = "stage"
PATIENT_KEY = "patient"
EXTRA_ATTRIBUTES = ("scanner", "sex")
SCANNERS = {"A": "S1", "B": "S2", "C": "S3"}
BAD_INPUTS = ("datalist_errors", "missing_image")


def _user_item(item: dict, data: Path, index: int) -> dict:
    return {
        "id": item["id"],
        "image": str((data / item["image"]).resolve()),
        "label": str((data / item["label"]).resolve()),
        "stage": item["stage"],
        "scanner": SCANNERS[item["institution"]],
        "sex": "FM"[index % 2],
        "age": 30 + (3 * index) % 55,
    }


def _add_patients(lists: dict[str, list[dict]]) -> None:
    """Two consecutive cases of one stage in one list are one patient."""
    n = 0
    for name in ("training", "validation", "testing"):
        waiting: dict[str, dict] = {}
        for item in lists[name]:
            partner = waiting.pop(item["stage"], None)
            if partner is None:
                item["patient"] = f"P{n:03d}"
                waiting[item["stage"]] = item
                n += 1
            else:
                item["patient"] = partner["patient"]


def write_user_datalist(
    folder: Path, n_cases: int = 48, seed: int = 0, spatial_dims: int = 2, split=(0.6, 0.15, 0.25)
) -> Path:
    """Write the cohort into ``folder/data`` and its user-style datalist ``folder/cohort.json``; returns the latter."""
    data = Path(folder) / "data"
    if spatial_dims == 2:
        synthetic_2d.generate_cohort(data, n_cases=n_cases, seed=seed, shape=(48, 48), minority_frac=0.1, split=split)
    else:
        synthetic.generate_cohort(data, n_cases=n_cases, seed=seed, shape=(48, 48, 24), split=split)
    source = json.loads((data / "datalist.json").read_text())
    order = sorted(item["id"] for name in ("training", "validation", "testing") for item in source[name])
    index = {case: i for i, case in enumerate(order)}
    lists = {name: [_user_item(it, data, index[it["id"]]) for it in source[name]] for name in ("training",
             "validation", "testing")}  # fmt: skip
    _add_patients(lists)
    path = Path(folder) / DATALIST_NAME
    path.write_text(json.dumps(lists, indent=1) + "\n")
    return path


def items_of(datalist: Path, lists=("training", "validation", "testing")) -> list[dict]:
    data = json.loads(Path(datalist).read_text())
    return [item for name in lists for item in data.get(name, [])]


def break_user_datalist(datalist: Path, problem: str) -> str:
    """Give the cohort one problem of :data:`BAD_INPUTS`; returns what its error line must name.

    ``datalist_errors``: the first training case's label gets the value 2 in one pixel (a binary cohort: labels
    must be 0/1); ``missing_image``: the second training case's image file is deleted."""
    first, second = json.loads(Path(datalist).read_text())["training"][:2]
    if problem == "datalist_errors":
        label = np.asarray(Image.open(first["label"])).copy()
        label[0, 0] = 2
        Image.fromarray(label).save(first["label"])
        return Path(first["label"]).name
    if problem == "missing_image":
        Path(second["image"]).unlink()
        return Path(second["image"]).name
    raise ValueError(f"problem must be one of {BAD_INPUTS}, got {problem!r}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for data/ and cohort.json")
    parser.add_argument("--n-cases", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_user_datalist(args.out, args.n_cases, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
