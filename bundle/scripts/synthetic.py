"""Synthetic heterogeneous radiotherapy cohort with hidden sub-populations (``docs/method.md`` section 5).

Each case is a CT-like phantom in Hounsfield units with a CTV-like target:

- a body (elliptic cylinder of soft tissue) in air, two lungs, a spine, a table and one or two rim-enhancing
  **cysts** (a hypodense core inside a thin enhancing rim; non-target, label 0);
- a visible gross tumour (GTV, enhancing: hyperdense) whose size overlaps between stages, and a CTV label that
  is the GTV plus a **stage-specific margin** (T1 0 mm ... T4 3 mm): the margin cannot be seen in the image,
  so a network must know the stage to draw it (what the stage-routed dMoE layers can learn);
- **institution** effects: noise level, target contrast and slice thickness differ by site;
- imbalanced group sizes (stage and institution frequencies are skewed);
- a **hidden minority** inside every stage group (``--minority KIND``, ``--minority-frac F``) whose
  image-to-label rule departs from the majority's (``--difficulty 0..3``):

  - ``necrotic``: the GTV is a hypodense core inside an enhancing rim, while the majority shows rim-enhancing
    cysts as background: the two rules conflict;
  - ``distractor``: an enhancing non-target structure touches the CTV and must stay background, while for
    the majority everything enhancing is target;
  - ``ring`` (the 3D analogue of :mod:`scripts.synthetic_2d`'s minority): the whole CTV is *hypodense*
    (``40 - c`` HU, c the case's target contrast: as dark as a cyst's core, which the majority teaches as
    background) and marked by a thin enhancing **shell**, the voxels one face-step outside the CTV (in the body);
    an enhancing non-target **decoy** (a look-alike of the majority's target: star-shaped, radius U(4, 8) mm, the
    stage's irregularity) sits elsewhere in the body, clear of the spine and at least 3 face-steps from the CTV,
    first tried where targets are (shrunk to 3/4, then 1/2 where it does not fit; a very small volume may leave
    none); the case has no cyst (its voxels are soft tissue). By level, in units of c (the 2D table over its target
    contrast 0.30), CTV / shell / decoy are -1 / +7/6 / +1/3 (level 1), -1 / +5/6 / +2/3 (level 2) and
    -1 / +1/2 / +1 (level 3, the default: the decoy as bright as a majority target); the decoy's c is drawn as a
    target's is. Unlike 2D, where the ring hugs the disk and the stage margin can cover it, the shell lies outside
    the label. The least share is 0.02 (``MIN_MINORITY_FRAC_BY_KIND``), as in 2D;

  level 0 is a placebo: minority-tagged cases are drawn with the majority's rule;
- a few majority **hard cases** (low target contrast, metal streak artefacts, unusual position) that follow the
  majority's rule.

Everything is deterministic by seed: the same arguments give byte-identical files.

Command line::

    python bundle/scripts/synthetic.py --out DIR --n-cases 60 --seed 0 [--shape 96 96 48]
        [--minority necrotic] [--minority-frac 0.15] [--difficulty 2] [--split 0.6 0.2 0.2]
        [--grouping stage] [--dicom]

writes ``DIR/images/<id>.nii.gz`` (int16 HU), ``DIR/labels/<id>.nii.gz`` (uint8, 0/1) and
``DIR/datalist.json`` with ``training``/``validation``/``testing`` lists. Paths in the datalist are
relative to ``DIR`` (MONAI's ``load_decathlon_datalist`` resolves them against ``base_dir``). Every item
records ``subtype`` (``"majority"`` or the minority kind): only evaluation and the ``oracle`` variant read it.

``--spatial-dims 2`` writes the 2D PNG cohort of :mod:`scripts.synthetic_2d` instead (its own options).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

STAGES = ("T1", "T2", "T3", "T4")
STAGE_FREQ = (0.35, 0.30, 0.20, 0.15)
#: mean GTV radius (mm, drawn x U(0.8, 1.2): the stages overlap in size) and irregularity per stage
STAGE_RADIUS_MM = {"T1": 6.0, "T2": 7.0, "T3": 8.0, "T4": 9.0}
STAGE_IRREGULARITY = {"T1": 0.05, "T2": 0.12, "T3": 0.20, "T4": 0.30}
#: CTV margin around the GTV per stage (mm): the stage-specific mapping that routing by stage can learn
STAGE_MARGIN_MM = {"T1": 0.0, "T2": 1.0, "T3": 2.0, "T4": 3.0}


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
HARD_FRACTION = 0.1
MINORITY_KINDS = ("necrotic", "distractor", "ring")
DEFAULT_MINORITY = "necrotic"
DEFAULT_MINORITY_FRAC = 0.15
MIN_MINORITY_FRAC = 0.05
#: a kind whose least share differs from ``MIN_MINORITY_FRAC`` (ring: the 2D cohort's least share)
MIN_MINORITY_FRAC_BY_KIND = {"ring": 0.02}
#: default difficulty per kind: the closest to the calibration criteria (model card, *Calibration results*);
#: ring: the 2D cohort's default, not calibrated in 3D
DEFAULT_DIFFICULTY = {"necrotic": 3, "distractor": 3, "ring": 3}
#: how far the minority's rule departs from the majority's, per level (0 = placebo), used by every kind
LEVEL_SEVERITY = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)
#: the ring kind per level 0..3 (0: placebo, unused), in units of the case's target contrast: the 2D cohort's ring
#: and decoy contrasts over its target contrast 0.30; its CTV is at ``RING_TARGET``
RING_TARGET = -1.0
RING_SHELL = (0.0, 7.0 / 6.0, 5.0 / 6.0, 0.5)
RING_DECOY = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)
DECOY_RADIUS_MM = (4.0, 8.0)
DECOY_GAP_VOXELS = 3  #: least face-step distance from the CTV to the decoy (the shell is step 1)
DECOY_SHRINK = (1.0, 0.75, 0.5)  #: radius factors tried in turn where the decoy does not fit
DEFAULT_SPLIT = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("training", "validation", "testing")
IN_PLANE_MM = 1.0


def _case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _exact_counts(n: int, freqs) -> np.ndarray:
    """Largest-remainder apportionment of ``n`` items over ``freqs`` (sums to ``n`` exactly)."""
    raw = np.asarray(freqs, dtype=float) / float(np.sum(freqs)) * n
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: n - int(counts.sum())]:
        counts[k] += 1
    return counts


def _draw_stages(rng: np.random.Generator, n_cases: int) -> np.ndarray:
    """Stage index of every case: exact stage frequencies (largest remainder), in random order."""
    stages = np.repeat(np.arange(len(STAGES)), _exact_counts(n_cases, STAGE_FREQ))
    return stages[rng.permutation(n_cases)]


def _draw_minority(rng: np.random.Generator, stages: np.ndarray, frac: float) -> np.ndarray:
    """Minority flag: ``round(frac * n_g)`` cases of every stage group g (at least one in a group of >= 4)."""
    minority = np.zeros(stages.size, dtype=bool)
    for g in range(len(STAGES)):
        members = np.flatnonzero(stages == g)
        n_min = int(math.floor(frac * members.size + 0.5))
        if members.size >= 4:
            n_min = max(n_min, 1)
        if n_min:
            minority[rng.choice(members, size=n_min, replace=False)] = True
    return minority


def _draw_hard(rng: np.random.Generator, stages: np.ndarray, minority: np.ndarray) -> np.ndarray:
    """Hard-case flag: about ``HARD_FRACTION`` of the majority cases of every stage group (at least one)."""
    hard = np.zeros(stages.size, dtype=bool)
    for g in range(len(STAGES)):
        members = np.flatnonzero((stages == g) & ~minority)
        if members.size >= 2:
            n_hard = max(1, int(round(HARD_FRACTION * members.size)))
            hard[rng.choice(members, size=n_hard, replace=False)] = True
    return hard


def draw_attributes(
    n_cases: int,
    seed: int,
    minority: str = DEFAULT_MINORITY,
    frac: float = DEFAULT_MINORITY_FRAC,
    hard_kinds: tuple[str, ...] = HARD_KINDS,
):
    """Draw stage, institution, subtype and the hard-case flag of every case.

    Stage counts follow ``STAGE_FREQ`` exactly; institutions are drawn with their frequencies (every one present
    when there are enough cases). The minority is ``round(frac * n_g)`` cases of each stage group; hard cases
    are drawn among the majority only, so a minority case shows one departure from the majority at a time.

    Args:
        n_cases: number of cases (>= 1).
        seed: random seed.
        minority: minority kind recorded as the ``subtype`` of minority cases.
        frac: share of minority cases inside every stage group.
        hard_kinds: the kinds a hard case is drawn from (the 2D cohort has only ``low_contrast``).

    Returns:
        a list of dicts with ``id``, ``stage``, ``institution``, ``subtype``, ``hard`` and ``hard_kind``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 10**6]))
    stages = _draw_stages(rng, n_cases)
    insts = rng.choice(len(INSTITUTIONS), size=n_cases, p=[i.freq for i in INSTITUTIONS])
    if n_cases >= 2 * len(INSTITUTIONS):
        for g in range(len(INSTITUTIONS)):
            if not np.any(insts == g):
                largest = np.bincount(insts, minlength=len(INSTITUTIONS)).argmax()
                insts[np.flatnonzero(insts == largest)[0]] = g
    is_minority = _draw_minority(rng, stages, frac)
    hard = _draw_hard(rng, stages, is_minority)
    kinds = rng.choice(len(hard_kinds), size=n_cases)
    return [
        {
            "id": f"case_{i:03d}",
            "stage": STAGES[stages[i]],
            "institution": INSTITUTIONS[insts[i]].name,
            "subtype": minority if is_minority[i] else "majority",
            "hard": bool(hard[i]),
            "hard_kind": hard_kinds[kinds[i]] if hard[i] else "",
        }
        for i in range(n_cases)
    ]


def _star_boundary(rng: np.random.Generator, coords, centre, radius: float, irregularity: float):
    """Distance of every voxel to ``centre`` and the star-shaped boundary radius in its direction (mm).

    The boundary is a sphere of ``radius`` modulated by a few random low-order harmonics; ``r <= boundary``
    is the GTV and ``r <= boundary + margin`` the GTV grown by ``margin`` mm along each ray.
    """
    dx, dy, dz = (c - c0 for c, c0 in zip(coords, centre))
    r = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-6
    theta = np.arccos(np.clip(dz / r, -1.0, 1.0))
    phi = np.arctan2(dy, dx)
    mod = np.zeros_like(r)
    for _ in range(4):
        m, n = rng.integers(1, 4), rng.integers(1, 4)
        mod += rng.uniform(-1, 1) * np.cos(m * phi + rng.uniform(0, 2 * np.pi)) * np.sin(n * theta)
    mod /= 4.0
    return r, radius * (1.0 + irregularity * 2.5 * mod)


@dataclass
class _Phantom:
    """The anatomy of one case on its voxel grid (mm coordinates ``xx, yy, zz``)."""

    img: np.ndarray
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    body: np.ndarray
    lung: np.ndarray
    spine: np.ndarray
    half_axes: tuple[float, float]


def _anatomy(rng: np.random.Generator, shape, spacing) -> _Phantom:
    """Body, table, lungs and spine in HU."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    xx, yy, zz = np.meshgrid(*axes, indexing="ij")
    half_x, half_y = shape[0] * spacing[0] / 2, shape[1] * spacing[1] / 2
    img = np.full(shape, -1000.0, dtype=np.float32)
    ax, ay = half_x * rng.uniform(0.78, 0.88), half_y * rng.uniform(0.60, 0.72)
    body = (xx / ax) ** 2 + (yy / ay) ** 2 <= 1.0
    img[body] = 40.0
    # table under the patient (posterior is -y in RAS)
    img[(yy < -ay - 2) & (yy > -ay - 5) & (np.abs(xx) < 0.95 * half_x)] = 300.0
    lung = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        lung |= ((xx - side * 0.45 * ax) / (0.30 * ax)) ** 2 + ((yy - 0.05 * ay) / (0.55 * ay)) ** 2 <= 1.0
    lung &= body
    img[lung] = -800.0
    spine = (xx**2 + (yy + 0.68 * ay) ** 2) <= (0.12 * ay) ** 2
    img[spine] = 700.0
    return _Phantom(img, (xx, yy, zz), body, lung, spine, (ax, ay))


def _target_centre(rng: np.random.Generator, ph: _Phantom, radius: float, unusual: bool, depth_mm: float):
    ax, ay = ph.half_axes
    if unusual:  # close to the body wall, laterally, at an extreme slice
        cx = rng.choice([-1, 1]) * (ax - radius - 4.0)
        cy = rng.uniform(-0.2, 0.3) * ay
        cz = rng.choice([-1, 1]) * max(0.0, depth_mm / 2 - radius - 6.0)
        return cx, cy, cz
    return rng.uniform(-0.15, 0.15) * ax, rng.uniform(-0.25, 0.15) * ay, rng.uniform(-0.1, 0.1) * depth_mm


CYST_RIM_MM = 1.5


def _place_cysts(rng: np.random.Generator, ph: _Phantom, keep_out: np.ndarray, contrast: float) -> np.ndarray:
    """One or two rim-enhancing cysts (label 0) in soft tissue, away from ``keep_out``; returns their mask.

    A cyst is a round hypodense core (``40 - contrast`` HU) inside a thin enhancing rim (``CYST_RIM_MM``, as bright as
    an enhancing target): the look that the majority teaches as background. The first cyst is placed where targets
    are (the mediastinum, at another level along z) when it fits, so that place is no cue; the second anywhere in soft
    tissue.
    """
    xx, yy, zz = ph.coords
    ax, ay = ph.half_axes
    allowed = ph.body & ~ph.lung & ~ph.spine & ~keep_out
    cysts = np.zeros(xx.shape, dtype=bool)
    for k in range(1 + int(rng.uniform() < 0.5)):
        for attempt in range(60):
            spread = (0.15, 0.25, 0.15) if k == 0 and attempt < 30 else (0.7, 0.7, 0.7)
            rc = rng.uniform(4.0, 6.5)
            c = (
                rng.uniform(-spread[0], spread[0]) * ax,
                rng.uniform(-spread[1], spread[2]) * ay,
                rng.uniform(-0.3, 0.3) * np.ptp(zz),
            )
            dist = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2)
            blob = dist <= rc
            if blob.any() and not (blob & ~allowed).any():
                cysts |= blob
                ph.img[blob] = 40.0 + contrast * rng.uniform(0.9, 1.1)
                ph.img[dist <= rc - CYST_RIM_MM] = 40.0 - contrast * rng.uniform(0.8, 1.2)
                break
    return cysts


def _grow(mask: np.ndarray, spacing, mm: float) -> np.ndarray:
    """``mask`` dilated by about ``mm`` along every axis (a box of half-width ``mm // spacing`` voxels)."""
    out = mask.copy()
    for axis, s in enumerate(spacing):
        for step in range(1, int(mm // s) + 1):
            out |= np.roll(mask, step, axis=axis) | np.roll(mask, -step, axis=axis)
    return out


def _render_necrotic(rng, ph: _Phantom, r, boundary, gtv, contrast: float, severity: float) -> None:
    """Hypodense core inside an enhancing rim; at the deepest level the rim is as thin and the core as dark as a cyst's
    (the remaining cues: the GTV's irregular shape, its size and its place)."""
    rim_mm = CYST_RIM_MM + 1.5 * (1.0 - severity)
    core = gtv & (r <= boundary - rim_mm)
    ph.img[gtv] = 40.0 + contrast
    ph.img[core] = 40.0 + contrast * (1.0 - 2.0 * severity) * rng.uniform(0.8, 1.2)


def _render_distractor(rng, ph: _Phantom, centre, ctv, ctv_radius: float, contrast: float, severity: float):
    """An enhancing non-target blob next to the CTV (label 0): larger, closer and more target-like with the level."""
    xx, yy, zz = ph.coords
    size = ctv_radius * (0.6 + 0.8 * severity)
    gap = 3.0 * (1.0 - severity)
    angle = rng.uniform(0, 2 * np.pi)
    d = ctv_radius + gap + size
    cx, cy = centre[0] + d * np.cos(angle), centre[1] + d * np.sin(angle)
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - centre[2]) ** 2 <= size**2) & ph.body & ~ctv
    ph.img[blob] = 40.0 + contrast * (2.0 - severity) * rng.uniform(0.9, 1.1)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` grown by ``steps`` face-neighbour steps (city-block distance <= ``steps``), not wrapping at the
    border."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        for axis in range(out.ndim):
            lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(out.ndim))
            hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(out.ndim))
            grown[hi] |= out[lo]
            grown[lo] |= out[hi]
        out = grown
    return out


def _place_decoy(rng: np.random.Generator, ph: _Phantom, keep_out: np.ndarray, reach: float):
    """Centre (mm) of a ball of ``reach`` mm inside the body, clear of the spine and of ``keep_out`` (lungs allowed, as
    for a target), or ``None`` when 60 tries miss.

    As for the cysts, the first 30 tries are where targets are (the mediastinum, at another level along z), so the
    place is no cue; the rest anywhere in the body.
    """
    xx, yy, zz = ph.coords
    ax, ay = ph.half_axes
    allowed = ph.body & ~ph.spine & ~keep_out
    for attempt in range(60):
        spread = (0.15, 0.25, 0.15) if attempt < 30 else (0.7, 0.7, 0.7)
        c = (
            rng.uniform(-spread[0], spread[0]) * ax,
            rng.uniform(-spread[1], spread[2]) * ay,
            rng.uniform(-0.3, 0.3) * np.ptp(zz),
        )
        ball = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2 <= reach**2
        if ball.any() and not (ball & ~allowed).any():
            return c
    return None


def _render_ring(rng, ph: _Phantom, ctv, cysts, contrast: float, site_contrast: float, level: int, irregularity):
    """Hypodense CTV inside a 1-voxel enhancing shell, no cyst, and an enhancing target look-alike elsewhere (label 0).

    ``contrast`` is the case's target contrast, ``site_contrast`` the institution's (the decoy's contrast is drawn
    around it as a target's is); ``level`` 1..3 indexes ``RING_SHELL`` and ``RING_DECOY``.
    """
    ph.img[cysts] = 40.0
    ph.img[ctv] = 40.0 + RING_TARGET * contrast
    ph.img[_dilate(ctv, 1) & ~ctv & ph.body] = 40.0 + RING_SHELL[level] * contrast
    radius = rng.uniform(*DECOY_RADIUS_MM)
    decoy_contrast = site_contrast * rng.uniform(0.85, 1.15)
    keep_out = _dilate(ctv, DECOY_GAP_VOXELS)
    for scale in DECOY_SHRINK:  # the ball holds the star boundary (at most radius x (1 + 2.5 irregularity))
        centre = _place_decoy(rng, ph, keep_out, scale * radius * (1.0 + 2.5 * irregularity))
        if centre is not None:
            break
    else:
        logger.debug("no room for the ring kind's decoy (radius %.1f mm or less): the case has none", radius)
        return
    r, boundary = _star_boundary(rng, ph.coords, centre, scale * radius, irregularity)
    ph.img[(r <= boundary) & ph.body] = 40.0 + RING_DECOY[level] * decoy_contrast


def _render_metal(rng, ph: _Phantom, centre, radius: float) -> None:
    """Bright/dark streaks radiating from a small metal insert near the target."""
    xx, yy, zz = ph.coords
    mx, my = centre[0] + rng.uniform(-10, 10), centre[1] + rng.uniform(-10, 10)
    ang = np.arctan2(yy - my, xx - mx)
    streak = 250.0 * np.cos(7 * ang) * np.exp(-np.sqrt((xx - mx) ** 2 + (yy - my) ** 2) / 40.0)
    ph.img += (streak * ph.body).astype(np.float32)
    ph.img[((xx - mx) ** 2 + (yy - my) ** 2 <= 9.0) & (np.abs(zz - centre[2]) <= radius)] = 2500.0


def make_case(attrs: dict, seed: int, index: int, shape: tuple[int, int, int], difficulty: int = 2):
    """Render one case.

    The majority's rule: the enhancing (hyperdense) GTV grown by the stage margin is the CTV; hypodense cysts are
    background. A minority case (``attrs["subtype"]`` not ``"majority"``) departs from it by its kind at
    ``difficulty`` (0: placebo, drawn with the majority's rule). The minority's own random stream is separate, so
    the rest of a case is the same at every level.

    Args:
        attrs: one item of :func:`draw_attributes`.
        seed: cohort seed.
        index: case index (decides the case's own random stream).
        shape: volume shape (X, Y, Z) in voxels.
        difficulty: minority level 0..3.

    Returns:
        ``(image, label, affine)``: int16 HU array (X, Y, Z), uint8 0/1 array (X, Y, Z) and the 4x4
        voxel-to-RAS affine (mm) with spacing (1, 1, slice thickness of the institution).
    """
    rng = _case_rng(seed, index)
    inst = next(i for i in INSTITUTIONS if i.name == attrs["institution"])
    spacing = (IN_PLANE_MM, IN_PLANE_MM, inst.slice_mm)
    ph = _anatomy(rng, shape, spacing)
    stage, kind = attrs["stage"], attrs.get("hard_kind", "") if attrs.get("hard") else ""
    margin = STAGE_MARGIN_MM[stage]
    radius = STAGE_RADIUS_MM[stage] * rng.uniform(0.8, 1.2)
    radius = min(radius, 0.40 * min(ph.half_axes) - margin, 0.30 * shape[2] * spacing[2])
    centre = _target_centre(rng, ph, radius + margin, kind == "unusual_position", shape[2] * spacing[2])
    r, boundary = _star_boundary(rng, ph.coords, centre, radius, STAGE_IRREGULARITY[stage])
    gtv = (r <= boundary) & ph.body
    ctv = (r <= boundary + margin) & ph.body & (~ph.lung | gtv)
    contrast = inst.contrast_hu * rng.uniform(0.85, 1.15)
    cysts = _place_cysts(rng, ph, _grow(ctv, spacing, 3.0), inst.contrast_hu)
    ph.img[gtv] = 40.0 + contrast * (0.15 if kind == "low_contrast" else 1.0)
    severity = LEVEL_SEVERITY[difficulty] if attrs.get("subtype", "majority") != "majority" else 0.0
    if severity > 0:
        mrng = np.random.default_rng(np.random.SeedSequence([seed, index, 7]))
        if attrs["subtype"] == "necrotic":
            _render_necrotic(mrng, ph, r, boundary, gtv, contrast, severity)
        elif attrs["subtype"] == "distractor":
            _render_distractor(mrng, ph, centre, ctv, radius + margin, contrast, severity)
        elif attrs["subtype"] == "ring":
            _render_ring(mrng, ph, ctv, cysts, contrast, inst.contrast_hu, difficulty, STAGE_IRREGULARITY[stage])
    # soft-tissue texture and acquisition noise
    ph.img += rng.normal(0.0, inst.noise_hu, size=shape).astype(np.float32) * (ph.img > -900)
    if kind == "metal_artefact":
        _render_metal(rng, ph, centre, radius)
    image = np.clip(np.rint(ph.img), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [float(c.flat[0]) for c in ph.coords]
    return image, ctv.astype(np.uint8), affine


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 file gzip-compressed with a fixed header time, so equal data gives equal bytes."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0, filename="") as gz:
        gz.write(raw)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _deal(cases: list[dict], fractions) -> dict[str, list[dict]]:
    """Deal ``cases`` in order, each to the split furthest below its share relative to its fraction.

    Ties go to training, then testing, then validation; with 0.6/0.2/0.2 this deals training, testing,
    validation, training, training, and repeats. Every prefix of ``cases`` is split in proportion (within one
    case per split), so a block at the front (the minority, the hard cases) gets its share in every split.
    """
    out: dict[str, list[dict]] = {name: [] for name in SPLIT_NAMES}
    ties = ("training", "testing", "validation")
    for j, item in enumerate(cases, start=1):
        need = {n: (f * j - len(out[n])) / f for n, f in zip(SPLIT_NAMES, fractions) if f > 0}
        best = max((n for n in ties if n in need), key=lambda n: (round(need[n], 9), -ties.index(n)))
        out[best].append(item)
    return out


def _flag(item: dict, key: str) -> bool:
    return str(item.get(key, False)).lower() in ("true", "1", "yes")


def stratified_split(
    items: list[dict], key: str, seed: int, fractions=DEFAULT_SPLIT, subtype_key: str = "subtype"
) -> dict[str, list[dict]]:
    """Split items into disjoint training/validation/testing lists, stratified by ``item[key]`` and subtype.

    Inside each group (a value of ``key``) the cases are shuffled and ordered minority first (``item[subtype_key]``
    not ``"majority"``, when items have one), then the hard cases, then the rest, and dealt by :func:`_deal`. So
    every split gets its share of every group, of the group's minority and of its hard cases.

    Args:
        items: datalist items.
        key: attribute to stratify by (e.g. ``"stage"``).
        seed: shuffle seed.
        fractions: training, validation and testing fractions (non-negative, summing to 1).
        subtype_key: second stratification attribute (ignored where items lack it).
    """
    fractions = _check_split(fractions)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2 * 10**6]))
    out: dict[str, list[dict]] = {name: [] for name in SPLIT_NAMES}
    for value in sorted({str(it[key]) for it in items}):
        members = [items[i] for i in rng.permutation(len(items)) if str(items[i][key]) == value]
        rank = [(str(m.get(subtype_key, "majority")) == "majority", not _flag(m, "hard")) for m in members]
        order = [m for _, m in sorted(zip(rank, members), key=lambda pair: pair[0])]
        for name, part in _deal(order, fractions).items():
            out[name].extend(part)
    for part in out.values():
        part.sort(key=lambda it: it["id"])
    return out


def _check_split(fractions) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three fractions >= 0 (training validation testing) summing to 1, got {fractions}."
        )
    if values[0] <= 0 or values[2] <= 0:
        raise ValueError(f"split needs a training and a testing fraction > 0, got {fractions}.")
    return values


def _check_minority(
    kind: str,
    frac: float,
    difficulty: int,
    kinds: tuple[str, ...] = MINORITY_KINDS,
    min_frac: float = MIN_MINORITY_FRAC,
) -> None:
    """Check the minority's kind (one of ``kinds``), share (in ``[min_frac, 0.5]``) and level (0..3)."""
    if kind not in kinds:
        raise ValueError(f"minority must be one of {list(kinds)}, got {kind!r}.")
    if not (math.isfinite(frac) and min_frac <= frac <= 0.5):
        raise ValueError(f"minority_frac must be in [{min_frac}, 0.5] (share of each stage group), got {frac}.")
    if isinstance(difficulty, bool) or difficulty not in range(len(LEVEL_SEVERITY)):
        raise ValueError(f"difficulty must be an integer level 0..{len(LEVEL_SEVERITY) - 1}, got {difficulty!r}.")


def generate_cohort(
    out_dir: str | Path,
    n_cases: int = 60,
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 48),
    grouping: str = "stage",
    dicom: bool = False,
    minority: str = DEFAULT_MINORITY,
    minority_frac: float = DEFAULT_MINORITY_FRAC,
    difficulty: int | None = None,
    split=DEFAULT_SPLIT,
) -> dict:
    """Generate the cohort and its datalist.

    Args:
        out_dir: output folder (created; existing case files of the same ids are replaced,
            other files are left alone).
        n_cases: number of cases (>= 4).
        seed: random seed; the same arguments give byte-identical files.
        shape: volume shape (X, Y, Z) in voxels, each >= 16.
        grouping: attribute the split is stratified by (``stage`` or ``institution``), with the subtype.
        dicom: also write each case as a DICOM CT series with an RTSTRUCT of the target.
        minority: hidden minority kind (``MINORITY_KINDS``).
        minority_frac: share of minority cases inside every stage group, in [0.05, 0.5] ([0.02, 0.5] for
            ``ring``).
        difficulty: minority level 0..3 (0: placebo); ``None``: the kind's calibrated default.
        split: training, validation and testing fractions.

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
    difficulty = DEFAULT_DIFFICULTY.get(minority, 0) if difficulty is None else difficulty
    _check_minority(minority, float(minority_frac), difficulty,
                    min_frac=MIN_MINORITY_FRAC_BY_KIND.get(minority, MIN_MINORITY_FRAC))  # fmt: skip
    split = _check_split(split)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    items = []
    for index, attrs in enumerate(draw_attributes(n_cases, seed, minority, float(minority_frac))):
        image, label, affine = make_case(attrs, seed, index, shape, difficulty)
        case_id = attrs["id"]
        _write_nifti(image, affine, out / "images" / f"{case_id}.nii.gz")
        _write_nifti(label, affine, out / "labels" / f"{case_id}.nii.gz")
        item = {"id": case_id, "image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz", **attrs}
        if dicom:
            item.update(_write_dicom_case(image, label, affine, out, case_id, attrs, seed, index))
        items.append(item)
        logger.info("wrote %s (%s, %s, %s, hard=%s)", case_id, attrs["stage"], attrs["institution"],
                    attrs["subtype"], attrs["hard"])  # fmt: skip
    datalist = {
        "name": "FairDRO synthetic heterogeneous cohort",
        "seed": seed,
        "shape": list(shape),
        "grouping": grouping,
        "minority": minority,
        "minority_frac": float(minority_frac),
        "difficulty": int(difficulty),
        "split": list(split),
        **stratified_split(items, grouping, seed, split),
    }
    return write_datalist(out, datalist)


def write_datalist(out: Path, datalist: dict) -> dict:
    """Write ``out/datalist.json`` atomically (a temporary file, then a rename); returns ``datalist``."""
    tmp = out / "datalist.json.tmp"
    tmp.write_text(json.dumps(datalist, indent=2) + "\n")
    tmp.replace(out / "datalist.json")
    return datalist


def _write_dicom_case(image, label, affine, out: Path, case_id: str, attrs: dict, seed: int, index: int) -> dict:
    """Write one case as a DICOM CT series plus RTSTRUCT; the storage variant (identity, flipped or
    transposed axes, reversed slices, oblique) cycles over the cases so every geometry is exercised."""
    from scripts.synthetic_dicom import VARIANTS, write_case_dicom  # DICOM stack only when asked

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


def _spatial_dims(argv: list[str]) -> int:
    """The ``--spatial-dims`` of a command line (3 when absent); argparse reports a value other than 2 or 3."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--spatial-dims", type=int, choices=(2, 3), default=3)
    return pre.parse_known_args(argv)[0].spatial_dims


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _spatial_dims(argv) == 2:  # the 2D cohort (PNG) has its own options: --shape X Y, --minority ring
        from scripts import synthetic_2d

        return synthetic_2d.main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=3,
                        help="3: this CT cohort (default); 2: the 2D PNG cohort (scripts/synthetic_2d.py)")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-cases", type=int, default=60, help="number of cases (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 48), metavar=("X", "Y", "Z"))
    parser.add_argument("--grouping", choices=("stage", "institution"), default="stage", help="split stratified by")
    parser.add_argument("--minority", default=DEFAULT_MINORITY, help=f"hidden minority kind {list(MINORITY_KINDS)}")
    parser.add_argument("--minority-frac", type=float, default=DEFAULT_MINORITY_FRAC,
                        help=f"share of minority cases per stage group (default {DEFAULT_MINORITY_FRAC})")  # fmt: skip
    parser.add_argument("--difficulty", type=int, default=None,
                        help="minority level 0..3 (0: placebo); default: the kind's calibrated level")  # fmt: skip
    parser.add_argument("--split", type=float, nargs=3, default=DEFAULT_SPLIT, metavar=("TRAIN", "VAL", "TEST"),
                        help="split fractions (default 0.6 0.2 0.2)")  # fmt: skip
    parser.add_argument("--dicom", action="store_true", help="also write DICOM CT series + RTSTRUCT per case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        datalist = generate_cohort(
            args.out, args.n_cases, args.seed, tuple(args.shape), args.grouping, args.dicom,
            args.minority, args.minority_frac, args.difficulty, tuple(args.split),
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(datalist, Path(args.out)))
    return 0


def summary_line(datalist: dict, out: Path, what: str = "cases") -> str:
    """What a generator command line prints: the split sizes, the hard and minority counts and the datalist path."""
    counts = {k: len(datalist[k]) for k in SPLIT_NAMES}
    items = [it for k in SPLIT_NAMES for it in datalist[k]]
    n_hard = sum(it["hard"] for it in items)
    n_min = sum(it["subtype"] != "majority" for it in items)
    return (
        f"wrote {len(items)} {what} ({counts}, {n_hard} hard, {n_min} {datalist['minority']} minority at level "
        f"{datalist['difficulty']}) to {out / 'datalist.json'}"
    )


if __name__ == "__main__":
    # allow `python bundle/scripts/synthetic.py` from anywhere: make the bundle root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
