"""Rules shared by the 2D data-set preparers (``prepare_fairseg.py``, ``prepare_ham10000.py``).

- :func:`split_groups` / :func:`split_items`: a split stratified by one attribute. Inside every value of the
  attribute the units (cases, or lesions holding several images) are shuffled with the seed and cut by
  :func:`apportion` (largest remainder), so every split gets its share of every value, rounded per value.
  ``DEFAULT_FRACTIONS`` is the 60/10/30 split used when a data set gives none; ``TRAIN_ONLY_VALIDATION`` carves
  10 % of a given training list into validation. (``scripts.synthetic.stratified_split`` deals 3D cohorts with
  subtype and hard-case ordering and needs a testing share; these preparers need neither.)
- :func:`count_lines`: the per-split counts of each attribute value, as lines for a script to print.
- :func:`check_targets` and :func:`write_outputs`: nothing is written into the data folder, no existing file is
  replaced without ``overwrite``, and every file is written to a temporary file first; the temporary files are
  renamed only when all of them were written, the datalist last.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

SPLIT_NAMES = ("training", "validation", "testing")
DEFAULT_FRACTIONS = (0.6, 0.1, 0.3)
#: 10 % of a given training list becomes validation (no testing share: the test list is given)
TRAIN_ONLY_VALIDATION = (0.9, 0.1, 0.0)
UNKNOWN = "unknown"


class PrepareError(ValueError):
    """Bad input or output: the message is one line naming the file and the problem."""


def apportion(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` units over ``fractions`` by largest remainder (ties go to the earlier split); sums to ``n``."""
    if n < 0 or len(fractions) != len(SPLIT_NAMES) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"need n >= 0 and {len(SPLIT_NAMES)} fractions >= 0, got n={n}, fractions={fractions}.")
    raw = [n * f / sum(fractions) for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (-round(raw[k] - counts[k], 9), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def split_groups(
    groups: Mapping[str, Sequence[dict]], strata: Mapping[str, str], seed: int, fractions=DEFAULT_FRACTIONS
) -> dict[str, list[dict]]:
    """Split whole groups of items (all items of a group go to the same split), stratified by group.

    Args:
        groups: group id -> its items (each item has an ``id``).
        strata: group id -> the value the split is stratified by.
        seed: shuffle seed (the same seed gives the same split).
        fractions: training, validation and testing shares.

    Returns:
        ``{"training": [...], "validation": [...], "testing": [...]}``, each sorted by item id.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 28]))
    out: dict[str, list[dict]] = {name: [] for name in SPLIT_NAMES}
    for value in sorted(set(strata.values())):
        members = sorted(g for g in groups if strata[g] == value)
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for name, count in zip(SPLIT_NAMES, apportion(len(members), fractions)):
            for group in members[start : start + count]:
                out[name].extend(groups[group])
            start += count
    for part in out.values():
        part.sort(key=lambda item: item["id"])
    return out


def split_items(items: Sequence[dict], key: str, seed: int, fractions=DEFAULT_FRACTIONS) -> dict[str, list[dict]]:
    """:func:`split_groups` with one item per group, stratified by ``item[key]``."""
    return split_groups({it["id"]: [it] for it in items}, {it["id"]: str(it[key]) for it in items}, seed, fractions)


def age_text(age: float | str) -> str:
    """An age written as text (``"59"``, ``"63.42"``, ``"unknown"``): every item's ``age`` has one type, since MONAI's
    collate refuses a batch that mixes numbers and text."""
    return age if isinstance(age, str) else f"{age:g}"


def majority_value(items: Iterable[dict], key: str) -> str:
    """The most common ``item[key]`` (ties: the first in sorted order): the stratum of a group of items."""
    counts = Counter(str(it[key]) for it in items)
    return min(counts, key=lambda value: (-counts[value], value))


def count_lines(splits: Mapping[str, Sequence[dict]], keys: Sequence[str]) -> list[str]:
    """Per-split counts of every value of each key, as printable table lines (one block per key)."""
    lines = []
    for key in keys:
        values = sorted({str(it.get(key, UNKNOWN)) for part in splits.values() for it in part})
        width = max([len(key), *(len(v) + 2 for v in values)])
        lines.append(f"{key:<{width}}" + "".join(f"{n:>12}" for n in (*SPLIT_NAMES, "total")))
        for value in values:
            counts = [sum(str(it.get(key, UNKNOWN)) == value for it in splits[n]) for n in SPLIT_NAMES]
            lines.append(f"  {value:<{width - 2}}" + "".join(f"{c:>12}" for c in (*counts, sum(counts))))
    lines.append(f"{'cases':<{max(len(k) for k in keys)}}" + "".join(f"{len(splits[n]):>12}" for n in SPLIT_NAMES))
    return lines


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_targets(targets: Sequence[Path], inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse a target inside an input folder, or an existing target without ``overwrite``.

    Raises:
        PrepareError: naming the first offending target.
    """
    for target in targets:
        for folder in inputs:
            if _inside(target, folder):
                raise PrepareError(f"{target}: inside the data folder {folder}; choose --out outside it.")
        if target.exists() and not overwrite:
            raise PrepareError(f"{target}: exists; pass --overwrite to replace it.")


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_temp(target: Path, data: bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(name, _file_mode())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def write_outputs(files: Iterable[tuple[Path, Callable[[], bytes]]], datalist: dict, datalist_path: Path) -> None:
    """Write every ``(target, make_bytes)`` and then the datalist JSON, all through temporary files.

    The bytes are made one file at a time (a data set need not fit in memory). Nothing is renamed into place
    until every temporary file is written; on a failure the temporary files are removed and the targets are
    untouched.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for target, make in files:
            temps.append((_write_temp(target, make()), target))
        text = json.dumps(datalist, indent=2) + "\n"
        temps.append((_write_temp(datalist_path, text.encode("utf-8")), datalist_path))
    except BaseException:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        raise
    for temp, target in temps:
        os.replace(temp, target)
