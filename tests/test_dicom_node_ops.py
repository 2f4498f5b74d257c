"""The DICOM node in operation: disk floor (0xA700, resume), retention, owner-only folders, health and metrics,
warm and cold inference."""

import json
import logging
import os
import shutil
import socket
import stat
import sys
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_node import DicomNodeError
from dicom_node.cli import read_settings
from dicom_node.inference import BundleInference
from dicom_node.sender import Outbox
from dicom_node.storage import Retention
from prometheus_client.parser import text_string_to_metric_families
from test_dicom_node import CONFIGS, FAST_RETRY, NODE_CONFIG, REPO, Receiver, _node, _send, _uid, _wait, build_cohort

OUT_OF_RESOURCES = 0xA700
DAY = 86400.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("node_ops_cohort"))


def _records(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node") and r.levelno == level]


# ---------------------------------------------------------------------------------------------- disk floor


def test_below_the_disk_floor_instances_get_a700_and_work_resumes_when_space_returns(cohort, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    series_a, series_b = cohort.series[0], cohort.series[1]
    receiver = Receiver()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}
    node = _node(tmp_path, cohort.ckpt, destinations=[dest], min_free_bytes=10_000_000, housekeeping_seconds=0.2)
    free = {"bytes": 5_000_000}  # below the floor
    node.disk.probe = lambda: free["bytes"]
    node.start()
    try:
        # the association is accepted; every instance is answered 0xA700 and nothing reaches the disk
        assert _send(node.port, series_a) == [OUT_OF_RESOURCES] * len(series_a)
        assert node.status()["disk_refused"] == len(series_a) and node.status()["stored"] == 0
        assert not any((node.work_dir / "spool").iterdir())
        errors = _records(caplog, logging.ERROR)
        assert sum(m.startswith("Instance ") and "answered 0xA700" in m for m in errors) == len(series_a)
        assert any("below min_free_bytes" in m for m in errors)

        # space returns: the same series is stored, processed and delivered
        free["bytes"] = 50_000_000
        assert _send(node.port, series_a) == [0] * len(series_a)
        assert node.wait_idle(180), node.status()
        assert len(receiver.rtstructs(_uid(series_a))) == 1

        # a series stored above the floor, then the floor is crossed before it is complete: it waits, then resumes
        assert _send(node.port, series_b) == [0] * len(series_b)
        free["bytes"] = 1_000
        time.sleep(node.quiet_seconds + 2.0)
        status = node.status()
        assert status["processed"] == 1 and status["queued"] == 1 and status["below_disk_floor"], status
        assert (node.work_dir / "spool" / _uid(series_b)).is_dir()
        free["bytes"] = 50_000_000
        assert node.wait_idle(180), node.status()
        assert len(receiver.rtstructs(_uid(series_b))) == 1 and node.status()["processed"] == 2
        assert any("above min_free_bytes again" in m for m in _records(caplog, logging.INFO))
    finally:
        node.stop()
        receiver.stop()


def test_work_folders_are_owner_only(cohort, tmp_path):
    node = _node(tmp_path, cohort.ckpt, quiet_seconds=3600, min_free_bytes=0)
    node.work_dir.mkdir()
    os.chmod(node.work_dir, 0o755)  # an existing, too open work_dir is tightened
    node.start()
    try:
        series = cohort.series[0]
        assert _send(node.port, series[:3]) == [0] * 3
        spooled = node.work_dir / "spool" / _uid(series)
        folders = [node.work_dir, *(node.work_dir / n for n in ("spool", "processing", "results", "failed")), spooled]
        for folder in folders:  # no other user may list or open anything below them
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    finally:
        node.stop()


# ----------------------------------------------------------------------------------------------- retention


def _result(root, uid, destinations, age_days, now):
    folder = root / "results" / uid
    folder.mkdir(parents=True)
    if destinations is None:
        (folder / "delivery.json").write_text("{not json")
    else:
        record = {"destinations": {f"D{i}@h:1": {"done": done} for i, done in enumerate(destinations)}}
        (folder / "delivery.json").write_text(json.dumps(record))
    os.utime(folder / "delivery.json", (now - age_days * DAY, now - age_days * DAY))
    return folder


def test_retention_never_removes_an_undelivered_result(tmp_path):
    now = time.time()
    (tmp_path / "results").mkdir()
    (tmp_path / "failed").mkdir()
    expired = _result(tmp_path, "1.1", [True, True], 40, now)
    undelivered = _result(tmp_path, "1.2", [True, False], 400, now)
    pending = _result(tmp_path, "1.3", [True], 400, now)  # done on disk but still in the sender's outbox
    recent = _result(tmp_path, "1.4", [True], 10, now)
    unreadable = _result(tmp_path, "1.5", None, 400, now)
    failed = tmp_path / "failed" / "1.6"
    failed.mkdir()
    (failed / "reason.txt").write_text("refused")
    os.utime(failed / "reason.txt", (now - 400 * DAY, now - 400 * DAY))
    outbox = Outbox()

    keep_failed = Retention(tmp_path / "results", tmp_path / "failed", 30, None)
    removed = keep_failed.sweep(lambda uid: uid == "1.3", outbox.lock, now=now)
    assert removed == ["results/1.1"]
    assert not expired.exists()
    assert all(p.is_dir() for p in (undelivered, pending, recent, unreadable, failed))

    expire_failed = Retention(tmp_path / "results", tmp_path / "failed", 30, 365)
    assert expire_failed.sweep(lambda uid: False, outbox.lock, now=now) == ["results/1.3", "failed/1.6"]
    assert all(p.is_dir() for p in (undelivered, recent, unreadable))
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="retention_days"):
        Retention(tmp_path / "results", tmp_path / "failed", -1, None)


def test_live_node_keeps_undelivered_results_and_reports_their_age(cohort, tmp_path):
    series = cohort.series[2]
    uid = _uid(series)
    holder = socket.socket()  # the destination is down: a bound port that does not listen
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": port}
    node = _node(tmp_path, cohort.ckpt, destinations=[dest], retention_days=0, housekeeping_seconds=0.2,
                 min_free_bytes=0, retry=FAST_RETRY)  # fmt: skip
    node.start()
    receiver = None
    try:
        assert _send(node.port, series) == [0] * len(series)
        assert _wait(lambda: node.status()["retries"] >= 3, 120), node.status()
        status = node.status()
        assert status["undelivered"] == 1 and status["undelivered_oldest_age_seconds"] > 0
        assert (node.work_dir / "results" / uid / f"RS_{uid}.dcm").is_file(), "retention removed an undelivered result"
        holder.close()
        receiver = Receiver(port)
        assert node.wait_idle(60), node.status()
        assert len(receiver.rtstructs(uid)) == 1
        # delivered, and retention_days 0: removed by the next sweep
        assert _wait(lambda: not (node.work_dir / "results" / uid).exists(), 10)
        assert node.status()["undelivered"] == 0
    finally:
        node.stop()
        holder.close()
        if receiver is not None:
            receiver.stop()


# ------------------------------------------------------------------------------------------ health, metrics


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _metrics(port) -> dict[str, float]:
    code, text = _get(port, "/metrics")
    assert code == 200
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_health_and_metrics_endpoint_counts_what_was_sent(cohort, tmp_path):
    sent = cohort.series[:2]
    receiver = Receiver()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}
    node = _node(tmp_path, cohort.ckpt, destinations=[dest], min_free_bytes=1000, health={"enabled": True, "port": 0})
    free = {"bytes": 10**12}
    node.disk.probe = lambda: free["bytes"]
    node.start()
    try:
        port = node.health.port
        assert node.health.settings.bind_address == "127.0.0.1"
        assert _get(port, "/livez")[0] == 200
        code, body = _get(port, "/readyz")
        assert code == 200 and json.loads(body)["checks"] == {
            "listening": True, "worker_alive": True, "disk_above_floor": True}  # fmt: skip
        for datasets in sent:
            assert _send(node.port, datasets) == [0] * len(datasets)
        during = _metrics(port)  # scraped while the series are still being received / processed
        assert during["fairdro_node_instances_received_total"] == sum(len(s) for s in sent)
        assert node.wait_idle(240), node.status()
        after = _metrics(port)
    finally:
        free["bytes"] = 10  # below the floor: not ready, still alive
        code, body = _get(node.health.port, "/readyz")
        live = _get(node.health.port, "/livez")[0]
        node.stop()
        receiver.stop()
    assert code == 503 and json.loads(body)["checks"]["disk_above_floor"] is False and live == 200
    assert after["fairdro_node_instances_received_total"] == sum(len(s) for s in sent)
    assert after["fairdro_node_series_completed_total"] == len(sent)
    assert after["fairdro_node_series_delivered_total"] == len(receiver.received) == len(sent)
    assert after["fairdro_node_series_failed_total"] == 0 and after["fairdro_node_delivery_retries_total"] == 0
    assert after["fairdro_node_series_latency_seconds_count"] == len(sent)
    # latency runs from the last instance acknowledged: at least the quiet time, at most this test's run time
    assert node.quiet_seconds * len(sent) <= after["fairdro_node_series_latency_seconds_sum"] < 240 * len(sent)
    assert after["fairdro_node_queue_length"] == 0 and after["fairdro_node_undelivered_results"] == 0
    # warm (the default): one inference workflow built for both series, no checkpoint change seen
    assert after["fairdro_node_inference_builds"] == 1 and after["fairdro_node_checkpoint_reloads"] == 0


# ------------------------------------------------------------------------------------------ warm inference

BUNDLE_MODEL = REPO / "bundle" / "models" / "model.pt"
INFERENCE_CONFIGS = [CONFIGS / "inference.json", CONFIGS / "inference_dicom.json"]


@pytest.fixture(scope="module")
def model_series(cohort, tmp_path_factory):
    """Three of the cohort's series as spool-like folders (<series uid>/<sop uid>.dcm), for the bundle's model."""
    root = tmp_path_factory.mktemp("warm_series")
    folders = []
    for datasets in cohort.series[:3]:
        folder = root / _uid(datasets)
        folder.mkdir()
        for ds in datasets:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")
        folders.append(folder)
    return folders


def _infer(inference, folder, out_root, subgroup=None):
    """Run one series into ``out_root/<uid>``; returns its mask array and RTSTRUCT contour points per ROI."""
    out = out_root / folder.name
    out.mkdir(parents=True)
    inference.run(folder, out, subgroup)
    mask = np.asarray(nib.load(out / f"{folder.name}_seg.nii.gz").dataobj)
    rtstruct = pydicom.dcmread(out / f"RS_{folder.name}.dcm")
    contours = [
        [[float(v) for v in c.ContourData] for c in getattr(roi, "ContourSequence", [])]
        for roi in rtstruct.ROIContourSequence
    ]
    return mask, contours


def test_warm_inference_builds_once_and_matches_cold(model_series, tmp_path):
    ckpt = tmp_path / "model.pt"
    shutil.copy(BUNDLE_MODEL, ckpt)
    overrides = {"ckpt_path": str(ckpt)}
    cold = BundleInference(INFERENCE_CONFIGS, overrides, cold=True)
    warm = BundleInference(INFERENCE_CONFIGS, overrides)
    subgroups = ["T3", None]  # the per-series subgroup reaches the kept network too
    path_entries = len(sys.path)
    expected = [_infer(cold, f, tmp_path / "cold", s) for f, s in zip(model_series[:2], subgroups, strict=True)]
    got = [_infer(warm, f, tmp_path / "warm", s) for f, s in zip(model_series[:2], subgroups, strict=True)]
    assert (cold.builds, warm.builds, warm.reloads) == (2, 1, 0)
    assert len(sys.path) == path_entries  # ConfigWorkflow.run's sys.path entry is not repeated per series
    for (mask_c, contours_c), (mask_w, contours_w) in zip(expected, got, strict=True):
        assert mask_c.any() and sum(map(len, contours_c)) > 0  # a real segmentation, not an empty one
        assert np.array_equal(mask_w, mask_c) and contours_w == contours_c


def test_warm_inference_reloads_a_changed_checkpoint(model_series, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ckpt = tmp_path / "model.pt"
    shutil.copy(BUNDLE_MODEL, ckpt)
    warm = BundleInference(INFERENCE_CONFIGS, {"ckpt_path": str(ckpt)})
    before, _ = _infer(warm, model_series[0], tmp_path / "before")
    state = torch.load(ckpt, weights_only=True)
    state["head.conv.bias"] += torch.tensor([-1.0, 1.0])  # favours the CTV: a visibly larger mask
    torch.save(state, ckpt)  # rewritten in place: same path, same size
    after = _infer(warm, model_series[0], tmp_path / "after")
    assert (warm.builds, warm.reloads) == (2, 1)
    assert any("changed" in r.getMessage() and str(ckpt) in r.getMessage() for r in caplog.records)
    reference = _infer(BundleInference(INFERENCE_CONFIGS, {"ckpt_path": str(ckpt)}, cold=True),
                       model_series[0], tmp_path / "cold")  # fmt: skip
    assert np.array_equal(after[0], reference[0]) and after[1] == reference[1]
    assert after[0].sum() > before.sum()
    _infer(warm, model_series[1], tmp_path / "unchanged")
    assert (warm.builds, warm.reloads) == (2, 1)  # unchanged since the reload: kept


def test_cold_setting_from_cli_and_config(tmp_path):
    base = ["--config", str(NODE_CONFIG), "--work_dir", str(tmp_path / "w")]
    assert read_settings(base)["cold"] is False  # warm by default
    for argv, expected in ((["--cold"], True), (["--cold", "false"], False), (["--cold=true"], True)):
        node = read_settings([*base, *argv, "--port", "11113"]).get_parsed_content("node")
        assert node.inference.cold is expected and node.port == 11113
    with pytest.raises(SystemExit):
        read_settings([*base, "--cold", "yes"])
    with pytest.raises(DicomNodeError, match="cold must be true or false, got 'yes'"):
        _node(tmp_path, "x.pt", cold="yes")
