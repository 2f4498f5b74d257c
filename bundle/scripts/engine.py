"""Training engine wiring for FairDRO: a trainer that sees per-sample losses, a handler that reports the DRO state,
and a weighted sampler for ``apply="sample"``.

MONAI's :class:`~monai.engines.SupervisedTrainer` calls ``loss_function(pred, label)`` and takes ``.mean()``: the loss
never sees the case ids or subgroups. :class:`FairDROTrainer` changes one narrow hook: its ``loss_function`` is a
method that computes the per-sample losses ``(B,)`` with the configured loss, checks them, records the step in the
:class:`~scripts.fairdro.FairDRO` bank and returns the weighted scalar. Everything else (forward through the inferer,
amp/GradScaler, gradient accumulation, ``optim_set_to_none``, ``torch.compile``, the iteration events
``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``, decollation,
post-processing) stays the parent's code path, so MONAI handlers and any ``prepare_batch`` keep working.

The bank and ``pi`` are updated inside the trainer, exactly once per iteration and before the backward pass (the
batch's weights use the freshest losses, as in GroupDRO). :class:`FairDROHandler` only reports: it writes the DRO
scalars to ``engine.state.metrics`` after every iteration (so epoch-level stats handlers see the current values
whatever their order) and logs them at the end of every epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from torch.utils.data import Sampler

from .fairdro import FairDRO

__all__ = ["DRO_WEIGHT", "SAMPLE_LOSS", "FairDROHandler", "FairDROSampler", "FairDROTrainer"]

logger = logging.getLogger(__name__)

#: key of the per-sample losses ``(B,)`` (detached) in ``engine.state.output``
SAMPLE_LOSS = "sample_loss"
#: key of the per-row loss multipliers ``(B,)`` in ``engine.state.output`` (the loss is ``sum(m * sample_loss)``)
DRO_WEIGHT = "dro_weight"


def _as_id_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, torch.Tensor):
        return [str(v) for v in value.flatten().tolist()]
    if isinstance(value, Sequence):
        return [str(v) for v in value]
    return None


class FairDROTrainer(SupervisedTrainer):
    """:class:`~monai.engines.SupervisedTrainer` whose loss is the FairDRO-weighted sum of per-sample losses.

    Takes every ``SupervisedTrainer`` argument (by keyword after ``loss_function``) plus the ones below. Each
    iteration reads the case ids (``batch[id_key]``, a list of B strings) and subgroups (``batch[subgroup_key]``,
    ``(B,)`` int64, ``G`` = unknown) from the collated batch before ``prepare_batch`` runs, then:

    1. ``losses = loss_function(pred, label)``, shape ``(B,)`` (e.g. :class:`scripts.losses.PerSampleDiceCELoss`);
    2. with ``check_finite``, a NaN/Inf raises ``FloatingPointError`` naming the iteration, epoch and case ids
       (nothing is stepped, the bank is untouched);
    3. ``dro.update(ids, losses, subgroups)`` (bank EMA, GroupDRO ``pi`` step);
    4. ``loss = dro.reduce(ids, losses)``; backward and step as in ``SupervisedTrainer``.

    With ``dro=None`` the loss is ``losses.mean()``: the same as ``SupervisedTrainer`` with a mean-reduced loss.

    ``engine.state.output`` holds the standard ``image``, ``label``, ``pred`` and ``loss`` (scalar) plus
    :data:`SAMPLE_LOSS` ``(B,)``, :data:`DRO_WEIGHT` ``(B,)``, ``id_key`` (list of B ids, when the batch has them)
    and ``subgroup_key`` ``(B,)`` (when the batch has it); with ``decollate=True`` (default) they are split per item
    like the other keys.

    Args:
        device, max_epochs, train_data_loader, network, optimizer: as in ``SupervisedTrainer``.
        loss_function: per-sample loss, ``(pred, label) -> (B,)``. With ``dro=None`` any loss works (it is averaged).
        dro: the :class:`~scripts.fairdro.FairDRO` state, or None for plain ERM.
        id_key: batch key of the case ids.
        subgroup_key: batch key of the subgroup indices (optional in the batch; checked against the cohort).
        check_finite: raise on a non-finite per-sample loss (default True).
        kwargs: the other ``SupervisedTrainer`` arguments (``prepare_batch``, ``inferer``, ``amp``, ``train_handlers``,
            ``accumulation_steps``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Any,
        dro: FairDRO | None = None,
        id_key: str = "id",
        subgroup_key: str = "subgroup",
        check_finite: bool = True,
        **kwargs: Any,
    ) -> None:
        if dro is not None and not isinstance(dro, FairDRO):
            raise TypeError(f"dro must be a scripts.fairdro.FairDRO or None, got {type(dro).__name__}.")
        if not callable(loss_function):
            raise TypeError(f"loss_function must be callable, got {type(loss_function).__name__}.")
        # set before the parent constructor: it attaches train_handlers, and FairDROHandler.attach checks `dro`
        self.dro = dro
        self.sample_loss_function = loss_function
        self.id_key = id_key
        self.subgroup_key = subgroup_key
        self.check_finite = check_finite
        self._batch_context: tuple[list[str] | None, torch.Tensor | None] = (None, None)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=self._batch_loss,
            **kwargs,
        )
        if dro is not None:  # the epoch count drives dro.warmup_epochs and the refresh schedule
            self.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: dro.epoch_completed(engine.state.epoch))

    def _read_batch_context(self, batchdata: Any) -> tuple[list[str] | None, torch.Tensor | None]:
        if not isinstance(batchdata, Mapping):
            return None, None
        ids = _as_id_list(batchdata.get(self.id_key))
        groups = batchdata.get(self.subgroup_key)
        if groups is not None:
            groups = torch.as_tensor(groups).detach().flatten().to("cpu", torch.long)
        return ids, groups

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """One ``SupervisedTrainer`` iteration, with the batch's case ids and subgroups made known to the loss."""
        self._batch_context = self._read_batch_context(batchdata)
        try:
            return super()._iteration(engine, batchdata)
        finally:
            self._batch_context = (None, None)

    def _nonfinite_message(self, losses: torch.Tensor, ids: list[str] | None) -> str:
        where = f"iteration {self.state.iteration} (epoch {self.state.epoch})"
        if ids is not None and losses.ndim == 1 and losses.numel() == len(ids):
            values = losses.detach().cpu().tolist()
            bad = [(c, v) for c, v in zip(ids, values) if not math.isfinite(v)]
            detail = f"case ids {[c for c, _ in bad]} (losses {[v for _, v in bad]})"
        else:
            detail = f"the batch with case ids {ids if ids is not None else '(none in the batch)'}"
        return (
            f"non-finite training loss at {where} for {detail}; stopped before the backward pass. Check these cases' "
            "image/label (empty or corrupt crops, extreme intensities), the learning rate and amp settings."
        )

    def _batch_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The trainer's ``loss_function``: the weighted segmentation loss plus the network's optional auxiliary
        load-balancing loss (``network.aux_loss()``, zero unless the network was built with ``aux_loss_weight > 0``).
        """
        loss = self._segmentation_loss(pred, target)
        net = getattr(self.network, "module", self.network)  # DistributedDataParallel wraps the network
        aux = getattr(net, "aux_loss", None)
        if callable(aux):
            loss = loss + aux().to(loss.device, loss.dtype)
        return loss

    def _segmentation_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss, checks, bank update, weighted scalar."""
        losses = self.sample_loss_function(pred, target)
        ids, groups = self._batch_context
        batch_size = pred.shape[0]
        per_sample = losses.ndim == 1 and losses.shape[0] == batch_size
        if self.check_finite and not bool(torch.isfinite(losses.detach()).all()):
            raise FloatingPointError(self._nonfinite_message(losses, ids))
        output = self.state.output if isinstance(self.state.output, dict) else {}
        if ids is not None:
            output[self.id_key] = ids
        if groups is not None:
            output[self.subgroup_key] = groups
        if self.dro is None:
            loss = losses.mean()
            if per_sample:
                output[SAMPLE_LOSS] = losses.detach()
                output[DRO_WEIGHT] = torch.full_like(losses.detach(), 1.0 / batch_size)
            return loss
        if not per_sample:
            raise ValueError(
                f"FairDRO needs per-sample losses of shape ({batch_size},), the loss returned {tuple(losses.shape)}: "
                "use scripts.losses.PerSampleDiceCELoss (reduction='none')."
            )
        if ids is None:
            raise ValueError(
                f"FairDRO needs the case ids of each batch under key {self.id_key!r}; the batch has none. Keep the "
                "datalist 'id' in the data dicts (e.g. scripts.transforms.CaseIdd) or set the trainer's id_key."
            )
        if len(ids) != batch_size:
            raise ValueError(f"the batch has {len(ids)} case ids for {batch_size} samples.")
        self.dro.update(ids, losses.detach(), groups)
        weights = self.dro.loss_weights(ids)
        loss = self.dro.reduce(ids, losses)
        output[SAMPLE_LOSS] = losses.detach()
        output[DRO_WEIGHT] = weights.to(device=losses.device, dtype=losses.dtype)
        return loss


class FairDROHandler:
    """Reports the FairDRO state of a :class:`FairDROTrainer` (the trainer itself updates the bank).

    After every iteration the scalars of :meth:`scripts.fairdro.FairDRO.summary` (``dro_loss_<g>``, ``dro_pi_<g>``,
    ``dro_mass_<g>``, ``dro_risk_<g>``, ``dro_w_max``, ``dro_w_min``, ``dro_ess``, ``dro_ess_frac``,
    ``dro_seen_frac``, ``dro_warmup``) are written to ``engine.state.metrics``, where ``StatsHandler`` and
    ``TensorBoardStatsHandler`` pick them up at epoch end in any handler order. At ``EPOCH_COMPLETED`` they are
    logged through ``engine.logger``, with a warning when the bank is still incomplete after an epoch under
    ``apply="loss"`` (a sign that the cohort and the training dataset differ).

    Args:
        dro: the same :class:`~scripts.fairdro.FairDRO` object the trainer holds.
        prefix: prefix of the metric names. Default ``"dro_"``.
        every_iteration: refresh the metrics after every iteration (default) or only at epoch end.
    """

    def __init__(self, dro: FairDRO, prefix: str = "dro_", every_iteration: bool = True) -> None:
        if not isinstance(dro, FairDRO):
            raise TypeError(f"dro must be a scripts.fairdro.FairDRO, got {type(dro).__name__}.")
        self.dro = dro
        self.prefix = prefix
        self.every_iteration = every_iteration

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``.

        Raises:
            ValueError: when the engine is not a trainer holding this same ``dro`` (the bank would never be fed).
        """
        if getattr(engine, "dro", None) is not self.dro:
            raise ValueError(
                "FairDROHandler must be attached to a scripts.engine.FairDROTrainer built with the same FairDRO "
                "object (config: both get '@dro')."
            )
        if self.every_iteration:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def record(self, engine: Engine) -> dict[str, float]:
        """Write the DRO scalars into ``engine.state.metrics`` and return them."""
        stats = self.dro.summary(self.prefix)
        engine.state.metrics.update(stats)
        return stats

    def __call__(self, engine: Engine) -> None:
        """Epoch end: refresh the metrics and log them."""
        stats = self.record(engine)
        dro = self.dro
        text = ", ".join(f"{k[len(self.prefix) :]}={v:.4g}" for k, v in stats.items())
        engine.logger.info(f"FairDRO epoch {engine.state.epoch}: {text}")
        if dro.in_warmup and dro.warmup_steps is None:
            unseen = [c for c, s in zip(dro.ids, dro.seen.tolist()) if not s]
            level = logging.WARNING if dro.apply == "loss" else logging.INFO
            engine.logger.log(
                level,
                f"FairDRO still in warm-up (ERM weights) after epoch {engine.state.epoch}: {len(unseen)} of "
                f"{dro.num_cases} cohort cases never seen (e.g. {unseen[:5]}); check that the cohort is the "
                "training datalist.",
            )


class FairDROSampler(Sampler[int]):
    """Draws dataset indices with the FairDRO case weights as probabilities (``apply="sample"``).

    The weights are read from the bank each time an epoch's iterator is created, so they are refreshed at every epoch
    start. The draw is seeded with ``seed + dro.num_updates``: deterministic, and identical after resuming from a
    checkpoint that holds the DRO state. Under ``torch.distributed`` every rank draws the same
    ``num_samples * world_size`` indices and keeps its own interleaved share.

    Args:
        dro: the FairDRO state (``apply="sample"`` expected).
        ids: case id of each dataset index, in dataset order: a list of ids or of datalist items (their
            ``dro.id_key``); default ``dro.ids`` (the cohort order, right when the cohort is the dataset's list).
            A case listed k times has each index drawn with ``w_i / k``.
        num_samples: indices per epoch (per rank); default ``len(ids)``.
        seed: base seed.
        replacement: draw with replacement (default; without it, at most the number of non-zero weights).
    """

    def __init__(
        self,
        dro: FairDRO,
        ids: Sequence[Any] | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        replacement: bool = True,
    ) -> None:
        if not isinstance(dro, FairDRO):
            raise TypeError(f"dro must be a scripts.fairdro.FairDRO, got {type(dro).__name__}.")
        if ids is None:
            ids = list(dro.ids)
        ids = [item[dro.id_key] if isinstance(item, Mapping) else item for item in ids]
        if len(ids) == 0:
            raise ValueError("ids must list the case id of every dataset index, got an empty list.")
        self.dro = dro
        self.rows = dro.rows(ids)
        multiplicity = torch.bincount(self.rows, minlength=dro.num_cases)
        self._share = 1.0 / multiplicity[self.rows].to(torch.float64)
        if num_samples is None:
            num_samples = len(ids)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.replacement = bool(replacement)
        if dro.apply != "sample":
            logger.warning(
                "FairDROSampler with FairDRO(apply=%r): the weights are applied twice (sampling and loss); "
                "use apply='sample' with this sampler.",
                dro.apply,
            )

    def probabilities(self) -> torch.Tensor:
        """Current probability of each dataset index, ``(len(ids),)`` float64, summing to 1."""
        p = self.dro.case_weights()[self.rows] * self._share
        return p / p.sum()

    def __iter__(self) -> Iterator[int]:
        world, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        generator = torch.Generator().manual_seed(self.seed + self.dro.num_updates)
        drawn = torch.multinomial(
            self.probabilities(), self.num_samples * world, replacement=self.replacement, generator=generator
        )
        return iter(drawn[rank::world].tolist())

    def __len__(self) -> int:
        return self.num_samples
