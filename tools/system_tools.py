"""Install the system tools that the tests use (``tools/system-packages.txt``) where this machine allows it.

``make test`` runs this first. A package is installed when any of its commands is missing from ``PATH``: with
apt-get as root, or with ``sudo -n`` (passwordless sudo); apt-get is tried twice, ``RETRY_WAIT_S`` apart. Where it
cannot install them (no root and no passwordless sudo, no apt-get, or apt-get failed), it says so once, with the one
command that installs them. The tests that need a missing tool then skip, and ``tests/conftest.py`` (``needs_tool``)
puts the same command into each skip reason. It does not fail ``make test`` itself; CI sets ``FAIRDRO_NO_SKIP=1``,
which fails the run on any skip. Standard library only (it runs before the venv exists)::

    python3 tools/system_tools.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

PACKAGE_LIST = Path(__file__).resolve().with_name("system-packages.txt")
#: apt-get tries (update, then install) and the pause between them, for a mirror that fails once
ATTEMPTS = 2
RETRY_WAIT_S = 10.0
#: the apt-get options of every install, the printed command's included
INSTALL_ARGS = ("install", "-y", "--no-install-recommends")


@dataclass(frozen=True)
class Package:
    """A Debian package and the commands of it that the tests run."""

    name: str
    commands: tuple[str, ...]


def read_packages(path: Path = PACKAGE_LIST) -> list[Package]:
    """The packages of ``path``: one ``<package> <command> [<command> ...]`` per line, ``#`` starts a comment.

    Raises:
        ValueError: a line names a package but no command.
    """
    packages = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if len(fields) == 1:
            raise ValueError(f"{path}:{number}: {fields[0]!r} has no command; write '<package> <command> ...'")
        if fields:
            packages.append(Package(fields[0], tuple(fields[1:])))
    return packages


def missing(packages: list[Package]) -> list[Package]:
    """The packages with at least one command that is not on ``PATH``."""
    return [p for p in packages if not all(shutil.which(c) for c in p.commands)]


def package_of(command: str, packages: list[Package]) -> Package:
    """The package that provides ``command``.

    Raises:
        ValueError: no package of the list provides it.
    """
    for package in packages:
        if command in package.commands:
            return package
    raise ValueError(f"{command!r} is not in {PACKAGE_LIST.name}; add '<debian package> {command}' there.")


def install_command(packages: list[Package]) -> str:
    """The one shell command that installs ``packages``, with ``sudo`` unless this process is root."""
    sudo = "" if os.geteuid() == 0 else "sudo "
    names = " ".join(p.name for p in packages)
    return f"{sudo}apt-get update && {sudo}apt-get {' '.join(INSTALL_ARGS)} {names}"


def apt_prefix() -> tuple[list[str] | None, str]:
    """How this process can run apt-get: ``(argv prefix, how)``, or ``(None, why it cannot)``."""
    if shutil.which("apt-get") is None:
        return None, "this machine has no apt-get"
    if os.geteuid() == 0:
        return ["apt-get"], "as root"
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"], "with passwordless sudo"
    return None, "this user is not root and has no passwordless sudo (sudo -n)"


def apt_install(prefix: list[str], names: list[str]) -> str | None:
    """``apt-get update`` and ``apt-get install`` of ``names``, ``ATTEMPTS`` tries; ``None``, else the last error."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [[*prefix, "update", "-qq"], [*prefix, *INSTALL_ARGS, "-qq", *names]]
    error = None
    for attempt in range(1, ATTEMPTS + 1):
        for step in steps:
            res = subprocess.run(step, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
                error = f"`{' '.join(step)}` exited with {res.returncode} ({tail})"
                break
        else:
            return None
        if attempt < ATTEMPTS:
            time.sleep(RETRY_WAIT_S)
    return error


def ensure(packages: list[Package], out: TextIO) -> list[Package]:
    """Install the missing ``packages`` where allowed, report on ``out``; returns those still missing."""
    absent = missing(packages)
    if not absent:
        print(f"system tools: all present ({', '.join(c for p in packages for c in p.commands)})", file=out)
        return []
    prefix, how = apt_prefix()
    if prefix is not None:
        print(f"system tools: installing {' '.join(p.name for p in absent)} with apt-get {how}", file=out, flush=True)
        error = apt_install(prefix, [p.name for p in absent])
        absent = missing(packages)
        if not absent:
            print("system tools: installed", file=out)
            return []
        how = error or f"apt-get ran but {', '.join(c for p in absent for c in p.commands)} are still not on PATH"
    tools = ", ".join(f"{p.name} ({' '.join(p.commands)})" for p in absent)
    print(
        f"system tools: NOT INSTALLED: {tools}: {how}.\n"
        "  The tests that use them will skip, each naming this command; to install them run:\n"
        f"    {install_command(absent)}",
        file=out,
        flush=True,
    )
    return absent


def main(argv: list[str] | None = None) -> int:
    if argv:
        print(f"usage: python3 tools/system_tools.py (takes no arguments, got {' '.join(argv)})", file=sys.stderr)
        return 2
    try:
        packages = read_packages()
    except (OSError, ValueError) as e:
        print(f"system tools: {e}", file=sys.stderr)
        return 2
    ensure(packages, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
