"""The `understand` workflow: object questions read off the perceived scene, others direct."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lavida_agent.graphs import understand
from lavida_agent.graphs.state import UnderstandOutput
from lavida_agent.tools.shapes_world import language as lang

CAPTION = "a small red circle and a large blue square on a white background"
RED_LEFT = [[4.0, 20.0, 16.0, 32.0], [30.0, 15.0, 52.0, 37.0]]  # side by side, same centre y


def _ask(ctx, store, engine, question, *, caption=CAPTION, boxes=RED_LEFT, direct=None):
    """Run the workflow with the engine scripted: caption, grounding, then direct answer."""
    for text in (caption, direct):
        if text is not None:
            engine.enqueue_answer(text)
    if boxes is not None:
        engine.enqueue_ground(boxes)
    ref = store.put(np.zeros((64, 64, 3), np.uint8))
    raw = understand.graph.invoke({"image": ref, "question": question}, context=ctx)
    return UnderstandOutput.model_validate(raw)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("is there a red circle?", "yes"),
        ("is there a red square?", "no"),
        ("how many squares are there?", "one"),
        ("what color is the circle?", "red"),
        ("what shape is the blue object?", "square"),
        ("what is left of the blue square?", "a red circle"),
        ("what is right of the blue square?", "nothing"),
    ],
)
def test_object_questions_are_read_off_the_perceived_scene(ctx, store, engine, question, expected):
    out = _ask(ctx, store, engine, question)
    assert out.answer == expected
    assert out.answered_by == "scene"
    # one caption call, one grounding call with each captioned object's full noun
    assert [m for m, _ in engine.log] == ["answer", "ground"]
    assert engine.log[0][1] == {"question": lang.DESCRIBE}
    # the perception reads each fully named object greedily (understand.PERCEIVE_CANDIDATES)
    assert engine.log[1][1] == {"expressions": ["the small red circle", "the large blue square"],
                                "candidates": 1}
    seen = out.perception
    assert seen is not None and seen.complete and seen.caption == CAPTION
    assert [(o.label, o.box.as_list()) for o in seen.objects] == [
        ("small red circle", RED_LEFT[0]), ("large blue square", RED_LEFT[1])
    ]


def test_relations_follow_the_grounded_boxes(ctx, store, engine):
    """The caption lists left to right, but `above` can only come from the boxes."""
    square_above = [[4.0, 40.0, 16.0, 52.0], [30.0, 2.0, 52.0, 24.0]]
    out = _ask(ctx, store, engine, "what is above the red circle?", boxes=square_above)
    assert out.answer == "a blue square"
    out = _ask(ctx, store, engine, "what is above the red circle?", boxes=RED_LEFT)
    assert out.answer == "nothing"


@pytest.mark.parametrize(
    ("caption", "boxes"),
    [
        ("a small red circle and a purple blob on a white background", [RED_LEFT[0]]),  # skipped part
        ("a red circle and a large blue square on a white background", RED_LEFT),  # no size
        ("a small red circle and a large blue square", RED_LEFT),  # no background
        (CAPTION, [RED_LEFT[0], [0.0, 0.0, 0.0, 0.0]]),  # an object not found
    ],
)
def test_an_incomplete_perception_falls_back_to_the_direct_answer(ctx, store, engine, caption, boxes):
    out = _ask(ctx, store, engine, "is there a red circle?", caption=caption, boxes=boxes,
               direct="direct says")
    assert out.answered_by == "direct" and out.answer == "direct says"
    assert out.perception is not None and not out.perception.complete
    assert [m for m, _ in engine.log] == ["answer", "ground", "answer"]
    assert engine.log[-1][1] == {"question": "is there a red circle?"}


@pytest.mark.parametrize(
    "question",
    ["what color is the triangle?", "what shape is the green object?",
     "what is left of the green square?", "what is left of the circle?"],
)
def test_a_missing_presupposed_object_falls_back_to_the_direct_answer(ctx, store, engine, question):
    """No triangle seen (or no single anchor): the perception more likely missed it."""
    caption = "a small red circle, a large blue square and a small red circle on a white background"
    boxes = [*RED_LEFT, [40.0, 44.0, 52.0, 56.0]]
    out = _ask(ctx, store, engine, question, caption=caption, boxes=boxes, direct="direct says")
    assert (out.answer, out.answered_by) == ("direct says", "direct")
    assert out.perception is not None and out.perception.complete


@pytest.mark.parametrize(
    "question",
    ["what color is the background?", "describe the image.", "how many shapes?", "what is this"],
)
def test_other_questions_go_straight_to_the_model(ctx, store, engine, question):
    out = _ask(ctx, store, engine, question, caption=None, boxes=None, direct="direct says")
    assert (out.answer, out.answered_by, out.perception) == ("direct says", "direct", None)
    assert engine.log == [("answer", {"question": question})]


def test_answer_by_direct_skips_perception(ctx, store, engine):
    direct_ctx = dataclasses.replace(ctx, answer_by="direct")
    out = _ask(direct_ctx, store, engine, "is there a red circle?", caption=None, boxes=None,
               direct="direct says")
    assert (out.answer, out.answered_by, out.perception) == ("direct says", "direct", None)
    assert [m for m, _ in engine.log] == ["answer"]



def test_the_perception_is_streamed(ctx, store, engine):
    engine.enqueue_answer(CAPTION)
    engine.enqueue_ground(RED_LEFT)
    ref = store.put(np.zeros((64, 64, 3), np.uint8))
    events = [c for mode, c in understand.graph.stream(
        {"image": ref, "question": "is there a red circle?"}, context=ctx, stream_mode=["custom"]
    ) if mode == "custom"]  # fmt: skip
    seen = [e for e in events if e["event"] == "perception"]
    assert len(seen) == 1 and seen[0]["perception"]["caption"] == CAPTION
    assert [e for e in events if e["event"] == "answer"] == [
        {"event": "answer", "answer": "yes", "answered_by": "scene"}
    ]


def test_parse_caption_reports_what_it_skipped():
    cap = lang.parse_caption("a small red circle and a purple blob on a white background")
    assert cap.skipped == ("a purple blob",) and not cap.complete
    assert lang.parse_caption(CAPTION).complete
    assert lang.parse_caption("nothing on a gray background").complete


def test_a_question_outside_the_grammar_is_answered_and_said_unchecked(ctx, store, engine, caplog):
    with caplog.at_level("WARNING", logger="lavida_agent.graphs"):
        out = _ask(ctx, store, engine, "why is the sky blue?", caption=None, boxes=None, direct="yes")
        _ask(ctx, store, engine, "is there a red circle?")
    assert out.answer == "yes" and out.answered_by == "direct"
    (warning,) = caplog.messages  # the question in the grammar says nothing
    assert "understand: the question 'why is the sky blue?' is outside the ShapesWorld grammar" in warning
