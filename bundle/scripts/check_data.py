"""Validate a datalist and the images it lists (3D volumes or 2D images) before any training step runs.

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
  ``..``; not empty; header and data both readable (a truncated ``.nii.gz`` or PNG fails only when its data is
  decoded); one image of the cohort's dimension: in 3D one volume (not 2D, not several channels or time points),
  in 2D one image (not a 3D volume; a label of one channel);
- image against label: same size, and for NIfTI the same affine (to ``affine_tol`` mm; the in-plane 3x3 affine
  of a 2D NIfTI); PNG, JPEG and NPZ have no affine: their pixel sizes are the grid;
- label values: 0 and 1, or with ``num_classes`` the integers ``0..num_classes-1`` (values outside are named
  with their counts; a 0/255 mask in a binary cohort is named as such; an all-zero label is a warning; with
  ``num_classes`` a class no label holds is a warning); image voxels finite (no NaN or Inf);
- 2D images: the same channel count as most images, not a palette image (warnings);
- an image smaller than the patch (``info``: it is padded, or resized by the 2D profile);
- subgroups: each item's ``subgroup_key`` value present and one of ``subgroups`` (a warning: it is routed as
  *unknown*); every subgroup has training cases (a warning: the DRO loss skips an empty group).

Formats and dimension. NIfTI (``.nii``, ``.nii.gz``, ``.hdr``/``.img``, ``.mgz``), PNG, JPEG (``.jpg``,
``.jpeg``) and NPZ are opened; a folder (a DICOM series) or another format is reported as ``info`` and its
contents are not inspected. The cohort is 2D or 3D as ``patch_size`` has 2 or 3 entries; without it, as most
readable images are (3D on a tie); a file of the other dimension is an error naming it. Each file's dimension and
channels, with sizes in the axis order MONAI's ``LoadImage`` gives:

- NIfTI: 2 dimensions (X, Y) are a 2D image, 3 or more a 3D volume (a single slice (X, Y, 1) is 3D);
- PNG/JPEG: 2D, size (width, height); channels are the PIL bands (L, P, I, I;16, F and 1: 1; LA: 2; RGB and
  YCbCr: 3; RGBA and CMYK: 4); a palette (P) label holds its palette indices as class values;
- NPZ (its one array, or the array named ``image``/``label`` after the datalist key): (H, W) is 2D grey,
  (H, W, C) with C of 1, 3 or 4 is 2D channels-last, any other 3+ dimensional array a 3D volume.

Severities: ``error`` (training or inference would fail or silently learn from wrong data), ``warning``
(runs, but probably not as intended), ``info`` (expected behaviour worth knowing).

Command line (exit status 0 without errors, 1 with errors, 2 for usage errors)::

    python bundle/scripts/check_data.py --datalist DIR/datalist.json [--dataset-dir DIR]
        [--subgroup-key stage --subgroups T1,T2,T3,T4] [--patch-size 64 64 32 | --patch-size 64 64]
        [--num-classes 3] [--strict-paths]

From a bundle config, :class:`CohortCheck` refuses a bad cohort in ``initialize``::

    "cohort_check": {"_target_": "scripts.check_data.CohortCheck", "datalist": "@datalist", ...},
    "initialize": ["$@cohort_check.run()"]
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
_2D_SUFFIXES = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "NPZ": (".npz",)}
#: sizes of the last axis of a 3-dimensional NPZ array read as channels-last (H, W, C) rather than a 3D volume
_NPZ_CHANNELS = (1, 3, 4)
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
    """What one read of one file tells (the pixel/voxel data itself is not kept)."""

    kind: str = "read"  # "read" (an image file whose data was read), "folder", "other" or "unreadable"
    fmt: str = "NIfTI"  # "NIfTI", "PNG", "JPEG" or "NPZ"
    shape: tuple[int, ...] | None = None  # NIfTI and NPZ: as stored; PNG/JPEG: (width, height), as LoadImage reads it
    spatial_dims: int = 3
    channels: int = 1
    mode: str | None = None  # PNG/JPEG: the PIL mode ("L", "RGB", "P" ...)
    affine: np.ndarray | None = None  # NIfTI only; a 3x3 in-plane affine for a 2D NIfTI
    error: str | None = None  # the reason a file could not be read
    error_code: str = ""
    n_nan: int = 0
    n_inf: int = 0
    bad_values: tuple[float, ...] = ()  # label values outside the classes (at most _MAX_VALUES_SHOWN)
    bad_counts: tuple[int, ...] = ()  # voxels holding each of bad_values
    n_bad_voxels: int = 0
    n_bad_distinct: int = 0  # distinct bad values (in the first 2**20 bad voxels)
    n_foreground: int = -1  # label voxels of a class other than 0 (-1: not counted)
    classes: tuple[int, ...] = ()  # classes present in a label (counted only with num_classes)

    @property
    def size(self) -> tuple[int, ...]:
        """The spatial size: the first ``spatial_dims`` entries of the shape."""
        return self.shape[: self.spatial_dims]


def _format_of(path: str) -> str | None:
    """The format read from the file name: ``"NIfTI"``, ``"PNG"``, ``"JPEG"``, ``"NPZ"`` or ``None`` (another)."""
    lower = path.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return "NIfTI"
    return next((fmt for fmt, suffixes in _2D_SUFFIXES.items() if lower.endswith(suffixes)), None)


def _failed(error_code: str, e: Exception | str, **known) -> tuple[_FileSummary, None]:
    error = e if isinstance(e, str) else f"{type(e).__name__}: {e}".strip()
    return _FileSummary(kind="unreadable", error=error, error_code=error_code, **known), None


def _read_nifti(path: str) -> tuple[_FileSummary, np.ndarray | None]:
    """Header, then voxel data (a truncated ``.nii.gz`` fails only when its data is decompressed)."""
    import nibabel as nib  # imported here: the module is importable (and its CLI parses) without it

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many types (ImageFileError, HeaderDataError, OSError ...)
        return _failed("unreadable_header", e)
    dims = 2 if len(shape) == 2 else 3
    if dims == 2:
        affine = affine[np.ix_([0, 1, 3], [0, 1, 3])]  # the in-plane rows and columns
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # EOFError / BadGzipFile / zlib.error / OSError on truncated or corrupt data
        return _failed("corrupt_data", e, shape=shape, affine=affine, spatial_dims=dims)
    return _FileSummary(shape=shape, affine=affine, spatial_dims=dims), data


def _read_pil(path: str) -> tuple[_FileSummary, np.ndarray | None]:
    """PNG/JPEG: size and mode from the header, then the pixels (a truncated file fails only when decoded).

    Channels are the image's bands as MONAI's ``PILReader`` returns them: 1 for L, P (palette indices), 1, I, I;16
    and F; 2 for LA; 3 for RGB and YCbCr; 4 for RGBA and CMYK.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            size, mode, channels = tuple(int(s) for s in img.size), img.mode, len(img.getbands())
            try:
                img.load()
                data = np.asarray(img)
            except Exception as e:  # OSError "image file is truncated", zlib / decoder errors
                return _failed("corrupt_data", e, shape=size, spatial_dims=2, channels=channels, mode=mode)
    except Exception as e:  # UnidentifiedImageError, OSError
        return _failed("unreadable_header", e)
    return _FileSummary(shape=size, spatial_dims=2, channels=channels, mode=mode), data


def _npz_array(path: str, role: str) -> np.ndarray:
    """The NPZ's one array, or the one named after ``role`` (``image``/``label``); raises ``KeyError`` otherwise."""
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # a .npy file named .npz: numpy and MONAI read it all the same
        return loaded
    with loaded:
        keys = list(loaded.files)
        if len(keys) != 1 and role not in keys:
            raise KeyError(f"it holds arrays {keys}: store one array, or name them 'image' and 'label'")
        return loaded[keys[0] if len(keys) == 1 else role]


def _read_npz(path: str, role: str) -> tuple[_FileSummary, np.ndarray | None]:
    """NPZ: (H, W) grey; (H, W, C) with C 1, 3 or 4 channels-last; any other 3+ dimensional array a 3D volume."""
    try:
        data = _npz_array(path, role)
    except KeyError as e:
        return _failed("npz_keys", str(e.args[0]))
    except Exception as e:  # BadZipFile, ValueError (pickled data, bad header), OSError, zlib.error
        return _failed("unreadable_header", e)
    shape = tuple(int(s) for s in data.shape)
    if len(shape) < 2:
        return _failed("unreadable_header", f"it holds an array of shape {shape}, not an image", shape=shape)
    if len(shape) == 2 or (len(shape) == 3 and shape[2] in _NPZ_CHANNELS):
        return _FileSummary(shape=shape, spatial_dims=2, channels=1 if len(shape) == 2 else shape[2]), data
    return _FileSummary(shape=shape, spatial_dims=3), data


def _label_stats(summary: _FileSummary, data: np.ndarray, num_classes: int | None) -> None:
    """Label values outside ``0..num_classes-1`` (0 and 1 without ``num_classes``), foreground, classes present."""
    n_classes = num_classes or 2
    ok = (data >= 0) & (data <= n_classes - 1)
    if data.dtype.kind == "f":
        ok &= data == np.floor(data)
    if not ok.all():
        bad = data[~ok]
        summary.n_bad_voxels = int(bad.size)
        distinct = np.unique(bad[: 1 << 20])  # a sample is enough to name a few offending values
        shown = distinct[:_MAX_VALUES_SHOWN]
        summary.bad_values = tuple(float(v) for v in shown)
        summary.bad_counts = tuple(int(np.count_nonzero(bad == v if v == v else bad != bad)) for v in shown)
        summary.n_bad_distinct = int(distinct.size)
    summary.n_foreground = int(np.count_nonzero(ok & (data != 0)))
    if num_classes is not None:
        present = np.bincount(data[ok].astype(np.int64).ravel(), minlength=n_classes)
        summary.classes = tuple(int(c) for c in np.flatnonzero(present))


def _inspect(path: str, role: str, num_classes: int | None = None) -> _FileSummary:
    """Read one file once: header, then pixel/voxel data; keep only what the checks need.

    Args:
        path: an existing, non-empty file or folder.
        role: ``"image"`` (counts non-finite voxels) or ``"label"`` (collects values outside the classes).
        num_classes: the label classes (``None``: 0 and 1).
    """
    if os.path.isdir(path):
        return _FileSummary(kind="folder")
    fmt = _format_of(path)
    if fmt is None:
        return _FileSummary(kind="other")
    if fmt == "NIfTI":
        summary, data = _read_nifti(path)
    else:
        summary, data = _read_npz(path, role) if fmt == "NPZ" else _read_pil(path)
    summary.fmt = fmt
    if data is None:
        return summary
    if role == "label":
        _label_stats(summary, data, num_classes)
    elif data.dtype.kind in "fc":
        summary.n_nan = int(np.count_nonzero(np.isnan(data)))
        summary.n_inf = int(np.count_nonzero(np.isinf(data)))
    return summary


def _spatial_shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why a 3-dimensional (or more) ``shape`` is not one 3D volume, or ``None`` when it is."""
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


def _check_arguments(keys, patch_size, subgroups, affine_tol, num_workers, num_classes):
    """Validate :func:`check_datalist`'s arguments; returns ``(patch_size, subgroups)`` normalised."""
    if isinstance(keys, str) or not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keys must be a non-empty list of list names, got {keys!r}.")
    if patch_size is not None:
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) not in (2, 3) or min(patch_size) < 1:
            raise ValueError(
                f"patch_size must be two (2D: H, W) or three (3D: X, Y, Z) positive sizes, got {patch_size!r}."
            )
    if subgroups is not None:
        if isinstance(subgroups, str) or len(subgroups) == 0:
            raise ValueError(f"subgroups must be a non-empty list of values, got {subgroups!r}.")
        subgroups = [str(s) for s in subgroups]
    if affine_tol < 0:
        raise ValueError(f"affine_tol must be >= 0 mm, got {affine_tol}.")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))):
        raise ValueError(f"num_classes must be an integer (classes including background), got {num_classes!r}.")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and at least one class), got {num_classes}.")
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
    num_classes: int | None = None,
) -> list[Problem]:
    """Check a datalist and every file it lists; report all problems at once.

    The phases, each its own function: the items (lists, objects, unique ids), the files (paths that exist and
    are not empty), their contents (each file read once: readable, of the cohort's dimension, finite image, label
    values, image and label on one grid), the cohort (channels, classes), the subgroups.

    Args:
        datalist_path: the datalist JSON (``{"training": [...], "validation": [...], "testing": [...]}``), or
            such a dict already loaded (then ``dataset_dir`` defaults to the working directory).
        dataset_dir: folder relative paths resolve against (MONAI's ``base_dir``); default: the datalist's folder.
        subgroup_key: item attribute that names the subgroup (``None``: no subgroup checks).
        subgroups: the known subgroup values in index order (``None``: only check that the attribute is present).
            Values are compared as strings, case-sensitively, as ``scripts.transforms.SubgroupIndexd`` does.
        keys: the lists to check; a missing one is an error.
        patch_size: training patch, (X, Y, Z) voxels or (H, W) pixels; its length makes the cohort 3D or 2D
            (without it the dimension most images have does); a smaller image is reported as ``info``.
        require_label: whether ``testing`` items must have a ``label`` (``training``/``validation`` always must).
        strict_paths: make a path that escapes ``dataset_dir`` (after resolving symlinks and ``..``) an error.
        affine_tol: largest allowed difference (mm) between the image's and the label's affine entries.
        num_workers: threads reading files (decompression releases the GIL); 1 reads them one after another.
        num_classes: classes including background: labels hold integers ``0..num_classes-1`` and a class no label
            holds is a warning; ``None``: binary labels (0 and 1).

    Returns:
        the problems, in datalist order (datalist, then item by item, then cohort-wide); empty when all is well.

    Raises:
        ValueError: for an invalid argument (not for an invalid cohort: that is what the returned list is for).
    """
    patch_size, subgroups = _check_arguments(keys, patch_size, subgroups, affine_tol, num_workers, num_classes)
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
    summaries = _read_files(to_read, num_workers, num_classes)
    cohort = _cohort_of(summaries, patch_size, affine_tol, num_classes)
    image_users: dict[str, tuple[str, int, str]] = {}
    for item, (paths, found) in zip(items, files):
        problems.extend(found)  # an item's file problems, then its content problems: datalist order
        problems.extend(_content_problems(item, paths, summaries, image_users, cohort))
    problems.extend(_class_problems(summaries, cohort, dl_name))
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


def _read_files(
    to_read: Mapping[tuple[str, str], None], num_workers: int, num_classes: int | None = None
) -> dict[tuple[str, str], _FileSummary]:
    """Read every ``(path, role)`` once, on ``num_workers`` threads."""

    def read(path_role: tuple[str, str]) -> _FileSummary:
        return _inspect(*path_role, num_classes)

    if num_workers > 1 and len(to_read) > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            return dict(zip(to_read, pool.map(read, to_read)))
    return {pr: read(pr) for pr in to_read}


@dataclass(frozen=True)
class _Cohort:
    """What the content checks of every item share."""

    dims: int  # spatial dimensions: 2 or 3
    reason: str  # why the cohort has ``dims`` (named in the error of a file that has not)
    patch_size: tuple[int, ...] | None
    affine_tol: float
    num_classes: int | None
    channels: int | None  # channels of most 2D images (None in 3D or when no image was read)

    @property
    def unit(self) -> str:
        return "pixel" if self.dims == 2 else "voxel"


def _cohort_of(summaries: Mapping[tuple[str, str], _FileSummary], patch_size, affine_tol, num_classes) -> _Cohort:
    """The cohort's dimension (``patch_size``'s length, else that of most readable images; 3 on a tie)."""
    images = [s for (_, role), s in summaries.items() if role == "image" and s.kind == "read"]
    if patch_size is not None:
        dims, reason = len(patch_size), f"patch_size {'x'.join(map(str, patch_size))}"
    else:
        counts = Counter(s.spatial_dims for s in images)
        dims = 2 if counts[2] > counts[3] else 3
        reason = f"{counts[dims]} of {len(images)} images are {dims}D"
    common = Counter(s.channels for s in images if s.spatial_dims == 2).most_common(1)
    channels = common[0][0] if dims == 2 and common else None
    return _Cohort(dims, reason, patch_size, affine_tol, num_classes, channels)


def _read_problem(entry: _Item, role: str, path: str, s: _FileSummary) -> Problem | None:
    """Why a file's contents cannot be checked (a folder, another format, unreadable), or ``None``."""
    list_key, _index, case, item = entry
    value = item[role]
    if s.kind == "folder":
        msg = f"{role} {value!r} is a folder (a DICOM series?): its contents are not inspected here"
        return Problem("info", msg, list_key, case, path, role, "not_inspected")
    if s.kind == "other":
        msg = f"{role} {value!r} is not NIfTI, PNG, JPEG or NPZ: its contents are not inspected here"
        return Problem("info", msg, list_key, case, path, role, "not_inspected")
    if s.error_code == "unreadable_header":
        msg = (
            f"cannot read {role} {value!r} as {s.fmt} ({s.error}); the file is truncated, corrupt or not an "
            "image: copy or export it again"
        )
        return Problem("error", msg, list_key, case, path, role, "unreadable")
    if s.error_code == "npz_keys":
        msg = f"cannot read {role} {value!r}: {s.error}"
        return Problem("error", msg, list_key, case, path, role, "unreadable")
    if s.error_code == "corrupt_data":
        msg = (
            f"{role} {value!r} is truncated or corrupt: its header reads but its {s.fmt} data does not "
            f"({s.error}); copy or export it again"
        )
        return Problem("error", msg, list_key, case, path, role, "corrupt")
    return None


def _dims_problem(role: str, s: _FileSummary, cohort: _Cohort) -> tuple[str, str] | None:
    """``(code, why)`` a readable file is not one image of the cohort's dimension (or a 2D label has channels)."""
    if cohort.dims == 3:
        if s.spatial_dims == 2:
            why = "a 2D image, but a 3D volume (X, Y, Z) is expected; export the whole series as one 3D volume"
            return "not_3d", f"has shape {s.shape}: {why}"
        why = _spatial_shape_problem(s.shape)
        return None if why is None else ("not_3d", why)
    if s.spatial_dims == 3:
        why = (
            f"has shape {s.shape}: a 3D volume, but the cohort is 2D ({cohort.reason}); list one 2D image per item "
            "(PNG, JPEG, NPZ (H, W) or 2D NIfTI; a single slice (H, W, 1) saved as (H, W))"
        )
        return "not_2d", why
    if min(s.size) <= 1:
        return "not_2d", f"has size {_size_text(s.size)}: a single row or column, not a 2D image; check the export"
    if role == "label" and s.channels > 1:
        what = f"mode {s.mode}" if s.mode else f"shape {s.shape}"
        why = (
            f"has {s.channels} channels ({what}): a label must be one channel of class indices; save it as a "
            "single-channel (greyscale, mode L) PNG or an (H, W) array"
        )
        return "label_channels", why
    return None


def _unusable_file(entry: _Item, role: str, path: str, s: _FileSummary, cohort: _Cohort) -> Problem | None:
    """Why a file's contents cannot be checked (not read, not one image of the cohort's dimension), or ``None``."""
    problem = _read_problem(entry, role, path, s)
    if problem is not None:
        return problem
    found = _dims_problem(role, s, cohort)
    if found is None:
        return None
    list_key, _index, case, item = entry
    code, why = found
    return Problem("error", f"{role} {item[role]!r} {why}", list_key, case, path, role, code)


def _size_text(size: Sequence[int]) -> str:
    return "x".join(map(str, size))


def _image_problems(
    entry: _Item, path: str, s: _FileSummary, image_users: dict[str, tuple[str, int, str]], cohort: _Cohort
) -> list[Problem]:
    """An image's voxels are finite; it is not smaller than the patch (info); no other case lists it."""
    list_key, _index, case, item = entry
    value, problems, patch_size = item["image"], [], cohort.patch_size
    if s.n_nan or s.n_inf:
        msg = (
            f"image {value!r} has {s.n_nan} NaN and {s.n_inf} infinite {cohort.unit}s; replace them (e.g. with "
            f"{'-1024 HU, air' if cohort.dims == 3 else '0'}) before training: one NaN makes the loss NaN"
        )
        problems.append(Problem("error", msg, list_key, case, path, "image", "non_finite"))
    if patch_size is not None and any(n < p for n, p in zip(s.size, patch_size)):
        msg = (
            f"image {value!r} ({_size_text(s.size)} {cohort.unit}s) is smaller than the patch "
            f"{_size_text(patch_size)}: it will be {'padded' if cohort.dims == 3 else 'resized or padded'} "
            "(compared before resampling)"
        )
        problems.append(Problem("info", msg, list_key, case, path, "image", "smaller_than_patch"))
    problems.extend(_image_format_problems(entry, path, s, cohort))
    first_user = image_users.setdefault(path, entry[:3])  # (list, index, case) of the first item listing it
    if first_user != entry[:3]:
        msg = (
            f"image {value!r} is also the image of {first_user[0]} case {first_user[2]}; list each case once "
            "(across lists it leaks test data)"
        )
        problems.append(Problem("warning", msg, list_key, case, path, "image", "duplicate_image"))
    return problems


def _image_format_problems(entry: _Item, path: str, s: _FileSummary, cohort: _Cohort) -> list[Problem]:
    """A 2D image has the channels most images have; it is not a palette image (warnings)."""
    list_key, _index, case, item = entry
    problems = []
    if cohort.channels is not None and s.channels != cohort.channels:
        msg = (
            f"image {item['image']!r} has {s.channels} channel(s) but most images have {cohort.channels}: the "
            "network takes one in_channels; convert all images to greyscale or all to RGB"
        )
        problems.append(Problem("warning", msg, list_key, case, path, "image", "mixed_channels"))
    if s.mode == "P":
        msg = (
            f"image {item['image']!r} is a palette (mode P) image: it is read as palette indices, not colours or "
            "intensities; convert it to RGB or greyscale (mode L)"
        )
        problems.append(Problem("warning", msg, list_key, case, path, "image", "palette_image"))
    return problems


def _bad_label_message(value: str, s: _FileSummary, cohort: _Cohort) -> str:
    """What is wrong with a label holding values outside the classes, and what to do."""
    more = " ..." if s.n_bad_distinct > len(s.bad_values) else ""
    unit, n_classes = cohort.unit, cohort.num_classes
    if n_classes in (None, 2) and s.bad_values == (255.0,) and s.n_foreground == 0:
        msg = (
            f"label {value!r} holds 0 and 255 ({s.n_bad_voxels} {unit}(s) of 255): it looks like a 0/255 mask, but "
            "a binary label holds 0 and 1; write it as 0/1 (label // 255), as the cohort preparers do"
        )
    elif n_classes is None:
        target = "CTV" if cohort.dims == 3 else "target"
        msg = (
            f"label {value!r} has values other than 0 and 1: {_format_values(s.bad_values)}{more} in "
            f"{s.n_bad_voxels} {unit}(s); the {target} label must be binary: keep only the {target} (label == its "
            "value) or binarise it (label > 0)"
        )
        if cohort.dims == 2:
            msg += ", or pass num_classes (--num-classes) for a multi-class label"
    else:
        counts = ", ".join(f"{v:g} ({n} {unit}(s))" for v, n in zip(s.bad_values, s.bad_counts))
        msg = (
            f"label {value!r} has values outside 0..{n_classes - 1} (num_classes {n_classes}): {counts}{more}, "
            f"{s.n_bad_voxels} {unit}(s) in all; class indices must be integers 0..{n_classes - 1}: map the "
            "export's values to class indices, or raise num_classes"
        )
    if s.fmt == "JPEG":
        msg += "; JPEG compression changes pixel values: save labels as PNG"
    return msg


def _label_problems(entry: _Item, path: str, s: _FileSummary, cohort: _Cohort) -> list[Problem]:
    """A label holds only class values (error), and some foreground (warning)."""
    list_key, _index, case, item = entry
    value = item["label"]
    if s.bad_values:
        msg = _bad_label_message(value, s, cohort)
        return [Problem("error", msg, list_key, case, path, "label", "label_values")]
    if s.n_foreground == 0:
        what = f"no {cohort.unit} is 1" if cohort.num_classes is None else f"every {cohort.unit} is 0"
        msg = f"label {value!r} is empty ({what}): the case has no target; check the export"
        return [Problem("warning", msg, list_key, case, path, "label", "empty_label")]
    return []


def _grid_problem(entry: _Item, label_path: str, img: _FileSummary, lab: _FileSummary, cohort: _Cohort):
    """Image and label on one grid: same size, affines (NIfTI) within ``affine_tol`` mm; the problem or ``None``."""
    list_key, _index, case, item = entry
    if img.size != lab.size:
        if cohort.dims == 3:
            msg = (
                f"image {item['image']!r} has shape {img.size} but label {item['label']!r} has shape "
                f"{lab.size}; resample the label onto the image grid (nearest neighbour)"
            )
        else:
            msg = (
                f"image {item['image']!r} is {_size_text(img.size)} pixels but label {item['label']!r} is "
                f"{_size_text(lab.size)}; save the label at the image's size (nearest neighbour)"
            )
            if img.size == lab.size[::-1]:
                msg += " (transposed? a PNG/JPEG is read as width x height, an NPZ array as rows x columns)"
        return Problem("error", msg, list_key, case, label_path, "label", "shape_mismatch")
    if img.affine is None or lab.affine is None:  # PNG, JPEG, NPZ: no affine, the pixel sizes are the grid
        return None
    diff = float(np.max(np.abs(img.affine - lab.affine)))
    if diff > cohort.affine_tol:
        msg = (
            f"image {item['image']!r} and label {item['label']!r} have different affines (up to "
            f"{diff:.4g} mm apart, tolerance {cohort.affine_tol:g} mm): the label is not on the image grid; "
            "export both from the same series or resample the label onto the image"
        )
        return Problem("error", msg, list_key, case, label_path, "label", "affine_mismatch")
    return None


def _content_problems(
    entry: _Item,
    paths: Mapping[str, str],
    summaries: Mapping[tuple[str, str], _FileSummary],
    image_users: dict[str, tuple[str, int, str]],
    cohort: _Cohort,
) -> list[Problem]:
    """Phase 3, the contents of one item's files (read once, in ``summaries``), then image against label."""
    problems: list[Problem] = []
    ok: dict[str, _FileSummary] = {}
    for role, path in paths.items():
        s = summaries[(path, role)]
        unusable = _unusable_file(entry, role, path, s, cohort)
        if unusable is not None:
            problems.append(unusable)
            continue
        ok[role] = s
        if role == "image":
            problems.extend(_image_problems(entry, path, s, image_users, cohort))
        else:
            problems.extend(_label_problems(entry, path, s, cohort))
    if "image" in ok and "label" in ok:
        grid = _grid_problem(entry, paths["label"], ok["image"], ok["label"], cohort)
        if grid is not None:
            problems.append(grid)
    return problems


def _class_problems(summaries: Mapping[tuple[str, str], _FileSummary], cohort: _Cohort, dl_name: str) -> list[Problem]:
    """With ``num_classes``: a class that no label of the cohort holds (a warning per class)."""
    if cohort.num_classes is None:
        return []
    labels = [
        s
        for (_, role), s in summaries.items()
        if role == "label" and s.kind == "read" and s.spatial_dims == cohort.dims and s.channels == 1
    ]
    seen = {c for s in labels for c in s.classes}
    problems = []
    for c in range(cohort.num_classes) if labels else ():
        if c not in seen:
            msg = (
                f"class {c} (of num_classes {cohort.num_classes}) appears in none of the {len(labels)} labels: the "
                "network never learns it; check num_classes (out_channels) or the label export"
            )
            problems.append(Problem("warning", msg, None, None, dl_name, "label", "missing_class"))
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
        patch_size: training patch, (X, Y, Z) for a 3D cohort or (H, W) for a 2D one.
        keys: lists to check (training needs ``training`` and ``validation``).
        require_label: whether ``testing`` items need a label.
        strict_paths: refuse paths that escape ``dataset_dir``.
        num_workers: threads reading files.
        num_classes: classes including background (labels hold ``0..num_classes-1``); ``None``: binary (0 and 1).
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
        num_classes: int | None = None,
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
            "num_classes": num_classes,
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
        description="Check a datalist and every image it lists (3D or 2D); report every problem at once.",
        epilog="Exit status: 0 no errors (warnings allowed), 1 errors found, 2 usage error.",
    )
    parser.add_argument("--datalist", required=True, help="datalist JSON with training/validation/testing lists")
    parser.add_argument("--dataset-dir", default=None, help="folder relative paths start from (default: its folder)")
    parser.add_argument("--subgroup-key", default="stage", help="item attribute naming the subgroup (default: stage)")
    parser.add_argument("--subgroups", default=None, help="comma-separated subgroup values, e.g. T1,T2,T3,T4")
    parser.add_argument("--no-subgroups", action="store_true", help="skip the subgroup checks")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated lists to check")
    parser.add_argument(
        "--patch-size", type=int, nargs="+", metavar="N", default=None, help="training patch: X Y Z (3D) or H W (2D)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classes including background (default: binary labels 0/1)"
    )
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
    if args.patch_size is not None and (len(args.patch_size) not in (2, 3) or min(args.patch_size) < 1):
        parser.error(f"--patch-size must be 2 (H W) or 3 (X Y Z) positive sizes, got {args.patch_size}")
    if args.num_classes is not None and args.num_classes < 2:
        parser.error(f"--num-classes must be >= 2 (background and one class), got {args.num_classes}")
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
        num_classes=args.num_classes,
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
