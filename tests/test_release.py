"""The release zip is what ``monai.bundle download`` expects, and the downloaded bundle verifies its weights."""

import hashlib
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
