"""DICOM over TLS: the node's storage SCP and sender with a throw-away CA (tools/testcerts.py, ``cryptography``)."""

import logging
import ssl
import sys
from pathlib import Path

import pytest
from dicom_node import DicomNodeError, TlsSettings
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from test_dicom_node import Receiver, _node, _uid, _wait, build_cohort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from testcerts import make_pki  # noqa: E402


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("node_tls_cohort"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_context(pki, who: str | None, max_version=None) -> ssl.SSLContext:
    """A peer's client context: trusts the test CA; presents ``who``'s certificate (None: no certificate)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]["certificate"]))
    if who is not None:
        context.load_cert_chain(str(pki[who]["certificate"]), str(pki[who]["private_key"]))
    if max_version is not None:
        context.maximum_version = max_version
    return context


def _echo(port, calling="SCU", tls_args=None) -> bool:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FAIRDRO", tls_args=tls_args)
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


class TlsReceiver(Receiver):
    """The test's PACS over TLS: presents ``who``'s certificate and requires a client certificate from the CA."""

    def __init__(self, pki, who: str):
        self.received, self.status = [], 0
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]["certificate"]))
        context.load_cert_chain(str(pki[who]["certificate"]), str(pki[who]["private_key"]))
        context.verify_mode = ssl.CERT_REQUIRED
        ae = AE("PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers, ssl_context=context)
        self.port = self.server.server_address[1]


def _tls(pki, **changes):
    return {
        "enabled": True,
        "certificate": str(pki["node"]["certificate"]),
        "private_key": str(pki["node"]["private_key"]),
        "ca_bundle": str(pki["ca"]["certificate"]),
        **changes,
    }


def test_tls_settings_are_checked(pki, tmp_path):
    assert TlsSettings.parse(None).enabled is False
    with pytest.raises(DicomNodeError, match="tls.certificate"):
        TlsSettings.parse({"enabled": True})
    with pytest.raises(DicomNodeError, match="min_version"):
        TlsSettings.parse(_tls(pki, min_version="1.1"))
    with pytest.raises(DicomNodeError, match="unknown"):
        TlsSettings.parse(_tls(pki, cipher="RC4"))
    plain_dest = [{"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "tls": True}]
    with pytest.raises(DicomNodeError, match="tls.enabled"):
        _node(tmp_path, "x.pt", destinations=plain_dest)
    wrong_key = _tls(pki, private_key=str(pki["peer"]["private_key"]))  # a key that does not match the certificate
    with pytest.raises(DicomNodeError, match="cannot load"):
        TlsSettings.parse(wrong_key).server_context()


def test_tls_round_trip_and_refusals(cohort, pki, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    series = cohort.series[0]
    good = (_client_context(pki, "peer"), "localhost")
    receiver = TlsReceiver(pki, "peer")
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port, "tls_hostname": "localhost"}
    node = _node(tmp_path, cohort.ckpt, destinations=[dest], tls=_tls(pki), min_free_bytes=0)
    node.start()
    try:
        # refused at the handshake: plain TCP, no client certificate, a certificate from another CA
        assert not _echo(node.port)
        assert not _echo(node.port, tls_args=(_client_context(pki, None), "localhost"))
        assert not _echo(node.port, tls_args=(_client_context(pki, "rogue"), "localhost"))
        # a good certificate with a calling AE title that is not allow-listed is still refused
        assert not _echo(node.port, calling="INTRUDER", tls_args=good)
        assert _echo(node.port, tls_args=good)
        assert node.status()["stored"] == 0
        refused_tls = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Refused TLS connection")]
        assert len(refused_tls) == 3, refused_tls
        assert any("INTRUDER" in r.getMessage() for r in caplog.records if r.name.startswith("dicom_node"))

        # CT in over TLS, RTSTRUCT out over TLS (the destination requires our client certificate)
        ae = AE("SCU")
        ae.add_requested_context(str(series[0].SOPClassUID))
        assoc = ae.associate("127.0.0.1", node.port, ae_title="FAIRDRO", tls_args=good)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in series]
        assoc.release()
        assert statuses == [0] * len(series)
        assert node.wait_idle(180), node.status()
        assert len(receiver.rtstructs(_uid(series))) == 1
    finally:
        node.stop()
        receiver.stop()


def test_sender_refuses_an_untrusted_or_misnamed_destination(cohort, pki, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    series = cohort.series[1]
    rogue = TlsReceiver(pki, "rogue")  # certificate signed by a CA the node does not trust
    misnamed = TlsReceiver(pki, "peer")  # trusted, but its certificate does not name the configured hostname
    dests = [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": rogue.port},
        {"ae_title": "PACS", "host": "127.0.0.1", "port": misnamed.port, "tls_hostname": "tps.example.org"},
    ]
    tls = _tls(pki, require_client_cert=False)
    node = _node(tmp_path, cohort.ckpt, destinations=dests, tls=tls, min_free_bytes=0)
    node.start()
    try:
        tls_args = (_client_context(pki, None), "localhost")  # no client certificate: allowed here
        ae = AE("SCU")
        ae.add_requested_context(str(series[0].SOPClassUID))
        assoc = ae.associate("127.0.0.1", node.port, ae_title="FAIRDRO", tls_args=tls_args)
        assert assoc.is_established
        assert [int(assoc.send_c_store(ds).Status) for ds in series] == [0] * len(series)
        assoc.release()
        assert _wait(lambda: node.status()["retries"] >= 4, 180), node.status()
        assert node.status()["delivered"] == 0 and not rogue.received and not misnamed.received
    finally:
        node.stop()
        rogue.stop()
        misnamed.stop()


def test_minimum_tls_version_is_enforced(cohort, pki, tmp_path):
    node = _node(tmp_path, cohort.ckpt, tls=_tls(pki, min_version="1.3"), min_free_bytes=0)
    node.start()
    try:
        old = (_client_context(pki, "peer", max_version=ssl.TLSVersion.TLSv1_2), "localhost")
        assert not _echo(node.port, tls_args=old)
        assert _echo(node.port, tls_args=(_client_context(pki, "peer"), "localhost"))
    finally:
        node.stop()
