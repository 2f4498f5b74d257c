"""Synthetic heterogeneous radiotherapy cohort (METHOD.md section 5).

Each case is a CT-like phantom in Hounsfield units with a CTV-like target:

- a body (elliptic cylinder of soft tissue) in air, two lungs, a spine and a table;
- a target whose size and irregularity grow with tumour **stage** (T1..T4);
- **institution** effects: noise level, target contrast and slice thickness differ by site;
- imbalanced group sizes (stage and institution frequencies are skewed);
- a planted minority of **hard cases inside every group** (low target contrast, metal streak
  artefacts, unusual target position): the intra-group hidden failures FairDRO is built for.

Everything is deterministic by seed: the same arguments give byte-identical files.

Command line::

    python bundle/scripts/synthetic.py --out DIR --n-cases 60 --seed 0 [--shape 96 96 48]
        [--grouping stage] [--dicom]

writes ``DIR/images/<id>.nii.gz`` (int16 HU), ``DIR/labels/<id>.nii.gz`` (uint8, 0/1) and
``DIR/datalist.json`` with ``training``/``validation``/``testing`` lists. Paths in the datalist are
relative to ``DIR`` (MONAI's ``load_decathlon_datalist`` resolves them against ``base_dir``).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

STAGES = ("T1", "T2", "T3", "T4")
STAGE_FREQ = (0.40, 0.30, 0.20, 0.10)
#: target radius (mm) and irregularity (relative amplitude of the surface modulation) per stage
STAGE_RADIUS_MM = {"T1": 9.0, "T2": 13.0, "T3": 17.0, "T4": 21.0}
STAGE_IRREGULARITY = {"T1": 0.05, "T2": 0.12, "T3": 0.20, "T4": 0.30}


@dataclass(frozen=True)
class Institution:
    """Acquisition profile of one site."""

    name: str
    freq: float
    noise_hu: float  #: standard deviation of the additive noise
    contrast_hu: float  #: target enhancement over soft tissue
    slice_mm: float  #: slice thickness (z spacing)


INSTITUTIONS = (
    Institution("A", 0.55, noise_hu=12.0, contrast_hu=55.0, slice_mm=3.0),
    Institution("B", 0.30, noise_hu=25.0, contrast_hu=45.0, slice_mm=2.5),
    Institution("C", 0.15, noise_hu=40.0, contrast_hu=35.0, slice_mm=3.0),
)
HARD_KINDS = ("low_contrast", "metal_artefact", "unusual_position")
HARD_FRACTION = 0.2
SPLIT_PATTERN = ("training", "testing", "validation", "training", "training")  # 60/20/20
IN_PLANE_MM = 1.0


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def draw_attributes(n_cases: int, seed: int) -> list[dict]:
    """Draw stage, institution and the hard-case flag of every case.

    Hard cases are planted inside every stage group and every institution group (at least one in
    each group of two or more cases, about ``HARD_FRACTION`` of each group).

    Args:
        n_cases: number of cases (>= 1).
        seed: random seed.

    Returns:
        a list of dicts with ``id``, ``stage``, ``institution``, ``hard`` and ``hard_kind``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 10**6]))
    stages = rng.choice(len(STAGES), size=n_cases, p=STAGE_FREQ)
    insts = rng.choice(len(INSTITUTIONS), size=n_cases, p=[i.freq for i in INSTITUTIONS])
    # every stage and every institution present when there are enough cases
    for values, n_groups in ((stages, len(STAGES)), (insts, len(INSTITUTIONS))):
        if n_cases >= 2 * n_groups:
            for g in range(n_groups):
                if not np.any(values == g):
                    largest = np.bincount(values, minlength=n_groups).argmax()
                    values[np.flatnonzero(values == largest)[0]] = g
    hard = np.zeros(n_cases, dtype=bool)
    for g in range(len(STAGES)):
        members = np.flatnonzero(stages == g)
        if len(members) >= 2:
            n_hard = max(1, int(round(HARD_FRACTION * len(members))))
            hard[rng.choice(members, size=n_hard, replace=False)] = True
    for g in range(len(INSTITUTIONS)):
        members = np.flatnonzero(insts == g)
        if len(members) >= 2 and not hard[members].any():
            hard[rng.choice(members)] = True
    kinds = rng.choice(len(HARD_KINDS), size=n_cases)
    return [
        {
            "id": f"case_{i:03d}",
            "stage": STAGES[stages[i]],
            "institution": INSTITUTIONS[insts[i]].name,
            "hard": bool(hard[i]),
            "hard_kind": HARD_KINDS[kinds[i]] if hard[i] else "",
        }
        for i in range(n_cases)
    ]


def _target_mask(rng, coords, centre, radius, irregularity) -> np.ndarray:
    """Star-shaped blob: a sphere whose radius is modulated by a few random low-order harmonics."""
    dx, dy, dz = (c - c0 for c, c0 in zip(coords, centre))
    r = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-6
    theta = np.arccos(np.clip(dz / r, -1.0, 1.0))
    phi = np.arctan2(dy, dx)
    mod = np.zeros_like(r)
    for _ in range(4):
        m, n = rng.integers(1, 4), rng.integers(1, 4)
        mod += rng.uniform(-1, 1) * np.cos(m * phi + rng.uniform(0, 2 * np.pi)) * np.sin(n * theta)
    mod /= 4.0
    return r <= radius * (1.0 + irregularity * 2.5 * mod)


def make_case(attrs: dict, seed: int, index: int, shape: tuple[int, int, int]):
    """Render one case.

    Args:
        attrs: one item of :func:`draw_attributes`.
        seed: cohort seed.
        index: case index (decides the case's own random stream).
        shape: volume shape (X, Y, Z) in voxels.

    Returns:
        ``(image, label, affine)``: int16 HU array (X, Y, Z), uint8 0/1 array (X, Y, Z) and the 4x4
        voxel-to-RAS affine (mm) with spacing (1, 1, slice thickness of the institution).
    """
    rng = _case_rng(seed, index)
    inst = next(i for i in INSTITUTIONS if i.name == attrs["institution"])
    sx, sy, sz = IN_PLANE_MM, IN_PLANE_MM, inst.slice_mm
    nx, ny, nz = shape
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    xx, yy, zz = np.meshgrid(x, y, z, indexing="ij")
    half_x, half_y = nx * sx / 2, ny * sy / 2

    img = np.full(shape, -1000.0, dtype=np.float32)
    ax, ay = half_x * rng.uniform(0.78, 0.88), half_y * rng.uniform(0.60, 0.72)
    body = (xx / ax) ** 2 + (yy / ay) ** 2 <= 1.0
    img[body] = 40.0
    # table under the patient (posterior is -y in RAS)
    img[(yy < -ay - 2) & (yy > -ay - 5) & (np.abs(xx) < 0.95 * half_x)] = 300.0
    lung_r = (0.30 * ax, 0.55 * ay)
    for side in (-1, 1):
        lung = ((xx - side * 0.45 * ax) / lung_r[0]) ** 2 + ((yy - 0.05 * ay) / lung_r[1]) ** 2 <= 1.0
        img[lung & body] = -800.0
    spine = (xx**2 + (yy + 0.68 * ay) ** 2) <= (0.12 * ay) ** 2
    img[spine] = 700.0

    stage = attrs["stage"]
    radius = STAGE_RADIUS_MM[stage] * rng.uniform(0.85, 1.15)
    radius = min(radius, 0.30 * min(ax, ay), 0.30 * nz * sz)
    kind = attrs.get("hard_kind", "") if attrs.get("hard") else ""
    if kind == "unusual_position":
        # close to the body wall, laterally, at an extreme slice
        cx = rng.choice([-1, 1]) * (ax - radius - 4.0)
        cy = rng.uniform(-0.2, 0.3) * ay
        cz = rng.choice([-1, 1]) * max(0.0, nz * sz / 2 - radius - 2 * sz)
    else:
        cx, cy = rng.uniform(-0.15, 0.15) * ax, rng.uniform(-0.25, 0.15) * ay
        cz = rng.uniform(-0.1, 0.1) * nz * sz
    target = _target_mask(rng, (xx, yy, zz), (cx, cy, cz), radius, STAGE_IRREGULARITY[stage]) & body
    contrast = inst.contrast_hu * rng.uniform(0.85, 1.15)
    if kind == "low_contrast":
        contrast *= 0.15
    img[target] = 40.0 + contrast
    # soft-tissue texture and acquisition noise
    img += rng.normal(0.0, inst.noise_hu, size=shape).astype(np.float32) * (img > -900)
    if kind == "metal_artefact":
        # bright/dark streaks radiating from a small metal insert near the target
        mx, my = cx + rng.uniform(-10, 10), cy + rng.uniform(-10, 10)
        ang = np.arctan2(yy - my, xx - mx)
        streak = 250.0 * np.cos(7 * ang) * np.exp(-np.sqrt((xx - mx) ** 2 + (yy - my) ** 2) / 40.0)
        img += (streak * body).astype(np.float32)
        img[((xx - mx) ** 2 + (yy - my) ** 2 <= 9.0) & (np.abs(zz - cz) <= radius)] = 2500.0
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    label = target.astype(np.uint8)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [x[0], y[0], z[0]]
    return image, label, affine


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 file gzip-compressed with a fixed header time, so equal data gives equal bytes."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def stratified_split(items: list[dict], key: str, seed: int) -> dict[str, list[dict]]:
    """Split items into disjoint training/validation/testing lists, stratified by ``item[key]``.

    Inside each group the cases are dealt, hard cases first, in the repeating order
    ``SPLIT_PATTERN`` (60/20/20), so every split gets its share of each group and of its hard cases
    (the first hard case of a group goes to training, the second to testing, the third to validation).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2 * 10**6]))
    out: dict[str, list[dict]] = {"training": [], "validation": [], "testing": []}
    for value in sorted({it[key] for it in items}):
        members = [it for it in items if it[key] == value]
        is_hard = [str(m.get("hard", False)).lower() in ("true", "1", "yes") for m in members]
        hard = [members[i] for i in rng.permutation(len(members)) if is_hard[i]]
        easy = [members[i] for i in rng.permutation(len(members)) if not is_hard[i]]
        for j, item in enumerate(hard + easy):
            out[SPLIT_PATTERN[j % len(SPLIT_PATTERN)]].append(item)
    for part in out.values():
        part.sort(key=lambda it: it["id"])
    return out


def generate_cohort(
    out_dir: str | Path,
    n_cases: int = 60,
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 48),
    grouping: str = "stage",
    dicom: bool = False,
) -> dict:
    """Generate the cohort and its datalist.

    Args:
        out_dir: output folder (created; existing case files of the same ids are replaced,
            other files are left alone).
        n_cases: number of cases (>= 4).
        seed: random seed; the same arguments give byte-identical files.
        shape: volume shape (X, Y, Z) in voxels, each >= 16.
        grouping: attribute the split is stratified by (``stage`` or ``institution``).
        dicom: also write each case as a DICOM CT series with an RTSTRUCT of the target.

    Returns:
        the datalist dict that was written to ``out_dir/datalist.json``.
    """
    if n_cases < 4:
        raise ValueError(f"n_cases must be >= 4 to fill the training/validation/testing splits, got {n_cases}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes >= 16 voxels (X Y Z), got {shape}.")
    if grouping not in ("stage", "institution"):
        raise ValueError(f"grouping must be 'stage' or 'institution', got {grouping!r}.")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    items = []
    for index, attrs in enumerate(draw_attributes(n_cases, seed)):
        image, label, affine = make_case(attrs, seed, index, shape)
        case_id = attrs["id"]
        _write_nifti(image, affine, out / "images" / f"{case_id}.nii.gz")
        _write_nifti(label, affine, out / "labels" / f"{case_id}.nii.gz")
        item = {"id": case_id, "image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz", **attrs}
        if dicom:
            item.update(_write_dicom_case(image, label, affine, out, case_id, attrs, seed, index))
        items.append(item)
        logger.info("wrote %s (%s, %s, hard=%s)", case_id, attrs["stage"], attrs["institution"], attrs["hard"])
    datalist = {
        "name": "FairDRO synthetic heterogeneous cohort",
        "seed": seed,
        "shape": list(shape),
        "grouping": grouping,
        **stratified_split(items, grouping, seed),
    }
    tmp = out / "datalist.json.tmp"
    tmp.write_text(json.dumps(datalist, indent=2) + "\n")
    tmp.replace(out / "datalist.json")
    return datalist


def _write_dicom_case(image, label, affine, out: Path, case_id: str, attrs: dict, seed: int, index: int) -> dict:
    """Write one case as a DICOM CT series plus RTSTRUCT; the storage variant (identity, flipped or
    transposed axes, reversed slices, oblique) cycles over the cases so every geometry is exercised."""
    from scripts.dicom_write import VARIANTS, write_case_dicom  # DICOM stack only when asked

    variant = list(VARIANTS)[index % len(VARIANTS)]
    dicom_dir, rtstruct = write_case_dicom(
        image,
        label,
        affine,
        out / "dicom",
        case_id,
        institution=attrs["institution"],
        variant=variant,
        seed=seed * 100003 + index,
        overwrite=True,
    )
    return {
        "dicom_dir": Path(dicom_dir).relative_to(out).as_posix(),
        "rtstruct": Path(rtstruct).relative_to(out).as_posix(),
        "dicom_variant": variant,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-cases", type=int, default=60, help="number of cases (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 48), metavar=("X", "Y", "Z"))
    parser.add_argument("--grouping", choices=("stage", "institution"), default="stage", help="split stratified by")
    parser.add_argument("--dicom", action="store_true", help="also write DICOM CT series + RTSTRUCT per case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        datalist = generate_cohort(args.out, args.n_cases, args.seed, tuple(args.shape), args.grouping, args.dicom)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = {k: len(datalist[k]) for k in ("training", "validation", "testing")}
    n_hard = sum(it["hard"] for k in counts for it in datalist[k])
    print(f"wrote {sum(counts.values())} cases ({counts}, {n_hard} hard) to {Path(args.out) / 'datalist.json'}")
    return 0


if __name__ == "__main__":
    # allow `python bundle/scripts/synthetic.py` from anywhere: make the bundle root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
