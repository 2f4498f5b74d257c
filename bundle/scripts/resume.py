"""Resuming an interrupted training run from its newest checkpoint, with the random number streams restored.

A training run saves ``{"model", "optimizer", "dro", "trainer", "rng"}`` into ``<output_dir>/checkpoints/`` at the end
of every epoch (``scripts.safe_io.AtomicCheckpointSaver``: a file is either the complete old or the complete new
checkpoint, never a mix). ``--resume true`` on the same command attaches :class:`ResumeFromCheckpoint`, which picks
the newest epoch-end checkpoint by trainer iteration (not by file time) and loads it with
``torch.load(weights_only=True)`` through :class:`scripts.safe_io.VerifiedCheckpointLoader` when the trainer starts.

Why :class:`RNGState` is needed for an exact replay (checked against monai 1.6.1 and torch 2.13):

- the dMoE router noise and the DataLoader's per-epoch base seed draw from the **global torch generator**;
- each MONAI random transform (``RandCropByPosNegLabeld`` and the cropper inside it, ``RandScaleIntensityd`` ...)
  draws from **its own** ``numpy.random.RandomState`` (``self.R``), seeded once when ``Compose``/``DataLoader`` are
  built. A restarted process rebuilds them in their epoch-1 state, so restoring the global generators alone would
  crop different patches than the uninterrupted run. :class:`RNGState` saves and restores every such state found in
  the training transforms, together with the torch (CPU and initialised CUDA), numpy and ``random`` global states;
- the ``FairDROSampler`` draw is seeded with ``seed + dro.num_updates`` and so follows the restored DRO state.

With the checkpoint taken after everything that runs at an epoch's end (validation included), the resumed run
replays the following epochs exactly as the uninterrupted run does on the same hardware and software (bit-identical
on CPU; on GPU see ``docs/reliability.md``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ignite.engine import Events
from monai.transforms import Randomizable, Transform

from .safe_io import VerifiedCheckpointLoader

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["RNGState", "ResumeFromCheckpoint", "find_resume_checkpoint", "list_checkpoints"]

logger = logging.getLogger(__name__)

#: checkpoint files considered for resuming (temporary files of an interrupted write start with "." and are skipped)
CHECKPOINT_SUFFIX = ".pt"


def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = state
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_plain(state: Mapping[str, Any]) -> tuple:
    keys = np.asarray(torch.as_tensor(state["keys"]).numpy(), dtype=np.uint32)
    return (state["kind"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def _random_states(root: Any) -> Iterator[tuple[str, np.random.RandomState]]:
    """``(path, RandomState)`` of every MONAI randomizable inside ``root``, in a fixed order, each state once.

    Walks lists, tuples, dicts and the attributes of MONAI ``Transform``/``Randomizable`` objects (where nested
    transforms such as ``RandCropByPosNegLabeld.cropper`` live); nothing else is entered.
    """
    seen_objects: set[int] = set()
    seen_states: set[int] = set()

    def walk(obj: Any, path: str) -> Iterator[tuple[str, np.random.RandomState]]:
        if id(obj) in seen_objects:
            return
        if isinstance(obj, (list, tuple)):
            seen_objects.add(id(obj))
            for i, item in enumerate(obj):
                yield from walk(item, f"{path}[{i}]")
        elif isinstance(obj, Mapping):
            seen_objects.add(id(obj))
            for key, item in obj.items():
                yield from walk(item, f"{path}[{key!r}]")
        elif isinstance(obj, (Transform, Randomizable)):
            seen_objects.add(id(obj))
            state = getattr(obj, "R", None) if isinstance(obj, Randomizable) else None
            if isinstance(state, np.random.RandomState) and id(state) not in seen_states:
                seen_states.add(id(state))
                yield f"{path}:{type(obj).__name__}", state
            for name, value in vars(obj).items():
                if name != "R" and not name.startswith("__"):
                    yield from walk(value, f"{path}.{name}")

    yield from walk(root, "transforms")


class RNGState:
    """The random number generator states a training run draws from, as a checkpointable object.

    Put it in the checkpointer's ``save_dict`` (and so in the resume ``load_dict``): ignite's ``Checkpoint`` calls
    :meth:`state_dict` when saving and :meth:`load_state_dict` when loading. The state holds only tensors and plain
    containers, so the checkpoint still loads with ``torch.load(weights_only=True)``.

    Saved: the global torch CPU generator, every CUDA generator when CUDA is initialised, the global numpy and
    Python ``random`` generators, and the ``numpy.random.RandomState`` of every MONAI randomizable in ``transforms``.

    Args:
        transforms: the training transforms (e.g. ``@train#preprocessing``), or None for the global generators only.
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = transforms

    def _transform_states(self) -> list[tuple[str, np.random.RandomState]]:
        return [] if self.transforms is None else list(_random_states(self.transforms))

    def state_dict(self) -> dict[str, Any]:
        """Current generator states (tensors and plain containers only)."""
        version, mt_state, gauss = random.getstate()
        states = self._transform_states()
        out: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": {"version": int(version), "state": list(mt_state), "gauss": gauss},
            "transform_paths": [path for path, _ in states],
            "transforms": [_numpy_state_to_plain(state.get_state()) for _, state in states],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = list(torch.cuda.get_rng_state_all())
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Transform states are matched by their path in ``transforms``; a transform present on one side only keeps its
        current state, with a warning (the run continues, but does not replay the original exactly).

        Raises:
            ValueError: when ``state_dict`` lacks one of the global generator states.
        """
        missing = [k for k in ("torch", "numpy", "python") if k not in state_dict]
        if missing:
            raise ValueError(f"RNG state lacks {missing}: it was not written by scripts.resume.RNGState.")
        torch.set_rng_state(torch.as_tensor(state_dict["torch"], dtype=torch.uint8).cpu())
        np.random.set_state(_numpy_state_from_plain(state_dict["numpy"]))
        py = state_dict["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"]))
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])
            else:
                logger.warning(
                    "RNG state: the checkpoint has %d CUDA generator states, this machine %d GPUs; the CUDA "
                    "generators are not restored (the run continues, not bit-identically).",
                    len(cuda),
                    torch.cuda.device_count(),
                )
        saved = dict(zip(state_dict.get("transform_paths", []), state_dict.get("transforms", [])))
        current = self._transform_states()
        for path, generator in current:
            if path in saved:
                generator.set_state(_numpy_state_from_plain(saved[path]))
        unmatched = sorted(set(saved) ^ {path for path, _ in current})
        if unmatched:
            logger.warning(
                "RNG state: the training transforms differ from those of the checkpoint (random states only on one "
                "side: %s); those transforms keep their current state, so the resumed run does not replay the "
                "original exactly.",
                unmatched[:5],
            )


def _checkpoint_iteration(path: Path) -> tuple[int, int | None] | None:
    """``(iteration, epoch_length)`` of a resumable checkpoint, or None when it cannot be read as one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is skipped with its reason
        logger.warning("resume: skipping %s: not a readable checkpoint (%s: %s).", path, type(e).__name__, str(e)[:200])
        return None
    trainer = checkpoint.get("trainer") if isinstance(checkpoint, Mapping) else None
    if not isinstance(trainer, Mapping) or "iteration" not in trainer:
        logger.warning("resume: skipping %s: it has no trainer state (not a resumable training checkpoint).", path)
        return None
    length = trainer.get("epoch_length")
    return int(trainer["iteration"]), (int(length) if length else None)


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint files directly in ``checkpoint_dir`` (``*.pt``; hidden temporary files are left out)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == CHECKPOINT_SUFFIX and p.name[0] != ".")


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the newest by trainer iteration among those saved at an epoch's end.

    A checkpoint saved in the middle of an epoch (MONAI's saver writes the final checkpoint also when the run stops
    on an exception) is used only when there is no epoch-end one: the iteration it stopped in may be half done, and
    the rest of its epoch cannot be replayed as the uninterrupted run would have drawn it. Ties (the last epoch's
    checkpoint and ``checkpoint_final.pt``) go to the first file name in sort order.

    Args:
        checkpoint_dir: the checkpointer's ``save_dir``.

    Returns:
        the chosen file, or None when the folder holds no readable training checkpoint.
    """
    found = []
    for path in list_checkpoints(checkpoint_dir):
        info = _checkpoint_iteration(path)
        if info is not None:
            found.append((info[0], info[1], path))
    if not found:
        return None
    at_epoch_end = [f for f in found if f[1] and f[0] % f[1] == 0]
    newest = max(found, key=lambda f: (f[0], -found.index(f)))
    if not at_epoch_end:
        logger.warning(
            "resume: %s was saved mid-epoch (iteration %d) and no epoch-end checkpoint exists; resuming from it "
            "continues the epoch with a fresh data order.",
            newest[2],
            newest[0],
        )
        return newest[2]
    chosen = max(at_epoch_end, key=lambda f: (f[0], -found.index(f)))
    if newest[0] > chosen[0]:
        logger.warning(
            "resume: skipping %s (iteration %d, saved mid-epoch, e.g. when the run stopped on an error); resuming "
            "from the last completed epoch in %s (iteration %d), whose next epoch replays exactly.",
            newest[2],
            newest[0],
            chosen[2],
            chosen[0],
        )
    return chosen[2]


def _as_bool(value: Any) -> bool:
    """``--resume true`` arrives as the string ``"true"`` (python-fire keeps lower-case words as strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"the 'resume' setting must be true or false, got {value!r}; pass --resume true or --resume false.")


class ResumeFromCheckpoint:
    """Resume a trainer from the newest checkpoint in its checkpoint folder (``--resume true``).

    With ``enabled``, :meth:`attach` picks the file (:func:`find_resume_checkpoint`) and attaches a
    :class:`scripts.safe_io.VerifiedCheckpointLoader` that restores every object of ``load_dict`` (model, optimizer,
    DRO state, trainer epoch/iteration, RNG state) with ``torch.load(weights_only=True)`` when the trainer starts;
    the run's own ``max_epochs`` is kept, so ``--epochs`` may be raised to train on. An empty folder starts from
    scratch with a warning.

    Without ``enabled`` (a fresh run), checkpoints already in the folder belong to an earlier run: they are moved
    into ``<checkpoint_dir>/previous_<UTC time>/`` with a warning, so that they are neither overwritten silently nor
    mistaken for this run's by a later ``--resume true``.

    Given the run's ``saver``, the resumed epoch-end file is handed to it as its own, so that the saver replaces it
    at its next save (``n_saved`` stays true across restarts) instead of leaving it behind. Attach this handler
    before the saver, in the config's ``run`` list.

    Args:
        checkpoint_dir: folder the training checkpoints are written to (the checkpointer's ``save_dir``).
        load_dict: the objects to restore: the checkpointer's ``save_dict``.
        enabled: resume (True) or start a fresh run (False); the strings ``"true"``/``"false"`` are accepted.
        map_location: as for ``torch.load``.
        strict: require the network keys to match exactly.
        saver: the run's ``monai.handlers.CheckpointSaver`` (optional; see above).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        enabled: bool = True,
        map_location: Any = None,
        strict: bool = True,
        saver: Any = None,
    ) -> None:
        if not checkpoint_dir:
            raise ValueError("checkpoint_dir must name the folder of the training checkpoints (checkpointer#save_dir).")
        if not isinstance(load_dict, Mapping) or not load_dict:
            raise ValueError(f"load_dict must be a non-empty dict of objects to restore, got {load_dict!r}.")
        enabled = _as_bool(enabled)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.load_dict = dict(load_dict)
        self.enabled = enabled
        self.map_location = map_location
        self.strict = strict
        self.saver = saver
        self.loaded_from: Path | None = None

    def attach(self, engine: Engine) -> None:
        """Resume ``engine`` (when enabled) or set aside an earlier run's checkpoints (when not)."""
        if not self.enabled:
            self._set_aside_previous_run()
            return
        path = find_resume_checkpoint(self.checkpoint_dir)
        if path is None:
            logger.warning(
                "resume=true but %s holds no training checkpoint: starting from scratch.", self.checkpoint_dir
            )
            return
        self.loaded_from = path
        logger.info("resuming from %s.", path)
        VerifiedCheckpointLoader(
            load_path=str(path), load_dict=self.load_dict, map_location=self.map_location, strict=self.strict
        ).attach(engine)
        if self.saver is not None:
            engine.add_event_handler(Events.STARTED, self._hand_over_to_saver)

    def _hand_over_to_saver(self, engine: Engine) -> None:
        """After the load: make the resumed interval checkpoint the saver's, to be replaced at its next save."""
        checkpoint = getattr(self.saver, "_interval_checkpoint", None)
        if checkpoint is None or self.loaded_from is None:
            return
        step = engine.state.epoch if getattr(self.saver, "epoch_level", True) else engine.state.iteration
        if self.loaded_from.name.endswith(f"={step}{CHECKPOINT_SUFFIX}"):  # ignite's "<name>_epoch=<n>.pt"
            checkpoint.load_state_dict({"_saved": [(step, self.loaded_from.name)]})

    def _set_aside_previous_run(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        old = list_checkpoints(self.checkpoint_dir)
        if not old:
            return
        target = self.checkpoint_dir / time.strftime("previous_%Y%m%d-%H%M%S", time.gmtime())
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        target.mkdir(parents=True)
        for path in old:
            os.replace(path, target / path.name)
        logger.warning(
            "%s held checkpoints of an earlier run (%s); this run starts from scratch (resume=false), so they were "
            "moved to %s. To continue that run instead, pass --resume true; to keep runs apart, use another "
            "--run_name.",
            self.checkpoint_dir,
            ", ".join(p.name for p in old),
            target,
        )
