"""Fixtures of the surface tests: a `FakeEngine` and an agent on it (4 steps, stopping at the
first accepted attempt)."""

from __future__ import annotations

import pytest

from lavida_agent.api import LavidaAgent
from tests.fakes import FakeEngine


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def agent(engine):
    with LavidaAgent(engine=engine, num_steps=4, selection="accept") as a:
        yield a
