"""Distributed training and evaluation: the multi-GPU overlays run under ``torchrun`` on CPU (gloo, 2 processes).

The training run is launched exactly as a user would (``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m monai.bundle run training --config_file "['train.json','multi_gpu_train.json']"``), plus a
test-only overlay that swaps in a FairDRO subclass recording each rank's local ``(ids, losses, groups)`` per step and
saves every rank's DRO state, network weights and records at ``finalize``. The checks:

- training completes, ``model.pt`` and the final checkpoint are written without ``module.`` prefixes and load into the
  plain network;
- both ranks end with identical DRO state and identical weights, and the data really was sharded;
- the global DRO state equals what one process computes from the same per-case losses, fed as one step per
  iteration with the ranks' rows concatenated (sharding does not change the objective);
- ``run evaluating`` on two ranks gives the same per-case fairness table as one process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts import synthetic
from scripts.fairdro import FairDRO

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
WORLD = 2

#: tiny settings shared by the distributed run and the single-process reference; warm-up off and GroupDRO ``pi`` on,
#: so the DRO weights (and thus the sampler) change from the first step and the state is worth comparing. The bank is
#: the EMA of the training losses (refresh off), so every step's all-gathered update is what is compared; the
#: eval-mode refresh runs the same full pass on every rank (scripts/bank_refresh.py) and needs no communication
SETTINGS = {
    "epochs": 3,
    "val_interval": 1,
    "patch_size": [64, 64, 32],
    "features": 4,
    "num_experts": 4,
    "batch_size": 2,
    "num_samples": 1,
    "dro#warmup_epochs": 0,
    "dro#refresh_every": 0,
    "dro#inter": "groupdro",
    "dro#eta": 0.5,
}
NET_SETTINGS = {k: SETTINGS[k] for k in ("patch_size", "features", "num_experts")}

#: test-only FairDRO that records what each rank feeds to ``update`` (before the all-gather)
PROBE = '''
import torch
from scripts.fairdro import FairDRO


class RecordingFairDRO(FairDRO):
    """FairDRO that keeps this rank's local (ids, losses, groups) of every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def update(self, ids, losses, groups=None):
        local = torch.as_tensor(losses).detach().to("cpu", torch.float64).flatten().clone()
        g = None if groups is None else torch.as_tensor(groups).detach().cpu().flatten().clone()
        self.steps.append(([str(c) for c in ids], local, g))
        super().update(ids, losses, groups)
'''

#: test-only overlay: the recording FairDRO, and a per-rank dump before the process group is destroyed
PROBE_OVERLAY = {
    "dro#_target_": "dro_probe.RecordingFairDRO",
    "finalize": [
        "$torch.save({'rank': dist.get_rank(), 'world': dist.get_world_size(), 'dro': @dro.state_dict(), "
        "'steps': @dro.steps, 'net': @network.module.state_dict()}, "
        "os.path.join(@output_dir, 'rank' + str(dist.get_rank()) + '.pt'))",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ],
}


def _cli(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return args


def _torchrun(run_id: str, config_files: list[Path], extra_path: Path | None = None, **settings) -> str:
    """Run ``monai.bundle run <run_id>`` under ``torch.distributed.run`` with WORLD CPU processes; return the log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (BUNDLE, extra_path) if p is not None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        "-m", "monai.bundle", "run", run_id,
        "--config_file", json.dumps([str(f) for f in config_files]),
        *_cli(settings),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"torchrun {run_id} failed (rc {proc.returncode}):\n{log[-6000:]}"
    return log


def _parser(config_files: list[str], **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in config_files])
    for key, value in override.items():
        parser[key] = value
    return parser


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_cohort")
    synthetic.generate_cohort(out, n_cases=10, seed=11, shape=(48, 48, 24))  # >= 2 validation cases: one per rank
    return out


def _train_probed(cohort: Path, work: Path, extra_overlays: tuple[dict, ...] = (), **settings) -> list[dict]:
    """Distributed training with the probe overlay; returns the per-rank dumps (rank order)."""
    probe_dir, out = work / "probe", work / "out"
    probe_dir.mkdir()
    (probe_dir / "dro_probe.py").write_text(textwrap.dedent(PROBE))
    overlays = []
    for i, content in enumerate((*extra_overlays, PROBE_OVERLAY)):
        overlays.append(probe_dir / f"overlay_{i}.json")
        overlays[-1].write_text(json.dumps(content))
    configs = [CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json", *overlays]
    _torchrun("training", configs, probe_dir, dataset_dir=cohort, output_dir=out, ckpt_dir=work / "models", **settings)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _replay_single_process(cohort: Path, dumps: list[dict], **override) -> FairDRO:
    """A single-process FairDRO fed, step by step, the ranks' recorded local rows concatenated in rank order."""
    parser = _parser(["train.json"], dataset_dir=str(cohort), **override)
    parser["train#dataset#cache_rate"] = 0  # only the datalist items are needed
    reference = parser.get_parsed_content("dro")
    for step in zip(*(d["steps"] for d in dumps)):
        ids = [c for s in step for c in s[0]]
        reference.update(ids, torch.cat([s[1] for s in step]), torch.cat([s[2] for s in step]))
    state = reference.state_dict()
    for dump in dumps:
        assert dump["dro"]["ids"] == state["ids"]
        for key in ("bank", "seen", "counts", "pi"):
            assert torch.equal(dump["dro"][key], state[key]), key
        assert dump["dro"]["num_updates"] == state["num_updates"] == len(dump["steps"])
    return reference


@pytest.fixture(scope="module")
def ddp_run(cohort, tmp_path_factory):
    """One distributed training run; returns (output_dir, ckpt_dir, [rank0 dump, rank1 dump])."""
    work = tmp_path_factory.mktemp("ddp_train")
    dumps = _train_probed(cohort, work, **SETTINGS)
    return work / "out", work / "models", dumps


def _plain_network(cohort: Path) -> torch.nn.Module:
    return _parser(["train.json"], dataset_dir=str(cohort), **NET_SETTINGS).get_parsed_content("network_def")


def test_ddp_training_writes_plain_checkpoints(ddp_run, cohort):
    out, ckpt, dumps = ddp_run
    assert [d["rank"] for d in dumps] == list(range(WORLD)) and all(d["world"] == WORLD for d in dumps)
    model = torch.load(ckpt / "model.pt", weights_only=True)
    assert model and not [k for k in model if k.startswith("module.")]
    final = torch.load(out / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert {"model", "optimizer", "dro", "trainer"} <= set(final)
    assert not [k for k in final["model"] if k.startswith("module.")]
    # the saved weights load strictly into the plain (unwrapped) network and equal the ranks' final weights
    net = _plain_network(cohort)
    net.load_state_dict(final["model"], strict=True)
    net.load_state_dict(model, strict=True)
    for key, value in final["model"].items():
        assert torch.equal(value, dumps[0]["net"][key]), key
    assert final["dro"]["num_updates"] == dumps[0]["dro"]["num_updates"]


def test_ranks_hold_identical_state(ddp_run):
    _, _, (rank0, *others) = ddp_run
    for other in others:
        for key in ("bank", "seen", "counts", "pi", "groups"):
            assert torch.equal(rank0["dro"][key], other["dro"][key]), key
        assert rank0["dro"]["num_updates"] == other["dro"]["num_updates"] == len(rank0["steps"])
        assert rank0["net"].keys() == other["net"].keys()
        for key, value in rank0["net"].items():
            assert torch.equal(value, other["net"][key]), key
    # the data was sharded: every rank took part in every step, and the ranks did not see the same batches
    assert all(len(rank0["steps"]) == len(o["steps"]) for o in others)
    assert any(s0[0] != s1[0] for s0, s1 in zip(rank0["steps"], others[0]["steps"]))


def test_dro_state_equals_single_process(ddp_run, cohort):
    """Feeding one FairDRO, step by step, the ranks' rows in rank order reproduces the distributed state exactly."""
    _, _, dumps = ddp_run
    n_train = len(json.loads((cohort / "datalist.json").read_text())["training"])
    per_rank = -(-n_train // WORLD)  # FairDROSampler draws ceil(N / world) per rank and epoch (multi_gpu_train.json)
    steps_per_epoch = -(-per_rank // SETTINGS["batch_size"])
    assert len(dumps[0]["steps"]) == SETTINGS["epochs"] * steps_per_epoch
    reference = _replay_single_process(cohort, dumps, **SETTINGS)
    assert reference.num_cases == n_train and reference.apply == "sample"
    # control: rank 0's rows alone (what an un-synchronised rank would see) give a different state
    parser = _parser(["train.json"], dataset_dir=str(cohort), **SETTINGS)
    parser["train#dataset#cache_rate"] = 0
    local = parser.get_parsed_content("dro")
    for ids, losses, groups in dumps[0]["steps"]:
        local.update(ids, losses, groups)
    assert not torch.equal(local.bank, reference.bank)
    # the DRO weights were live (no warm-up) and not uniform: the comparison covers the CVaR/GroupDRO maths
    assert not reference.in_warmup
    w = reference.case_weights()
    assert float(w.max() - w.min()) > 1e-6
    assert not torch.allclose(reference.pi, torch.full_like(reference.pi, 1.0 / reference.pi.numel()))


def test_ddp_loss_weighting_with_distributed_sampler(cohort, tmp_path):
    """The documented ``apply="loss"`` alternative (DistributedSampler) keeps the DRO state global too."""
    loss_overlay = {
        "dro#apply": "loss",
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                          "shuffle": True},
    }  # fmt: skip
    settings = {**SETTINGS, "epochs": 1}
    dumps = _train_probed(cohort, tmp_path, (loss_overlay,), **settings)
    reference = _replay_single_process(cohort, dumps, **settings, **{"dro#apply": "loss"})
    # every case once per epoch over the ranks: the bank is complete after one epoch and the warm-up has ended
    assert bool(reference.seen.all()) and not reference.in_warmup


def _per_case(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def test_ddp_evaluation_matches_single_process(ddp_run, cohort, tmp_path):
    _, ckpt, _ = ddp_run
    eval_configs = ["train.json", "evaluate.json"]
    out_ddp, out_one = tmp_path / "ddp", tmp_path / "one"
    _torchrun(
        "evaluating",
        [CONFIGS / f for f in [*eval_configs, "multi_gpu_evaluate.json"]],
        dataset_dir=cohort, output_dir=out_ddp, ckpt_dir=ckpt, **NET_SETTINGS,
    )  # fmt: skip
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in eval_configs], workflow_type="eval", run_id="evaluating",
        dataset_dir=str(cohort), output_dir=str(out_one), ckpt_dir=str(ckpt), **NET_SETTINGS,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    ddp, one = _per_case(out_ddp / "fairness" / "per_case.csv"), _per_case(out_one / "fairness" / "per_case.csv")
    testing = json.loads((cohort / "datalist.json").read_text())["testing"]
    assert sorted(ddp) == sorted(one) == sorted(item["id"] for item in testing)  # every case once, none lost
    for cid, row in one.items():
        for key in ("dice", "hd95", "nsd"):
            assert float(ddp[cid][key]) == pytest.approx(float(row[key]), rel=1e-5, abs=1e-6), (cid, key)
    metrics = json.loads((out_ddp / "fairness" / "metrics.json").read_text())
    assert metrics["n_cases"] == len(testing)


#: handlers that may run on rank 0 only; everything else (ValidationHandler, FairDROHandler, the fairness metric and
#: report handlers, checkpoint loaders) has to run on every rank, because it drives or joins a collective operation
RANK0_ONLY = {"StatsHandler", "TensorBoardStatsHandler", "scripts.safe_io.AtomicCheckpointSaver"}


@pytest.mark.parametrize(
    "stack",
    [["train.json", "multi_gpu_train.json"], ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]],
    ids=["train", "evaluate"],
)
def test_rank0_only_keys_point_at_rank0_handlers(stack):
    """The overlays disable handlers by list position: check each position still holds a rank-0-only handler."""
    overlay = json.loads((CONFIGS / stack[-1]).read_text())
    disabled = [k[: -len("#_disabled_")] for k in overlay if k.endswith("#_disabled_")]
    assert disabled
    merged = _parser(stack)
    for key in disabled:
        target = merged[key]["_target_"]
        assert target in RANK0_ONLY, f"{stack[-1]}: {key} is {target}, which must run on every rank"
    for key in ("train#handlers", "validate#handlers"):
        if key not in merged:
            continue
        for i, handler in enumerate(merged[key]):
            if isinstance(handler, str):  # a reference ("@model_selection"): no overlay disables it by position
                continue
            if handler["_target_"] not in RANK0_ONLY:
                assert "_disabled_" not in handler, f"{key}#{i} ({handler['_target_']}) must run on every rank"
