"""`Context` names a bad choice setting, and the choices it allows."""

from __future__ import annotations

import re

import pytest

from lavida_agent.graphs.context import Context


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("refine", "refine must be auto|regenerate|regions"),
        ("selection", "selection must be accept|best"),
        ("rank_by", "rank_by must be fit|surprise|score"),
        ("grounding_check", "grounding_check must be rank|gate|off"),
        ("stray_check", "stray_check must be gate|off"),
        ("critique_by", "critique_by must be scene|model"),
        ("answer_by", "answer_by must be scene|direct"),
        ("ground_by", "ground_by must be scene|direct"),
    ],
)
def test_a_bad_choice_is_named(field, message):
    with pytest.raises(ValueError, match=re.escape(f"{message}, got 'guess'")):
        Context(**{field: "guess"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"review_plan": "no"}, "review_plan must be True or False, got 'no'"),
        ({"iou_threshold": 7.0}, "iou_threshold must be in (0, 1], got 7.0"),
        ({"iou_threshold": -1.0}, "iou_threshold must be in (0, 1]"),
        ({"iou_threshold": "half"}, "iou_threshold must be a finite number, got 'half'"),
        ({"plan_temperature": "hot"}, "plan_temperature must be a finite number, got 'hot'"),
        ({"plan_temperature": float("nan")}, "plan_temperature must be a finite number, got nan"),
        ({"engine": "oops"}, "engine must be an Engine (plan_layout, generate, ground, ...), got str"),
        ({"artifacts": 123}, "artifacts must be an ArtifactStore or a folder, got int"),
    ],
)
def test_a_bad_value_is_named_when_the_context_is_made(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Context(**kwargs)


def test_good_values_are_taken():
    ctx = Context(review_plan=True, iou_threshold=1, plan_temperature=0.5, artifacts="runs/artifacts")
    assert ctx.review_plan and ctx.iou_threshold == 1
