"""The `perceive` node, shared by the `understand` and `ground` workflows: what the model
sees in an image, as a scene the world's own rules can read.

`perceive` asks the model to describe the image (`describe the image.`), parses the caption
(`tools/shapes_world/language.parse_caption`) and grounds `the {size} {color} {shape}` of
every captioned object in one batched call. The result, a `Perception`, goes into the run's
state (and so its trace); `perceived_scene` turns a complete one into a `Scene`. A workflow
adds the node with its own state and candidate count:
`builder.add_node("perceive", partial(perceive, candidates=1), input_schema=MyState)`.
"""

from __future__ import annotations

from typing import Any, Protocol

from langgraph.runtime import Runtime

from lavida_agent.graphs.context import Context
from lavida_agent.graphs.events import emit, node_events
from lavida_agent.graphs.state import Box, LayoutItem, Perception
from lavida_agent.tools.artifacts import ImageRef
from lavida_agent.tools.shapes_world import language as lang
from lavida_agent.tools.shapes_world.scene import Object, Scene

__all__ = ("perceive", "perceived_scene")


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
        engine = ctx.get_engine()
        pixels = ctx.get_store().open(state.image)
        text = str(engine.answer(pixels, lang.DESCRIBE))
        cap = lang.parse_caption(text)
        labels = [n.text for n in cap.objects]
        boxes = (engine.ground(pixels, [f"the {label}" for label in labels],
                               candidates=candidates) if labels else [])  # fmt: skip
        objects = [LayoutItem(label=label, box=Box.model_validate(box))
                   for label, box in zip(labels, boxes, strict=True)]  # fmt: skip
        complete = cap.complete and all(o.box.area > 0 for o in objects)  # all found
        perception = Perception(caption=text, objects=objects, background=cap.background,
                                complete=complete)  # fmt: skip
        emit("perception", perception=perception.model_dump(mode="json"))
    return {"perception": perception}


def perceived_scene(perception: Perception) -> Scene | None:
    """The perceived scene as a `Scene` (boxes rounded to pixels), or None when incomplete."""
    if not perception.complete or perception.background is None:
        return None
    objects = []
    for item in perception.objects:
        size, color, shape = item.label.split()
        b = item.box
        box = (round(b.x0), round(b.y0), round(b.x1), round(b.y1))
        objects.append(Object(shape, color, size, box))
    return Scene(perception.background, tuple(objects))
