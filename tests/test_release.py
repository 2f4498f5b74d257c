"""The release zip is what ``monai.bundle download`` expects, the downloaded bundle verifies its weights, and the
model card's commands run as written from the unzipped bundle."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import release_zip  # noqa: E402


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_zip_downloads_and_verifies(tmp_path):
    target = release_zip.build_zip(REPO / "bundle", tmp_path / "assets")
    large_files = yaml.safe_load((REPO / "bundle" / "large_files.yml").read_text())  # parses: a real YAML file
    assert target.name.startswith("fairdro_ctv_segmentation_v") and target.suffix == ".zip"
    names = zipfile.ZipFile(target).namelist()
    assert all(n.startswith("fairdro_ctv_segmentation/") for n in names)
    for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt",
                     "models/model.ts", "large_files.yml", "scripts/__init__.py", "docs/README.md"):  # fmt: skip
        assert f"fairdro_ctv_segmentation/{required}" in names, required
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    with pytest.raises(FileExistsError):
        release_zip.build_zip(REPO / "bundle", tmp_path / "assets")  # never overwrites an asset

    # MONAI's own download command (a file:// URL stands in for the GitHub release asset)
    dl = tmp_path / "downloaded"
    cmd = [sys.executable, "-m", "monai.bundle", "download", "--name", "fairdro_ctv_segmentation",
           "--url", target.as_uri(), "--bundle_dir", str(dl)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tmp_path)
    bundle = dl / "fairdro_ctv_segmentation"
    for entry in large_files["large_files"]:
        assert _sha256(bundle / entry["path"]) == entry["hash_val"] == _sha256(REPO / "bundle" / entry["path"])
    # download_large_files accepts the files as present and verified (no network needed when hashes match)
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Verified 'model.ts'" in res.stderr + res.stdout


# ---- the model card's commands, as written, from an unzipped release (no repository around it)

CARD = REPO / "bundle" / "docs" / "README.md"


def _card_commands() -> list[str]:
    """The commands of the card's *Bundle commands* block, continuation lines joined, comments dropped."""
    section = re.search(r"^## Bundle commands\n(.*?)(?=^## )", CARD.read_text(), flags=re.M | re.S)
    assert section, f"{CARD} has no '## Bundle commands' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), flags=re.S).group(1)
    lines = re.sub(r"\\\n\s*", " ", block).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _run_card_command(words: str, bundle: Path, cohort: Path) -> subprocess.CompletedProcess:
    """Run the one card command containing ``words`` from the bundle folder, with ``DIR`` = the cohort."""
    (command,) = [c for c in _card_commands() if words in c]
    args = shlex.split(command.replace("DIR", str(cohort)), comments=True)
    assert args[0] == "python", command
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the working directory provides scripts
    res = subprocess.run([sys.executable, *args[1:]], cwd=bundle, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{command}\n{(res.stdout + res.stderr)[-3000:]}"
    return res


@pytest.fixture(scope="module")
def unzipped(tmp_path_factory):
    """The release zip built by tools/release_zip.py, unzipped in a clean folder; a cohort from its synthetic.py."""
    root = tmp_path_factory.mktemp("release")
    built = subprocess.run([sys.executable, str(REPO / "tools" / "release_zip.py"), "--out", str(root / "assets")],
                           capture_output=True, text=True, check=True, cwd=root)  # fmt: skip
    with zipfile.ZipFile(built.stdout.strip().splitlines()[-1]) as zf:
        zf.extractall(root / "clean")
    bundle = root / "clean" / "fairdro_ctv_segmentation"
    cohort = root / "cohort"
    subprocess.run([sys.executable, "scripts/synthetic.py", "--out", str(cohort), "--n-cases", "10", "--seed", "0"],
                   cwd=bundle, check=True, capture_output=True)  # fmt: skip
    return bundle, cohort


@pytest.mark.slow
def test_card_verify_metadata_in_the_unzipped_release(unzipped, meta_schema):
    bundle, cohort = unzipped
    (bundle / "eval").mkdir(exist_ok=True)
    shutil.copy(meta_schema, bundle / "eval" / "meta_schema_20240725.json")  # the card: "the copy already there"
    res = _run_card_command("verify_metadata", bundle, cohort)
    assert "verified with no error" in res.stdout + res.stderr


@pytest.mark.slow
def test_card_verify_net_in_out_in_the_unzipped_release(unzipped):
    bundle, cohort = unzipped
    res = _run_card_command("verify_net_in_out", bundle, cohort)
    assert "verified with no error" in res.stdout + res.stderr


@pytest.mark.slow
def test_card_ckpt_export_in_the_unzipped_release(unzipped):
    import torch

    bundle, cohort = unzipped
    (bundle / "models" / "model.ts").unlink()
    _run_card_command("ckpt_export", bundle, cohort)
    extra = {"inference.json": ""}
    torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["inference.json"]) == json.loads((bundle / "configs" / "inference.json").read_text())


@pytest.mark.slow
def test_card_inference_in_the_unzipped_release(unzipped):
    import nibabel as nib
    import numpy as np

    bundle, cohort = unzipped
    _run_card_command("run inference", bundle, cohort)
    testing = json.loads((cohort / "datalist.json").read_text())["testing"]
    assert testing
    for item in testing:
        image = nib.load(cohort / item["image"])
        name = Path(item["image"]).name.removesuffix(".nii.gz")
        mask = nib.load(bundle / "eval" / f"{name}_seg.nii.gz")  # eval/ of the unzipped bundle: its own bundle_root
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4), item["id"]
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}, item["id"]
