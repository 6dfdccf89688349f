"""`LavidaAgent.resume` and `lavida-agent resume`: a generate or edit run that stopped
part-way (cancelled, Ctrl-C, a killed process) finishes from its last checkpoint, drawing
only what it had not drawn, and gives what the uninterrupted run would have given."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import lavida_agent.cli as cli_mod
from lavida_agent.api import EditResult, GenerateResult, LavidaAgent
from lavida_agent.errors import GenerationCancelled, InvalidInputError, NotFoundError
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.traces import load_trace, trace_path
from tests.fakes import draw, intercept, pause

PROMPT = "a red circle and a blue square"
RED = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}
BLUE = {"label": "blue square", "box": [36.0, 36.0, 52.0, 52.0]}


@pytest.fixture
def agent(engine):
    with LavidaAgent(engine=engine, num_steps=4, selection="best") as a:  # every round drawn
        yield a


def _stop_after_critiques(n: int) -> tuple[threading.Event, callable]:
    """A cancel event set at the `n`-th critique event, and the `on_event` that sets it."""
    cancel, seen = threading.Event(), []

    def on_event(ev: dict) -> None:
        if ev.get("event") == "critique":
            seen.append(ev)
            if len(seen) == n:
                cancel.set()

    return cancel, on_event


def test_a_cancelled_generate_resumes_to_the_uninterrupted_result(agent, engine):
    whole = agent.generate(PROMPT, seed=11, rounds=3)
    engine.calls.clear()
    cancel, on_event = _stop_after_critiques(1)
    with pytest.raises(GenerationCancelled) as stopped:
        agent.generate(PROMPT, seed=11, rounds=3, on_event=on_event, cancel=cancel)
    run_id = stopped.value.run_id
    assert engine.calls["generate"] == 1  # one round drawn before the stop
    engine.calls.clear()
    events: list[dict] = []
    resumed = agent.resume(run_id, on_event=events.append)
    assert isinstance(resumed, GenerateResult)
    assert engine.calls["generate"] == 2 and engine.calls["plan_layout"] == 0  # only what was left
    assert resumed.image_ref == whole.image_ref and resumed.accepted == whole.accepted
    assert [a.seed for a in resumed.attempts] == [a.seed for a in whole.attempts] == [11, 12, 13]
    assert (resumed.prompt, resumed.seed, resumed.max_rounds) == (PROMPT, 11, 3)
    assert resumed.run_id != run_id
    assert resumed.thread_id == load_trace(run_id, agent.settings.runs_dir).thread_id
    assert resumed.trace.inputs["resumed_from"] == run_id and resumed.trace_path.is_file()
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    engine.calls.clear()
    again = agent.resume(run_id)  # a retried resume: the result again, nothing drawn
    assert again.image_ref == whole.image_ref and sum(engine.calls.values()) == 0
    engine.calls.clear()  # a finished run (a request dropped after it ended): its result
    assert agent.resume(resumed.run_id).image_ref == whole.image_ref
    assert sum(engine.calls.values()) == 0
    from lavida_agent.traces import recent_runs

    status = {r["run_id"]: r for r in recent_runs(agent.settings.runs_dir)}
    assert status[run_id]["status"] == "resumed" and status[run_id]["resumed_by"] == resumed.run_id
    assert run_id not in [r["run_id"] for r in recent_runs(agent.settings.runs_dir,
                                                           unfinished=True)]  # fmt: skip


def test_a_killed_run_resumes_from_the_trace_it_wrote_at_its_start(agent, engine):
    """A process killed mid-run never writes its final trace: the one written at the start
    (no result, no error) is enough to finish it."""
    whole = agent.generate(PROMPT, seed=3, rounds=3)
    snapshot: dict = {}
    cancel, stop_at_second = _stop_after_critiques(2)

    def on_event(ev: dict) -> None:
        if ev.get("event") == "run_start":
            path = trace_path(ev["run_id"], agent.settings.runs_dir)
            snapshot.update(run_id=ev["run_id"], text=path.read_text())  # on disk already
        stop_at_second(ev)

    with pytest.raises(GenerationCancelled):
        agent.generate(PROMPT, seed=3, rounds=3, on_event=on_event, cancel=cancel)
    started = json.loads(snapshot["text"])
    assert started["result"] == {} and started["error"] is None and started["nodes"] == []
    trace_path(snapshot["run_id"], agent.settings.runs_dir).write_text(snapshot["text"])
    engine.calls.clear()
    resumed = agent.resume(snapshot["run_id"])
    assert resumed.image_ref == whole.image_ref and engine.calls["generate"] == 1


def test_an_interrupted_edit_turn_resumes_and_a_later_turn_ends_that(agent, engine):
    session = agent.session()
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    session.edit("turn0", image=draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE]), seed=1)
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    cancel, started = threading.Event(), threading.Event()  # stopped at its first sampler step

    def stop_in_edit(ev: dict) -> None:
        if ev.get("event") == "sampler_step" and ev.get("node") == "edit_image":
            started.set()
            cancel.set()

    with pytest.raises(GenerationCancelled) as stopped:
        session.edit("turn1", seed=2, rounds=2, on_event=stop_in_edit, cancel=cancel)
    assert started.is_set() and [s.instruction for s in session.history()] == ["turn0"]
    resumed = agent.resume(stopped.value.run_id)
    assert isinstance(resumed, EditResult) and resumed.thread_id == session.thread_id
    assert resumed.instruction == "turn1" and resumed.seed == 2 and resumed.max_rounds == 2
    assert [(s.turn, s.round) for s in resumed.attempts] == [(1, 0), (1, 1)]  # this turn's only
    assert resumed.step in [s.index for s in resumed.attempts]
    assert [s.instruction for s in session.history()] == ["turn0", "turn1"]
    # stopped again, then the session goes on with another turn: that run is over
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    cancel.clear()
    with pytest.raises(GenerationCancelled) as again:
        session.edit("turn2", seed=3, on_event=stop_in_edit, cancel=cancel)
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    session.edit("something else", seed=4)
    with pytest.raises(InvalidInputError, match="moved on"):
        agent.resume(again.value.run_id)


def test_what_cannot_be_resumed_says_why(agent, engine):
    with pytest.raises(NotFoundError, match="no trace for run 'nope'"):
        agent.resume("nope")
    grounded = agent.ground(draw(np.zeros((64, 64, 3), np.uint8), [RED]), ["red circle"])
    with pytest.raises(InvalidInputError, match="only generate and edit runs"):
        agent.resume(grounded.run_id)
    cancel, on_event = _stop_after_critiques(1)
    with pytest.raises(GenerationCancelled) as stopped:
        agent.generate(PROMPT, seed=1, rounds=2, on_event=on_event, cancel=cancel)
    other = LavidaAgent(engine=engine, settings=agent.settings.replace(model_path="/elsewhere"))
    with other, pytest.raises(InvalidInputError, match="ran on model"):
        other.resume(stopped.value.run_id)
    memory = LavidaAgent(engine=engine, settings=agent.settings.replace(db_path=":memory:"))
    with memory, pytest.raises(InvalidInputError, match="database .* holds nothing of its thread"):
        memory.resume(stopped.value.run_id)


def test_cli_resume_after_ctrl_c(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", lambda settings: engine)

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    intercept(engine, "generate", 2, ctrl_c)  # Ctrl-C while the second round draws
    runner = CliRunner()
    res = runner.invoke(cli_mod.cli, ["generate", PROMPT, "--out", "a.png", "--seed", "5",
                                      "--rounds", "3", "--steps", "2", "--trace-html", "stopped.html"])  # fmt: skip
    assert res.exit_code == 130 and "Aborted" in res.output  # a stop, not a failure
    run_id = res.output.split("lavida-agent resume ")[1].split()[0]
    assert run_id in (tmp_path / "stopped.html").read_text()  # the stopped run has its page too
    res = runner.invoke(cli_mod.cli, ["resume", run_id, "--out", "b.png", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["resumed_from"] == run_id and data["rounds"] == 3 and data["out"] == "b.png"
    assert (tmp_path / "b.png").is_file()
    res = runner.invoke(cli_mod.cli, ["resume", run_id, "--out", "c.png"])  # again: the result
    assert res.exit_code == 0 and f"accepted after 3 round(s), kept round {data['kept']}, seed 5" in res.output
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    res = runner.invoke(cli_mod.cli, ["runs", "--unfinished"])
    assert res.exit_code == 0 and res.stdout == ""  # resumed: nothing left to finish
    res = runner.invoke(cli_mod.cli, ["trace", run_id, "--out", "t.html"])
    page = (tmp_path / "t.html").read_text()
    assert res.exit_code == 0 and f"resumed: finished by run <code>{data['run_id']}</code>" in page
    assert "to finish it" not in page


def _stop_at(event: str, node: str | None = None) -> tuple[threading.Event, callable]:
    """A cancel event set at the first `event` (of `node`), and the `on_event` that sets it."""
    cancel = threading.Event()

    def on_event(ev: dict) -> None:
        if ev.get("event") == event and (node is None or ev.get("node") == node):
            cancel.set()

    return cancel, on_event


def test_a_run_stopped_before_it_planned_keeps_its_rounds_and_settings(engine):
    """Nothing is in the thread's state yet: rounds and knobs come from the trace."""
    with LavidaAgent(engine=engine, num_steps=4, selection="best") as agent:
        whole = agent.generate(PROMPT, seed=5, rounds=2)
        cancel, on_event = _stop_at("run_start")
        with pytest.raises(GenerationCancelled) as stopped:
            agent.generate(PROMPT, seed=5, rounds=2, on_event=on_event, cancel=cancel)
        resumed = agent.resume(stopped.value.run_id)  # this agent's default is 3 rounds
        assert [a.seed for a in resumed.attempts] == [a.seed for a in whole.attempts] == [5, 6]
        assert resumed.image_ref == whole.image_ref
    with LavidaAgent(engine=engine, num_steps=4, selection="accept") as accepting:
        cancel, on_event = _stop_at("run_start")
        with pytest.raises(GenerationCancelled) as stopped:
            accepting.generate(PROMPT, seed=5, rounds=3, on_event=on_event, cancel=cancel)
    with LavidaAgent(engine=engine, num_steps=4, selection="best") as other:
        resumed = other.resume(stopped.value.run_id)
        assert len(resumed.attempts) == 1  # stopped at the first accepted image, as it would have


def test_a_run_killed_after_its_last_checkpoint_gives_its_result(agent, engine):
    snapshot: dict = {}

    def on_event(ev: dict) -> None:
        if ev.get("event") == "run_start":
            path = trace_path(ev["run_id"], agent.settings.runs_dir)
            snapshot.update(run_id=ev["run_id"], path=path, text=path.read_text())

    whole = agent.generate(PROMPT, seed=8, rounds=2, on_event=on_event)
    snapshot["path"].write_text(snapshot["text"])  # as if killed before the final trace write
    engine.calls.clear()
    resumed = agent.resume(snapshot["run_id"])
    assert resumed.image_ref == whole.image_ref and sum(engine.calls.values()) == 0


def test_a_run_is_not_resumed_while_it_runs(agent, engine):
    started: dict = {}
    entered, release = pause(engine, "generate")
    worker = threading.Thread(target=lambda: agent.generate(
        PROMPT, seed=1, rounds=1, on_event=lambda ev: started.setdefault("id", ev.get("run_id"))))
    worker.start()
    assert entered.wait(10)
    try:
        with pytest.raises(InvalidInputError, match="is still running here"):
            agent.resume(started["id"])
    finally:
        release.set()
        worker.join(10)


def test_a_session_that_moved_on_is_not_resumed_into_another_turn(agent, engine):
    scene = draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE])
    session = agent.session()
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    cancel, on_event = _stop_at("sampler_step", "edit_image")
    with pytest.raises(GenerationCancelled) as first:
        session.edit("make it green", image=scene, seed=1, on_event=on_event, cancel=cancel)
    # the same instruction again, on another image, stopped too: a different run
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    cancel, on_event = _stop_at("sampler_step", "edit_image")
    with pytest.raises(GenerationCancelled) as second:
        session.edit("make it green", image=scene[:, ::-1].copy(), seed=50, on_event=on_event,
                     cancel=cancel)  # fmt: skip
    with pytest.raises(InvalidInputError, match="moved on"):
        agent.resume(first.value.run_id)
    from lavida_agent.traces import recent_runs

    listed = [r["run_id"] for r in recent_runs(agent.settings.runs_dir, unfinished=True)]
    assert listed == [second.value.run_id]  # what resume takes, and only that
    resumed = agent.resume(second.value.run_id)
    assert resumed.seed == 50 and {s.seed for s in resumed.attempts} <= {50, 51, 52}
    assert {s.instruction for s in resumed.attempts} == {"make it green"}


def test_an_edit_after_an_abandoned_turn_resumes_with_its_own_attempts(agent, engine):
    session = agent.session()
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    session.edit("turn0", image=draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE]), seed=1)
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    cancel, on_event = _stop_at("critique")  # X: stopped after a verified attempt
    verified = threading.Event()

    def stop_after_verify(ev: dict) -> None:
        if ev.get("event") == "node_end" and ev.get("node") == "verify_edit":
            verified.set()
            cancel.set()

    with pytest.raises(GenerationCancelled):
        session.edit("X", seed=3, rounds=3, on_event=stop_after_verify, cancel=cancel)
    assert verified.is_set()
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    cancel, on_event = _stop_at("sampler_step", "edit_image")
    with pytest.raises(GenerationCancelled) as y:
        session.edit("Y", seed=5, rounds=2, on_event=on_event, cancel=cancel)
    resumed = agent.resume(y.value.run_id)
    assert [(s.instruction, s.seed) for s in resumed.attempts] == [("Y", 5), ("Y", 6)]
    assert session.history()[-1].instruction == "Y"


@pytest.mark.parametrize("move", ["restart", "undo", "undo_redo", "graph_turn"])
def test_an_unfinished_turn_is_not_resumed_after_the_session_moved(agent, engine, move):
    """A turn stopped after a verified attempt, then the session moved without another run
    of the agent: restarted from an image, undone (and redone), or a turn run on the graph."""
    from lavida_agent.graphs.session import EditSession

    scene = draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE])
    session = agent.session()
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    session.edit("turn0", image=scene, seed=1, rounds=1)
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    cancel = threading.Event()

    def stop_after_verify(ev: dict) -> None:
        if ev.get("event") == "node_end" and ev.get("node") == "verify_edit":
            cancel.set()

    with pytest.raises(GenerationCancelled) as stopped:
        session.edit("X", seed=3, rounds=3, on_event=stop_after_verify, cancel=cancel)
    if move == "restart":
        session.start(scene[:, ::-1].copy())
    elif move in ("undo", "undo_redo"):
        session.undo()
        if move == "undo_redo":
            session.redo()
    else:
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
        graph_session = EditSession(session.thread_id, checkpointer=agent.checkpointer,
                                    context=agent._context(num_steps=2, rounds=1, cancel=None))
        graph_session.edit("a turn on the graph", seed=9)
    with pytest.raises(InvalidInputError, match="moved on"):
        agent.resume(stopped.value.run_id)


def test_recent_runs_list_what_can_be_resumed(agent, engine, tmp_path, monkeypatch):
    from lavida_agent.traces import recent_runs

    done = agent.generate(PROMPT, seed=1, rounds=1)
    agent.ground(draw(np.zeros((64, 64, 3), np.uint8), [RED]), ["red circle"])
    cancel, on_event = _stop_at("run_start")
    with pytest.raises(GenerationCancelled) as stopped:
        agent.generate("two red squares", seed=2, on_event=on_event, cancel=cancel)
    runs = recent_runs(agent.settings.runs_dir)
    assert [r["workflow"] for r in runs] == ["t2i", "ground", "t2i"]  # newest first
    assert runs[0]["run_id"] == stopped.value.run_id and runs[0]["status"] == "stopped"
    assert runs[0]["prompt"] == "two red squares" and runs[1]["expressions"] == ["red circle"]
    assert runs[2] == {**runs[2], "run_id": done.run_id, "status": "ok", "error": None,
                       "accepted": done.accepted}  # fmt: skip
    assert runs[1]["accepted"] is None and runs[0]["accepted"] is None  # a ground; a stopped run
    unfinished = recent_runs(agent.settings.runs_dir, unfinished=True)
    assert [r["run_id"] for r in unfinished] == [stopped.value.run_id]
    assert len(recent_runs(agent.settings.runs_dir, limit=1)) == 1
    with pytest.raises(InvalidInputError, match="limit"):
        recent_runs(agent.settings.runs_dir, limit=0)
    # the order is by start, not by file time (a copy of the home resets file times)
    now = time.time()
    for i, r in enumerate(runs):  # the newest file time to the oldest run
        os.utime(Path(agent.settings.runs_dir) / f"{r['run_id']}.json", (now + i, now + i))
    assert recent_runs(agent.settings.runs_dir) == runs
    # the same list on the command line
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", lambda settings: engine)
    res = CliRunner().invoke(cli_mod.cli, ["runs", "--unfinished", "--json"])
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["run_id"] for line in res.stdout.splitlines()] == \
        [stopped.value.run_id]  # fmt: skip
    res = CliRunner().invoke(cli_mod.cli, ["--home", str(tmp_path / "empty"), "runs", "--unfinished"])
    assert res.exit_code == 0 and res.stdout == "" and "no unfinished runs" in res.stderr
    res = CliRunner().invoke(cli_mod.cli, ["runs", "-n", "2"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith(stopped.value.run_id)
    assert "stopped" in res.stdout.splitlines()[0] and "two red squares" in res.stdout


def test_ctrl_c_stops_a_cli_run_at_its_next_step(engine, tmp_path, monkeypatch):
    """SIGINT sets the run's cancel event (no KeyboardInterrupt inside LangGraph's executor,
    which can hang it): the run stops cleanly and the message says how to finish it."""
    import signal

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", lambda settings: engine)
    intercept(engine, "generate", 2, lambda: os.kill(os.getpid(), signal.SIGINT))  # 2nd round
    before = signal.getsignal(signal.SIGINT)
    res = CliRunner().invoke(cli_mod.cli, ["generate", PROMPT, "--out", "a.png", "--seed", "5",
                                           "--rounds", "3", "--steps", "2"])  # fmt: skip
    assert res.exit_code == 130 and "Stopping at the next step" in res.output
    assert "the run was cancelled; to finish it: lavida-agent resume " in res.output
    assert signal.getsignal(signal.SIGINT) is before  # the handler is the run's only
    assert engine.calls["generate"] == 2  # the second round stopped in its sampler; no third
    run_id = res.output.split("lavida-agent resume ")[1].split()[0]
    del engine.generate
    res = CliRunner().invoke(cli_mod.cli, ["resume", run_id, "--out", "b.png"])
    assert res.exit_code == 0 and re.search(r"after 3 round\(s\), kept round [0-2], seed 5", res.output)


def test_ctrl_c_stops_a_batch_with_one_line_out_per_line_in(engine, tmp_path, monkeypatch):
    """Ctrl-C in a batch stops the line running at its next step and starts no more; every
    input line still gets its output line (the stopped one names its run), exit 130."""
    import signal

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", lambda settings: engine)
    lines = [{"prompt": PROMPT, "out": f"{i}.png", "seed": i, "rounds": 2} for i in range(4)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    intercept(engine, "generate", 4, lambda: os.kill(os.getpid(), signal.SIGINT))  # line 2, round 2
    res = CliRunner().invoke(cli_mod.cli, ["generate", "--batch", "in.jsonl", "--steps", "2"])
    assert res.exit_code == 130, res.output
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert [("error" in o, o.get("line")) for o in out] == [(False, None), (True, 2), (True, 3), (True, 4)]
    assert out[0]["out"] == "0.png" and (tmp_path / "0.png").exists() and not (tmp_path / "1.png").exists()
    assert "to finish it: lavida-agent resume " + out[1]["run_id"] in out[1]["error"]
    assert out[2] == out[3] | {"line": 3} and "not run" in out[2]["error"] and "run_id" not in out[2]
    assert "stopped (Ctrl-C): 1 of 4 line(s) done" in res.output
    assert engine.calls["generate"] == 4  # nothing was drawn after the stop
    del engine.generate
    res = CliRunner().invoke(cli_mod.cli, ["resume", out[1]["run_id"], "--out", "1.png"])
    assert res.exit_code == 0 and re.search(r"after 2 round\(s\), kept round [01], seed 1", res.output)


def test_a_finished_turn_of_a_session_that_moved_on_points_to_its_trace(agent, engine):
    session = agent.session()
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    first = session.edit("turn0", image=draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE]), seed=1)
    assert agent.resume(first.run_id).image_ref == first.image_ref  # not moved on: its result
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    session.edit("turn1", seed=2)
    with pytest.raises(InvalidInputError, match=f"lavida-agent trace {first.run_id}"):
        agent.resume(first.run_id)


def test_a_chain_of_resumes_leaves_nothing_unfinished(agent, engine):
    """A stopped, B = resume(A) stopped, C = resume(A) finishes: A and B are both 'resumed'
    by C (worked out from the traces; no trace of another run is rewritten)."""
    from lavida_agent.traces import recent_runs

    cancel, on_event = _stop_at("critique")
    with pytest.raises(GenerationCancelled) as a:
        agent.generate(PROMPT, seed=3, rounds=3, on_event=on_event, cancel=cancel)
    a_trace = trace_path(a.value.run_id, agent.settings.runs_dir).read_text()
    cancel, on_event = _stop_at("critique")
    with pytest.raises(GenerationCancelled) as b:
        agent.resume(a.value.run_id, on_event=on_event, cancel=cancel)
    c = agent.resume(a.value.run_id)
    status = {r["run_id"]: r for r in recent_runs(agent.settings.runs_dir)}
    for stopped in (a.value.run_id, b.value.run_id):
        assert status[stopped]["status"] == "resumed" and status[stopped]["resumed_by"] == c.run_id
    assert recent_runs(agent.settings.runs_dir, unfinished=True) == []
    assert trace_path(a.value.run_id, agent.settings.runs_dir).read_text() == a_trace


def test_ctrl_c_at_the_review_prompt_ends_the_prompt(engine, tmp_path, monkeypatch):
    """The run's Ctrl-C handler steps aside while `--review-plan` waits for an answer."""
    import signal
    import time

    import click

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", lambda settings: engine)
    seen = {}

    def prompt(*args, **kwargs):
        seen["handler"] = signal.getsignal(signal.SIGINT)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise click.Abort() from None  # what click.prompt does on Ctrl-C
        return ""

    monkeypatch.setattr(click, "prompt", prompt)
    res = CliRunner().invoke(cli_mod.cli, ["generate", PROMPT, "--out", "a.png", "--review-plan"])
    assert seen["handler"] is signal.default_int_handler
    assert res.exit_code == 1 and "--review-plan: no answer" in res.output
    assert "nothing was drawn" in res.output and engine.calls["generate"] == 0
