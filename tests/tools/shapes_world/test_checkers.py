"""The ShapesWorld judge on hand-made renders: every T2I category and every edit category,
correct and incorrect, each incorrect case with the reason it must report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lavida_agent.tools.shapes_world import language as lang
from lavida_agent.tools.shapes_world.checkers import (
    answer_correct,
    check_edit,
    check_prompt,
    grounding_correct,
    normalize_answer,
    observe,
    psnr,
)
from lavida_agent.tools.shapes_world.detect import detect
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.sampler import sample_scene
from lavida_agent.tools.shapes_world.scene import Object, Scene


def obj(shape: str, color: str, size: str, x0: int, y0: int, side: int | None = None) -> Object:
    side = side or (12 if size == "small" else 20)
    return Object(shape, color, size, (x0, y0, x0 + side, y0 + side))


def scene(*objects: Object, bg: str = "white") -> Scene:
    return Scene(bg, objects)


RED_CIRCLE = obj("circle", "red", "small", 4, 10)  # centre (10, 16): top left
BLUE_SQUARE = obj("square", "blue", "large", 40, 6)  # centre (50, 16): top right
GREEN_TRIANGLE = obj("triangle", "green", "small", 26, 44)  # centre (32, 50): bottom
SOURCE = scene(RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE)


# --------------------------------------------------------------------------- prompts


PROMPT_CASES = [
    # (prompt, scene, expected reasons); [] means correct.
    ("a triangle", scene(obj("triangle", "green", "small", 20, 20)), []),
    ("a triangle", scene(obj("square", "green", "small", 20, 20)), ["missing triangle", "extra green square"]),
    ("a purple diamond", scene(obj("diamond", "purple", "large", 20, 20), bg="black"), []),
    ("a purple diamond", scene(obj("diamond", "orange", "large", 20, 20)), ["diamond is orange, expected purple"]),
    ("a red circle and a square", scene(RED_CIRCLE, BLUE_SQUARE), []),
    ("a red circle and a square", scene(RED_CIRCLE), ["missing square"]),
    ("a red circle and a square", scene(RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE), ["extra green triangle"]),
    ("three green triangles", scene(*(obj("triangle", "green", "small", x, 20) for x in (4, 24, 44))), []),
    ("three green triangles", scene(*(obj("triangle", "green", "small", x, 20) for x in (4, 24))),
     ["2 green triangles, expected 3"]),
    ("one blue square", scene(obj("square", "blue", "small", 4, 4), obj("square", "blue", "small", 40, 40)),
     ["2 blue squares, expected 1"]),
    ("a red circle left of a blue square", scene(RED_CIRCLE, BLUE_SQUARE), []),
    ("a red circle left of a blue square",
     scene(RED_CIRCLE.moved_to((44, 10, 56, 22)), BLUE_SQUARE.moved_to((4, 6, 24, 26))),
     ["red circle should be left of blue square"]),
    ("a red circle above a blue square", scene(RED_CIRCLE, BLUE_SQUARE),
     ["red circle should be above blue square"]),
    ("a yellow square and an orange circle",
     scene(obj("square", "yellow", "small", 4, 4), obj("circle", "orange", "large", 30, 30)), []),
    ("a yellow square and an orange circle",
     scene(obj("square", "orange", "small", 4, 4), obj("circle", "yellow", "large", 30, 30)),
     ["square is orange, expected yellow", "circle is yellow, expected orange"]),
    ("a large red circle and a small blue square",
     scene(obj("circle", "red", "large", 4, 4), obj("square", "blue", "small", 40, 40)), []),
    ("a large red circle and a small blue square",
     scene(obj("circle", "red", "small", 4, 4), obj("square", "blue", "small", 40, 40)),
     ["circle is small, expected large"]),
    ("a red circle on a white background", scene(RED_CIRCLE), []),
    ("a red circle on a white background", scene(RED_CIRCLE, bg="black"),
     ["background is black, expected white"]),
    ("a red circle", scene(RED_CIRCLE, bg="gray"), []),  # no suffix: any background
]  # fmt: skip


@pytest.mark.parametrize("prompt, sc, expected", PROMPT_CASES)
def test_check_prompt_on_renders(prompt, sc, expected):
    result = check_prompt(prompt, render(sc))
    assert result.reasons == expected
    assert result.correct == (not expected)


def test_every_prompt_category_has_correct_and_incorrect_cases():
    cats = {(lang.parse_prompt(p).category, not exp) for p, _, exp in PROMPT_CASES}
    assert cats == {(c, ok) for c in lang.PROMPT_CATEGORIES for ok in (True, False)}


def test_unknown_blob_is_an_extra_object():
    image = render(scene(RED_CIRCLE))
    image[40:48, 40:48] = (0, 255, 255)  # cyan: not a palette colour
    assert detect(image).unknown
    result = check_prompt("a red circle", image)
    assert result.reasons == ["extra unknown object"] and not result.correct


def test_check_prompt_accepts_detections_scenes_and_upscaled_images():
    sc = scene(RED_CIRCLE, BLUE_SQUARE)
    big = np.repeat(np.repeat(render(sc), 4, axis=0), 4, axis=1)  # 256 px, nearest upscale
    for x in (big, sc, detect(render(sc)), lang.parse_prompt("a red circle and a blue square")):
        if isinstance(x, lang.PromptSpec):
            assert check_prompt(x, render(sc)).correct
        else:
            assert check_prompt("a red circle and a blue square", x).correct


def test_sampled_prompts_and_critiques_agree_with_the_checker():
    rng = np.random.default_rng(7)
    for _ in range(60):
        text, spec = lang.sample_prompt(rng)
        assert check_prompt(text, render(lang.scene_for_prompt(rng, spec))).correct
        text, sc, verdict = lang.sample_critique(rng)
        assert lang.verdict_text(check_prompt(text, render(sc)).reasons) == verdict


# --------------------------------------------------------------------------- edits


def with_(*changes: tuple[int, Object | None], extra: tuple[Object, ...] = (), bg: str = "white") -> Scene:
    """SOURCE with objects replaced (None removes) and extra objects added."""
    objs = list(SOURCE.objects)
    for i, o in changes:
        objs[i] = o
    return Scene(bg, tuple(o for o in objs if o is not None) + extra)


YELLOW_TOP = obj("diamond", "yellow", "small", 24, 4)  # centre (30, 10): top
YELLOW_LOW_RIGHT = obj("diamond", "yellow", "small", 44, 34)  # centre (50, 40): right, below the square

EDIT_CASES = [
    ("make the red circle purple", with_((0, obj("circle", "purple", "small", 4, 10))), []),
    ("make the red circle purple", SOURCE, ["circle is red, expected purple"]),
    ("change the blue square to orange", with_((1, obj("square", "orange", "large", 40, 6))), []),
    ("change the blue square to orange", with_((1, obj("square", "green", "large", 40, 6))),
     ["square is green, expected orange"]),
    ("remove the green triangle", with_((2, None)), []),
    ("remove the green triangle", SOURCE, ["green triangle not removed"]),
    ("remove the green triangle", with_((2, None), extra=(obj("circle", "orange", "small", 24, 30),)),
     ["extra orange circle"]),
    ("add a yellow diamond at the top", with_(extra=(YELLOW_TOP,)), []),
    ("add a yellow diamond at the top", with_(extra=(YELLOW_LOW_RIGHT,)),
     ["yellow diamond should be at the top"]),
    ("add a yellow diamond at the top", SOURCE, ["missing yellow diamond"]),
    ("add a yellow diamond below the blue square", with_(extra=(YELLOW_LOW_RIGHT,)), []),
    ("add a yellow diamond below the blue square", with_(extra=(YELLOW_TOP,)),
     ["yellow diamond should be below blue square"]),
    ("move the red circle to the bottom left", with_((0, obj("circle", "red", "small", 4, 44))), []),
    ("move the red circle to the bottom left", with_((0, obj("circle", "red", "small", 4, 26))),
     ["red circle should be at the bottom left"]),
    ("make the red circle larger", with_((0, obj("circle", "red", "large", 2, 7, side=18))), []),
    ("make the red circle larger", with_((0, obj("circle", "red", "small", 3, 9, side=14))),
     ["red circle should be larger"]),
    ("make the blue square smaller", with_((1, obj("square", "blue", "small", 44, 10))), []),
    ("make the blue square smaller", with_((1, obj("square", "blue", "small", 30, 10))), ["blue square moved"]),
    ("turn the red circle into a square", with_((0, obj("square", "red", "small", 4, 10))), []),
    ("turn the red circle into a square", SOURCE, ["red circle should be a square"]),
    ("turn the red circle into a square", with_((0, obj("diamond", "red", "small", 4, 10))),
     ["missing red square", "extra red diamond"]),
    ("change the background to gray", with_(bg="gray"), []),
    ("change the background to gray", SOURCE, ["background is white, expected gray"]),
    ("change the background to gray", with_((1, obj("square", "blue", "large", 36, 6)), bg="gray"),
     ["blue square moved"]),
    # Untouched objects and the background must stay as they were.
    ("make the red circle purple",
     with_((0, obj("circle", "purple", "small", 4, 10)), (1, obj("square", "green", "large", 40, 6))),
     ["square is green, expected blue"]),
    ("make the red circle purple",
     with_((0, obj("circle", "purple", "small", 4, 10)), (2, obj("triangle", "green", "large", 22, 40))),
     ["triangle is large, expected small"]),
    ("remove the green triangle", with_((2, None), (1, None)), ["missing blue square"]),
    ("remove the green triangle", with_((2, None), bg="black"), ["background is black, expected white"]),
    # The instruction names nothing (or several things) in the source.
    ("remove the yellow circle", SOURCE, ["no yellow circle in the source"]),
]  # fmt: skip


@pytest.mark.parametrize("instruction, result, expected", EDIT_CASES)
def test_check_edit_on_renders(instruction, result, expected):
    checked = check_edit(render(SOURCE), instruction, render(result))
    assert checked.reasons == expected
    assert checked.correct == (not expected)


def test_every_edit_category_has_correct_and_incorrect_cases():
    cats = {(lang.parse_edit(i).category, not exp) for i, _, exp in EDIT_CASES}
    assert cats == {(c, ok) for c in lang.EDIT_CATEGORIES for ok in (True, False)}


def test_ambiguous_edit_target():
    twins = scene(RED_CIRCLE, obj("circle", "red", "small", 40, 40))
    checked = check_edit(twins, "remove the red circle", scene(RED_CIRCLE))
    assert checked.reasons == ["several red circles in the source"]


def test_psnr_outside_touched_boxes():
    src = render(SOURCE)
    ok = check_edit(src, "make the red circle purple", render(with_((0, obj("circle", "purple", "small", 4, 10)))))
    assert ok.correct and ok.psnr_outside == math.inf
    noisy = render(with_((0, obj("circle", "purple", "small", 4, 10))))
    noisy[60:62, 30:32] = 0  # a few background pixels far from the edit
    hurt = check_edit(src, "make the red circle purple", noisy)
    assert math.isfinite(hurt.psnr_outside) and hurt.psnr_outside > 20
    bg = check_edit(src, "change the background to black", render(with_(bg="black")))
    assert bg.correct and bg.psnr_outside == math.inf  # measured on the objects' own pixels
    assert psnr(src, src) == math.inf
    assert abs(psnr(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8))) < 1e-9


def test_sampled_edits_pass_the_checker():
    rng = np.random.default_rng(8)
    seen = set()
    for _ in range(150):
        src = sample_scene(rng)
        text, spec, target = lang.sample_edit(rng, src)
        checked = check_edit(render(src), text, render(target))
        assert checked.correct, (text, checked.reasons, src, target)
        if spec.category != "background":
            assert checked.psnr_outside == math.inf
        seen.add(spec.category)
    assert seen == set(lang.EDIT_CATEGORIES)


def test_observe_pairs_and_errors():
    det = detect(render(SOURCE))
    obs = observe((det, render(SOURCE)))
    assert obs.image is not None and obs.objects == det.objects
    with pytest.raises(ValueError):
        observe(b"not an image")


# --------------------------------------------------------------------------- grounding, answers


def test_grounding_correct():
    assert grounding_correct((0, 0, 10, 10), (0, 0, 10, 10))
    assert grounding_correct((0, 0, 10, 10), (0, 0, 10, 20))  # IoU 0.5 exactly
    assert not grounding_correct((0, 0, 10, 10), (0, 0, 10, 21))
    assert not grounding_correct(None, (0, 0, 10, 10))
    assert not grounding_correct((5, 5), (0, 0, 10, 10))


def test_answers():
    assert normalize_answer("  An Orange Circle. ") == "a orange circle"
    assert answer_correct("Three.", "three")
    assert answer_correct("an orange circle", "a orange circle")
    assert answer_correct("Yes!", "yes")
    assert not answer_correct("3", "three")
    assert not answer_correct("grey", "gray")
    assert not answer_correct("circles", "circle")
