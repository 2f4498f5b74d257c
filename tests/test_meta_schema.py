"""How the tests find the metadata schema: environment variable, cache, the metadata's URL, then the offline copy."""

import json

import conftest
import pytest

SCHEMA = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object", "properties": {"version": {}}}


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty cache, no offline copy, no environment variable; returns (cache dir, offline dir, a file:// URL)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(conftest.SCHEMA_ENV, raising=False)
    offline = tmp_path / "shared"
    monkeypatch.setattr(conftest, "OFFLINE_SCHEMA_DIR", offline)
    served = tmp_path / "served" / "meta_schema_x.json"
    served.parent.mkdir()
    served.write_text(json.dumps(SCHEMA))
    return tmp_path / "cache", offline, served.as_uri()


def test_the_url_is_downloaded_into_the_cache_and_reused(places):
    cache, _, url = places
    path, how = conftest.resolve_meta_schema(url)
    assert path == cache / "fairdro_bundle" / "meta_schema_x.json" and how == f"downloaded from {url}"
    assert json.loads(path.read_text()) == SCHEMA
    path, how = conftest.resolve_meta_schema(url)
    assert how == f"cache {path}"  # the second run does not download again


def test_without_network_the_offline_copy_is_used(places, tmp_path):
    _, offline, _ = places
    offline.mkdir()
    (offline / "meta_schema_x.json").write_text(json.dumps(SCHEMA))
    unreachable = (tmp_path / "nowhere" / "meta_schema_x.json").as_uri()  # a download that fails
    path, how = conftest.resolve_meta_schema(unreachable)
    assert path == offline / "meta_schema_x.json" and how.startswith("offline copy")


def test_no_source_gives_a_reason_naming_each_one(places, tmp_path):
    cache, offline, _ = places
    unreachable = (tmp_path / "nowhere" / "meta_schema_x.json").as_uri()
    path, why = conftest.resolve_meta_schema(unreachable)
    assert path is None
    for part in (conftest.SCHEMA_ENV, str(cache / "fairdro_bundle" / "meta_schema_x.json"), unreachable,
                 str(offline / "meta_schema_x.json")):  # fmt: skip
        assert part in why, part


def test_a_download_that_is_not_a_schema_is_not_cached(places, tmp_path):
    cache, _, _ = places
    page = tmp_path / "served" / "meta_schema_x.json"
    page.write_text("<html>rate limited</html>")
    path, why = conftest.resolve_meta_schema(page.as_uri())
    assert path is None and "did not return a JSON schema" in why
    assert not list((cache / "fairdro_bundle").iterdir())


def test_the_environment_variable_wins_and_is_checked(places, tmp_path, monkeypatch):
    chosen = tmp_path / "mine.json"
    chosen.write_text(json.dumps(SCHEMA))
    monkeypatch.setenv(conftest.SCHEMA_ENV, str(chosen))
    assert conftest.resolve_meta_schema(places[2]) == (chosen, f"${conftest.SCHEMA_ENV}")
    monkeypatch.setenv(conftest.SCHEMA_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        conftest.resolve_meta_schema(places[2])
