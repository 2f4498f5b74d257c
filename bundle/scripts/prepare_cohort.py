"""Turn a DICOM cohort (planning CT + RTSTRUCT per case) into the NIfTI datalist the bundle trains on.

Usage::

    python bundle/scripts/prepare_cohort.py --dicom-root DIR --attributes cases.csv --out OUT \
        [--roi CTV --roi-synonyms CTV_High,CTV1] [--allow-resample] [--skip-bad] [--overwrite]

``cases.csv`` has one row per case: an ``id`` column, optionally ``dicom_dir`` (the case folder, relative to
``--dicom-root`` or absolute; default ``DIR/<id>``) and ``series_uid`` (the CT series to use when a folder
holds several), and any number of attribute columns (stage, institution, ...), copied as strings into every
datalist item.

For each case the CT series is read and checked (:mod:`scripts.dicom_series`), the RTSTRUCT of the folder that
references it is found, the ROI is rasterised on the CT grid (:mod:`scripts.rtstruct`), and
``OUT/images/<id>.nii.gz`` (int16 HU) and ``OUT/labels/<id>.nii.gz`` (uint8) are written with the RAS affine
of the series, ``(X, Y, Z)`` arrays, the same as MONAI ``LoadImage`` reads. ``OUT/datalist.json`` holds
``{"training": [...], "validation": [...], "testing": [...]}`` (items ``{"id", "image", "label", <attributes>}``,
paths relative to ``OUT``): a 60/20/20 split, stratified by ``--split-by COLUMN`` or else random with ``--seed``.

Failures are never silent: every failed case is logged and listed in ``OUT/prepare_report.json``; the exit
status is 1 and no datalist is written when a case failed, unless ``--skip-bad``. A failed case leaves no
output files. Nothing is written into the input folders, and only case ids and UIDs are logged.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the bundle root importable, as `monai.bundle run` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from scripts.dicom_series import (  # noqa: E402
    DicomSeriesError,
    SeriesInfo,
    group_by_series,
    list_candidate_files,
    read_ct_series,
)
from scripts.rtstruct import (  # noqa: E402
    DEFAULT_CTV_SYNONYMS,
    ReferenceMismatchError,
    RoiNotFoundError,
    RTStructError,
    check_references,
    find_roi,
    rasterise_roi,
    read_rtstruct,
)
from scripts.safe_io import atomic_write_json, default_file_mode  # noqa: E402
from scripts.synthetic import stratified_split  # noqa: E402

logger = logging.getLogger("prepare_cohort")

ID_COLUMN = "id"
DIR_COLUMN = "dicom_dir"
SERIES_COLUMN = "series_uid"
MAPPING_COLUMNS = (ID_COLUMN, DIR_COLUMN, SERIES_COLUMN)


class CohortError(ValueError):
    """A problem with the cohort as a whole (attributes file, output folder)."""


class CaseError(ValueError):
    """A case cannot be prepared (no RTSTRUCT, several candidates, ...)."""


@dataclass
class CohortReport:
    """Outcome of :func:`prepare_cohort`.

    Attributes:
        prepared: datalist items written.
        failed: ``(case id, error message)`` of each failed case.
        datalist: path of the datalist, or None when it was not written.
    """

    prepared: list[dict] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    datalist: Path | None = None


# ------------------------------------------------------------------------------------------------ inputs


def read_attributes(csv_path: str | Path) -> list[dict[str, str]]:
    """Read the per-case attribute table.

    Raises:
        CohortError: no ``id`` column, an empty, unsafe or duplicated id.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or ID_COLUMN not in reader.fieldnames:
            raise CohortError(f"{csv_path}: needs an {ID_COLUMN!r} column; columns are {reader.fieldnames}.")
        rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):
        case_id = row[ID_COLUMN]
        if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith("."):
            raise CohortError(f"{csv_path} line {number}: invalid case id {case_id!r} (must be a plain file name).")
        if case_id in seen:
            raise CohortError(f"{csv_path} line {number}: duplicate case id {case_id!r}.")
        seen.add(case_id)
    return rows


def case_folder(row: dict[str, str], dicom_root: Path) -> Path:
    """The DICOM folder of a case: ``dicom_dir`` (relative to the root or absolute) or ``root/<id>``."""
    given = row.get(DIR_COLUMN, "")
    return (dicom_root / given) if given else dicom_root / row[ID_COLUMN]


def find_rtstruct(folder: Path, info: SeriesInfo, roi_names: Sequence[str]) -> Path:
    """Find the RTSTRUCT of a case folder that references the CT ``info`` and holds the ROI.

    Raises:
        CaseError: no RTSTRUCT, or several that qualify (lists them).
        ReferenceMismatchError: RTSTRUCTs exist but none references this CT.
        RoiNotFoundError: the referencing RTSTRUCTs hold no ROI of the names (lists those available).
    """
    groups = group_by_series(list_candidate_files(folder, recursive=True))
    paths = [p for members in groups.values() for p, ds in members if str(ds.get("Modality", "")) == "RTSTRUCT"]
    if not paths:
        raise CaseError(f"No RTSTRUCT in {folder}.")
    referencing, mismatches, available = [], [], []
    for path in paths:
        ds = read_rtstruct(path)
        try:
            check_references(ds, info)
        except ReferenceMismatchError as err:
            mismatches.append(f"{path.name}: {err}")
            continue
        try:
            find_roi(ds, roi_names)
        except RoiNotFoundError:
            available.extend(str(item.get("ROIName", "")) for item in ds.StructureSetROISequence)
            continue
        referencing.append(path)
    if not referencing:
        if available:
            raise RoiNotFoundError(f"No ROI named any of {list(roi_names)} in {folder}; available ROIs: {available}.")
        raise ReferenceMismatchError(f"No RTSTRUCT in {folder} references CT {info.series_instance_uid}: {mismatches}")
    if len(referencing) > 1:
        raise CaseError(f"Several RTSTRUCTs in {folder} hold the ROI: {[p.name for p in referencing]}; keep one.")
    return referencing[0]


# ------------------------------------------------------------------------------------------------ outputs


def nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """NIfTI image of an ``(X, Y, Z)`` array with a RAS affine in both qform and sform (code 1, scanner)."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def save_case(out: Path, case_id: str, volume: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> tuple[str, str]:
    """Write image and label of a case all-or-nothing (temporary files, then renames).

    Returns:
        Paths of image and label relative to ``out``.
    """
    targets = [out / "images" / f"{case_id}.nii.gz", out / "labels" / f"{case_id}.nii.gz"]
    hu = np.clip(np.round(volume), -32768, 32767).astype(np.int16)
    images = [nifti(hu, affine), nifti((mask > 0).astype(np.uint8), affine)]
    temps: list[Path] = []
    try:
        for target, image in zip(targets, images):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{case_id}.", suffix=".nii.gz", dir=target.parent)
            os.close(fd)
            temps.append(Path(tmp))
            nib.save(image, tmp)
            os.chmod(tmp, default_file_mode())
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
    except BaseException:
        for path in temps + targets:
            path.unlink(missing_ok=True)
        raise
    return tuple(str(t.relative_to(out)) for t in targets)  # type: ignore[return-value]


def _check_output_folder(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output folder inside an input folder, or a non-empty one without ``overwrite``."""
    resolved = out.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or folder in resolved.parents:
            raise CohortError(f"--out {out} is inside the input folder {folder}; choose a folder outside it.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CohortError(f"--out {out} is not empty; pass --overwrite to replace its contents.")


# ------------------------------------------------------------------------------------------------ driver


def prepare_case(
    row: dict[str, str], dicom_root: Path, out: Path, roi_names: Sequence[str], allow_resample: bool
) -> dict:
    """Prepare one case; returns its datalist item. Raises on any problem (outputs are all-or-nothing)."""
    case_id = row[ID_COLUMN]
    folder = case_folder(row, dicom_root)
    volume, info = read_ct_series(folder, row.get(SERIES_COLUMN) or None, allow_resample=allow_resample, recursive=True)
    rtstruct = find_rtstruct(folder, info, roi_names)
    mask = rasterise_roi(rtstruct, info, roi_names)
    if not mask.any():
        raise CaseError(f"ROI of {rtstruct.name} is empty on CT {info.series_instance_uid}.")
    image, label = save_case(out, case_id, volume, mask, info.affine_ras)
    logger.info(
        "Case %s: series %s, %s voxels, ROI %d voxels", case_id, info.series_instance_uid, volume.shape, mask.sum()
    )
    attributes = {k: v for k, v in row.items() if k not in MAPPING_COLUMNS}
    return {"id": case_id, "image": image, "label": label, **attributes}


def split_cases(items: list[dict], split_by: str | None, seed: int) -> dict[str, list[dict]]:
    """Deal items 60/20/20 into ``training``/``validation``/``testing``, stratified by ``split_by`` when given.

    Without ``split_by`` the split is random with ``seed`` (the same dealing with a single stratum).
    """
    if split_by is not None:
        return stratified_split(items, split_by, seed)
    marker = "__split_stratum__"
    parts = stratified_split([{**item, marker: ""} for item in items], marker, seed)
    return {name: [{k: v for k, v in item.items() if k != marker} for item in part] for name, part in parts.items()}


def prepare_cohort(
    dicom_root: str | Path,
    attributes_csv: str | Path,
    out: str | Path,
    roi_names: Sequence[str] = DEFAULT_CTV_SYNONYMS,
    *,
    allow_resample: bool = False,
    skip_bad: bool = False,
    overwrite: bool = False,
    split_by: str | None = None,
    seed: int = 0,
) -> CohortReport:
    """Prepare every case of the attribute table (see the module docstring).

    With ``split_by`` (an attribute column, e.g. ``stage``) the cases are split 60/20/20 into ``training``,
    ``validation`` and ``testing``, stratified by that column (cases with a ``hard`` column set to true are dealt
    first, as in the synthetic cohort); without it the 60/20/20 split is random, seeded by ``seed``. The three
    lists are always written.

    Returns:
        The report; ``report.datalist`` is None when a case failed and ``skip_bad`` is False.

    Raises:
        CohortError: bad attribute table or output folder (nothing is written then).
    """
    dicom_root, out = Path(dicom_root), Path(out)
    rows = read_attributes(attributes_csv)
    if split_by is not None and any(split_by not in r for r in rows):
        raise CohortError(
            f"--split-by {split_by!r} is not a column of {attributes_csv} (columns: {sorted(rows[0]) if rows else []})."
        )
    _check_output_folder(out, [dicom_root, *(case_folder(r, dicom_root) for r in rows)], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    report = CohortReport()
    for row in rows:
        case_id = row[ID_COLUMN]
        for stale in (out / "images" / f"{case_id}.nii.gz", out / "labels" / f"{case_id}.nii.gz"):
            stale.unlink(missing_ok=True)
        try:
            report.prepared.append(prepare_case(row, dicom_root, out, roi_names, allow_resample))
        except (DicomSeriesError, RTStructError, CaseError) as err:
            logger.error("Case %s failed: %s", case_id, err)
            report.failed.append((case_id, str(err)))
        except Exception as err:  # an unexpected problem fails only this case, and is reported
            logger.exception("Case %s failed unexpectedly", case_id)
            report.failed.append((case_id, f"{type(err).__name__}: {err}"))
    atomic_write_json(
        {
            "prepared": [item["id"] for item in report.prepared],
            "failed": [{"id": i, "error": e} for i, e in report.failed],
        },
        out / "prepare_report.json",
    )
    if report.prepared and (skip_bad or not report.failed):
        report.datalist = out / "datalist.json"
        atomic_write_json(split_cases(report.prepared, split_by, seed), report.datalist)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom-root", required=True, type=Path, help="folder holding one folder per case")
    parser.add_argument("--attributes", required=True, type=Path, help="CSV with an 'id' column and attributes")
    parser.add_argument("--out", required=True, type=Path, help="output folder (images/, labels/, datalist.json)")
    parser.add_argument("--roi", default="CTV", help="ROI name of the target (case-insensitive)")
    parser.add_argument(
        "--roi-synonyms",
        default=",".join(DEFAULT_CTV_SYNONYMS[1:]),
        help="comma-separated other accepted ROI names, in order of preference",
    )
    parser.add_argument("--allow-resample", action="store_true", help="resample missing/irregular slices")
    parser.add_argument("--skip-bad", action="store_true", help="write the datalist without the failed cases")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    parser.add_argument("--split-by", default=None, help="attribute column to stratify a 60/20/20 split by")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    roi_names = [args.roi] + [name for name in args.roi_synonyms.split(",") if name.strip()]
    try:
        report = prepare_cohort(
            args.dicom_root,
            args.attributes,
            args.out,
            roi_names,
            allow_resample=args.allow_resample,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            split_by=args.split_by,
            seed=args.seed,
        )
    except CohortError as err:
        logger.error("%s", err)
        return 2
    logger.info("Prepared %d case(s); %d failed", len(report.prepared), len(report.failed))
    for case_id, error in report.failed:
        logger.error("FAILED %s: %s", case_id, error)
    if report.failed and not args.skip_bad:
        case_id, error = report.failed[0]
        logger.error(
            "No datalist written: %d case(s) failed, first case %s: %s (fix the cases, or pass --skip-bad; all "
            "failures in %s)",
            len(report.failed), case_id, error, args.out / "prepare_report.json",
        )  # fmt: skip
        return 1
    if not report.prepared:
        logger.error("No case prepared from %s: check --dicom-root and the ids in %s", args.dicom_root, args.attributes)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
