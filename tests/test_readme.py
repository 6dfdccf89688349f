"""The README's Python tour runs as written (on the scripted fake engine, not the model)."""

from __future__ import annotations

import re
from pathlib import Path

import lavida_agent
from tests.fakes import FakeEngine

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = README.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README: no ```python block under {heading!r}"
    return match.group(1)


def test_readme_python_tour_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    original = lavida_agent.LavidaAgent.from_pretrained.__func__

    def on_fake_engine(cls, path=None, **settings):
        settings = {"engine": FakeEngine(), "home": str(tmp_path / "home"), **settings}
        return original(cls, path, **settings)

    monkeypatch.setattr(lavida_agent.LavidaAgent, "from_pretrained", classmethod(on_fake_engine))
    exec(compile(_python_block("### Python API"), str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "triangles.png").exists()
    out = capsys.readouterr().out
    assert re.search(r"^7 (accept|reject) ", out, re.M), out  # the first attempt's seed and verdict


def test_readme_langgraph_tour_streams_pauses_resumes_and_forks(tmp_path, monkeypatch, capsys):
    import lavida_agent.graphs.context as context_mod

    monkeypatch.chdir(tmp_path)
    real = context_mod.Context
    monkeypatch.setattr(context_mod, "Context", lambda **kw: real(engine=FakeEngine(), **kw))
    scope: dict = {"__name__": "readme"}
    exec(compile(_python_block("### LangGraph Studio"), str(README), "exec"), scope)
    assert "['__interrupt__']" in capsys.readouterr().out  # paused at review_plan
    first, fork = scope["out"], scope["other"]
    assert [a.seed for a in first["attempts"]][:1] == [7] and [a.seed for a in fork["attempts"]][:1] == [8]
    assert fork["plan"] == first["plan"]  # the branch kept the reviewed plan
