"""The node's refusal log and counter (``deploy/dicom_node/gate.py``): the line comes before the count; and the
receiver's A-ASSOCIATE-RQ handler when the peer has already closed."""

import logging
import socket
from types import SimpleNamespace

import pytest
from dicom_node.gate import Refusals
from dicom_node.receiver import Receiver


class _Metrics:
    """Records, at each refusal counted, the refusal lines already written."""

    def __init__(self, lines: list):
        self.lines, self.seen = lines, []

    def refusal(self, cause: str) -> None:
        self.seen.append((cause, list(self.lines)))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    handler, gate_logger = _Lines(), logging.getLogger("dicom_node.gate")
    level = gate_logger.level
    gate_logger.addHandler(handler)
    gate_logger.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        gate_logger.removeHandler(handler)
        gate_logger.setLevel(level)


def test_a_refusal_is_logged_before_it_is_counted(lines):
    """A watcher that sees the count (the tests' waits, a metrics scrape) finds the line: CI once read the log between
    the two, in the other order."""
    metrics = _Metrics(lines)
    Refusals(metrics).refuse("malformed_pdu", "connection from 10.0.0.1:104", "junk first")
    expected = "Refused connection from 10.0.0.1:104 (cause=malformed_pdu): junk first."
    assert metrics.seen == [("malformed_pdu", [expected])]


def test_an_unknown_cause_is_neither_logged_nor_counted(lines):
    metrics = _Metrics(lines)
    with pytest.raises(ValueError, match="unknown refusal cause 'bad_cause'"):
        Refusals(metrics).refuse("bad_cause", "connection", "detail")
    with pytest.raises(ValueError, match="unknown refusal cause 'bad_cause'"):
        Refusals(metrics).count("bad_cause")
    assert metrics.seen == [] and lines == []


def test_an_association_whose_socket_closed_at_once_is_let_end_quietly(caplog):
    """A peer that closes right after its A-ASSOCIATE-RQ: the EVT_REQUESTED handler meets a closed socket (seen in CI:
    pynetdicom then logged our handler's OSError with a traceback at ERROR). It sets the ACSE timeout and returns."""
    closed = socket.socket()
    closed.close()
    assoc = SimpleNamespace(
        requestor=SimpleNamespace(primitive=SimpleNamespace(calling_ae_title="SCU"), address="10.0.0.1", port=104),
        fairdro_key=("10.0.0.1", 104),
        dul=SimpleNamespace(socket=SimpleNamespace(socket=closed)),
        acse_timeout=None,
    )
    node = SimpleNamespace(
        allowed_calling_aets=["SCU"],
        gate=SimpleNamespace(associate=lambda key: None),
        limits=SimpleNamespace(acse_timeout_seconds=7.0, network_timeout_seconds=9.0),
    )
    with caplog.at_level(logging.DEBUG, logger="dicom_node.receiver"):
        Receiver._on_requested(node, SimpleNamespace(assoc=assoc))
    assert assoc.acse_timeout == 7.0
    assert [r.getMessage() for r in caplog.records] == ["Association from 10.0.0.1 closed before it began."]
