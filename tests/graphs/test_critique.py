"""The `critique` workflow: a ShapesWorld prompt checked against the perceived scene, else
the model's own critique answer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lavida_agent.graphs import critique
from lavida_agent.graphs.state import CritiqueOutput

CAPTION = "a small red circle and a large blue square on a white background"
RED_LEFT = [[4.0, 20.0, 16.0, 32.0], [30.0, 15.0, 52.0, 37.0]]  # side by side, same centre y


def _judge(ctx, store, engine, prompt, *, caption=CAPTION, boxes=RED_LEFT):
    if caption is not None:
        engine.enqueue_answer(caption)
    if boxes is not None:
        engine.enqueue_ground(boxes)
    ref = store.put(np.zeros((64, 64, 3), np.uint8))
    return CritiqueOutput.model_validate(critique.graph.invoke({"image": ref, "prompt": prompt}, context=ctx))


@pytest.mark.parametrize(
    ("prompt", "reasons"),
    [
        ("a red circle and a blue square", []),
        ("a red circle left of a blue square on a white background", []),
        ("a blue square left of a red circle", ["blue square should be left of red circle"]),
        ("a green circle and a blue square", ["circle is red, expected green"]),
        ("two blue squares", ["1 blue square, expected 2", "extra red circle"]),
        ("a red circle on a black background", ["extra blue square", "background is white, expected black"]),
    ],
)
def test_a_shapes_world_prompt_is_checked_against_the_perceived_scene(ctx, store, engine, prompt, reasons):
    out = _judge(ctx, store, engine, prompt)
    assert out.judged_by == "scene" and out.reasons == reasons
    assert out.verdict == ("reject" if reasons else "accept")
    assert out.model_text == CAPTION and out.perception is not None and out.perception.complete
    assert [m for m, _ in engine.log] == ["answer", "ground"]  # no critique answer needed


@pytest.mark.parametrize(
    ("caption", "boxes"),
    [
        ("a red circle and a blue square", None),  # no sizes, no background: not the whole scene
        (CAPTION, [RED_LEFT[0], [0.0, 0.0, 0.0, 0.0]]),  # the blue square not found
    ],
)
def test_an_incomplete_perception_leaves_the_verdict_to_the_model(ctx, store, engine, caption, boxes):
    engine.enqueue_critique(False, ["missing blue square", "missing green diamond"])
    out = _judge(ctx, store, engine, "a red circle and a blue square", caption=caption, boxes=boxes)
    assert out.judged_by == "model" and out.verdict == "reject"
    # a reason the prompt rules out is set apart, not reported
    assert out.reasons == ["missing blue square"] and out.dropped_reasons == ["missing green diamond"]
    assert out.perception is not None and not out.perception.complete


def test_a_prompt_outside_the_grammar_or_critique_by_model_skips_perception(ctx, store, engine):
    engine.enqueue_critique(True)
    out = _judge(ctx, store, engine, "a cat on a mat", caption=None, boxes=None)
    assert (out.verdict, out.judged_by, out.perception) == ("accept", "model", None)
    assert [m for m, _ in engine.log] == ["critique"]
    engine.log.clear()
    engine.enqueue_critique(True)
    model_ctx = dataclasses.replace(ctx, critique_by="model")
    out = _judge(model_ctx, store, engine, "a red circle", caption=None, boxes=None)
    assert (out.judged_by, out.perception) == ("model", None) and [m for m, _ in engine.log] == ["critique"]


def test_the_perception_and_the_verdict_stream_as_events(ctx, store, engine):
    engine.enqueue_answer(CAPTION)
    engine.enqueue_ground(RED_LEFT)
    ref = store.put(np.zeros((64, 64, 3), np.uint8))
    events = [c for _, c in critique.graph.stream({"image": ref, "prompt": "a red circle"}, context=ctx,
                                                  stream_mode=["custom", "updates"]) if "event" in c]  # fmt: skip
    kinds = [e["event"] for e in events]
    assert kinds.index("perception") < kinds.index("verdict")
    verdict = next(e for e in events if e["event"] == "verdict")
    assert verdict["verdict"] == "reject" and verdict["reasons"] == ["extra blue square"]


def test_a_prompt_outside_the_grammar_is_judged_by_the_model_and_said_so(ctx, store, engine, caplog):
    engine.enqueue_critique(True, [])
    with caplog.at_level("WARNING", logger="lavida_agent.graphs"):
        out = _judge(ctx, store, engine, "a cat on a mat", caption=None, boxes=None)
    assert out.judged_by == "model"
    (warning,) = caplog.messages
    assert "critique: the prompt 'a cat on a mat' is outside the ShapesWorld grammar" in warning
