"""`make test`'s set-up of the system tools (tools/system_tools.py, tools/system-packages.txt) and the skip reasons
of the tests that run them (conftest.needs_tool), on a PATH of fake tools with a fake apt-get and sudo."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import system_tools
from system_tools import Package, ensure, read_packages

REPO = Path(__file__).resolve().parents[1]
PACKAGES = read_packages()
#: the tools that are missing in most tests below (the other packages' commands are present)
ABSENT = ("plastimatch", "dicom3tools")

#: apt-get: logs its arguments and DEBIAN_FRONTEND; "install" creates the listed packages' commands in its folder;
#: fails (exit 1, with an apt-like error) on its first FAKE_APT_FAILS calls
FAKE_APT = """#!{python}
import os, pathlib, sys
here = pathlib.Path(__file__).parent
log = here / "apt.log"
calls = len(log.read_text().splitlines()) if log.exists() else 0
with log.open("a") as f:
    f.write(" ".join(sys.argv[1:]) + " DEBIAN_FRONTEND=" + os.environ.get("DEBIAN_FRONTEND", "") + "\\n")
if calls < int(os.environ.get("FAKE_APT_FAILS", "0")):
    sys.exit("E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease")
if sys.argv[1] == "install":
    for name in sys.argv[2:]:
        for command in {provides}.get(name, []):
            (here / command).write_text("#!/bin/sh\\n")
            (here / command).chmod(0o755)
"""
#: sudo: `sudo -n true` succeeds only with FAKE_SUDO_OK=1; otherwise logs and runs its command (after -n)
FAKE_SUDO = """#!{python}
import os, pathlib, sys
args = sys.argv[2:] if sys.argv[1] == "-n" else sys.argv[1:]
if args == ["true"]:
    sys.exit(0 if os.environ.get("FAKE_SUDO_OK") == "1" else 1)
with (pathlib.Path(__file__).parent / "sudo.log").open("a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
os.execvp(args[0], args)
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """PATH = one folder holding every listed command except those of ABSENT, a fake apt-get and `env`; not root;
    no retry pause. Returns the folder (add `sudo` with ``_sudo``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for package in PACKAGES:
        if package.name not in ABSENT:
            for command in package.commands:
                _executable(bin_dir / command, "#!/bin/sh\n")
    provides = {p.name: list(p.commands) for p in PACKAGES}
    _executable(bin_dir / "apt-get", FAKE_APT.format(python=sys.executable, provides=json.dumps(provides)))
    (bin_dir / "env").symlink_to(shutil.which("env"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(system_tools, "RETRY_WAIT_S", 0.0)
    return bin_dir


def _sudo(bin_dir: Path) -> None:
    _executable(bin_dir / "sudo", FAKE_SUDO.format(python=sys.executable))


def _log(bin_dir: Path, name: str = "apt.log") -> list[str]:
    path = bin_dir / name
    return path.read_text().splitlines() if path.exists() else []


def _ensure() -> tuple[list[str], str]:
    out = io.StringIO()
    still = ensure(PACKAGES, out)
    return [p.name for p in still], out.getvalue()


INSTALL = "install -y --no-install-recommends -qq plastimatch dicom3tools DEBIAN_FRONTEND=noninteractive"
UPDATE = "update -qq DEBIAN_FRONTEND=noninteractive"


def test_the_list_is_the_set_that_ci_installed_and_covers_every_tool_the_tests_run():
    assert [p.name for p in PACKAGES] == ["plastimatch", "dicom3tools", "dcmtk", "libgdcm-tools", "g++"]
    for command in ("plastimatch", "dciodvfy", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv", "gdcmconv", "c++"):
        assert command in system_tools.package_of(command, PACKAGES).commands
    with pytest.raises(ValueError, match="'dcmdump' is not in system-packages.txt"):
        system_tools.package_of("dcmdump", PACKAGES)


def test_read_packages_skips_comments_and_refuses_a_package_without_command(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# header\n\ndcmtk  dcmcjpeg dcmconv  # why\ng++ c++\n")
    assert read_packages(path) == [Package("dcmtk", ("dcmcjpeg", "dcmconv")), Package("g++", ("c++",))]
    path.write_text("dcmtk dcmconv\nplastimatch   # the command forgotten\n")
    with pytest.raises(ValueError, match=r"list.txt:2: 'plastimatch' has no command"):
        read_packages(path)


def test_nothing_is_installed_when_every_tool_is_present(fake_bin):
    for command in ("plastimatch", "dciodvfy"):
        _executable(fake_bin / command, "#!/bin/sh\n")
    assert _ensure() == ([], "system tools: all present (" + ", ".join(c for p in PACKAGES for c in p.commands) + ")\n")
    assert _log(fake_bin) == []


def test_as_root_the_missing_packages_are_installed_with_apt_get(fake_bin, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    still, out = _ensure()
    assert still == [] and _log(fake_bin) == [UPDATE, INSTALL]
    assert out == "system tools: installing plastimatch dicom3tools with apt-get as root\nsystem tools: installed\n"
    assert shutil.which("dciodvfy") == str(fake_bin / "dciodvfy")


def test_with_passwordless_sudo_apt_get_runs_through_sudo(fake_bin, monkeypatch):
    _sudo(fake_bin)
    monkeypatch.setenv("FAKE_SUDO_OK", "1")
    still, out = _ensure()
    assert still == [] and "with apt-get with passwordless sudo" in out
    prefix = "-n env DEBIAN_FRONTEND=noninteractive apt-get"
    assert _log(fake_bin, "sudo.log") == [f"{prefix} update -qq", f"{prefix} {INSTALL.rsplit(' ', 1)[0]}"]
    assert _log(fake_bin) == [UPDATE, INSTALL]


def test_a_failed_apt_get_is_tried_once_more(fake_bin, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("FAKE_APT_FAILS", "1")
    assert _ensure()[0] == [] and _log(fake_bin) == [UPDATE, UPDATE, INSTALL]


def test_apt_get_failing_twice_reports_its_error_and_the_command(fake_bin, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("FAKE_APT_FAILS", "99")
    still, out = _ensure()
    assert still == list(ABSENT) and _log(fake_bin) == [UPDATE, UPDATE]
    assert "NOT INSTALLED: plastimatch (plastimatch), dicom3tools (dciodvfy): `apt-get update -qq` exited with 1" in out
    assert "E: Failed to fetch" in out
    assert out.rstrip().endswith("apt-get update && apt-get install -y --no-install-recommends plastimatch dicom3tools")


@pytest.mark.parametrize("sudo", ["asks for a password", "absent"])
def test_without_root_or_passwordless_sudo_it_says_once_which_command_would(fake_bin, sudo):
    if sudo != "absent":
        _sudo(fake_bin)  # FAKE_SUDO_OK unset: `sudo -n true` fails
    still, out = _ensure()
    assert still == list(ABSENT) and _log(fake_bin) == [] and _log(fake_bin, "sudo.log") == []
    assert out.count("NOT INSTALLED") == 1
    assert "this user is not root and has no passwordless sudo (sudo -n)" in out
    command = "sudo apt-get update && sudo apt-get install -y --no-install-recommends plastimatch dicom3tools"
    assert out.splitlines()[-1] == f"    {command}"


def test_without_apt_get_it_says_so(fake_bin):
    (fake_bin / "apt-get").unlink()
    still, out = _ensure()
    assert still == list(ABSENT) and "this machine has no apt-get" in out


def test_the_script_runs_before_the_venv_and_takes_no_arguments(fake_bin):
    python = shutil.which("python3", path=os.defpath) or sys.executable  # a Python outside the venv where there is one
    script = str(REPO / "tools" / "system_tools.py")
    for command in ("plastimatch", "dciodvfy"):  # every tool present: the same outcome as root or not
        _executable(fake_bin / command, "#!/bin/sh\n")
    res = subprocess.run([python, "-I", script], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.startswith("system tools: all present (plastimatch, dciodvfy"), res.stderr
    res = subprocess.run([python, "-I", script, "--yes"], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "takes no arguments, got --yes" in res.stderr


def test_the_skip_reason_names_the_package_and_the_command_that_installs_every_missing_tool(fake_bin):
    expected = (
        "dciodvfy is not installed (Debian package dicom3tools); `make test` installs it as root or with passwordless "
        "sudo, here run: sudo apt-get update && sudo apt-get install -y --no-install-recommends plastimatch dicom3tools"
    )
    assert conftest.tool_skip_reason("dciodvfy") == expected
    assert conftest.tool_skip_reason("dcmcjpeg") is None
    mark = conftest.needs_tool("dciodvfy")
    assert mark.args == (True,) and mark.kwargs["reason"] == expected
    assert conftest.needs_tool("gdcmconv").args == (False,)
    with pytest.raises(ValueError, match="'dcmdump' is not in system-packages.txt"):
        conftest.needs_tool("dcmdump")


def test_make_test_sets_up_the_tools_before_pytest():
    """`make -n test` (nothing runs): system_tools.py comes before the test run."""
    res = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = res.stdout.splitlines()
    tools = [i for i, line in enumerate(lines) if line.endswith("tools/system_tools.py")]
    tests = [i for i, line in enumerate(lines) if " -m pytest " in line]
    assert len(tools) == 1 and len(tests) == 1 and tools[0] < tests[0], lines
