"""A user's cohort for the fairness benchmark: read the datalist, check it, and split it into the runs' datalists.

:func:`load_cohort` reads a datalist as a user writes it (relative or absolute paths, any attributes, no ``subtype``
needed) and refuses, with one :class:`InputError` line each and before anything is written, what the benchmark
cannot use:

- a datalist that is missing, not JSON or not an object, or lacks the lists the benchmark needs;
- a ``subgroup_key`` (or ``patient_key``) that no item has;
- items without an ``id`` whose image names collide (the report pools cases by id).

:func:`check_files` then runs ``scripts.check_data`` on the lists the benchmark reads (every file opened once: a
missing image, a label on another grid, label values outside the classes ...) and raises its final error line.

Items are normalised into the runs' datalists: every path made absolute (relative paths resolve against the
dataset folder, the datalist's own by default) and every item given an ``id`` (its image's file name without the
extension when it has none), other attributes kept as they are. **Extra attributes** (``sex``, ``age_group``,
``scanner`` ...) are the item keys other than the id, paths, subgroup and patient keys and the synthetic cohorts'
bookkeeping (``subtype``, ``hard``, ``hard_kind``, ``dicom_dir``): an attribute with 2 to :data:`MAX_LEVELS`
distinct values present in at least half of the items is broken down in the report; the others are listed with
the reason they are not (a continuous ``age``: bin it first).

:func:`make_splits` gives the runs' datalists (:class:`Split`): ``k`` cross-validation folds of the union of
``training`` and ``validation`` (``bench/cv_folds.py``: stratified by the subgroup, patients together, 10 % of each
fold's training part held out for validation) or, without folds, the datalist's own lists (its ``validation``, or
10 % of ``training`` when it has none, and its ``testing``). :func:`pool_split` is the whole cross-validation pool
with a 10 % validation split, for the retraining of the winner.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cv_folds  # noqa: E402
import runcache  # noqa: E402

if str(runcache.BUNDLE) not in sys.path:
    sys.path.insert(0, str(runcache.BUNDLE))
from scripts import check_data  # noqa: E402

LISTS = ("training", "validation", "testing")
#: an extra attribute with more distinct values than this is not broken down (bin it into groups first)
MAX_LEVELS = 12
#: item keys that are never extra attributes (paths, ids, the synthetic cohorts' bookkeeping)
NOT_ATTRIBUTES = ("id", "image", "label", "subtype", "hard", "hard_kind", "dicom_dir", "series_uid")
#: the random stream of the pool's validation split (the folds use streams 0..k-1)
POOL_STREAM = 999
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".png", ".jpg", ".jpeg", ".npz")


class InputError(ValueError):
    """Input the benchmark cannot use; the message is one line naming the problem and what to do."""


@dataclass(frozen=True)
class Cohort:
    """A user's datalist, read and normalised (absolute paths, an ``id`` on every item)."""

    path: Path
    dataset_dir: Path
    sha256: str
    subgroup_key: str
    patient_key: str | None
    lists: dict[str, list[dict[str, Any]]]
    subgroups: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    skipped_extras: dict[str, str] = field(default_factory=dict)

    @property
    def pool(self) -> list[dict[str, Any]]:
        """The union of ``training`` and ``validation``: what cross-validation splits."""
        return self.lists.get("training", []) + self.lists.get("validation", [])


@dataclass(frozen=True)
class Split:
    """The datalist of one run: its training, validation and testing items, and its name (``fold0``, ``testing``,
    ``pool``)."""

    name: str
    training: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    testing: list[dict[str, Any]]

    def datalist(self, cohort: Cohort) -> dict[str, Any]:
        return {"source": str(cohort.path), "source_sha256": cohort.sha256, "fold": self.name,
                "training": self.training, "validation": self.validation, "testing": self.testing}  # fmt: skip

    def sha256(self, cohort: Cohort) -> str:
        return hashlib.sha256(json.dumps(self.datalist(cohort), sort_keys=True).encode()).hexdigest()

    def write(self, cohort: Cohort, folder: Path) -> Path:
        """Write ``folder/datalist.json`` (atomically; left as it is when it already holds the same lists)."""
        path = folder / "datalist.json"
        text = json.dumps(self.datalist(cohort), indent=1) + "\n"
        if path.is_file() and path.read_text() == text:
            return path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path


# ------------------------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> dict[str, Any]:
    """The datalist's JSON object; :class:`InputError` when it is missing, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: the datalist does not exist; pass DATALIST=path/to/datalist.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the datalist ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}:{exc.lineno}:{exc.colno}: the datalist is not valid JSON ({exc.msg}); fix the syntax there"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the datalist must be a JSON object with training/validation/testing lists")
    return data


def _used_lists(data: dict[str, Any], folds: int | None, path: Path) -> list[str]:
    """The lists a benchmark reads: training and validation under folds; training, validation and testing without."""
    present = [k for k in LISTS if isinstance(data.get(k), list) and data[k]]
    if "training" not in present:
        raise InputError(f"{path}: the datalist has no non-empty 'training' list; it has {sorted(data)}")
    if folds is None and "testing" not in present:
        raise InputError(
            f"{path}: the datalist has no non-empty 'testing' list; set FOLDS=k to cross-validate its training "
            "and validation lists instead"
        )
    return [k for k in present if folds is None or k != "testing"]


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, str):
        return os.path.normpath(value if os.path.isabs(value) else os.path.join(str(base), os.path.expanduser(value)))
    return value


def _item_id(item: dict[str, Any]) -> str:
    """The item's ``id``, or its image's file name without the extension (as ``scripts.transforms.CaseIdd``)."""
    if item.get("id") not in (None, ""):
        return str(item["id"])
    image = item.get("image")
    name = os.path.basename(str(image[0] if isinstance(image, list) and image else image or ""))
    for ext in _IMAGE_SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _normalise(items: list[Any], base: Path) -> list[dict[str, Any]]:
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue  # check_data names it
        new = {**item, "id": _item_id(item)}
        for key in ("image", "label"):
            if key in new:
                new[key] = _absolute(new[key], base)
        out.append(new)
    return out


def _require_key(items: list[dict[str, Any]], key: str, what: str, path: Path) -> None:
    if not any(cv_folds.value_of(item, key) is not None for item in items):
        keys = sorted({k for item in items for k in item})
        raise InputError(f"{path}: no item has the {what} {key!r}; the items' keys are {', '.join(keys)}")


def _unique_ids(items: list[dict[str, Any]], path: Path) -> None:
    counts = Counter(item["id"] for item in items)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        raise InputError(
            f"{path}: {len(repeated)} case id(s) occur more than once (first: {repeated[0]!r}); every item needs its "
            "own 'id' (items without one are named after their image file)"
        )


# ------------------------------------------------------------------------------------------------ attributes


def extra_attributes(items: list[dict[str, Any]], exclude: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The attributes broken down in the report, and the skipped ones with why (see the module notes)."""
    keys = sorted({k for item in items for k in item if k not in (*NOT_ATTRIBUTES, *exclude)})
    kept, skipped = [], {}
    for key in keys:
        values = [item.get(key) for item in items]
        if any(isinstance(v, (dict, list)) for v in values):
            skipped[key] = "not a single value per item"
            continue
        present = [str(v) for v in values if v is not None and str(v).strip() != ""]
        levels = len(set(present))
        if len(present) * 2 < len(items):
            skipped[key] = f"present in only {len(present)} of {len(items)} items"
        elif levels < 2:
            skipped[key] = "one value only"
        elif levels > MAX_LEVELS:
            skipped[key] = f"{levels} distinct values; bin it into at most {MAX_LEVELS} groups to break it down"
        else:
            kept.append(key)
    return kept, skipped


def load_cohort(
    datalist: str | Path,
    subgroup_key: str,
    patient_key: str | None = None,
    folds: int | None = None,
    dataset_dir: str | Path | None = None,
) -> Cohort:
    """Read and normalise a user's datalist (see the module notes); :class:`InputError` for what cannot be used."""
    path = Path(datalist).expanduser().resolve()
    data = _read_json(path)
    base = Path(dataset_dir).expanduser().resolve() if dataset_dir is not None else path.parent
    used = _used_lists(data, folds, path)
    lists = {name: _normalise(data[name], base) for name in used}
    items = [item for name in used for item in lists[name]]
    _require_key(items, subgroup_key, "SUBGROUP_KEY", path)
    if patient_key is not None:
        _require_key(items, patient_key, "PATIENT_KEY", path)
    _unique_ids(items, path)
    subgroups = sorted({v for v in (cv_folds.value_of(i, subgroup_key) for i in items) if v is not None})
    exclude = (subgroup_key, patient_key) if patient_key else (subgroup_key,)
    extras, skipped = extra_attributes(items, exclude)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Cohort(path, base, sha, subgroup_key, patient_key, lists, subgroups, extras, skipped)


def check_files(
    cohort: Cohort, patch_size: list[int] | None, num_classes: int | None, workers: int = 2
) -> list[check_data.Problem]:
    """``check_data`` on the lists the benchmark reads; returns the warnings, raises the first error as one line."""
    lists = {name: items for name, items in cohort.lists.items()}
    problems = check_data.check_datalist(
        lists, cohort.dataset_dir, subgroup_key=cohort.subgroup_key, subgroups=cohort.subgroups, keys=tuple(lists),
        patch_size=patch_size, num_classes=num_classes if num_classes and num_classes > 2 else None,
        num_workers=workers,
    )  # fmt: skip
    errors = [p for p in problems if p.is_error]
    if errors:
        line = check_data.final_error_line(errors, cohort.path).removeprefix("ERROR check_data: ")
        classes = f" --num-classes {num_classes}" if num_classes and num_classes > 2 else ""
        raise InputError(f"check_data: {line} (every problem: python bundle/scripts/check_data.py --datalist "
                         f"{cohort.path} --subgroup-key {cohort.subgroup_key}{classes})")  # fmt: skip
    return [p for p in problems if p.severity == "warning"]


# ------------------------------------------------------------------------------------------------ splitting


def _units(cohort: Cohort, items: list[dict[str, Any]]) -> list[cv_folds.Unit]:
    return cv_folds.units_of(items, cohort.subgroup_key, cohort.patient_key)


def check_fold_count(cohort: Cohort, folds: int) -> None:
    """:func:`cv_folds.check_folds` on the pool, as an :class:`InputError`."""
    try:
        cv_folds.check_folds(folds, _units(cohort, cohort.pool), cohort.subgroup_key,
                             "patients" if cohort.patient_key else "cases")  # fmt: skip
    except ValueError as exc:
        raise InputError(f"{cohort.path}: {exc}") from exc


def _held_out(cohort: Cohort, items: list[dict[str, Any]], seed: int, fold: int) -> tuple[list, list]:
    train, val = cv_folds.inner_validation(items, list(range(len(items))), cohort.subgroup_key, cohort.patient_key,
                                           seed=seed, fold=fold)  # fmt: skip
    return [items[i] for i in train], [items[i] for i in val]


def make_splits(cohort: Cohort, folds: int | None, seed: int = 0) -> list[Split]:
    """The runs' datalists: ``folds`` cross-validation folds, or the datalist's own lists (module notes)."""
    if folds is None:
        training, validation = cohort.lists["training"], cohort.lists.get("validation", [])
        if not validation:
            training, validation = _held_out(cohort, training, seed, 0)
        return [Split("testing", training, validation, cohort.lists["testing"])]
    pool = cohort.pool
    tests = cv_folds.fold_test_items(pool, folds, cohort.subgroup_key, cohort.patient_key, seed)
    splits = []
    for k, test in enumerate(tests):
        held = set(test)
        train, val = _held_out(cohort, [pool[i] for i in range(len(pool)) if i not in held], seed, k)
        splits.append(Split(f"fold{k}", train, val, [pool[i] for i in test]))
    return splits


def pool_split(cohort: Cohort, seed: int = 0) -> Split:
    """The whole pool (training and validation lists) with 10 % held out; that 10 % is also its testing list (the
    retrained model's sanity check, not an estimate: the cross-validation is)."""
    train, val = _held_out(cohort, cohort.pool, seed, POOL_STREAM)
    return Split("pool", train, val, val)
