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
