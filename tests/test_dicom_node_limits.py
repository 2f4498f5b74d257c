"""The node on a hostile network: pending-connection and association limits, their refusals (one log line and one
``fairdro_node_refusals_total{cause}`` each), per-association / per-series transfer limits, the failed/ cap and the
default work_dir. Loopback only (127.0.0.1 and 127.0.0.2); every wait is bounded."""

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import pydicom
import pytest
from dicom_node import DicomNodeError
from dicom_node.limits import Limits
from dicom_node.settings import default_work_dir
from dicom_node.storage import Retention
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_dicom_node import NODE_CONFIG, REPO, _node, _wait, build_cohort

sys.path.insert(0, str(REPO / "tools"))
from pacs import closed_by_peer  # noqa: E402

OTHER_HOST = "127.0.0.2"
LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service provider (presentation), local limit exceeded
UNKNOWN_AET = (0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE title not recognised


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("node_limits_cohort"))


def _associate(port, calling="SCU", source="127.0.0.1", contexts=(Verification,)):
    ae = AE(calling)
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title="FAIRDRO", bind_address=(source, 0))


def _rejection(assoc) -> tuple[int, int, int] | None:
    if not assoc.is_rejected:
        return None
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def _silent(port, source=OTHER_HOST) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.settimeout(5)
    return sock


def _metric(node, cause: str) -> float:
    for line in node.metrics.render().decode().splitlines():
        if line.startswith(f'fairdro_node_refusals_total{{cause="{cause}"}} '):
            return float(line.split()[-1])
    return 0.0


def _refusal_lines(caplog, cause: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"(cause={cause})" in r.getMessage()]


def test_limits_defaults_match_the_config_and_bad_values_are_refused():
    config = json.loads(NODE_CONFIG.read_text())
    assert Limits.parse(config["limits"]) == Limits()
    assert config["node"]["limits"] == "@limits"
    assert Limits.parse({"max_associations": "3"}).max_associations == 3
    for bad in ({"max_associations": 0}, {"pending_timeout_seconds": -1}, {"max_pdu_size": "x"}, {"nope": 1}):
        with pytest.raises(DicomNodeError, match="limits"):
            Limits.parse(bad)


def test_default_work_dir_is_a_state_folder_outside_the_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_work_dir() == tmp_path / "state" / "fairdro-node"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_work_dir() == tmp_path / "home" / ".local" / "state" / "fairdro-node"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_work_dir() == Path("/var/lib/fairdro-node")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    node = _node(tmp_path, "x.pt", work_dir=None)  # the config's null
    assert node.work_dir == tmp_path / "state" / "fairdro-node"
    assert REPO not in node.work_dir.parents
    assert _node(tmp_path, "x.pt", work_dir=str(tmp_path / "site")).work_dir == tmp_path / "site"  # site file


def test_pending_connections_have_their_own_limit_and_timeout(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    limits = {"max_pending_per_host": 3, "pending_timeout_seconds": 1.5, "max_associations": 1}
    node = _node(tmp_path, "x.pt", limits=limits, min_free_bytes=0)
    node.start()
    held = []
    try:
        held = [_silent(node.port) for _ in range(3)]
        assert _wait(lambda: node.receiver.gate.counts()["pending"] == 3, 5)
        extra = _silent(node.port)
        assert closed_by_peer(extra, 2), "a 4th pending connection from the same host is closed at once"
        # pending connections do not count toward max_associations (1): a sender from another host associates
        assoc = _associate(node.port)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        started = time.monotonic()
        assert all(closed_by_peer(s, 4) for s in held), "silent connections are closed at the pending timeout"
        assert 1.0 <= time.monotonic() - started <= 3.5
        assert _wait(lambda: node.receiver.gate.counts()["pending"] == 0, 5)
        junk = _silent(node.port)
        junk.sendall(b"\x09\x00\x00\x00\x00\x04abcd")  # PDU type 9 does not exist
        assert closed_by_peer(junk, 4)
        assert _wait(lambda: _metric(node, "malformed_pdu") == 1, 5)
        assert _wait(lambda: _metric(node, "pending_timeout") == 3, 5)
        assert _metric(node, "pending_limit_per_host") == 1
        assert len(_refusal_lines(caplog, "pending_limit_per_host")) == 1
        assert len(_refusal_lines(caplog, "pending_timeout")) == 3
        assert "127.0.0.2" in _refusal_lines(caplog, "malformed_pdu")[0]
        assert node.receiver.gate.counts() == {"pending": 0, "active": 0}
    finally:
        for sock in held:
            sock.close()
        node.stop()


def test_association_limits_reject_with_local_limit_exceeded(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    limits = {"max_associations": 2, "max_associations_per_host": 1, "acse_timeout_seconds": 5}
    node = _node(tmp_path, "x.pt", limits=limits, min_free_bytes=0)
    node.start()
    open_assocs = []
    try:
        first = _associate(node.port)
        open_assocs.append(first)
        assert first.is_established
        assert _rejection(_associate(node.port)) == LOCAL_LIMIT  # per host
        second = _associate(node.port, source=OTHER_HOST)
        open_assocs.append(second)
        assert second.is_established
        assert _rejection(_associate(node.port, source="127.0.0.3")) == LOCAL_LIMIT  # total
        assert _rejection(_associate(node.port, calling="INTRUDER", source="127.0.0.3")) == UNKNOWN_AET
        # the open associations keep working; once one is released a new one is accepted
        assert first.send_c_echo().Status == 0 and second.send_c_echo().Status == 0
        open_assocs.pop(0).release()
        assert _wait(lambda: node.receiver.gate.counts()["active"] == 1, 5)
        third = _associate(node.port)
        open_assocs.append(third)
        assert third.is_established
        expected = {"association_limit_per_host": 1, "association_limit": 1, "unknown_calling_aet": 1}
        for cause, count in expected.items():
            assert _metric(node, cause) == count, cause
            assert len(_refusal_lines(caplog, cause)) == count, cause
        assert "INTRUDER" in _refusal_lines(caplog, "unknown_calling_aet")[0]
        assert node.status()["refusals"] == expected
    finally:
        for assoc in open_assocs:
            assoc.release()
        node.stop()


def _renamed(datasets):
    """A copy of a series with new series and instance UIDs (a series the node has not seen)."""
    series_uid, copies = generate_uid(), []
    for ds in datasets:
        copy = pydicom.Dataset(ds)
        copy.file_meta = ds.file_meta
        copy.SeriesInstanceUID, copy.SOPInstanceUID = series_uid, generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        copies.append(copy)
    return copies


def _store(port, datasets) -> list[int]:
    assoc = _associate(port, contexts=[str(datasets[0].SOPClassUID)])
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_instance_limits_per_association_and_per_series(cohort, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    limits = {"max_instances_per_association": 3, "max_instances_per_series": 5}
    node = _node(tmp_path, cohort.ckpt, limits=limits, quiet_seconds=600, min_free_bytes=0)
    node.start()
    try:
        series = _renamed(cohort.series[0][:8])
        assert _store(node.port, series[:4]) == [0, 0, 0, 0xA700]  # 4th: over the association's limit
        assert _store(node.port, series[4:7]) == [0, 0, 0xA700]  # 6th of the series: over the series' limit
        spooled = node.work_dir / "spool" / str(series[0].SeriesInstanceUID)
        assert len(list(spooled.glob("*.dcm"))) == 5
        assert _metric(node, "instance_limit_association") == 1 and _metric(node, "instance_limit_series") == 1
        assert len(_refusal_lines(caplog, "instance_limit_series")) == 1
    finally:
        node.stop()
    byte_limit = {"max_bytes_per_series": len(series[0].PixelData) * 2}  # two instances fit, never three
    node = _node(tmp_path, cohort.ckpt, limits=byte_limit, quiet_seconds=600, min_free_bytes=0)
    node.start()
    try:
        assert _store(node.port, _renamed(cohort.series[1][:3])) == [0, 0xA700, 0xA700]
        assert _metric(node, "bytes_limit_series") == 2
    finally:
        node.stop()


def test_failed_folder_is_capped_oldest_first(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    results, failed = tmp_path / "results", tmp_path / "failed"
    results.mkdir()
    now = time.time()
    for i in range(5):  # failed/s0 is the oldest; each holds 1000 bytes of instances + its reason
        folder = failed / f"s{i}"
        folder.mkdir(parents=True)
        (folder / "a.dcm").write_bytes(b"x" * 1000)
        (folder / "reason.txt").write_text("r")
        os.utime(folder / "reason.txt", (now - 1000 + i, now - 1000 + i))
    lock = __import__("threading").Lock()
    by_count = Retention(results, failed, None, None, failed_cap=(3, 10**9))
    assert by_count.sweep(lambda _: False, lock) == ["failed/s0", "failed/s1"]
    by_bytes = Retention(results, failed, None, None, failed_cap=(100, 2100))  # 1001 bytes per series
    assert by_bytes.sweep(lambda _: False, lock) == ["failed/s2"]
    assert sorted(p.name for p in failed.iterdir()) == ["s3", "s4"]
    assert sum("over its cap" in r.getMessage() for r in caplog.records) == 3
