"""A pytest plugin: with ``FAIRDRO_NO_SKIP=1``, a session in which any test or module was skipped fails.

``.ci/run`` sets it, so CI fails where ``make test`` could not set up everything that the tests use. Every kind of
skip counts: a ``skipif`` mark, ``pytest.skip`` in a test or a fixture, and ``importorskip`` or ``pytest.skip`` at
module level. An expected failure (``xfail``) is not a skip. The skips are still reported as skips, with their
reasons under ``-rs``; only the exit status changes to 1, with one line at the end that says why. Loaded by
``tests/conftest.py``, or with ``pytest -p no_skip`` where ``tests/`` is on ``sys.path``.
"""

from __future__ import annotations

import os

import pytest

ENV_VAR = "FAIRDRO_NO_SKIP"


def no_skip_requested() -> bool:
    """``True`` for ``FAIRDRO_NO_SKIP=1``, ``False`` when it is unset, empty or ``0``.

    Raises:
        pytest.UsageError: any other value.
    """
    value = os.environ.get(ENV_VAR, "")
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{ENV_VAR}={value!r}: use 1 (a skipped test fails the run) or 0")
    return value == "1"


class NoSkip:
    """Collects the skipped tests and modules; fails a session that would otherwise pass when there is any."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skipped.append(report.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append(report.nodeid)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.skipped:
            shown = ", ".join(self.skipped[:10]) + (", ..." if len(self.skipped) > 10 else "")
            terminalreporter.write_line(
                f"{ENV_VAR}=1: {len(self.skipped)} skipped test(s) or module(s) fail this run: {shown}", red=True
            )


def pytest_configure(config: pytest.Config) -> None:
    if no_skip_requested():
        config.pluginmanager.register(NoSkip(), "fairdro-no-skip")
