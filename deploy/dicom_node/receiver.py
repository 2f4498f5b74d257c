"""The storage SCP: allow-listed associations, checked CT instances, written durably to the spool, then acknowledged."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from typing import Any

import pydicom
from pydicom import uid as dicom_uid
from pydicom.uid import CTImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from .metrics import NodeMetrics
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
                 metrics: NodeMetrics):  # fmt: skip
        self.ae_title, self.allowed_calling_aets = ae_title, list(allowed_calling_aets)
        self.spool, self.disk, self.metrics = spool, disk, metrics
        self.server: Any = None

    def start(self, bind_address: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Listen (non-blocking); returns the port actually bound."""
        ae = _AllowListAE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts  # non-CT classes reach the handler to be refused
        ae.add_supported_context(CTImageStorage, list(CT_COMPRESSED_TRANSFER_SYNTAXES))  # added to the defaults
        ae.add_supported_context(Verification)
        ae.require_calling_aet = self.allowed_calling_aets
        ae.refuse_everyone = not self.allowed_calling_aets
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        self.server = ae.start_server((bind_address, port), block=False, evt_handlers=handlers, ssl_context=ssl_context)
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def listening(self) -> bool:
        return self.server is not None

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        logger.warning(
            "Refused association from calling AE %r at %s: not in allowed_calling_aets.",
            requestor.ae_title, requestor.address,
        )  # fmt: skip

    def _refuse(self, status: int, sop_uid: str, why: str) -> int:
        self.metrics.inc("refused")
        logger.warning("Refused instance %s (status 0x%04X): %s.", sop_uid, status, why)
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
        try:
            _ = ds.pixel_array
        except Exception as err:  # truncated pixel data, unsupported encoding, ...
            raise _Refused(STATUS_CANNOT_UNDERSTAND, f"cannot decode pixel data ({type(err).__name__})") from err
        return series, sop

    def _on_store(self, event: evt.Event) -> int:
        """C-STORE handler: check the instance, write it durably to the spool, then acknowledge."""
        sop_uid = str(event.request.AffectedSOPInstanceUID or "(unknown)")
        sop_class = event.context.abstract_syntax
        if sop_class != CTImageStorage:
            name = getattr(pydicom.uid.UID(sop_class), "name", sop_class)
            return self._refuse(STATUS_SOP_CLASS_NOT_SUPPORTED, sop_uid, f"SOP class {name} is not CT Image Storage")
        if not self.disk.above_floor():
            self.metrics.inc("disk_refused")
            logger.error("Instance %s answered 0xA700: free space is below min_free_bytes; not stored.", sop_uid)
            return STATUS_OUT_OF_RESOURCES
        try:
            series, sop = self._check(event, sop_uid)
        except _Refused as refusal:
            return self._refuse(refusal.status, sop_uid, str(refusal))
        try:
            self.spool.write(series, sop, event.encoded_dataset(include_meta=True))
        except OSError as err:
            self.metrics.inc("disk_refused")
            logger.error("Cannot spool instance %s of series %s: %s.", sop, series, err)
            return STATUS_OUT_OF_RESOURCES
        self.metrics.inc("stored")
        return STATUS_SUCCESS
