"""Fixtures of the surface tests: a `FakeEngine`, an agent on it (4 steps, stopping at the
first accepted attempt), and another process holding a thread (`other_process`)."""

from __future__ import annotations

import subprocess
import sys

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


_HOLDER = """
import sys
from lavida_agent import live
live.hold(sys.argv[1], sys.argv[2], run_id=sys.argv[3], doing=f"run {sys.argv[3]}", what="x")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def other_process(tmp_path):
    """Start a process that holds a thread (`hold(runs_dir, thread_id, run_id)`) until it is
    killed; every one still alive is killed at the end."""
    procs = []

    def hold(runs_dir, thread_id: str, run_id: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(runs_dir), thread_id, run_id],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(10)
