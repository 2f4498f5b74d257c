"""FAIRDRO_NO_SKIP=1 (tests/no_skip.py): every kind of skip fails the run, nothing else changes; .ci/run sets it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from no_skip import ENV_VAR

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

PASSING = "def test_ok():\n    assert True\n"
SKIPS = {
    "skipif mark": "import pytest\n\n@pytest.mark.skipif(True, reason='no tool')\ndef test_a():\n    pass\n",
    "skip in a test": "import pytest\n\ndef test_a():\n    pytest.skip('no tool')\n",
    "skip in a fixture": (
        "import pytest\n\n@pytest.fixture\ndef tool():\n    pytest.skip('no tool')\n\ndef test_a(tool):\n    pass\n"
    ),
    "importorskip at module level": (
        "import pytest\n\npytest.importorskip('no_such_module_xyz', reason='no tool')\n\ndef test_a():\n    pass\n"
    ),
    "skip at module level": "import pytest\n\npytest.skip('no tool', allow_module_level=True)\n",
}


def _pytest(tmp_path: Path, files: dict[str, str], value: str | None) -> subprocess.CompletedProcess:
    """pytest -p no_skip on ``files`` written into ``tmp_path`` (outside the repository: no conftest of ours)."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = str(HERE)
    if value is not None:
        env[ENV_VAR] = value
    cmd = [sys.executable, "-m", "pytest", "-p", "no_skip", "-p", "no:cacheprovider", "-q", "-rs", str(tmp_path)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", list(SKIPS))
def test_each_kind_of_skip_fails_the_run_only_when_asked(tmp_path, kind):
    files = {"test_ok.py": PASSING, "test_skip.py": SKIPS[kind]}
    plain = _pytest(tmp_path, files, None)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout
    strict = _pytest(tmp_path, files, "1")
    assert strict.returncode == 1, strict.stdout
    assert "1 passed, 1 skipped" in strict.stdout and "no tool" in strict.stdout  # still reported as a skip (-rs)
    assert f"{ENV_VAR}=1: 1 skipped test(s) or module(s) fail this run: test_skip.py" in strict.stdout


def test_a_run_without_skips_passes_and_xfail_is_not_a_skip(tmp_path):
    xfail = "import pytest\n\n@pytest.mark.xfail(reason='known', strict=True)\ndef test_x():\n    assert False\n"
    res = _pytest(tmp_path, {"test_ok.py": PASSING, "test_x.py": xfail}, "1")
    assert res.returncode == 0 and "1 passed, 1 xfailed" in res.stdout, res.stdout
    assert ENV_VAR not in res.stdout


def test_a_failure_stays_a_failure_and_zero_means_off(tmp_path):
    failing = "def test_bad():\n    assert False\n"
    res = _pytest(tmp_path, {"test_bad.py": failing, "test_skip.py": SKIPS["skip in a test"]}, "1")
    assert res.returncode == 1 and "1 failed, 1 skipped" in res.stdout, res.stdout
    res = _pytest(tmp_path, {"test_bad.py": "def test_bad():\n    pass\n"}, "0")
    assert res.returncode == 0 and "1 passed, 1 skipped" in res.stdout, res.stdout


def test_a_value_other_than_0_or_1_is_refused(tmp_path):
    res = _pytest(tmp_path, {"test_ok.py": PASSING}, "yes")
    assert res.returncode == pytest.ExitCode.USAGE_ERROR
    assert f"{ENV_VAR}='yes': use 1 (a skipped test fails the run) or 0" in res.stdout + res.stderr


def test_conftest_loads_the_switch(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("no_skip")


def test_ci_runs_make_test_first_with_skips_forbidden():
    """`.ci/run`: its first command is `FAIRDRO_NO_SKIP=1 make test`, and nothing in it installs a system tool (the
    Makefile's orthanc target installs Orthanc for test-pacs, after the tests)."""
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    commands = [c for c in commands if not c.startswith(("set ", "cd "))]
    assert commands[0] == f"{ENV_VAR}=1 make test", commands[:3]
    assert not [c for c in commands if "apt-get" in c or "sudo" in c]
