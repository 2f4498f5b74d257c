"""Validate a datalist and the volumes it lists before any training step runs.

A cohort assembled by hand or exported from a planning system usually has a few broken cases: a path that
moved, a label exported on another grid, a multi-label mask, a truncated download. MONAI meets them one at a
time, deep inside a data loader worker, often hours into a run. :func:`check_datalist` reads the datalist and
every file it lists once and reports **every** problem at once, each naming the list, the case id (or the
item index ``#i`` when there is no id), the file and the datalist key, with what to do about it.

Checks, in the order they are reported:

- the datalist: readable, valid JSON (with line and column), an object holding the requested lists;
- every item: an object with ``image`` (and ``label``, optional in ``testing`` when ``require_label`` is
  ``False``); ids unique across all lists; the same image file not listed twice;
- every file: exists; with ``strict_paths``, stays inside ``dataset_dir`` after resolving symlinks and
  ``..``; not empty; NIfTI header and voxel data both readable (a truncated ``.nii.gz`` fails only when its
  data is decompressed); one 3D volume (not 2D, not several channels or time points);
- image against label: same shape and same affine (to ``affine_tol`` mm);
- label voxels only 0 and 1 (an all-zero label is a warning); image voxels finite (no NaN or Inf);
- an image smaller than the patch (``info``: it is padded);
- subgroups: each item's ``subgroup_key`` value present and one of ``subgroups`` (a warning: it is routed as
  *unknown*); every subgroup has training cases (a warning: the DRO loss skips an empty group).

Severities: ``error`` (training or inference would fail or silently learn from wrong data), ``warning``
(runs, but probably not as intended), ``info`` (expected behaviour worth knowing).

Command line (exit status 0 without errors, 1 with errors, 2 for usage errors)::

    python bundle/scripts/check_data.py --datalist DIR/datalist.json [--dataset-dir DIR]
        [--subgroup-key stage --subgroups T1,T2,T3,T4] [--patch-size 64 64 32] [--strict-paths]

From a bundle config, :class:`CohortCheck` refuses a bad cohort in ``initialize``::

    "cohort_check": {"_target_": "scripts.check_data.CohortCheck", "datalist": "@datalist", ...},
    "initialize": ["$@cohort_check.run()"]

Only NIfTI files (``.nii``, ``.nii.gz``, ``.hdr``/``.img``, ``.mgz``) are opened; a folder (a DICOM series)
or another format is reported as ``info`` and its contents are not inspected.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["SEVERITIES", "CohortCheck", "Problem", "check_datalist", "format_report", "main"]

#: problem severities, most severe first
SEVERITIES = ("error", "warning", "info")
DEFAULT_KEYS = ("training", "validation", "testing")
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz", ".mgz", ".mgh")
#: at most this many distinct bad label values are named in a message
_MAX_VALUES_SHOWN = 5


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check_datalist`.

    Attributes:
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        message: what is wrong, with the offending value, and what to do.
        list_key: datalist list the item is in (``"training"`` ...); ``None`` for datalist-level findings.
        case: the item's ``id``, or ``"#<index>"`` when it has none; ``None`` for list- or cohort-level findings.
        file: the file concerned: the resolved image/label path, or the datalist itself.
        key: the datalist key concerned (``"image"``, ``"label"``, ``"id"``, the subgroup key ...).
        code: a short machine-readable name of the check (``"missing_file"``, ``"label_values"`` ...).
    """

    severity: str
    message: str
    list_key: str | None = None
    case: str | None = None
    file: str | None = None
    key: str | None = None
    code: str = ""

    @property
    def is_error(self) -> bool:
        """Whether this problem must stop training."""
        return self.severity == "error"

    def __str__(self) -> str:
        return (
            f"{self.severity.upper():<7} {self.list_key or '-':<10} {self.case or '-':<12} "
            f"{self.file or '-'}: {self.message}"
        )


@dataclass
class _FileSummary:
    """What one read of one file tells (the voxel data itself is not kept)."""

    kind: str = "nifti"  # "nifti", "folder", "other" or "unreadable"
    shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None
    error: str | None = None  # the reason a file could not be read
    error_code: str = ""
    n_nan: int = 0
    n_inf: int = 0
    bad_values: tuple[float, ...] = ()  # label values other than 0 and 1 (at most _MAX_VALUES_SHOWN)
    n_bad_voxels: int = 0
    n_bad_distinct: int = 0  # distinct bad values (in the first 2**20 bad voxels)
    n_foreground: int = -1  # label voxels == 1 (-1: not counted)


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def _inspect(path: str, role: str) -> _FileSummary:
    """Read one file once: header, then voxel data; keep only what the checks need.

    Args:
        path: an existing, non-empty file or folder.
        role: ``"image"`` (counts non-finite voxels) or ``"label"`` (collects values other than 0/1).
    """
    if os.path.isdir(path):
        return _FileSummary(kind="folder")
    if not _is_nifti(path):
        return _FileSummary(kind="other")
    import nibabel as nib  # imported here: the module is importable (and its CLI parses) without it

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types (ImageFileError, HeaderDataError, OSError ...)
        return _FileSummary(kind="unreadable", error=f"{type(e).__name__}: {e}".strip(), error_code="unreadable_header")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # EOFError / BadGzipFile / zlib.error / OSError on truncated or corrupt data
        return _FileSummary(
            kind="unreadable",
            shape=shape,
            affine=affine,
            error=f"{type(e).__name__}: {e}".strip(),
            error_code="corrupt_data",
        )
    summary = _FileSummary(shape=shape, affine=affine)
    if role == "image":
        if data.dtype.kind in "fc":
            summary.n_nan = int(np.count_nonzero(np.isnan(data)))
            summary.n_inf = int(np.count_nonzero(np.isinf(data)))
    else:
        ok = (data == 0) | (data == 1)
        if not ok.all():
            bad = data[~ok]
            summary.n_bad_voxels = int(bad.size)
            values = np.unique(bad[: 1 << 20])  # a sample is enough to name a few offending values
            summary.bad_values = tuple(float(v) for v in values[:_MAX_VALUES_SHOWN])
            summary.n_bad_distinct = int(values.size)
        summary.n_foreground = int(np.count_nonzero(data == 1))
    return summary


def _spatial_shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why ``shape`` is not one 3D volume, or ``None`` when it is."""
    if len(shape) < 3:
        return (
            f"has shape {shape}: a 2D image, but a 3D volume (X, Y, Z) is expected; export the whole series as "
            "one 3D volume"
        )
    if min(shape[:3]) <= 1:
        return (
            f"has shape {shape}: a single slice (2D), but a 3D volume is expected; export the whole series as one "
            "3D volume"
        )
    extra = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    if extra > 1:
        return (
            f"has shape {shape}: {extra} channels or time points, but one 3D volume is expected; split it and list "
            "one volume per item"
        )
    return None


def _format_values(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _read_datalist(path: Path) -> tuple[Any, Problem | None]:
    """Load the datalist JSON; on failure return a problem saying where and why."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, Problem("error", "datalist file not found; check --datalist", file=where, code="no_datalist")
    except (OSError, UnicodeDecodeError) as e:
        return None, Problem("error", f"cannot read the datalist ({e})", file=where, code="no_datalist")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        message = (
            f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; fix the syntax there (a trailing comma, "
            "a missing comma or an unquoted string is the usual cause)"
        )
        return None, Problem("error", message, file=f"{where}:{e.lineno}:{e.colno}", code="invalid_json")


def _resolve(value: str, base: Path) -> str:
    """Path of a datalist entry, as MONAI's ``load_decathlon_datalist`` forms it (absolute paths kept)."""
    return os.path.normpath(os.path.join(str(base), os.path.expanduser(value)))


def _inside(path: str, root: str) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


#: one item of the datalist: (list, index in the list, case id or "#<index>", the item)
_Item = tuple[str, int, str, Mapping]


def _check_arguments(keys, patch_size, subgroups, affine_tol, num_workers):
    """Validate :func:`check_datalist`'s arguments; returns ``(patch_size, subgroups)`` normalised."""
    if isinstance(keys, str) or not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keys must be a non-empty list of list names, got {keys!r}.")
    if patch_size is not None:
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be three positive voxel counts (X, Y, Z), got {patch_size!r}.")
    if subgroups is not None:
        if isinstance(subgroups, str) or len(subgroups) == 0:
            raise ValueError(f"subgroups must be a non-empty list of values, got {subgroups!r}.")
        subgroups = [str(s) for s in subgroups]
    if affine_tol < 0:
        raise ValueError(f"affine_tol must be >= 0 mm, got {affine_tol}.")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    return patch_size, subgroups


def check_datalist(
    datalist_path: str | os.PathLike | Mapping,
    dataset_dir: str | os.PathLike | None = None,
    *,
    subgroup_key: str | None = "stage",
    subgroups: Sequence[str] | None = None,
    keys: Sequence[str] = DEFAULT_KEYS,
    patch_size: Sequence[int] | None = None,
    require_label: bool = True,
    strict_paths: bool = False,
    affine_tol: float = 1e-3,
    num_workers: int = 1,
) -> list[Problem]:
    """Check a datalist and every file it lists; report all problems at once.

    The phases, each its own function: the items (lists, objects, unique ids), the files (paths that exist and
    are not empty), their contents (each file read once: readable, 3D, finite image, binary label, image and
    label on one grid), the subgroups.

    Args:
        datalist_path: the datalist JSON (``{"training": [...], "validation": [...], "testing": [...]}``), or
            such a dict already loaded (then ``dataset_dir`` defaults to the working directory).
        dataset_dir: folder relative paths resolve against (MONAI's ``base_dir``); default: the datalist's folder.
        subgroup_key: item attribute that names the subgroup (``None``: no subgroup checks).
        subgroups: the known subgroup values in index order (``None``: only check that the attribute is present).
            Values are compared as strings, case-sensitively, as ``scripts.transforms.SubgroupIndexd`` does.
        keys: the lists to check; a missing one is an error.
        patch_size: training patch (X, Y, Z) in voxels; a smaller image is reported as ``info`` (it is padded).
        require_label: whether ``testing`` items must have a ``label`` (``training``/``validation`` always must).
        strict_paths: make a path that escapes ``dataset_dir`` (after resolving symlinks and ``..``) an error.
        affine_tol: largest allowed difference (mm) between the image's and the label's affine entries.
        num_workers: threads reading files (decompression releases the GIL); 1 reads them one after another.

    Returns:
        the problems, in datalist order (datalist, then item by item, then cohort-wide); empty when all is well.

    Raises:
        ValueError: for an invalid argument (not for an invalid cohort: that is what the returned list is for).
    """
    patch_size, subgroups = _check_arguments(keys, patch_size, subgroups, affine_tol, num_workers)
    problems: list[Problem] = []
    if isinstance(datalist_path, Mapping):
        data, dl_name = datalist_path, "<datalist>"
        base = Path(dataset_dir) if dataset_dir is not None else Path.cwd()
    else:
        datalist_file = Path(datalist_path)
        base = Path(dataset_dir) if dataset_dir is not None else datalist_file.parent
        dl_name = str(datalist_file)
        data, problem = _read_datalist(datalist_file)
        if problem is not None:
            return [problem]
    if not isinstance(data, Mapping):
        msg = f"the datalist must be a JSON object with lists {list(keys)}, but it is a {type(data).__name__}"
        return [Problem("error", msg, file=dl_name, code="not_object")]
    if dataset_dir is not None and not base.is_dir():
        msg = f"dataset_dir {str(base)!r} is not a folder; pass the folder the datalist's relative paths start from"
        problems.append(Problem("error", msg, file=dl_name, code="no_dataset_dir"))

    items, found = _item_problems(data, keys, dl_name)
    problems.extend(found)
    files = [_file_problems(entry, base, dl_name, require_label, strict_paths) for entry in items]
    to_read = dict.fromkeys((path, role) for paths, _ in files for role, path in paths.items())
    summaries = _read_files(to_read, num_workers)
    image_users: dict[str, tuple[str, int, str]] = {}
    for item, (paths, found) in zip(items, files):
        problems.extend(found)  # an item's file problems, then its content problems: datalist order
        problems.extend(_content_problems(item, paths, summaries, image_users, patch_size, affine_tol))
    if subgroup_key is not None:
        problems.extend(_subgroup_problems(items, keys, subgroup_key, subgroups, dl_name))
    return problems


def _item_problems(data: Mapping, keys: Sequence[str], dl_name: str) -> tuple[list[_Item], list[Problem]]:
    """Phase 1, the items: every requested list exists and holds objects; ids are unique across all lists."""
    problems: list[Problem] = []
    items: list[_Item] = []
    for list_key in keys:
        if list_key not in data:
            present = [k for k, v in data.items() if isinstance(v, list)]
            msg = f"the datalist has no {list_key!r} list (lists present: {present}); add it or leave it out of keys"
            problems.append(Problem("error", msg, list_key=list_key, file=dl_name, key=list_key, code="missing_list"))
            continue
        entries = data[list_key]
        if not isinstance(entries, list):
            msg = f"{list_key!r} must be a list of items, but it is a {type(entries).__name__}"
            problems.append(Problem("error", msg, list_key=list_key, file=dl_name, key=list_key, code="not_list"))
            continue
        if not entries:
            severity = "error" if list_key == "training" else "warning"
            msg = f"the {list_key!r} list is empty" + ("; training needs cases" if severity == "error" else "")
            problems.append(Problem(severity, msg, list_key, None, dl_name, list_key, "empty_list"))
        for index, item in enumerate(entries):
            if not isinstance(item, Mapping):
                msg = f"item #{index} must be an object with 'image' and 'label', but it is {item!r:.60}"
                problems.append(Problem("error", msg, list_key, f"#{index}", dl_name, None, "not_object"))
                continue
            case = str(item["id"]) if item.get("id") not in (None, "") else f"#{index}"
            items.append((list_key, index, case, item))

    # ids must be unique across all lists (a shared id merges two cases in the DRO loss bank and the reports; across
    # lists it also means a test case was trained on)
    first_seen: dict[str, tuple[str, int]] = {}
    for list_key, index, case, item in items:
        if item.get("id") in (None, ""):
            continue
        if case in first_seen:
            other_list, other_index = first_seen[case]
            msg = (
                f"duplicate id {case!r}: {other_list} item #{other_index} has it too; ids must be unique across all "
                "lists (the DRO loss and the reports key cases by id; across lists a shared case leaks test data)"
            )
            problems.append(Problem("error", msg, list_key, case, dl_name, "id", "duplicate_id"))
        else:
            first_seen[case] = (list_key, index)
    return items, problems


def _file_problems(
    entry: _Item, base: Path, dl_name: str, require_label: bool, strict_paths: bool
) -> tuple[dict[str, str], list[Problem]]:
    """Phase 2, the files of one item: ``({role: resolved path} of the usable ones, problems)``."""
    list_key, _index, case, item = entry
    found: list[Problem] = []
    paths: dict[str, str] = {}
    for role in ("image", "label"):
        value = item.get(role)
        if value is None:
            if role == "label" and list_key == "testing" and not require_label:
                continue
            msg = f"item has no {role!r}; add the path of its {role} (relative to dataset_dir)"
            found.append(Problem("error", msg, list_key, case, dl_name, role, f"missing_{role}"))
            continue
        if not isinstance(value, str) or not value:
            msg = f"{role!r} must be a non-empty path string, got {value!r}"
            found.append(Problem("error", msg, list_key, case, dl_name, role, f"missing_{role}"))
            continue
        path = _resolve(value, base)
        if strict_paths and not _inside(path, str(base)):
            msg = (
                f"{role} path {value!r} resolves to {os.path.realpath(path)!r}, outside dataset_dir "
                f"{os.path.realpath(base)!r} (strict_paths); move the file under dataset_dir"
            )
            found.append(Problem("error", msg, list_key, case, path, role, "path_escapes"))
            continue
        if not os.path.exists(path):
            msg = (
                f"{role} file not found (datalist says {value!r}, resolved against dataset_dir {str(base)!r}); "
                "fix the path or pass the right dataset_dir"
            )
            found.append(Problem("error", msg, list_key, case, path, role, "missing_file"))
            continue
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            msg = f"{role} file {value!r} is empty (0 bytes); copy or export it again"
            found.append(Problem("error", msg, list_key, case, path, role, "empty_file"))
            continue
        if os.path.isdir(path) and not any(os.scandir(path)):
            msg = f"{role} folder {value!r} is empty; it should hold the DICOM series of the case"
            found.append(Problem("error", msg, list_key, case, path, role, "empty_file"))
            continue
        paths[role] = path
    return paths, found


def _read_files(to_read: Mapping[tuple[str, str], None], num_workers: int) -> dict[tuple[str, str], _FileSummary]:
    """Read every ``(path, role)`` once, on ``num_workers`` threads."""

    def read(path_role: tuple[str, str]) -> _FileSummary:
        return _inspect(*path_role)

    if num_workers > 1 and len(to_read) > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            return dict(zip(to_read, pool.map(read, to_read)))
    return {pr: read(pr) for pr in to_read}


def _unusable_file(entry: _Item, role: str, path: str, s: _FileSummary) -> Problem | None:
    """Why a file's contents cannot be checked (not NIfTI, unreadable, not one 3D volume), or ``None``."""
    list_key, _index, case, item = entry
    value = item[role]
    if s.kind == "folder":
        msg = f"{role} {value!r} is a folder (a DICOM series?): its contents are not inspected here"
        return Problem("info", msg, list_key, case, path, role, "not_inspected")
    if s.kind == "other":
        msg = f"{role} {value!r} is not NIfTI: its contents are not inspected here"
        return Problem("info", msg, list_key, case, path, role, "not_inspected")
    if s.error_code == "unreadable_header":
        msg = (
            f"cannot read {role} {value!r} as NIfTI ({s.error}); the file is truncated, corrupt or not an "
            "image: copy or export it again"
        )
        return Problem("error", msg, list_key, case, path, role, "unreadable")
    if s.error_code == "corrupt_data":
        msg = (
            f"{role} {value!r} is truncated or corrupt: its header reads but its voxel data does not "
            f"({s.error}); copy or export it again"
        )
        return Problem("error", msg, list_key, case, path, role, "corrupt")
    why = _spatial_shape_problem(s.shape)
    if why is not None:
        return Problem("error", f"{role} {value!r} {why}", list_key, case, path, role, "not_3d")
    return None


def _image_problems(
    entry: _Item, path: str, s: _FileSummary, image_users: dict[str, tuple[str, int, str]], patch_size
) -> list[Problem]:
    """An image's voxels are finite; it is not smaller than the patch (info); no other case lists it."""
    list_key, _index, case, item = entry
    value, problems = item["image"], []
    if s.n_nan or s.n_inf:
        msg = (
            f"image {value!r} has {s.n_nan} NaN and {s.n_inf} infinite voxels; replace them (e.g. with "
            "-1024 HU, air) before training: one NaN makes the loss NaN"
        )
        problems.append(Problem("error", msg, list_key, case, path, "image", "non_finite"))
    if patch_size is not None and any(n < p for n, p in zip(s.shape[:3], patch_size)):
        msg = (
            f"image {value!r} ({'x'.join(map(str, s.shape[:3]))} voxels) is smaller than the patch "
            f"{'x'.join(map(str, patch_size))}: it will be padded (compared before resampling)"
        )
        problems.append(Problem("info", msg, list_key, case, path, "image", "smaller_than_patch"))
    first_user = image_users.setdefault(path, entry[:3])  # (list, index, case) of the first item listing it
    if first_user != entry[:3]:
        msg = (
            f"image {value!r} is also the image of {first_user[0]} case {first_user[2]}; list each case once "
            "(across lists it leaks test data)"
        )
        problems.append(Problem("warning", msg, list_key, case, path, "image", "duplicate_image"))
    return problems


def _label_problems(entry: _Item, path: str, s: _FileSummary) -> list[Problem]:
    """A label holds only 0 and 1 (error), and some 1 (warning)."""
    list_key, _index, case, item = entry
    value = item["label"]
    if s.bad_values:
        more = " ..." if s.n_bad_distinct > len(s.bad_values) else ""
        msg = (
            f"label {value!r} has values other than 0 and 1: {_format_values(s.bad_values)}{more} in "
            f"{s.n_bad_voxels} voxel(s); the CTV label must be binary: keep only the CTV (label == its "
            "value) or binarise it (label > 0)"
        )
        return [Problem("error", msg, list_key, case, path, "label", "label_values")]
    if s.n_foreground == 0:
        msg = f"label {value!r} is empty (no voxel is 1): the case has no target; check the export"
        return [Problem("warning", msg, list_key, case, path, "label", "empty_label")]
    return []


def _grid_problem(entry: _Item, label_path: str, img: _FileSummary, lab: _FileSummary, affine_tol: float):
    """Image and label on one grid: same shape, affines within ``affine_tol`` mm; the problem or ``None``."""
    list_key, _index, case, item = entry
    if img.shape[:3] != lab.shape[:3]:
        msg = (
            f"image {item['image']!r} has shape {img.shape[:3]} but label {item['label']!r} has shape "
            f"{lab.shape[:3]}; resample the label onto the image grid (nearest neighbour)"
        )
        return Problem("error", msg, list_key, case, label_path, "label", "shape_mismatch")
    diff = float(np.max(np.abs(img.affine - lab.affine)))
    if diff > affine_tol:
        msg = (
            f"image {item['image']!r} and label {item['label']!r} have different affines (up to "
            f"{diff:.4g} mm apart, tolerance {affine_tol:g} mm): the label is not on the image grid; "
            "export both from the same series or resample the label onto the image"
        )
        return Problem("error", msg, list_key, case, label_path, "label", "affine_mismatch")
    return None


def _content_problems(
    entry: _Item,
    paths: Mapping[str, str],
    summaries: Mapping[tuple[str, str], _FileSummary],
    image_users: dict[str, tuple[str, int, str]],
    patch_size,
    affine_tol: float,
) -> list[Problem]:
    """Phase 3, the contents of one item's files (read once, in ``summaries``), then image against label."""
    problems: list[Problem] = []
    ok: dict[str, _FileSummary] = {}
    for role, path in paths.items():
        s = summaries[(path, role)]
        unusable = _unusable_file(entry, role, path, s)
        if unusable is not None:
            problems.append(unusable)
            continue
        ok[role] = s
        if role == "image":
            problems.extend(_image_problems(entry, path, s, image_users, patch_size))
        else:
            problems.extend(_label_problems(entry, path, s))
    if "image" in ok and "label" in ok:
        grid = _grid_problem(entry, paths["label"], ok["image"], ok["label"], affine_tol)
        if grid is not None:
            problems.append(grid)
    return problems


def _subgroup_problems(
    items: list[_Item],
    keys: Sequence[str],
    subgroup_key: str,
    subgroups: list[str] | None,
    dl_name: str,
) -> list[Problem]:
    """Phase 4, the subgroups: every item names a known one; every subgroup has training cases."""
    problems: list[Problem] = []
    missing: dict[str, list[str]] = {}
    n_items = Counter(list_key for list_key, *_ in items)
    training_counts: Counter[str] = Counter()
    for list_key, _index, case, item in items:
        value = item.get(subgroup_key)
        if value is None or value == "":
            missing.setdefault(list_key, []).append(case)
            continue
        if list_key == "training":
            training_counts[str(value)] += 1
        if subgroups is not None and str(value) not in subgroups:
            msg = (
                f"{subgroup_key!r} value {value!r} is not one of {subgroups}: the case is routed as the unknown "
                f"subgroup; correct the value or add it to subgroups"
            )
            problems.append(Problem("warning", msg, list_key, case, dl_name, subgroup_key, "unknown_subgroup"))
    for list_key, cases in missing.items():
        consequence = "routed as the unknown subgroup"
        if len(cases) == n_items[list_key] and len(cases) > 1:
            msg = f"no item of {list_key!r} has a {subgroup_key!r} attribute: all {len(cases)} are {consequence}"
            problems.append(Problem("warning", msg, list_key, None, dl_name, subgroup_key, "missing_subgroup"))
            continue
        for case in cases:
            msg = f"item has no {subgroup_key!r} attribute: it is {consequence}; add its {subgroup_key}"
            problems.append(Problem("warning", msg, list_key, case, dl_name, subgroup_key, "missing_subgroup"))
    if subgroups is not None and "training" in keys and n_items["training"] > 0:
        for value in subgroups:
            if training_counts[value] == 0:
                msg = (
                    f"subgroup {subgroup_key}={value!r} has no training case: the DRO loss skips it and its dMoE "
                    "router is never trained; add training cases of it or drop it from subgroups"
                )
                problems.append(Problem("warning", msg, "training", None, dl_name, subgroup_key, "empty_subgroup"))
    return problems


def format_report(
    problems: Sequence[Problem],
    datalist_path: str | os.PathLike | None = None,
    counted: Sequence[Problem] | None = None,
) -> str:
    """One line per problem (severity, list, case id, file, message), then a summary line.

    Args:
        problems: the problems to list.
        datalist_path: named in the summary.
        counted: the problems the summary counts (default: ``problems``), e.g. all of them when infos are hidden.
    """
    lines = [str(p) for p in problems]
    counted = problems if counted is None else counted
    counts = Counter(p.severity for p in counted)
    cases = {(p.list_key, p.case) for p in counted if p.case is not None and p.severity == "error"}
    summary = ", ".join(f"{counts[s]} {s}{'s' if counts[s] != 1 else ''}" for s in SEVERITIES)
    where = f" in {datalist_path}" if datalist_path is not None else ""
    verdict = "FAILED" if counts["error"] else "OK"
    lines.append(f"{verdict}: {summary}{where} ({len(cases)} case(s) with errors)")
    return "\n".join(lines)


class CohortCheck:
    """Refuse a bad cohort before the first training step (for a bundle config's ``initialize`` list).

    Example (``train.json``)::

        "cohort_check": {
            "_target_": "scripts.check_data.CohortCheck",
            "datalist": "@datalist", "dataset_dir": "@dataset_dir",
            "subgroup_key": "@subgroup_key", "subgroups": "@subgroups", "patch_size": "@patch_size"
        },
        "initialize": ["$monai.utils.set_determinism(seed=@seed)", "$@cohort_check.run()"]

    Args:
        datalist: the datalist JSON, or a dict of lists (e.g. ``{"training": "@train#dataset#data", ...}``).
        dataset_dir: folder its relative paths resolve against (default: the datalist's folder).
        subgroup_key: item attribute naming the subgroup (``None``: no subgroup checks).
        subgroups: known subgroup values.
        patch_size: training patch (X, Y, Z).
        keys: lists to check (training needs ``training`` and ``validation``).
        require_label: whether ``testing`` items need a label.
        strict_paths: refuse paths that escape ``dataset_dir``.
        num_workers: threads reading files.
    """

    def __init__(
        self,
        datalist: str | os.PathLike | Mapping,
        dataset_dir: str | os.PathLike | None = None,
        subgroup_key: str | None = "stage",
        subgroups: Sequence[str] | None = None,
        patch_size: Sequence[int] | None = None,
        keys: Sequence[str] = ("training", "validation"),
        require_label: bool = True,
        strict_paths: bool = False,
        num_workers: int = 1,
    ) -> None:
        if not isinstance(datalist, (str, os.PathLike, Mapping)):
            raise TypeError(f"datalist must be a path or a dict of lists, got {type(datalist).__name__}.")
        self.datalist = datalist
        self.kwargs = {
            "subgroup_key": subgroup_key,
            "subgroups": list(subgroups) if subgroups is not None else None,
            "keys": tuple(keys) if not isinstance(keys, str) else keys,
            "patch_size": list(patch_size) if patch_size is not None else None,
            "require_label": require_label,
            "strict_paths": strict_paths,
            "num_workers": num_workers,
        }
        self.dataset_dir = dataset_dir
        self.problems: list[Problem] = []

    def run(self) -> list[Problem]:
        """Check the cohort; log warnings and infos.

        Returns:
            the problems found (warnings and infos only, as errors raise).

        Raises:
            ValueError: when any error is found; the message lists every error.
        """
        self.problems = check_datalist(self.datalist, self.dataset_dir, **self.kwargs)
        for p in self.problems:
            if p.severity == "warning":
                logger.warning("cohort check: %s", p)
            elif p.severity == "info":
                logger.info("cohort check: %s", p)
        errors = [p for p in self.problems if p.is_error]
        if isinstance(self.datalist, Mapping):  # the lists a config will train on (e.g. set by MONAI Label)
            sizes = ", ".join(f"{k} {len(v) if isinstance(v, Sequence) else '?'}" for k, v in self.datalist.items())
            what, report = f"the configured data lists ({sizes} items)", "--datalist <your datalist.json>"
        else:
            what, report = str(self.datalist), f"--datalist {self.datalist}"
        if errors:
            listing = "\n".join(f"  {p}" for p in errors)
            raise ValueError(
                f"cohort check of {what} found {len(errors)} error(s); fix them before training (full "
                f"report: python bundle/scripts/check_data.py {report}):\n{listing}"
            )
        n_warnings = sum(p.severity == "warning" for p in self.problems)
        logger.info("cohort check of %s passed (%d warning(s)).", what, n_warnings)
        return self.problems

    def __call__(self) -> list[Problem]:
        """Same as :meth:`run`."""
        return self.run()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Check a datalist and every volume it lists; report every problem at once.",
        epilog="Exit status: 0 no errors (warnings allowed), 1 errors found, 2 usage error.",
    )
    parser.add_argument("--datalist", required=True, help="datalist JSON with training/validation/testing lists")
    parser.add_argument("--dataset-dir", default=None, help="folder relative paths start from (default: its folder)")
    parser.add_argument("--subgroup-key", default="stage", help="item attribute naming the subgroup (default: stage)")
    parser.add_argument("--subgroups", default=None, help="comma-separated subgroup values, e.g. T1,T2,T3,T4")
    parser.add_argument("--no-subgroups", action="store_true", help="skip the subgroup checks")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated lists to check")
    parser.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None)
    parser.add_argument("--unlabelled-testing", action="store_true", help="testing items need no label")
    parser.add_argument("--strict-paths", action="store_true", help="paths must stay inside the dataset folder")
    parser.add_argument("--workers", type=int, default=1, help="threads reading files (default 1)")
    parser.add_argument("-q", "--quiet", action="store_true", help="list errors and warnings only (infos counted)")
    args = parser.parse_args(argv)
    args.keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    if not args.keys:
        parser.error("--keys must name at least one list")
    if args.subgroups is not None:
        args.subgroups = [s.strip() for s in args.subgroups.split(",") if s.strip()]
        if not args.subgroups:
            parser.error("--subgroups must name at least one value")
    if args.patch_size is not None and min(args.patch_size) < 1:
        parser.error(f"--patch-size must be positive voxel counts, got {args.patch_size}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 no errors, 1 errors; usage errors exit with 2)."""
    args = _parse_args(argv)
    problems = check_datalist(
        args.datalist,
        args.dataset_dir,
        subgroup_key=None if args.no_subgroups else args.subgroup_key,
        subgroups=args.subgroups,
        keys=args.keys,
        patch_size=args.patch_size,
        require_label=not args.unlabelled_testing,
        strict_paths=args.strict_paths,
        num_workers=args.workers,
    )
    shown = [p for p in problems if p.severity != "info"] if args.quiet else problems
    print(format_report(shown, args.datalist, counted=problems))
    errors = [p for p in problems if p.is_error]
    if errors:
        print(final_error_line(errors, args.datalist), file=sys.stderr, flush=True)
    return 1 if errors else 0


def final_error_line(errors: Sequence[Problem], datalist_path: str | os.PathLike) -> str:
    """The one ``ERROR`` line that ends stderr: the number of errors and the first one (file, problem, fix)."""
    first = errors[0]
    where = f"case {first.case} ({first.list_key}), " if first.case is not None else ""
    return (
        f"ERROR check_data: {len(errors)} error(s) in {datalist_path}; first: {where}{first.file or datalist_path}: "
        f"{first.message}"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
