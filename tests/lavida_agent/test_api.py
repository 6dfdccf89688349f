"""`LavidaAgent` on the scripted `FakeEngine`: every task, sessions, async twins, errors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

from lavida_agent.api import EditResult, GenerateResult, LavidaAgent
from lavida_agent.errors import (
    BusyError,
    GenerationCancelled,
    InvalidInputError,
    LavidaError,
    ModelLoadError,
    NotFoundError,
    WorkflowError,
    map_exceptions,
)
from lavida_agent.graphs.engine import EditPlanResult, EngineUnavailableError
from lavida_agent.tools.images import ImageError, save_image
from lavida_agent.traces import load_trace, recent_runs
from tests.fakes import FakeEngine, draw, label_color

RED = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}
BLUE = {"label": "blue square", "box": [36.0, 36.0, 52.0, 52.0]}


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def agent(engine):
    with LavidaAgent(engine=engine, num_steps=3, selection="accept") as a:
        yield a


def _wide_scene() -> np.ndarray:
    """128 x 64 input with the red circle at [20, 20, 60, 40] (even coordinates: a 2x
    downscale keeps its colour exact, so the fake grounder finds it exactly)."""
    return draw(np.zeros((64, 128, 3), np.uint8), [{"label": "red circle", "box": [20, 20, 60, 40]}])


# -- generate -------------------------------------------------------------------------------


def test_generate_returns_the_image_plan_attempts_and_trace(agent, engine):
    r = agent.generate("red circle and blue square", seed=5)
    assert isinstance(r, GenerateResult) and r.accepted and r.seed == 5
    assert r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
    assert np.array_equal(r.image, agent.store.open(r.image_ref))
    assert [i.label for i in r.layout] == ["red circle", "blue square"]
    assert len(r.attempts) == len(r.critiques) == 1 and r.attempts[0].seed == 5
    assert r.run_id and r.thread_id and r.run_id != r.thread_id
    assert r.trace.run_id == r.run_id and r.trace_path.is_file()
    assert r.trace_path.parent == agent.settings.runs_dir
    assert engine.calls["generate"] == 1 and engine.log[1][1]["num_steps"] == 3


def test_generate_refines_until_accepted_with_recorded_seeds(agent, engine):
    engine.enqueue_critique(False, ["the square is missing"])
    engine.enqueue_critique(False, ["still wrong"])
    r = agent.generate("red circle", seed=10, rounds=3)
    assert [a.seed for a in r.attempts] == [10, 11, 12]
    assert [c.verdict for c in r.critiques] == ["reject", "reject", "accept"]
    assert r.critiques[0].reasons == ["the square is missing"] and r.accepted
    assert r.image_ref == r.attempts[-1].image
    data = r.to_dict()
    assert data["rounds"] == 3 and [a["verdict"] for a in data["attempts"]] == [
        "reject", "reject", "accept"]  # fmt: skip


def test_generate_is_bounded_by_rounds(agent, engine):
    for _ in range(3):
        engine.enqueue_critique(False, ["no"])
    r = agent.generate("red circle", seed=0, rounds=2)
    assert len(r.attempts) == 2 and not r.accepted


def test_same_seed_same_image_and_default_seed_from_settings(engine):
    with LavidaAgent(engine=engine, num_steps=2, seed=11) as a:
        r1, r2 = a.generate("red circle"), a.generate("red circle")
    assert r1.seed == r2.seed == 11 and np.array_equal(r1.image, r2.image)
    with LavidaAgent(engine=engine, num_steps=2, selection="accept") as a:  # no seed anywhere: random, recorded
        r3 = a.generate("red circle")
    assert isinstance(r3.seed, int) and r3.attempts[0].seed == r3.seed


def test_plan_off_and_given_plan(agent, engine):
    r = agent.generate("red circle", seed=1, plan=False)
    assert r.layout == [] and engine.calls["plan_layout"] == 0
    assert r.critiques[0].grounding == []  # no layout: nothing to verify by grounding
    r = agent.generate("red circle and blue square", seed=1, plan=[RED, BLUE])
    assert engine.calls["plan_layout"] == 0 and r.plan.source == "input"
    assert [i.box.as_list() for i in r.layout] == [RED["box"], BLUE["box"]]
    assert np.array_equal(r.image[10, 10], label_color("red circle"))


def test_on_event_streams_run_and_sampler_events(agent):
    events = []
    r = agent.generate("red circle", seed=1, on_event=events.append)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("sampler_step") == 3 and "critique" in kinds and "plan" in kinds
    assert events[0]["run_id"] == r.run_id and events[-1]["trace"] == str(r.trace_path)


# -- images in, boxes out ---------------------------------------------------------------------


def test_ground_letterboxes_the_input_and_maps_boxes_back(agent, tmp_path):
    path = tmp_path / "wide.png"
    save_image(_wide_scene(), path)
    r = agent.ground(path, ["red circle", "green triangle"])
    assert r.image.shape == (64, 64, 3) and r.source_size == (128, 64)
    assert r.letterbox.scale == 0.5 and r.letterbox.pad_y == 16
    assert r.canvas_boxes[0].box.as_list() == [10.0, 26.0, 30.0, 36.0]
    assert r.boxes[0].box.as_list() == [20.0, 20.0, 60.0, 40.0]  # input pixels
    assert r.boxes[1].box.area == 0  # not found: degenerate
    assert r.layout == r.boxes and r.to_dict()["boxes"][0] == [20.0, 20.0, 60.0, 40.0]


def test_ground_maps_scripted_canvas_boxes_and_clips(agent, engine):
    engine.enqueue_ground([[0.0, 16.0, 32.0, 48.0], [-5.0, 0.0, 70.0, 64.0]])
    r = agent.ground(np.zeros((64, 128, 3), np.uint8), ["left half", "everything"])
    assert r.boxes[0].box.as_list() == [0.0, 0.0, 64.0, 64.0]
    assert r.boxes[1].box.as_list() == [0.0, 0.0, 128.0, 64.0]  # clipped to the input


def test_ground_checks_its_boxes_against_the_perceived_scene(agent, engine):
    """Caption and perceived boxes first; the side expression takes the perceived leftmost
    circle over the model's box, and every box comes back in input pixels."""
    engine.enqueue_answer("a small red circle and a small blue circle on a white background")
    engine.enqueue_ground([[10.0, 26.0, 22.0, 38.0], [40.0, 26.0, 52.0, 38.0]])
    engine.enqueue_ground([[40.0, 26.0, 52.0, 38.0]])  # the model's own box: the wrong circle
    r = agent.ground(_wide_scene(), ["the circle on the left"])
    assert [n.node for n in r.trace.nodes] == ["perceive", "ground_objects"]
    assert r.found_by == ["scene"] and r.trace.settings["ground_by"] == "scene"
    assert r.boxes[0].box.as_list() == [20.0, 20.0, 44.0, 44.0]  # canvas x2, minus the pad
    assert r.canvas_boxes[0].box.as_list() == [10.0, 26.0, 22.0, 38.0]
    d = r.to_dict()
    assert d["found_by"] == ["scene"] and d["caption"].startswith("a small red circle")
    assert r.present == d["present"] == [True]
    assert d["objects"][1] == {"label": "small blue circle", "box": [80.0, 20.0, 104.0, 44.0]}


def test_ground_by_direct_setting_returns_the_models_boxes(engine):
    engine.enqueue_ground([[40.0, 26.0, 52.0, 38.0]])
    with LavidaAgent(engine=engine, ground_by="direct") as agent:
        r = agent.ground(_wide_scene(), ["the circle on the left"])
    assert (r.found_by, r.caption, r.objects) == (["direct"], None, [])
    assert [m for m, _ in engine.log] == ["ground"]


def test_ask_answers_about_the_letterboxed_image(agent, engine):
    engine.enqueue_answer("two")
    r = agent.ask(_wide_scene(), "how many shapes?")
    assert r.answer == "two" and r.image.shape == (64, 64, 3)
    assert r.trace.nodes[0].node == "answer_question"
    assert (r.answered_by, r.caption, r.objects) == ("direct", None, [])


def test_ask_reads_object_questions_off_the_perceived_scene(agent, engine):
    """Caption, then grounding: the answer comes from the scene, the boxes in input pixels."""
    engine.enqueue_answer("a small red circle and a large blue square on a white background")
    engine.enqueue_ground([[10.0, 26.0, 22.0, 38.0], [30.0, 20.0, 52.0, 42.0]])
    r = agent.ask(_wide_scene(), "what is right of the red circle?")
    assert (r.answer, r.answered_by) == ("a blue square", "scene")
    assert [n.node for n in r.trace.nodes] == ["perceive", "answer_question"]
    assert r.objects[0].label == "small red circle"
    assert r.objects[0].box.as_list() == [20.0, 20.0, 44.0, 44.0]  # canvas x2, minus the pad
    d = r.to_dict()
    assert d["answered_by"] == "scene" and d["caption"].startswith("a small red circle")
    assert r.trace.settings["answer_by"] == "scene"
    assert d["objects"][1] == {"label": "large blue square", "box": [60.0, 8.0, 104.0, 52.0]}


def test_answer_by_direct_setting_asks_the_model_alone(engine):
    engine.enqueue_answer("no")
    with LavidaAgent(engine=engine, answer_by="direct") as agent:
        r = agent.ask(_wide_scene(), "is there a red circle?")
    assert (r.answer, r.answered_by) == ("no", "direct")
    assert engine.log == [("answer", {"question": "is there a red circle?"})]


def test_critique_checks_the_prompt_against_the_perceived_scene(agent, engine):
    engine.enqueue_answer("a small red circle and a large blue square on a white background")
    engine.enqueue_ground([[10.0, 26.0, 22.0, 38.0], [30.0, 20.0, 52.0, 42.0]])
    r = agent.critique(_wide_scene(), "a blue square left of a red circle")
    assert (r.verdict, r.ok, r.judged_by) == ("reject", False, "scene")
    assert r.reasons == ["blue square should be left of red circle"]
    assert [n.node for n in r.trace.nodes] == ["perceive", "judge_image"]
    assert r.trace.settings["critique_by"] == "scene"
    d = r.to_dict()
    assert d["objects"][1] == {"label": "large blue square", "box": [60.0, 8.0, 104.0, 52.0]}  # input pixels
    with pytest.raises(InvalidInputError, match="prompt must be a non-empty string"):
        agent.critique(_wide_scene(), "  ")


def test_critique_by_model_setting_asks_the_models_critique_alone(engine):
    engine.enqueue_critique(False, ["missing blue square"], text="no; missing blue square")
    with LavidaAgent(engine=engine, critique_by="model") as agent:
        r = agent.critique(_wide_scene(), "a red circle and a blue square")
    assert (r.verdict, r.judged_by, r.reasons, r.caption) == ("reject", "model", ["missing blue square"], None)
    assert [m for m, _ in engine.log] == ["critique"]


def test_edit_letterboxes_and_keeps_the_padding_crop(agent, engine):
    engine.enqueue_edit_plan(EditPlanResult(targets=["red circle"], target_boxes=[RED["box"]],
                                            layout=[BLUE]))  # fmt: skip
    r = agent.edit(_wide_scene(), "replace the red circle by a blue square", seed=4)
    assert isinstance(r, EditResult) and r.accepted and r.seed == 4
    assert r.image.shape == (64, 64, 3) and r.content().shape == (32, 64, 3)
    assert len(r.attempts) == 1 and r.attempts[0].seed == 4 and r.step == 0
    assert [i.label for i in r.layout] == ["blue square"] and r.plan.targets == ["red circle"]
    assert r.source_ref is not None and r.source_ref.width == 64
    assert agent.session(r.thread_id).exists  # a one-shot edit is a resumable session
    # the trace says where the input lies in the canvas its boxes are in, as ground's does
    assert r.trace.inputs["source_size"] == [128, 64] and r.trace.inputs["content_box"] == [0, 16, 64, 48]
    engine.enqueue_edit_plan(EditPlanResult(targets=["blue square"], target_boxes=[BLUE["box"]], layout=[RED]))
    again = agent.session(r.thread_id).edit("replace the blue square by a red circle", seed=5)
    assert again.trace.inputs["content_box"] == [0, 16, 64, 48]  # a later turn: the session's frame


def test_an_object_moved_or_added_on_a_wide_input_stays_in_its_content(agent, engine):
    """`the bottom left` of a 128 x 64 input is its content's (canvas rows 16-48): a box the
    planner put in the canvas' bottom cell is moved up out of the letterbox bar, with the
    region that is the same box; the source's region and other edits stay as planned."""
    low = [2.0, 44.0, 20.0, 62.0]  # reaches 14 px into the bottom bar
    engine.enqueue_edit_plan(EditPlanResult(targets=["red circle"], target_boxes=[[20.0, 20.0, 30.0, 30.0], low],
                                            layout=[{"label": "red circle", "box": low}]))  # fmt: skip
    r = agent.edit(_wide_scene(), "move the red circle to the bottom left", seed=1)
    assert r.plan.layout[0].box.as_list() == [2.0, 30.0, 20.0, 48.0]
    assert [b.as_list() for b in r.plan.regions] == [[20.0, 20.0, 30.0, 30.0], [2.0, 30.0, 20.0, 48.0]]
    engine.enqueue_edit_plan(EditPlanResult(targets=["red circle"], target_boxes=[low],
                                            layout=[{"label": "blue circle", "box": low}]))  # fmt: skip
    recolor = agent.session(r.thread_id).edit("make the red circle blue", seed=2)
    assert recolor.plan.layout[0].box.as_list() == low  # not an object put somewhere new


# -- sessions ---------------------------------------------------------------------------------


def test_session_edit_history_undo_branch_and_resume(engine, tmp_path):
    with LavidaAgent(engine=engine, num_steps=2, selection="accept") as agent:
        s = agent.session()
        assert not s.exists and s.current is None
        src = s.start(np.full((64, 64, 3), 10, np.uint8))
        assert s.current == src
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
        first = s.edit("add a blue square", seed=1)
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
        second = s.edit("add a red circle", seed=2)
        assert [h.instruction for h in s.history()] == ["add a blue square", "add a red circle"]
        assert second.step == 1 and s.current == second.image_ref
        assert s.undo() == first.image_ref
        assert s.redo() == second.image_ref  # undo undone
        assert s.undo() == first.image_ref
        assert s.branch(0) == first.image_ref
        lineage = s.lineage(all_branches=True)
        restart = s.start(np.full((64, 64, 3), 20, np.uint8))  # a restart ends redo, as an edit does
        with pytest.raises(InvalidInputError, match="nothing to redo"):
            s.redo()
        assert s.current == restart
        assert s.history() == []  # the restart begins a new history: no turn made this image
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
        s.edit("add a red circle", seed=3)
        assert [h.instruction for h in s.history()] == ["add a red circle"]
        assert s.history()[0].parent == restart and s.undo() == restart
        assert s.history() == []
        s.branch(0)
        assert src.sha256 in {n["id"] for n in lineage["nodes"]}
        assert second.trace.lineage is not None
        thread = s.thread_id
    # Resume by id from a fresh agent on the same home (SQLite): the state is still there.
    with LavidaAgent(engine=engine, num_steps=2, selection="accept") as again:
        s2 = again.session(thread)
        assert s2.exists and s2.current == first.image_ref
        assert [h.instruction for h in s2.history()] == ["add a blue square"]
        assert np.array_equal(s2.current_image(), first.image)


def test_session_errors(agent):
    s = agent.session()
    with pytest.raises(InvalidInputError, match="no image"):
        s.edit("make it red")
    with pytest.raises(NotFoundError):
        s.history()
    s.start(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="nothing to undo"):
        s.undo()
    with pytest.raises(InvalidInputError, match="nothing to redo"):
        s.redo()
    with pytest.raises(InvalidInputError, match="no step"):
        s.branch(3)
    with pytest.raises(InvalidInputError):
        s.edit("  ")
    for bad in ("", "  ", 123):
        with pytest.raises(InvalidInputError, match="a session id is a non-empty string"):
            agent.session(bad)
    with pytest.raises(InvalidInputError, match="max_rounds must be an integer, got '2'"):
        agent.generate("a red circle", rounds="2")


def test_the_largest_seed_the_agent_takes_runs_every_round(engine):
    with LavidaAgent(engine=engine, num_steps=2, selection="best") as agent:
        r = agent.generate("a red circle", seed=2**63 - 1, rounds=2)  # round 2 draws seed 2**63
    assert [a.seed for a in r.attempts] == [2**63 - 1, 2**63]  # the pipeline takes it (seeds < 2**64)


def test_turns_of_one_session_from_two_threads_run_one_after_the_other(engine):
    class SlowEditor(FakeEngine):
        def edit(self, *args, **kw):
            time.sleep(0.2)  # both turns would read the same state meanwhile
            return super().edit(*args, **kw)

    with LavidaAgent(engine=SlowEditor(), num_steps=2, max_rounds=1) as agent:
        s = agent.session()
        s.start(np.zeros((64, 64, 3), np.uint8))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda ins: s.edit(ins, seed=1), ["add a blue square", "add a red circle"]))
        assert sorted(r.step for r in done) == [0, 1]
        history = s.history()
        assert len(history) == 2 and {h.instruction for h in history} == {"add a blue square", "add a red circle"}
        first, second = sorted(done, key=lambda r: r.step)
        assert second.source_ref == first.image_ref  # the later turn edited the earlier one's result
        assert s.current == second.image_ref

        def nested(event):
            if event.get("event") == "run_start":
                s.edit("add a green square")

        with pytest.raises(BusyError, match="in a turn of this thread already"):
            s.edit("add a red circle", on_event=nested)


def test_a_reopened_or_resumed_session_keeps_the_inputs_shape(engine):
    with LavidaAgent(engine=engine, num_steps=2, max_rounds=1) as agent:
        s = agent.session()
        s.start(_wide_scene())
        r = agent.session(s.thread_id).edit("make the red circle blue", seed=1)  # another Session object
        assert r.content().shape == (32, 64, 3)
        r2 = agent.session(s.thread_id).edit("make the red circle green", seed=2)
        assert r2.content().shape == (32, 64, 3)
        square = agent.session(s.thread_id).edit("make it red", image=np.zeros((64, 64, 3), np.uint8), seed=3)
        assert square.content().shape == (64, 64, 3)  # a restart from a square image is square again


def test_a_session_call_on_a_generate_runs_thread_is_refused_and_leaves_the_run(agent):
    g = agent.generate("a red circle", seed=1)
    s = agent.session(g.thread_id)
    assert not s.exists
    for call in (lambda: s.start(np.zeros((64, 64, 3), np.uint8)), lambda: s.edit("make it red"),
                 lambda: s.edit("make it red", image=np.zeros((64, 64, 3), np.uint8))):  # fmt: skip
        with pytest.raises(InvalidInputError, match="thread of another workflow's run"):
            call()
    assert agent.resume(g.run_id).image_ref == g.image_ref  # the run is as it was


def test_an_exception_of_the_callers_on_event_is_raised_as_it_was(agent):
    class Mine(Exception):
        pass

    def callback(event):
        if event.get("event") == "plan":
            raise ValueError("my callback bug")

    with pytest.raises(ValueError, match="my callback bug") as e:
        agent.generate("a red circle", seed=1, on_event=callback)
    assert not isinstance(e.value, LavidaError)
    (newest,) = recent_runs(agent.settings.runs_dir, limit=1)
    assert newest["status"] == "failed" and "on_event raised ValueError: my callback bug" in newest["error"]

    def on_start(event):
        raise Mine("at the start")

    with pytest.raises(Mine):
        agent.generate("a red circle", seed=1, on_event=on_start)
    assert recent_runs(agent.settings.runs_dir, limit=1)[0]["status"] == "failed"  # not left unfinished


def test_from_pretrained_takes_the_checkpoint_once(engine):
    with pytest.raises(InvalidInputError, match="`path` or as `model_path`, not both"):
        LavidaAgent.from_pretrained("/a", engine=engine, model_path="/b")
    agent = LavidaAgent.from_pretrained(engine=engine, model_path="/b")
    assert agent.settings.model_path == "/b"


# -- async ------------------------------------------------------------------------------------


def test_async_twins(agent, engine):
    engine.enqueue_answer("yes")

    async def main():
        return await asyncio.gather(
            agent.agenerate("red circle", seed=3), agent.aground(_wide_scene(), "red circle"),
            agent.aask(_wide_scene(), "red?"), agent.aedit(_wide_scene(), "noop", seed=1),
        )  # fmt: skip

    gen, gr, ask, ed = asyncio.run(main())
    assert gen.seed == 3 and gen.accepted
    assert gr.boxes[0].box.as_list() == [20.0, 20.0, 60.0, 40.0]
    assert ask.answer == "yes" and ed.step == 0
    assert len({gen.thread_id, gr.thread_id, ask.thread_id, ed.thread_id}) == 4

    async def session_turn():
        s = agent.session()
        s.start(np.zeros((64, 64, 3), np.uint8))
        return await s.aedit("noop", seed=2)

    assert asyncio.run(session_turn()).seed == 2


def test_cancel_event_stops_a_run(agent):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled) as info:
        agent.generate("red circle", seed=1, cancel=cancel)
    trace = load_trace(info.value.run_id, agent.settings.runs_dir)
    assert "cancelled" in trace.error


def test_cancelling_the_async_task_stops_the_worker_at_the_next_step(tmp_path):
    engine = FakeEngine(step_delay_s=0.02)
    with LavidaAgent(engine=engine, num_steps=200, selection="accept") as agent:
        events = []

        async def main():
            task = asyncio.create_task(agent.agenerate("red circle", seed=1, on_event=events.append))
            while engine.calls["generate"] == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await task
            return info.value

        stopped = asyncio.run(main())
        # the task ends only once the worker has stopped: its trace is already written
        (path,) = agent.settings.runs_dir.glob("*.json")
        assert "cancelled" in load_trace(path).error
        assert engine.calls["critique"] == 0  # stopped inside the first sampler loop
        assert stopped.run_id == path.stem  # which run to resume
        end = events[-1]  # the run's end is told however it ends
        assert end["event"] == "run_end" and end["status"] == "stopped" and end["error_code"] == "cancelled"


def test_kept_is_the_round_the_workflow_committed_even_among_equal_images(agent, engine):
    """Two rounds of an edit can draw the same image; the kept round is the committed one."""
    engine.enqueue_edit_plan(EditPlanResult(keep=[RED]))  # (the fake then redraws nothing)
    engine.enqueue_answer("gray")
    engine.enqueue_answer("black")
    scene = draw(np.full((64, 64, 3), 10, np.uint8), [RED])
    r = agent.edit(scene, "change the background to black", seed=1, rounds=2)
    assert r.attempts[0].result == r.attempts[1].result and r.accepted
    assert r.kept == 1 == r.trace.result["kept_round"] and r.to_dict()["kept"] == 1


def test_closing_the_agent_stops_its_runs_resumably_and_it_opens_again(tmp_path):
    engine = FakeEngine(step_delay_s=0.02)
    agent = LavidaAgent(engine=engine, num_steps=200, selection="accept")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(agent.generate, "red circle", seed=i) for i in range(2)]
        while engine.calls["generate"] < 2:
            time.sleep(0.01)
        agent.close()  # returns once both have stopped
        for run in runs:
            with pytest.raises(GenerationCancelled, match="its agent was closed") as info:
                run.result(timeout=5)
            assert info.value.resumable
    done = agent.generate("red circle", seed=3, num_steps=2)  # used again: opened anew
    assert done.accepted
    agent.close()


def test_a_text_longer_than_the_prompt_limit_is_refused(engine):
    with LavidaAgent(engine=engine, max_prompt_chars=50) as agent:
        for call in (lambda: agent.generate("a red circle " * 10),
                     lambda: agent.ground(np.zeros((8, 8, 3), np.uint8), ["the circle " * 10]),
                     lambda: agent.session().edit("make it red " * 10)):  # fmt: skip
            with pytest.raises(InvalidInputError, match="at most 50"):
                call()
        assert not engine.log  # refused before anything ran


def test_a_cancelled_session_turn_ends_before_the_next_turn_starts():
    # A server holds a session's lock around `aedit`: the cancelled turn must have stopped
    # writing checkpoints by the time the lock is free, or the next turn's edit is lost.
    class SlowPlanner(FakeEngine):
        planning = False

        def plan_edit(self, image, instruction):
            self.planning = True
            time.sleep(0.3)  # an engine call does not look at the cancel event
            self.planning = False
            return super().plan_edit(image, instruction)

    engine = SlowPlanner()
    with LavidaAgent(engine=engine, max_rounds=1) as agent:
        session = agent.session()
        session.start(np.zeros((64, 64, 3), np.uint8))

        async def main():
            task = asyncio.create_task(session.aedit("make the circle red", seed=1))
            while not engine.planning:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not engine.planning and engine.calls["edit"] == 0  # stopped, not running on
            return await session.aedit("make the square blue", seed=2)

        second = asyncio.run(main())
        assert [s.instruction for s in session.history()] == ["make the square blue"]
        assert session.state().current_step == second.step


# -- errors -----------------------------------------------------------------------------------


def test_input_errors_are_invalid_input(agent, tmp_path):
    with pytest.raises(InvalidInputError):
        agent.generate("   ")
    with pytest.raises(InvalidInputError, match="no such image"):
        agent.ground(tmp_path / "missing.png", "x")
    with pytest.raises(InvalidInputError):
        agent.ground(np.zeros((8, 8, 3), np.uint8), [])
    with pytest.raises(InvalidInputError, match="rounds"):
        agent.generate("red circle", rounds=0)
    for seed in (-1, 2**63, True, 1.5):
        with pytest.raises(InvalidInputError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            agent.generate("red circle", seed=seed)
    with pytest.raises(ValueError):  # InvalidInputError is also a ValueError
        agent.ask(b"not an image", "q")


def test_a_failing_node_is_a_workflow_error_with_a_trace(agent, engine, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(engine, "generate", boom)
    with pytest.raises(WorkflowError, match="generate_image.*sampler exploded") as info:
        agent.generate("red circle", seed=1)
    trace = load_trace(info.value.run_id, agent.settings.runs_dir)
    assert trace.nodes[-1].node == "generate_image" and trace.nodes[-1].error
    assert isinstance(info.value.__cause__, RuntimeError)


def test_model_load_errors(tmp_path):
    agent = LavidaAgent(model_path=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="nope"):
        agent.engine  # noqa: B018
    with pytest.raises(ModelLoadError):
        LavidaAgent.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()  # a folder, but no checkpoint in it
    with pytest.raises(ModelLoadError, match="cannot load the model from") as info:
        LavidaAgent(model_path=str(tmp_path / "empty")).engine  # noqa: B018
    assert "Context(engine" not in str(info.value)  # the graph callers' hint is not for this caller


def test_closing_an_agent_leaves_the_shared_cached_engine_open(monkeypatch, tmp_path):
    """`load_engine` is cached per model path and shared: one agent closing must not close
    it for the next (re-running a notebook cell, two apps in one process)."""
    import lavida_agent.graphs.engine as engine_module

    class Closable(FakeEngine):
        closed = False

        def close(self) -> None:
            self.closed = True

    shared = Closable()
    monkeypatch.setattr(engine_module, "load_engine", lambda path=None: shared)
    kw = dict(artifacts_dir=str(tmp_path / "a"), db_path=":memory:", num_steps=3)
    with LavidaAgent(**kw) as first:
        assert first.engine is shared
    assert not shared.closed
    with LavidaAgent(**kw) as second:
        assert second.engine is shared
        assert second.generate("a red circle", seed=1, rounds=1).image.shape == (64, 64, 3)
    assert not shared.closed


@pytest.mark.parametrize(
    "raised, expected",
    [
        (ImageError("bad image"), InvalidInputError),
        (ValueError("bad value"), InvalidInputError),
        (EngineUnavailableError("no model"), ModelLoadError),
        (concurrent.futures.CancelledError(), GenerationCancelled),
        (GenerationCancelled("stop"), GenerationCancelled),
    ],
)
def test_map_exceptions(raised, expected):
    with pytest.raises(expected) as info:
        with map_exceptions():
            raise raised
    assert isinstance(info.value, LavidaError) and str(info.value)


def test_map_exceptions_leaves_bugs_alone():
    with pytest.raises(RuntimeError):
        with map_exceptions():
            raise RuntimeError("a bug")
    with pytest.raises(NotFoundError):
        with map_exceptions({KeyError: NotFoundError}):
            raise KeyError("run 1")


def test_review_plan_replaces_the_layout_before_anything_is_drawn(agent, engine):
    seen, events = [], []

    def reviewer(layout):
        seen.append(layout)
        assert engine.calls["generate"] == 0  # asked before drawing
        return [{"label": "green triangle", "box": [8, 8, 30, 30]}]

    r = agent.generate("red circle and blue square", seed=2, review_plan=reviewer, on_event=events.append)
    assert [item["label"] for item in seen[0]] == ["red circle", "blue square"]
    assert all(len(item["box"]) == 4 for item in seen[0])  # documented [x0, y0, x1, y1] form
    assert [i.label for i in r.layout] == ["green triangle"] and r.plan.source == "user"
    assert engine.calls["plan_layout"] == 1 and engine.calls["generate"] == 1  # no model work repeated
    assert any(e.get("event") == "interrupt" and e.get("kind") == "review_plan" for e in events)


def test_review_plan_approval_keeps_the_model_layout(agent, engine):
    r = agent.generate("red circle and blue square", seed=2, review_plan=lambda layout: True)
    assert [i.label for i in r.layout] == ["red circle", "blue square"] and r.plan.source == "model"
    skipped = agent.generate("red circle", seed=2, plan=False, review_plan=lambda layout: 1 / 0)
    assert skipped.layout == []  # nothing to review without a model plan


def test_a_bad_review_answer_is_a_clear_error(agent, engine):
    with pytest.raises(LavidaError, match="review_plan"):
        agent.generate("red circle", seed=2, review_plan=lambda layout: "maybe")
    bad = {"label": "red circle", "box": [30, 30, 10, 10]}
    with pytest.raises(InvalidInputError, match=r"layout item 1 .*x1 \(10.0\) must be >= x0"):
        agent.generate("red circle", seed=2, review_plan=lambda layout: [RED, bad])
    assert engine.calls["generate"] == 0  # refused before anything was drawn


@pytest.mark.parametrize("box, why", [([30, 30, 10, 10], "must be >= x0"), ([float("nan"), 0, 9, 9], "finite"),
                                      ([5, 5, 5, 9], "no area"), ([1, 2, 3], "4 numbers"),
                                      ([True, 0, 9, 9], "must hold numbers"), (["1", "2", "30", "40"], "must hold numbers")])  # fmt: skip
def test_a_given_plan_is_checked_before_the_run(agent, engine, box, why):
    with pytest.raises(InvalidInputError, match=why):
        agent.generate("red circle", seed=1, plan=[{"label": "red circle", "box": box}])
    assert sum(engine.calls.values()) == 0


def test_a_rejected_plan_and_the_fits_reach_the_result_and_its_trace(engine):
    from lavida_agent.traces import render_html

    agent = LavidaAgent(engine=engine, num_steps=3, selection="accept", rank_by="fit")

    swapped = [{"label": "small red circle", "box": [40.0, 20.0, 52.0, 32.0]},
               {"label": "large blue square", "box": [10.0, 20.0, 30.0, 40.0]}]  # fmt: skip
    right = [{"label": "small red circle", "box": [10.0, 20.0, 22.0, 32.0]},
             {"label": "large blue square", "box": [40.0, 20.0, 60.0, 40.0]}]  # fmt: skip
    engine.enqueue_plan(swapped)
    engine.enqueue_plan(right)
    engine.enqueue_fit([1.5, 2.5])
    d = agent.generate("a red circle left of a blue square", seed=2).to_dict()
    assert d["plan"] == right and d["plan_problems"] == []
    assert d["rejected_plans"] == [{"items": swapped, "problems": ["red circle should be left of blue square"]}]
    assert d["attempts"][0]["fit"] == [1.5, 2.5]
    r = agent.generate("a red circle left of a blue square", seed=2)  # unscripted: fake plans fail
    page = render_html(r.trace, agent.store)
    assert "plan rejected" in page and "fit " in page
    agent.close()


def test_by_default_every_round_is_drawn_and_the_cleanest_kept(engine):
    engine.enqueue_surprise(-3.0)
    engine.enqueue_surprise(-1.0)
    with LavidaAgent(engine=engine, num_steps=2) as agent:  # default settings: selection best
        r = agent.generate("red circle and blue square", seed=1, rounds=2)
    assert len(r.attempts) == 2 and all(c.accepted for c in r.critiques)  # no early stop
    assert r.image_ref == r.attempts[1].image and r.accepted
    assert r.kept == 1 and r.to_dict()["kept"] == 1 and r.trace.result["kept_round"] == 1  # said where kept
    assert [c.worst_token for c in r.critiques] == [-3.0, -1.0] and r.to_dict()["attempts"][1]["fit"] == []
    engine.enqueue_fit([1.0, 1.0])
    engine.enqueue_fit([4.0, 3.0])
    with LavidaAgent(engine=engine, num_steps=2, rank_by="fit") as agent:
        r = agent.generate("red circle and blue square", seed=1, rounds=2)
    assert r.image_ref == r.attempts[1].image and r.to_dict()["attempts"][1]["fit"] == [4.0, 3.0]


def test_grounding_settings_get_an_engine_of_their_own(tmp_path, monkeypatch):
    """A grounding setting other than the checkpoint's builds an owned engine whose pipeline
    decodes that many candidates; the shared cached engine is left alone."""
    import lavida_agent.graphs.engine as engine_module

    monkeypatch.setattr(engine_module, "load_engine", lambda *a: pytest.fail("the shared engine was used"))
    for settings, read in [({"ground_candidates": 1}, (1, 1)),  # candidates alone: the image alone
                           ({"ground_views": 6}, (6, 4)),
                           ({"ground_views": 3, "ground_candidates": 2}, (3, 2))]:
        agent = LavidaAgent(home=tmp_path, **settings)
        try:
            engine = agent.engine
            defaults = engine.backend.pipeline.defaults
            assert agent._owns_engine and (defaults["ground_views"], defaults["ground_candidates"]) == read
        finally:
            agent.close()
    with pytest.raises(InvalidInputError, match="ground_candidates"):
        LavidaAgent(home=tmp_path, ground_candidates=0)
    with pytest.raises(InvalidInputError, match="ground_views"):
        LavidaAgent(home=tmp_path, ground_views=25)
