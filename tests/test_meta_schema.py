"""The metadata schema ships with the repository (tools/schemas/, source and licence in SOURCE.md); the tests and
`make verify` use it unless BUNDLE_META_SCHEMA names another file (tools/bundle_schema.py)."""

import copy
import hashlib
import json
import re
from pathlib import Path

import bundle_schema
import jsonschema
import pytest
from bundle_schema import SCHEMA_ENV, SHIPPED_SCHEMA, meta_schema_path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SOURCE_NOTE = SHIPPED_SCHEMA.with_name("SOURCE.md")
#: the schema URL of model-zoo's bundles (Project-MONAI/model-zoo, e.g. spleen_ct_segmentation's metadata.json)
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


def _metadata(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text(encoding="utf-8"))


def test_the_shipped_copy_is_used_when_the_variable_is_unset_or_empty(monkeypatch):
    monkeypatch.delenv(SCHEMA_ENV, raising=False)
    assert meta_schema_path() == REPO / "tools" / "schemas" / "meta_schema_20240725.json"
    monkeypatch.setenv(SCHEMA_ENV, "")
    assert meta_schema_path() == SHIPPED_SCHEMA


def test_the_variable_overrides_and_is_checked(monkeypatch, tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"type": "object", "properties": {}}))
    monkeypatch.setenv(SCHEMA_ENV, str(mine))
    assert meta_schema_path() == mine
    monkeypatch.setenv(SCHEMA_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match=rf"\${SCHEMA_ENV}=.*missing.json cannot be read.*unset it"):
        meta_schema_path()
    (tmp_path / "page.json").write_text("<html>rate limited</html>")
    monkeypatch.setenv(SCHEMA_ENV, str(tmp_path / "page.json"))
    with pytest.raises(ValueError, match="page.json is not JSON"):
        meta_schema_path()
    (tmp_path / "list.json").write_text("[1, 2]")
    monkeypatch.setenv(SCHEMA_ENV, str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match="list.json is JSON but not a JSON schema"):
        meta_schema_path()


def test_a_missing_shipped_copy_is_an_error_that_says_how_to_restore_it(monkeypatch, tmp_path):
    monkeypatch.delenv(SCHEMA_ENV, raising=False)
    monkeypatch.setattr(bundle_schema, "SHIPPED_SCHEMA", tmp_path / "meta_schema_20240725.json")
    with pytest.raises(FileNotFoundError, match="the shipped schema .* cannot be read.*git checkout -- tools/schemas"):
        meta_schema_path()


@pytest.mark.parametrize("meta", ["metadata.json", "metadata_2d.json"])
def test_the_shipped_file_is_the_schema_the_metadata_names(meta):
    url = _metadata(meta)["schema"]
    assert url == SCHEMA_URL
    assert url.rsplit("/", 1)[1] == SHIPPED_SCHEMA.name  # a new schema URL needs a new shipped file


def test_the_source_note_names_the_url_the_licence_and_the_file_hash():
    note = SOURCE_NOTE.read_text(encoding="utf-8")
    assert SCHEMA_URL in note and "Apache License 2.0" in note
    (recorded,) = re.findall(r"SHA-256 `([0-9a-f]{64})`", note)
    assert hashlib.sha256(SHIPPED_SCHEMA.read_bytes()).hexdigest() == recorded


def test_the_shipped_schema_accepts_our_metadata_and_rejects_broken_metadata():
    """Checked with jsonschema directly (MONAI's verify_metadata is run on it by test_configs and test_verify)."""
    schema = json.loads(SHIPPED_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft201909Validator(schema)
    validator.check_schema(schema)
    for name in ("metadata.json", "metadata_2d.json"):
        assert list(validator.iter_errors(_metadata(name))) == [], name
    meta = _metadata("metadata.json")
    no_authors = {k: v for k, v in meta.items() if k != "authors"}
    assert [e.message for e in validator.iter_errors(no_authors)] == ["'authors' is a required property"]
    bad_channels = copy.deepcopy(meta)
    bad_channels["network_data_format"]["inputs"]["image"]["num_channels"] = "one"
    assert not validator.is_valid(bad_channels)
