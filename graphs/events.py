"""Custom stream events the workflow nodes emit through LangGraph's stream writer.

Every event is a JSON-ready dict with an `event` key (`stream_mode="custom"` yields them):

- `{"event": "node_start", "node": str}` and `{"event": "node_end", "node": str, "elapsed_s"}`;
- `{"event": "sampler_step", "node", "step", "total", "preview": ImageRef dict | None}`
  (a preview every `Context.preview_every` steps, stored in the artifact store, never bytes);
- `{"event": "plan", "plan": Plan dict}`, `{"event": "image", "attempt": ...}`,
  `{"event": "critique", "critique": Critique dict}`, `{"event": "answer", ...}`, ...

Outside a streaming run `get_stream_writer()` returns a no-op writer, so nodes emit freely.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from langgraph.config import get_stream_writer

from lavida_agent.graphs.engine import StepCallback, StepEvent
from lavida_agent.tools.artifacts import ArtifactStore

__all__ = ("emit", "node_events", "step_callback")

Writer = Callable[[Any], None]


def emit(event: str, **data: Any) -> None:
    """Write one custom event `{"event": event, **data}` to the stream."""
    get_stream_writer()({"event": event, **data})


@contextlib.contextmanager
def node_events(node: str) -> Iterator[dict[str, float]]:
    """Emit `node_start`/`node_end` around a node body; yields a dict to record timings in."""
    writer = get_stream_writer()
    writer({"event": "node_start", "node": node})
    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield timings
    finally:
        writer({"event": "node_end", "node": node, "elapsed_s": time.perf_counter() - start})


def step_callback(node: str, store: ArtifactStore, preview_every: int) -> StepCallback:
    """An engine `on_step` callback that streams sampler steps (and previews every k steps).

    The writer is captured here, in the node's context, so the callback may be called from
    whichever thread the engine reports from.
    """
    writer = get_stream_writer()

    def on_step(ev: StepEvent) -> None:
        preview = None
        if preview_every > 0 and ev.preview is not None and ev.step % preview_every == 0:
            preview = store.put(ev.preview).to_dict()
        writer(
            {"event": "sampler_step", "node": node, "step": int(ev.step), "total": int(ev.total),
             "preview": preview}
        )  # fmt: skip

    return on_step
