"""Shared pytest setup: make the bundle's ``scripts`` package importable as MONAI's ``run`` does; the metadata
schema (shipped in ``tools/schemas/``); the skip marks of the tests that run system tools; the ``FAIRDRO_NO_SKIP``
switch (``no_skip.py``)."""

import functools
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"

if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))
# the DICOM node's package (deploy/dicom_node), as PYTHONPATH=bundle:deploy gives `python -m dicom_node`
if str(REPO_ROOT / "deploy") not in sys.path:
    sys.path.insert(1, str(REPO_ROOT / "deploy"))

# the repository tools that the tests share: the schema lookup and the system tools' list
if str(REPO_ROOT / "tools") not in sys.path:
    sys.path.append(str(REPO_ROOT / "tools"))

import system_tools  # noqa: E402
from bundle_schema import meta_schema_path  # noqa: E402

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


@functools.cache
def _system_packages() -> list:
    return system_tools.read_packages()


def tool_skip_reason(command: str) -> str | None:
    """``None`` where ``command`` is on ``PATH``; else why a test that runs it skips, naming the one command that
    installs every missing system tool (``tools/system-packages.txt``).

    Raises:
        ValueError: ``command`` is not in ``tools/system-packages.txt`` (``make test`` would never install it).
    """
    packages = _system_packages()
    package = system_tools.package_of(command, packages)
    if shutil.which(command):
        return None
    return (
        f"{command} is not installed (Debian package {package.name}); `make test` installs it as root or with "
        f"passwordless sudo, here run: {system_tools.install_command(system_tools.missing(packages))}"
    )


def needs_tool(command: str) -> pytest.MarkDecorator:
    """A ``skipif`` mark for a test that runs ``command``, a system tool of ``tools/system-packages.txt``."""
    reason = tool_skip_reason(command)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def pytest_configure(config: pytest.Config) -> None:
    # FAIRDRO_NO_SKIP=1 (.ci/run): any skipped test fails the run
    config.pluginmanager.import_plugin("no_skip")


@pytest.fixture(scope="session")
def meta_schema() -> Path:
    """Path of the metadata schema: ``$BUNDLE_META_SCHEMA``, else the copy shipped in ``tools/schemas/``; an error
    (never a skip) when that file is missing or not a schema."""
    return meta_schema_path()
