"""Same seed, same weights: a short CPU training run is bit-identical when repeated, and changes with the seed.

GPU runs are not covered here (no GPU in CI); what is and is not deterministic there is in docs/reliability.md.
"""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from scripts import synthetic

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
TINY = {"features": 4, "num_experts": 4, "patch_size": [64, 64, 32], "batch_size": 1, "epochs": 2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("determinism_cohort")
    synthetic.generate_cohort(out, n_cases=6, seed=5, shape=(48, 48, 24))
    return out


def _train(cohort: Path, run_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", run_id="training", dataset_dir=str(cohort),
        output_dir=str(run_dir), ckpt_dir=str(run_dir / "models"), seed=seed, **TINY,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    weights = {k: v.detach().clone() for k, v in wf.parser.get_parsed_content("network").state_dict().items()}
    dro = wf.parser.get_parsed_content("dro").state_dict()
    wf.finalize()
    return {**weights, "dro.bank": dro["bank"], "dro.pi": dro["pi"]}


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not(cohort, tmp_path):
    first = _train(cohort, tmp_path / "a", seed=0)
    second = _train(cohort, tmp_path / "b", seed=0)
    other = _train(cohort, tmp_path / "c", seed=1)
    assert first.keys() == second.keys() == other.keys()
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differing, f"same seed, different values for {differing[:5]}"
    trained = [k for k in first if k.endswith("weight") and first[k].is_floating_point()]
    assert any(not torch.equal(first[k], other[k]) for k in trained), "seed 1 trained exactly as seed 0"
