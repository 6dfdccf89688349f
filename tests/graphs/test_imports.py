"""Every module of `lavida_agent.graphs` imports without torch (fresh interpreter each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
MODULES = sorted(p.stem for p in GRAPHS.glob("*.py") if p.stem != "__init__")


def test_module_list_is_complete():
    assert {"engine", "state", "context", "runtime", "t2i", "edit", "ground", "understand",
            "critique", "session", "persistence", "events"} <= set(MODULES)  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_torch(module):
    code = (f"import sys, lavida_agent.graphs.{module}; "
            "print('torch' in sys.modules, 'lavida_agent.model' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], f"{module}: {out.stdout}"


def test_load_engine_fails_clearly_without_model(monkeypatch):
    """`load_engine` is the only path to the model; without it the error says what to do."""
    from lavida_agent.graphs import engine as engine_mod

    engine_mod.load_engine.cache_clear()
    monkeypatch.setitem(sys.modules, "lavida_agent.model.pipeline_lavida", None)  # import -> ImportError
    with pytest.raises(engine_mod.EngineUnavailableError, match="Context\\(engine="):
        engine_mod.load_engine()
    engine_mod.load_engine.cache_clear()


def test_langgraph_json_names_every_workflow():
    import importlib
    import json

    spec = json.loads((GRAPHS.parent / "langgraph.json").read_text())
    assert spec["dependencies"] == ["."]
    assert set(spec["graphs"]) == {"t2i", "edit", "ground", "understand", "critique"}
    for name, target in spec["graphs"].items():
        module, attr = target.split(":")
        graph = getattr(importlib.import_module(module), attr)
        assert graph.name == name
        assert graph.checkpointer is None  # the LangGraph server supplies persistence
    # ... with the same allow-list as `persistence.make_serde` (no "unregistered type" warnings)
    from lavida_agent.graphs.state import STATE_VALUE_TYPES

    assert spec["checkpointer"]["serde"]["allowed_msgpack_modules"] == [[c.__module__, c.__name__] for c in STATE_VALUE_TYPES]
