"""The DICOM node: receives CT over real pynetdicom associations, infers, and sends RTSTRUCT/SEG back."""

import copy
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import torch
from dicom_node import DicomNode, DicomNodeError, SubgroupSource, series_fingerprint
from dicom_node.cli import _parse_overrides
from monai.bundle import ConfigParser
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from scripts import synthetic
from scripts.dicom_series import read_series_info

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
NODE_CONFIG = REPO / "deploy" / "dicom_node.json"
NET = {"features": 4, "num_experts": 4}
NAME, PID = "CANARY^PRIVACY^ZQXW", "PID-CANARY-88231"  # must never reach a log
FAST_RETRY = {"initial_seconds": 0.2, "max_seconds": 1.0, "factor": 2.0}


@pytest.fixture(autouse=True)
def _node_logger_enabled():
    # another test's ConfigWorkflow may apply the bundle's logging.conf, which disables existing loggers
    for name in list(logging.root.manager.loggerDict):
        if name == "dicom_node" or name.startswith("dicom_node."):
            logging.getLogger(name).disabled = False


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("node_cohort"))


def build_cohort(root: Path) -> SimpleNamespace:
    """Four small synthetic CT series (patient name/ID set to canaries) and a checkpoint predicting background."""
    datalist = synthetic.generate_cohort(root, n_cases=4, seed=7, shape=(48, 48, 24), dicom=True)
    items = [it for part in ("training", "validation", "testing") for it in datalist[part]]
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update(NET)
    torch.manual_seed(0)
    state = parser.get_parsed_content("network_def").state_dict()
    # these tests are about transport and state, not segmentation: a head that predicts background everywhere
    # keeps the RTSTRUCT small (an untrained head's speckle makes thousands of contours, seconds per series)
    state["head.conv.weight"].zero_()
    state["head.conv.bias"].copy_(torch.tensor([1.0, -1.0]))
    ckpt = root / "model.pt"
    torch.save(state, ckpt)
    series = []
    for item in items:
        datasets = [pydicom.dcmread(f) for f in read_series_info(root / item["dicom_dir"]).files]  # slice order
        for ds in datasets:
            ds.PatientName, ds.PatientID = NAME, PID
        series.append(datasets)
    return SimpleNamespace(ckpt=ckpt, series=series)


def _uid(datasets) -> str:
    return str(datasets[0].SeriesInstanceUID)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(tmp_path, ckpt, **settings) -> DicomNode:
    kwargs = {
        "port": 0,
        "allowed_calling_aets": ["SCU"],
        # generous: on a loaded 2-core CI machine the node's own inference can stall a sender for a second
        "quiet_seconds": 2.0,
        "work_dir": tmp_path / "node",
        "inference_config_files": [CONFIGS / "inference.json", CONFIGS / "inference_dicom.json"],
        "inference_overrides": {"ckpt_path": str(ckpt), **NET},
        "retry": FAST_RETRY,
        "poll_seconds": 0.05,
        **settings,
    }
    return DicomNode(**kwargs)


class Receiver:
    """A storage SCP standing in for PACS / TPS: keeps every dataset it receives."""

    def __init__(self, port: int = 0, status: int = 0x0000):
        self.received, self.status = [], status
        ae = AE("PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        self.received.append(event.dataset)
        return self.status

    def rtstructs(self, series_uid: str) -> list:
        refs = []
        for ds in self.received:
            if ds.Modality == "RTSTRUCT":
                frame = ds.ReferencedFrameOfReferenceSequence[0]
                ref = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
                if ref == series_uid:
                    refs.append(ds)
        return refs

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(self.received) >= count

    def stop(self):
        self.server.shutdown()


def _send(port: int, datasets, calling: str = "SCU") -> list[int]:
    """C-STORE datasets in one association; returns the status of each."""
    ae = AE(calling)
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="FAIRDRO")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _echo(port: int, calling: str = "SCU") -> bool:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FAIRDRO")
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def _node_records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("dicom_node") and r.levelno == level]


# --------------------------------------------------------------------------------------------- configuration


def test_config_builds_the_node_with_cli_overrides(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(NODE_CONFIG))
    structure = {"_meta_", "imports", "settings_help", "bundle_root", "node", "initialize", "run", "finalize"}
    assert sorted(set(parser.config) - structure) == sorted(parser["settings_help"]), "every setting is documented"
    assert parser["run"] == ["$@node.serve_forever()"]
    overrides = _parse_overrides(["--port", "11113", "--send_seg=true", "--work_dir", str(tmp_path / "w")])
    assert overrides == {"port": 11113, "send_seg": True, "work_dir": str(tmp_path / "w")}
    parser.update({**overrides, "allowed_calling_aets": ["CT1"], "subgroup_source#value": "T3"})
    node = parser.get_parsed_content("node")
    assert isinstance(node, DicomNode)
    assert (node.port, node.send_seg, node.work_dir, node.ae_title) == (11113, True, tmp_path / "w", "FAIRDRO")
    assert node.subgroup_source.resolve(pydicom.Dataset(), "1.2.3") == "T3"
    assert node.subgroup_source.subgroups == ["T1", "T2", "T3", "T4"]
    with pytest.raises(DicomNodeError, match="input_dir"):
        _node(tmp_path, "x.pt", inference_overrides={"input_dir": "/somewhere"})
    with pytest.raises(DicomNodeError, match="destinations"):
        _node(tmp_path, "x.pt", destinations=[{"ae_title": "PACS", "host": "h"}])


def test_subgroup_source_modes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    subgroups = ["T1", "T2", "T3", "T4"]
    header = pydicom.Dataset()
    header.InstitutionName, header.PatientID, header.StudyInstanceUID = "Hospital A", PID, "1.2.3.4"
    assert SubgroupSource("fixed", "T2", subgroups=subgroups).resolve(header, "1.9") == "T2"
    assert SubgroupSource("fixed", None, subgroups=subgroups).resolve(header, "1.9") is None
    mapped = SubgroupSource("attribute", mapping={"Hospital A": "T4"}, subgroups=subgroups)
    assert mapped.resolve(header, "1.9") == "T4"
    direct = pydicom.Dataset()
    direct.InstitutionName = "T1"
    assert SubgroupSource("attribute", subgroups=subgroups).resolve(direct, "1.9") == "T1"
    csv_table = tmp_path / "stages.csv"
    csv_table.write_text(f"PatientID,subgroup\n{PID},T3\nOTHER,T1\n")
    assert SubgroupSource("lookup", table=csv_table, subgroups=subgroups).resolve(header, "1.9") == "T3"
    json_table = tmp_path / "stages.json"
    json_table.write_text(json.dumps({"1.2.3.4": "T2"}))
    by_study = SubgroupSource("lookup", table=json_table, key="StudyInstanceUID", subgroups=subgroups)
    assert by_study.resolve(header, "1.9") == "T2"
    caplog.clear()
    # unresolvable: unmapped value, missing table row, value outside the network's subgroups, missing attribute
    assert SubgroupSource("attribute", mapping={"Elsewhere": "T1"}, subgroups=subgroups).resolve(header, "1.9") is None
    unknown = pydicom.Dataset()
    unknown.PatientID = "NOT-IN-TABLE-5521"
    assert SubgroupSource("lookup", table=csv_table, subgroups=subgroups).resolve(unknown, "1.9") is None
    assert SubgroupSource("attribute", subgroups=subgroups).resolve(header, "1.9") is None
    assert SubgroupSource("attribute", attribute="StationName", subgroups=subgroups).resolve(header, "1.9") is None
    warnings = _node_records(caplog, logging.WARNING)
    assert len(warnings) == 4 and all("1.9" in r.getMessage() and "unknown" in r.getMessage() for r in warnings)
    for secret in (PID, "NOT-IN-TABLE-5521", "Hospital A"):
        assert secret not in caplog.text
    with pytest.raises(DicomNodeError, match="mode"):
        SubgroupSource("bogus")
    with pytest.raises(DicomNodeError, match="T9"):
        SubgroupSource("fixed", "T9", subgroups=subgroups)
    with pytest.raises(DicomNodeError, match="table"):
        SubgroupSource("lookup", table=tmp_path / "absent.csv")
    with pytest.raises(DicomNodeError, match="keyword"):
        SubgroupSource("attribute", attribute="NotAKeyword")


# ------------------------------------------------------------------------------------------------ receiving


def test_echo_and_calling_ae_allow_list(tmp_path):
    node = _node(tmp_path, "x.pt")
    node.start()
    try:
        assert _echo(node.port, "SCU")
        assert not _echo(node.port, "INTRUDER")
    finally:
        node.stop()
    closed = _node(tmp_path, "x.pt", allowed_calling_aets=[])
    closed.start()
    try:
        assert not _echo(closed.port, "SCU"), "an empty allow-list must refuse everyone"
    finally:
        closed.stop()


def test_refused_instances_get_failure_statuses_and_log_their_uid(cohort, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    template = cohort.series[0][0]

    def variant(**changes):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return ds

    mr = variant(SOPClassUID=MRImageStorage, Modality="MR")
    mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    cases = {
        "mr": (mr, 0x0122),
        "no_series_uid": (variant(SeriesInstanceUID=None), 0xA900),
        "no_pixels": (variant(PixelData=None), 0xA900),
        "path_in_uid": (variant(SeriesInstanceUID="1.2/../../../evil"), 0xA900),
        "truncated_pixels": (variant(PixelData=template.PixelData[:100]), 0xC210),
    }
    node = _node(tmp_path, cohort.ckpt)
    node.start()
    try:
        statuses = _send(node.port, [ds for ds, _ in cases.values()])
        assert statuses == [status for _, status in cases.values()]
        assert node.status()["refused"] == len(cases) and node.status()["stored"] == 0
        assert node.wait_idle(5)
    finally:
        node.stop()
    warnings = [r.getMessage() for r in _node_records(caplog, logging.WARNING)]
    for name, (ds, _) in cases.items():
        assert any(str(ds.SOPInstanceUID) in m for m in warnings), (name, warnings)
    assert not any((tmp_path / "node" / "spool").iterdir())
    assert not list(tmp_path.rglob("evil*"))
    assert NAME not in caplog.text and PID not in caplog.text


# ------------------------------------------------------------------------------------------ series lifecycle


def test_series_are_processed_delivered_deduplicated_and_replaced(cohort, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every record of the whole run is checked for patient identifiers
    series_a, series_b = cohort.series[0], cohort.series[1]
    uid_a, uid_b = _uid(series_a), _uid(series_b)
    receiver = Receiver()
    node = _node(tmp_path, cohort.ckpt, send_seg=True, destinations=[{"ae_title": "PACS", "host": "127.0.0.1",
                 "port": receiver.port}])  # fmt: skip
    work = node.work_dir
    node.start()
    try:
        # two series interleaved in one association; the first is sent without its last slice
        partial_a = series_a[:-1]
        mixed = [ds for pair in zip(partial_a, series_b) for ds in pair] + [series_b[-1]]
        assert _send(node.port, mixed) == [0] * len(mixed)
        assert node.wait_idle(180), node.status()
        for uid, sent in ((uid_a, partial_a), (uid_b, series_b)):
            result = json.loads((work / "results" / uid / "result.json").read_text())
            assert result["instance_count"] == len(sent)
            assert result["fingerprint"] == series_fingerprint(str(ds.SOPInstanceUID) for ds in sent)
            assert result["subgroup"] is None and result["timings"]["inference_seconds"] > 0
            delivery = json.loads((work / "results" / uid / "delivery.json").read_text())
            assert [d["done"] for d in delivery["destinations"].values()] == [True]
            assert len(receiver.rtstructs(uid)) == 1
        assert sorted(ds.Modality for ds in receiver.received) == ["RTSTRUCT", "RTSTRUCT", "SEG", "SEG"]
        built = [json.loads((work / "results" / u / "result.json").read_text())["timings"]["workflow_built"]
                 for u in (uid_a, uid_b)]  # fmt: skip
        assert sorted(built) == [False, True]  # warm: the first series built the workflow, the second reused it
        assert not any((work / "spool").iterdir()) and not any((work / "processing").iterdir())
        assert not [p for p in (work / "results").iterdir() if p.name.startswith(".")]

        # the same series again: recognised by its fingerprint, neither re-inferred nor re-sent
        assert _send(node.port, series_b) == [0] * len(series_b)
        assert node.wait_idle(60)
        assert len(receiver.received) == 4 and node.status()["duplicates"] == 1
        assert any("duplicate" in r.getMessage() and uid_b in r.getMessage() for r in caplog.records)
        # a few of its slices re-sent (e.g. by a PACS): part of the earlier result, also a duplicate
        assert _send(node.port, series_b[3:6]) == [0] * 3
        assert node.wait_idle(60)
        assert len(receiver.received) == 4 and node.status()["duplicates"] == 2
        result_b = json.loads((work / "results" / uid_b / "result.json").read_text())
        assert result_b["instance_count"] == len(series_b)

        # the complete series after the partial one: re-processed, the earlier result replaced
        assert _send(node.port, series_a) == [0] * len(series_a)
        assert node.wait_idle(120)
        result = json.loads((work / "results" / uid_a / "result.json").read_text())
        assert result["instance_count"] == len(series_a) and result["timings"]["workflow_built"] is False
        assert len(receiver.rtstructs(uid_a)) == 2 and len(receiver.received) == 6
        assert node.status()["processed"] == 3
        assert node.status()["inference_builds"] == 1  # warm (the default): built once for all three
    finally:
        node.stop()
        receiver.stop()
    assert NAME not in caplog.text and PID not in caplog.text
    for record in caplog.records:
        assert NAME not in str(record.args) and PID not in str(record.args)


def test_series_failing_the_ct_checks_is_moved_to_failed(cohort, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    series = cohort.series[2]
    uid = _uid(series)
    gappy = series[:10] + series[11:]  # one slice missing in the middle
    node = _node(tmp_path, cohort.ckpt)
    node.start()
    try:
        assert _send(node.port, gappy) == [0] * len(gappy)
        assert node.wait_idle(120)
        assert _echo(node.port), "the node must keep running after a refused series"
        assert node.status()["failed"] == 1
    finally:
        node.stop()
    work = node.work_dir
    reason = (work / "failed" / uid / "reason.txt").read_text()
    assert "MissingSliceError" in reason and uid in reason
    assert len(list((work / "failed" / uid).glob("*.dcm"))) == len(gappy)
    assert not (work / "results" / uid).exists() and not any((work / "processing").iterdir())
    errors = [r.getMessage() for r in _node_records(caplog, logging.ERROR)]
    assert len(errors) == 1 and uid in errors[0] and "missing slice" in errors[0]


# ------------------------------------------------------------------------------------------------- delivery


def test_delivery_is_retried_with_backoff_and_resumed_after_restart(cohort, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    series = cohort.series[3]
    uid = _uid(series)
    # the destination is down at first: its port is held by a bound socket that does not listen (connections are
    # refused), so no other socket of the run (e.g. an outgoing association's ephemeral port) can take it meanwhile
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": port}
    key = f"PACS@127.0.0.1:{port}"

    def failures():
        return [r.getMessage() for r in _node_records(caplog, logging.WARNING) if "delivery to" in r.getMessage()]

    node = _node(tmp_path, cohort.ckpt, destinations=[dest])
    node.start()
    try:
        assert _send(node.port, series) == [0] * len(series)
        assert _wait(lambda: len(failures()) >= 2, 120), node.status()
        assert not node.wait_idle(0.2), "an undelivered result keeps the node busy"
    finally:
        node.stop()
    assert all(uid in m and key in m and "next retry in" in m for m in failures())
    delivery = json.loads((node.work_dir / "results" / uid / "delivery.json").read_text())
    assert delivery["destinations"][key]["done"] is False and delivery["destinations"][key]["attempts"] >= 2

    # a new node on the same work_dir re-queues the undelivered result; the destination comes up later
    seen = len(failures())
    restarted = _node(tmp_path, cohort.ckpt, destinations=[dest])
    restarted.start()
    receiver = None
    try:
        assert _wait(lambda: len(failures()) > seen, 30)
        holder.close()
        receiver = Receiver(port)
        assert restarted.wait_idle(30), restarted.status()
        assert len(receiver.rtstructs(uid)) == 1 and len(receiver.received) == 1
        assert restarted.status()["processed"] == 0 and restarted.status()["delivered"] == 1
    finally:
        restarted.stop()
        holder.close()
        if receiver is not None:
            receiver.stop()
    delivery = json.loads((node.work_dir / "results" / uid / "delivery.json").read_text())
    assert delivery["destinations"][key]["done"] is True


# ---------------------------------------------------------------------------------------- crash and restart


def _start_process(command: list[str], log: Path) -> subprocess.Popen:
    path = os.pathsep.join([str(REPO / "bundle"), str(REPO / "deploy")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    with open(log, "ab") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_sigkill_loses_nothing_that_was_acknowledged(cohort, tmp_path):
    receiver = Receiver()
    port, work, log = _free_port(), tmp_path / "node", tmp_path / "node.log"
    settings = {
        "port": port,
        "work_dir": str(work),
        "allowed_calling_aets": ["SCU"],
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}],
        "inference_overrides": {"ckpt_path": str(cohort.ckpt), **NET},
        "retry": FAST_RETRY,
    }
    args = [arg for k, v in settings.items() for arg in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]
    sent = cohort.series[:3]
    proc = _start_process([sys.executable, "-m", "dicom_node", "--config", str(NODE_CONFIG),
                           "--quiet_seconds", "3600", *args], log)  # fmt: skip
    try:
        assert _wait(lambda: proc.poll() is None and _echo(port), 90), log.read_text()
        for datasets in sent:
            assert _send(port, datasets) == [0] * len(datasets)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    spooled = {p.name: len(list(p.glob("*.dcm"))) for p in (work / "spool").iterdir()}
    assert spooled == {_uid(ds): len(ds) for ds in sent}
    # as if the node had been killed during inference of the last series
    shutil.move(work / "spool" / _uid(sent[2]), work / "processing" / _uid(sent[2]))

    proc = _start_process([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(NODE_CONFIG), "--quiet_seconds", "2", *args], log)  # fmt: skip
    try:
        assert receiver.wait_for(len(sent), 240), log.read_text()[-5000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.stop()
    for datasets in sent:
        assert len(receiver.rtstructs(_uid(datasets))) == 1
        assert json.loads((work / "results" / _uid(datasets) / "result.json").read_text())["instance_count"] == 24
    assert not any((work / "spool").iterdir()) and not any((work / "processing").iterdir())
