"""The `edit` workflow, sessions (history, undo, branches), and the single-node graphs."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
from langgraph.checkpoint.memory import InMemorySaver

from lavida_agent import prompts
from lavida_agent.graphs import edit, ground, understand
from lavida_agent.graphs._verify import fmt_box
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.graphs.persistence import checkpointer_from_path
from lavida_agent.graphs.session import EditSession, lineage_json
from lavida_agent.graphs.state import Box, EditOutput, EditState, GroundOutput, UnderstandOutput
from tests.fakes import FakeEngine, draw

RED = {"label": "red circle", "box": [4.0, 4.0, 20.0, 20.0]}
BLUE = {"label": "blue square", "box": [40.0, 40.0, 56.0, 56.0]}


def _plan(item, keep=()):
    return EditPlanResult(targets=[item["label"]], target_boxes=[item["box"]], layout=[item],
                          keep=list(keep))  # fmt: skip


def _scene(store):
    return store.put(draw(np.full((64, 64, 3), 10, np.uint8), [RED]))


def test_a_turn_without_a_seed_takes_the_contexts_not_the_last_turns(engine, ctx, store):
    g = edit.build_edit_graph().compile(checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "seeds"}}
    engine.enqueue_edit_plan(_plan(BLUE))
    g.invoke({"instruction": "add a blue square", "image": _scene(store), "seed": 5}, cfg, context=ctx)
    engine.enqueue_edit_plan(_plan(RED))
    out = EditOutput.model_validate(g.invoke({"instruction": "add a red circle"}, cfg, context=ctx))
    assert [s.seed for s in out.steps] == [5, ctx.seed]


def test_route_after_verify():
    base = {"instruction": "x", "max_rounds": 2, "selection": "accept"}
    assert edit.route_after_verify(EditState(**base, accepted=True, round=1)) == "commit_edit"
    assert edit.route_after_verify(EditState(**base, accepted=False, round=1)) == "edit_image"
    assert edit.route_after_verify(EditState(**base, accepted=False, round=2)) == "commit_edit"
    best = {**base, "selection": "best"}  # every round is drawn
    assert edit.route_after_verify(EditState(**best, accepted=True, round=1)) == "edit_image"
    assert edit.route_after_verify(EditState(**best, accepted=True, round=2)) == "commit_edit"


def test_edit_verifies_change_and_untouched_objects(engine, ctx, store):
    src = _scene(store)
    engine.enqueue_edit_plan(_plan(BLUE, keep=[RED]))
    out = EditOutput.model_validate(
        edit.graph.invoke({"instruction": "add a blue square", "image": src}, context=ctx))
    (step,) = out.steps
    assert out.accepted and out.current == step.result and out.heads == [0]
    assert step.parent == src and step.parent_step is None and step.seed == ctx.seed
    roles = {c.role: c.ok for c in step.critique.grounding}
    assert roles == {"target": True, "keep": True}
    # edits: no critique call; the produced object's fit is measured against look-alikes
    assert engine.calls == {"plan_edit": 1, "ground": 2, "edit": 1, "noun_fit": 1}
    assert [info["contrast"] for m, info in engine.log if m == "noun_fit"] == [True]
    assert step.critique.fit == [5.0]  # the fake draws it exactly where planned
    # both groundings (targets, verification) read the image alone
    assert [info.get("views") for m, info in engine.log if m == "ground"] == [1, 1]


def test_edit_that_moves_a_kept_object_is_re_edited_then_bounded(engine, ctx, store):
    src = _scene(store)
    # The plan redraws a region covering the red circle but says to keep it: it gets erased.
    engine.enqueue_edit_plan(EditPlanResult(targets=[], target_boxes=[[0, 0, 30, 30]],
                                            layout=[BLUE], keep=[RED]))  # fmt: skip
    out = EditOutput.model_validate(
        edit.graph.invoke({"instruction": "add blue", "image": src}, context=ctx))
    assert not out.accepted and len(out.steps) == ctx.max_rounds
    assert [s.seed for s in out.steps] == [7, 8, 9]
    keep = [c for c in out.steps[0].critique.grounding if c.role == "keep"]
    assert keep and not keep[0].ok
    assert "should stay untouched" in out.steps[0].critique.reasons[0]
    assert out.heads == [0]  # all tie; the earliest is kept


def test_session_history_undo_and_branch_keep_the_original_history(tmp_path, store):
    engine = FakeEngine()
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2, selection="accept")
    session = EditSession("s1", checkpointer=checkpointer_from_path(tmp_path / "s.db"),
                          context=ctx)  # fmt: skip
    src = _scene(store)
    engine.enqueue_edit_plan(_plan(BLUE, keep=[RED]))
    session.edit("add blue", image=src)
    engine.enqueue_edit_plan(_plan({"label": "green", "box": [40, 4, 56, 20]}))
    second = session.edit("add green", seed=50)
    assert [s.instruction for s in session.history()] == ["add blue", "add green"]
    assert second.steps[1].parent == second.steps[0].result and second.steps[1].seed == 50
    original = [(s.config["configurable"]["checkpoint_id"], s.values.get("heads"))
                for s in session.snapshots()]  # fmt: skip

    # Undo: back to the first edit's result; then a new edit starts a branch from there.
    session.undo()
    assert session.state().current == second.steps[0].result
    engine.enqueue_edit_plan(_plan({"label": "yellow", "box": [4, 40, 20, 56]}))
    third = session.edit("add yellow")
    assert [s.instruction for s in third.steps] == ["add blue", "add yellow"]
    assert third.steps[1].parent_step == 0

    # The original checkpoints are all still there, unchanged.
    now = {s.config["configurable"]["checkpoint_id"]: s.values.get("heads")
           for s in session.snapshots()}  # fmt: skip
    assert all(now[cid] == heads for cid, heads in original)

    # Branching back to step 1 of the original branch restores that image as current.
    old_end = next(s for s in session.snapshots()
                   if s.config["configurable"]["checkpoint_id"] == original[0][0])  # fmt: skip
    session.branch(1, at=old_end.config)
    st = session.state()
    assert st.current == second.steps[1].result and st.steps == second.steps

    # The lineage over every branch is one DAG: src -> blue -> {green, yellow}.
    dag = session.lineage(all_branches=True)
    assert nx.is_directed_acyclic_graph(dag) and dag.number_of_edges() == 3
    assert sorted(d for _, d in dag.out_degree()) == [0, 0, 1, 2]
    assert all(head for *_, head in dag.edges(data="head"))  # each was kept as its turn's result
    doc = lineage_json(third.steps, third.heads)
    assert json.loads(json.dumps(doc))["edges"][0]["instruction"] == "add blue"


def test_steps_that_made_the_same_image_on_two_branches_are_two_edges(engine, store):
    """A seed replayed after an undo draws the image another branch's second round drew:
    the lineage over every branch keeps both steps (they were one edge, and `session show`
    lost the current one)."""
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2)  # selection best
    session = EditSession("twins", checkpointer=checkpointer_from_path(None), context=ctx)
    src = _scene(store)
    engine.enqueue_edit_plan(_plan(BLUE))
    first = session.edit("add blue", image=src, seed=5)  # rounds with seeds 5, 6
    session.undo()
    engine.enqueue_edit_plan(_plan(BLUE))
    again = session.edit("add blue", seed=6)  # rounds with seeds 6, 7
    assert again.steps[0].result == first.steps[1].result  # the same image, step 0 and step 1
    dag = session.lineage(all_branches=True)
    twins = [k for k in dag[src.sha256][again.steps[0].result.sha256]]
    # the fake draws the same image for every seed here: four steps (seeds 5, 6; 6, 7), four edges
    edges = [dag.edges[src.sha256, again.steps[0].result.sha256, k] for k in twins]
    assert sorted((e["index"], e["seed"]) for e in edges) == [(0, 5), (0, 6), (1, 6), (1, 7)]
    assert dag.number_of_edges() == 4


def test_a_turn_that_never_committed_leaves_the_next_turn_clean(engine, ctx, store, monkeypatch):
    session = EditSession("s3", checkpointer=checkpointer_from_path(None), context=ctx)
    engine.enqueue_edit_plan(_plan(BLUE))
    first = session.edit("add blue", image=_scene(store))
    # Turn 2 restarts from another image; its first attempt is rejected (it erases a kept
    # object) and the re-edit fails: the turn never commits.
    other = store.put(np.full((64, 64, 3), 30, np.uint8))
    engine.enqueue_edit_plan(EditPlanResult(targets=[], target_boxes=[[0, 0, 64, 64]],
                                            layout=[BLUE], keep=[RED]))  # fmt: skip
    real_edit, calls = engine.edit, []

    def edit_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the model died")
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(engine, "edit", edit_then_fail)
    with pytest.raises(RuntimeError, match="died"):
        session.edit("erase everything", image=other)
    assert [s.instruction for s in session.state().steps] == ["add blue", "erase everything"]
    monkeypatch.setattr(engine, "edit", real_edit)
    # Turn 3 (no image: edit the current one) is all rejected: it still keeps one of its own.
    engine.enqueue_edit_plan(EditPlanResult(targets=[], target_boxes=[[0, 0, 30, 30]],
                                            layout=[BLUE], keep=[RED]))  # fmt: skip
    third = session.edit("add blue on the left")
    assert not third.accepted
    own = [s for s in third.steps if s.instruction == "add blue on the left"]
    assert own and own[0].parent == first.current  # not the abandoned turn's image
    assert third.current == third.steps[third.heads[-1]].result
    assert third.steps[third.heads[-1]] in own
    assert [s.instruction for s in session.history()] == ["add blue", "add blue on the left"]
    assert len({s.turn for s in third.steps}) == 3  # the abandoned step keeps its own turn


def test_undo_to_the_input_image(engine, ctx, store):
    session = EditSession("s2", checkpointer=checkpointer_from_path(None), context=ctx)
    src = _scene(store)
    engine.enqueue_edit_plan(_plan(BLUE))
    session.edit("add blue", image=src)
    session.undo()
    st = session.state()
    assert st.current == src and st.current_step is None and st.heads == []
    engine.enqueue_edit_plan(_plan(BLUE))
    out = session.edit("add blue again")
    assert out.steps[-1].parent == src and out.heads == [0] and len(out.steps) == 1


def test_redo_walks_back_what_undo_and_branch_left(engine, ctx, store):
    session = EditSession("s4", checkpointer=checkpointer_from_path(None), context=ctx)
    src = _scene(store)
    turns = []
    for label, box in (("blue", [30, 30, 46, 46]), ("green", [40, 4, 56, 20])):
        engine.enqueue_edit_plan(_plan({"label": label, "box": box}))
        turns.append(session.edit(f"add {label}", image=src if not turns else None))
    with pytest.raises(ValueError, match="nothing to redo"):
        session.redo()
    heads = session.state().heads
    session.undo()
    session.undo()  # back to the input image
    assert session.state().current == src
    session.redo()
    assert session.state().current == turns[0].current
    session.redo()
    st = session.state()
    assert (st.current, st.heads, st.undone) == (turns[1].current, heads, [])
    assert [s.instruction for s in session.history()] == ["add blue", "add green"]
    # A branch is undone by redo too; a committed edit ends the redo list.
    session.branch(0)
    assert session.state().current == turns[0].current
    session.redo()
    assert session.state().current == turns[1].current
    session.undo()
    engine.enqueue_edit_plan(_plan({"label": "yellow", "box": [4, 40, 20, 56]}))
    session.edit("add yellow")
    with pytest.raises(ValueError, match="nothing to redo"):
        session.redo()
    assert [s.instruction for s in session.history()] == ["add blue", "add yellow"]


def test_ground_and_understand_graphs(engine, ctx, store):
    img = _scene(store)
    out = GroundOutput.model_validate(
        ground.graph.invoke({"image": img, "expressions": ["red circle", "blue"]}, context=ctx))
    assert [b.box.as_list() for b in out.boxes] == [RED["box"], [0.0, 0.0, 0.0, 0.0]]
    engine.enqueue_answer("one red circle")
    ans = UnderstandOutput.model_validate(
        understand.graph.invoke({"image": img, "question": "what is there?"}, context=ctx))
    assert ans.answer == "one red circle"
    assert engine.calls == {"ground": 1, "answer": 1}


def test_every_round_is_drawn_and_the_best_fitting_edit_committed(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=3, seed=4)  # selection best
    engine.enqueue_edit_plan(_plan(BLUE, keep=[RED]))
    for fit in ([2.0], [7.0], [7.0]):
        engine.enqueue_fit(fit)
    out = EditOutput.model_validate(
        edit.graph.invoke({"instruction": "add a blue square", "image": _scene(store)}, context=ctx))
    assert [s.seed for s in out.steps] == [4, 5, 6] and all(s.critique.accepted for s in out.steps)
    assert out.current == out.steps[1].result and out.heads == [1]  # 7 beats 2; a tie: the earliest
    assert out.accepted


def test_an_edit_whose_object_reads_as_a_look_alike_is_rejected_and_ranked_below(engine, store):
    """Grounding finds the produced object where planned in every attempt; the first one's
    noun contrast is negative (a look-alike explains the box better): it is rejected with a
    reason naming the object, and the second, positive attempt is committed."""
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2)  # selection best
    engine.enqueue_edit_plan(_plan(BLUE, keep=[RED]))
    for fit in ([-1.5], [0.5]):
        engine.enqueue_fit(fit)
    out = EditOutput.model_validate(
        edit.graph.invoke({"instruction": "add a blue square", "image": _scene(store)}, context=ctx))
    first, second = (s.critique for s in out.steps)
    assert all(c.ok for c in first.grounding) and not first.accepted and not first.model_ok
    assert first.reasons == [prompts.render("critique_noun_target", label=BLUE["label"],
                                            expected=fmt_box(Box.model_validate(BLUE["box"])),
                                            margin="1.5")]  # fmt: skip
    assert first.blamed == []  # the grounding checks passed: no object is blamed by them
    assert second.accepted and out.heads == [1] and out.accepted


def test_an_edit_that_produces_nothing_breaks_ties_by_how_the_kept_objects_read(engine, store):
    """A background edit produces no object: its attempts ground alike, so the one whose
    worst kept object reads best as itself is committed, not the earliest."""
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=3)  # selection best
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[0.0, 0.0, 64.0, 64.0]], keep=[RED]))
    for keep_fit in ([-2.0], [3.0], [1.0]):
        engine.enqueue_fit(keep_fit)
    out = EditOutput.model_validate(edit.graph.invoke(
        {"instruction": "change the background to black", "image": _scene(store)}, context=ctx))  # fmt: skip
    assert [info["labels"] for m, info in engine.log if m == "noun_fit"] == [[RED["label"]]] * 3
    assert [s.critique.keep_fit for s in out.steps] == [[-2.0], [3.0], [1.0]]
    assert len({s.critique.score for s in out.steps}) == 1 and all(s.critique.fit == [] for s in out.steps)
    assert out.heads == [1]
    # the sort key itself: grounding score, then the worst kept object's contrast
    assert edit.edit_rank(out.steps[1]) > edit.edit_rank(out.steps[2]) > edit.edit_rank(out.steps[0])


def test_a_background_edit_is_verified_by_the_background_the_model_reads(engine, store):
    """Nothing to ground shows a background left as it was: the model is asked its colour."""
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2, selection="accept")
    engine.enqueue_edit_plan(EditPlanResult(keep=[RED]))  # (the fake then redraws nothing)
    engine.enqueue_answer("Gray.")
    engine.enqueue_answer("black")
    out = EditOutput.model_validate(edit.graph.invoke(
        {"instruction": "change the background to black", "image": _scene(store)}, context=ctx))  # fmt: skip
    assert [q for m, info in engine.log if m == "answer" for q in [info["question"]]] == \
        ["what color is the background?"] * 2  # fmt: skip
    first, second = out.steps
    assert not first.critique.accepted
    assert prompts.render("critique_background", seen="gray", expected="black") in first.critique.reasons
    assert second.critique.accepted and out.heads == [1]


def test_an_accepted_attempt_is_kept_over_a_rejected_one_that_ranks_higher(engine, store):
    """The turn is verified when one of its attempts is: an attempt whose new object reads
    better but which moved an object it had to keep is not kept over an accepted one."""
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2)  # selection best
    engine.enqueue_edit_plan(_plan(BLUE, keep=[RED]))
    engine.enqueue_ground([BLUE["box"]])  # planning grounds the target
    engine.enqueue_ground([BLUE["box"], [0.0, 0.0, 4.0, 4.0]])  # attempt 0: the red circle "moved"
    for fit in ([9.0], [1.0]):  # (attempt 1 is grounded where it is drawn)
        engine.enqueue_fit(fit)
    out = EditOutput.model_validate(
        edit.graph.invoke({"instruction": "add a blue square", "image": _scene(store)}, context=ctx))
    rejected, accepted = out.steps
    assert not rejected.critique.accepted and accepted.critique.accepted
    assert rejected.critique.fit_score > accepted.critique.fit_score
    assert out.heads == [1] and out.accepted


def test_edit_rank_uses_the_score_when_no_fit_was_measured(engine, store):
    ctx = Context(engine=engine, artifacts=store, num_steps=2, max_rounds=2, rank_by="score")
    engine.enqueue_edit_plan(_plan(BLUE, keep=[RED]))
    out = EditOutput.model_validate(
        edit.graph.invoke({"instruction": "add a blue square", "image": _scene(store)}, context=ctx))
    assert engine.calls["noun_fit"] == 0 and all(s.critique.fit == [] for s in out.steps)
    assert out.heads == [0]  # equal scores: the earliest


def test_an_edit_naming_what_the_source_does_not_hold_is_rejected_by_name(engine, ctx, store):
    """`remove the blue circle` on an image with only a red circle: the caption planning read
    holds no blue circle, and the model reads the grounded box as a look-alike, so the plan
    records it absent and every attempt is rejected naming it (a look-alike was edited)."""
    engine.enqueue_edit_plan(EditPlanResult(targets=["the blue circle"], target_boxes=[RED["box"]],
                                            caption="a small red circle on a black background"))  # fmt: skip
    engine.enqueue_ground([RED["box"]])  # grounding puts the blue circle on the red one
    engine.enqueue_fit([-7.0])  # where the model reads a look-alike
    out = EditOutput.model_validate(edit.graph.invoke(
        {"instruction": "remove the blue circle", "image": _scene(store)}, context=ctx))  # fmt: skip
    assert len(out.steps) == ctx.max_rounds and not out.accepted
    reason = "The source image holds no blue circle: the edit could only act on a look-alike."
    for step in out.steps:
        assert step.plan.absent == ["the blue circle"] and reason in step.critique.reasons
        # what the absence was read from is in the plan (and so in the trace)
        assert step.plan.caption == "a small red circle on a black background"
    assert [info for m, info in engine.log if m == "noun_fit"][0] == {"labels": ["the blue circle"], "contrast": True}


def test_an_edit_naming_a_captioned_object_is_checked_without_a_model_call(engine, ctx, store):
    engine.enqueue_edit_plan(EditPlanResult(targets=["the red circle"], target_boxes=[RED["box"]],
                                            layout=[{"label": "the blue circle", "box": RED["box"]}],
                                            caption="a small red circle on a black background"))  # fmt: skip
    out = EditOutput.model_validate(edit.graph.invoke(
        {"instruction": "make the red circle blue", "image": _scene(store)}, context=ctx))  # fmt: skip
    assert out.steps[0].plan.absent == []
    assert engine.calls["noun_fit"] == 1  # the produced object's check alone


def test_a_new_box_is_moved_or_cut_into_the_content_of_a_letterboxed_input():
    content = Box.model_validate([0.0, 20.0, 64.0, 44.0])  # a 128 x 48 input's content: 24 rows
    low, tall, small = [20.0, 4.0, 44.0, 30.0], [10.0, 8.0, 50.0, 58.0], [2.0, 40.0, 12.0, 50.0]
    layout, regions = edit._into_content(
        [edit.LayoutItem(label="red circle", box=Box.model_validate(b)) for b in (low, tall, small)],
        [Box.model_validate(low), Box.model_validate(small)], content)  # fmt: skip
    # longer than the content: cut to it; shorter: moved in whole
    assert [i.box.as_list() for i in layout] == [[20.0, 20.0, 44.0, 44.0], [10.0, 20.0, 50.0, 44.0],
                                                 [2.0, 34.0, 12.0, 44.0]]  # fmt: skip
    assert [r.as_list() for r in regions] == [[20.0, 20.0, 44.0, 44.0], [2.0, 34.0, 12.0, 44.0]]  # moved alike
