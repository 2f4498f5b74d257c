"""The metadata schema that ``make verify`` and the tests check ``configs/metadata*.json`` against.

It is the copy shipped in ``tools/schemas/`` (``tools/schemas/SOURCE.md`` gives its source and licence), or the file
named by ``$BUNDLE_META_SCHEMA``. Nothing is downloaded and nothing outside the repository is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: names a schema file to use instead of the shipped one
SCHEMA_ENV = "BUNDLE_META_SCHEMA"
#: the shipped copy of the schema that the bundle's metadata names by URL
SHIPPED_SCHEMA = Path(__file__).resolve().parent / "schemas" / "meta_schema_20240725.json"


def meta_schema_path() -> Path:
    """The schema to verify metadata against: ``$BUNDLE_META_SCHEMA`` when set and not empty, else ``SHIPPED_SCHEMA``.

    Raises:
        FileNotFoundError: the chosen file cannot be read.
        ValueError: the chosen file is not a JSON schema (a JSON object with ``properties``).
    """
    chosen = os.environ.get(SCHEMA_ENV)
    path = Path(chosen) if chosen else SHIPPED_SCHEMA
    where = f"${SCHEMA_ENV}={chosen}" if chosen else f"the shipped schema {path}"
    fix = "fix or unset it" if chosen else "restore it with `git checkout -- tools/schemas`"
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FileNotFoundError(f"{where} cannot be read ({e.strerror}); {fix}.") from e
    except ValueError as e:
        raise ValueError(f"{where} is not JSON ({e}); {fix}.") from e
    if not isinstance(content, dict) or "properties" not in content:
        raise ValueError(f"{where} is JSON but not a JSON schema (no 'properties' object); {fix}.")
    return path
