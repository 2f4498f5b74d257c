"""Small shared pieces of the DICOM node: the settings error, UID checks, fingerprints, destinations, JSON I/O."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class DicomNodeError(ValueError):
    """A node setting is invalid (the message names the setting)."""


def default_work_dir() -> Path:
    """The node's state folder when ``work_dir`` is not set: ``/var/lib/fairdro-node`` for root, else
    ``$XDG_STATE_HOME/fairdro-node`` (``~/.local/state/fairdro-node`` when XDG_STATE_HOME is unset or relative)."""
    if os.geteuid() == 0:
        return Path("/var/lib/fairdro-node")
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "fairdro-node"


def safe_uid(value: Any) -> str | None:
    """The UID as a string when it is safe as a file name (digits and dots, at most 64 characters), else None."""
    text = "" if value is None else str(value).strip()
    return text if len(text) <= 64 and _UID.fullmatch(text) else None


def series_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """sha256 of the sorted SOP Instance UIDs (one per line): equal for the same instance set."""
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives the results (C-STORE SCP).

    ``tls`` None follows the node's ``tls.enabled``; ``tls_hostname``, when set, is the name the destination's
    certificate must carry (checked on top of the CA signature).
    """

    ae_title: str
    host: str
    port: int
    tls: bool | None = None
    tls_hostname: str | None = None

    @property
    def key(self) -> str:
        """``AE@host:port``, the destination's name in logs and ``delivery.json``."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, item: Mapping[str, Any] | Destination) -> Destination:
        """Build from ``{"ae_title", "host", "port"[, "tls", "tls_hostname"]}``, refusing incomplete entries."""
        if isinstance(item, Destination):
            return item
        try:
            tls = item.get("tls")
            hostname = item.get("tls_hostname")
            dest = cls(
                str(item["ae_title"]).strip(),
                str(item["host"]).strip(),
                int(item["port"]),
                None if tls is None else bool(tls),
                None if hostname in (None, "") else str(hostname),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DicomNodeError(f"destinations: each entry needs ae_title, host and port; got {item!r}.") from err
        if not dest.ae_title or len(dest.ae_title) > 16 or not dest.host or not 0 < dest.port < 65536:
            raise DicomNodeError(f"destinations: invalid entry {item!r} (AE title 1-16 characters, port 1-65535).")
        return dest
