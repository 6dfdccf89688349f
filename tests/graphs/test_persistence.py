"""Checkpointers: in memory, SQLite (sync, file) and AsyncSqliteSaver; crash and resume."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lavida_agent.graphs import t2i
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.persistence import async_checkpointer_from_path, checkpointer_from_path
from lavida_agent.graphs.state import T2IState
from tests.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "red circle and blue square"


@pytest.mark.parametrize("where", [":memory:", "file"])
def test_sync_checkpointers_round_trip_state(where, tmp_path, store, caplog):
    path = ":memory:" if where == ":memory:" else tmp_path / "db" / "state.sqlite"
    ctx = Context(engine=FakeEngine(drop_labels=["blue square"]), artifacts=store, max_rounds=2,
                  grounding_check="gate", selection="accept")  # fmt: skip
    saver = checkpointer_from_path(path)
    g = t2i.build_t2i_graph().compile(checkpointer=saver)
    cfg = {"configurable": {"thread_id": "rt"}}
    with caplog.at_level(logging.WARNING):
        g.invoke({"prompt": PROMPT}, cfg, context=ctx)
        if where == "file":  # a fresh saver on the same file sees the same state
            g = t2i.build_t2i_graph().compile(checkpointer=checkpointer_from_path(path))
        state = T2IState.model_validate(g.get_state(cfg).values)
    assert len(state.attempts) == 2 and state.attempts[1].mode == "regenerate_regions"
    assert isinstance(state.attempts[0].image.sha256, str)
    assert not [r for r in caplog.records if "unregistered" in r.getMessage().lower()]


@pytest.mark.parametrize("where", [":memory:", "file"])
def test_what_a_checkpointer_holds_is_read_without_deserializing(where, tmp_path, store):
    from lavida_agent.graphs.persistence import compact, last_written, referenced_shas, thread_ids

    saver = checkpointer_from_path(":memory:" if where == ":memory:" else tmp_path / "s.sqlite")
    assert thread_ids(saver) == set() and referenced_shas(saver) == {}  # nothing yet (no tables)
    g = t2i.build_t2i_graph().compile(checkpointer=saver)
    ctx = Context(engine=FakeEngine(), artifacts=store, selection="accept")
    images = {}
    for thread in ("a", "b"):
        out = T2IState.model_validate(g.invoke({"prompt": PROMPT, "seed": len(images)},
                                               {"configurable": {"thread_id": thread}}, context=ctx))  # fmt: skip
        images[thread] = {a.image.sha256 for a in out.attempts}
    assert thread_ids(saver) == {"a", "b"}
    held = referenced_shas(saver)
    assert images["a"] <= held["a"] and images["b"] <= held["b"] and referenced_shas(saver, threads=["b"]).keys() == {"b"}
    assert last_written(saver, "a") <= last_written(saver, "b") and last_written(saver, "nope") is None
    saver.delete_thread("a")
    assert thread_ids(saver) == {"b"} and compact(saver) >= 0


async def test_async_sqlite_saver(tmp_path, store):
    ctx = Context(engine=FakeEngine(), artifacts=store, selection="accept")
    async with async_checkpointer_from_path(tmp_path / "a.sqlite") as saver:
        g = t2i.build_t2i_graph().compile(checkpointer=saver)
        cfg = {"configurable": {"thread_id": "async"}}
        out = await g.ainvoke({"prompt": PROMPT}, cfg, context=ctx)
        history = [s async for s in g.aget_state_history(cfg)]
    assert out["accepted"] and len(history) >= 5
    async with async_checkpointer_from_path(tmp_path / "a.sqlite") as saver:
        g = t2i.build_t2i_graph().compile(checkpointer=saver)
        snap = await g.aget_state(cfg)
        assert T2IState.model_validate(snap.values).accepted


def _run(args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "tests.graphs._crash_run", str(tmp_path / "s.sqlite"),
         str(tmp_path / "artifacts"), "crash", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_killed_after_node_k_resumes_at_k_plus_1(tmp_path):
    # Nodes: plan_layout, review_plan, generate_image, critique_image (rejects: blue square
    # missing), refine_image, critique_image. Kill the process when refine_image calls the
    # model, i.e. after the first critique_image (node k) completed and was checkpointed.
    first = _run(["regenerate_regions", "1"], tmp_path)
    assert first.returncode == 17, first.stderr
    second = _run([], tmp_path)
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    # Nothing before node k+1 ran again; node k+1 (refine_image) and the rest did.
    assert result["calls"] == {"regenerate_regions": 1, "critique": 1, "ground": 1, "surprise": 1}
    out = result["output"]
    assert out["accepted"] and [a["mode"] for a in out["attempts"]] == [
        "generate", "regenerate_regions"]
    assert [c["verdict"] for c in out["critiques"]] == ["reject", "accept"]
    assert [a["seed"] for a in out["attempts"]] == [5, 6]
    # Compared with an uninterrupted run, nothing was lost or changed.
    clean = tmp_path / "clean"
    clean.mkdir()
    whole = json.loads(_run([], clean).stdout)["output"]
    for key in ("attempts", "critiques"):
        for a, b in zip(out[key], whole[key], strict=True):
            a.pop("timings", None), b.pop("timings", None)
            assert a == b
