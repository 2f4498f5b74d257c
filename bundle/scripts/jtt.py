"""Just Train Twice (JTT; Liu et al., ICML 2021, https://arxiv.org/abs/2107.09044): a label-free baseline.

1. **Identification.** Train the network with ERM for ``T`` epochs (``jtt#epochs``): the ``dmoe`` variant (the dMoE
   network, plain mean loss) with ``--epochs T``, into ``jtt#identify_dir``.
2. **Error set.** :func:`identify` (config item ``jtt_identify`` of ``variants/jtt.json``) loads that run's final
   weights, scores every training case in eval mode on the bank-refresh loader (``train#refresh_dataloader``: the
   whole image, or in 3D one crop centred on the label, no augmentation) and keeps the cases whose Dice is strictly
   below ``tau`` (a case at exactly ``tau`` is not an error). It writes ``{"tau", "epochs", "num_cases", "ids"}``
   to ``jtt#error_set``.
3. **Retraining** (``training`` of ``variants/jtt.json``): from scratch, with :class:`JTTWeights` as the run's
   ``dro``: every error-set case weighs ``lambda_up``, every other case 1, normalised over the cohort
   (:func:`jtt_weights`). The weights reach the training through the bundle's ``dro#apply`` path: sampling
   probabilities of :class:`scripts.engine.FairDROSampler` (``apply="sample"``, the paper's upsampling) or loss
   weights (``apply="loss"``).

Only the per-case Dice of the identification model decides the error set: JTT reads no hidden-minority label, and
the subgroup only routes the dMoE network (as in every dMoE variant). ``T``, ``tau`` and ``lambda_up`` are to be
chosen on the validation worst-group Dice.

Commands (2D: stack ``profiles/2d.json`` last in every one)::

    python -m monai.bundle run training --config_file "['configs/train.json', 'configs/variants/dmoe.json']" \\
        --epochs T --key_metric last --output_dir runs/jtt/identify
    python -m monai.bundle run jtt_identify --config_file "['configs/train.json', 'configs/variants/jtt.json']"
    python -m monai.bundle run training --config_file "['configs/train.json', 'configs/variants/jtt.json']"
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .fairdro import FairDRO
from .safe_io import atomic_write_json, load_checkpoint, load_weights

__all__ = ["JTTWeights", "case_dice", "identify", "jtt_weights", "read_error_set", "score_cases", "select_error_set"]

logger = logging.getLogger(__name__)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")
    return float(value)


def select_error_set(dice: Mapping[Any, float], tau: float) -> list[str]:
    """The error set: ids of the cases whose Dice is strictly below ``tau``, sorted (a Dice equal to ``tau`` is not
    an error).

    Raises:
        ValueError: for a ``tau`` outside [0, 1] or a non-finite Dice (naming the case).
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a Dice threshold in [0, 1], got {tau!r}.")
    bad = [c for c, d in dice.items() if not math.isfinite(float(d))]
    if bad:
        raise ValueError(f"dice holds non-finite values for cases {bad[:5]}.")
    return sorted(str(c) for c, d in dice.items() if float(d) < tau)


def jtt_weights(upweighted: torch.Tensor | Sequence[bool], lambda_up: float) -> torch.Tensor:
    """JTT case weights, ``(N,)`` float64 summing to 1: ``lambda_up`` for an error-set case, 1 otherwise, normalised.

    Raises:
        ValueError: for ``lambda_up`` <= 0 or an empty cohort.
    """
    lambda_up = _check_positive("lambda_up", lambda_up)
    flags = torch.as_tensor(upweighted, dtype=torch.bool).flatten()
    if flags.numel() == 0:
        raise ValueError("upweighted must flag at least one case.")
    u = torch.where(flags, torch.tensor(lambda_up, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    return u / u.sum()


def case_dice(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-case Dice of the argmax of ``pred`` ``(B, C, ...)`` against an index label ``(B, 1, ...)``, ``(B,)``:
    the mean over the foreground classes ``1..C-1`` of ``2|P & L| / (|P| + |L|)``, 1 for a class absent from both."""
    if pred.ndim < 3 or label.shape[0] != pred.shape[0] or pred.shape[1] < 2:
        raise ValueError(f"pred must be (B, C >= 2, ...) and label (B, 1, ...), got {tuple(pred.shape)} and "
                         f"{tuple(label.shape)}.")  # fmt: skip
    p = pred.argmax(dim=1).flatten(1)
    lab = label.reshape(label.shape[0], -1).round().long()
    scores = []
    for c in range(1, pred.shape[1]):
        pc, lc = p == c, lab == c
        inter = (pc & lc).sum(1).to(torch.float64)
        total = (pc.sum(1) + lc.sum(1)).to(torch.float64)
        scores.append(torch.where(total > 0, 2.0 * inter / total.clamp(min=1.0), torch.ones_like(total)))
    return torch.stack(scores).mean(0)


def score_cases(
    network: torch.nn.Module,
    data_loader: Any,
    prepare_batch: Callable,
    inferer: Callable,
    device: str | torch.device,
    id_key: str = "id",
) -> dict[str, float]:
    """Eval-mode Dice of every case of ``data_loader`` (a case met twice keeps the mean), ``{id: dice}``."""
    was_training = network.training
    network.eval()
    sums: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            for batch in data_loader:
                image, label, args, kwargs = prepare_batch(batch, device, False)
                dice = case_dice(inferer(image, network, *args, **kwargs), label).tolist()
                for cid, d in zip(batch[id_key], dice):
                    sums.setdefault(str(cid), []).append(float(d))
    finally:
        network.train(was_training)
    return {c: sum(v) / len(v) for c, v in sums.items()}


def _trained_epochs(checkpoint: str | os.PathLike) -> int:
    state = load_checkpoint(checkpoint, map_location="cpu").get("trainer")
    if not isinstance(state, Mapping) or not state.get("epoch_length"):
        raise ValueError(f"checkpoint {checkpoint} holds no trainer state: give the identification run's "
                         "checkpoints/checkpoint_final.pt.")  # fmt: skip
    if "epoch" in state:
        return int(state["epoch"])
    return int(state["iteration"]) // int(state["epoch_length"])


def identify(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    data_loader: Any,
    prepare_batch: Callable,
    inferer: Callable,
    device: str | torch.device,
    tau: float,
    epochs: int,
    output: str | os.PathLike,
    id_key: str = "id",
) -> dict[str, Any]:
    """Score the training cases with the identification model and write the error set (see the module notes).

    Args:
        network: the run's network (the identification run's weights are loaded into it).
        checkpoint: the identification run's ``checkpoints/checkpoint_final.pt`` (model and trainer state).
        data_loader: every training case once, deterministic transforms (``train#refresh_dataloader``).
        prepare_batch, inferer, device: as the trainer uses them.
        tau: Dice threshold; a case strictly below it is an error.
        epochs: ``T``; the checkpoint must come from a run of exactly ``T`` epochs.
        output: path of the error-set JSON.

    Returns:
        the written record ``{"tau", "epochs", "num_cases", "ids"}``.

    Raises:
        ValueError: when the checkpoint's run did not train ``epochs`` epochs, or for an invalid ``tau``.
    """
    trained = _trained_epochs(checkpoint)
    if trained != epochs:
        raise ValueError(f"epochs: jtt#epochs is {epochs} but the identification checkpoint {checkpoint} was trained "
                         f"for {trained} epochs.")  # fmt: skip
    load_weights(checkpoint, network, map_location=device)
    dice = score_cases(network, data_loader, prepare_batch, inferer, device, id_key)
    ids = select_error_set(dice, tau)
    record = {"tau": float(tau), "epochs": int(epochs), "num_cases": len(dice), "ids": ids}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, output)
    logger.info("JTT error set: %d of %d training cases below Dice %g after %d epochs, written to %s.", len(ids),
                len(dice), tau, epochs, output)  # fmt: skip
    return record


def read_error_set(path: str | os.PathLike) -> list[str]:
    """The case ids of an error-set JSON written by :func:`identify`.

    Raises:
        FileNotFoundError: when ``path`` does not exist (run ``jtt_identify`` first).
        ValueError: when the file has no list ``ids``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JTT error set {path} not found: run the identification and jtt_identify first.")
    record = json.loads(path.read_text())
    ids = record.get("ids") if isinstance(record, Mapping) else None
    if not isinstance(ids, list):
        raise ValueError(f"JTT error set {path} has no list 'ids'.")
    return [str(c) for c in ids]


class JTTWeights(FairDRO):
    """The FairDRO interface with JTT's fixed weights: ``lambda_up`` on the error set, 1 elsewhere, normalised.

    Takes every :class:`~scripts.fairdro.FairDRO` argument (the cohort, ``apply``, ``id_key``, ...); the bank, the
    warm-up, ``intra`` and ``inter`` play no part (``variants/jtt.json`` sets ``intra`` none and ``inter`` empirical,
    so the logs read as plain ERM apart from the weights). The weights hold from the first step.

    Args:
        error_set: the error set's JSON path (read on first use, so the config builds before ``jtt_identify`` has
            written it) or its list of case ids.
        lambda_up: up-weighting factor of the error set, > 0. Default 5.

    Raises:
        ValueError: for ``lambda_up`` <= 0; on first use, for an error-set id outside the cohort.
    """

    def __init__(self, *args: Any, error_set: str | os.PathLike | Sequence[str], lambda_up: float = 5.0,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.lambda_up = _check_positive("lambda_up", lambda_up)
        self.error_set = error_set
        self._flags: torch.Tensor | None = None

    @property
    def in_warmup(self) -> bool:
        """Never: the JTT weights do not depend on the bank."""
        return False

    @property
    def uses_bank(self) -> bool:
        """Never: no bank refresh."""
        return False

    def upweighted(self) -> torch.Tensor:
        """Error-set flag of each cohort case, ``(N,)`` bool (the error set is read on the first call)."""
        if self._flags is None:
            source = self.error_set
            ids = read_error_set(source) if isinstance(source, (str, os.PathLike)) else [str(c) for c in source]
            flags = torch.zeros(self.num_cases, dtype=torch.bool)
            flags[self.rows(ids)] = True
            self._flags = flags
            logger.info("JTT: %d of %d cohort cases up-weighted by %g.", int(flags.sum()), self.num_cases,
                        self.lambda_up)  # fmt: skip
        return self._flags

    def case_weights(self) -> torch.Tensor:
        """:func:`jtt_weights` of the cohort, ``(N,)`` float64, summing to 1."""
        self.last_lam = 0.0
        return jtt_weights(self.upweighted(), self.lambda_up)

    def hparams(self) -> dict[str, Any]:
        """The FairDRO hyperparameters plus ``lambda_up``."""
        return {**super().hparams(), "lambda_up": self.lambda_up}

    def state_dict(self) -> dict[str, Any]:
        """FairDRO's state plus the error set's ids (provenance; a resumed run warns when they differ)."""
        flags = self.upweighted()
        return {**super().state_dict(), "jtt_error_set": [c for c, f in zip(self.ids, flags.tolist()) if f]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """FairDRO's :meth:`~scripts.fairdro.FairDRO.load_state_dict`; warns when the error set differs."""
        super().load_state_dict(state)
        saved = state.get("jtt_error_set")
        current = [c for c, f in zip(self.ids, self.upweighted().tolist()) if f]
        if saved is not None and sorted(map(str, saved)) != sorted(current):
            logger.warning("JTT: resuming with an error set of %d cases, the checkpoint used %d.", len(current),
                           len(saved))  # fmt: skip
