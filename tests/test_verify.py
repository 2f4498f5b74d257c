"""`make verify` (tools/verify_bundle.py): passes on the shipped bundle, fails loudly on a broken copy."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scripts.safe_io import read_large_files, sha256_file

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(REPO / "tools"))
from verify_bundle import verify_bundle  # noqa: E402


def _copy_bundle(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("runs", "eval", "data", "__pycache__"))
    return dst


def _verify(bundle_dir: Path, schema: Path) -> tuple[bool, str]:
    out = io.StringIO()
    ok = verify_bundle(bundle_dir, str(schema), out=out)
    return ok, out.getvalue()


@pytest.mark.slow
def test_verify_passes_on_the_repo_bundle(meta_schema):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "verify_bundle.py"), "--bundle-dir", str(BUNDLE),
                          "--schema", str(meta_schema)], capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for check in ("files", "verify_metadata", "changelog", "hashes", "verify_net_in_out", "ckpt_export"):
        assert f"PASS {check}:" in res.stdout, check
    assert "PASS workflow train:" in res.stdout and "PASS workflow inference+inference_dicom:" in res.stdout
    assert "FAIL" not in res.stdout and "ALL CHECKS PASSED" in res.stdout


def test_verify_fails_on_a_tampered_weight_file(tmp_path, meta_schema):
    bundle = _copy_bundle(tmp_path)
    weights = bundle / "models" / "model.pt"
    recorded = {e["path"]: e["hash_val"] for e in read_large_files(bundle / "large_files.yml")}["models/model.pt"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit deep inside the tensor data
    weights.write_bytes(bytes(data))
    ok, out = _verify(bundle, meta_schema)
    assert not ok
    fail = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].startswith("FAIL hashes:"), out
    assert str(weights) in fail[0] and recorded in fail[0] and sha256_file(weights) in fail[0], fail[0]
    assert "PASS verify_net_in_out" not in out, "verification stops at the first failure"


def test_verify_fails_when_the_version_is_not_in_the_changelog(tmp_path, meta_schema):
    bundle = _copy_bundle(tmp_path)
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = "9.9.9"
    meta_path.write_text(json.dumps(meta, indent=4))
    ok, out = _verify(bundle, meta_schema)
    assert not ok
    assert "PASS verify_metadata" in out  # the schema accepts it: only the changelog check catches it
    assert "FAIL changelog:" in out and "'9.9.9'" in out and "0.2.0" in out, out


def test_verify_reports_missing_files(tmp_path):
    bundle = _copy_bundle(tmp_path)
    (bundle / "docs" / "data_license.txt").unlink()
    ok, out = _verify(bundle, tmp_path / "unused_schema.json")  # the files check fails before the schema is read
    assert not ok and "FAIL files:" in out and "docs/data_license.txt" in out, out


def test_large_files_yml_lists_the_shipped_weights_with_their_hashes():
    entries = read_large_files(BUNDLE / "large_files.yml")
    assert sorted(e["path"] for e in entries) == ["models/model.pt", "models/model.ts"]
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}
        assert entry["hash_type"] == "sha256"
        assert entry["hash_val"] == sha256_file(BUNDLE / entry["path"]), entry["path"]
        assert entry["url"].startswith("https://github.com/") and "/releases/download/" in entry["url"]
        assert entry["url"].endswith("/" + Path(entry["path"]).name)


def test_monai_download_large_files_reads_the_yml(tmp_path):
    """MONAI's own loader parses large_files.yml; the files are already there with the right hash, so the command
    succeeds offline (download_url skips an existing file whose hash matches)."""
    pytest.importorskip("yaml", reason="MONAI reads .yml with PyYAML, which is not installed in this environment")
    from monai.bundle import ConfigParser

    yml = BUNDLE / "large_files.yml"
    content = ConfigParser.load_config_file(yml)
    assert [e["path"] for e in content["large_files"]] == [e["path"] for e in read_large_files(yml)]
    bundle = _copy_bundle(tmp_path)
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
