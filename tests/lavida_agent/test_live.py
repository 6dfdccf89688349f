"""A run holds its thread against other processes (`lavida_agent.live`): a turn, an undo or a
resume on a thread another process runs is refused with `BusyError`, `runs` says 'running'
rather than 'unfinished', and a killed process leaves nothing locked."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import lavida_agent.cli as cli_mod
from lavida_agent import live
from lavida_agent.errors import BusyError, GenerationCancelled, InvalidInputError
from lavida_agent.traces import load_trace, recent_runs, render_html
from tests.fakes import draw, pause

PROMPT = "a red circle and a blue square"
RED = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}

def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # no clean-up runs: the OS alone drops the lock
    proc.wait(10)


def test_a_thread_lock_is_exclusive_names_its_holder_and_is_given_back(tmp_path):
    lock = live.hold(tmp_path, "t1", run_id="r1", doing="run r1", what="session 't1'")
    assert live.holder(tmp_path, "t1") == {"pid": os.getpid(), "doing": ["run r1"], "run_ids": ["r1"],
                                           "thread_id": "t1"}  # fmt: skip
    assert live.holder(tmp_path, "t2") is None
    with pytest.raises(BusyError, match=r"session 't1' is running now in this process, by another agent \(run r1\)"):
        live.hold(tmp_path, "t1", doing="an undo", what="session 't1'")
    other = live.hold(tmp_path, "t2", doing="an undo", what="x")  # threads are independent
    lock.record(["run r1", "run r5"], ["r1", "r5"])
    assert live.holder(tmp_path, "t1")["run_ids"] == ["r1", "r5"]
    lock.release()
    lock.release()  # idempotent
    assert live.holder(tmp_path, "t1") is None
    assert live.holder(tmp_path, "t2")["doing"] == ["an undo"] and live.holder(tmp_path, "t2")["run_ids"] == []
    live.hold(tmp_path, "t1", run_id="r4", doing="run r4", what="x").release()
    other.release()
    assert list((tmp_path / ".live").iterdir()) == []  # nothing left behind


def test_looking_at_a_lock_never_refuses_a_run(tmp_path):
    """`holder` takes the lock for a moment to look; a `hold` meanwhile waits, not fails."""
    done = threading.Event()

    def look() -> None:
        while not done.is_set():
            live.holder(tmp_path, "t1")

    looker = threading.Thread(target=look)
    looker.start()
    try:
        for i in range(300):
            live.hold(tmp_path, "t1", run_id=f"r{i}", doing=f"run r{i}", what="x").release()
    finally:
        done.set()
        looker.join(10)


def test_a_lock_whose_record_cannot_be_written_is_not_kept(tmp_path, monkeypatch):
    def full(fd, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(live.os, "ftruncate", full)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="No space"):
        live.hold(tmp_path, "t1", run_id="r1", doing="run r1", what="x")
    assert len(os.listdir("/proc/self/fd")) == fds and live.holder(tmp_path, "t1") is None
    monkeypatch.undo()
    live.hold(tmp_path, "t1", run_id="r2", doing="run r2", what="x").release()


def test_a_killed_holder_leaves_its_thread_free(tmp_path, other_process):
    proc = other_process(tmp_path, "t1", "r1")
    assert live.holder(tmp_path, "t1") == {"pid": proc.pid, "doing": ["run r1"], "run_ids": ["r1"],
                                           "thread_id": "t1"}  # fmt: skip
    with pytest.raises(BusyError, match=f"in another process \\(pid {proc.pid}, run r1\\)"):
        live.hold(tmp_path, "t1", run_id="r2", doing="run r2", what="x")
    _kill(proc)
    assert live.holder(tmp_path, "t1") is None  # its file is still there, unlocked
    live.hold(tmp_path, "t1", run_id="r2", doing="run r2", what="x").release()


def test_runs_of_one_agent_share_a_thread_and_are_all_running(agent):
    with agent._on_thread("t1", "r1", "session 't1'", alone=False):
        with agent._on_thread("t1", "r2", "session 't1'", alone=False):
            assert live.holder(agent.settings.runs_dir, "t1")["run_ids"] == ["r1", "r2"]
            with pytest.raises(BusyError, match=r"session 't1' is running now \(run r1\)"):
                with agent._on_thread("t1", None, "session 't1'", alone=True, doing="an undo"):
                    pass
        assert live.holder(agent.settings.runs_dir, "t1")["run_ids"] == ["r1"]
    with agent._on_thread("t1", None, "session 't1'", alone=True, doing="an undo"):
        with pytest.raises(BusyError, match=r"session 't1' is running now \(an undo\)"):
            with agent._on_thread("t1", "r3", "session 't1'", alone=False):  # no run during an undo
                pass
    assert live.holder(agent.settings.runs_dir, "t1") is None


def test_a_session_another_process_runs_is_refused_and_left_as_it_was(agent, engine, other_process):
    result = agent.edit(draw(np.zeros((64, 64, 3), np.uint8), [RED]), "make the red circle blue", seed=1)
    session = agent.session(result.thread_id)
    before = session.state().model_dump()
    calls = len(engine.calls)
    proc = other_process(agent.settings.runs_dir, result.thread_id, "elsewhere")
    for attempt in (lambda: session.edit("remove the red circle", seed=2),
                    session.undo,
                    lambda: session.branch(0),
                    lambda: session.start(draw(np.zeros((64, 64, 3), np.uint8), [RED]))):  # fmt: skip
        with pytest.raises(BusyError, match=f"session '{result.thread_id}' is running now in "
                                            f"another process \\(pid {proc.pid}, run elsewhere\\)"):  # fmt: skip
            attempt()
    assert session.state().model_dump() == before and len(engine.calls) == calls
    agent.generate(PROMPT, seed=1, rounds=1)  # other threads run as usual
    _kill(proc)
    assert session.edit("remove the red circle", seed=2).accepted is not None


def test_runs_say_running_and_resume_waits_for_the_process_that_runs(agent, engine, other_process, monkeypatch):
    cancel = threading.Event()

    def stop_at_start(ev: dict) -> None:
        if ev.get("event") == "run_start":
            cancel.set()

    with pytest.raises(GenerationCancelled) as stopped:
        agent.generate(PROMPT, seed=1, on_event=stop_at_start, cancel=cancel)
    run_id = stopped.value.run_id
    [row] = recent_runs(agent.settings.runs_dir)
    thread_id = row["thread_id"]
    # As if another process were running it now (its trace has neither result nor error).
    trace_file = agent.settings.runs_dir / f"{run_id}.json"
    text = trace_file.read_text()
    trace_file.write_text(text.replace('"error_code": "cancelled"', '"error_code": null')
                          .replace('"error": "', '"error_was": "'))  # fmt: skip
    proc = other_process(agent.settings.runs_dir, thread_id, run_id)
    assert recent_runs(agent.settings.runs_dir)[0]["status"] == "running"
    assert recent_runs(agent.settings.runs_dir, unfinished=True) == []  # nothing to resume yet
    page = render_html(load_trace(trace_file), agent.store, runs_dir=agent.settings.runs_dir)
    assert "<td>running</td>" in page and "unfinished" not in page
    monkeypatch.setattr(live, "fcntl", None)  # as on Windows: no locks, so no one can tell
    monkeypatch.setattr(live, "SUPPORTED", False)
    page = render_html(load_trace(trace_file), agent.store, runs_dir=agent.settings.runs_dir)
    assert "unfinished: still running, or its process stopped" in page
    monkeypatch.undo()
    with pytest.raises(BusyError, match=f"run {run_id} is still running in another process \\(pid {proc.pid}\\): resume it once it has ended"):
        agent.check_resume(run_id)
    # the CLI says so before it loads the model
    monkeypatch.setattr(cli_mod, "ENGINE_FACTORY", lambda settings: engine)
    monkeypatch.setattr(cli_mod, "_loaded_agent", lambda *a: pytest.fail("the model was loaded"))
    res = CliRunner().invoke(cli_mod.cli, ["--home", str(agent.settings.home), "resume", run_id, "--out", "x.png"])
    assert res.exit_code == 1 and f"run {run_id} is still running in another process" in res.output
    monkeypatch.undo()
    _kill(proc)
    [row] = recent_runs(agent.settings.runs_dir, unfinished=True)
    assert row["status"] == "unfinished"
    done = agent.resume(run_id)
    assert recent_runs(agent.settings.runs_dir)[1] == {
        **recent_runs(agent.settings.runs_dir)[1], "run_id": run_id, "status": "resumed", "resumed_by": done.run_id}


def test_in_this_process_a_run_shows_as_running_and_an_undo_waits(agent, engine):
    result = agent.edit(draw(np.zeros((64, 64, 3), np.uint8), [RED]), "make the red circle blue", seed=1)
    session = agent.session(result.thread_id)
    entered, release = pause(engine, "edit")
    started: dict = {}
    worker = threading.Thread(target=lambda: session.edit(
        "remove the red circle", seed=2, on_event=lambda ev: started.setdefault("id", ev.get("run_id"))))
    worker.start()
    try:
        assert entered.wait(10)
        [row] = [r for r in recent_runs(agent.settings.runs_dir) if r["run_id"] == started["id"]]
        assert row["status"] == "running"
        with pytest.raises(BusyError, match=f"session '{result.thread_id}' is running now \\(run {started['id']}\\)"):
            session.undo()
        with pytest.raises(BusyError, match=f"by another agent \\(run {started['id']}\\)"):  # what another agent meets
            live.hold(agent.settings.runs_dir, result.thread_id, doing="an undo", what="x")
        with pytest.raises(BusyError, match=f"run {started['id']} is still running here"):
            agent.resume(started["id"])
    finally:
        release.set()
        worker.join(10)
    assert recent_runs(agent.settings.runs_dir)[0]["status"] == "ok"
    session.undo()  # free again
    assert live.holder(agent.settings.runs_dir, result.thread_id) is None


def test_busy_is_an_invalid_input_with_http_409():
    assert issubclass(BusyError, InvalidInputError)
    assert (BusyError.code, BusyError.http_status) == ("busy", 409)


async def test_over_http_a_session_another_process_runs_is_a_409(agent, other_process):
    import httpx

    from lavida_agent.server import create_app

    result = agent.edit(draw(np.zeros((64, 64, 3), np.uint8), [RED]), "make the red circle blue", seed=1)
    proc = other_process(agent.settings.runs_dir, result.thread_id, "elsewhere")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(agent=agent)),
                                 base_url="http://test") as client:  # fmt: skip
        r = await client.post(f"/v1/sessions/{result.thread_id}/undo")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "busy" and f"pid {proc.pid}" in r.json()["error"]["message"]


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(live.fcntl, "flock", no_flock)
    lock = live.hold(tmp_path, "t1", run_id="r1", doing="run r1", what="x")
    lock.record(["run r1"], ["r1"])  # nothing to write to
    (tmp_path / ".live").mkdir(exist_ok=True)
    assert live.holder(tmp_path, "t1") is None  # and nothing reads as held
    lock.release()
    assert "cannot be locked (" in caplog.text and "Operation not supported" in caplog.text
