"""DICOM over TLS for the node: the storage SCP's server context and the sender's client contexts."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import DicomNodeError

logger = logging.getLogger(__name__)

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class TlsSettings:
    """The node's TLS settings (``tls`` in ``dicom_node.json``); ``enabled`` False keeps plain TCP."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_bundle: Path | None = None
    require_client_cert: bool = True
    min_version: str = "1.2"
    handshake_timeout_seconds: float = 10.0

    @classmethod
    def parse(cls, value: Mapping[str, Any] | TlsSettings | None) -> TlsSettings:
        """Check the settings; with ``enabled`` the certificate, key and CA bundle must be readable files."""
        if isinstance(value, TlsSettings):
            return value
        value = dict(value or {})
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise DicomNodeError(f"tls: unknown setting(s) {unknown}.")
        paths = {k: Path(value[k]) if value.get(k) else None for k in ("certificate", "private_key", "ca_bundle")}
        settings = cls(
            enabled=bool(value.get("enabled", False)),
            require_client_cert=bool(value.get("require_client_cert", True)),
            min_version=str(value.get("min_version", "1.2")),
            handshake_timeout_seconds=float(value.get("handshake_timeout_seconds", 10.0)),
            **paths,
        )
        if settings.min_version not in VERSIONS:
            raise DicomNodeError(f"tls.min_version must be '1.2' or '1.3', got {settings.min_version!r}.")
        if settings.handshake_timeout_seconds <= 0:
            raise DicomNodeError("tls.handshake_timeout_seconds must be > 0.")
        if settings.enabled:
            for name, path in paths.items():
                if path is None or not path.is_file():
                    raise DicomNodeError(f"tls.{name} must name a readable file when tls.enabled is true, got {path}.")
        return settings

    def _load(self, context: ssl.SSLContext) -> None:
        context.minimum_version = VERSIONS[self.min_version]
        try:
            context.load_cert_chain(str(self.certificate), str(self.private_key))
            context.load_verify_locations(cafile=str(self.ca_bundle))
        except (ssl.SSLError, OSError) as err:
            raise DicomNodeError(f"tls: cannot load the certificate, key or CA bundle: {err}.") from err

    def server_context(self) -> ssl.SSLContext:
        """For the storage SCP: our certificate; client certificates signed by the CA required (or optional)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the handshake runs in the connection's thread (.server)
        self._load(context)
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        return context

    def client_context(self, check_hostname: bool) -> ssl.SSLContext:
        """For the sender: the destination's certificate must be signed by the CA (and name it when asked);
        our certificate is presented for mutual authentication."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._load(context)
        context.check_hostname = check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
        return context
