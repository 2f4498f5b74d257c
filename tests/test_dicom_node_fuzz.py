"""The node's fuzz harness (``make fuzz-pacs``: tools/fuzz_pdus.py, fuzz_mutators.py, fuzz_pacs_check.py) and the
node's fixes for what it found.

* the harness: its valid traffic is understood by pynetdicom and pydicom (peer implementations), each mutator
  changes what it says it changes, a case is the same for the same seed, and the checker fails each violation;
* the node (deploy/dicom_node/server.py, receiver.py, unhandled.py): requests that made pynetdicom's own threads
  raise (an even presentation context ID, a context without an abstract syntax) are refused without an exception
  reaching ``threading.excepthook``; junk after an A-ABORT is not read on; a peer that closes before its
  A-ASSOCIATE-RQ frees its pending slot at once; data sets that contradict their C-STORE are refused.
"""

import copy
import io
import json
import logging
import random
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from dicom_node.unhandled import UnhandledExceptions
from pydicom.filereader import read_dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from scripts import synthetic
from scripts.dicom_series import read_series_info
from test_dicom_node import _echo, _node, _node_logger_enabled, _wait  # noqa: F401 (an autouse fixture)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import fuzz_mutators as fm  # noqa: E402
import fuzz_pacs_check  # noqa: E402
from fuzz_pdus import (  # noqa: E402
    CT_EXPLICIT,
    CT_IMAGE_STORAGE,
    CT_IMPLICIT,
    EXPLICIT_LE,
    MAX_PDU,
    Step,
    associate_rq,
    c_store_rq,
    command_set,
    dimse_status,
    encode,
    item,
    p_data,
    pdu,
    play,
    split_pdus,
    store_session,
)

FUZZ, NODE, OTHER_HOST = "FUZZSCU", "FAIRDRO", "127.0.0.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def ct_slice(tmp_path_factory) -> pydicom.Dataset:
    """One slice of a small synthetic CT series (24 x 24 pixels, 16 bits)."""
    root = tmp_path_factory.mktemp("fuzz_cohort")
    datalist = synthetic.generate_cohort(root, n_cases=4, seed=3, shape=(24, 24, 16), dicom=True)
    first = next(it for part in ("training", "validation", "testing") for it in datalist[part])
    files = read_series_info(root / first["dicom_dir"]).files
    return pydicom.dcmread(files[len(files) // 2])


def _dataset_bytes(steps: list[Step]) -> bytes:
    """The data set fragments of a session (P-DATA PDVs whose control header says 'data set'), joined."""
    out = b""
    for step in steps:
        if step.pdu[0] == 0x04 and not step.pdu[11] & 1:
            out += step.pdu[12:]
    return out


def _read(data: bytes, explicit: bool) -> pydicom.Dataset:
    return read_dataset(io.BytesIO(data), is_implicit_VR=not explicit, is_little_endian=True)


class StoreScp:
    """A plain pynetdicom storage SCP (the peer that checks the harness's valid traffic)."""

    def __init__(self) -> None:
        self.received: list[pydicom.Dataset] = []
        ae = AE("NODE")
        ae.supported_contexts = AllStoragePresentationContexts
        handlers = [(evt.EVT_C_STORE, lambda event: self.received.append(event.dataset) or 0x0000)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]


# ------------------------------------------------------------------------------------------------ valid traffic


def test_associate_rq_is_decoded_by_pynetdicom():
    rq = associate_rq(NODE, FUZZ)
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(rq)
    assert (decoded.called_ae_title, decoded.calling_ae_title) == (NODE, FUZZ)
    contexts = {c.context_id: str(c.abstract_syntax) for c in decoded.presentation_context}
    assert contexts == {1: CT_IMAGE_STORAGE, 3: CT_IMAGE_STORAGE, 5: "1.2.840.10008.1.1",
                        7: "1.2.826.0.1.3680043.8.498.999.1"}  # fmt: skip
    assert decoded.user_information.maximum_length == MAX_PDU


def test_c_store_command_set_is_read_by_pydicom():
    cmd = c_store_rq(CT_IMAGE_STORAGE, "1.2.3.4", message_id=7)
    ds = _read(cmd, explicit=False)
    assert ds.CommandGroupLength == len(cmd) - 12  # everything after the 12-byte group length element
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CT_IMAGE_STORAGE, "1.2.3.4")
    assert (ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType) == (0x0001, 7, 0, 0x0000)


@pytest.mark.parametrize("explicit", [True, False])
def test_a_valid_session_is_stored_by_pynetdicom(ct_slice, explicit):
    scp = StoreScp()
    try:
        steps = store_session("NODE", FUZZ, ct_slice, explicit=explicit)
        outcome, closed = play(("127.0.0.1", scp.port), steps, OTHER_HOST)
    finally:
        scp.server.shutdown()
    assert (outcome.statuses, outcome.end, closed) == ([0x0000], "released", True)
    (got,) = scp.received
    assert got.SOPInstanceUID == ct_slice.SOPInstanceUID and got.PixelData == ct_slice.PixelData


def test_pdu_stream_split_and_dimse_status_by_hand():
    status = command_set([(0x0900, struct.pack("<H", 0xC210))])
    reply = p_data(1, True, True, status)
    release_rp = pdu(6, bytes(4))
    assert split_pdus(reply + release_rp) == [reply, release_rp]
    assert dimse_status(reply) == 0xC210
    assert dimse_status(p_data(1, False, True, status)) is None  # a data set fragment carries no status
    assert split_pdus(release_rp[:4]) == []  # fewer than 6 bytes: no PDU header yet


# ------------------------------------------------------------------------------------------------ mutators


def test_rq_items_finds_every_item_and_sub_item():
    rq = associate_rq(NODE, FUZZ)
    kinds = [rq[offset] for offset in fm._rq_items(rq)]
    # application context; 4 presentation contexts (abstract + transfer syntax each); user information (2 sub-items)
    assert kinds == [0x10, *[0x20, 0x30, 0x40] * 4, 0x50, 0x51, 0x52]


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("undefined", [True, False])
def test_nested_sequence_is_read_back_by_pydicom(explicit, undefined):
    ds = _read(fm._nested_sequence(5, explicit, undefined), explicit)
    depth, level = 0, ds
    while "ReferencedImageSequence" in level:
        (level,) = level.ReferencedImageSequence
        depth += 1
    assert depth == 5 and len(level) == 0  # the innermost item is empty


def test_a_case_is_the_same_for_the_same_seed_and_index(ct_slice):
    names = sorted(fm.MUTATIONS)
    for index in range(2 * len(names)):
        first = fm.make_case(5, index, ct_slice, NODE, FUZZ)
        assert first == fm.make_case(5, index, ct_slice, NODE, FUZZ)
        assert first[0] == names[index % len(names)]  # drawn in turn
        assert first[3] and all(isinstance(s, Step) for s in first[3])
    assert fm.make_case(5, 0, ct_slice, NODE, FUZZ)[2] != fm.make_case(6, 0, ct_slice, NODE, FUZZ)[2]


def _declared(data: bytes) -> int:
    return struct.unpack(">L", data[2:6])[0]


@pytest.mark.parametrize("seed", range(6))
def test_pdu_mutators_change_the_length_field_as_they_say(ct_slice, seed):
    template = fm.Template.fresh(ct_slice, NODE, FUZZ, random.Random(seed))
    _, steps = fm.pdu_truncate(random.Random(seed), copy.deepcopy(template))
    last = steps[-1].pdu
    assert len(last) < 6 or _declared(last) > len(last) - 6  # cut short: declares more than it holds
    _, steps = fm.pdu_length_oversized(random.Random(seed), copy.deepcopy(template))
    assert _declared(steps[-1].pdu) >= MAX_PDU + 7
    _, steps = fm.pdu_length_negative(random.Random(seed), copy.deepcopy(template))
    assert _declared(steps[-1].pdu) >= 0x80000000  # negative as a signed 32-bit integer
    variant, steps = fm.pdu_type_flip(random.Random(seed), copy.deepcopy(template))
    assert f"-> 0x{steps[-1].pdu[0]:02X}" in variant


@pytest.mark.parametrize("seed", range(8))
def test_pixel_data_mutators_make_pixel_data_shorter_or_longer_than_the_image(ct_slice, seed):
    for mutator, shorter in ((fm.pixel_data_short, True), (fm.pixel_data_long, False)):
        template = fm.Template.fresh(ct_slice, NODE, FUZZ, random.Random(seed))
        _, steps = mutator(random.Random(seed), template)
        explicit = steps[1].pdu[10] == CT_EXPLICIT
        ds = _read(_dataset_bytes(steps), explicit)
        needed = ds.Rows * ds.Columns * int(ds.get("NumberOfFrames", 1)) * ds.BitsAllocated // 8
        assert (len(ds.PixelData) < needed) if shorter else (len(ds.PixelData) > needed), (seed, mutator)


@pytest.mark.parametrize("seed", range(8))
def test_wrong_vr_and_element_length_change_one_element(ct_slice, seed):
    template = fm.Template.fresh(ct_slice, NODE, FUZZ, random.Random(seed))
    valid = {tag: data for tag, data in fm.encode_elements(template.ds, True)}
    variant, steps = fm.wrong_vr(random.Random(seed), copy.deepcopy(template))
    data = _dataset_bytes(steps)
    assert data != encode(template.ds, steps[1].pdu[10] == CT_EXPLICIT)
    if "-> b'" in variant:  # "(0028,0010) VR US -> b'UL'": that element now carries the new VR code
        group, number = (int(x, 16) for x in variant[1:10].split(","))
        new_vr = variant.split("-> ")[1][2:4].encode()
        offset = data.index(struct.pack("<HH", group, number) + new_vr)
        assert data[:offset] == b"".join(v for k, v in sorted(valid.items()) if k < (group << 16 | number))
    variant, steps = fm.element_length(random.Random(seed), copy.deepcopy(template))
    old, new = (int(x) for x in variant.split("length ")[1].split(" -> "))
    assert old != new and struct.pack("<L", new) in _dataset_bytes(steps)


def test_every_mutator_builds_a_session(ct_slice):
    for name, mutator in fm.MUTATIONS.items():
        for seed in range(4):
            variant, steps = mutator(random.Random(seed), fm.Template.fresh(ct_slice, NODE, FUZZ, random.Random(seed)))
            assert variant and steps and all(len(s.pdu) > 0 for s in steps), name


# ------------------------------------------------------------------------------------------------ the checker


def _row(**changes) -> dict:
    """One delivered valid series of a result (Dice 1.000 unless changed)."""
    return {"series": "1.2", "delivered": True, "seg": 1.0, "rtstruct": 1.0, "references_only_its_slices": True,
            **changes}  # fmt: skip


def _passing() -> dict:
    """A result that passes every rule (hand-made)."""
    names = sorted(fm.MUTATIONS)
    return {
        "machine": "test", "date": "2026-12-07", "seed": 0, "command": "python tools/fuzz_pacs.py", "quick": False,
        "requested": {"count": 1140}, "malformed": 1140, "by_mutation": dict.fromkeys(names, 60),
        "mutations_known": names, "crashes": 0, "unhandled_exceptions": 0, "valid_series_attempted": 2,
        "valid_series_sent": 2, "valid_series_delivered": 2, "fd_growth": 5, "rss_growth_mib": 64.0,
        "valid_dice": [_row(rtstruct=0.9996)] * 2,
        "spool_left": [], "results_not_valid": [],
        "failed": {"series": 25, "bytes": 100, "max_series": 25, "max_bytes": 1000},
    }  # fmt: skip


def test_checker_passes_a_result_at_every_limit():
    assert fuzz_pacs_check.check(_passing()) == []


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"crashes": 1}, "crashes: 1"),
        ({"unhandled_exceptions": 2}, "unhandled_exceptions: 2"),
        ({"fd_growth": 6}, "fd_growth: 6"),
        ({"fd_growth": None}, "fd_growth: None"),
        ({"rss_growth_mib": 64.1}, "rss_growth_mib: 64.1"),
        ({"valid_series_delivered": 1}, "delivered 1 != valid_series_sent 2"),
        ({"valid_series_attempted": 3}, "1 of 3 not acknowledged"),
        ({"valid_dice": [_row(seg=0.9994)]}, "SEG Dice 0.9994"),
        ({"valid_dice": [_row(rtstruct=None)]}, "RTSTRUCT delivered but its Dice"),
        ({"valid_dice": [_row(references_only_its_slices=False)]}, "exactly its slices"),
        ({"spool_left": ["1.2.3"]}, "spool/processing not empty"),
        ({"results_not_valid": ["1.2.3"]}, "results/ holds"),
        ({"failed": {"series": 26, "bytes": 100, "max_series": 25, "max_bytes": 1000}}, "over its cap"),
        ({"failed": {"series": 1, "bytes": 1001, "max_series": 25, "max_bytes": 1000}}, "over its cap"),
        (
            {"malformed": 999, "by_mutation": {"pdu_truncate": 999}, "mutations_known": ["pdu_truncate"]},
            "999 cases sent, at least 1000",
        ),
        (
            {"by_mutation": {**dict.fromkeys(sorted(fm.MUTATIONS), 60), "wrong_vr": 0, "pdu_truncate": 120}},
            "never sent: ['wrong_vr']",
        ),
        ({"valid_series_sent": 1, "valid_series_delivered": 1, "valid_series_attempted": 1}, "at least 2"),
    ],
)
def test_checker_fails_each_violation_with_one_line(changes, words):
    problems = fuzz_pacs_check.check({**_passing(), **changes})
    assert len(problems) == 1 and words in problems[0], problems


def test_checker_quick_run_needs_every_case_it_asked_for():
    quick = {**_passing(), "quick": True, "requested": {"count": 300}, "malformed": 300,
             "by_mutation": {**dict.fromkeys(sorted(fm.MUTATIONS), 15), "pdu_truncate": 30}}  # fmt: skip
    assert fuzz_pacs_check.check(quick) == []
    short = {**quick, "malformed": 299, "by_mutation": {**quick["by_mutation"], "pdu_truncate": 29}}
    assert fuzz_pacs_check.check(short) == ["malformed: 299 cases sent, at least 300 needed"]


def test_checker_command_line(tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_passing()))
    bad.write_text(json.dumps({**_passing(), "crashes": 1, "fd_growth": 6}))
    assert fuzz_pacs_check.main([str(good)]) == 0
    assert fuzz_pacs_check.main([str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK") and len(lines) == 3 and lines[1].startswith("crashes: 1")
    assert fuzz_pacs_check.main([str(tmp_path / "missing.json")]) == 1
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"malformed": 5}))
    assert fuzz_pacs_check.main([str(partial)]) == 1 and "missing field(s)" in capsys.readouterr().out


def test_committed_fuzz_result_passes_its_checker():
    result = json.loads(fuzz_pacs_check.DEFAULT.read_text())
    assert fuzz_pacs_check.check(result) == []
    assert not result["quick"] and result["malformed"] >= 1000 and result["valid_series_sent"] >= 2


# ------------------------------------------------------------------------------------------------ the node


@pytest.fixture
def hook_hits(monkeypatch):
    """Every exception that reaches ``threading.excepthook`` during the test."""
    hits: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: hits.append(f"{args.thread}: {args.exc_value!r}"))
    return hits


@pytest.fixture
def node(tmp_path):
    node = _node(tmp_path, "x.pt", allowed_calling_aets=[FUZZ, "SCU"], min_free_bytes=0, quiet_seconds=60.0)
    node.start()
    yield node
    node.stop()


def _refusals(node, cause: str) -> float:
    return node.metrics.refusal_counts().get(cause, 0)


def _send(node, steps: list[Step]):
    return play(("127.0.0.1", node.port), steps, OTHER_HOST, timeout=5.0, close_wait=5.0)


@pytest.mark.parametrize(
    "contexts, thread",
    [
        (item(0x20, struct.pack(">B3x", 2) + item(0x30, CT_IMAGE_STORAGE.encode()) + item(0x40, b"1.2.840.10008.1.2")),
         "reading (DUL)"),  # an even context ID: pynetdicom's state machine raises ValueError
        (item(0x20, struct.pack(">B3x", 1) + item(0x40, EXPLICIT_LE.encode())),
         "association"),  # no abstract syntax: pynetdicom's negotiation raises TypeError
    ],
)  # fmt: skip
def test_requests_that_make_pynetdicom_raise_are_refused_without_an_unhandled_exception(
    node, hook_hits, caplog, contexts, thread
):
    caplog.set_level(logging.WARNING)
    valid = associate_rq(NODE, FUZZ)
    user_info = valid[valid.index(b"\x50\x00") :]  # the user information item closes the request
    rq = pdu(0x01, valid[6:74] + item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + user_info)
    outcome, closed = _send(node, [Step(rq)])
    assert closed, "the node closes the connection"
    assert _wait(lambda: _refusals(node, "malformed_pdu") == 1, 5), node.metrics.refusal_counts()
    lines = [r.getMessage() for r in caplog.records if "(cause=malformed_pdu)" in r.getMessage()]
    assert len(lines) == 1 and f"pynetdicom's {thread} thread stopped" in lines[0], lines
    assert _wait(lambda: node.receiver.gate.counts() == {"pending": 0, "active": 0}, 5)
    assert _echo(node.port, "SCU"), "the node keeps serving"
    time.sleep(0.2)  # any thread of the refused connection has ended by now
    assert hook_hits == []


def test_junk_after_an_abort_is_not_read_on(node, hook_hits, caplog):
    caplog.set_level(logging.ERROR, logger="pynetdicom")
    junk = b"\x09\x00\x00\x00\x00\x00" * 20000  # 20000 PDUs of a type that does not exist, 120 kB
    outcome, closed = _send(node, [Step(junk)])
    assert closed and 0x07 in outcome.replies  # A-ABORT, then the connection closed
    unknown = [r for r in caplog.records if "Unknown PDU type" in r.getMessage()]
    assert 1 <= len(unknown) <= 5, len(unknown)  # pynetdicom used to log one line per junk PDU: 20000
    assert _wait(lambda: _refusals(node, "malformed_pdu") == 1, 5) and hook_hits == []


def test_a_peer_that_closes_before_its_request_frees_its_pending_slot_at_once(node):
    assert node.limits.pending_timeout_seconds == 10.0  # the default: a slot held until then would show
    socks = [socket.create_connection(("127.0.0.1", node.port), source_address=(OTHER_HOST, 0)) for _ in range(4)]
    assert _wait(lambda: node.receiver.gate.counts()["pending"] == 4, 5)
    socks[0].sendall(b"\x01\x00\x00")  # half a PDU header, then gone
    started = time.monotonic()
    for sock in socks:
        sock.close()
    assert _wait(lambda: node.receiver.gate.counts()["pending"] == 0, 3), node.receiver.gate.counts()
    assert time.monotonic() - started < 3
    assert _refusals(node, "pending_timeout") == 0


def test_data_sets_that_contradict_their_c_store_are_refused(node, ct_slice, caplog):
    caplog.set_level(logging.WARNING)
    rng = random.Random(0)

    def fresh() -> pydicom.Dataset:
        return fm.Template.fresh(ct_slice, NODE, FUZZ, rng).ds

    mr, longer, meta_inside, control = fresh(), fresh(), fresh(), fresh()
    mr.SOPClassUID = MR_IMAGE_STORAGE  # the data set's class, sent on the CT context with a CT command
    longer.PixelData += b"\0\0\0\0"
    meta = pydicom.Dataset()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"
    other = fresh()
    cases = [
        (store_session(NODE, FUZZ, other, data=encode(other, False), context_id=CT_EXPLICIT), 0xC210),
        (store_session(NODE, FUZZ, meta_inside, data=encode(meta, True) + encode(meta_inside, True)), 0xC210),
        (store_session(NODE, FUZZ, mr, command=c_store_rq(CT_IMAGE_STORAGE, str(mr.SOPInstanceUID))), 0xA900),
        (store_session(NODE, FUZZ, longer, explicit=False), 0xC210),
        (store_session(NODE, FUZZ, control, explicit=False, context_id=CT_IMPLICIT), 0x0000),
    ]
    statuses = [_send(node, steps)[0].statuses for steps, _ in cases]
    assert statuses == [[status] for _, status in cases]
    spooled = sorted(p.name for p in node.spool_dir.iterdir())
    assert spooled == [str(control.SeriesInstanceUID)]  # only the control instance was stored
    lines = [r.getMessage() for r in caplog.records if "(cause=invalid_instance)" in r.getMessage()]
    expected = ["not encoded in the negotiated transfer syntax", "file meta elements (group 0002)",
                f"SOPClassUID {MR_IMAGE_STORAGE}", "pixel data is 1156 bytes"]  # fmt: skip  # 24 x 24 x 2 = 1152
    assert len(lines) == 4 and all(text in line for text, line in zip(expected, lines, strict=True)), lines


def test_unhandled_exceptions_are_logged_and_counted(caplog):
    caplog.set_level(logging.CRITICAL)
    before = threading.excepthook, sys.excepthook
    unhandled = UnhandledExceptions()
    with unhandled.installed():
        thread = threading.Thread(target=lambda: 1 / 0, name="fuzz-test-thread")
        thread.start()
        thread.join()
        quiet = threading.Thread(target=sys.exit, name="exits-on-purpose")  # SystemExit is not counted
        quiet.start()
        quiet.join()
        sys.excepthook(RuntimeError, RuntimeError("main"), None)
    assert unhandled.count == 2
    assert (threading.excepthook, sys.excepthook) == before
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "Unhandled exception in thread fuzz-test-thread (ZeroDivisionError" in messages[0]
    assert "Unhandled exception in thread MainThread (RuntimeError: main)" in messages[1]
    assert caplog.records[0].exc_info is not None  # with its traceback


def test_restamp_gives_one_new_study_series_and_frame_and_new_sop_uids(tmp_path):
    import pacs

    data = synthetic.generate_cohort(tmp_path, n_cases=4, seed=0, shape=(16, 16, 16), dicom=True)
    item = next(it for part in ("training", "validation", "testing") for it in data[part])
    files = read_series_info(tmp_path / item["dicom_dir"]).files
    old = [pydicom.dcmread(f) for f in files]
    new = pacs.restamp([copy.deepcopy(ds) for ds in old])
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in new}) == 1 and new[0][key].value != old[0][key].value
    sops = [ds.SOPInstanceUID for ds in new]
    assert len(set(sops)) == len(new) and not set(sops) & {ds.SOPInstanceUID for ds in old}
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in new)
    assert all((a.pixel_array == b.pixel_array).all() for a, b in zip(old, new))  # the same images
