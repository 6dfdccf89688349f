"""The `perceive` node, shared by the `understand` and `ground` workflows: what the model
sees in an image, as a scene the world's own rules can read.

`perceive` asks the model to describe the image (`describe the image.`), parses the caption
(`tools/shapes_world/language.parse_caption`) and grounds `the {size} {color} {shape}` of
every captioned object in one batched call. The result, a `Perception`, goes into the run's
state (and so its trace); `perceived_scene` turns a complete one into a `Scene`. A workflow
adds the node with its own state and candidate count:
`builder.add_node("perceive", partial(perceive, candidates=1), input_schema=MyState)`.

`read_scene` is the same reading for a node that perceives an image of its own (the t2i
critique reads each attempt), and `scene_problems` judges a text-to-image prompt against a
perception with the world's own prompt rules (`language.prompt_reasons`), as the `critique`
workflow and the t2i critique do. `presence` says whether an image holds what referring
expressions name, from the captioned objects and the model's reading of each box (the
`ground` workflow's `present`, and the edit workflow's check of what an edit names).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from langgraph.runtime import Runtime

from lavida_agent.graphs.context import Context
from lavida_agent.graphs.engine import Engine
from lavida_agent.graphs.events import emit, node_events
from lavida_agent.graphs.state import Box, LayoutItem, Perception
from lavida_agent.tools.artifacts import ImageRef
from lavida_agent.tools.boxes import round_half_up
from lavida_agent.tools.shapes_world import language as lang
from lavida_agent.tools.shapes_world.scene import SIZES, Object, Scene

logger = logging.getLogger(__name__)

__all__ = (
    "ABSENT_MARGIN",
    "PERCEIVE_CANDIDATES",
    "grammar_problem",
    "warn_outside_grammar",
    "nearest_size_class",
    "noun_fits",
    "perceive",
    "perceived_scene",
    "presence",
    "prompt_in_grammar",
    "read_scene",
    "scene_problems",
)

ABSENT_MARGIN = 0.0
"""A referent the caption does not hold is still present when its noun explains its box
better than every look-alike one word away by more than this (`Engine.noun_fit` with
`contrast`; the boundary `verify_edit` rejects a produced object at). Not tuned."""

PERCEIVE_CANDIDATES = 1
"""The grounding of a perception that answers questions or judges prompts reads each
captioned object greedily (one candidate box, the image as given): the answers came out the
same as with four candidates and their fit, at a quarter of the time (benchmark seed 0,
n = 32: 0.853 against 0.857 in 24 s against 93 s; README, "Stop 20"). The `ground`
workflow, whose boxes are its answer, reads more."""


class _HasImage(Protocol):
    image: ImageRef


def perceive(
    state: _HasImage, runtime: Runtime[Context], *, candidates: int | None = None
) -> dict[str, Any]:
    """Caption the image, then ground `the {size} {color} {shape}` of each captioned object.

    `candidates` is the grounding's `Engine.ground(candidates=...)`: a workflow binds it
    (`functools.partial`) to what its answers need (see `understand` and `ground`).

    Returns:
        `perception`: the caption, each object with its grounded box, the background, and
        whether the caption parsed whole and every object was found.
    """
    ctx = runtime.context if runtime.context is not None else Context()
    with node_events("perceive"):
        pixels = ctx.get_store().open(state.image)
        perception = read_scene(ctx.get_engine(), pixels, candidates=candidates)
        emit("perception", perception=perception.model_dump(mode="json"))
    return {"perception": perception}


def read_scene(engine: Engine, pixels: np.ndarray, *, candidates: int | None = None) -> Perception:
    """The model's caption of `pixels`, and `the {label}` of each captioned object grounded
    (one `answer` call, one batched `ground` call; `candidates` as in `perceive`)."""
    text = str(engine.answer(pixels, lang.DESCRIBE))
    cap = lang.parse_caption(text)
    labels = [n.text for n in cap.objects]
    boxes = (engine.ground(pixels, [f"the {label}" for label in labels],
                           candidates=candidates) if labels else [])  # fmt: skip
    objects = [LayoutItem(label=label, box=Box.model_validate(box))
               for label, box in zip(labels, boxes, strict=True)]  # fmt: skip
    complete = cap.complete and all(o.box.area > 0 for o in objects)  # all found
    return Perception(caption=text, objects=objects, background=cap.background, complete=complete)


def prompt_in_grammar(prompt: str) -> bool:
    """Whether a text-to-image prompt can be judged against a perceived scene at all (it
    parses in the ShapesWorld grammar); perceiving for any other prompt is wasted work."""
    return grammar_problem(prompt) is None


def grammar_problem(text: str, parse: Callable[[str], Any] = lang.parse_prompt) -> str | None:
    """Why `text` is outside the ShapesWorld grammar `parse` reads (default: text-to-image
    prompts; the parser's words: `unknown word 'cat' ...`), or None when it parses."""
    try:
        parse(text)
    except ValueError as exc:  # GrammarError, and the question parser's own
        return str(exc)
    return None


def warn_outside_grammar(workflow: str, what: str, text: str, parse: Callable[[str], Any],
                         consequence: str) -> None:  # fmt: skip
    """Log that `text` is outside the grammar, and what that leaves unchecked (the README's
    promise for text outside the grammar: the run still runs, and says so)."""
    if (why := grammar_problem(text, parse)) is not None:
        logger.warning("%s: the %s %r is outside the ShapesWorld grammar (%s); %s", workflow, what,
                       _short(text, 100), _short(why, 200), consequence)  # fmt: skip


def _short(text: str, n: int) -> str:
    """`text`, cut to `n` characters with its length said (a log line stays a line)."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def scene_problems(prompt: str, perception: Perception) -> list[str] | None:
    """What is wrong with the perceived scene for a text-to-image `prompt`, in the critique
    vocabulary (`missing blue square`, `circle is green, expected red`); empty when the
    scene satisfies the prompt. None when it cannot be judged this way: the prompt is
    outside the ShapesWorld grammar, or the perception is incomplete."""
    scene = perceived_scene(perception)
    if scene is None:
        return None
    try:
        spec = lang.parse_prompt(prompt)
    except lang.GrammarError:
        return None
    return lang.prompt_reasons(spec, scene)


def perceived_scene(perception: Perception) -> Scene | None:
    """The perceived scene as a `Scene` (boxes rounded to pixels), or None when incomplete."""
    if not perception.complete or perception.background is None:
        return None
    objects = []
    for item in perception.objects:
        size, color, shape = item.label.split()
        box = tuple(round_half_up(v) for v in item.box.as_list())
        objects.append(Object(shape, color, size, box))
    return Scene(perception.background, tuple(objects))


def noun_fits(obj: lang.Noun, named: lang.Noun) -> bool:
    """Whether a captioned object fits every word of the named noun."""
    return obj.shape == named.shape and named.color in (None, obj.color) and named.size in (None, obj.size)


def presence(
    engine: Engine, pixels: np.ndarray, expressions: Sequence[str], boxes: Sequence[Box],
    seen: Sequence[lang.Noun] | None,
) -> list[bool | None]:  # fmt: skip
    """Whether the image holds what each referring expression names.

    Present when an object of `seen` (the captioned objects) fits the expression's noun (and
    its anchor's, for a relation); else when the model reads the expression's box as its noun
    rather than as the best look-alike one word away (`noun_fit(contrast=True)` above
    `ABSENT_MARGIN`) and the box is of the size class the expression names, if any (the
    look-alikes differ in colour or shape, so the fit cannot see a size). None for an
    expression outside the grammar, or for all when `seen` is None (a caption that missed a
    part cannot say what is absent). At most one `noun_fit` call.
    """
    present: list[bool | None] = [None] * len(expressions)
    if seen is None:
        return present
    unseen: list[tuple[int, str | None]] = []  # (expression, the size it names)
    for i, text in enumerate(expressions):
        try:
            spec = lang.parse_refexp(text)
        except lang.GrammarError:
            continue
        nouns = [spec.noun] + ([spec.anchor] if spec.anchor is not None else [])
        present[i] = all(any(noun_fits(o, n) for o in seen) for n in nouns)
        if not present[i] and boxes[i].area > 0:
            unseen.append((i, spec.size))
    if unseen:
        items = [{"label": expressions[i], "box": boxes[i].as_list()} for i, _ in unseen]
        fits = engine.noun_fit(pixels, items, contrast=True)
        for (i, size), fit in zip(unseen, fits, strict=True):
            side = max(boxes[i].x1 - boxes[i].x0, boxes[i].y1 - boxes[i].y0)
            present[i] = float(fit) > ABSENT_MARGIN and size in (None, nearest_size_class(side))
    return present


def nearest_size_class(side: float) -> str:
    """The world's size class whose range of sides is nearest `side` (world pixels): a
    grounded box a pixel or two off can fall between the classes, where no object is."""
    return min(SIZES, key=lambda k: max(SIZES[k][0] - side, side - SIZES[k][1], 0.0))
