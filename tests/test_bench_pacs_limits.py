"""bench_pacs raises the node's association limits to the size of its burst (N series from one Orthanc at once)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

from bench_pacs import burst_limits  # noqa: E402
from dicom_node.limits import Limits  # noqa: E402 (deploy/ is on the path: tests/conftest.py)


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, {"max_associations": 16, "max_associations_per_host": 8}),  # the documented defaults, unchanged
        (8, {"max_associations": 16, "max_associations_per_host": 8}),
        (10, {"max_associations": 16, "max_associations_per_host": 10}),  # make bench-pacs: 10 at once
        (20, {"max_associations": 20, "max_associations_per_host": 20}),
    ],
)
def test_burst_limits_raise_only_what_is_below_the_burst(n, expected):
    assert burst_limits(n) == expected


def test_burst_limits_start_from_the_node_defaults_and_parse():
    defaults = Limits()
    assert burst_limits(1) == {
        "max_associations": defaults.max_associations,
        "max_associations_per_host": defaults.max_associations_per_host,
    }
    parsed = Limits.parse(burst_limits(12))
    assert (parsed.max_associations, parsed.max_associations_per_host) == (16, 12)
    assert parsed.max_pending_connections == defaults.max_pending_connections  # the others keep their defaults
