"""The storage SCP: allow-listed associations, checked CT instances, written durably to the spool, then acknowledged."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom import uid as dicom_uid
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import CTImageStorage
from pydicom.valuerep import VR
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from .gate import ConnectionGate, Refusals
from .limits import Limits, TransferBudget
from .metrics import NodeMetrics
from .server import start_server
from .settings import safe_uid
from .spool import Spool
from .storage import DiskGuard

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
# CT Image Storage is also accepted compressed, in every transfer syntax the pinned decoders read (see the
# "Compressed transfer syntaxes" section of the bundle's docs/README.md); instances are stored as received, never
# transcoded. JPEG Extended 12-bit (.51) is left out: no decoder with a licence compatible with Apache-2.0 reads it.
CT_COMPRESSED_TRANSFER_SYNTAXES = (
    dicom_uid.JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    dicom_uid.JPEGLossless,  # 1.2.840.10008.1.2.4.57
    dicom_uid.JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    dicom_uid.JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    dicom_uid.JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    dicom_uid.JPEG2000,  # 1.2.840.10008.1.2.4.91
    dicom_uid.RLELossless,  # 1.2.840.10008.1.2.5
)
_VR_CODES = {vr.value.encode() for vr in VR}  # an explicit VR element has one at bytes 4-5 (as pydicom detects it)
_NO_PEER = "*NO-PEER-ALLOWED*"  # 17 characters: longer than any AE title a peer can send, so it matches nobody


class _Refused(Exception):
    """An instance that is not stored: the C-STORE status and the reason."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class _AllowListAE(AE):
    """pynetdicom AE whose calling-AE allow-list may be empty meaning *nobody* (pynetdicom reads [] as everyone)."""

    refuse_everyone = False

    @property
    def require_calling_aet(self) -> list[str]:  # read by pynetdicom's ACSE for every association request
        return [_NO_PEER] if self.refuse_everyone else AE.require_calling_aet.fget(self)

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        AE.require_calling_aet.fset(self, ae_titles)


class Receiver:
    """Storage SCP of the node (C-ECHO and C-STORE), writing accepted CT instances into the :class:`Spool`.

    Below the disk floor every C-STORE is answered 0xA700 (out of resources) with an ERROR line; associations
    are still accepted so that senders see that status.
    """

    def __init__(self, ae_title: str, allowed_calling_aets: Sequence[str], spool: Spool, disk: DiskGuard,
                 metrics: NodeMetrics, limits: Limits | None = None):  # fmt: skip
        self.ae_title, self.allowed_calling_aets = ae_title, list(allowed_calling_aets)
        self.spool, self.disk, self.metrics = spool, disk, metrics
        self.limits = limits or Limits()
        self.refusals = Refusals(metrics)
        self.gate = ConnectionGate(self.limits, self.refusals)
        self.budget = TransferBudget(self.limits, spool.spool_dir)
        self.server: Any = None

    def _make_ae(self) -> _AllowListAE:
        ae = _AllowListAE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts  # non-CT classes reach the handler to be refused
        ae.add_supported_context(CTImageStorage, list(CT_COMPRESSED_TRANSFER_SYNTAXES))  # added to the defaults
        ae.add_supported_context(Verification)
        ae.require_calling_aet = self.allowed_calling_aets
        ae.refuse_everyone = not self.allowed_calling_aets
        lim = self.limits
        ae.network_timeout, ae.acse_timeout = lim.network_timeout_seconds, lim.acse_timeout_seconds
        ae.dimse_timeout, ae.maximum_pdu_size = lim.dimse_timeout_seconds, lim.max_pdu_size
        # pynetdicom counts every connection thread, pending ones too; the gate applies the real limits first
        ae.maximum_associations = lim.max_associations + lim.max_pending_connections + 1
        return ae

    def start(self, bind_address: str, port: int, ssl_context: ssl.SSLContext | None,
              handshake_timeout: float = 10.0) -> int:  # fmt: skip
        """Listen (non-blocking); returns the port actually bound."""
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_DATA_RECV, self._on_data),
        ]
        guards = {"gate": self.gate, "refusals": self.refusals, "limits": self.limits}
        self.server = start_server(self._make_ae(), (bind_address, port), handlers, ssl_context,
                                   handshake_timeout=handshake_timeout, **guards)  # fmt: skip
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def listening(self) -> bool:
        return self.server is not None

    def _on_data(self, event: evt.Event) -> None:
        """A PDU arrived: before the association is requested this marks the connection (junk first: malformed)."""
        if not event.assoc.is_established and event.assoc.requestor.primitive is None:
            self.gate.saw_data(_key(event.assoc))

    def _on_requested(self, event: evt.Event) -> None:
        """A-ASSOCIATE-RQ: the calling AE title and the association limits; A-ASSOCIATE-RJ when refused."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        if self.allowed_calling_aets and calling in [a.strip() for a in self.allowed_calling_aets]:
            refusal = self.gate.associate(_key(assoc))
            reject = (0x02, 0x03, 0x02)  # rejected-transient, service provider (presentation), local limit exceeded
        else:
            refusal = ("unknown_calling_aet", "not in allowed_calling_aets")
            reject = (0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE title not recognised
        if refusal is None:
            assoc.acse_timeout = self.limits.acse_timeout_seconds  # the pending timeout no longer applies
            try:
                assoc.dul.socket.socket.settimeout(self.limits.network_timeout_seconds)
            except OSError:  # the peer closed at once and the socket is gone: the association ends on its own
                logger.debug("Association from %s closed before it began.", assoc.requestor.address)
            return
        cause, detail = refusal
        subject = f"association from calling AE {calling!r} at {assoc.requestor.address}"
        self.refusals.refuse(cause, subject, detail)
        self.gate.refused(_key(assoc))
        assoc.acse.send_reject(*reject)
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        subject = f"association from calling AE {requestor.ae_title!r} at {requestor.address}"
        self.refusals.refuse("rejected_by_acse", subject, "rejected by pynetdicom's association negotiation")

    def _refuse(self, status: int, sop_uid: str, why: str, cause: str = "invalid_instance") -> int:
        self.refusals.refuse(cause, f"instance {sop_uid} (status 0x{status:04X})", why)
        self.metrics.inc("refused")  # counters after the line (see Refusals)
        return status

    @staticmethod
    def _check(event: evt.Event, sop_uid: str) -> tuple[str, str]:
        """(series UID, SOP UID) of an incoming instance that may be stored; raises :class:`_Refused` otherwise."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta  # the transfer syntax, needed to decode the pixel data
            series_uid, ds_sop_uid = ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
            missing = [k for k, v in (("SeriesInstanceUID", series_uid), ("SOPInstanceUID", ds_sop_uid)) if not v]
            if "PixelData" not in ds:
                missing.append("PixelData")
        except Exception as err:  # pydicom raises many types for a stream it cannot parse
            raise _Refused(STATUS_CANNOT_UNDERSTAND, f"cannot decode the data set ({type(err).__name__})") from err
        if missing:
            raise _Refused(STATUS_DATASET_MISMATCH, f"missing {', '.join(missing)}")
        series, sop = safe_uid(series_uid), safe_uid(ds_sop_uid)
        if series is None or sop is None:
            raise _Refused(STATUS_DATASET_MISMATCH, "SeriesInstanceUID/SOPInstanceUID is not a valid UID")
        if sop != sop_uid:
            raise _Refused(STATUS_DATASET_MISMATCH, f"data set SOPInstanceUID is {sop}")
        _check_image(ds, str(event.context.abstract_syntax), event.encoded_dataset(include_meta=False))
        return series, sop

    def _on_store(self, event: evt.Event) -> int:
        """C-STORE handler: check the instance, write it durably to the spool, then acknowledge."""
        sop_uid = str(event.request.AffectedSOPInstanceUID or "(unknown)")
        sop_class = event.context.abstract_syntax
        if sop_class != CTImageStorage:
            name = getattr(pydicom.uid.UID(sop_class), "name", sop_class)
            detail = f"SOP class {name} is not CT Image Storage"
            return self._refuse(STATUS_SOP_CLASS_NOT_SUPPORTED, sop_uid, detail, "sop_class")
        if not self.disk.above_floor():
            logger.error("Instance %s answered 0xA700 (cause=disk_floor): free space is below min_free_bytes; not "
                         "stored.", sop_uid)  # fmt: skip
            self.metrics.inc("disk_refused")  # counters after the line (see Refusals)
            self.refusals.count("disk_floor")
            return STATUS_OUT_OF_RESOURCES
        try:
            series, sop = self._check(event, sop_uid)
        except _Refused as refusal:
            return self._refuse(refusal.status, sop_uid, str(refusal))
        data = event.encoded_dataset(include_meta=True)
        if over := self.budget.check(event.assoc, series, len(data)):
            return self._refuse(STATUS_OUT_OF_RESOURCES, sop_uid, f"series {series}: {over[1]}", over[0])
        try:
            self.spool.write(series, sop, data)
        except OSError as err:
            self.metrics.inc("disk_refused")
            logger.error("Cannot spool instance %s of series %s: %s.", sop, series, err)
            return STATUS_OUT_OF_RESOURCES
        self.metrics.inc("stored")
        return STATUS_SUCCESS


def _check_image(ds: pydicom.Dataset, sop_class: str, raw: bytes) -> None:
    """Raise :class:`_Refused` when the data set (``raw``: as received) contradicts its C-STORE or its pixel data
    cannot be decoded."""
    try:
        contradiction = _contradiction(ds, sop_class, raw)
    except Exception as err:  # an element read here (Rows, Columns, ...) cannot be decoded
        raise _Refused(STATUS_CANNOT_UNDERSTAND, f"cannot decode the image attributes ({type(err).__name__})") from err
    if contradiction is not None:
        raise _Refused(*contradiction)
    try:
        _ = ds.pixel_array
    except Exception as err:  # truncated pixel data, unsupported encoding, ...
        raise _Refused(STATUS_CANNOT_UNDERSTAND, f"cannot decode pixel data ({type(err).__name__})") from err


def _contradiction(ds: pydicom.Dataset, sop_class: str, raw: bytes) -> tuple[int, str] | None:
    """``(C-STORE status, reason)`` when a decoded data set contradicts its C-STORE, else None: encoded in the other VR
    encoding (explicit or implicit) than the negotiated transfer syntax, file meta elements (group 0002) inside it, a
    SOPClassUID other than the presentation context's, or native pixel data whose length is not Rows x Columns x
    frames x samples x bits allocated (plus one padding byte). pydicom decodes the first and the last anyway (it
    guesses the encoding, drops excess pixel bytes), but the stored file would contradict its own file meta; the
    worker's reader would take group 0002 in the stored file as the file meta."""
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_deflated and len(raw) >= 6 and (raw[4:6] in _VR_CODES) == syntax.is_implicit_VR:
        return STATUS_CANNOT_UNDERSTAND, f"the data set is not encoded in the negotiated transfer syntax {syntax.name}"
    if any(tag.group == 0x0002 for tag in ds.keys()):
        return STATUS_CANNOT_UNDERSTAND, "the data set holds file meta elements (group 0002), which never belong in it"
    if str(ds.get("SOPClassUID", "")) != sop_class:
        return STATUS_DATASET_MISMATCH, f"data set SOPClassUID {ds.get('SOPClassUID')} is not the context's {sop_class}"
    if syntax.is_encapsulated:
        return None
    expected, actual = get_expected_length(ds, "bytes"), len(ds.PixelData)
    if actual not in (expected, expected + 1):
        return (
            STATUS_CANNOT_UNDERSTAND,
            f"pixel data is {actual} bytes; Rows x Columns x frames x samples x bits allocated give {expected}",
        )
    return None


def _key(assoc: Any) -> tuple:
    """The connection's key in the gate (set by the server's handler; the requestor's address otherwise)."""
    return getattr(assoc, "fairdro_key", None) or (assoc.requestor.address, assoc.requestor.port)
