"""Intra-group diagnostic of the CVaR (issue 29, item 2): can a within-subgroup CVaR see the hidden minority at all?

At a bank refresh the eval-mode loss of every training case is known. Per subgroup g the CVaR puts its weight on the
**top-alpha set**: the ``c_g = ceil(alpha n_g)`` cases of highest loss. This module measures, on that set,

- **precision**: the share of minority cases among the ``c_g`` top cases (the CVaR's view of the minority);
- **recall**: the share of the group's minority cases that fall in the top set;
- **base rate**: the minority share of the whole group (what precision is without any signal).

If precision stays at the base rate, the CVaR cannot see the minority. The ``pooled`` figures take the union of the
per-group top sets over all subgroups.

**Ties and the boundary** (as :func:`scripts.fairdro.cvar_weights` handles them): the top set holds ``c_g`` cases,
the boundary case (rank ``c_g - 1``, 0 = highest loss) counted whole, so the set is exactly the cases with a non-zero
CVaR weight when ``alpha n_g`` is not an integer; a block of tied losses that straddles the cut shares the remaining
places equally (each of its cases counts as the same fraction), so nothing depends on the order of the cohort.
``alpha n_g`` is rounded up after subtracting ``1e-9`` (``0.1 * 30`` is ``3.0000000000000004`` in floating point and
means 3 cases).

**Separation from training.** The minority flag is the datalist's ``subtype`` (not ``"majority"``), the hidden
label that only the oracle variants and the evaluation otherwise read. Here it is read to *report*: nothing in this
module writes to the :class:`~scripts.fairdro.FairDRO` bank, its weights or the sampler.
:class:`scripts.bank_refresh.BankRefreshHandler` builds an :class:`IntraGroupDiagnostic` only when the config sets
``dro#diagnose: true``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["IntraGroupDiagnostic", "intra_group_diagnostic", "minority_flags", "top_alpha_membership"]

#: metric name prefix of the diagnostic in ``engine.state.metrics`` and the logs
PREFIX = "cvar_"
_EPS = 1e-9


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be a number in (0, 1] (the CVaR tail fraction), got {alpha!r}.")
    return float(alpha)


def top_alpha_membership(losses: torch.Tensor | Sequence[float], alpha: float = 0.2) -> torch.Tensor:
    """Membership of each case of one group in its top-alpha set, ``(n,)`` float64 in [0, 1], summing to
    ``ceil(alpha n)``: 1 for the ``ceil(alpha n)`` highest losses, 0 below, and a tie block across the cut shares
    the places left (see the module notes).

    Raises:
        ValueError: for ``alpha`` outside (0, 1] or ``losses`` that is not 1-D.
    """
    alpha = _check_alpha(alpha)
    x = torch.as_tensor(losses, dtype=torch.float64)
    if x.ndim != 1:
        raise ValueError(f"losses must be a 1-D tensor (n,), got shape {tuple(x.shape)}.")
    n = x.numel()
    if n == 0:
        return x.new_zeros(0)
    top = max(1, math.ceil(alpha * n - _EPS))
    sorted_x, order = torch.sort(x, descending=True, stable=True)
    by_rank = (torch.arange(n) < top).to(torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    block = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, by_rank)
    return torch.empty_like(by_rank).scatter_(0, order, (block / counts.to(torch.float64))[inverse])


def _rates(member: torch.Tensor, minority: torch.Tensor) -> dict[str, float]:
    flags = minority.to(torch.float64)
    n_top, n_min = float(member.sum()), float(flags.sum())
    hits = float((member * flags).sum())
    return {
        "precision": hits / n_top if n_top > 0 else math.nan,
        "recall": hits / n_min if n_min > 0 else math.nan,
        "base_rate": n_min / member.numel() if member.numel() else math.nan,
        "n": float(member.numel()),
        "n_minority": n_min,
        "n_top": n_top,
    }


def intra_group_diagnostic(
    losses: torch.Tensor | Sequence[float],
    groups: torch.Tensor | Sequence[int],
    minority: torch.Tensor | Sequence[bool],
    alpha: float = 0.2,
) -> dict[Any, dict[str, float]]:
    """CVaR precision, recall and base rate of every subgroup, and pooled over them.

    Args:
        losses: bank loss of every case, ``(N,)``.
        groups: subgroup index of every case, ``(N,)``; a negative index leaves the case out.
        minority: whether each case is in the hidden minority, ``(N,)`` bool.
        alpha: CVaR tail fraction in (0, 1].

    Returns:
        ``{g: {"precision", "recall", "base_rate", "n", "n_minority", "n_top"}}`` for every non-empty group index
        ``g`` (sorted), plus ``"pooled"`` (the union of the groups' top sets). Recall is NaN where a group has no
        minority case.

    Raises:
        ValueError: when the three inputs differ in length, or for an invalid ``alpha``.
    """
    x = torch.as_tensor(losses, dtype=torch.float64).flatten()
    g = torch.as_tensor(groups, dtype=torch.long).flatten()
    m = torch.as_tensor(minority, dtype=torch.bool).flatten()
    if not x.numel() == g.numel() == m.numel():
        raise ValueError(f"losses, groups and minority must have one entry per case, got {x.numel()}, {g.numel()}, "
                         f"{m.numel()}.")  # fmt: skip
    member = torch.zeros_like(x)
    out: dict[Any, dict[str, float]] = {}
    for k in sorted(set(g[g >= 0].tolist())):
        idx = torch.nonzero(g == k).flatten()
        member[idx] = top_alpha_membership(x[idx], alpha)
        out[k] = _rates(member[idx], m[idx])
    included = g >= 0
    out["pooled"] = _rates(member[included], m[included])
    return out


def minority_flags(
    items: Sequence[Mapping[str, Any]],
    ids: Sequence[str],
    id_key: str = "id",
    subtype_key: str = "subtype",
    majority_value: str = "majority",
) -> torch.Tensor:
    """Minority flag of each case id, ``(len(ids),)`` bool, from datalist items (``subtype_key`` not the majority).

    Raises:
        ValueError: when an id has no item, or its item lacks ``subtype_key``.
    """
    by_id = {str(it.get(id_key)): it for it in items if isinstance(it, Mapping)}
    lacking = [c for c in ids if subtype_key not in by_id.get(str(c), {})]
    if lacking:
        raise ValueError(
            f"the intra-group diagnostic reads {subtype_key!r} from the training datalist; cases {lacking[:5]} lack "
            "it (a cohort without a recorded hidden minority cannot be diagnosed: leave dro#diagnose false)."
        )
    return torch.tensor([str(by_id[str(c)][subtype_key]) != majority_value for c in ids], dtype=torch.bool)


class IntraGroupDiagnostic:
    """The diagnostic of a fixed training cohort: turns the eval-mode losses of a bank refresh into metrics.

    Args:
        ids: case ids of the cohort (the FairDRO cohort order).
        groups: subgroup index of each case, ``(N,)``; ``num_groups`` (unknown) and negative ones are left out.
        minority: minority flag of each case, ``(N,)`` bool (:func:`minority_flags`).
        group_names: name of each subgroup index ``0..num_groups-1`` (metric names ``cvar_precision_<name>``).
        alpha: CVaR tail fraction (the FairDRO ``alpha``, also when the run's weights do not use the CVaR).
    """

    def __init__(
        self,
        ids: Sequence[str],
        groups: torch.Tensor | Sequence[int],
        minority: torch.Tensor | Sequence[bool],
        group_names: Sequence[str],
        alpha: float = 0.2,
    ) -> None:
        self.alpha = _check_alpha(alpha)
        self.group_names = [str(n) for n in group_names]
        g = torch.as_tensor(groups, dtype=torch.long).flatten()
        self.groups = torch.where(g < len(self.group_names), g, torch.full_like(g, -1))
        self.minority = torch.as_tensor(minority, dtype=torch.bool).flatten()
        self._row = {str(c): r for r, c in enumerate(ids)}
        if not len(self._row) == self.groups.numel() == self.minority.numel():
            raise ValueError(f"ids, groups and minority must have one entry per case, got {len(self._row)}, "
                             f"{self.groups.numel()}, {self.minority.numel()}.")  # fmt: skip

    def metric_names(self) -> list[str]:
        """Every metric name :meth:`metrics` may return (pooled first, then per group)."""
        tails = ["", *(f"_{n}" for n in self.group_names)]
        return [f"{PREFIX}{m}{t}" for t in tails for m in ("precision", "recall", "base_rate")]

    def compute(self, ids: Sequence[Any], losses: torch.Tensor | Sequence[float]) -> dict[Any, dict[str, float]]:
        """:func:`intra_group_diagnostic` of the cohort from the losses of a refresh pass (any order; a case
        measured more than once counts with the mean of its losses; every cohort case must be measured).

        Raises:
            ValueError: for an id outside the cohort or a cohort case that was not measured.
        """
        x = torch.as_tensor(losses, dtype=torch.float64).flatten()
        unknown = [c for c in ids if str(c) not in self._row]
        if unknown or x.numel() != len(ids):
            raise ValueError(f"got {x.numel()} losses for {len(ids)} ids; ids outside the cohort: {unknown[:5]}.")
        rows = torch.tensor([self._row[str(c)] for c in ids], dtype=torch.long)
        n = self.groups.numel()
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, x)
        counts = torch.bincount(rows, minlength=n)
        if bool((counts == 0).any()):
            missing = [c for c, r in self._row.items() if counts[r] == 0]
            raise ValueError(f"the refresh pass did not measure cohort cases {missing[:5]} ({len(missing)} in all).")
        return intra_group_diagnostic(sums / counts, self.groups, self.minority, self.alpha)

    def metrics(self, result: Mapping[Any, Mapping[str, float]]) -> dict[str, float]:
        """Flat metric dict of a :meth:`compute` result: ``cvar_<measure>`` (pooled) and ``cvar_<measure>_<group>``
        for precision, recall and base_rate; a NaN (recall of a group without minority cases) is left out."""
        out: dict[str, float] = {}
        for key, values in result.items():
            tail = "" if key == "pooled" else f"_{self.group_names[key]}"
            for measure in ("precision", "recall", "base_rate"):
                if not math.isnan(values[measure]):
                    out[f"{PREFIX}{measure}{tail}"] = float(values[measure])
        return out

    def describe(self, result: Mapping[Any, Mapping[str, float]]) -> str:
        """One line for the log: per group ``name p=precision r=recall base=base_rate (minority/n, top)``."""
        parts = []
        for key, v in result.items():
            name = "pooled" if key == "pooled" else self.group_names[key]
            parts.append(f"{name} p={v['precision']:.3f} r={v['recall']:.3f} base={v['base_rate']:.3f} "
                         f"({v['n_minority']:.0f}/{v['n']:.0f}, top {v['n_top']:.0f})")  # fmt: skip
        return f"alpha {self.alpha:g}: " + "; ".join(parts)
