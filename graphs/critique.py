"""The `critique` workflow: does an image show what a text-to-image prompt asks for, and why not.

```
START -> [perceive] -> judge -> END
```

For a prompt in the ShapesWorld grammar the model judges the way it answers questions
(`graphs/understand.py`): `perceive` (`graphs/perceive.py`) asks it to describe the image
and grounds every captioned object, then `judge` checks the prompt against that perceived
scene with the world's own prompt rules (`language.prompt_reasons`), so the reasons are
exact (`missing blue square`, `circle is green, expected red`). A caption that does not
parse whole, a prompt outside the grammar, or `Context.critique_by="model"` leaves the
verdict to the model's own critique answer (`Engine.critique`). The t2i workflow judges each
of its attempts the same way (`_verify.judge`).

Why: the shipped model captions and grounds better than it judges a prompt in one answer
(benchmark seeds 0-3, agreement with the detector: on rendered scenes 0.946 against 0.808
asked directly, on the model's own single-shot drawings 0.897 against 0.701; README,
"Stop 25").
"""

from __future__ import annotations

import functools
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from lavida_agent.graphs._verify import judge
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.events import emit, node_events
from lavida_agent.graphs.perceive import PERCEIVE_CANDIDATES, perceive, prompt_in_grammar, warn_outside_grammar
from lavida_agent.graphs.state import CritiqueInput, CritiqueOutput, CritiqueState
from lavida_agent.tools.shapes_world import language as lang

__all__ = ("build_critique_graph", "graph", "judge_image")


def route(state: CritiqueState, runtime: Runtime[Context]) -> str:
    """`perceive` first for a ShapesWorld prompt (when `critique_by` is 'scene')."""
    ctx = runtime.context if runtime.context is not None else Context()
    if ctx.critique_by == "scene" and prompt_in_grammar(state.prompt):
        return "perceive"
    return "judge_image"


def judge_image(state: CritiqueState, runtime: Runtime[Context]) -> dict[str, Any]:
    """The verdict: the prompt checked against the perceived scene, or the model's critique.

    Returns:
        `verdict`, `reasons`, `judged_by`, `model_text` and `dropped_reasons`.
    """
    ctx = runtime.context if runtime.context is not None else Context()
    with node_events("judge_image"):
        warn_outside_grammar("critique", "prompt", state.prompt, lang.parse_prompt,
                             "the verdict is the model's own critique")  # fmt: skip
        pixels = ctx.get_store().open(state.image)
        v = judge(ctx.get_engine(), pixels, state.prompt, state.perception)
        out = {"verdict": "accept" if v.ok else "reject", "reasons": v.reasons,
               "judged_by": v.judged_by, "model_text": v.text, "dropped_reasons": v.dropped_reasons}  # fmt: skip
        emit("verdict", **out)
    return out


def build_critique_graph() -> StateGraph[CritiqueState, Context, CritiqueInput, CritiqueOutput]:
    """The uncompiled `critique` builder."""
    builder = StateGraph(CritiqueState, context_schema=Context, input_schema=CritiqueInput,
                         output_schema=CritiqueOutput)  # fmt: skip
    builder.add_node("perceive", functools.partial(perceive, candidates=PERCEIVE_CANDIDATES),
                     input_schema=CritiqueState)  # fmt: skip
    builder.add_node(judge_image)
    builder.add_conditional_edges(START, route, ["perceive", "judge_image"])
    builder.add_edge("perceive", "judge_image")
    builder.add_edge("judge_image", END)
    return builder


graph = build_critique_graph().compile(name="critique")
"""Compiled without a checkpointer."""
