"""The soak's own check (bench/soak_pacs.py): passes on the committed result, fails on each kind of bad result."""

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

import soak_pacs  # noqa: E402

RESULT = REPO / "bench" / "results" / "pacs" / "soak_pacs.json"


@pytest.fixture(scope="module")
def result():
    if not RESULT.is_file():
        pytest.skip(f"{RESULT.relative_to(REPO)} not written yet (make soak-pacs)")
    return json.loads(RESULT.read_text())


def test_committed_soak_result_passes_its_check(result):
    assert soak_pacs.check(result) == []
    series = result["series"]
    assert series["delivered"] == series["acknowledged"] > 0 and series["undelivered"] == []
    assert result["sending_seconds"] >= 900 and result["tls"] is True


@pytest.mark.parametrize(
    "path, value, problem",
    [
        (("series", "delivered"), -1, "delivered"),
        (("series", "undelivered"), ["1.2.3"], "delivered"),
        (("series", "mixed"), 1, "mixed"),
        (("sending_seconds",), 899.0, "sending time"),
        (("tls",), False, "TLS"),
        (("faults", "kills"), [], "killed"),
        (("faults", "destination_outages"), [{"from_s": 10.0}], "outage"),
        (("instances", "a700"), 0, "floor"),
        (("node", "peak_rss_mib"), 0, "peak memory"),
    ],
)
def test_soak_check_fails_on_a_bad_result(result, path, value, problem):
    bad = copy.deepcopy(result)
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    problems = soak_pacs.check(bad)
    assert len(problems) == 1 and problem in problems[0], problems
