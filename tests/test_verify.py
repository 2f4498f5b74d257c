"""`make verify` (tools/verify_bundle.py): passes on the shipped bundle with no network, fails loudly on a broken
copy."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from scripts.safe_io import read_large_files, sha256_file

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(REPO / "tools"))
from bundle_schema import SCHEMA_ENV, SHIPPED_SCHEMA  # noqa: E402
from verify_bundle import (  # noqa: E402
    CHECKS,
    CHECKS_2D,
    META_2D,
    CheckFailed,
    _checks,
    _stacks,
    check_changelog_2d,
    check_metadata,
    check_metadata_2d,
    verify_bundle,
)

CHECK_NAMES_2D = ("verify_metadata 2d", "changelog 2d", "verify_net_in_out 2d", "ckpt_export 2d")
BLOCKED = "network blocked by tests/test_verify.py"
#: a sitecustomize that blocks every internet socket of a Python started with it on PYTHONPATH (local sockets work)
OFFLINE_SITE = f"""import socket

def _blocked(*args, **kwargs):
    raise OSError({BLOCKED!r})

_connect = socket.socket.connect

def _connect_local(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _blocked()
    return _connect(self, address)

socket.getaddrinfo = _blocked
socket.socket.connect = _connect_local
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network here, nor in any Python started from here; BUNDLE_META_SCHEMA unset. Returns the environment."""
    site = tmp_path / "offline_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(OFFLINE_SITE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv(SCHEMA_ENV, raising=False)
    connect = socket.socket.connect

    def blocked(*args, **kwargs):
        raise OSError(BLOCKED)

    def connect_local(sock, address):
        return blocked() if sock.family in (socket.AF_INET, socket.AF_INET6) else connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", blocked)  # this process too
    monkeypatch.setattr(socket.socket, "connect", connect_local)
    return dict(os.environ)


def _copy_bundle(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("runs", "eval", "data", "__pycache__"))
    return dst


def _verify(bundle_dir: Path, schema: Path) -> tuple[bool, str]:
    out = io.StringIO()
    ok = verify_bundle(bundle_dir, str(schema), out=out)
    return ok, out.getvalue()


@pytest.mark.slow
def test_verify_passes_on_the_repo_bundle_with_no_network(offline):
    """`make verify`'s command, with every internet socket blocked: the shipped schema, nothing downloaded."""
    res = subprocess.run([sys.executable, str(REPO / "tools" / "verify_bundle.py"), "--bundle-dir", str(BUNDLE)],
                         capture_output=True, text=True, check=False, env=offline)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"PASS verify_metadata: valid against {SHIPPED_SCHEMA}" in res.stdout
    for check in ("files", "verify_metadata", "changelog", "hashes", "verify_net_in_out", "ckpt_export"):
        assert f"PASS {check}:" in res.stdout, check
    assert "PASS workflow train:" in res.stdout and "PASS workflow inference+inference_dicom:" in res.stdout
    for check in CHECK_NAMES_2D:  # the 2D configuration (profiles/2d_inference.json is shipped)
        assert f"PASS {check}:" in res.stdout, check
    assert "PASS workflow inference+2d_inference:" in res.stdout
    for name, profile in (("train+2d", "2d.json"), ("train+evaluate+2d+2d_evaluate", "2d_evaluate.json")):
        if (BUNDLE / "configs" / "profiles" / profile).is_file():
            assert f"PASS workflow {name}:" in res.stdout, name
    assert "FAIL" not in res.stdout and "ALL CHECKS PASSED" in res.stdout


def test_the_metadata_checks_need_no_network(offline, tmp_path):
    # the block works: where the schema file is absent, MONAI's verify_metadata tries to download it, and fails
    absent = tmp_path / "absent" / "schema.json"
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                          str(BUNDLE / "configs" / "metadata.json"), "--filepath", str(absent)],
                         capture_output=True, text=True, check=False, env=offline)  # fmt: skip
    assert res.returncode != 0 and BLOCKED in res.stdout + res.stderr, res.stderr[-2000:]
    assert check_metadata(BUNDLE) == f"valid against {SHIPPED_SCHEMA}"
    assert check_metadata_2d(BUNDLE) == f"valid against {SHIPPED_SCHEMA}"


def test_bundle_meta_schema_overrides_the_shipped_schema(offline, tmp_path, monkeypatch):
    stricter = json.loads(SHIPPED_SCHEMA.read_text())
    stricter["required"].append("no_such_key")  # no metadata has it: only this schema fails ours
    path = tmp_path / "stricter.json"
    path.write_text(json.dumps(stricter))
    monkeypatch.setenv(SCHEMA_ENV, str(path))
    with pytest.raises(CheckFailed, match="verify_metadata` exited with 1"):
        check_metadata(BUNDLE)
    assert check_metadata(BUNDLE, schema=str(SHIPPED_SCHEMA)) == f"valid against {SHIPPED_SCHEMA}"  # --schema wins
    monkeypatch.setenv(SCHEMA_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(CheckFailed, match=rf"\${SCHEMA_ENV}=.*missing.json cannot be read"):
        check_metadata(BUNDLE)


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
    from monai.bundle import ConfigParser

    yml = BUNDLE / "large_files.yml"
    content = ConfigParser.load_config_file(yml)
    assert [e["path"] for e in content["large_files"]] == [e["path"] for e in read_large_files(yml)]
    bundle = _copy_bundle(tmp_path)
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_verify_fails_on_2d_metadata_with_a_3d_shape(tmp_path, meta_schema):
    """The 2D checks run after the 3D ones; a 3D spatial_shape in metadata_2d.json passes the schema and fails the
    2D network's input check (the 2D network refuses a 5-D input)."""
    bundle = _copy_bundle(tmp_path)
    meta_path = bundle / "configs" / META_2D
    meta = json.loads(meta_path.read_text())
    for tensor in (meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]):
        tensor["spatial_shape"] = [64, 64, 32]
    meta_path.write_text(json.dumps(meta, indent=4))
    ok, out = _verify(bundle, meta_schema)
    assert not ok
    for check in ("ckpt_export", "verify_metadata 2d", "changelog 2d"):
        assert f"PASS {check}:" in out, check
    fail = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].startswith("FAIL verify_net_in_out 2d:"), out
    assert "PASS ckpt_export 2d" not in out and "PASS workflow" not in out, "verification stops at the first failure"


def test_2d_checks_run_only_where_the_2d_configuration_is_shipped(tmp_path):
    bundle = _copy_bundle(tmp_path)
    assert [n for n, _ in _checks(bundle)] == [n for n, _ in CHECKS] + list(CHECK_NAMES_2D)
    assert [n for n, _ in CHECKS_2D] == list(CHECK_NAMES_2D)
    (bundle / "configs" / "profiles" / "2d_inference.json").unlink()
    assert [n for n, _ in _checks(bundle)] == [n for n, _ in CHECKS]


def test_2d_metadata_needs_the_main_version(tmp_path):
    bundle = _copy_bundle(tmp_path)
    main = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert check_changelog_2d(bundle) == f"version {main} is in the changelog"
    meta_path = bundle / "configs" / META_2D
    meta = json.loads(meta_path.read_text())
    meta["version"] = "0.1.0"  # in the changelog, but not the bundle's version
    meta_path.write_text(json.dumps(meta, indent=4))
    with pytest.raises(CheckFailed, match=rf"version '0.1.0' differs from metadata.json's '{main}'"):
        check_changelog_2d(bundle)


def _profile(cfg: Path, name: str, content: dict) -> None:
    (cfg / "profiles" / name).write_text(json.dumps(content))


def test_2d_workflow_stacks(tmp_path):
    """The 2D profiles are stacked only as the 2D stacks (each where its files exist), a data-set overlay last on
    each of them, and neither is stacked as a hardware profile on train.json or inference.json alone."""
    cfg = tmp_path / "configs"
    (cfg / "profiles").mkdir(parents=True)
    (cfg / "variants").mkdir()
    for name in ("train.json", "inference.json"):
        (cfg / name).write_text("{}")
    _profile(cfg, "gpu.json", {"features": 32})
    _profile(cfg, "2d_inference.json", {"spatial_dims": 2})
    _profile(cfg, "ds.json", {"settings_help#dataset_ds": "a data set", "in_channels": 3})
    stacks = {name: (files, kind, extra) for name, files, kind, extra in _stacks(tmp_path)}
    assert stacks["inference+2d_inference"] == (["inference.json", "profiles/2d_inference.json"], "infer", {"dims": 2})
    assert stacks["inference+2d_inference+profiles/ds.json"][0][-1] == "profiles/ds.json"
    assert "train+profiles/gpu.json" in stacks and "inference+profiles/gpu.json" in stacks
    assert [n for n in stacks if "ds.json" in n] == ["inference+2d_inference+profiles/ds.json"]
    assert [n for n in stacks if "2d_inference" in n] == [
        "inference+2d_inference",
        "inference+2d_inference+profiles/ds.json",
    ]
    assert "train+2d" not in stacks and "train+evaluate+2d+2d_evaluate" not in stacks  # their profiles are absent
    _profile(cfg, "2d.json", {"spatial_dims": 2})
    _profile(cfg, "2d_evaluate.json", {})
    (cfg / "evaluate.json").write_text("{}")
    stacks = {name: (files, kind) for name, files, kind, _ in _stacks(tmp_path)}
    assert stacks["train+2d"] == (["train.json", "profiles/2d.json"], "train")
    expected = ["train.json", "evaluate.json", "profiles/2d.json", "profiles/2d_evaluate.json", "profiles/ds.json"]
    assert stacks["train+evaluate+2d+2d_evaluate+profiles/ds.json"] == (expected, "train")
    assert sorted(n for n in stacks if "profiles/" in n and "2d" not in n) == [
        "inference+profiles/gpu.json",
        "train+profiles/gpu.json",
    ]
