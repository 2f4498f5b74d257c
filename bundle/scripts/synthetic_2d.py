"""Synthetic 2D cohort with a hidden minority inside every stage group (``docs/method.md`` section 5, "2D probe").

The 2D sibling of :mod:`scripts.synthetic` with the same knobs (stages, institutions, ``--minority``,
``--minority-frac``, ``--difficulty``, ``--split``, hard cases, recorded ``subtype``), in images of seconds to
train on. Its defaults reproduce the design of the 2D probe that found a positive control (an oracle that
up-weights the minority clearly beats ERM). Intensities are in [0, 1] on a uniform tissue of 0.5:

- **stages** T1..T4 (exact frequencies 0.35/0.30/0.20/0.15, as in 3D) differ by the target's radius:
  5/7/9/12 px times U(0.8, 1.2), so neighbouring stages overlap a little;
- **stage-specific mapping**: the label is the target disk grown by a stage margin of 0/1/1/2 px (``--margins``;
  ``0 0 0 0`` gives the probe's label, the disk itself). The margin is invisible in the image: a network must know
  the stage to draw it, which is what stage routing can learn;
- **majority** rule: the target is a bright disk (+0.30 on tissue); half of the cases carry a dark non-target cyst
  (-0.30, radius U(3, 6) px);
- **hard cases** (about 10% of the majority of every stage group, as in 3D): the same rule at low contrast
  (+0.09, i.e. 0.3 of the target contrast);
- **institutions** A/B/C (frequencies as in 3D) differ mildly in noise sd (0.07/0.09/0.11, about 0.08 on average)
  and contrast (every contrast above is multiplied by 1.10/0.95/0.80, then by U(0.9, 1.1) per case);
- **minority** ``ring`` (the share ``--minority-frac`` of every stage group, default 0.05, at least 0.02): the
  target is a *dark* disk (-0.30, as dark as the majority's cysts, which are background) marked by a thin bright
  ring (1 px just outside its edge), and a bright non-target **decoy** disk (radius U(4, 8) px) sits elsewhere; no
  cyst. By ``--difficulty`` (level 0 is a placebo: minority-tagged cases are drawn with the majority's rule):

  =====  ============  ==========  ===========
  level  dark target   ring        decoy
  =====  ============  ==========  ===========
  0      (placebo: majority rule)
  1      -0.30         +0.35       +0.10
  2      -0.30         +0.25       +0.20
  3      -0.30         +0.15       +0.30 (as bright as a majority target: the probe's values, the default)
  =====  ============  ==========  ===========

Everything outside a minority case's own part (stage, size, place, contrast, cyst draw, noise) comes from the
case's random stream and is the same at every level; the minority's part has a stream of its own. Targets, cysts
and decoys do not touch (2 px apart where they fit). The same arguments give byte-identical files.

Command line (also ``python bundle/scripts/synthetic.py --spatial-dims 2 ...``)::

    python bundle/scripts/synthetic_2d.py --out DIR --n-cases 1000 --seed 0 [--shape 64 64] [--minority ring]
        [--minority-frac 0.05] [--difficulty 3] [--margins 0 1 1 2] [--split 0.6 0.2 0.2] [--grouping stage]

writes ``DIR/images/<id>.png`` (8-bit grey, intensity x 255 rounded and clipped), ``DIR/labels/<id>.png`` (8-bit,
0/1) and ``DIR/datalist.json`` as the 3D cohort does, plus ``"spatial_dims": 2`` and the class names. The PNG's width
is X: MONAI's ``LoadImage`` (``PILReader``) gives back the arrays of :func:`make_case`, shape (X, Y).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the bundle root importable, as `monai.bundle run` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from scripts import synthetic  # noqa: E402

DEFAULT_SHAPE = (64, 64)
MIN_SIZE = 48
TISSUE = 0.5
STAGE_RADIUS_PX = (5.0, 7.0, 9.0, 12.0)  #: per stage T1..T4, times U(RADIUS_JITTER)
RADIUS_JITTER = (0.8, 1.2)
STAGE_MARGIN_PX = (0, 1, 1, 2)  #: label = target disk grown by this margin, per stage
MAX_MARGIN_PX = 3  #: placement keeps room for this margin, so the image does not depend on the margins
TARGET_CONTRAST = 0.30
HARD_FACTOR = 0.3  #: a hard case's target contrast, as a share of TARGET_CONTRAST
CYST_CONTRAST = -0.30
CYST_PROB = 0.5
CYST_RADIUS_PX = (3.0, 6.0)
GAP_PX = 2.0  #: least distance between the target's reach (disk + MAX_MARGIN_PX) and a cyst or decoy
CONTRAST_JITTER = (0.9, 1.1)
MINORITY_KINDS = ("ring",)
DEFAULT_MINORITY = "ring"
DEFAULT_MINORITY_FRAC = 0.05
MIN_MINORITY_FRAC = 0.02
DEFAULT_DIFFICULTY = 3
MINORITY_TARGET = -0.30  #: the ring kind's dark target (levels 1..3)
RING_CONTRAST = (0.0, 0.35, 0.25, 0.15)  #: per level 0..3 (level 0 is the placebo: unused)
RING_WIDTH_PX = 1.0
DECOY_CONTRAST = (0.0, 0.10, 0.20, 0.30)
DECOY_RADIUS_PX = (4.0, 8.0)
HARD_KINDS = ("low_contrast",)
CLASS_NAMES = ("background", "target")


@dataclass(frozen=True)
class Site:
    """Acquisition profile of one institution in 2D (names and frequencies are the 3D cohort's)."""

    noise: float  #: standard deviation of the additive noise
    contrast: float  #: factor on every contrast


SITES = {
    "A": Site(noise=0.07, contrast=1.10),
    "B": Site(noise=0.09, contrast=0.95),
    "C": Site(noise=0.11, contrast=0.80),
}


@lru_cache(maxsize=8)
def _grid(shape: tuple[int, int]) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    grid.flags.writeable = False
    return grid


def _dist(shape: tuple[int, int], centre) -> np.ndarray:
    grid = _grid(shape)
    return np.hypot(grid[0] - centre[0], grid[1] - centre[1])


def _place(rng: np.random.Generator, shape, radius: float, avoid_centre, avoid_reach: float, tries: int = 64):
    """Centre and radius of a disk inside the image, ``GAP_PX`` away from the disk ``avoid_reach`` around
    ``avoid_centre``: the first of ``tries`` uniform candidates that fits, else the one with the most room and the
    radius shrunk to that room (at least 2 px). Always draws the same numbers from ``rng``."""
    candidates = rng.uniform(radius + 1, np.asarray(shape) - 2 - radius, size=(tries, 2))
    room = np.hypot(*(candidates - np.asarray(avoid_centre)).T) - avoid_reach - GAP_PX
    fits = np.flatnonzero(room >= radius)
    if fits.size:
        return candidates[fits[0]], radius
    best = int(np.argmax(room))
    return candidates[best], float(max(2.0, min(radius, room[best])))


@dataclass
class _Target:
    """The target of one case: centre, radius, reach (radius + MAX_MARGIN_PX) and distance map (px)."""

    centre: np.ndarray
    radius: float
    reach: float
    dist: np.ndarray


def _render_majority(img: np.ndarray, target: _Target, gain: float, cyst, hard: bool) -> None:
    """Bright target (low contrast when hard) and, when drawn, a dark cyst elsewhere."""
    if cyst is not None:
        (centre, radius), cyst_gain = cyst
        img[_dist(img.shape, centre) <= radius] = TISSUE + CYST_CONTRAST * cyst_gain
    img[target.dist <= target.radius] = TISSUE + TARGET_CONTRAST * gain * (HARD_FACTOR if hard else 1.0)


def _render_ring(img: np.ndarray, target: _Target, gain: float, level: int, mrng: np.random.Generator, site: Site):
    """Dark target with a thin bright ring just outside its edge, and a bright decoy disk elsewhere (label 0)."""
    shape = img.shape
    centre, radius = _place(mrng, shape, mrng.uniform(*DECOY_RADIUS_PX), target.centre, target.reach)
    decoy_gain = site.contrast * mrng.uniform(*CONTRAST_JITTER)
    outside = target.dist > target.radius + RING_WIDTH_PX
    img[(_dist(shape, centre) <= radius) & outside] = TISSUE + DECOY_CONTRAST[level] * decoy_gain
    img[target.dist <= target.radius] = TISSUE + MINORITY_TARGET * gain
    img[(target.dist > target.radius) & ~outside] = TISSUE + RING_CONTRAST[level] * gain


def make_case(
    attrs: dict,
    seed: int,
    index: int,
    shape: tuple[int, int] = DEFAULT_SHAPE,
    difficulty: int = DEFAULT_DIFFICULTY,
    margins=STAGE_MARGIN_PX,
):
    """Render one case.

    Args:
        attrs: one item of :func:`scripts.synthetic.draw_attributes` (``stage``, ``institution``, ``subtype``,
            ``hard``).
        seed: cohort seed.
        index: case index (decides the case's own random stream).
        shape: image shape (X, Y) in pixels.
        difficulty: minority level 0..3 (0: placebo, drawn with the majority's rule).
        margins: label margin (px) per stage T1..T4.

    Returns:
        ``(image, label)``: uint8 arrays (X, Y); the image is the intensity x 255, the label 0/1.
    """
    shape = tuple(shape)
    rng = synthetic._case_rng(seed, index)
    site = SITES[attrs["institution"]]
    stage = synthetic.STAGES.index(attrs["stage"])
    radius = STAGE_RADIUS_PX[stage] * rng.uniform(*RADIUS_JITTER)
    reach = radius + MAX_MARGIN_PX
    centre = rng.uniform(reach + 1, np.asarray(shape) - 2 - reach)
    target = _Target(centre, radius, reach, _dist(shape, centre))
    gain = site.contrast * rng.uniform(*CONTRAST_JITTER)
    has_cyst = rng.uniform() < CYST_PROB
    cyst = (_place(rng, shape, rng.uniform(*CYST_RADIUS_PX), centre, reach), site.contrast * rng.uniform(0.9, 1.1))
    noise = rng.normal(0.0, site.noise, size=shape)
    img = np.full(shape, TISSUE)
    level = difficulty if attrs.get("subtype", "majority") != "majority" else 0
    if level:
        mrng = np.random.default_rng(np.random.SeedSequence([seed, index, 7]))
        _render_ring(img, target, gain, level, mrng, site)
    else:
        _render_majority(img, target, gain, cyst if has_cyst else None, bool(attrs.get("hard")))
    image = np.clip(np.rint((img + noise) * 255.0), 0, 255).astype(np.uint8)
    label = (target.dist <= radius + margins[stage]).astype(np.uint8)
    return image, label


def _write_png(array: np.ndarray, path: Path) -> None:
    """Write an (X, Y) uint8 array as an 8-bit grey PNG of width X (no metadata: equal data gives equal bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array.T)).save(buf, format="PNG", compress_level=6)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _check_args(n_cases: int, shape, grouping: str, margins) -> tuple[tuple[int, int], tuple[int, ...]]:
    if n_cases < 4:
        raise ValueError(f"n_cases must be >= 4 to fill the training/validation/testing splits, got {n_cases}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < MIN_SIZE:
        raise ValueError(f"shape must be two sizes >= {MIN_SIZE} pixels (X Y), got {shape}.")
    if grouping not in ("stage", "institution"):
        raise ValueError(f"grouping must be 'stage' or 'institution', got {grouping!r}.")
    values = tuple(margins)
    if len(values) != len(synthetic.STAGES) or any(int(m) != m or not 0 <= m <= MAX_MARGIN_PX for m in values):
        raise ValueError(f"margins must be four integers in 0..{MAX_MARGIN_PX} px (T1..T4), got {margins!r}.")
    return shape, tuple(int(m) for m in values)


def generate_cohort(
    out_dir: str | Path,
    n_cases: int = 1000,
    seed: int = 0,
    shape: tuple[int, int] = DEFAULT_SHAPE,
    grouping: str = "stage",
    minority: str = DEFAULT_MINORITY,
    minority_frac: float = DEFAULT_MINORITY_FRAC,
    difficulty: int | None = None,
    split=synthetic.DEFAULT_SPLIT,
    margins=STAGE_MARGIN_PX,
) -> dict:
    """Generate the 2D cohort and its datalist (``out_dir/datalist.json``; existing files of the same ids are replaced).

    Args:
        out_dir: output folder (created).
        n_cases: number of cases (>= 4).
        seed: random seed; the same arguments give byte-identical files.
        shape: image shape (X, Y), each >= 48 px.
        grouping: attribute the split is stratified by (``stage`` or ``institution``), with the subtype.
        minority: hidden minority kind (``MINORITY_KINDS``).
        minority_frac: share of minority cases inside every stage group, in [0.02, 0.5] (at least one case in a
            group of >= 4).
        difficulty: minority level 0..3 (0: placebo); ``None``: ``DEFAULT_DIFFICULTY``.
        split: training, validation and testing fractions.
        margins: label margin (px) per stage T1..T4, integers in 0..3.

    Returns:
        the datalist dict that was written.
    """
    shape, margins = _check_args(n_cases, shape, grouping, margins)
    difficulty = DEFAULT_DIFFICULTY if difficulty is None else difficulty
    synthetic._check_minority(minority, float(minority_frac), difficulty, MINORITY_KINDS, MIN_MINORITY_FRAC)
    split = synthetic._check_split(split)
    out = Path(out_dir)
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    items = []
    for index, attrs in enumerate(synthetic.draw_attributes(n_cases, seed, minority, float(minority_frac), HARD_KINDS)):
        image, label = make_case(attrs, seed, index, shape, difficulty, margins)
        case_id = attrs["id"]
        _write_png(image, out / "images" / f"{case_id}.png")
        _write_png(label, out / "labels" / f"{case_id}.png")
        items.append({"id": case_id, "image": f"images/{case_id}.png", "label": f"labels/{case_id}.png", **attrs})
    datalist = {
        "name": "FairDRO synthetic 2D cohort",
        "spatial_dims": 2,
        "class_names": list(CLASS_NAMES),
        "seed": seed,
        "shape": list(shape),
        "grouping": grouping,
        "minority": minority,
        "minority_frac": float(minority_frac),
        "difficulty": int(difficulty),
        "stage_margin_px": list(margins),
        "split": list(split),
        **synthetic.stratified_split(items, grouping, seed, split),
    }
    return synthetic.write_datalist(out, datalist)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spatial-dims", type=int, choices=(2,), default=2, help="2 (this cohort)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-cases", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=2, default=DEFAULT_SHAPE, metavar=("X", "Y"))
    parser.add_argument("--grouping", choices=("stage", "institution"), default="stage", help="split stratified by")
    parser.add_argument("--minority", default=DEFAULT_MINORITY, help=f"hidden minority kind {list(MINORITY_KINDS)}")
    parser.add_argument("--minority-frac", type=float, default=DEFAULT_MINORITY_FRAC,
                        help=f"share of minority cases per stage group (default {DEFAULT_MINORITY_FRAC})")  # fmt: skip
    parser.add_argument("--difficulty", type=int, default=None,
                        help=f"minority level 0..3 (0: placebo; default {DEFAULT_DIFFICULTY})")  # fmt: skip
    parser.add_argument("--margins", type=int, nargs=4, default=STAGE_MARGIN_PX, metavar=("T1", "T2", "T3", "T4"),
                        help="label margin in px per stage (default 0 1 1 2)")  # fmt: skip
    parser.add_argument("--split", type=float, nargs=3, default=synthetic.DEFAULT_SPLIT,
                        metavar=("TRAIN", "VAL", "TEST"), help="split fractions (default 0.6 0.2 0.2)")  # fmt: skip
    parser.add_argument("--dicom", action="store_true", help="refused: DICOM output is for the 3D cohort only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.dicom:
        print("error: --dicom writes CT series for the 3D cohort only (--spatial-dims 3); the 2D cohort is PNG.",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        datalist = generate_cohort(
            args.out, args.n_cases, args.seed, tuple(args.shape), args.grouping, args.minority,
            args.minority_frac, args.difficulty, tuple(args.split), tuple(args.margins),
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(synthetic.summary_line(datalist, Path(args.out), what="2D cases"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
