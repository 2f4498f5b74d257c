"""The bundle's DICOM inference for one series at a time, warm (network and weights kept) or cold (rebuilt).

Both modes run the bundle's own ``ConfigWorkflow`` for every series, so the configs stay the only description of
the pipeline; the node only sets ``input_dir``, ``output_dir`` and ``subgroup``. Warm mode builds the workflow in
full once (network constructed, checkpoint verified and loaded by the bundle's checkpoint handler) and keeps that
network object; every later series parses the configs again with ``network`` overridden by the kept object and the
checkpoint handler(s) of ``handlers`` disabled, so only the data-dependent parts (dataset, transforms, writers,
evaluator) are instantiated again. Before each series the checkpoint file's identity (inode, size, mtime, ctime)
is compared with the one loaded: when it differs, the next series is a full build again, which reloads (and
re-verifies) the weights.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HANDLERS_ID = "handlers"  # the evaluator's handler list in the bundle's inference.json
NETWORK_ID = "network"


def file_identity(path: str | Path) -> tuple[int, ...] | None:
    """``(inode, size, mtime_ns, ctime_ns)`` of a file, or None when it cannot be read.

    Any rewrite changes the ctime (which a copy cannot preserve) and a replacement changes the inode too.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class BundleInference:
    """Runs the bundle's inference workflow on one DICOM series folder per call.

    Args:
        config_files: the bundle's ``inference.json`` and ``inference_dicom.json`` (merged in order).
        overrides: config overrides (``ckpt_path``, ...); must not set ``input_dir``, ``output_dir``, ``subgroup``.
        cold: build the whole workflow (network, checkpoint load) for every series instead of once.

    Attributes:
        builds: full workflow builds so far (network constructed and weights loaded).
        reloads: builds caused by a changed checkpoint file (warm mode).
    """

    def __init__(self, config_files: Sequence[str | Path], overrides: Mapping[str, Any], cold: bool = False):
        if not isinstance(cold, bool):
            raise TypeError(f"cold must be true or false, got {cold!r}.")
        self.config_files = [str(p) for p in config_files]
        self.overrides = dict(overrides)
        self.cold = cold
        self.builds = self.reloads = 0
        self._network: Any = None
        self._loader_ids: list[str] = []
        self._checkpoints: dict[str, tuple[int, ...] | None] = {}

    def run(self, input_dir: str | Path, output_dir: str | Path, subgroup: str | None) -> None:
        """Infer the series in ``input_dir`` into ``output_dir`` (the bundle's writers name the files)."""
        series = {"input_dir": str(input_dir), "output_dir": str(output_dir), "subgroup": subgroup}
        if self.cold or self._stale():
            self._build_and_run(series)
            return
        disabled = {f"{loader_id}#_disabled_": True for loader_id in self._loader_ids}
        self._run(self._workflow({**series, NETWORK_ID: self._network, **disabled}))

    def _stale(self) -> bool:
        """Whether nothing is built yet or a checkpoint file changed since it was loaded."""
        if self._network is None:
            return True
        changed = [path for path, seen in self._checkpoints.items() if file_identity(path) != seen]
        if changed:
            logger.info("Checkpoint %s changed: rebuilding the inference workflow to reload it.", changed)
            self.reloads += 1
            self._network = None
        return bool(changed)

    def _workflow(self, overrides: Mapping[str, Any]) -> Any:
        from monai.bundle import ConfigWorkflow

        workflow = ConfigWorkflow(
            config_file=self.config_files, workflow_type="infer", run_id="inference",
            logging_file=False,  # the bundle's logging.conf would disable the node's loggers
            **self.overrides, **overrides,
        )  # fmt: skip
        workflow.initialize()
        return workflow

    @staticmethod
    def _run(workflow: Any) -> None:
        path = list(sys.path)
        try:
            workflow.run()  # puts the bundle root on sys.path (again) for every workflow
        finally:
            if len(sys.path) == len(path) + 1 and sys.path.count(sys.path[1]) > 1:
                del sys.path[1]  # a long-running node would otherwise grow sys.path by one entry per series
        workflow.finalize()

    def _build_and_run(self, series: Mapping[str, Any]) -> None:
        """Full build for this series; in warm mode keep the network and note which checkpoint(s) it loaded."""
        self._network = None
        workflow = self._workflow(series)
        self.builds += 1
        if self.cold:
            self._run(workflow)
            return
        network = workflow.parser.get_parsed_content(NETWORK_ID)
        loaders = self._checkpoint_loaders(workflow.parser, network)
        identities = {str(loader.load_path): file_identity(loader.load_path) for loader in loaders.values()}
        self._run(workflow)  # the bundle's checkpoint handler verifies and loads the weights as the evaluator starts
        self._network, self._loader_ids, self._checkpoints = network, list(loaders), identities
        logger.info("Inference workflow built; network and weights (%s) kept for the next series.", list(identities))

    @staticmethod
    def _checkpoint_loaders(parser: Any, network: Any) -> dict[str, Any]:
        """``{config id: handler}`` of the checkpoint loaders in ``handlers``; one of them must load ``network``."""
        from monai.handlers import CheckpointLoader

        found = {}
        for i in range(len(parser[HANDLERS_ID]) if HANDLERS_ID in parser else 0):
            handler = parser.get_parsed_content(f"{HANDLERS_ID}#{i}")
            if isinstance(handler, CheckpointLoader):
                found[f"{HANDLERS_ID}#{i}"] = handler
        if not any(obj is network for h in found.values() for obj in h.load_dict.values()):
            raise RuntimeError(
                f"warm inference needs a CheckpointLoader in the config's {HANDLERS_ID!r} list that loads "
                f"@{NETWORK_ID}; none found. Fix the inference configs or run the node with cold: true."
            )
        return found
