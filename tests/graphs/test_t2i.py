"""The `t2i` workflow on `FakeEngine`: the bounded loop, routers, seeds, state, interrupts,
streaming."""

from __future__ import annotations

import json
import re

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from lavida_agent.graphs import t2i
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.runtime import BatchingEngine
from lavida_agent.graphs.state import Box, Critique, LayoutItem, Stray, T2IOutput, T2IState
from tests.fakes import FakeBatchedBackend, FakeEngine, default_plan

PROMPT = "red circle and blue square"


def _critique(verdict, blamed=()):
    return Critique(round=0, image=_ref(), verdict=verdict, model_ok=verdict == "accept",
                    blamed=list(blamed), score=1.0 if verdict == "accept" else 0.0)  # fmt: skip


def _ref():
    from lavida_agent.tools.artifacts import ImageRef

    return ImageRef.for_image("0" * 64, 64, 64)


def _state(**kw):
    from lavida_agent.graphs.state import Attempt

    n = kw.pop("n_attempts", 1)
    attempts = [Attempt(round=i, image=_ref(), seed=i, num_steps=4, mode="generate")
                for i in range(n)]  # fmt: skip
    return T2IState(prompt="p", attempts=attempts, **kw)


# -- routers, as pure functions ---------------------------------------------------------


def test_route_after_critique_ends_on_accept():
    assert t2i.route_after_critique(_state(accepted=True, max_rounds=3, selection="accept")) == "__end__"


def test_route_after_critique_draws_every_round_under_selection_best():
    assert t2i.route_after_critique(_state(accepted=True, max_rounds=3, selection="best")) == "refine_image"
    assert t2i.route_after_critique(_state(accepted=True, max_rounds=3, selection="best", n_attempts=3)) == (
        "__end__"
    )


def test_route_after_critique_refines_while_rounds_left():
    assert t2i.route_after_critique(_state(accepted=False, max_rounds=3, n_attempts=2)) == (
        "refine_image"
    )


def test_route_after_critique_stops_at_max_rounds():
    assert t2i.route_after_critique(_state(accepted=False, max_rounds=3, n_attempts=3)) == (
        "__end__"
    )


def test_refine_mode():
    blamed = [LayoutItem(label="x", box=Box.model_validate([0, 0, 8, 8]))]
    assert t2i.refine_mode("auto", _critique("reject", blamed)) == "regenerate_regions"
    assert t2i.refine_mode("auto", _critique("reject")) == "generate"
    assert t2i.refine_mode("regenerate", _critique("reject", blamed)) == "generate"
    assert t2i.refine_mode("regions", _critique("reject")) == "generate"  # nothing to re-mask
    stray = _critique("reject", blamed).model_copy(update={"strays": [Stray(box=blamed[0].box, score=-9.0)]})
    assert t2i.refine_mode("auto", stray) == "generate"  # a stray's region grows back when redrawn
    assert t2i.refine_mode("regions", stray) == "regenerate_regions"


# -- the loop ---------------------------------------------------------------------------


def test_stops_on_first_accepting_critique(engine, ctx, caplog):
    with caplog.at_level("WARNING", logger="lavida_agent.graphs"):
        out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    (warning,) = caplog.messages  # said once, with the parser's reason
    assert "outside the ShapesWorld grammar (unexpected word 'red'" in warning
    assert out.accepted and len(out.attempts) == 1 and len(out.critiques) == 1
    # a prompt outside the grammar cannot be checked against a scene: no perception, the
    # model's critique answers
    assert engine.calls == {"plan_layout": 1, "generate": 1, "critique": 1, "ground": 1, "surprise": 1}
    assert out.critiques[0].judged_by == "model"
    assert out.best == out.attempts[0]
    assert all(c.ok for c in out.critiques[0].grounding)
    assert [info.get("views") for m, info in engine.log if m == "ground"] == [1]  # the image alone


def test_a_prompt_in_the_grammar_draws_no_warning(engine, ctx, caplog):
    with caplog.at_level("WARNING", logger="lavida_agent.graphs"):
        t2i.graph.invoke({"prompt": "a red circle and a blue square"}, context=ctx)
    assert caplog.messages == []


def test_stops_at_max_rounds_and_keeps_best(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3, seed=7, grounding_check="gate", selection="accept")
    engine.enqueue_critique(False, ["too dark"])  # round 0: rejected, nothing found: 0/3
    engine.enqueue_ground([[0, 0, 0, 0], [0, 0, 0, 0]])
    engine.enqueue_critique(True)  # round 1: model accepts, one object missing: 2/3
    engine.enqueue_ground([[0, 0, 0, 0], [34, 20, 62, 44]])
    engine.enqueue_critique(False, ["still wrong"])  # round 2: 2/3 too; the earlier one wins
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert not out.accepted
    assert len(out.attempts) == ctx.max_rounds == len(out.critiques)
    assert [c.verdict for c in out.critiques] == ["reject"] * 3
    # Round 1 scored best: model ok and one of two objects found.
    assert out.critiques[1].score == pytest.approx(2 / 3)
    assert out.best == out.attempts[1]


def test_model_rejection_regenerates_with_feedback_and_next_seed(engine, ctx):
    engine.enqueue_critique(False, ["the square should be blue"])
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT, "seed": 100}, context=ctx))
    assert out.accepted and [a.mode for a in out.attempts] == ["generate", "generate"]
    assert [a.seed for a in out.attempts] == [100, 101]
    assert out.attempts[1].feedback == ["the square should be blue"]
    generates = [info for m, info in engine.log if m == "generate"]
    assert generates[-1] == {"prompt": PROMPT, "seed": 101, "num_steps": 4,
                             "feedback": ["the square should be blue"]}  # fmt: skip


# -- the verdict read off the perceived scene ---------------------------------------------

GRAMMAR_PROMPT = "a red circle and a blue square"


def _see(engine, caption, boxes):
    """Script one perception: the caption, then the grounding of its objects."""
    engine.enqueue_answer(caption)
    engine.enqueue_ground(boxes)


def test_a_perceived_scene_that_satisfies_the_prompt_is_accepted_without_the_critique(engine, ctx):
    _see(engine, "a large red circle and a small blue square on a white background",
         [[4, 4, 26, 26], [40, 40, 52, 52]])  # fmt: skip
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": GRAMMAR_PROMPT}, context=ctx))
    c = out.critiques[0]
    assert out.accepted and c.judged_by == "scene" and c.model_ok and c.reasons == []
    assert c.perception is not None and [o.label for o in c.perception.objects] == [
        "large red circle", "small blue square"]  # fmt: skip
    assert "critique" not in engine.calls  # the model's critique answer was not needed
    # the perception reads greedily; the planned objects' check reads its own views
    grounds = [info for m, info in engine.log if m == "ground"]
    assert grounds[0]["candidates"] == 1 and grounds[0]["expressions"] == [
        "the large red circle", "the small blue square"]  # fmt: skip


def test_a_perceived_scene_that_misses_an_object_is_rejected_with_the_rule_reason(engine, ctx):
    _see(engine, "a large red circle on a white background", [[4, 4, 26, 26]])
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": GRAMMAR_PROMPT, "seed": 5}, context=ctx))
    first = out.critiques[0]
    assert first.verdict == "reject" and first.judged_by == "scene" and not first.model_ok
    assert first.reasons == ["missing blue square"] and first.model_text.startswith("a large red circle")
    # the next round is drawn with the rule's reason as feedback, then judged again
    assert out.attempts[1].mode == "generate" and out.attempts[1].feedback == ["missing blue square"]


def test_an_unparsed_caption_or_critique_by_model_asks_the_models_critique(engine, store):
    engine.enqueue_answer("a red blob")  # no object phrase: nothing to ground
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=1)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": GRAMMAR_PROMPT}, context=ctx))
    assert out.critiques[0].judged_by == "model" and engine.calls["critique"] == 1
    assert out.critiques[0].perception is not None and not out.critiques[0].perception.complete
    engine.calls.clear()
    model_ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=1, critique_by="model")
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": GRAMMAR_PROMPT}, context=model_ctx))
    assert out.critiques[0].judged_by == "model" and out.critiques[0].perception is None
    assert "answer" not in engine.calls and engine.calls["critique"] == 1


def test_grounding_blames_missing_object_and_redraws_only_its_box(store):
    engine = FakeEngine(drop_labels=["blue square"])
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3, seed=3, grounding_check="gate", selection="accept")
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    first = out.critiques[0]
    assert first.verdict == "reject" and first.model_ok
    assert [b.label for b in first.blamed] == ["blue square"]
    assert "blue square is not where the layout puts it" in first.reasons[0]
    second = out.attempts[1]
    assert second.mode == "regenerate_regions" and second.parent == out.attempts[0].image
    assert second.regions == [first.blamed[0].box] and second.seed == 4
    assert out.accepted and engine.calls["regenerate_regions"] == 1
    # Pixels outside the blamed box are untouched.
    before, after = store.open(out.attempts[0].image), store.open(second.image)
    box = second.regions[0]
    mask = after != before
    mask[int(box.y0):int(box.y1), int(box.x0):int(box.x1)] = False
    assert not mask.any()


def test_refine_regenerate_mode_ignores_blamed_boxes(store):
    engine = FakeEngine(drop_labels=["blue square"])
    ctx = Context(engine=engine, artifacts=store, max_rounds=2, refine="regenerate", grounding_check="gate", selection="accept")
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert [a.mode for a in out.attempts] == ["generate", "generate"]
    assert engine.calls["regenerate_regions"] == 0 and not out.accepted


GRAMMAR_PROMPT = "a red circle and a blue square"  # inside the ShapesWorld grammar


def test_rejection_for_reasons_the_prompt_rules_out_defers_to_grounding(engine, ctx):
    engine.enqueue_critique(False, ["missing purple circle"])  # no purple circle was asked for
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": GRAMMAR_PROMPT}, context=ctx))
    assert out.accepted and len(out.attempts) == 1  # every planned object was found
    (critique,) = out.critiques
    assert not critique.model_ok and critique.reasons == []
    assert critique.dropped_reasons == ["missing purple circle"]
    assert all(g.ok for g in critique.grounding)


def test_misread_rejection_still_rejects_when_grounding_fails(store):
    engine = FakeEngine(drop_labels=["a blue square"])
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=1, selection="accept")
    engine.enqueue_critique(False, ["missing purple circle"])
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": GRAMMAR_PROMPT}, context=ctx))
    (critique,) = out.critiques
    assert not out.accepted and critique.dropped_reasons == ["missing purple circle"]
    assert len(critique.reasons) == 1 and "a blue square" in critique.reasons[0]


def test_reasons_the_prompt_rules_out_are_not_fed_back(engine, ctx):
    engine.enqueue_critique(False, ["missing purple circle", "missing red circle"])
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": GRAMMAR_PROMPT}, context=ctx))
    first = out.critiques[0]
    assert first.verdict == "reject" and first.reasons == ["missing red circle"]
    assert first.dropped_reasons == ["missing purple circle"]
    assert out.attempts[1].feedback == ["missing red circle"] and out.accepted


def test_rank_mode_lets_the_model_decide_and_records_the_checks(store):
    engine = FakeEngine(drop_labels=["blue square"])  # grounding misses the square
    ctx = Context(engine=engine, artifacts=store, max_rounds=3, selection="accept")  # grounding_check="rank"
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert out.accepted and len(out.attempts) == 1 and out.best == out.attempts[0]
    (critique,) = out.critiques
    assert critique.verdict == "accept" and critique.reasons == [] and critique.blamed == []
    assert [(g.label, g.ok) for g in critique.grounding] == [("red circle", True), ("blue square", False)]
    assert critique.grounding_failed == ["blue square"]


def test_rank_mode_blames_failed_checks_when_the_model_rejects(store):
    engine = FakeEngine(drop_labels=["blue square"])
    engine.enqueue_critique(False, ["too dark"])
    ctx = Context(engine=engine, artifacts=store, max_rounds=3, selection="accept")
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert [c.verdict for c in out.critiques] == ["reject", "accept"]
    assert [b.label for b in out.critiques[0].blamed] == ["blue square"]
    assert out.critiques[0].reasons[0] == "too dark" and out.attempts[1].mode == "regenerate_regions"


def test_an_accepted_attempt_beats_a_better_scored_rejected_one(engine, store):
    boxes = [item["box"] for item in default_plan(PROMPT)]
    engine.enqueue_critique(False, ["too dark"])  # round 0: rejected, both objects found: 2/3
    engine.enqueue_ground(boxes)
    engine.enqueue_ground([[0, 0, 0, 0], [0, 0, 0, 0]])  # round 1: accepted, none found: 1/3
    ctx = Context(engine=engine, artifacts=store, max_rounds=3, selection="accept")
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert [c.score for c in out.critiques] == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert out.accepted and out.best == out.attempts[1]


def test_off_mode_skips_grounding(store):
    engine = FakeEngine(drop_labels=["blue square"])
    ctx = Context(engine=engine, artifacts=store, grounding_check="off", selection="accept")
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert out.accepted and out.critiques[0].grounding == [] and engine.calls["ground"] == 0


def test_a_stray_mark_rejects_and_the_next_image_is_drawn_afresh(engine, ctx, store):
    engine.enqueue_surprise(-5.6, [{"box": [48.0, 0.0, 60.0, 8.0], "score": -5.6}])  # round 0 only
    engine.drop_labels = {"blue square"}  # grounding misses the square too: a blamed box
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    first, second = out.critiques
    assert first.model_ok and first.verdict == "reject" and [s.score for s in first.strays] == [-5.6]
    assert first.reasons[1:] == ["something the layout does not plan is drawn at [48, 0, 60, 8] (stray fit -5.6)."]
    assert first.reasons[0].startswith("blue square is not where") and [b.label for b in first.blamed] == ["blue square"]
    redraw = out.attempts[1]
    assert redraw.mode == "generate" and redraw.regions == [] and redraw.seed == out.attempts[0].seed + 1
    assert second.accepted and second.strays == [] and out.best == redraw
    assert engine.log[[m for m, _ in engine.log].index("surprise")][1] == {"labels": ["red circle", "blue square"]}


def test_the_fake_engine_finds_an_object_off_the_plan(engine):
    """What the workflow sends `surprise` is the attempt's plan: an object drawn off it (here
    the plan names one object, the image holds two) is a stray."""
    both = default_plan(PROMPT)
    image = engine.generate(PROMPT, plan=both, seed=0, num_steps=1)
    found = engine.surprise(image, PROMPT, plan=both[:1])
    assert [m["box"] for m in found.strays] == [both[1]["box"]] and found.worst < 0
    assert engine.surprise(image, PROMPT, plan=both).strays == []


def test_stray_check_off_ignores_strays_and_skips_the_call_unless_ranking_needs_it(store):
    for rank_by, calls in (("surprise", 1), ("fit", 0)):
        engine = FakeEngine()
        engine.enqueue_surprise(-5.6, [{"box": [48.0, 0.0, 60.0, 8.0], "score": -5.6}])
        ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3, stray_check="off", rank_by=rank_by,
                      selection="accept")  # fmt: skip
        out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
        assert out.accepted and len(out.attempts) == 1 and out.critiques[0].strays == []
        assert engine.calls["surprise"] == calls


def test_input_plan_skips_planning(engine, ctx):
    plan = {"items": [{"label": "red circle", "box": [10, 10, 30, 30]}]}
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": "x", "plan": plan}, context=ctx))
    assert engine.calls["plan_layout"] == 0 and out.plan.source == "input"
    assert out.critiques[0].grounding[0].iou == 1.0


# -- seeds and state --------------------------------------------------------------------


def test_recorded_seeds_replay_identically(store):
    def run():
        engine = FakeEngine(drop_labels=["blue square"])
        engine.enqueue_critique(False, ["no"])
        ctx = Context(engine=engine, artifacts=store, max_rounds=3, seed=11, refine="auto", selection="accept")
        return T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))

    first = run()
    assert [a.seed for a in first.attempts] == [11, 12, 13][: len(first.attempts)]
    # Replaying each recorded attempt from its recorded seed/plan/feedback gives the same image.
    engine = FakeEngine(drop_labels=["blue square"])
    for a in first.attempts:
        if a.mode == "generate":
            img = engine.generate(PROMPT, plan=a.plan.to_engine(), seed=a.seed,
                                  num_steps=a.num_steps, feedback=a.feedback)  # fmt: skip
        else:
            img = engine.regenerate_regions(store.open(a.parent), PROMPT, plan=a.plan.to_engine(),
                                            boxes=[b.as_list() for b in a.regions], seed=a.seed,
                                            num_steps=a.num_steps)  # fmt: skip
        assert store.put(img) == a.image
    # And a second full run records the same images and seeds.
    second = run()
    assert [(a.seed, a.image) for a in second.attempts] == [(a.seed, a.image) for a in first.attempts]


def test_state_is_json_serialisable_without_image_bytes(store):
    engine = FakeEngine(drop_labels=["blue square"])
    ctx = Context(engine=engine, artifacts=store, max_rounds=2, selection="accept")
    saver = InMemorySaver()
    g = t2i.build_t2i_graph().compile(checkpointer=saver)
    cfg = {"configurable": {"thread_id": "j"}}
    g.invoke({"prompt": PROMPT}, cfg, context=ctx)
    values = T2IState.model_validate(g.get_state(cfg).values)
    text = json.dumps(values.model_dump(mode="json"))
    assert len(text) < 20_000
    for snap in g.get_state_history(cfg):
        _assert_no_bytes(snap.values)
    assert T2IState.model_validate_json(text) == values


def _assert_no_bytes(obj):
    import numpy as np

    if isinstance(obj, bytes | bytearray | memoryview | np.ndarray | np.generic):
        raise AssertionError(f"image data in state: {type(obj)}")
    if isinstance(obj, dict):
        for v in obj.values():
            _assert_no_bytes(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _assert_no_bytes(v)
    elif hasattr(obj, "model_dump"):
        _assert_no_bytes(obj.model_dump())


# -- human in the loop ------------------------------------------------------------------


def test_review_plan_interrupt_and_resume_repeat_no_model_work(engine, store):
    ctx = Context(engine=engine, artifacts=store, review_plan=True, selection="accept")
    g = t2i.build_t2i_graph().compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "review"}}
    out = g.invoke({"prompt": PROMPT}, cfg, context=ctx)
    (intr,) = out["__interrupt__"]
    assert intr.value["kind"] == "review_plan" and len(intr.value["plan"]["items"]) == 2
    assert g.get_state(cfg).next == ("review_plan",)
    assert engine.calls == {"plan_layout": 1}
    # The reviewer moves the circle; nothing planned twice, the new plan is drawn.
    new_plan = [{"label": "red circle", "box": [4, 4, 20, 20]}]
    out = T2IOutput.model_validate(g.invoke(Command(resume=new_plan), cfg, context=ctx))
    assert engine.calls == {"plan_layout": 1, "generate": 1, "critique": 1, "ground": 1, "surprise": 1}
    assert out.plan.source == "user" and out.attempts[0].plan == out.plan and out.accepted


def test_review_plan_asks_again_after_an_answer_it_cannot_use(engine, store):
    ctx = Context(engine=engine, artifacts=store, review_plan=True, selection="accept")
    g = t2i.build_t2i_graph().compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "bad-review"}}
    g.invoke({"prompt": PROMPT}, cfg, context=ctx)
    for bad, why in (([{"label": "red circle", "box": [20, 20, 4, 4]}], r"layout item 0 .*must be >= x0"),
                     ("maybe", "cannot use the answer 'maybe'"),
                     ([], "an empty layout draws nothing")):  # fmt: skip
        out = g.invoke(Command(resume=bad), cfg, context=ctx)
        (intr,) = out["__interrupt__"]  # asked again, saying why
        assert re.search(why, intr.value["problem"]) and intr.value["plan"]["items"]
        assert g.get_state(cfg).next == ("review_plan",) and engine.calls == {"plan_layout": 1}
    out = T2IOutput.model_validate(g.invoke(Command(resume=True), cfg, context=ctx))
    assert out.plan.source == "model" and engine.calls["plan_layout"] == 1 and out.attempts


def test_review_plan_refuses_boxes_off_an_engines_canvas(store):
    class Sized(FakeBatchedBackend):
        canvas = 64  # a backend that says its canvas (PipelineBackend does)

    engine = BatchingEngine(Sized())  # what `load_engine` gives: the canvas is the backend's
    try:
        ctx = Context(engine=engine, artifacts=store, review_plan=True, selection="accept")
        g = t2i.build_t2i_graph().compile(checkpointer=InMemorySaver())
        cfg = {"configurable": {"thread_id": "off-canvas"}}
        g.invoke({"prompt": PROMPT}, cfg, context=ctx)
        out = g.invoke(Command(resume=[{"label": "red square", "box": [40, 40, 90, 90]}]), cfg, context=ctx)
        (intr,) = out["__interrupt__"]
        assert "outside the 64x64 canvas" in intr.value["problem"]
    finally:
        engine.close()


def test_review_plan_approve(engine, store):
    ctx = Context(engine=engine, artifacts=store, review_plan=True, selection="accept")
    g = t2i.build_t2i_graph().compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "approve"}}
    g.invoke({"prompt": PROMPT}, cfg, context=ctx)
    out = T2IOutput.model_validate(g.invoke(Command(resume=True), cfg, context=ctx))
    assert out.plan.source == "model" and engine.calls["plan_layout"] == 1 and out.accepted


# -- streaming --------------------------------------------------------------------------


def _check_events(events):
    kinds = [e["event"] for e in events]
    assert kinds[0] == "node_start" and kinds[-1] == "node_end"
    for node in ("plan_layout", "review_plan", "generate_image", "critique_image"):
        if node != "review_plan":
            assert {"event": "node_start", "node": node} in events
    steps = [e for e in events if e["event"] == "sampler_step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["preview"] is not None for e in steps] == [False, True, False, True]
    assert set(steps[1]["preview"]) == {"sha256", "width", "height", "path"}
    assert {"plan", "image", "critique"} <= set(kinds)
    json.dumps(events)


def test_stream_custom_events(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, preview_every=2, selection="accept")
    events = list(t2i.graph.stream({"prompt": PROMPT}, context=ctx, stream_mode="custom"))
    _check_events(events)


async def test_astream_custom_events(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, preview_every=2, selection="accept")
    events = []
    async for mode, chunk in t2i.graph.astream({"prompt": PROMPT}, context=ctx,
                                               stream_mode=["custom", "updates"]):  # fmt: skip
        if mode == "custom":
            events.append(chunk)
    _check_events(events)


# -- the plan check ---------------------------------------------------------------------

POSITION_PROMPT = "a red circle left of a blue square"
RIGHT_PLAN = [{"label": "small red circle", "box": [10.0, 20.0, 22.0, 32.0]},
              {"label": "large blue square", "box": [40.0, 20.0, 60.0, 40.0]}]  # fmt: skip
SWAPPED_PLAN = [{"label": "small red circle", "box": [40.0, 20.0, 52.0, 32.0]},
                {"label": "large blue square", "box": [10.0, 20.0, 30.0, 40.0]}]  # fmt: skip
ONE_OBJECT_PLAN = [{"label": "small red circle", "box": [10.0, 20.0, 22.0, 32.0]}]


def _plan_calls(engine):
    return [info for method, info in engine.log if method == "plan_layout"]


def test_a_plan_that_fails_the_check_is_recorded_and_replanned(engine, ctx):
    engine.enqueue_plan(SWAPPED_PLAN)
    engine.enqueue_plan(RIGHT_PLAN)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": POSITION_PROMPT}, context=ctx))
    # the first plan is greedy at the base seed, the re-plan samples at base + 1
    assert [(c["seed"], c["temperature"]) for c in _plan_calls(engine)] == [(7, 0.0), (8, 0.5)]
    assert [r.problems for r in out.rejected_plans] == [["red circle should be left of blue square"]]
    assert out.rejected_plans[0].to_engine() == SWAPPED_PLAN
    assert out.plan.to_engine() == RIGHT_PLAN and out.plan.problems == []
    assert (out.plan.seed, out.plan.temperature) == (8, 0.5)
    assert out.attempts[0].plan == out.plan  # the image is drawn from the plan that passed
    assert out.attempts[0].seed == 7  # image seeds do not move with re-plans


def test_when_every_plan_fails_the_one_with_fewest_problems_is_drawn(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=1, seed=3, plan_retries=2, selection="accept")
    wrong_twice = [{"label": "small green circle", "box": [40.0, 20.0, 52.0, 32.0]},
                   {"label": "large green square", "box": [10.0, 40.0, 30.0, 60.0]}]  # fmt: skip
    for plan in (wrong_twice, SWAPPED_PLAN, ONE_OBJECT_PLAN):
        engine.enqueue_plan(plan)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": POSITION_PROMPT}, context=ctx))
    assert len(_plan_calls(engine)) == 3
    # SWAPPED_PLAN and ONE_OBJECT_PLAN have one problem each, wrong_twice two: the earliest
    # of the fewest is drawn
    assert out.plan.to_engine() == SWAPPED_PLAN and len(out.plan.problems) == 1
    assert [p.to_engine() for p in out.rejected_plans] == [wrong_twice, ONE_OBJECT_PLAN]
    assert all(len(p.problems) >= len(out.plan.problems) for p in out.rejected_plans)


def test_plan_retries_zero_draws_the_first_plan_with_its_problems(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=1, plan_retries=0, selection="accept")
    engine.enqueue_plan(SWAPPED_PLAN)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": POSITION_PROMPT}, context=ctx))
    assert len(_plan_calls(engine)) == 1 and out.rejected_plans == []
    assert out.plan.problems == ["red circle should be left of blue square"]


def test_prompts_outside_the_grammar_and_input_plans_are_not_checked(engine, ctx):
    engine.enqueue_plan(ONE_OBJECT_PLAN)  # would fail for a grammar prompt with two objects
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert len(_plan_calls(engine)) == 1 and out.rejected_plans == [] and out.plan.problems == []
    plan = {"items": SWAPPED_PLAN, "source": "input"}
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": POSITION_PROMPT, "plan": plan}, context=ctx))
    assert len(_plan_calls(engine)) == 1 and out.plan.source == "input" and out.plan.problems == []


def test_rejected_plans_are_streamed(engine, ctx):
    engine.enqueue_plan(SWAPPED_PLAN)
    engine.enqueue_plan(RIGHT_PLAN)
    events = [e for _, e in t2i.graph.stream({"prompt": POSITION_PROMPT}, context=ctx,
                                             stream_mode=["custom"])]  # fmt: skip
    kinds = [e["event"] for e in events if e["event"] in ("plan", "plan_rejected")]
    assert kinds == ["plan_rejected", "plan"]


@pytest.mark.parametrize("kw", [{"plan_retries": -1}, {"plan_temperature": 0.0}])
def test_context_rejects_bad_plan_knobs(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Context(**kw)


# -- ranking attempts and selection -----------------------------------------------------


def test_rank_orders_accepted_then_worst_fit_then_score_then_earliest():
    def crit(verdict, fit, score):
        return _critique(verdict).model_copy(update={"fit": fit, "score": score})

    cs = [crit("reject", [9.0, 1.0], 1.0), crit("reject", [2.0, 3.0], 0.0), crit("reject", [], 1.0)]
    assert max(range(3), key=lambda i: t2i.rank(cs[i], i)) == 1  # worst object 2 beats 1
    cs.append(crit("accept", [0.0], 0.0))
    assert max(range(4), key=lambda i: t2i.rank(cs[i], i)) == 3  # accepted first
    ties = [crit("reject", [2.0], 0.5), crit("reject", [2.0], 0.5)]
    assert max(range(2), key=lambda i: t2i.rank(ties[i], i)) == 0  # the earliest on a tie


def test_rank_by_surprise_orders_by_the_worst_token():
    def crit(fit, worst):
        return _critique("reject").model_copy(update={"fit": fit, "worst_token": worst})

    cs = [crit([9.0], -6.0), crit([1.0], -1.5), crit([5.0], None)]
    assert max(range(3), key=lambda i: t2i.rank(cs[i], i, "surprise")) == 1
    assert max(range(3), key=lambda i: t2i.rank(cs[i], i, "fit")) == 0


def test_rank_by_surprise_reads_every_attempt_and_skips_the_fit(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3, rank_by="surprise", stray_check="off")
    for worst in (-3.0, -1.0, -2.0):
        engine.enqueue_surprise(worst)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert [c.worst_token for c in out.critiques] == [-3.0, -1.0, -2.0] and out.best == out.attempts[1]
    assert engine.calls["plan_fit"] == 0 and all(c.fit == [] and c.strays == [] for c in out.critiques)


def test_unaccepted_attempts_are_ranked_by_their_worst_fit(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3, rank_by="fit", selection="accept")
    for _ in range(3):
        engine.enqueue_critique(False, ["missing blue square"])
    for fit in ([1.0, 1.0], [5.0, 4.0], [2.0, 9.0]):
        engine.enqueue_fit(fit)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert len(out.attempts) == 3 and not out.accepted
    assert [c.fit for c in out.critiques] == [[1.0, 1.0], [5.0, 4.0], [2.0, 9.0]]
    assert out.best == out.attempts[1]


def test_by_default_the_best_worst_token_is_kept(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3)
    for worst in (-4.0, -1.0, -2.0):
        engine.enqueue_surprise(worst)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert [c.accepted for c in out.critiques] == [True, True, True] and out.best == out.attempts[1]
    assert engine.calls["plan_fit"] == 0 and engine.calls["surprise"] == 3


def test_selection_best_draws_every_round_and_keeps_the_best_fit(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=3, selection="best", rank_by="fit")
    for fit in ([1.0, 1.0], [3.0, 3.0], [2.0, 2.0]):
        engine.enqueue_fit(fit)
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    # every critique accepts, yet all three images are drawn (fresh: nothing was blamed)
    assert [c.accepted for c in out.critiques] == [True, True, True]
    assert [a.mode for a in out.attempts] == ["generate"] * 3
    assert out.best == out.attempts[1] and out.accepted


def test_rank_by_score_skips_the_fit(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=4, max_rounds=2, rank_by="score", selection="accept")
    engine.enqueue_critique(False, ["missing blue square"])
    out = T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPT}, context=ctx))
    assert engine.calls["plan_fit"] == 0 and all(c.fit == [] for c in out.critiques)


@pytest.mark.parametrize("kw", [{"selection": "all"}, {"rank_by": "iou"}, {"stray_check": "rank"}])
def test_context_rejects_bad_ranking_knobs(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Context(**kw)
