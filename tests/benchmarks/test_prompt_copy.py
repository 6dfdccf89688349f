"""The prompt-copy diagnostic on the tiny random pipeline: slots, ranges, determinism."""

from __future__ import annotations

from lavida_agent.benchmarks.prompt_copy import plan_slots, prompt_copy
from lavida_agent.model.tasks import plan_text
from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES
from tests.fakes import tiny_pipeline


def test_plan_slots_point_at_the_colour_and_shape_words():
    tok = tiny_pipeline(corpus=[" ".join([*COLORS, *SHAPES])]).tokenizer
    colour_at, shape_at = plan_slots(tok)
    ids = tok(plan_text([("small green triangle", (4, 4, 20, 20))]), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens([ids[colour_at], ids[shape_at]]) == ["green", "triangle"]


def test_prompt_copy_reports_probabilities_and_chance():
    pipe = tiny_pipeline(corpus=[" ".join([*COLORS, *SHAPES])])
    out = prompt_copy(pipe)
    assert out["n"] == len(COLORS) * len(SHAPES)
    assert 0.0 < out["p_colour"] < 1.0 and 0.0 < out["p_shape"] < 1.0
    assert out["chance_colour"] == round(1 / len(COLORS), 4) and out["chance_shape"] == 0.25
    assert prompt_copy(pipe) == out  # one deterministic forward
