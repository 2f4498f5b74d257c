"""Silent peers do not stall senders: 50 silent connections from 127.0.0.2 (plain TCP, and TLS clients that never
start their handshake), each reopened as soon as the node closes it, while a sender on 127.0.0.1 delivers series.
The median latency (last C-STORE sent -> RTSTRUCT received) of 3 series under that load must stay within 1.5x the
median on a quiet node. Loopback only; the silent clients run in their own process for a bounded time."""

import statistics
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from test_dicom_node import Receiver, _node, _wait, build_cohort
from test_dicom_node_limits import _renamed
from test_dicom_node_tls import TlsReceiver, _client_context, _tls

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from pacs import SilentClients  # noqa: E402
from testcerts import make_pki  # noqa: E402

SERIES = 3
SLICES = 6  # tiny series: the latency is the node's, not inference's


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("node_silent_cohort"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki_silent"))


def _deliver(node, receiver, datasets, tls_args) -> float:
    """Seconds from the last C-STORE acknowledged to the series' RTSTRUCT at the receiver."""
    ae = AE("SCU")
    ae.add_requested_context(str(datasets[0].SOPClassUID))
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FAIRDRO", tls_args=tls_args)
    assert assoc.is_established
    assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
    assoc.release()
    sent, uid = time.monotonic(), str(datasets[0].SeriesInstanceUID)
    while not receiver.rtstructs(uid):
        assert time.monotonic() - sent < 60, "series not delivered within 60 s"
        time.sleep(0.02)
    return time.monotonic() - sent


def _median_latency(node, receiver, cohort, tls_args) -> float:
    return statistics.median(
        _deliver(node, receiver, _renamed(cohort.series[i % 4][:SLICES]), tls_args) for i in range(SERIES)
    )


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_silent_clients_do_not_slow_a_sender(mode, cohort, pki, tmp_path):
    tls = _tls(pki) if mode == "tls" else None
    receiver = TlsReceiver(pki, "peer") if tls else Receiver()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}
    if tls:
        dest["tls_hostname"] = "localhost"
    tls_args = (_client_context(pki, "peer"), "localhost") if tls else None
    limits = {"pending_timeout_seconds": 2}  # short: the silent clients are closed and reopened during the test
    node = _node(tmp_path, cohort.ckpt, destinations=[dest], tls=tls, quiet_seconds=0.5, min_free_bytes=0,
                 limits=limits)  # fmt: skip
    node.start()
    try:
        _deliver(node, receiver, _renamed(cohort.series[3][:SLICES]), tls_args)  # warm-up (inference built)
        quiet = _median_latency(node, receiver, cohort, tls_args)
        with SilentClients(node.port, count=50, seconds=60) as silent:
            assert _wait(lambda: node.receiver.gate.counts()["pending"] >= 45, 20), node.receiver.gate.counts()
            loaded = _median_latency(node, receiver, cohort, tls_args)
            report = silent.stop()
        print(f"{mode}: quiet {quiet:.3f} s, 50 silent clients {loaded:.3f} s, reopened {report}")
        assert report.get("reopened", 0) >= 50, report  # the node closed them (pending timeout) and they came back
        assert loaded <= 1.5 * quiet, (quiet, loaded)
    finally:
        node.stop()
        receiver.stop()
