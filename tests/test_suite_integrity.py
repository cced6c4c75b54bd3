"""The test suite cannot pass vacuously: parity tests fail without the reference fixtures, and the fixtures the
repository ships are all there, byte for byte as the reference produced them (manifest.json)."""

import hashlib
import json

import pytest

from helpers import REPO, fixtures_dir


def test_parity_tests_fail_rather_than_skip_without_fixtures(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOWAN_FIXTURES", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="reference fixtures not found"):
        fixtures_dir()


def test_reference_fixtures_ship_with_the_repository():
    root = REPO / "tests" / "fixtures"
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "README.md":  # the one file edited in the repository (its notes on this copy)
            continue
        data = (root / entry["path"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
