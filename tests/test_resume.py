"""Resuming training: `--resume true` after a SIGKILL replays the uninterrupted run bit for bit (CPU).

What a kill *inside* ``atomic_save`` leaves on disk is unit-tested in ``test_safe_io.py``
(``test_sigkill_during_save_leaves_previous_model``, ``test_crash_during_save_keeps_previous_model``); here the same
kill hits the training command itself, and the run is then resumed.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandCropByPosNegLabeld, RandScaleIntensityd
from scripts import synthetic
from scripts.resume import ResumeFromCheckpoint, RNGState, _as_bool, find_resume_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
#: 4 training cases, batch 1: 4 iterations per epoch of a few tenths of a second each on one CPU thread
TINY = {"features": 4, "num_experts": 4, "patch_size": "[64,64,32]", "batch_size": 1, "epochs": 3}


# ------------------------------------------------------------------------------------------- unit tests


def _transforms(seed: int = 0) -> Compose:
    keys = ["image", "label"]
    chain = Compose([
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(4, 4, 4), num_samples=1),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
    ])  # fmt: skip
    chain.set_random_state(seed)
    return chain


def _draws(chain: Compose) -> list:
    data = {"image": torch.rand(1, 8, 8, 8), "label": (torch.rand(1, 8, 8, 8) > 0.5).float()}
    crop = chain(data)[0]
    return [torch.rand(3), np.random.rand(3), [__import__("random").random() for _ in range(3)], crop["image"]]


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    chain = _transforms()
    state = RNGState(chain)
    _draws(chain)  # move every stream away from its seed
    saved = state.state_dict()
    paths = saved["transform_paths"]
    assert any(".cropper" in p for p in paths), paths  # the cropper inside RandCropByPosNegLabeld has its own state
    torch.save(saved, tmp_path / "rng.pt")
    first = _draws(chain)
    RNGState(chain).load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = _draws(chain)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rng_state_warns_when_the_transforms_changed(caplog):
    saved = RNGState(_transforms()).state_dict()
    with caplog.at_level(logging.WARNING, logger="scripts.resume"):
        RNGState(Compose([RandScaleIntensityd("image", factors=0.1, prob=0.5)])).load_state_dict(saved)
    assert "differ from those of the checkpoint" in caplog.text
    with pytest.raises(ValueError, match="lacks"):
        RNGState().load_state_dict({"torch": torch.get_rng_state()})


def _fake_checkpoint(path: Path, iteration: int, epoch_length: int = 4) -> None:
    torch.save(
        {"model": {"w": torch.zeros(1)}, "trainer": {"iteration": iteration, "epoch_length": epoch_length}}, path
    )


def test_newest_checkpoint_is_chosen_by_iteration_not_file_time(tmp_path, caplog):
    assert find_resume_checkpoint(tmp_path / "absent") is None
    _fake_checkpoint(tmp_path / "checkpoint_epoch=3.pt", 12)
    time.sleep(0.01)
    _fake_checkpoint(tmp_path / "checkpoint_epoch=2.pt", 8)  # written later, but older in training
    _fake_checkpoint(tmp_path / "checkpoint_final.pt", 14)  # saved mid-epoch on an exception: skipped
    (tmp_path / ".checkpoint_epoch=4.pt.abc.tmp").write_bytes(b"half")  # a write killed half way
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="scripts.resume"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch=3.pt"
    assert "broken.pt" in caplog.text and "saved mid-epoch" in caplog.text
    (tmp_path / "checkpoint_epoch=3.pt").unlink()
    (tmp_path / "checkpoint_epoch=2.pt").unlink()
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_final.pt"  # nothing better: used, with warning


def test_fresh_run_sets_earlier_checkpoints_aside(tmp_path, caplog):
    _fake_checkpoint(tmp_path / "checkpoint_epoch=3.pt", 12)
    handler = ResumeFromCheckpoint(tmp_path, {"model": torch.nn.Linear(1, 1)}, enabled="false")
    with caplog.at_level(logging.WARNING, logger="scripts.resume"):
        handler.attach(engine=None)
    assert list_checkpoints(tmp_path) == []
    (aside,) = tmp_path.glob("previous_*/checkpoint_epoch=3.pt")
    assert "earlier run" in caplog.text and str(aside.parent) in caplog.text


def test_resume_setting_accepts_booleans_and_their_spellings():
    assert _as_bool("true") is True and _as_bool("False") is False and _as_bool(True) is True
    with pytest.raises(TypeError, match="--resume true"):
        _as_bool("yes please")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ResumeFromCheckpoint("", {"model": torch.nn.Linear(1, 1)})


# ------------------------------------------------------------------------------- the training command


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_cohort")
    synthetic.generate_cohort(out, n_cases=8, seed=3, shape=(48, 48, 24))
    return out


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "bundle"), env.get("PYTHONPATH")) if p)
    return env


def _args(cohort: Path, run_dir: Path, *extra: str) -> list[str]:
    args = ["run", "training", "--config_file", "bundle/configs/train.json", "--dataset_dir", str(cohort),
            "--output_dir", str(run_dir), "--ckpt_dir", str(run_dir / "models")]  # fmt: skip
    for key, value in TINY.items():
        args += [f"--{key}", str(value)]
    return args + list(extra)


def _train(cohort: Path, run_dir: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", *_args(cohort, run_dir, *extra)]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "checkpoint_final.pt", weights_only=True)


def _assert_same_training(resumed: dict, reference: dict) -> None:
    assert resumed["trainer"] == reference["trainer"]
    assert resumed["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), f"model weight {key} differs from the uninterrupted run"
    for key, value in reference["dro"].items():
        same = (
            torch.equal(resumed["dro"][key], value) if isinstance(value, torch.Tensor) else resumed["dro"][key] == value
        )
        assert same, f"DRO state {key!r} differs from the uninterrupted run"
    for key, value in reference["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"]["state"][key][name]), torch.as_tensor(tensor))


@pytest.fixture(scope="module")
def uninterrupted(cohort, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _train(cohort, run_dir)
    return _final(run_dir)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(cohort, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", *_args(cohort, run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, killed = [], False
    try:
        for line in proc.stdout:  # the StatsHandler logs every iteration
            log.append(line)
            if "Epoch: 2/3, Iter: 1/" in line:  # one iteration of epoch 2 done, three to go
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
    finally:
        if not killed:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert killed and proc.returncode == -signal.SIGKILL, "".join(log[-30:])
    # killed inside epoch 2: only epoch 1's checkpoint exists (a SIGKILL gives the saver no chance to write more)
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["checkpoint_epoch=1.pt"]

    log = _train(cohort, run_dir, "--resume", "true")
    assert "resuming from" in log and "checkpoint_epoch=1.pt" in log
    _assert_same_training(_final(run_dir), uninterrupted)
    # the resumed epoch-1 file was handed to the saver and replaced: n_saved=1 still holds after the restart
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [
        "checkpoint_epoch=3.pt",
        "checkpoint_final.pt",
    ]


#: run the training command, SIGKILL-ing the process half way through writing epoch 2's checkpoint
_KILL_IN_SAVE = """
import io, os, runpy, signal, sys
import scripts.safe_io as safe_io

real_atomic_save = safe_io.atomic_save

def atomic_save(obj, path, save_func, verify=True):
    if os.path.basename(path) != "checkpoint_epoch=2.pt":
        return real_atomic_save(obj, path, save_func=save_func, verify=verify)

    def half_then_die(o, f):
        buffer = io.BytesIO()
        save_func(o, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    real_atomic_save(obj, path, save_func=half_then_die, verify=verify)

safe_io.atomic_save = atomic_save
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one_and_resumes(cohort, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", _KILL_IN_SAVE, *_args(cohort, run_dir)]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == -signal.SIGKILL, res.stdout[-3000:] + res.stderr[-3000:]
    folder = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint_epoch=1.pt"]
    assert [p.name.split(".")[1] for p in folder.glob(".*.tmp")] == ["checkpoint_epoch=2"]  # the half-written file
    previous = torch.load(folder / "checkpoint_epoch=1.pt", weights_only=True)  # complete and plain
    assert set(previous) == {"model", "optimizer", "lr_scheduler", "dro", "selection", "trainer", "rng"}
    assert previous["trainer"]["iteration"] == previous["trainer"]["epoch_length"]

    _train(cohort, run_dir, "--resume", "True")
    _assert_same_training(_final(run_dir), uninterrupted)
