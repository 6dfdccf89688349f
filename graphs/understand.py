"""The `understand` workflow: one node that answers a question about an image.

A single-node graph, so every question is traced, streamed and checkpointed like the other
workflows.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from lavida_agent.graphs.context import Context
from lavida_agent.graphs.events import emit, node_events
from lavida_agent.graphs.state import UnderstandInput, UnderstandOutput, UnderstandState

__all__ = ("answer_question", "build_understand_graph", "graph")


def answer_question(state: UnderstandState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ask the model `question` about `image`.

    Returns:
        `answer`: the model's text.
    """
    ctx = runtime.context if runtime.context is not None else Context()
    with node_events("answer_question"):
        pixels = ctx.get_store().open(state.image)
        answer = str(ctx.get_engine().answer(pixels, state.question))
        emit("answer", answer=answer)
    return {"answer": answer}


def build_understand_graph() -> StateGraph[
    UnderstandState, Context, UnderstandInput, UnderstandOutput
]:
    """The uncompiled `understand` builder."""
    builder = StateGraph(UnderstandState, context_schema=Context, input_schema=UnderstandInput,
                         output_schema=UnderstandOutput)  # fmt: skip
    builder.add_node(answer_question)
    builder.add_edge(START, "answer_question")
    builder.add_edge("answer_question", END)
    return builder


graph = build_understand_graph().compile(name="understand")
"""Compiled without a checkpointer."""
