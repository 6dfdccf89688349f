"""Deleting runs and sessions, and pruning a home (`LavidaAgent.delete_run`, `delete_session`,
`prune`; the CLI's `delete`, `prune`, `session delete`): what goes is the thread's traces,
checkpoints and the images nothing else refers to, and nothing else."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import lavida_agent.cli as cli_mod
from lavida_agent.api import Cleanup, LavidaAgent
from lavida_agent.errors import BusyError, InvalidInputError, NotFoundError
from lavida_agent.graphs import persistence
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.tools.images import save_image
from lavida_agent.traces import recent_runs, render_html, trace_path

BLUE = {"label": "blue square", "box": [36.0, 36.0, 52.0, 52.0]}
RED = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}


def _images(agent: LavidaAgent) -> set[str]:
    return {p.stem for p in agent.store.root.glob("images/??/*.png")}


def _result_images(r) -> set[str]:
    return {r.image_ref.sha256, *(a.image.sha256 for a in r.attempts)}


def _edit(session, engine, item=BLUE):
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[item["box"]], layout=[item]))
    return session.edit(f"add a {item['label']}", seed=1)


def test_deleting_a_run_takes_its_trace_checkpoints_and_only_its_own_images(agent):
    a = agent.generate("a red circle", seed=1)
    b = agent.generate("a blue square", seed=2)
    mine, theirs = _result_images(a), _result_images(b)
    assert mine - theirs and mine <= _images(agent)

    preview = agent.delete_run(a.run_id, dry_run=True)
    assert trace_path(a.run_id, agent.settings.runs_dir).is_file() and mine <= _images(agent)
    done = agent.delete_run(a.run_id)
    assert preview.to_dict() == {**done.to_dict(), "dry_run": True}
    assert done.threads == [a.thread_id] and done.runs == [a.run_id]
    assert done.images == len(mine - theirs) and done.bytes_freed > 0

    assert not trace_path(a.run_id, agent.settings.runs_dir).exists()
    assert agent.checkpointer.get_tuple({"configurable": {"thread_id": a.thread_id}}) is None
    assert not (mine - theirs) & _images(agent)
    assert theirs <= _images(agent)  # the other run is whole: its images, trace and page
    assert [r["run_id"] for r in recent_runs(agent.settings.runs_dir)] == [b.run_id]
    assert "<html" in render_html(b.trace, agent.store)
    with pytest.raises(NotFoundError, match=a.run_id):
        agent.resume(a.run_id)
    with pytest.raises(NotFoundError, match=a.run_id):
        agent.delete_run(a.run_id)


def test_a_session_goes_whole_and_a_turn_alone_is_refused(agent, engine):
    s = agent.session()
    src = s.start(np.full((64, 64, 3), 10, np.uint8))
    first = _edit(s, engine)
    s.undo()
    second = _edit(s, engine, RED)  # a second branch
    other = agent.session()
    other.start(np.full((64, 64, 3), 10, np.uint8))  # the same input image

    with pytest.raises(InvalidInputError, match=f"one of 2 turns of session {s.thread_id}"):
        agent.delete_run(first.run_id)
    assert s.exists and len(s.lineage(all_branches=True)["nodes"]) >= 3

    done = agent.delete_session(s.thread_id)
    assert done.threads == [s.thread_id] and sorted(done.runs) == sorted([first.run_id, second.run_id])
    assert not s.exists
    with pytest.raises(NotFoundError):
        s.history()
    for r in (first, second):
        assert not trace_path(r.run_id, agent.settings.runs_dir).exists()
        assert r.image_ref.sha256 not in _images(agent)
    assert src.sha256 in _images(agent) and other.current == src  # the other session keeps it
    with pytest.raises(NotFoundError, match="no session"):
        agent.delete_session(s.thread_id)


def test_ids_that_are_no_run_or_no_session_are_named(agent):
    g = agent.generate("a red circle", seed=1)
    with pytest.raises(NotFoundError, match="nope"):
        agent.delete_run("nope")
    with pytest.raises(NotFoundError, match="no session 'nope'"):
        agent.delete_session("nope")
    with pytest.raises(InvalidInputError, match="not a session"):
        agent.delete_session(g.thread_id)
    assert trace_path(g.run_id, agent.settings.runs_dir).is_file()


def test_what_runs_now_is_refused_or_kept_and_its_images_wait(agent, other_process):
    a = agent.generate("a red circle", seed=1)
    b = agent.generate("a blue square", seed=2)
    holder = other_process(agent.settings.runs_dir, a.thread_id, "r-elsewhere")
    with pytest.raises(BusyError, match="another process"):
        agent.delete_run(a.run_id)
    assert trace_path(a.run_id, agent.settings.runs_dir).is_file()

    done = agent.prune(0)  # b goes; a is kept, busy
    assert done.threads == [b.thread_id] and done.busy == [a.thread_id]
    own_b = _result_images(b) - _result_images(a)
    # Something runs: an image nothing refers to waits out the grace (that run may have stored it).
    assert done.images == 0 and own_b <= _images(agent) and done.images_waiting == len(own_b)
    assert done.busy_runs == ["r-elsewhere"]  # the run on it, as `runs` lists it
    holder.kill()
    holder.wait(10)
    later = agent.prune(0)  # nothing runs now: what the deleted thread held goes at once
    assert later.threads == [a.thread_id] and not later.busy
    assert not _result_images(a) & _images(agent)
    assert own_b <= _images(agent) and later.images_waiting == len(own_b)  # b's wait out their grace, said
    assert agent.prune(0, grace_s=0).images == len(own_b) and not own_b & _images(agent)


def test_prune_goes_by_the_last_activity_of_traces_and_checkpoints(agent, engine, monkeypatch):
    old = agent.generate("a red circle", seed=1)
    new = agent.generate("a blue square", seed=2)
    s = agent.session()
    s.start(np.full((64, 64, 3), 10, np.uint8))
    turn = _edit(s, engine)
    two_days_ago = time.time() - 2 * 86400
    for run in (old, turn):  # both traces look old; the session's checkpoint stays new
        os.utime(trace_path(run.run_id, agent.settings.runs_dir), (two_days_ago, two_days_ago))
    written = persistence.last_written
    monkeypatch.setattr(persistence, "last_written",
                        lambda saver, t: two_days_ago if t == old.thread_id else written(saver, t))  # fmt: skip
    done = agent.prune(dt.timedelta(days=1))
    assert done.threads == [old.thread_id]
    assert trace_path(new.run_id, agent.settings.runs_dir).is_file() and s.exists


def test_an_unreferenced_image_waits_out_the_grace_and_put_renews_it(agent):
    lone = np.full((64, 64, 3), 99, np.uint8)
    ref = agent.store.put(lone)
    assert agent.prune(0).images == 0 and agent.store.exists(ref)  # stored just now
    hour_ago = time.time() - 3601
    os.utime(agent.store.path(ref), (hour_ago, hour_ago))
    agent.store.put(lone)  # stored again: it is new again
    assert agent.prune(0).images == 0 and agent.store.exists(ref)
    os.utime(agent.store.path(ref), (hour_ago, hour_ago))
    assert agent.prune(0, dry_run=True).images == 1 and agent.store.exists(ref)
    assert agent.prune(0).images == 1 and not agent.store.exists(ref)


def test_prune_compacts_the_database_and_checks_its_arguments(agent):
    for seed in range(4):
        agent.generate("a red circle and a blue square", seed=seed)
    db = Path(agent.settings.db_path)
    agent.close()  # (the checkpointer writes ahead: its file is whole once closed)
    size = db.stat().st_size
    done = agent.prune(0)
    assert len(done.threads) == 4 and done.bytes_freed > 0
    agent.close()
    assert db.stat().st_size < size
    for bad in (-1, "1d", True, float("nan")):
        with pytest.raises(InvalidInputError, match="older_than"):
            agent.prune(bad)
    with pytest.raises(InvalidInputError, match="grace_s"):
        agent.prune(0, grace_s=-5)


@pytest.mark.parametrize("apart", ["db_path", "artifacts_dir", "runs_dir"])
def test_a_home_whose_parts_are_set_apart_is_refused(engine, tmp_path, apart):
    """Another home may share a store or a database set apart: what refers to what cannot
    be known, so nothing is deleted (a prune on it once took another home's images)."""
    where = ":memory:" if apart == "db_path" else str(tmp_path / "elsewhere")
    with LavidaAgent(engine=engine, num_steps=2, selection="accept", **{apart: where}) as agent:
        a = agent.generate("a red circle", seed=1)
        for call in (lambda: agent.delete_run(a.run_id), lambda: agent.prune(0),
                     lambda: agent.delete_session(a.thread_id)):  # fmt: skip
            with pytest.raises(InvalidInputError, match=f"{apart} .* is set apart from the home"):
                call()
        assert trace_path(a.run_id, agent.settings.runs_dir).is_file() and a.image_ref.sha256 in _images(agent)


def test_a_one_shot_edit_goes_by_its_run_id_and_several_ids_go_together(agent, engine):
    one = agent.edit(np.full((64, 64, 3), 10, np.uint8), "add a blue square", seed=1)
    gen = agent.generate("a red circle", seed=1)
    ids = [one.run_id, gen.run_id, one.run_id]  # a repeat counts once
    preview = agent.delete(ids, dry_run=True)
    done = agent.delete(ids)
    assert preview.to_dict() == {**done.to_dict(), "dry_run": True}  # the whole command, not id by id
    assert sorted(done.threads) == sorted([one.thread_id, gen.thread_id])
    assert not agent.session(one.thread_id).exists
    kept = agent.generate("a blue square", seed=2)
    with pytest.raises(NotFoundError, match="no run or session 'nope'"):
        agent.delete([kept.run_id, "nope"])  # every id is checked first: nothing went
    assert trace_path(kept.run_id, agent.settings.runs_dir).is_file()
    for bad in ("", "  "):
        with pytest.raises(InvalidInputError, match="non-empty string"):
            agent.delete([bad])
    with pytest.raises(InvalidInputError, match="grace_s"):
        agent.delete([kept.run_id], grace_s="1h")
    assert trace_path(kept.run_id, agent.settings.runs_dir).is_file()


def test_an_unreadable_trace_file_goes_by_its_id_or_its_age(agent):
    kept = agent.generate("a red circle", seed=1)
    runs = Path(agent.settings.runs_dir)
    (runs / "bad.json").write_text("{not json")
    (runs / "cut.json").write_text(trace_path(kept.run_id, runs).read_text()[:500])  # refers to images
    assert agent.delete(["bad"]).runs == ["bad"] and not (runs / "bad.json").exists()
    hour_ago = time.time() - 3601
    os.utime(runs / "cut.json", (hour_ago, hour_ago))
    done = agent.prune(1800)
    assert done.runs == ["cut"] and not (runs / "cut.json").exists()
    assert trace_path(kept.run_id, runs).is_file()  # younger than half an hour


# -- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", lambda settings: engine)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli_mod.cli, [str(a) for a in args])


def test_cli_delete_prune_and_session_delete(cli, engine, tmp_path):
    gen = json.loads(cli("generate", "a red circle", "--out", "a.png", "--seed", "1", "--json").output)
    r = cli("delete", gen["run_id"], "--dry-run")
    assert r.exit_code == 0 and r.output.startswith(f"would delete {gen['run_id']}: 1 run, ")
    r = cli("delete", gen["run_id"], "--json")
    assert r.exit_code == 0 and json.loads(r.output)["runs"] == [gen["run_id"]] == json.loads(r.output)["ids"]
    r = cli("delete", gen["run_id"])
    assert r.exit_code == 1 and f"no run or session '{gen['run_id']}'" in r.output

    save_image(np.full((64, 64, 3), 10, np.uint8), tmp_path / "src.png")
    sid = cli("session", "start", "src.png").output.strip()
    r = cli("delete", sid, "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["threads"] == [sid]
    r = cli("session", "delete", sid)
    assert r.exit_code == 0 and r.output.startswith(f"deleted session {sid}: 0 runs, ")
    assert cli("session", "history", sid).exit_code == 1

    cli("generate", "a blue square", "--out", "b.png", "--seed", "2")
    r = cli("prune", "--older-than", "3x")
    assert r.exit_code == 2 and "'3x' is not a duration" in r.output
    r = cli("prune", "--older-than", "1d")
    assert r.exit_code == 0 and r.output.startswith("deleted 0 threads")
    r = cli("prune", "--older-than", "0", "--json")
    assert r.exit_code == 0 and len(json.loads(r.output)["runs"]) == 1 and json.loads(r.output)["older_than_s"] == 0
    r = cli("runs")
    assert r.stdout == "" and "no runs yet" in r.stderr


def test_a_home_that_cannot_be_used_is_said_plainly(engine, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "lavida.db").write_text("garbage")
    with LavidaAgent(engine=engine, home=home) as agent:
        with pytest.raises(InvalidInputError, match="cannot use the database .*file is not a database"):
            agent.prune(0, dry_run=True)
    with LavidaAgent(engine=engine, home=tmp_path / "never") as agent:
        assert agent.prune(0, dry_run=True) == Cleanup(dry_run=True)  # nothing there: nothing made
    assert not (tmp_path / "never").exists()


def test_an_image_stored_again_during_a_delete_is_kept(agent, monkeypatch):
    """What a deleted run alone held goes at once, unless it was stored again after the
    delete began (a new run with the same input, not yet on any thread)."""
    a = agent.generate("a red circle", seed=1)
    sweep = agent.store.sweep

    def store_again_first(keep, **kw):
        agent.store.put(agent.store.open(a.image_ref))  # (renews the file's time)
        return sweep(keep, **kw)

    monkeypatch.setattr(agent.store, "sweep", store_again_first)
    agent.delete_run(a.run_id)
    assert agent.store.exists(a.image_ref)


def test_a_busy_id_refuses_the_whole_delete_before_anything_goes(agent, other_process):
    a = agent.generate("a red circle", seed=1)
    b = agent.generate("a blue square", seed=2)
    other_process(agent.settings.runs_dir, b.thread_id, "r-elsewhere")
    with pytest.raises(BusyError):
        agent.delete([a.run_id, b.run_id])
    assert trace_path(a.run_id, agent.settings.runs_dir).is_file()
    assert agent.checkpointer.get_tuple({"configurable": {"thread_id": a.thread_id}}) is not None


def test_close_waits_for_a_prune_in_progress(agent, monkeypatch):
    import threading

    from lavida_agent.graphs import persistence

    agent.generate("a red circle", seed=1)
    entered, release = threading.Event(), threading.Event()
    compact = persistence.compact

    def slow_compact(saver):
        entered.set()
        release.wait(5)
        return compact(saver)

    monkeypatch.setattr(persistence, "compact", slow_compact)
    pruning = threading.Thread(target=lambda: results.append(agent.prune(0)))
    results: list = []
    pruning.start()
    assert entered.wait(5)
    closing = threading.Thread(target=agent.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # waits for the prune
    release.set()
    closing.join(5)
    pruning.join(5)
    assert not closing.is_alive() and len(results) == 1 and len(results[0].threads) == 1


def test_deleting_in_a_home_that_does_not_exist_makes_nothing(engine, tmp_path):
    with LavidaAgent(engine=engine, home=tmp_path / "never") as agent:
        for call in (lambda: agent.delete(["abc"]), lambda: agent.delete_session("abc")):
            with pytest.raises(NotFoundError):
                call()
    assert not (tmp_path / "never").exists()
