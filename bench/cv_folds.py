"""Cross-validation folds of a user's datalist: stratified by the subgroup, patients kept together.

The benchmark on a user's datalist (``bench/benchmark_datalist.py``) splits the union of its ``training`` and
``validation`` lists into ``k`` folds. The splitting works on **units**: the items of one patient (items with the
same ``patient_key`` value) form one unit, an item without a patient value is a unit of its own. A unit's **stratum**
is its items' subgroup value (``subgroup_key``; the most common one when a patient's items disagree, the first of
those in sorted order on a tie; ``unknown`` when the items have none).

- :func:`assign_folds`: the units of each stratum (strata in sorted order) are shuffled (``default_rng(seed)``),
  then taken largest first (a stable sort keeps the shuffle among equal sizes) and each given to the fold that holds
  the fewest items of its stratum so far (ties: the fewest items overall, then the lowest fold). Without patients,
  the folds' counts of a stratum differ by at most one.
- :func:`inner_validation`: inside one fold's training part, ``fraction`` (10 %) of the items are held out for
  validation (checkpoint selection and the DRO recipe): ``n_val = max(1, round(fraction * n))`` items, shared out
  over the strata by largest remainder (``n_val * n_s / n`` each; ties by stratum name); each stratum's quota is
  filled with whole units in shuffled order (``default_rng([seed, fold])``), skipping a unit that would overshoot
  it; while the total is short of ``n_val`` (patients of several items), the smallest unit of the stratum furthest
  below its quota is added when that brings the total closer to ``n_val``. At least one unit is held out. Without
  patients every stratum gets exactly its quota.
- :func:`check_folds`: ``k`` must not exceed the number of units of the smallest stratum (else a fold would test no
  case of that group).

Every function takes plain item dicts and returns item indices; nothing here reads or writes files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the stratum of an item without a subgroup value
UNKNOWN = "unknown"
#: the share of a fold's training part held out for validation
INNER_FRACTION = 0.1


@dataclass(frozen=True)
class Unit:
    """Items that stay together (one patient's, or one item): their indices and their stratum."""

    key: str
    items: tuple[int, ...]
    stratum: str

    @property
    def size(self) -> int:
        return len(self.items)


def value_of(item: Mapping[str, Any], key: str | None) -> str | None:
    """An item's attribute as text (``None`` when missing or empty)."""
    if key is None:
        return None
    value = item.get(key)
    return None if value is None or str(value).strip() == "" else str(value)


def units_of(items: Sequence[Mapping[str, Any]], subgroup_key: str, patient_key: str | None = None) -> list[Unit]:
    """The units of ``items`` (see the module notes), in the order of their first item."""
    members: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        patient = value_of(item, patient_key)
        members.setdefault(f"patient:{patient}" if patient is not None else f"item:{i}", []).append(i)
    units = []
    for key, indices in members.items():
        counts = Counter(value_of(items[i], subgroup_key) or UNKNOWN for i in indices)
        stratum = sorted(counts, key=lambda s: (-counts[s], s))[0]
        units.append(Unit(key, tuple(indices), stratum))
    return units


def smallest_stratum(units: Sequence[Unit]) -> tuple[str, int]:
    """The stratum with the fewest units, and that number (ties: the first in sorted order)."""
    counts = Counter(u.stratum for u in units)
    name = sorted(counts, key=lambda s: (counts[s], s))[0]
    return name, counts[name]


def check_folds(k: int, units: Sequence[Unit], subgroup_key: str, unit_word: str = "cases") -> None:
    """Refuse ``k`` folds that some stratum cannot fill.

    Raises:
        ValueError: ``k < 2``, or ``k`` larger than the smallest stratum's number of units (one line, naming it).
    """
    if k < 2:
        raise ValueError(f"FOLDS must be at least 2, got {k}.")
    name, n = smallest_stratum(units)
    if k > n:
        what = f"{subgroup_key}={name} has {n} {unit_word[:-1] if n == 1 else unit_word}"
        fix = f"use FOLDS={n} or fewer" if n >= 2 else "merge it with another group or leave it out"
        raise ValueError(
            f"FOLDS={k} is larger than the smallest group: {what}, so some fold would test none of it; {fix}"
        )


def assign_folds(units: Sequence[Unit], k: int, seed: int = 0) -> list[int]:
    """The fold (``0..k-1``) of each unit, stratified and balanced (see the module notes)."""
    rng = np.random.default_rng(seed)
    fold_of = [0] * len(units)
    per_stratum = np.zeros((k,), dtype=int)
    total = np.zeros((k,), dtype=int)
    for stratum in sorted({u.stratum for u in units}):
        members = [i for i, u in enumerate(units) if u.stratum == stratum]
        shuffled = [members[j] for j in rng.permutation(len(members))]
        ordered = sorted(shuffled, key=lambda i: -units[i].size)  # stable: the shuffle orders equal sizes
        per_stratum[:] = 0
        for i in ordered:
            fold = min(range(k), key=lambda f: (per_stratum[f], total[f], f))
            fold_of[i] = fold
            per_stratum[fold] += units[i].size
            total[fold] += units[i].size
    return fold_of


def fold_test_items(
    items: Sequence[Mapping[str, Any]], k: int, subgroup_key: str, patient_key: str | None = None, seed: int = 0
) -> list[list[int]]:
    """The item indices each of the ``k`` folds tests (sorted); every item is in exactly one fold."""
    units = units_of(items, subgroup_key, patient_key)
    folds: list[list[int]] = [[] for _ in range(k)]
    for unit, fold in zip(units, assign_folds(units, k, seed)):
        folds[fold].extend(unit.items)
    return [sorted(f) for f in folds]


def quotas(sizes: Mapping[str, int], n_total: int) -> dict[str, int]:
    """``n_total`` shared out over strata in proportion to ``sizes`` by largest remainder (ties by name)."""
    n = sum(sizes.values())
    exact = {s: n_total * size / n for s, size in sizes.items()}
    out = {s: int(np.floor(v)) for s, v in exact.items()}
    left = n_total - sum(out.values())
    for s in sorted(exact, key=lambda s: (-round(exact[s] - out[s], 9), s))[:left]:
        out[s] += 1
    return out


def _fill(units: Sequence[Unit], want: Mapping[str, int], n_val: int, rng: np.random.Generator) -> list[Unit]:
    """Units for the validation split: each stratum's quota with whole units that fit it (shuffled order), then,
    while short of ``n_val``, the smallest unit of the stratum furthest below its quota when it brings the total
    closer to ``n_val`` (at least one unit in all)."""
    order = [units[j] for j in rng.permutation(len(units))]
    taken: Counter = Counter()
    chosen: list[Unit] = []
    for unit in order:
        if taken[unit.stratum] + unit.size <= want.get(unit.stratum, 0):
            chosen.append(unit)
            taken[unit.stratum] += unit.size
    while True:
        total = sum(taken.values())
        rest = [u for u in order if u not in chosen]
        if not rest or total >= n_val:
            break
        unit = min(rest, key=lambda u: (-(want.get(u.stratum, 0) - taken[u.stratum]), u.size, u.stratum))
        if chosen and total + unit.size - n_val > n_val - total:
            break
        chosen.append(unit)
        taken[unit.stratum] += unit.size
    return chosen


def inner_validation(
    items: Sequence[Mapping[str, Any]],
    indices: Sequence[int],
    subgroup_key: str,
    patient_key: str | None = None,
    seed: int = 0,
    fold: int = 0,
    fraction: float = INNER_FRACTION,
) -> tuple[list[int], list[int]]:
    """Split ``indices`` (fold ``fold``'s training part) into (training, validation), see the module notes.

    Raises:
        ValueError: ``fraction`` not in (0, 1), or fewer than two items.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}.")
    if len(indices) < 2:
        raise ValueError(f"a training part of {len(indices)} item(s) cannot give up a validation item.")
    units = units_of([items[i] for i in indices], subgroup_key, patient_key)
    sizes: Counter = Counter()
    for u in units:
        sizes[u.stratum] += u.size
    n_val = max(1, round(fraction * len(indices)))
    chosen = _fill(units, quotas(dict(sizes), n_val), n_val, np.random.default_rng([seed, fold]))
    val = sorted(indices[i] for u in chosen for i in u.items)
    held = set(val)
    return [i for i in indices if i not in held], val
