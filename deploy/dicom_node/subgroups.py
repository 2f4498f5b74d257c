"""Which subgroup routes the network for a series: a fixed value, a header attribute, or a lookup table."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from .settings import DicomNodeError

logger = logging.getLogger(__name__)


class SubgroupSource:
    """Chooses the subgroup routing of a series from the node settings (never logs header values).

    Args:
        mode: ``"fixed"`` (``value`` for every series), ``"attribute"`` (a header attribute, mapped through
            ``mapping`` when one is given) or ``"lookup"`` (a CSV/JSON ``table`` keyed by ``key``).
        value: the subgroup of mode ``fixed`` (None: unknown routing).
        attribute: header keyword read by mode ``attribute``.
        mapping: header value -> subgroup for mode ``attribute``.
        table: CSV (columns ``key``'s name or ``key``, and ``subgroup``) or JSON (``{key value: subgroup}`` or a
            list of records) for mode ``lookup``; read again for every series so edits apply at once.
        key: ``"PatientID"`` or ``"StudyInstanceUID"``, the header value looked up in ``table``.
        subgroups: the network's subgroups; anything else resolves to None (the 'unknown' routing).
    """

    def __init__(
        self,
        mode: str = "fixed",
        value: str | None = None,
        attribute: str = "InstitutionName",
        mapping: Mapping[str, str] | None = None,
        table: str | Path | None = None,
        key: str = "PatientID",
        subgroups: Sequence[str] | None = None,
    ):
        if mode not in ("fixed", "attribute", "lookup"):
            raise DicomNodeError(f"subgroup_source.mode must be 'fixed', 'attribute' or 'lookup', got {mode!r}.")
        self.mode, self.value, self.attribute, self.key = mode, value, attribute, key
        self.mapping = {str(k): str(v) for k, v in (mapping or {}).items()}
        self.table = Path(table) if table else None
        self.subgroups = list(subgroups) if subgroups is not None else None
        if mode == "fixed" and value is not None and self.subgroups is not None and value not in self.subgroups:
            raise DicomNodeError(f"subgroup_source.value {value!r} is not one of the subgroups {self.subgroups}.")
        if mode == "attribute" and tag_for_keyword(attribute) is None:
            raise DicomNodeError(f"subgroup_source.attribute {attribute!r} is not a DICOM keyword.")
        if mode == "lookup":
            if key not in ("PatientID", "StudyInstanceUID"):
                raise DicomNodeError(f"subgroup_source.key must be 'PatientID' or 'StudyInstanceUID', got {key!r}.")
            if self.table is None or not self.table.is_file():
                raise DicomNodeError(f"subgroup_source.table {table!r} is not a file (needed by mode 'lookup').")
            self.load_table()

    def load_table(self) -> dict[str, str]:
        """The lookup table as ``{key value: subgroup}``.

        Raises:
            DicomNodeError: the file cannot be read or has no ``subgroup`` column / values.
        """
        path = self.table
        try:
            if path.suffix.lower() == ".json":
                content = json.loads(path.read_text(encoding="utf-8"))
                rows = content if isinstance(content, list) else [{"key": k, "subgroup": v} for k, v in content.items()]
            else:
                with open(path, newline="", encoding="utf-8-sig") as f:
                    rows = list(csv.DictReader(f))
            return {str(row.get(self.key, row.get("key", ""))).strip(): str(row["subgroup"]).strip() for row in rows}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            raise DicomNodeError(
                f"subgroup_source.table {path}: cannot read it as a {self.key} -> subgroup table "
                f"(CSV with columns {self.key!r}/'key' and 'subgroup', or JSON): {type(err).__name__}."
            ) from err

    def resolve(self, header: Dataset, series_uid: str) -> str | None:
        """The subgroup of a series, or None (unknown routing) with a log line when it cannot be resolved."""
        if self.mode == "fixed":
            return self.value
        name = self.attribute if self.mode == "attribute" else self.key
        raw = header.get(name)
        text = "" if raw is None else str(raw).strip()
        if not text:
            return self._unknown(series_uid, f"the series has no {name}")
        if self.mode == "attribute":
            candidate = self.mapping.get(text) if self.mapping else text
            where = f"subgroup_source.mapping has no entry for its {name} (value not logged)"
        else:
            try:
                candidate = self.load_table().get(text)
            except DicomNodeError as err:
                return self._unknown(series_uid, str(err))
            where = f"{self.table} has no row for its {name} (value not logged)"
        if candidate is None:
            return self._unknown(series_uid, where)
        if self.subgroups is not None and candidate not in self.subgroups:
            shown = "a value" if candidate == text else repr(candidate)  # header values are never logged
            return self._unknown(series_uid, f"{name} gives {shown} that is not one of {self.subgroups}")
        return candidate

    @staticmethod
    def _unknown(series_uid: str, why: str) -> None:
        logger.warning("Series %s: subgroup unresolved (%s); using the 'unknown' subgroup routing.", series_uid, why)
        return None
