"""Subgroup-conditioned distributionally robust weighting (FairDRO; the bundle's ``docs/method.md``, section 3).

The objective is a weighted ERM with **composite sample weights** over the training cohort of N cases:

    min_theta  sum_g pi_g * sum_{i in g} q_{i|g} * l_i,     w_i = pi_g * q_{i|g},     sum_i w_i = 1.

- intra-group weights ``q_{i|g}`` (``intra``): ``"cvar"`` (CVaR at level ``alpha``: weight ``1/(alpha n_g)`` on the
  worst ``ceil(alpha n_g)`` cases of g, the boundary case taking the fractional remainder, optionally mixed with the
  uniform weight by ``floor``), ``"tilted"`` (softmax of ``l/tau`` within g, KL-ball DRO / tilted ERM), ``"none"``
  (``1/n_g``) or ``"oracle"`` (the reference that knows the hidden minority: minority and majority of each group
  weighted equally);
- inter-group weights ``pi_g`` (``inter``): ``"uniform"`` (1/G over the non-empty groups), ``"empirical"``
  (``n_g / N``) or ``"groupdro"`` (``pi <- normalize(pi * exp(eta * R_g))`` after every step, Sagawa et al. 2020,
  https://arxiv.org/abs/1911.08731, with ``R_g = sum_{i in g} q_{i|g} l_i`` the group's robust risk).

``intra="none", inter="empirical"`` gives ``w_i = 1/N``: plain ERM.

3D batches hold 1-4 volumes, so the supremum inside one batch is degenerate. :class:`FairDRO` therefore keeps a
**per-case loss bank** keyed by the case id of the datalist and computes the weights over the whole cohort from it:
either eval-mode losses of every case written by :meth:`FairDRO.refresh` (``refresh_every > 0``, the bundle's
default, :mod:`scripts.bank_refresh`) or an exponential moving average of the training losses. The intra weights are
then mixed with the uniform ones until the effective sample size reaches ``min_ess`` (:func:`ess_floor_mix`).

Choices made here (the contract leaves them open):

- **Cohort given up front.** ``FairDRO`` is built from the training datalist (ids and subgroups), so N, the group
  sizes ``n_g`` and the set of cases that still have no bank entry are known from the first step. A batch id that is
  not in the cohort is an error (it means the datalist and the dataset disagree), not a silent new case.
- **Bank update without refresh** (``refresh_every=0``). ``b_i <- (1 - ema) b_i + ema * l_i`` with ``l_i`` the mean of
  the case's patches in this step (a case cropped into several patches of one batch is updated once). A case not seen
  yet starts from its group's running mean (mean bank value of the group's seen cases, before this step); when its group
  has no seen case, from the mean of all seen cases; when nothing at all has been seen, from its own loss (so ``b_i =
  l_i``). For the weights, an unseen case reads the same prior (0 before anything has been seen: all tied, so uniform
  within the group).
- **Ties.** CVaR weights are averaged over cases with equal bank values, so the weights are unique and do not depend
  on the order of the cohort (the CVaR value itself is unchanged).
- **Default ``apply="loss"``.** The weights scale the per-sample losses of a uniformly sampled minibatch:
  ``loss = (N / B) * sum_{j in batch} w_{id(j)} l_j`` (B rows of the batch, duplicates of one case counted each
  time), an unbiased estimate of ``sum_i w_i l_i`` under uniform sampling; with ``w_i = 1/N`` it is exactly the
  batch mean. Every case is still visited each epoch, so every bank entry stays fresh, and the method stays a pure
  loss change on top of the standard data pipeline. ``apply="sample"`` (with :class:`scripts.engine.FairDROSampler`)
  draws cases with probability ``w_i`` and uses the plain batch mean: no steps are spent on zero-weight cases, but a
  case with weight 0 is never drawn again, so its bank entry goes stale and a case that becomes hard later is not
  noticed (use ``floor > 0`` with it).
  **The bundle's train.json uses ``apply="sample"``** (the class default stays ``"loss"``, the choice that needs no
  sampler): with CVaR at alpha 0.2 and batches of two volumes, loss weighting gave a zero loss in 16 of 18 steps of an
  epoch on the first synthetic cohort (measured), so most of the compute was spent on cases whose weight is 0. With
  the eval-mode refresh every case is measured every epoch whether it is drawn or not, and the ESS floor keeps
  every case's weight above 0. Which of the two is better under this design is to be measured on the validation
  split (model card, *The FairDRO loss*).
- **Warm-up.** ``warmup_epochs=k`` (the bundle's setting): ERM weights for the first k epochs, and in refresh mode until
  the first refresh. Otherwise (deprecated ``warmup_steps``, default ``None``): ERM weights (``1/N``, loss exactly the
  batch mean, GroupDRO ``pi`` frozen) until every cohort case has a bank entry (with ``apply="loss"``: the first epoch;
  its last batch, whose update completes the bank, is already weighted). Before that, unseen entries are placeholders
  and ranking them would put all the weight on whichever cases happened to come first. An integer k gives exactly k ERM
  steps instead (0: none). The warm-up is judged after each step's bank update, like the weights.
- **Unknown subgroup** (index ``num_groups``, i.e. a value missing from or not in the config's subgroup list):
  ``unknown="erm"`` (default) keeps those cases at their ERM weight ``1/N`` and leaves them out of every DRO
  statistic (intra ranking, group risks, ``pi``); the named groups share the remaining mass
  ``1 - n_unknown / N``. They are not a population whose worst case we were asked to guard, and pooling unrelated
  cases as one more group would give them a group's full ``pi`` share. ``unknown="group"`` treats them as an extra
  group ``G`` with its own intra weights and ``pi`` entry instead.
- **Distributed training**: when ``torch.distributed`` is initialised, :meth:`FairDRO.update` all-gathers the
  ``(ids, groups, losses)`` of the step from every rank before updating, so all ranks hold the same bank, ``pi`` and
  weights.

The maths is also exposed as pure functions (:func:`cvar_weights`, :func:`tilted_weights`, :func:`oracle_weights`,
:func:`groupdro_update`, :func:`intra_group_weights`, :func:`composite_weights`, :func:`ess_floor_mix`) to be tested
separately from the stateful object.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "APPLY_MODES",
    "INTER_MODES",
    "INTRA_MODES",
    "UNKNOWN_POLICIES",
    "FairDRO",
    "composite_weights",
    "cvar_weights",
    "effective_sample_size",
    "ess_floor_mix",
    "groupdro_update",
    "intra_group_weights",
    "oracle_weights",
    "tilted_weights",
]

logger = logging.getLogger(__name__)

INTRA_MODES = ("cvar", "tilted", "none", "oracle")
INTER_MODES = ("uniform", "empirical", "groupdro")
APPLY_MODES = ("loss", "sample")
UNKNOWN_POLICIES = ("erm", "group")

_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------------------
def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_alpha(alpha: Any) -> float:
    if not _is_real(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be a number in (0, 1] (the CVaR tail fraction), got {alpha!r}.")
    return float(alpha)


def _check_floor(floor: Any) -> float:
    if not _is_real(floor) or not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be a number in [0, 1] (share of the uniform weight mixed in), got {floor!r}.")
    return float(floor)


def _check_tau(tau: Any) -> float:
    if not _is_real(tau) or tau <= 0.0:
        raise ValueError(f"tau must be a number > 0 (tilted-loss temperature), got {tau!r}.")
    return float(tau)


def _check_eta(eta: Any) -> float:
    if not _is_real(eta) or eta < 0.0:
        raise ValueError(f"eta must be a number >= 0 (GroupDRO step size), got {eta!r}.")
    return float(eta)


def _check_ema(ema: Any) -> float:
    if not _is_real(ema) or not 0.0 < ema <= 1.0:
        raise ValueError(f"ema must be a number in (0, 1] (weight of the newest loss in the bank), got {ema!r}.")
    return float(ema)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return str(value)


def _as_vector(losses: torch.Tensor | Sequence[float], name: str = "losses") -> torch.Tensor:
    x = torch.as_tensor(losses)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor (n,), got shape {tuple(x.shape)}.")
    if not torch.is_floating_point(x):
        x = x.to(torch.float64)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------------------------------
def cvar_weights(losses: torch.Tensor | Sequence[float], alpha: float = 0.2, floor: float = 0.0) -> torch.Tensor:
    """CVaR weights of one group: the distribution that attains the mean of the worst ``alpha`` fraction.

    With ``k = alpha * n``, the case of rank ``r`` (0 = highest loss) gets ``min(max(k - r, 0), 1) / k``: weight
    ``1/(alpha n)`` on the worst ``floor(k)`` cases, the fractional remainder on the boundary case
    (rank ``ceil(k) - 1``) and 0 below; the weights sum to 1. When ``k < 1`` the worst case takes all the mass. Tied
    losses share the mean of their weights. With ``floor > 0`` the result is
    ``(1 - floor) * q_cvar + floor / n``.

    Args:
        losses: per-case losses of one group, shape ``(n,)``.
        alpha: tail fraction in (0, 1]; 1 gives the uniform weights (the group mean).
        floor: share of the uniform weight mixed in, in [0, 1].

    Returns:
        weights, shape ``(n,)``, same dtype as ``losses`` (float64 for integer input), summing to 1 (empty for n = 0).
    """
    alpha, floor = _check_alpha(alpha), _check_floor(floor)
    x = _as_vector(losses)
    n = x.numel()
    if n == 0:
        return x.new_zeros(0)
    k = alpha * n
    ranks = torch.arange(n, dtype=torch.float64, device=x.device)
    sorted_w = (k - ranks).clamp(0.0, 1.0) / k  # weights by rank, highest loss first
    sorted_x, order = torch.sort(x, descending=True, stable=True)
    # tied losses: give each the mean weight of its tie block
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    block_sum = torch.zeros(counts.numel(), dtype=torch.float64, device=x.device).index_add_(0, inverse, sorted_w)
    sorted_w = (block_sum / counts.to(torch.float64))[inverse]
    w = torch.empty_like(sorted_w).scatter_(0, order, sorted_w)
    if floor > 0.0:
        w = (1.0 - floor) * w + floor / n
    return w.to(x.dtype)


def tilted_weights(losses: torch.Tensor | Sequence[float], tau: float = 1.0) -> torch.Tensor:
    """Tilted (KL-ball DRO) weights of one group: ``softmax(l / tau)``.

    ``tau -> inf`` gives the uniform weights (group mean), ``tau -> 0`` puts all the mass on the highest loss.

    Args:
        losses: per-case losses of one group, shape ``(n,)``.
        tau: temperature, > 0.

    Returns:
        weights, shape ``(n,)``, summing to 1 (empty for n = 0).
    """
    tau = _check_tau(tau)
    x = _as_vector(losses)
    if x.numel() == 0:
        return x.new_zeros(0)
    return torch.softmax(x / tau, dim=0)


def oracle_weights(minority: torch.Tensor | Sequence[bool]) -> torch.Tensor:
    """Oracle weights of one group: its minority and its majority carry equal total weight (1/2 each).

    A minority case gets ``1 / (2 n_min)`` and a majority case ``1 / (2 n_maj)``: relative to a majority case,
    a minority case weighs ``n_maj / n_min = (1 - f) / f`` for a minority share ``f``. A group with only one
    subtype gets the uniform weights ``1/n``. This is the upper reference of what a method that *knew* the
    hidden minority could do (the ``oracle`` variant); it reads the ``subtype`` that no other variant sees.

    Args:
        minority: whether each case of the group is a minority case, shape ``(n,)``.

    Returns:
        weights, shape ``(n,)``, float64, summing to 1 (empty for n = 0).
    """
    m = torch.as_tensor(minority, dtype=torch.bool).flatten()
    n, n_min = m.numel(), int(m.sum())
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if n_min in (0, n):
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.full((n,), 0.5 / (n - n_min), dtype=torch.float64)
    w[m] = 0.5 / n_min
    return w


def intra_group_weights(
    losses: torch.Tensor | Sequence[float],
    intra: str = "cvar",
    alpha: float = 0.2,
    tau: float = 1.0,
    floor: float = 0.0,
    minority: torch.Tensor | Sequence[bool] | None = None,
) -> torch.Tensor:
    """Intra-group weights ``q_{i|g}`` of one group for the ``intra`` option.

    Args:
        losses: per-case losses of one group, shape ``(n,)``.
        intra: ``"cvar"``, ``"tilted"``, ``"none"`` (uniform ``1/n``) or ``"oracle"`` (:func:`oracle_weights`).
        alpha: CVaR tail fraction (``"cvar"``).
        tau: temperature (``"tilted"``).
        floor: uniform share mixed into the CVaR weights (``"cvar"``).
        minority: minority flag of each case (``"oracle"`` only, required there).

    Returns:
        weights, shape ``(n,)``, summing to 1 (empty for n = 0).
    """
    intra = _check_choice("intra", intra, INTRA_MODES)
    if intra == "oracle":
        if minority is None:
            raise ValueError("intra='oracle' needs the minority flag of every case (FairDRO subtype_key).")
        return oracle_weights(minority).to(_as_vector(losses).dtype)
    if intra == "cvar":
        return cvar_weights(losses, alpha=alpha, floor=floor)
    if intra == "tilted":
        return tilted_weights(losses, tau=tau)
    x = _as_vector(losses)
    return torch.full_like(x, 1.0 / max(x.numel(), 1))


def groupdro_update(
    pi: torch.Tensor, risks: torch.Tensor, eta: float = 0.01, active: torch.Tensor | None = None
) -> torch.Tensor:
    """One exponentiated-gradient step of GroupDRO: ``pi <- normalize(pi * exp(eta * R))``.

    Computed in log space (no overflow for large ``eta * R``). Inactive (empty) groups keep weight 0.

    Args:
        pi: current group weights, shape ``(G,)``, non-negative.
        risks: group risks ``R_g``, shape ``(G,)``.
        eta: step size, >= 0 (0 keeps ``pi`` up to normalisation).
        active: boolean mask ``(G,)`` of the groups that take part (default: all). Must select at least one group.

    Returns:
        new group weights, shape ``(G,)``, float64, summing to 1 over the active groups.
    """
    eta = _check_eta(eta)
    pi = torch.as_tensor(pi, dtype=torch.float64)
    risks = torch.as_tensor(risks, dtype=torch.float64)
    if pi.ndim != 1 or pi.shape != risks.shape:
        raise ValueError(f"pi and risks must be 1-D of the same shape, got {tuple(pi.shape)} and {tuple(risks.shape)}.")
    if active is None:
        active = torch.ones_like(pi, dtype=torch.bool)
    active = torch.as_tensor(active, dtype=torch.bool) & (pi > 0)
    if not bool(active.any()):
        raise ValueError("groupdro_update needs at least one active group with pi > 0.")
    logits = torch.full_like(pi, -math.inf)
    logits[active] = torch.log(pi[active]) + eta * risks[active]
    return torch.softmax(logits, dim=0)


def _intra_all(
    values: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    intra: str,
    alpha: float,
    tau: float,
    floor: float,
    minority: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intra weights for every case at once (cases with group < 0 get 0) and the group risks ``(K,)``."""
    q = torch.zeros_like(values)
    risks = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    for g in range(num_groups):
        idx = torch.nonzero(groups == g).flatten()
        if idx.numel() == 0:
            continue
        flags = None if minority is None else minority[idx]
        qg = intra_group_weights(values[idx], intra=intra, alpha=alpha, tau=tau, floor=floor, minority=flags)
        q[idx] = qg
        risks[g] = (qg * values[idx]).sum()
    return q, risks


def composite_weights(
    values: torch.Tensor,
    groups: torch.Tensor,
    pi: torch.Tensor,
    intra: str = "cvar",
    alpha: float = 0.2,
    tau: float = 1.0,
    floor: float = 0.0,
    minority: torch.Tensor | None = None,
) -> torch.Tensor:
    """Composite weights ``w_i = m * pi_{g(i)} * q_{i|g(i)}`` over a cohort.

    Args:
        values: per-case losses (bank values), shape ``(N,)``.
        groups: DRO group of each case, shape ``(N,)`` with values in ``0..K-1``; a negative value marks a case left
            out of the DRO statistics, which keeps its ERM weight ``1/N``.
        pi: inter-group weights, shape ``(K,)``; renormalised over the non-empty groups (an empty group never gets
            mass, and no NaN appears).
        intra, alpha, tau, floor, minority: see :func:`intra_group_weights` (``minority``: ``(N,)`` bool).

    Returns:
        weights, shape ``(N,)``, float64, summing to 1. The DRO cases share ``m = (number of DRO cases) / N``.
    """
    values = _as_vector(values, "values").to(torch.float64)
    groups = torch.as_tensor(groups, dtype=torch.long)
    pi = torch.as_tensor(pi, dtype=torch.float64)
    n = values.numel()
    if groups.shape != values.shape:
        raise ValueError(f"groups must have the shape of values {tuple(values.shape)}, got {tuple(groups.shape)}.")
    if n == 0:
        return values.new_zeros(0)
    num_groups = pi.numel()
    if int(groups.max()) >= num_groups:
        raise ValueError(f"groups holds index {int(groups.max())} but pi has only {num_groups} entries.")
    included = groups >= 0
    sizes = torch.bincount(groups[included], minlength=num_groups)
    pi = torch.where(sizes > 0, pi, torch.zeros_like(pi))
    w = torch.full_like(values, 1.0 / n)
    if not bool(included.any()):
        return w
    if float(pi.sum()) <= 0.0:  # no mass on any non-empty group: fall back to uniform over them
        pi = (sizes > 0).to(torch.float64)
    pi = pi / pi.sum()
    q, _ = _intra_all(values, groups, num_groups, intra, alpha, tau, floor, minority)
    mass = float(included.sum()) / n
    w[included] = mass * pi[groups[included]] * q[included]
    return w


def effective_sample_size(w: torch.Tensor) -> float:
    """Effective sample size ``(sum w)^2 / sum w^2`` of a weight vector (``N`` for uniform weights, 1 for one case)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    total = float((w * w).sum())
    return float(w.sum()) ** 2 / total if total > 0 else 0.0


def ess_floor_mix(
    w_dro: torch.Tensor, w_uniform: torch.Tensor, min_ess: float, lam_min: float = 0.0, iters: int = 50
) -> tuple[torch.Tensor, float]:
    """Mix DRO weights with the within-group uniform weights until the effective sample size reaches a floor.

    ``w(lam) = (1 - lam) w_dro + lam w_uniform``; returns the smallest ``lam`` in ``[lam_min, 1]`` with
    ``ESS(w(lam)) >= min_ess * N`` (bisection), or 1 when even the uniform weights fall short. Inside each group
    ``w_uniform`` is constant and both vectors give the group the same mass, so ``sum w(lam)^2`` is a quadratic
    with its minimum at ``lam = 1``: the ESS grows with ``lam`` on ``[0, 1]`` and bisection finds the smallest one.

    Args:
        w_dro: composite DRO weights ``(N,)`` summing to 1.
        w_uniform: the same composite weights with uniform intra weights ``q = 1/n_g`` ``(N,)``.
        min_ess: the floor as a fraction of N, in [0, 1].
        lam_min: lower bound on ``lam`` (the ``floor`` setting), in [0, 1].
        iters: bisection steps (2^-50 precision by default).

    Returns:
        ``(w, lam)``: the mixed weights ``(N,)`` (summing to 1) and the mixing share used.
    """
    if not 0.0 <= float(min_ess) <= 1.0:
        raise ValueError(f"min_ess must be a fraction of N in [0, 1], got {min_ess!r}.")
    w_dro, w_uniform = torch.as_tensor(w_dro, dtype=torch.float64), torch.as_tensor(w_uniform, dtype=torch.float64)
    target = float(min_ess) * w_dro.numel()

    def mix(lam: float) -> torch.Tensor:
        return (1.0 - lam) * w_dro + lam * w_uniform

    if effective_sample_size(mix(lam_min)) >= target:
        return mix(lam_min), float(lam_min)
    if effective_sample_size(w_uniform) < target:
        return w_uniform.clone(), 1.0
    lo, hi = float(lam_min), 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if effective_sample_size(mix(mid)) >= target else (mid, hi)
    return mix(hi), hi


def _to_group_index(value: Any, num_groups: int, names: dict[str, int] | None) -> int:
    """Subgroup index ``0..num_groups-1`` of a datalist value; ``num_groups`` (unknown) for anything else."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    if value is None:
        return num_groups
    if isinstance(value, str):
        if names is None:
            raise ValueError(
                f"cohort subgroup value {value!r} is a name but no group_names were given: pass group_names "
                "(the config's subgroup list) or map the names to indices first."
            )
        return names.get(value, num_groups)
    try:
        idx = int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cohort subgroup value {value!r} is neither a name nor an integer index.") from e
    return idx if 0 <= idx < num_groups else num_groups


# ----------------------------------------------------------------------------------------------------------------------
# stateful object
# ----------------------------------------------------------------------------------------------------------------------
class FairDRO:
    """Per-case loss bank and composite DRO weights over a fixed training cohort.

    One call of :meth:`update` per optimisation step feeds the step's per-sample losses (the trainer does it); the
    weights for the batch come from :meth:`loss_weights` / :meth:`reduce`, the cohort weights (for a weighted
    sampler or logs) from :meth:`case_weights`. All state is in :meth:`state_dict` (tensors, str, int, float,
    lists, dicts: loadable with ``torch.load(weights_only=True)``), so a resumed run continues exactly.

    Args:
        num_groups: number G of named subgroups (indices ``0..G-1``; ``G`` means unknown).
        cohort: the training cases, with their ids and subgroups. One of: a sequence of datalist items (mappings with
            ``id_key`` and ``group_key``; a missing/None group value is unknown), a mapping ``{id: group}``, or a
            sequence of ``(id, group)`` pairs. A group is an index (``0..G-1``; anything else is unknown) or a name
            from ``group_names`` (a name not in it is unknown). Ids are compared as strings and must be unique.
        intra: intra-group weights: ``"cvar"`` (default), ``"tilted"``, ``"none"`` or ``"oracle"`` (minority and
            majority of each group weighted equally, from ``subtype_key``; the weights never depend on the bank,
            so there is no warm-up).
        alpha: CVaR tail fraction, in (0, 1]. Default 0.2.
        tau: tilted temperature, > 0. Default 1.0.
        floor: share of the uniform intra weight mixed into the CVaR weights, in [0, 1]. Default 0 (pure CVaR).
        inter: inter-group weights: ``"uniform"`` (default), ``"empirical"`` or ``"groupdro"``.
        eta: GroupDRO step size, >= 0. Default 0.01.
        ema: weight of the newest loss in the bank EMA, in (0, 1] (1 keeps only the last loss). Default 0.5.
        apply: ``"loss"`` (default; weights scale the minibatch losses) or ``"sample"`` (weights are sampling
            probabilities for :class:`scripts.engine.FairDROSampler`; the loss is the batch mean).
        warmup_steps: ``None`` (default): ERM weights until every cohort case has been seen once; an int k: ERM
            weights for the first k steps (0: no warm-up).
        unknown: policy for unknown-subgroup cases: ``"erm"`` (default; ERM weight 1/N, left out of the DRO
            statistics) or ``"group"`` (an extra group of their own).
        group_names: names of the G subgroups (used to map name values of the cohort and to label the logs).
        id_key: key of the case id in cohort items. Default ``"id"``.
        group_key: key of the subgroup value in cohort items. Default ``"subgroup"``.
        sync_dist: all-gather the step's losses across ranks when ``torch.distributed`` is initialised.
        subtype_key: key of the hidden subtype in cohort items, read only with ``intra="oracle"`` (required there):
            a case is in the minority when its value is not ``majority_value``. ``None`` (default): not read.
        majority_value: the subtype value of the majority. Default ``"majority"``.
        min_ess: floor on the effective sample size of the weights, as a fraction of N, in [0, 1]: the intra
            weights are mixed with the uniform ones, ``q = (1 - lam) q_dro + lam / n_g``, with the smallest
            ``lam >= floor`` that reaches it (:func:`ess_floor_mix`; ``intra`` ``"cvar"`` and ``"tilted"``).
            Default 0 (no floor).
        warmup_epochs: ERM weights for the first k training epochs (see :meth:`epoch_completed`); replaces
            ``warmup_steps``. ``None`` (default): the ``warmup_steps`` rule.
        refresh_every: > 0: the bank is written only by :meth:`refresh` (an eval-mode pass over every training
            case, every ``refresh_every`` epochs, by :class:`scripts.bank_refresh.BankRefreshHandler`), so all
            weights come from fresh losses measured the same way; the per-step training losses then only count
            steps. 0 (default): the bank is the EMA of the training losses.
        diagnose: report the intra-group CVaR diagnostic (:mod:`scripts.cvar_diagnostic`) at every refresh point,
            warm-up and last epoch included, also when the weights do not use the bank (``dmoe``). A reporting
            switch only: :class:`scripts.bank_refresh.BankRefreshHandler` reads it and measures the eval-mode
            losses, which never reach the bank, the weights or the sampler unless a refresh is due anyway. Needs
            ``refresh_every > 0``. Default False.

    Raises:
        ValueError: for an invalid hyperparameter (naming it and the value) or an invalid cohort.
    """

    def __init__(
        self,
        num_groups: int,
        cohort: Sequence[Mapping[str, Any]] | Mapping[Any, Any] | Sequence[tuple[Any, Any]],
        intra: str = "cvar",
        alpha: float = 0.2,
        tau: float = 1.0,
        floor: float = 0.0,
        inter: str = "uniform",
        eta: float = 0.01,
        ema: float = 0.5,
        apply: str = "loss",
        warmup_steps: int | None = None,
        unknown: str = "erm",
        group_names: Sequence[str] | None = None,
        id_key: str = "id",
        group_key: str = "subgroup",
        sync_dist: bool = True,
        subtype_key: str | None = None,
        majority_value: str = "majority",
        min_ess: float = 0.0,
        warmup_epochs: int | None = None,
        refresh_every: int = 0,
        diagnose: bool = False,
    ) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        self.num_groups = num_groups
        self.intra = _check_choice("intra", intra, INTRA_MODES)
        self.inter = _check_choice("inter", inter, INTER_MODES)
        self.apply = _check_choice("apply", apply, APPLY_MODES)
        self.unknown = _check_choice("unknown", unknown, UNKNOWN_POLICIES)
        self.alpha = _check_alpha(alpha)
        self.tau = _check_tau(tau)
        self.floor = _check_floor(floor)
        self.eta = _check_eta(eta)
        self.ema = _check_ema(ema)
        if warmup_steps is not None and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be None or an integer >= 0, got {warmup_steps!r}.")
        if warmup_steps is not None:
            msg = "FairDRO warmup_steps is deprecated: use warmup_epochs (dro#warmup_epochs in the config)."
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            logger.warning(msg)
        self.warmup_steps = warmup_steps
        for name, value in (("warmup_epochs", warmup_epochs), ("refresh_every", refresh_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if not _is_real(min_ess) or not 0.0 <= min_ess <= 1.0:
            raise ValueError(f"min_ess must be a fraction of N in [0, 1], got {min_ess!r}.")
        self.min_ess = float(min_ess)
        self.warmup_epochs = warmup_epochs
        self.refresh_every = int(refresh_every)
        if not isinstance(diagnose, bool):
            raise ValueError(f"diagnose must be true or false, got {diagnose!r}.")
        if diagnose and self.refresh_every <= 0:
            raise ValueError("diagnose needs refresh_every > 0 (the diagnostic runs on the eval-mode refresh pass).")
        #: report the intra-group CVaR diagnostic at the refresh points (never changes a weight)
        self.diagnose = diagnose
        #: training epochs completed (:meth:`epoch_completed`), for ``warmup_epochs``
        self.epochs_completed = 0
        #: number of eval-mode bank refreshes so far
        self.num_refreshes = 0
        #: mixing share ``lam`` of the last weights computed (0 without the ESS floor)
        self.last_lam = 0.0
        if group_names is not None:
            if isinstance(group_names, str) or len(group_names) != num_groups:
                raise ValueError(f"group_names must list num_groups={num_groups} names, got {group_names!r}.")
            self.group_names = [str(n) for n in group_names]
        else:
            self.group_names = None
        self.id_key = id_key
        self.group_key = group_key
        self.sync_dist = sync_dist

        self.ids, groups = self._parse_cohort(cohort)
        #: minority flag of each case, ``(N,)`` bool, only with ``intra="oracle"`` (else None: never read)
        self.minority = self._parse_minority(cohort, subtype_key, majority_value) if intra == "oracle" else None
        self._row = {cid: r for r, cid in enumerate(self.ids)}
        #: subgroup index of each case, ``(N,)`` in ``0..G`` (``G`` = unknown)
        self.groups = torch.tensor(groups, dtype=torch.long)
        n = len(self.ids)
        #: bank value of each case (EMA of its loss), ``(N,)`` float64; meaningful where ``seen``
        self.bank = torch.zeros(n, dtype=torch.float64)
        #: whether each case has a bank entry, ``(N,)`` bool
        self.seen = torch.zeros(n, dtype=torch.bool)
        #: number of bank updates of each case, ``(N,)`` int64
        self.counts = torch.zeros(n, dtype=torch.long)
        #: number of :meth:`update` calls (optimisation steps) so far
        self.num_updates = 0
        sizes = self.group_sizes()
        if not bool((sizes > 0).any()):
            logger.warning("FairDRO: no cohort case has a known subgroup; every case keeps its ERM weight 1/N.")
        #: inter-group weights of the DRO groups, ``(K,)`` float64 (K = G, or G + 1 with ``unknown="group"``)
        self.pi = self._initial_pi()
        n_unknown = int((self.groups == num_groups).sum())
        if n_unknown:
            logger.info(
                "FairDRO: %d of %d cohort cases have an unknown subgroup (policy unknown=%r).", n_unknown, n, unknown
            )

    # ------------------------------------------------------------------ cohort
    def _parse_cohort(self, cohort: Any) -> tuple[list[str], list[int]]:
        names = None if self.group_names is None else {n: i for i, n in enumerate(self.group_names)}
        if isinstance(cohort, Mapping):
            pairs = list(cohort.items())
        elif isinstance(cohort, Sequence) and not isinstance(cohort, str):
            pairs = []
            for k, item in enumerate(cohort):
                if isinstance(item, Mapping):
                    if self.id_key not in item:
                        raise ValueError(
                            f"cohort item {k} has no case id key {self.id_key!r} (keys: {sorted(map(str, item))}); "
                            "give every datalist item an id or set id_key."
                        )
                    pairs.append((item[self.id_key], item.get(self.group_key)))
                elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
                    pairs.append((item[0], item[1]))
                else:
                    raise ValueError(f"cohort item {k} must be a mapping or an (id, group) pair, got {item!r}.")
        else:
            raise ValueError(
                f"cohort must be a list of datalist items, a mapping or (id, group) pairs, got {cohort!r}."
            )
        if not pairs:
            raise ValueError("cohort is empty: FairDRO needs the training cases (ids and subgroups).")
        ids = [str(cid) for cid, _ in pairs]
        if len(set(ids)) != len(ids):
            dup = sorted({c for c in ids if ids.count(c) > 1})
            raise ValueError(f"cohort case ids must be unique, repeated: {dup[:10]}.")
        groups = [_to_group_index(g, self.num_groups, names) for _, g in pairs]
        return ids, groups

    def _parse_minority(self, cohort: Any, subtype_key: str | None, majority_value: str) -> torch.Tensor:
        """Minority flags of the cohort for ``intra="oracle"`` (datalist items with ``subtype_key``)."""
        if not subtype_key:
            raise ValueError(
                "intra='oracle' needs subtype_key (the datalist key of the hidden subtype, e.g. 'subtype')."
            )
        items = cohort if isinstance(cohort, Sequence) and not isinstance(cohort, str) else []
        lacking = [k for k, it in enumerate(items) if not isinstance(it, Mapping) or subtype_key not in it]
        if not items or lacking:
            raise ValueError(
                f"intra='oracle' reads {subtype_key!r} from every cohort item; items {lacking[:5]} lack it (give the "
                "cohort as datalist items that carry the subtype)."
            )
        return torch.tensor([str(it[subtype_key]) != majority_value for it in items], dtype=torch.bool)

    @property
    def num_cases(self) -> int:
        """Cohort size N."""
        return len(self.ids)

    @property
    def num_dro_groups(self) -> int:
        """Number K of groups the DRO statistics run over: G, or G + 1 with ``unknown="group"``."""
        return self.num_groups + (1 if self.unknown == "group" else 0)

    def group_name(self, g: int) -> str:
        """Label of subgroup index ``g`` for logs and metric names (``"unknown"`` for index G)."""
        if g == self.num_groups:
            return "unknown"
        return self.group_names[g] if self.group_names is not None else f"g{g}"

    def dro_groups(self) -> torch.Tensor:
        """DRO group of each case, ``(N,)``: the subgroup index, or -1 for an unknown case left out (``"erm"``)."""
        if self.unknown == "erm":
            return torch.where(self.groups == self.num_groups, torch.full_like(self.groups, -1), self.groups)
        return self.groups.clone()

    def group_sizes(self) -> torch.Tensor:
        """Number of cohort cases in each DRO group, ``(K,)``."""
        g = self.dro_groups()
        return torch.bincount(g[g >= 0], minlength=self.num_dro_groups)

    def rows(self, ids: Sequence[Any]) -> torch.Tensor:
        """Cohort rows of case ids, ``(B,)`` int64.

        Raises:
            ValueError: for an id that is not in the cohort.
        """
        out = []
        for cid in ids:
            r = self._row.get(str(cid))
            if r is None:
                raise ValueError(
                    f"case id {cid!r} is not in the FairDRO cohort ({self.num_cases} cases, e.g. {self.ids[:3]}): "
                    "build FairDRO from the same datalist as the training dataset."
                )
            out.append(r)
        return torch.tensor(out, dtype=torch.long)

    def _initial_pi(self) -> torch.Tensor:
        sizes = self.group_sizes().to(torch.float64)
        if self.inter == "empirical":
            pi = sizes
        else:
            pi = (sizes > 0).to(torch.float64)
        total = pi.sum()
        return pi / total if total > 0 else pi

    # ------------------------------------------------------------------ bank
    @property
    def in_warmup(self) -> bool:
        """Whether the weights are still ERM weights (see ``warmup_steps``; never for ``intra="oracle"``)."""
        if self.intra == "oracle":
            return False
        if self.warmup_epochs is not None:
            return self.epochs_completed < self.warmup_epochs or (self.refresh_every > 0 and self.num_refreshes == 0)
        if self.warmup_steps is None:
            return not bool(self.seen.all())
        return self.num_updates <= self.warmup_steps

    @property
    def uses_bank(self) -> bool:
        """Whether the weights depend on the bank (False for ``intra`` none/oracle without GroupDRO: no refresh)."""
        return self.intra not in ("none", "oracle") or self.inter == "groupdro"

    def epoch_completed(self, epoch: int) -> None:
        """Record that training epoch ``epoch`` (1-based) is finished; drives ``warmup_epochs`` and the refresh
        schedule. Set, not incremented, so the trainer and the refresh handler may both call it."""
        self.epochs_completed = int(epoch)

    def refresh_due(self) -> bool:
        """Whether a bank refresh is due after the epoch just completed: refresh mode, warm-up over, on schedule."""
        if self.refresh_every <= 0 or not self.uses_bank:
            return False
        start = self.warmup_epochs or 0
        done = self.epochs_completed
        return done >= start and (done - start) % self.refresh_every == 0

    def refresh(self, ids: Sequence[Any], losses: torch.Tensor | Sequence[float]) -> None:
        """Replace the bank values of ``ids`` by fresh eval-mode losses (no EMA): every weight is then computed from
        losses measured the same way. A case listed twice keeps the mean of its losses.

        Raises:
            ValueError: for mismatched lengths, a non-finite loss or an id not in the cohort.
        """
        ids = [str(c) for c in ids]
        x = torch.as_tensor(losses).detach().to("cpu", torch.float64).flatten()
        if x.numel() != len(ids):
            raise ValueError(f"got {x.numel()} losses for {len(ids)} case ids.")
        if not bool(torch.isfinite(x).all()):
            bad = [c for c, v in zip(ids, x.tolist()) if not math.isfinite(v)]
            raise ValueError(f"non-finite eval-mode loss for case ids {bad}: the bank only takes finite values.")
        rows = self.rows(ids)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, x)
        cnts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(x))
        self.bank[uniq] = sums / cnts
        self.seen[uniq] = True
        self.num_refreshes += 1

    def _priors(self, fallback: float | torch.Tensor) -> torch.Tensor:
        """Prior bank value of each case, ``(N,)``: its group's seen mean, else the seen mean, else ``fallback``."""
        seen = self.seen
        if not bool(seen.any()):
            return torch.as_tensor(fallback, dtype=torch.float64).expand(self.num_cases).clone()
        k = self.num_groups + 1
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, self.groups[seen], self.bank[seen])
        cnts = torch.bincount(self.groups[seen], minlength=k).to(torch.float64)
        overall = self.bank[seen].mean()
        group_mean = torch.where(cnts > 0, sums / cnts.clamp(min=1.0), overall)
        return group_mean[self.groups]

    def filled_bank(self) -> torch.Tensor:
        """Bank values with unseen cases at their prior (group running mean, see the module notes), ``(N,)``."""
        return torch.where(self.seen, self.bank, self._priors(0.0))

    def _gather(
        self, ids: list[str], groups: list[int] | None, losses: torch.Tensor
    ) -> tuple[list[str], list[int] | None, torch.Tensor]:
        if not (self.sync_dist and dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return ids, groups, losses
        payload = (ids, groups, losses.tolist())
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, payload)
        all_ids = [c for o in out for c in o[0]]
        all_groups = None if any(o[1] is None for o in out) else [g for o in out for g in o[1]]
        all_losses = torch.tensor([v for o in out for v in o[2]], dtype=torch.float64)
        return all_ids, all_groups, all_losses

    def update(
        self,
        ids: Sequence[Any],
        losses: torch.Tensor | Sequence[float],
        groups: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        """Record one optimisation step: bank EMA update, then (``inter="groupdro"``, after warm-up) one ``pi`` step.

        Called exactly once per iteration (by :class:`scripts.engine.FairDROTrainer`). Under ``torch.distributed``
        the ``(ids, groups, losses)`` of all ranks are gathered first, so every rank applies the same update.

        Args:
            ids: case ids of the batch rows, length B; an id may repeat (several patches of one case): its losses
                are averaged into one observation.
            losses: per-sample losses, shape ``(B,)`` (detached, any device).
            groups: the batch's subgroup indices ``(B,)`` (``G`` = unknown), checked against the cohort; optional.

        Raises:
            ValueError: for mismatched lengths, a non-finite loss, an id not in the cohort or a subgroup that
                disagrees with the cohort's.
        """
        ids = [str(c) for c in ids]
        x = torch.as_tensor(losses).detach().to("cpu", torch.float64).flatten()
        if x.numel() != len(ids):
            raise ValueError(f"got {x.numel()} losses for {len(ids)} case ids.")
        gl = None
        if groups is not None:
            gl = [int(v) for v in torch.as_tensor(groups).detach().cpu().flatten().tolist()]
            if len(gl) != len(ids):
                raise ValueError(f"got {len(gl)} subgroup indices for {len(ids)} case ids.")
        if not bool(torch.isfinite(x).all()):
            bad = [c for c, v in zip(ids, x.tolist()) if not math.isfinite(v)]
            raise ValueError(f"non-finite loss for case ids {bad}: the loss bank only takes finite values.")
        ids, gl, x = self._gather(ids, gl, x)
        rows = self.rows(ids)
        if gl is not None:
            given = torch.tensor([g if 0 <= g < self.num_groups else self.num_groups for g in gl], dtype=torch.long)
            wrong = torch.nonzero(given != self.groups[rows]).flatten().tolist()
            if wrong:
                detail = [
                    (ids[j], self.group_name(int(given[j])), self.group_name(int(self.groups[rows[j]]))) for j in wrong
                ]
                raise ValueError(
                    "batch subgroup disagrees with the FairDRO cohort for (id, batch, cohort) "
                    f"{detail[:5]}: build FairDRO with the same subgroup list/key as the subgroup transform."
                )
        uniq, inverse = torch.unique(rows, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, x)
        cnts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(x))
        obs = sums / cnts
        prior = self._priors(0.0)[uniq]
        if not bool(self.seen.any()):
            prior = obs.clone()  # nothing seen anywhere: start each case at its own loss
        if self.refresh_every <= 0:  # refresh mode: only refresh() writes the bank
            start = torch.where(self.seen[uniq], self.bank[uniq], prior)
            self.bank[uniq] = (1.0 - self.ema) * start + self.ema * obs
            self.seen[uniq] = True
        self.counts[uniq] += 1
        self.num_updates += 1
        if self.inter == "groupdro" and not self.in_warmup:
            sizes = self.group_sizes()
            self.pi = groupdro_update(self.pi, self.group_risks(), eta=self.eta, active=sizes > 0)

    # ------------------------------------------------------------------ weights
    def group_risks(self) -> torch.Tensor:
        """Robust risk ``R_g = sum_{i in g} q_{i|g} b_i`` of each DRO group from the (filled) bank, ``(K,)``."""
        _, risks = _intra_all(
            self.filled_bank(),
            self.dro_groups(),
            self.num_dro_groups,
            self.intra,
            self.alpha,
            self.tau,
            self.floor,
            self.minority,
        )
        return risks

    def current_pi(self) -> torch.Tensor:
        """Inter-group weights in use, ``(K,)``: the ``inter`` rule, renormalised over the non-empty groups."""
        sizes = self.group_sizes()
        if self.inter == "groupdro":
            pi = torch.where(sizes > 0, self.pi, torch.zeros_like(self.pi))
        else:
            pi = self._initial_pi()
        total = pi.sum()
        return pi / total if total > 0 else pi

    def case_weights(self) -> torch.Tensor:
        """Composite weight ``w_i`` of every cohort case, ``(N,)`` float64, summing to 1 (``1/N`` in warm-up)."""
        n = self.num_cases
        self.last_lam = 0.0
        if self.in_warmup:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        bank, groups, pi = self.filled_bank(), self.dro_groups(), self.current_pi()
        if self.min_ess <= 0.0 or self.intra not in ("cvar", "tilted"):
            return composite_weights(bank, groups, pi, self.intra, self.alpha, self.tau, self.floor, self.minority)
        w_dro = composite_weights(bank, groups, pi, self.intra, self.alpha, self.tau, 0.0)
        w_uniform = composite_weights(bank, groups, pi, "none")
        w, self.last_lam = ess_floor_mix(w_dro, w_uniform, self.min_ess, lam_min=self.floor)
        return w

    def loss_weights(self, ids: Sequence[Any]) -> torch.Tensor:
        """Per-row multipliers ``m_j`` of a batch, ``(B,)`` float64; the batch loss is ``sum_j m_j l_j``.

        ``apply="loss"``: ``m_j = N w_{id(j)} / B`` (``1/B`` in warm-up); ``apply="sample"``: ``1/B``.
        """
        b = len(ids)
        if b == 0:
            raise ValueError("loss_weights needs at least one case id.")
        if self.apply == "sample" or self.in_warmup:
            self.rows(ids)  # still validate the ids
            return torch.full((b,), 1.0 / b, dtype=torch.float64)
        return self.case_weights()[self.rows(ids)] * (self.num_cases / b)

    def reduce(self, ids: Sequence[Any], losses: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of a batch from its per-sample losses ``(B,)`` (keeps the autograd graph).

        In warm-up and with ``apply="sample"`` this is exactly ``losses.mean()``.
        """
        if losses.ndim != 1 or losses.numel() != len(ids):
            raise ValueError(f"losses must have shape ({len(ids)},), got {tuple(losses.shape)}.")
        if self.apply == "sample" or self.in_warmup:
            self.rows(ids)
            return losses.mean()
        m = self.loss_weights(ids).to(device=losses.device, dtype=losses.dtype)
        return (m * losses).sum()

    # ------------------------------------------------------------------ reporting
    def summary(self, prefix: str = "dro_") -> dict[str, float]:
        """Scalars for logs and ``engine.state.metrics`` (all floats, no NaN).

        Keys (``<g>`` = group name, or ``g<k>``; ``unknown`` for unknown cases): ``loss_<g>`` (mean bank value over
        the group's seen cases, present once one is seen), ``pi_<g>`` (inter-group weight of each DRO group),
        ``mass_<g>`` (total composite weight on the group), ``risk_<g>`` (robust risk), ``w_max``, ``w_min``,
        ``ess`` (effective sample size ``1 / sum w^2``), ``ess_frac`` (``ess / N``), ``seen_frac``, ``warmup`` (1/0).
        """
        out: dict[str, float] = {}
        w = self.case_weights()
        for g in range(self.num_groups + 1):
            mask = self.groups == g
            if not bool(mask.any()):
                continue
            name = self.group_name(g)
            seen = mask & self.seen
            if bool(seen.any()):
                out[f"{prefix}loss_{name}"] = float(self.bank[seen].mean())
            out[f"{prefix}mass_{name}"] = float(w[mask].sum())
        pi, risks, sizes = self.current_pi(), self.group_risks(), self.group_sizes()
        for g in range(self.num_dro_groups):
            if int(sizes[g]) == 0:
                continue
            name = self.group_name(g)
            out[f"{prefix}pi_{name}"] = float(pi[g])
            out[f"{prefix}risk_{name}"] = float(risks[g])
        out[f"{prefix}w_max"] = float(w.max())
        out[f"{prefix}w_min"] = float(w.min())
        out[f"{prefix}ess"] = float(1.0 / (w * w).sum())
        out[f"{prefix}ess_frac"] = out[f"{prefix}ess"] / self.num_cases
        out[f"{prefix}seen_frac"] = float(self.seen.to(torch.float64).mean())
        out[f"{prefix}lam"] = float(self.last_lam)
        out[f"{prefix}warmup"] = 1.0 if self.in_warmup else 0.0
        return out

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters, as plain values (also stored in the state dict for provenance)."""
        return {
            "num_groups": self.num_groups,
            "intra": self.intra,
            "alpha": self.alpha,
            "tau": self.tau,
            "floor": self.floor,
            "inter": self.inter,
            "eta": self.eta,
            "ema": self.ema,
            "apply": self.apply,
            "warmup_steps": -1 if self.warmup_steps is None else self.warmup_steps,
            "warmup_epochs": -1 if self.warmup_epochs is None else self.warmup_epochs,
            "min_ess": self.min_ess,
            "refresh_every": self.refresh_every,
            "unknown": self.unknown,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """All DRO state as tensors and plain containers (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": _STATE_VERSION,
            "ids": list(self.ids),
            "groups": self.groups.clone(),
            "bank": self.bank.clone(),
            "seen": self.seen.clone(),
            "counts": self.counts.clone(),
            "pi": self.pi.clone(),
            "num_updates": int(self.num_updates),
            "epochs_completed": int(self.epochs_completed),
            "num_refreshes": int(self.num_refreshes),
            "hparams": self.hparams(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The cohort must hold the same case ids (any order) and subgroups.

        Raises:
            ValueError: when the state is malformed or belongs to another cohort / subgroup layout.
        """
        missing = [k for k in ("ids", "groups", "bank", "seen", "counts", "pi", "num_updates") if k not in state]
        if missing:
            raise ValueError(f"FairDRO state dict lacks keys {missing}.")
        ids = [str(c) for c in state["ids"]]
        if set(ids) != set(self.ids) or len(ids) != len(self.ids):
            extra, lacking = sorted(set(ids) - set(self.ids)), sorted(set(self.ids) - set(ids))
            raise ValueError(
                f"FairDRO state belongs to another cohort: ids only in the checkpoint {extra[:5]}, only in this "
                f"cohort {lacking[:5]} ({len(ids)} vs {len(self.ids)} cases)."
            )
        order = self.rows(ids)  # checkpoint row j -> our row order[j]
        groups = torch.as_tensor(state["groups"], dtype=torch.long)
        if not torch.equal(self.groups[order], groups):
            raise ValueError("FairDRO state has different subgroups for the same case ids than this cohort.")
        pi = torch.as_tensor(state["pi"], dtype=torch.float64)
        if pi.shape != self.pi.shape:
            raise ValueError(f"FairDRO state has pi of shape {tuple(pi.shape)}, expected {tuple(self.pi.shape)}.")
        for name, dtype in (("bank", torch.float64), ("seen", torch.bool), ("counts", torch.long)):
            value = torch.as_tensor(state[name]).to(dtype)
            if value.shape != (len(ids),):
                raise ValueError(f"FairDRO state '{name}' has shape {tuple(value.shape)}, expected ({len(ids)},).")
            target = torch.empty_like(value)
            target[order] = value
            setattr(self, name, target)
        self.pi = pi.clone()
        self.num_updates = int(state["num_updates"])
        self.epochs_completed = int(state.get("epochs_completed", 0))
        self.num_refreshes = int(state.get("num_refreshes", 0))
        saved = state.get("hparams")
        if isinstance(saved, Mapping) and dict(saved) != self.hparams():
            logger.warning("FairDRO: resuming with hyperparameters %s, the checkpoint used %s.", self.hparams(), saved)
