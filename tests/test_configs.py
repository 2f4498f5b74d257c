"""Static checks of the bundle's configs: shared keys agree, every reference exists, metadata is valid."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"

#: keys that train.json and inference.json must define identically (both files are standalone)
SHARED = ["spacing", "hu_window", "patch_size", "subgroup_key", "subgroups", "features", "num_experts", "top_k",
          "use_dmoe", "network_def", "bundle_root", "network", "device", "amp", "amp_kwargs", "channels_last",
          "compile", "compile_kwargs", "sw_batch_size", "sw_overlap", "num_workers"]  # fmt: skip
REF = re.compile(r"@([A-Za-z_][\w#:]*)")
#: hardware overlays, stacked on train.json or inference.json
PROFILES = sorted((CONFIGS / "profiles").glob("*.json"))
#: the 2D overlays stack in their own order (bundle docs, 2d.md); data-set overlays (FairSeg, HAM10000) go last
PROFILES_2D = ("2d.json", "2d_evaluate.json", "2d_inference.json")
DATASET_OVERLAYS = [p for p in PROFILES if "settings_help#dataset_" in "".join(json.loads(p.read_text()))]
HARDWARE_PROFILES = [p for p in PROFILES if p.name not in PROFILES_2D and p not in DATASET_OVERLAYS]
STACKS_2D = [
    ["train.json", "profiles/2d.json"],
    ["train.json", "evaluate.json", "profiles/2d.json", "profiles/2d_evaluate.json"],
    ["inference.json", "profiles/2d_inference.json"],
]


def _load(name):
    return json.loads((CONFIGS / name).read_text())


def _walk(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
    elif isinstance(node, str):
        yield node


def _config_stacks():
    stacks = [["train.json"], ["inference.json"]]
    for extra in ("evaluate.json", "multi_gpu_train.json"):
        if (CONFIGS / extra).exists():
            stacks.append(["train.json", extra])
    if (CONFIGS / "multi_gpu_evaluate.json").exists():
        stacks.append(["train.json", "evaluate.json", "multi_gpu_evaluate.json"])
    if (CONFIGS / "inference_dicom.json").exists():
        stacks.append(["inference.json", "inference_dicom.json"])
    for variant in sorted((CONFIGS / "variants").glob("*.json")):
        stacks.append(["train.json", f"variants/{variant.name}"])
    for profile in HARDWARE_PROFILES:
        stacks += [["train.json", f"profiles/{profile.name}"], ["inference.json", f"profiles/{profile.name}"]]
    for stack in STACKS_2D:
        stacks += [stack] + [[*stack, f"profiles/{overlay.name}"] for overlay in DATASET_OVERLAYS]
    return stacks


def test_train_and_inference_share_definitions():
    train, infer = _load("train.json"), _load("inference.json")
    for key in SHARED:
        assert train[key] == infer[key], f"train.json and inference.json disagree on '{key}'"
    # the inference preprocessing is the training load chain restricted to the image
    train_chain = [train[t[1:]] if isinstance(t, str) and t.startswith("@") else t for t in train["load_transforms"]]
    train_targets = [t["_target_"] for t in train_chain]
    infer_chain = [infer[t[1:]] if isinstance(t, str) and t.startswith("@") else t
                   for t in infer["preprocessing"]["transforms"]]  # fmt: skip
    # scripts.fast_preprocess holds faster stand-ins for MONAI transforms: compare the transforms they stand in for
    from scripts.fast_preprocess import MONAI_EQUIVALENT

    infer_targets = [MONAI_EQUIVALENT.get(t["_target_"].removeprefix("scripts.fast_preprocess."), t["_target_"])
                     for t in infer_chain]  # fmt: skip
    assert infer_targets == [t for t in train_targets if t != "SpatialPadd"]


@pytest.mark.parametrize("stack", _config_stacks(), ids=lambda s: "+".join(s))
def test_every_reference_resolves_to_an_existing_id(stack):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in stack])
    missing = []
    for text in _walk(parser.get()):
        for ref in REF.findall(text):
            ref = ref.replace("#", "::")
            if ref not in parser:
                missing.append(ref)
    assert not missing, f"{stack}: references to undefined ids {sorted(set(missing))}"


def test_metadata_verifies_offline(meta_schema):
    meta = _load("metadata.json")
    assert meta["version"] in meta["changelog"]
    assert "optional_packages_version" not in meta
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
         "--filepath", str(meta_schema)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0 and "verified with no error" in res.stdout + res.stderr, res.stderr[-2000:]


def test_metadata_matches_installed_versions():
    import monai
    import torch

    meta = _load("metadata.json")
    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]


def test_inference_path_imports_no_optional_heavy_packages():
    """MONAI Label's environment lacks highdicom: NIfTI inference must not import it (MONAI imports pandas itself)."""
    code = (
        "import sys; sys.path.insert(0, 'bundle'); import scripts; "
        "from scripts import DMoEResUNet, SubgroupIndexd, CaseIdd, VerifiedCheckpointLoader; "
        "heavy = [m for m in ('highdicom', 'fairlearn', 'contourpy') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


#: the only list positions an overlay may use: MONAI's ``_disabled_`` needs the item itself, and the multi-GPU
#: overlays switch the stats handlers off on ranks > 0. Each position, with the ``_target_`` it must hold in the
#: stack below the overlay (a handler added or moved in train.json/evaluate.json breaks this test, not the run).
RANK0_ONLY = {
    "multi_gpu_train.json": (
        ["train.json"],
        {
            "train#handlers#2": "StatsHandler",
            "train#handlers#3": "TensorBoardStatsHandler",
            "validate#handlers#0": "StatsHandler",
            "validate#handlers#1": "TensorBoardStatsHandler",
        },
    ),
    "multi_gpu_evaluate.json": (["train.json", "evaluate.json"], {"validate#handlers#1": "StatsHandler"}),
}
POSITIONAL = re.compile(r"#(transforms|handlers)#\d+")


def _config_files():
    return sorted(CONFIGS.glob("*.json")) + sorted((CONFIGS / "variants").glob("*.json")) + PROFILES


def test_overlays_override_by_id_not_by_list_position():
    found = {}
    for path in _config_files():
        for key in json.loads(path.read_text()):
            if POSITIONAL.search(key):
                found.setdefault(path.name, set()).add(key)
    allowed = {name: {f"{pos}#_disabled_" for pos in positions} for name, (_, positions) in RANK0_ONLY.items()}
    assert found == allowed, "override by id (give the component its own key, as inference.json's loader/saver)"


@pytest.mark.parametrize("overlay", sorted(RANK0_ONLY))
def test_multi_gpu_positions_hold_the_handlers_they_disable(overlay):
    base, positions = RANK0_ONLY[overlay]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in base])
    for position, target in positions.items():
        item = parser.get(position.replace("#", "::"))
        if isinstance(item, str) and item.startswith("@"):
            item = parser.get(item[1:].replace("#", "::"))
        got = item.get("_target_") if isinstance(item, dict) else item
        assert got == target, f"{overlay} disables {position} meaning {target}, but {'+'.join(base)} has {got} there"


# ------------------------------------------------------------------------------------------- hardware profiles
GPU_PROFILE = CONFIGS / "profiles" / "gpu.json"


@pytest.mark.parametrize("base", ["train.json", "inference.json"])
def test_gpu_profile_resolves_to_the_clinical_capacity_settings(base):
    import torch

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / base), str(GPU_PROFILE)])
    assert parser["features"] == 32
    patch = parser["patch_size"]
    assert all(p >= q for p, q in zip(patch, (128, 128, 64))) and all(p % 32 == 0 for p in patch), patch
    assert parser["amp"] is True and parser.get_parsed_content("amp_kwargs") == {"dtype": torch.bfloat16}
    assert 1 <= parser["sw_batch_size"] <= 8
    inferer = parser.get_parsed_content("validate#inferer" if base == "train.json" else "inferer")
    assert list(inferer.roi_size) == patch and inferer.sw_batch_size == parser["sw_batch_size"]


def test_gpu_profile_states_its_parameter_count():
    """The profile's help text gives the network's size; count it (the dMoE network at features 32)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(GPU_PROFILE)])
    net = parser.get_parsed_content("network_def")
    count = sum(p.numel() for p in net.parameters())
    stated = re.search(r"([\d.]+) M parameters", json.loads(GPU_PROFILE.read_text())["settings_help#profile"])
    assert stated and round(count / 1e6, 1) == float(stated.group(1)), count
    assert 5 * 8 * 32**2 < count < 31e6  # wider than the default (f=8: 0.73 M), smaller than nnU-Net's 3d_fullres


@pytest.mark.parametrize("base,kind", [("train.json", "train"), ("inference.json", "infer")])
def test_gpu_profile_passes_check_properties(base, kind, tmp_path):
    from monai.bundle import ConfigWorkflow
    from scripts import synthetic

    cohort = tmp_path / "cohort"
    synthetic.generate_cohort(cohort, n_cases=6, seed=1, shape=(48, 48, 24))
    override = {"dataset_dir": str(cohort), "output_dir": str(tmp_path / "out"), "num_workers": 0}
    if kind == "train":
        override.update(ckpt_dir=str(tmp_path / "out" / "models"), cache_rate=0.0, epochs=1)
    wf = ConfigWorkflow(config_file=[str(CONFIGS / base), str(GPU_PROFILE)], workflow_type=kind, **override)
    wf.initialize()
    assert wf.check_properties() == []
    engine = wf.parser.get_parsed_content("train#trainer" if kind == "train" else "evaluator")
    assert engine.amp is True and engine.network.head.conv.in_channels == 32  # the profile's settings reach it
    wf.finalize()
