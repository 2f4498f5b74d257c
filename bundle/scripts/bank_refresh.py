"""Eval-mode refresh of the FairDRO loss bank (``dro#refresh_every``).

The training losses are a poor ranking of hardness: router noise and dropout are on, the crops are random (a crop
without target has a Dice term near 1) and, with ``apply="sample"``, only the drawn cases are updated, so the CVaR
tail ranks staleness and crop luck as much as hardness. :class:`BankRefreshHandler` therefore measures every training
case afresh every ``refresh_every`` epochs (after the ERM warm-up): the network in eval mode (no router noise, no
dropout), no augmentation, the whole volume when it fits in one patch and otherwise one fixed crop centred on the
label's bounding box (:class:`scripts.transforms.LabelCentredCropd`), with the trainer's own per-sample loss. The
bank then holds only these values (:meth:`scripts.fairdro.FairDRO.refresh`), so every weight is computed from losses
that can be compared.

Under ``torch.distributed`` every rank measures the whole cohort (the refresh loader is not sharded), so all ranks
hold the same bank without communication; that repeats the pass on each rank. The pass runs inside
``torch.random.fork_rng``, so it leaves the training's random stream as it found it. Runs whose weights do not depend on
the bank (``intra`` none or oracle without GroupDRO) skip it.

With ``dro#diagnose: true`` the handler also runs the intra-group CVaR diagnostic (:mod:`scripts.cvar_diagnostic`)
at every refresh point of the schedule, warm-up epochs and the last epoch included, and in runs whose weights never
read the bank (``dmoe``). That pass runs at the epoch's last iteration, so its metrics (``cvar_precision_<g>``, ...)
are in ``engine.state.metrics`` before the epoch-end ``StatsHandler`` line; a refresh due at that epoch's end reuses
its losses (the network has not changed in between). Outside a due refresh those losses never reach the bank.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch
from ignite.engine import Engine, Events

from .cvar_diagnostic import IntraGroupDiagnostic, minority_flags
from .fairdro import FairDRO, effective_sample_size

__all__ = ["BankRefreshHandler"]


class BankRefreshHandler:
    """Refreshes the FairDRO bank with eval-mode losses of every training case at the scheduled epoch ends.

    Attach it to the :class:`scripts.engine.FairDROTrainer` that holds the same ``dro``, before
    :class:`scripts.engine.FairDROHandler` (so the epoch's log shows the refreshed weights). Each refresh logs the
    number of cases, the time the pass took, the ESS of the new weights and the mixing share ``lam``.

    Args:
        dro: the trainer's :class:`~scripts.fairdro.FairDRO` (``refresh_every > 0``, else the handler does nothing).
        data_loader: the training cases with deterministic transforms only (every case once); batches carry
            ``id_key`` and whatever the trainer's ``prepare_batch`` needs. May be None when ``dro.refresh_every`` is 0
            (the handler then only records the epoch count).
        loss_function: per-sample loss ``(B,)``; default: the trainer's ``sample_loss_function``.
        id_key: batch key of the case ids.
        subtype_key, majority_value: with ``dro.diagnose`` only: the datalist key of the hidden subtype (read from
            ``data_loader.dataset.data`` for the diagnostic's report, never for training) and its majority value.
    """

    def __init__(
        self,
        dro: FairDRO,
        data_loader: Any,
        loss_function: Callable | None = None,
        id_key: str = "id",
        subtype_key: str = "subtype",
        majority_value: str = "majority",
    ) -> None:
        if not isinstance(dro, FairDRO):
            raise TypeError(f"dro must be a scripts.fairdro.FairDRO, got {type(dro).__name__}.")
        if data_loader is None and dro.refresh_every > 0:
            raise ValueError(f"dro.refresh_every is {dro.refresh_every}: the bank refresh needs a data_loader.")
        self.dro = dro
        self.data_loader = data_loader
        self.loss_function = loss_function
        self.id_key = id_key
        #: seconds taken by the last refresh pass
        self.last_seconds = 0.0
        #: the intra-group diagnostic (``dro.diagnose``), else None
        self.diagnostic = self._diagnostic(subtype_key, majority_value) if dro.diagnose else None
        #: ``(epoch, ids, losses, seconds)`` of the diagnostic's pass at the end of that epoch
        self._measured: tuple[int, list[str], torch.Tensor, float] | None = None

    def _diagnostic(self, subtype_key: str, majority_value: str) -> IntraGroupDiagnostic:
        items = getattr(getattr(self.data_loader, "dataset", None), "data", None)
        if not isinstance(items, (list, tuple)):
            raise ValueError("data_loader: dro.diagnose reads the datalist items from data_loader.dataset.data.")
        dro = self.dro
        flags = minority_flags(items, dro.ids, dro.id_key, subtype_key, majority_value)
        names = [dro.group_name(g) for g in range(dro.num_groups)]
        return IntraGroupDiagnostic(dro.ids, dro.groups, flags, names, dro.alpha)

    def attach(self, engine: Engine) -> None:
        """Register at ``EPOCH_COMPLETED``.

        Raises:
            ValueError: when the engine is not a trainer holding this same ``dro``.
        """
        if getattr(engine, "dro", None) is not self.dro:
            raise ValueError(
                "BankRefreshHandler must be attached to a scripts.engine.FairDROTrainer built with the same FairDRO "
                "object (config: both get '@dro')."
            )
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.diagnostic is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.diagnose)

    def diagnosis_due(self, epoch: int, max_epochs: int) -> bool:
        """Whether the diagnostic runs at the end of ``epoch``: every warm-up epoch, the last epoch and every
        epoch of the refresh schedule (``refresh_every`` after the warm-up, whether or not the weights use the bank)."""
        start = self.dro.warmup_epochs or 0
        if epoch >= max_epochs or epoch <= start:
            return True
        return (epoch - start) % self.dro.refresh_every == 0

    def diagnose(self, engine: Engine) -> None:
        """Last iteration of an epoch: the intra-group diagnostic when due, into ``engine.state.metrics`` and the
        log (an epoch without it drops the previous values from the metrics). Reads no weight, writes no bank."""
        state = engine.state
        if not state.epoch_length or state.iteration % state.epoch_length != 0:
            return
        for name in self.diagnostic.metric_names():
            state.metrics.pop(name, None)
        self._measured = None
        if not self.diagnosis_due(state.epoch, state.max_epochs):
            return
        start = time.perf_counter()
        ids, losses = self.measure(engine)
        self._measured = (state.epoch, ids, losses, time.perf_counter() - start)
        result = self.diagnostic.compute(ids, losses)
        state.metrics.update(self.diagnostic.metrics(result))
        engine.logger.info(
            f"Intra-group CVaR diagnostic after epoch {state.epoch} (eval-mode losses; the subtype is read for this "
            f"report only): {self.diagnostic.describe(result)}"
        )

    def __call__(self, engine: Engine) -> None:
        """Epoch end: refresh the bank when the schedule says so, and log it."""
        self.dro.epoch_completed(engine.state.epoch)
        if not self.dro.refresh_due() or engine.state.epoch >= engine.state.max_epochs:
            return
        measured = self._measured
        if measured is not None and measured[0] == engine.state.epoch:  # the diagnostic's pass of this epoch
            _, ids, losses, self.last_seconds = measured
        else:
            start = time.perf_counter()
            ids, losses = self.measure(engine)
            self.last_seconds = time.perf_counter() - start
        self.dro.refresh(ids, losses)
        w = self.dro.case_weights()
        engine.logger.info(
            f"FairDRO bank refresh after epoch {engine.state.epoch}: {len(ids)} cases in {self.last_seconds:.1f} s "
            f"(eval mode); ESS {effective_sample_size(w):.1f} of {self.dro.num_cases} "
            f"({effective_sample_size(w) / self.dro.num_cases:.1%}), lam {self.dro.last_lam:.3f}"
        )

    def measure(self, engine: Engine) -> tuple[list[str], torch.Tensor]:
        """Eval-mode per-sample losses of every case of the loader: ``(ids, losses (n,))``."""
        network = engine.network
        loss_function = self.loss_function or engine.sample_loss_function
        was_training = network.training
        network.eval()
        ids: list[str] = []
        losses: list[torch.Tensor] = []
        amp = getattr(engine, "amp", False) and torch.device(engine.state.device).type == "cuda"
        autocast = torch.autocast("cuda", **getattr(engine, "amp_kwargs", {})) if amp else contextlib.nullcontext()
        device = torch.device(engine.state.device)
        # the pass draws no random number from the training stream (the DataLoader iterator takes a seed from it)
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        try:
            with rng, torch.no_grad(), autocast:
                for batch in self.data_loader:
                    image, label, args, kwargs = engine.prepare_batch(batch, engine.state.device, engine.non_blocking)
                    pred = engine.inferer(image, network, *args, **kwargs)
                    losses.append(loss_function(pred, label).detach().float().cpu().flatten())
                    ids.extend(str(c) for c in batch[self.id_key])
        finally:
            network.train(was_training)
        return ids, torch.cat(losses) if losses else torch.zeros(0)
