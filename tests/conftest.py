"""Shared fixtures: an isolated LAVIDA_HOME per test, and the `slow` gate (RUN_SLOW=1)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own artifact store and database folder."""
    monkeypatch.setenv("LAVIDA_HOME", str(tmp_path / "lavida_home"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
