"""The `ground` workflow: the model's boxes, checked against the scene it perceives."""

from __future__ import annotations

import dataclasses

import numpy as np

from lavida_agent.graphs import ground, perceive
from lavida_agent.graphs.state import GroundOutput
from lavida_agent.tools.shapes_world import language as lang

CAPTION = ("a small red circle, a large blue square and a small green circle "
           "on a white background")  # fmt: skip
SEEN = [[4.0, 20.0, 16.0, 32.0], [24.0, 15.0, 46.0, 37.0], [50.0, 40.0, 62.0, 52.0]]
NOWHERE = [0.0, 0.0, 0.0, 0.0]


def _ground(ctx, store, engine, expressions, direct, *, caption=CAPTION, seen=SEEN, fits=None):
    """Run the workflow with the engine scripted: caption, the perceived objects' boxes,
    the model's own boxes, then (if given) the noun fits."""
    if caption is not None:
        engine.enqueue_answer(caption)
    if seen is not None:
        engine.enqueue_ground(seen)
    engine.enqueue_ground(direct)
    if fits is not None:
        engine.enqueue_fit(fits)
    ref = store.put(np.zeros((64, 64, 3), np.uint8))
    raw = ground.graph.invoke({"image": ref, "expressions": list(expressions)}, context=ctx)
    return GroundOutput.model_validate(raw)


def _boxes(out: GroundOutput) -> list[list[float]]:
    return [b.box.as_list() for b in out.boxes]


def test_a_side_is_read_off_the_perceived_scene(ctx, store, engine):
    """The model boxed the wrong circle; the perceived scene knows which one is leftmost."""
    out = _ground(ctx, store, engine, ["the circle on the left", "the circle on the right"],
                  [SEEN[2], SEEN[2]])  # fmt: skip
    assert _boxes(out) == [SEEN[0], SEEN[2]]
    assert out.found_by == ["scene", "scene"]
    assert [m for m, _ in engine.log] == ["answer", "ground", "ground"]  # no fit asked
    assert engine.log[0][1] == {"question": lang.DESCRIBE}
    assert engine.log[1][1] == {"expressions": ["the small red circle", "the large blue square",
                                                "the small green circle"]}  # fmt: skip
    # both groundings: the engine's default read (the real one: twelve views)
    assert not {"candidates", "views"} & (engine.log[1][1].keys() | engine.log[2][1].keys())
    assert out.perception is not None and out.perception.complete
    assert [b.label for b in out.boxes] == ["the circle on the left", "the circle on the right"]


def test_a_relation_is_read_off_the_perceived_scene(ctx, store, engine):
    out = _ground(ctx, store, engine, ["the green circle right of the blue square"], [SEEN[1]])
    assert (_boxes(out), out.found_by) == ([SEEN[2]], ["scene"])


def test_a_box_the_head_noun_fits_clearly_better_replaces_the_models(ctx, store, engine):
    """`the red circle` boxed on the square: the fit of the red circle's noun decides, one
    `noun_fit` call with the model's box first, then every other perceived box."""
    out = _ground(ctx, store, engine, ["the red circle"], [SEEN[1]],
                  fits=[0.0, ground.FIT_MARGIN + 5.0, 3.0])  # fmt: skip
    assert (_boxes(out), out.found_by) == ([SEEN[0]], ["fit"])
    method, info = engine.log[-1]
    assert method == "noun_fit"
    assert info == {"labels": ["the red circle"] * 3, "contrast": False}  # absolute fits compare boxes


def test_a_small_difference_in_fit_keeps_the_models_box(ctx, store, engine):
    out = _ground(ctx, store, engine, ["the red circle"], [SEEN[1]],
                  fits=[0.0, ground.FIT_MARGIN - 1.0, 3.0])  # fmt: skip
    assert (_boxes(out), out.found_by) == ([SEEN[1]], ["direct"])


def test_one_fit_call_serves_every_expression(ctx, store, engine):
    """Two expressions, each scored on its own candidates (the model's box and the other two
    perceived ones); the side expression needs no fit."""
    out = _ground(ctx, store, engine, ["the red circle", "the circle on the left", "the square"],
                  [SEEN[0], SEEN[2], SEEN[2]],
                  fits=[0.0, 50.0, 1.0, 0.0, 1.0, 50.0])  # fmt: skip
    assert _boxes(out) == [SEEN[1], SEEN[0], SEEN[1]]
    assert out.found_by == ["fit", "scene", "fit"]
    assert [m for m, _ in engine.log].count("noun_fit") == 1
    assert engine.log[-1][1] == {"labels": ["the red circle"] * 3 + ["the square"] * 3, "contrast": False}


def test_a_box_not_found_is_replaced_only_by_a_resolved_object(ctx, store, engine):
    out = _ground(ctx, store, engine, ["the blue square", "the purple diamond"], [NOWHERE, NOWHERE])
    assert _boxes(out) == [SEEN[1], NOWHERE]
    assert out.found_by == ["scene", "direct"]
    assert "noun_fit" not in engine.calls  # nothing to compare a missing box with


def test_an_incomplete_perception_resolves_nothing_but_its_boxes_still_compete(ctx, store, engine):
    """A caption part that does not parse: no scene to read a side off, so the model's box
    stays; a colour-and-shape expression is still checked against the boxes that were found."""
    caption = "a small red circle, a purple blob and a small green circle on a white background"
    out = _ground(ctx, store, engine, ["the circle on the left", "the green circle"],
                  [SEEN[2], SEEN[0]], caption=caption, seen=[SEEN[0], SEEN[2]],
                  fits=[0.0, 40.0])  # fmt: skip
    assert out.perception is not None and not out.perception.complete
    assert _boxes(out) == [SEEN[2], SEEN[2]]
    assert out.found_by == ["direct", "fit"]
    assert out.present == [None, None]  # a caption that missed a part cannot say what is absent


def test_ground_by_direct_skips_the_perception(ctx, store, engine):
    direct_ctx = dataclasses.replace(ctx, ground_by="direct")
    out = _ground(direct_ctx, store, engine, ["the circle on the left"], [SEEN[2]],
                  caption=None, seen=None)  # fmt: skip
    assert (_boxes(out), out.found_by, out.perception, out.present) == ([SEEN[2]], ["direct"], None, [None])
    assert [m for m, _ in engine.log] == ["ground"]


def test_expressions_outside_the_grammar_skip_the_perception(ctx, store, engine):
    out = _ground(ctx, store, engine, ["the thing", "red"], [SEEN[0], SEEN[1]],
                  caption=None, seen=None)  # fmt: skip
    assert (_boxes(out), out.found_by, out.perception) == ([SEEN[0], SEEN[1]], ["direct"] * 2, None)
    assert [m for m, _ in engine.log] == ["ground"]


def test_an_expression_outside_the_grammar_keeps_the_models_box(ctx, store, engine):
    out = _ground(ctx, store, engine, ["the thing", "the circle on the left"], [SEEN[1], SEEN[2]])
    assert _boxes(out) == [SEEN[1], SEEN[0]]
    assert out.found_by == ["direct", "scene"]



def test_present_says_whether_the_image_holds_each_referent(ctx, store, engine):
    """A perceived referent is present with no model call; one the caption missed is present
    when the model reads its box as its noun rather than a look-alike (noun contrast above
    ABSENT_MARGIN), one contrast call for all of them; outside the grammar: not checked."""
    engine.enqueue_fit([0.0, -1.0, -1.0, 0.0, -1.0, -1.0])  # choose_boxes: the model's boxes stay
    engine.enqueue_fit([perceive.ABSENT_MARGIN - 3.0, perceive.ABSENT_MARGIN + 4.0])
    out = _ground(ctx, store, engine,
                  ["the circle on the left", "the yellow triangle", "the purple diamond", "the thing"],
                  [SEEN[2], SEEN[2], SEEN[0], SEEN[1]])  # fmt: skip
    assert out.present == [True, False, True, None]
    assert _boxes(out) == [SEEN[0], SEEN[2], SEEN[0], SEEN[1]]  # an absent one keeps its box
    assert [m for m, _ in engine.log].count("noun_fit") == 2
    assert engine.log[-1] == ("noun_fit", {"labels": ["the yellow triangle", "the purple diamond"],
                                           "contrast": True})  # fmt: skip


def test_an_unperceived_size_must_match_its_box(ctx, store, engine):
    """The fit's look-alikes differ in colour or shape, so a named size is read off the box:
    `the large red circle` boxed on the small one (12 px) is absent however well it fits."""
    engine.enqueue_fit([0.0, -1.0, -1.0, 0.0, -1.0, -1.0])  # choose_boxes: the model's boxes stay
    engine.enqueue_fit([9.0, 9.0])
    out = _ground(ctx, store, engine, ["the large red circle", "the small blue square"], [SEEN[0], SEEN[1]],
                  caption="a large green circle, a small red triangle and a large yellow diamond on a white background")  # fmt: skip
    assert out.present == [False, False]  # SEEN[0] is 12 px (small), SEEN[1] 22 px (large)
    engine.log.clear()
    engine.enqueue_fit([0.0, -1.0, -1.0, 0.0, -1.0, -1.0])
    engine.enqueue_fit([9.0, 9.0])
    out = _ground(ctx, store, engine, ["the small red circle", "the large blue square"], [SEEN[0], SEEN[1]],
                  caption="a large green circle, a small red triangle and a large yellow diamond on a white background")  # fmt: skip
    assert out.present == [True, True]


def test_a_relation_is_present_only_with_its_anchor(ctx, store, engine):
    engine.enqueue_fit([0.0, -1.0, -1.0])
    engine.enqueue_fit([-2.0])
    out = _ground(ctx, store, engine, ["the green circle right of the purple square"], [SEEN[2]])
    assert out.present == [False]
    engine.log.clear()
    out = _ground(ctx, store, engine, ["the green circle right of the blue square"], [SEEN[2]])
    assert out.present == [True] and "noun_fit" not in [m for m, _ in engine.log]


def test_the_choice_is_streamed_with_the_boxes(ctx, store, engine):
    engine.enqueue_answer(CAPTION)
    engine.enqueue_ground(SEEN)
    engine.enqueue_ground([SEEN[2]])
    ref = store.put(np.zeros((64, 64, 3), np.uint8))
    events = [c for mode, c in ground.graph.stream(
        {"image": ref, "expressions": ["the circle on the left"]}, context=ctx,
        stream_mode=["custom"]) if mode == "custom"]  # fmt: skip
    assert [e["event"] for e in events if e["event"] in ("perception", "boxes")] == [
        "perception", "boxes"
    ]
    (boxes,) = [e for e in events if e["event"] == "boxes"]
    assert boxes["found_by"] == ["scene"] and boxes["boxes"][0]["box"]["x0"] == SEEN[0][0]
    assert boxes["present"] == [True]


def test_an_expression_outside_the_grammar_is_grounded_and_said_unchecked(ctx, store, engine, caplog):
    with caplog.at_level("WARNING", logger="lavida_agent.graphs"):
        out = _ground(ctx, store, engine, ["the red circle", "the cat"], [[4.0, 20.0, 16.0, 32.0], [1.0, 1.0, 9.0, 9.0]])
    assert out.present[1] is None and len(out.boxes) == 2
    (warning,) = caplog.messages  # only the expression outside the grammar
    assert "ground: the expression 'the cat' is outside the ShapesWorld grammar" in warning
