"""Fixtures for the workflow tests: an artifact store, a scripted engine, a context."""

from __future__ import annotations

import pytest

from lavida_agent.graphs.context import Context
from lavida_agent.tools.artifacts import ArtifactStore
from tests.fakes import FakeEngine


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def ctx(engine, store):
    return Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3, seed=7, selection="accept")
