"""Throw-away certificate authorities and certificates for the DICOM node's TLS tests (``cryptography``).

:func:`make_pki` writes, into one folder, PEM files for a test CA, certificates it signs (``node``, ``peer``)
and a second, untrusted CA with a certificate of its own (``rogue``). Every certificate names ``localhost`` and
``127.0.0.1``, serves as TLS server and client, and is valid for one day. Never use them outside tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyAndCert = tuple[rsa.RSAPrivateKey, x509.Certificate]


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FairDRO test PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])  # fmt: skip


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(common_name: str) -> KeyAndCert:
    """A self-signed CA certificate and its key."""
    key = _key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca: tuple[rsa.RSAPrivateKey, x509.Certificate], common_name: str
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A certificate signed by ``ca`` for localhost / 127.0.0.1, usable by a TLS server and a TLS client."""
    ca_key, ca_cert = ca
    key = _key()
    alt = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(_name(common_name), ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(usage, critical=False)
        .add_extension(alt, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(folder: Path, stem: str, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> dict[str, Path]:
    crt, pem_key = folder / f"{stem}.crt", folder / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    raw = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # fmt: skip
    pem_key.write_bytes(raw)
    pem_key.chmod(0o600)
    return {"certificate": crt, "private_key": pem_key}


def make_pki(folder: Path) -> dict[str, dict[str, Path]]:
    """Write the test PKI into ``folder``: ``{"ca": {"certificate"}, "node": {...}, "peer": {...},
    "rogue_ca": {...}, "rogue": {...}}`` with ``certificate`` and ``private_key`` paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = make_ca("FairDRO test CA"), make_ca("Untrusted test CA")
    return {
        "ca": _write(folder, "ca", *ca),
        "node": _write(folder, "node", *issue(ca, "FAIRDRO node")),
        "peer": _write(folder, "peer", *issue(ca, "test peer")),
        "rogue_ca": _write(folder, "rogue_ca", *rogue_ca),
        "rogue": _write(folder, "rogue", *issue(rogue_ca, "rogue peer")),
    }
