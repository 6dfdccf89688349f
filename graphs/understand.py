"""The `understand` workflow: answer a question about an image, by reading the scene.

```
START -> [perceive] -> answer_question -> END
```

A question about objects (`how many`, `what color is the ...`, `what shape is the ...`,
`is there a ...`, `what is {relation} the ...`) is answered in two steps, like a person
would: `perceive` (`graphs/perceive.py`, shared with `ground`) asks the model to describe
the image and grounds every object of its caption (one `answer` call, one batched `ground`
call), then `answer_question` reads the answer off that perceived scene with the world's own question rules
(`tools/shapes_world/language.answer`). The perception is kept in the state, so a trace
shows what the model saw and why it answered what it did. Any other question (the
background, a caption, text outside the ShapesWorld question grammar), a caption that does
not parse whole, a perceived scene without the object the question takes for granted
(`what color is the circle?` with no circle seen) or `Context.answer_by="direct"` goes
straight to the model.

Why: the shipped model captions and grounds better than it binds attributes inside an
answer (benchmark seeds 0-3: `is there ...?` 0.56 and `what is left of ...?` 0.53 asked
directly; see the README for the measured rows).
"""

from __future__ import annotations

import functools
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from lavida_agent.graphs.context import Context
from lavida_agent.graphs.events import emit, node_events
from lavida_agent.graphs.perceive import PERCEIVE_CANDIDATES, perceive, perceived_scene, warn_outside_grammar
from lavida_agent.graphs.state import UnderstandInput, UnderstandOutput, UnderstandState
from lavida_agent.tools.shapes_world import language as lang

__all__ = ("PERCEIVE_CANDIDATES", "SCENE_KINDS", "answer_question", "build_understand_graph", "graph",
           "perceive", "perceived_scene")  # fmt: skip

SCENE_KINDS = frozenset({"count", "color", "shape", "exist", "relation"})
"""Question kinds answered from the perceived scene (the others need no objects' boxes:
the background and caption questions are the model's own answers either way)."""


def _scene_question(question: str) -> lang.QuestionSpec | None:
    """The parsed question when its answer can be read off a perceived scene, else None."""
    try:
        spec = lang.parse_question(question)
    except ValueError:
        return None
    return spec if spec.kind in SCENE_KINDS else None


def route(state: UnderstandState, runtime: Runtime[Context]) -> str:
    """`perceive` first for an object question (when `answer_by` is 'scene')."""
    ctx = runtime.context if runtime.context is not None else Context()
    if ctx.answer_by == "scene" and _scene_question(state.question) is not None:
        return "perceive"
    return "answer_question"


def answer_question(state: UnderstandState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Read the answer off the perceived scene, or ask the model the question (no complete
    perception, or the perceived scene lacks the object the question presupposes).

    Returns:
        `answer`, and `answered_by`: 'scene' or 'direct'.
    """
    ctx = runtime.context if runtime.context is not None else Context()
    with node_events("answer_question"):
        warn_outside_grammar("understand", "question", state.question, lang.parse_question,
                             "the answer is the model's own, unchecked")  # fmt: skip
        spec = _scene_question(state.question)
        scene = perceived_scene(state.perception) if state.perception is not None else None
        # A perceived scene without the object the question takes for granted (`what color
        # is the circle?` and no circle seen) more likely missed it than the asker erred.
        if spec is not None and scene is not None and lang.presupposition_holds(scene, spec):
            answer, by = lang.answer(scene, spec), "scene"
        else:
            pixels = ctx.get_store().open(state.image)
            answer, by = str(ctx.get_engine().answer(pixels, state.question)), "direct"
        emit("answer", answer=answer, answered_by=by)
    return {"answer": answer, "answered_by": by}


def build_understand_graph() -> StateGraph[
    UnderstandState, Context, UnderstandInput, UnderstandOutput
]:
    """The uncompiled `understand` builder."""
    builder = StateGraph(UnderstandState, context_schema=Context, input_schema=UnderstandInput,
                         output_schema=UnderstandOutput)  # fmt: skip
    builder.add_node("perceive", functools.partial(perceive, candidates=PERCEIVE_CANDIDATES),
                     input_schema=UnderstandState)  # fmt: skip
    builder.add_node(answer_question)
    builder.add_conditional_edges(START, route, ["perceive", "answer_question"])
    builder.add_edge("perceive", "answer_question")
    builder.add_edge("answer_question", END)
    return builder


graph = build_understand_graph().compile(name="understand")
"""Compiled without a checkpointer."""
