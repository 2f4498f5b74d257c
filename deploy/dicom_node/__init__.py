"""The FairDRO DICOM node: CT series in over DICOM (optionally TLS), the bundle's RTSTRUCT (and SEG) out.

Parts, one job each: :mod:`.receiver` (storage SCP into the spool), :mod:`.worker` (quiet series -> the bundle's
DICOM inference -> ``results/``), :mod:`.inference` (that inference workflow, built once per process or, with
``cold``, per series), :mod:`.sender` (outbox and delivery with back-off), :mod:`.storage` (disk floor, retention,
owner-only folders), :mod:`.health` and :mod:`.metrics` (HTTP probes, Prometheus), :mod:`.tls`, and :mod:`.node`,
which puts them together. Documentation: ``deploy/dicom_node.md``. The bundle's ``scripts`` package must be
importable (``PYTHONPATH=bundle``), as for every bundle command.
"""

from .node import DicomNode
from .receiver import CT_COMPRESSED_TRANSFER_SYNTAXES
from .settings import Destination, DicomNodeError, safe_uid, series_fingerprint
from .subgroups import SubgroupSource
from .tls import TlsSettings

__all__ = [
    "CT_COMPRESSED_TRANSFER_SYNTAXES",
    "Destination",
    "DicomNode",
    "DicomNodeError",
    "SubgroupSource",
    "TlsSettings",
    "safe_uid",
    "series_fingerprint",
]
