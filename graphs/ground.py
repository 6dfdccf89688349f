"""The `ground` workflow: find each referring expression in an image, checked against the
scene the model perceives.

```
START -> [perceive] -> ground_objects -> END
```

`ground_objects` asks the model for one box per expression (one `ground` call). When the
run perceived the image first (`perceive`, shared with `understand`: the model's caption,
each captioned object grounded), each expression in the ShapesWorld grammar then gets the
box the perception supports best:

- `the {shape} on the {side}` and `the ... {relation} the ...`: the object the expression
  picks out of the perceived scene by the world's own rules (`language.resolve_refexp`),
  when the perception is complete and picks exactly one; else the model's box (a side) or
  the fit below (a relation). A head noun cannot tell which circle is leftmost; the scene
  can.
- every other form (and a relation the scene does not resolve): the perceived object's box
  that the expression's head noun explains best (`Engine.noun_fit`, the drawing side of the
  model), when it fits more than `FIT_MARGIN` better than the model's own box; else the
  model's box.
- a box the model did not find (degenerate) is replaced only by an object the perceived
  scene resolves the expression to.

Each box's `found_by` records which of the three chose it ('direct', 'scene', 'fit'), and
the perception stays in the state and the trace.

A box is returned for every expression, even one naming nothing in the image (the model
then boxes the nearest look-alike). `present` says which (`perceive.presence`): an
expression is present when the perceived scene holds an object its noun (and its anchor's,
for a relation) describes, or, when the caption missed it, when the model reads its box as
that noun rather than as the best look-alike one word away, at the size it names. Either
signal alone errs: on the shipped weights' tuning scenes the caption missed 29 of 323
present referents, 28 of them read as themselves at their boxes, while 38 of the 471 absent
ones it rightly missed were read as themselves at a look-alike's box (weights README, "Stop
44"). `Context.ground_by="direct"` skips the perception: one `ground` call, the model's
boxes as they are.

Why: the shipped model binds a colour or shape to the wrong object more often than it
captions and grounds each captioned object. Since the engine reads every image in twelve
views the checks add little (benchmark seeds 0-3, `--suites ground,agent_ground`: 0.934 /
0.925 single / multi against the model's own boxes' 0.925 / 0.928; weights README, "Stop
22"), at more than twice the time; they stay for the perception in the trace. With the
embedded weights an unsized noun is also read in its sized forms (`ground_sizes`): the
workflow 0.955 / 0.942, the model's own boxes 0.952 / 0.942 (weights README, "Stop 35").
"""

from __future__ import annotations

import functools
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from lavida_agent.graphs.context import Context
from lavida_agent.graphs.engine import Engine
from lavida_agent.graphs.events import emit, node_events
from lavida_agent.graphs.perceive import perceive, perceived_scene, presence, warn_outside_grammar
from lavida_agent.graphs.state import (
    Box,
    FoundBy,
    GroundInput,
    GroundOutput,
    GroundState,
    LayoutItem,
    Perception,
)
from lavida_agent.tools.shapes_world import language as lang

__all__ = ("FIT_MARGIN", "PERCEIVE_CANDIDATES", "build_ground_graph", "choose_boxes", "graph", "ground_objects")

FIT_MARGIN = 20.0
"""A perceived object's box replaces the model's own box only when the expression's head
noun fits it by more than this (`Engine.noun_fit`; nats for the real engine, the margin the
pipeline's own candidate rerank uses). On benchmark seeds 0-1 margins of 10, 20 and 30 gave
0.884, 0.875 and 0.875; the pipeline's margin was kept rather than tuned on them."""

PERCEIVE_CANDIDATES: int | None = None
"""The perception grounds each captioned object with the engine's default read (for the
real engine, the image in twelve views and the box the noun fits best of all they found):
its boxes are the candidates each expression is checked against. Measured when the default
was four candidates, the greedy read cost 0.03 (benchmark seeds 0-3: 0.862 / 0.842 against
0.891 / 0.869 single / multi; weights README, "Stop 20")."""


def route(state: GroundState, runtime: Runtime[Context]) -> str:
    """`perceive` first when `ground_by` is 'scene' and some expression is in the grammar."""
    ctx = runtime.context if runtime.context is not None else Context()
    if ctx.ground_by == "scene" and any(_spec(e) is not None for e in state.expressions):
        return "perceive"
    return "ground_objects"


def _spec(expression: str) -> lang.RefSpec | None:
    try:
        return lang.parse_refexp(expression)
    except lang.GrammarError:
        return None


def choose_boxes(
    engine: Engine, pixels: Any, expressions: list[str], direct: list[Box],
    perception: Perception,
) -> tuple[list[Box], list[FoundBy]]:  # fmt: skip
    """Each expression's box given the model's own (`direct`) and what it perceived (see
    the module docstring). At most one `noun_fit` call for all expressions.

    Returns:
        The chosen boxes and, per box, how it was chosen.
    """
    boxes, found_by = list(direct), ["direct" for _ in direct]
    scene = perceived_scene(perception)
    seen = list(dict.fromkeys(o.box for o in perception.objects if o.box.area > 0))
    asks: list[tuple[int, list[Box]]] = []  # (expression, [direct box, *other candidates])
    for i, text in enumerate(expressions):
        spec = _spec(text)
        if spec is None:
            continue
        k = lang.resolve_refexp(scene, spec) if scene is not None else None
        resolved = perception.objects[k].box if k is not None else None
        if resolved is not None and (spec.side or spec.relation or direct[i].area <= 0):
            boxes[i], found_by[i] = resolved, "scene"
            continue
        others = [b for b in seen if b != direct[i]]
        if spec.side is None and direct[i].area > 0 and others:
            asks.append((i, [direct[i], *others]))
    if asks:
        items = [{"label": expressions[i], "box": b.as_list()} for i, cands in asks for b in cands]
        fits = [float(f) for f in engine.noun_fit(pixels, items)]
        start = 0
        for i, cands in asks:
            fit = fits[start : start + len(cands)]
            start += len(cands)
            best = max(range(len(cands)), key=lambda j: (fit[j], -j))
            if fit[best] > fit[0] + FIT_MARGIN:
                boxes[i], found_by[i] = cands[best], "fit"
    return boxes, found_by  # type: ignore[return-value]


def ground_objects(state: GroundState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ground every expression in one engine call, then check each box against the
    perception (when the run perceived the image).

    Returns:
        `boxes`: one `LayoutItem` per expression (label = the expression), same order;
        `found_by`: how each was chosen; `present`: whether each is in the image (None
        when unchecked).
    """
    ctx = runtime.context if runtime.context is not None else Context()
    with node_events("ground_objects"):
        engine = ctx.get_engine()
        pixels = ctx.get_store().open(state.image)
        exprs = list(state.expressions)
        for e in exprs:
            warn_outside_grammar("ground", "expression", e, lang.parse_refexp,
                                 "its box is the model's own, and whether the image holds it is unchecked")  # fmt: skip
        found = engine.ground(pixels, exprs) if exprs else []
        direct = [Box.model_validate([float(v) for v in b]) for b in found]
        if len(direct) != len(exprs):
            raise RuntimeError(f"the engine returned {len(direct)} boxes for {len(exprs)} expressions")
        if state.perception is not None:
            chosen, found_by = choose_boxes(engine, pixels, exprs, direct, state.perception)
            scene = perceived_scene(state.perception)
            seen = [lang.Noun(o.shape, o.color, o.size) for o in scene.objects] if scene else None
            present = presence(engine, pixels, exprs, chosen, seen)
        else:
            chosen, found_by, present = direct, ["direct"] * len(direct), [None] * len(direct)
        boxes = [LayoutItem(label=e, box=b) for e, b in zip(exprs, chosen, strict=True)]
        emit("boxes", boxes=[b.model_dump(mode="json") for b in boxes], found_by=list(found_by),
             present=present)  # fmt: skip
    return {"boxes": boxes, "found_by": list(found_by), "present": present}


def build_ground_graph() -> StateGraph[GroundState, Context, GroundInput, GroundOutput]:
    """The uncompiled `ground` builder."""
    builder = StateGraph(GroundState, context_schema=Context, input_schema=GroundInput,
                         output_schema=GroundOutput)  # fmt: skip
    builder.add_node("perceive", functools.partial(perceive, candidates=PERCEIVE_CANDIDATES),
                     input_schema=GroundState)  # fmt: skip
    builder.add_node(ground_objects)
    builder.add_conditional_edges(START, route, ["perceive", "ground_objects"])
    builder.add_edge("perceive", "ground_objects")
    builder.add_edge("ground_objects", END)
    return builder


graph = build_ground_graph().compile(name="ground")
"""Compiled without a checkpointer."""
