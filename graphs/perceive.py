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
workflow and the t2i critique do.
"""

from __future__ import annotations

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
from lavida_agent.tools.shapes_world.scene import Object, Scene

__all__ = (
    "PERCEIVE_CANDIDATES",
    "grammar_problem",
    "perceive",
    "perceived_scene",
    "prompt_in_grammar",
    "read_scene",
    "scene_problems",
)

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


def grammar_problem(prompt: str) -> str | None:
    """Why a text-to-image prompt is outside the ShapesWorld grammar (the parser's words:
    `unknown word 'cat' ...`), or None when it parses."""
    try:
        lang.parse_prompt(prompt)
    except lang.GrammarError as exc:
        return str(exc)
    return None


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
