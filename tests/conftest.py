"""Shared pytest setup: make the bundle's ``scripts`` package importable as MONAI's ``run`` does, and find the
metadata schema the way model-zoo's CI does."""

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"

if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))
# the DICOM node's package (deploy/dicom_node), as PYTHONPATH=bundle:deploy gives `python -m dicom_node`
if str(REPO_ROOT / "deploy") not in sys.path:
    sys.path.insert(1, str(REPO_ROOT / "deploy"))

CONFIGS = BUNDLE_ROOT / "configs"


def run_bundle_workflow(config_files, workflow_type, run_id, **override):
    """Run a bundle workflow from ``config_files`` (names under ``bundle/configs``) as ``monai.bundle run`` does:
    initialise, check that no required property is missing, run, finalise; returns the workflow."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in config_files], workflow_type=workflow_type, run_id=run_id, **override
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf


#: a local schema file chosen by the user; it wins over every other source
SCHEMA_ENV = "BUNDLE_META_SCHEMA"
#: the copy beside the repository on the development machines (no internet there)
OFFLINE_SCHEMA_DIR = REPO_ROOT.parent / "shared" / "monai"


def _schema_url() -> str:
    return json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text(encoding="utf-8"))["schema"]


def schema_cache_path(url: str) -> Path:
    """Where a downloaded schema is kept between runs: ``$XDG_CACHE_HOME/fairdro_bundle/<file name of the URL>``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fairdro_bundle" / url.rstrip("/").rsplit("/", 1)[-1]


def _is_schema(path: Path) -> bool:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "properties" in content


def _download(url: str, target: Path, timeout: float = 10.0) -> str | None:
    """Fetch ``url`` into ``target`` (only a JSON schema is kept); ``None`` on success, else why it failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the metadata's https URL)
            data = response.read()
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        return f"download of {url} failed ({e})"
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    if not _is_schema(part):
        part.unlink()
        return f"{url} did not return a JSON schema"
    part.replace(target)
    return None


def resolve_meta_schema(url: str | None = None) -> tuple[Path | None, str]:
    """Find the metadata schema: ``(path, how it was found)``, or ``(None, why none could be had)``.

    Order: the file named by ``$BUNDLE_META_SCHEMA``; the cache (``schema_cache_path``); the ``schema`` URL of
    ``metadata.json``, downloaded into the cache; the offline copy in ``../shared/monai/``.

    Raises:
        FileNotFoundError: ``$BUNDLE_META_SCHEMA`` is set but names no readable JSON schema.
    """
    chosen = os.environ.get(SCHEMA_ENV)
    if chosen:
        if not _is_schema(Path(chosen)):
            raise FileNotFoundError(f"{SCHEMA_ENV}={chosen} is not a readable JSON schema file; fix or unset it.")
        return Path(chosen), f"${SCHEMA_ENV}"
    url = url or _schema_url()
    cached = schema_cache_path(url)
    if _is_schema(cached):
        return cached, f"cache {cached}"
    failure = _download(url, cached)
    if failure is None:
        return cached, f"downloaded from {url}"
    offline = OFFLINE_SCHEMA_DIR / cached.name
    if _is_schema(offline):
        return offline, f"offline copy {offline}"
    return None, (
        f"metadata schema not available: {SCHEMA_ENV} is unset, no cached copy at {cached}, {failure}, "
        f"and no offline copy at {offline}"
    )


@pytest.fixture(scope="session")
def meta_schema() -> Path:
    """Path of the metadata schema; the test is skipped, naming every source tried, when there is none."""
    path, how = resolve_meta_schema()
    if path is None:
        pytest.skip(how)
    return path
