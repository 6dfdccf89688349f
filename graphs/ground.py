"""The `ground` workflow: one node that finds each referring expression in an image.

A single-node graph, so a grounding call is traced, streamed and checkpointed like the
other workflows.
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from lavida_agent.graphs.context import Context
from lavida_agent.graphs.events import emit, node_events
from lavida_agent.graphs.state import Box, GroundInput, GroundOutput, GroundState, LayoutItem

__all__ = ("build_ground_graph", "graph", "ground_objects")


def ground_objects(state: GroundState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ground every expression in one engine call.

    Returns:
        `boxes`: one `LayoutItem` per expression (label = the expression), same order.
    """
    ctx = runtime.context if runtime.context is not None else Context()
    with node_events("ground_objects"):
        pixels = ctx.get_store().open(state.image)
        found = ctx.get_engine().ground(pixels, list(state.expressions)) if state.expressions else []
        boxes = [LayoutItem(label=e, box=Box.model_validate([float(v) for v in b]))
                 for e, b in zip(state.expressions, found, strict=True)]  # fmt: skip
        emit("boxes", boxes=[b.model_dump(mode="json") for b in boxes])
    return {"boxes": boxes}


def build_ground_graph() -> StateGraph[GroundState, Context, GroundInput, GroundOutput]:
    """The uncompiled `ground` builder."""
    builder = StateGraph(GroundState, context_schema=Context, input_schema=GroundInput,
                         output_schema=GroundOutput)  # fmt: skip
    builder.add_node(ground_objects)
    builder.add_edge(START, "ground_objects")
    builder.add_edge("ground_objects", END)
    return builder


graph = build_ground_graph().compile(name="ground")
"""Compiled without a checkpointer."""
