"""Run traces: what every node of a workflow run saw, did and produced, as JSON and as HTML.

A `Trace` is written for every run (`<runs_dir>/<run_id>.json`, see `save_trace`), when it
starts (no result, no error: unfinished) and again when it ends. It lists
the nodes in the order they ran, each with its input (a compact view of the state it was
given), its output (the partial state update it returned), its timings, the custom events it
emitted (plan, image, critique, boxes, answer...) and a `view`: the image the node is about
plus the boxes worth drawing on it (planned, grounded, re-masked regions). Images are
`ImageRef`s into the artifact store, never bytes, so a trace stays small (tens of kB:
its images are references).

`render_html(trace, store)` turns a trace into one self-contained HTML page: every node's
image inlined as a base64 PNG (upscaled nearest-neighbour, boxes drawn with `tools.draw`),
critique text, a timing table and, for edit runs, the session lineage as an inline SVG
graph. The page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import html
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from lavida_agent import live
from lavida_agent.errors import InvalidInputError, NotFoundError

__all__ = (
    "Trace",
    "TraceNode",
    "TraceRecorder",
    "TraceFile",
    "TraceView",
    "ViewBox",
    "add_served",
    "find_trace",
    "jsonable",
    "load_trace",
    "recent_runs",
    "render_html",
    "save_trace",
    "trace_files",
    "trace_path",
    "trace_status",
)

TRACE_VERSION = 1
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_QUIET_EVENTS = {"node_start", "node_end", "sampler_step"}


# ----------------------------------------------------------------------------------------
# The trace model
# ----------------------------------------------------------------------------------------


class ViewBox(BaseModel):
    """One box to draw on a node's image."""

    label: str
    box: list[float] = Field(description="[x0, y0, x1, y1] in the image's pixels.")
    kind: str = Field(description="planned | found | region | target | keep | stray")
    ok: bool | None = Field(default=None, description="For found boxes: the check passed.")


class TraceView(BaseModel):
    """What to show for a node: an image (None: a blank canvas) and boxes on it."""

    image: dict[str, Any] | None = None
    boxes: list[ViewBox] = Field(default_factory=list)
    caption: str = ""


class TraceNode(BaseModel):
    """One node execution of a run."""

    index: int
    node: str
    task_id: str | None = None
    start_s: float = Field(description="Seconds from the run's start to the node's start.")
    elapsed_s: float | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    output: dict[str, Any] = Field(default_factory=dict)
    events: list[dict[str, Any]] = Field(default_factory=list)
    sampler_steps: int = 0
    previews: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None
    view: TraceView = Field(default_factory=TraceView)


class Trace(BaseModel):
    """The full record of one run."""

    version: int = TRACE_VERSION
    run_id: str
    thread_id: str
    workflow: str
    started_at: str
    elapsed_s: float = 0.0
    canvas: int = 64
    inputs: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    nodes: list[TraceNode] = Field(default_factory=list)
    result: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] | None = None
    error: str | None = None
    error_code: str | None = Field(default=None, description="The error's kind: a "
                                   "`LavidaError.code` ('cancelled': its cancel event was set, "
                                   "as the CLI's Ctrl-C does; ...), or 'interrupted' (a "
                                   "KeyboardInterrupt raised inside the run).")  # fmt: skip

    def to_json(self, **kwargs: Any) -> str:
        """The trace as a JSON string."""
        return self.model_dump_json(**kwargs)


def jsonable(value: Any) -> Any:
    """`value` with pydantic models, dataclasses (`ImageRef`), numpy scalars and paths as JSON."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return f"<array {value.shape} {value.dtype}>"
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _compact(state: Any) -> dict[str, Any]:
    """A node's input state, with growing lists reduced to their length and last item."""
    data = jsonable(state)
    if not isinstance(data, dict):
        return {"value": data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            out[key] = {"count": len(value), "last": value[-1]}
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------


class TraceRecorder:
    """Builds a `Trace` from a graph's `stream_mode=["tasks", "custom"]` chunks.

    Feed every `(mode, chunk)` pair to `feed`, then call `finish`.
    """

    def __init__(
        self,
        *,
        run_id: str,
        thread_id: str,
        workflow: str,
        inputs: dict[str, Any],
        settings: dict[str, Any],
        canvas: int = 64,
    ) -> None:
        self.trace = Trace(run_id=run_id, thread_id=thread_id, workflow=workflow,
                           started_at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                           canvas=canvas, inputs=jsonable(inputs),
                           settings=jsonable(settings))  # fmt: skip
        self._t0 = time.perf_counter()
        self._open: dict[str, TraceNode] = {}
        self._last_plan: list[ViewBox] = []
        self.failed_node: str | None = None
        """The last node that finished with an error, if any."""

    def _now(self) -> float:
        return round(time.perf_counter() - self._t0, 6)

    @property
    def current_node(self) -> str | None:
        """The node running now (the last one started and not finished), if any."""
        return next(reversed(self._open.values())).node if self._open else None

    def feed(self, mode: str, chunk: Any) -> None:
        """Record one stream chunk (`tasks`: node start/result; `custom`: node events)."""
        if mode == "tasks" and isinstance(chunk, dict):
            self._task(chunk)
        elif mode == "custom" and isinstance(chunk, dict):
            self._event(chunk)

    def _task(self, chunk: dict[str, Any]) -> None:
        task_id = str(chunk.get("id"))
        if "input" in chunk:  # the node starts
            node = TraceNode(index=len(self.trace.nodes), node=str(chunk.get("name")),
                             task_id=task_id, start_s=self._now(),
                             input=_compact(chunk["input"]))  # fmt: skip
            self.trace.nodes.append(node)
            self._open[task_id] = node
            return
        node = self._open.pop(task_id, None)
        if node is None:
            return
        node.output = jsonable(chunk.get("result") or {})
        if chunk.get("error") is not None:
            node.error = f"{type(chunk['error']).__name__}: {chunk['error']}"
            self.failed_node = node.node
        if node.elapsed_s is None:
            node.elapsed_s = round(self._now() - node.start_s, 6)
        node.view = self._view(node)

    def _event(self, event: dict[str, Any]) -> None:
        name = event.get("node") or self.current_node
        node = next((n for n in reversed(self._open.values()) if n.node == name), None)
        if node is None:
            node = next(reversed(self._open.values()), None)
        if node is None:
            return
        kind = event.get("event")
        if kind == "node_end" and "elapsed_s" in event:
            node.elapsed_s = round(float(event["elapsed_s"]), 6)
        elif kind == "sampler_step":
            node.sampler_steps += 1
            if event.get("preview"):
                node.previews.append(event["preview"])
        elif kind not in _QUIET_EVENTS:
            node.events.append(jsonable(event))

    def finish(
        self,
        *,
        result: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
        error: str | None = None,
        error_code: str | None = None,
    ) -> Trace:
        """Close the trace: the run's result, the lineage (edit runs) and any error."""
        for node in self._open.values():  # nodes interrupted by an error
            node.error = node.error or error or "did not finish"
            node.elapsed_s = round(self._now() - node.start_s, 6)
            node.view = self._view(node)
        self._open.clear()
        self.trace.elapsed_s = self._now()
        self.trace.result = jsonable(result or {})
        self.trace.lineage = jsonable(lineage) if lineage is not None else None
        self.trace.error = error
        self.trace.error_code = error_code
        return self.trace

    # -- views --------------------------------------------------------------------------------

    def _view(self, node: TraceNode) -> TraceView:
        """The image a node is about and the boxes to draw on it (by node name)."""
        out, inp, name = node.output, node.input, node.node
        if name in ("plan_layout", "review_plan"):
            plan = out.get("plan") or inp.get("plan") or {}
            boxes = [_vbox(i, "planned") for i in plan.get("items", [])]
            self._last_plan = boxes or self._last_plan
            return TraceView(image=None, boxes=boxes,
                             caption=f"plan ({plan.get('source', 'model')}): {len(boxes)} object(s)")  # fmt: skip
        if name in ("generate_image", "refine_image") and out.get("attempts"):
            a = out["attempts"][0]
            boxes = [_vbox(i, "planned") for i in (a.get("plan") or {}).get("items", [])]
            boxes += [ViewBox(label="", box=_blist(b), kind="region") for b in a.get("regions", [])]
            cap = f"round {a['round']} - {a['mode']} - seed {a['seed']}"
            if a.get("feedback"):
                cap += " - feedback: " + "; ".join(a["feedback"])
            return TraceView(image=a["image"], boxes=boxes, caption=cap)
        if name in ("critique_image", "verify_edit"):
            crit = (out.get("critiques") or [{}])[0] if name == "critique_image" else (
                ((out.get("steps") or [{}])[0]).get("critique") or {})  # fmt: skip
            if crit:
                boxes = [ViewBox(label=g["label"], box=_blist(g["found"]), kind="found",
                                 ok=g["ok"]) for g in crit.get("grounding", [])]  # fmt: skip
                boxes += [ViewBox(label="stray", box=_blist(m["box"]), kind="stray") for m in crit.get("strays", [])]
                cap = _verdict_caption(crit)
                if crit.get("dropped_reasons"):
                    cap += " (dropped, not about the prompt: " + "; ".join(crit["dropped_reasons"]) + ")"
                return TraceView(image=crit.get("image"), boxes=boxes, caption=cap)
        if name == "plan_edit" and out.get("edit_plan"):
            plan = out["edit_plan"]
            boxes = [_vbox(i, "found") for i in plan.get("grounded", [])]
            boxes += [ViewBox(label="", box=_blist(b), kind="region") for b in plan["regions"]]
            boxes += [_vbox(i, "keep") for i in plan.get("keep", [])]
            cap = "targets: " + (", ".join(plan.get("targets", [])) or "-")
            return TraceView(image=out.get("source"), boxes=boxes, caption=cap)
        if name == "edit_image" and out.get("candidate"):
            step = out["candidate"]
            boxes = [ViewBox(label="", box=_blist(b), kind="region")
                     for b in step["plan"].get("regions", [])]  # fmt: skip
            boxes += [_vbox(i, "target") for i in step["plan"].get("layout", [])]
            cap = f"turn {step['turn']} round {step['round']} - seed {step['seed']}"
            return TraceView(image=step["result"], boxes=boxes, caption=cap)
        if name == "commit_edit" and out.get("current"):
            return TraceView(image=out["current"], caption=f"kept step {out.get('current_step')}")
        if name == "ground_objects":
            here = out.get("present") or []  # False: not in the image (the box: a look-alike)
            boxes = [_vbox(i, "found").model_copy(update={"ok": False} if k < len(here) and here[k] is False else {})
                     for k, i in enumerate(out.get("boxes", []))]  # fmt: skip
            by = out.get("found_by") or []
            cap = f"{len(boxes)} expression(s)"
            if any(b != "direct" for b in by):
                cap += "; " + ", ".join(f"{b.label}: {how}" for b, how in zip(boxes, by) if how != "direct")
            if absent := [b.label for b in boxes if b.ok is False]:
                cap += "; not in the image: " + ", ".join(absent)
            return TraceView(image=inp.get("image"), boxes=boxes, caption=cap)
        if name == "perceive" and out.get("perception"):
            seen = out["perception"]
            boxes = [_vbox(i, "found") for i in seen.get("objects", [])]
            cap = f"caption: {seen.get('caption')}" + ("" if seen.get("complete") else " (incomplete)")
            return TraceView(image=inp.get("image"), boxes=boxes, caption=cap)
        if name == "judge_image" and out.get("verdict"):
            return TraceView(image=inp.get("image"), caption=_verdict_caption(out))
        if name == "answer_question":
            by = f" (from {out['answered_by']})" if out.get("answered_by") else ""
            return TraceView(image=inp.get("image"), caption=f"answer: {out.get('answer')}{by}")
        return TraceView(image=None, boxes=list(self._last_plan), caption=node.error or "")


def _verdict_caption(verdict: dict[str, Any]) -> str:
    """`reject: missing blue square (judged by the perceived scene)` for a critique record."""
    cap = f"{verdict.get('verdict')}: " + ("; ".join(verdict.get("reasons", [])) or "ok")
    if verdict.get("judged_by") == "scene":
        cap += " (judged by the perceived scene)"
    return cap


def _blist(box: Any) -> list[float]:
    if isinstance(box, dict):
        return [float(box[k]) for k in ("x0", "y0", "x1", "y1")]
    return [float(v) for v in box]


def _vbox(item: dict[str, Any], kind: str) -> ViewBox:
    return ViewBox(label=str(item.get("label", "")), box=_blist(item["box"]), kind=kind)


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id) or run_id in (".", ".."):
        raise InvalidInputError(f"not a run id: {run_id!r}")
    return run_id


def trace_path(run_id: str, runs_dir: str | Path) -> Path:
    """Where the trace of `run_id` lives: `<runs_dir>/<run_id>.json`."""
    return Path(runs_dir) / f"{_check_run_id(run_id)}.json"


def find_trace(run_id: str, runs_dir: str | Path) -> Path:
    """The trace file of `run_id`, looked up by id only (never a path a caller names).

    Raises:
        NotFoundError: no such run; the message names the run, not the folder (it reaches
            remote clients).
    """
    try:
        path = trace_path(run_id, runs_dir)
    except InvalidInputError:
        raise NotFoundError(f"no trace for run {run_id!r}") from None
    if not path.is_file():
        raise NotFoundError(f"no trace for run {run_id!r}")
    return path


def save_trace(trace: Trace, runs_dir: str | Path) -> Path:
    """Write `trace` to `<runs_dir>/<run_id>.json` (atomically) and return the path."""
    target = trace_path(trace.run_id, runs_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(trace.to_json(indent=1))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def add_served(run_id: str, ref: Any, runs_dir: str | Path) -> None:
    """Record in run `run_id`'s trace an image derived from its result and handed out by
    reference (the server's OpenAI `url` answers: cropped, masked, upscaled copies), so the
    store keeps it as long as the run (`result.served`). A run without a trace is left be."""
    with contextlib.suppress(NotFoundError):
        trace = load_trace(find_trace(run_id, runs_dir))
        served = trace.result.setdefault("served", [])
        if ref.to_dict() not in served:
            served.append(ref.to_dict())
            save_trace(trace, runs_dir)


def load_trace(run: str | Path, runs_dir: str | Path | None = None) -> Trace:
    """Load a trace by run id (from `runs_dir`) or from a `.json` file path.

    Raises:
        NotFoundError: no such trace.
        InvalidInputError: the file is not a trace.
    """
    text = str(run)
    path_given = text.endswith(".json") or runs_dir is None
    if path_given:
        path = Path(text)
    else:
        path = trace_path(text, runs_dir)
    if not path.is_file():
        if text.endswith(".json"):
            raise NotFoundError(f"no trace file {text!r}")
        runs = sorted((f for f in trace_files(runs_dir) if f.thread_id == text), key=lambda f: f.mtime)
        if runs:  # a session (or a run's thread) id: name its runs, newest last
            named = ", ".join(f.run_id for f in runs[-5:])
            raise NotFoundError(f"{text!r} is a session (thread), not a run: its {len(runs)} run(s) "
                                f"{'end with ' if len(runs) > 5 else 'are '}{named}; trace one of them")  # fmt: skip
        raise NotFoundError(f"no trace for run {text!r}" + (f" in {runs_dir}" if runs_dir else ""))
    try:
        return Trace.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        errors = getattr(exc, "errors", None)  # pydantic: name the first problem, not all of them
        why = f"{'.'.join(map(str, errors()[0]['loc'])) or 'the file'}: {errors()[0]['msg']}" if errors else exc
        what = repr(str(path)) if path_given else f"the trace of run {text!r}"  # (no folder: it may reach a client)
        raise InvalidInputError(f"{what} is not a lavida-agent trace ({why})") from None


# ----------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------

_KIND_COLORS: dict[str, tuple[int, int, int]] = {
    "planned": (255, 0, 255),
    "region": (0, 255, 255),
    "target": (128, 128, 255),
    "keep": (255, 255, 0),
    "found": (0, 255, 0),
    "found_bad": (255, 0, 128),
    "stray": (255, 128, 0),
}

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.node{border:1px solid #ddd;border-radius:6px;padding:.8em;margin:.8em 0;display:flex;gap:1em}
.node img{image-rendering:pixelated;border:1px solid #999}
.meta{flex:1;min-width:0}.err{color:#b00}.ok{color:#070}.bad{color:#b00}
pre{background:#f6f6f6;padding:.5em;overflow:auto;max-height:22em;font-size:.8em}
.legend span{display:inline-block;padding:0 .5em;margin-right:.4em;color:#000}
"""


def _data_uri(image: np.ndarray) -> str:
    from lavida_agent.tools.images import encode_png

    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def _node_image(view: TraceView, store: Any, canvas: int, scale: int) -> tuple[np.ndarray, str]:
    """The node's picture with its boxes drawn, and a note when the image was missing."""
    from lavida_agent.tools.draw import draw_boxes
    from lavida_agent.tools.images import resize_nearest

    note = ""
    base: np.ndarray | None = None
    if view.image is not None:
        try:
            base = store.open(view.image["path"] if "path" in view.image else view.image)
        except Exception as exc:  # a missing or corrupt artifact must not break the page
            note = f"image unavailable ({type(exc).__name__})"
    if base is None:
        base = np.full((canvas, canvas, 3), 255 if not note else 200, dtype=np.uint8)
    if not view.boxes:
        return resize_nearest(base, scale), note
    colors = [_KIND_COLORS["found_bad" if b.kind == "found" and b.ok is False else b.kind]
              if b.kind in _KIND_COLORS else (255, 0, 255) for b in view.boxes]  # fmt: skip
    labels = [b.label or None for b in view.boxes]
    drawn = draw_boxes(base, [b.box for b in view.boxes], labels=labels, colors=colors,
                       scale=scale)  # fmt: skip
    return drawn, note


def _lineage_svg(lineage: dict[str, Any], current: str | None) -> str:
    """The lineage DAG as an inline SVG: images as boxes by depth, edits as labelled arrows."""
    nodes = [n["id"] for n in lineage.get("nodes", [])]
    edges = lineage.get("edges", lineage.get("links", []))
    if not nodes:
        return "<p>(empty lineage)</p>"
    incoming: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        incoming.setdefault(e["target"], []).append(e["source"])
    depth: dict[str, int] = {}

    def depth_of(n: str, seen: frozenset[str] = frozenset()) -> int:
        if n not in depth:
            parents = [p for p in incoming.get(n, []) if p not in seen]
            depth[n] = 1 + max((depth_of(p, seen | {n}) for p in parents), default=-1)
        return depth[n]

    rows: dict[int, int] = {}
    pos: dict[str, tuple[int, int]] = {}
    for n in nodes:
        d = depth_of(n)
        pos[n] = (20 + d * 190, 20 + rows.get(d, 0) * 70)
        rows[d] = rows.get(d, 0) + 1
    w = 20 + (max(depth.values()) + 1) * 190
    h = 20 + max(rows.values()) * 70
    parts = [f'<svg width="{w}" height="{h}" '
             f'font-family="monospace" font-size="11">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
             'markerHeight="6" orient="auto"><path d="M0,0L10,5L0,10z" fill="#555"/></marker>'
             "</defs>"]  # fmt: skip
    twins: dict[tuple[str, str], int] = {}  # steps that made the same image from the same one
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        color = {"accept": "#2a2", "reject": "#c22"}.get(str(e.get("verdict")), "#555")
        width = 3 if e.get("head") else 1
        label = f"#{e.get('index')} {str(e.get('instruction', ''))[:22]}"
        k = twins[e["source"], e["target"]] = twins.get((e["source"], e["target"]), -1) + 1
        parts.append(f'<line x1="{x0 + 110}" y1="{y0 + 15}" x2="{x1}" y2="{y1 + 15}" '
                     f'stroke="{color}" stroke-width="{width}" marker-end="url(#arrow)"/>')  # fmt: skip
        parts.append(f'<text x="{(x0 + 110 + x1) // 2 - 40}" y="{(y0 + y1) // 2 + 8 + 12 * k}" '
                     f'fill="{color}">{html.escape(label)}</text>')  # fmt: skip
    for n, (x, y) in pos.items():
        fill = "#ffd" if n == current else "#eef"
        parts.append(f'<rect x="{x}" y="{y}" width="110" height="30" rx="4" fill="{fill}" '
                     f'stroke="#446"/><text x="{x + 8}" y="{y + 19}">{html.escape(n[:12])}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _pre(data: Any) -> str:
    return "<pre>" + html.escape(json.dumps(data, indent=1, default=str)) + "</pre>"


def trace_status(t: Trace, runs_dir: str | Path | None = None) -> str:
    """What became of a run, from its own trace: 'ok'; 'stopped' (cancelled, or Ctrl-C);
    'failed' (any other error); 'running' (no result or error yet, and its process holds
    its thread: `lavida_agent.live`; needs `runs_dir`); or 'unfinished' (its process ended
    before the run did: killed, or it crashed; where `live.SUPPORTED` is False, also a run
    of another process still running). `recent_runs` also says 'resumed' when a
    later run finished the work."""
    if t.result:
        return "ok"
    if t.error:
        return "stopped" if t.error_code in ("cancelled", "interrupted") else "failed"
    if runs_dir is not None and t.run_id in (live.holder(runs_dir, t.thread_id) or {}).get("run_ids", ()):
        return "running"
    return "unfinished"


_STARTED_RE = re.compile(rb'"started_at": *"([^"]*)"')


def _started(path: Path) -> str:
    """When the run of trace file `path` started (ISO, UTC: sorts as text), read from the
    file's first lines; "" (last of all) when it cannot be read. Not the file's time, which
    a copy of the home without `-p` resets."""
    try:
        with path.open("rb") as f:
            m = _STARTED_RE.search(f.read(4096))
    except OSError:
        return ""
    return m.group(1).decode("utf-8", "replace") if m else ""


def recent_runs(runs_dir: str | Path, *, limit: int = 20, unfinished: bool = False,
                ) -> list[dict[str, Any]]:  # fmt: skip
    """The newest runs first (by start): id, workflow, thread, start, status, error,
    `accepted` (a finished generate or edit: was its kept image accepted or verified; else
    None) and what was asked (`prompt`, `instruction`, `question` or `expressions`).

    A run whose work a later run finished (`LavidaAgent.resume`: the same `origin`) is
    'resumed', with `resumed_by`. `unfinished` keeps the runs a `resume` could finish
    (generate and edit runs stopped, failed or unfinished, and not resumed since; not the
    ones still running, nor a session's turn after which another turn started on its
    thread: `resume` refuses those as moved on; an undo, redo or branch leaves no trace
    to tell by, and `resume` says so then).
    Unreadable files are skipped."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInputError(f"limit must be a positive integer, got {limit!r}")
    folder = Path(runs_dir)
    paths = sorted(folder.glob("*.json"), key=_started, reverse=True)
    out: list[dict[str, Any]] = []
    finished: dict[str, str] = {}  # origin run -> the newest run that finished its work
    latest: dict[str, str] = {}  # thread -> the origin of its newest run
    for path in paths:  # newest first, so a resume is seen before the runs it finished
        try:
            t = Trace.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        origin = t.inputs.get("origin") or t.run_id
        status = trace_status(t, folder)
        if status == "ok":
            finished[origin] = t.run_id  # when older runs of it come, the first that finished it
        elif origin in finished:
            status = "resumed"
        moved_on = latest.setdefault(t.thread_id, origin) != origin  # a later run's thread
        if unfinished and (status in ("ok", "resumed", "running") or moved_on
                           or t.workflow not in ("t2i", "edit")):  # fmt: skip
            continue
        asked = {k: t.inputs[k] for k in ("prompt", "instruction", "question", "expressions")
                 if k in t.inputs}  # fmt: skip
        out.append({"run_id": t.run_id, "workflow": t.workflow, "thread_id": t.thread_id,
                    "started_at": t.started_at, "status": status, "error": t.error,
                    "accepted": t.result.get("accepted"),
                    **({"resumed_by": finished[origin]} if status == "resumed" else {}),
                    **asked})  # fmt: skip
        if len(out) == limit:
            break
    return out


@dataclasses.dataclass(frozen=True)
class TraceFile:
    """A trace on disk, read for deleting runs (`trace_files`)."""

    path: Path
    run_id: str
    thread_id: str | None  # None: not a readable trace (deleted by its run id or its age alone)
    workflow: str | None
    origin: str | None  # the run whose work it does: itself, or the run a resume finished
    mtime: float
    size: int
    shas: frozenset[str]  # every sha256 in the file: the images it refers to


def trace_files(runs_dir: str | Path) -> list[TraceFile]:
    """Every `<run_id>.json` in `runs_dir` with its thread, workflow, time (last written)
    and the shas in it. A file that is no trace keeps its shas and has no thread."""
    out = []
    for path in Path(runs_dir).glob("*.json"):
        try:
            st, text = path.stat(), path.read_text(encoding="utf-8", errors="replace")
        except OSError:  # removed meanwhile
            continue
        try:
            data = json.loads(text)
            thread, workflow = str(data["thread_id"]), str(data["workflow"])
            origin = str((data.get("inputs") or {}).get("origin") or data["run_id"])
        except (ValueError, KeyError, TypeError, AttributeError):
            thread = workflow = origin = None
        out.append(TraceFile(path, path.stem, thread, workflow, origin, st.st_mtime, st.st_size,
                             frozenset(_SHA_RE.findall(text))))  # fmt: skip
    return out


def resumed_by(t: Trace, runs_dir: str | Path) -> str | None:
    """The run that finished `t`'s work after `t` stopped (`LavidaAgent.resume`: the first
    later run of the same `origin` with a result, as `recent_runs` says), or None. Reads
    every trace in `runs_dir`."""
    origin = t.inputs.get("origin") or t.run_id
    done = []
    for path in Path(runs_dir).glob("*.json"):
        if path.stem == t.run_id:
            continue
        try:
            other = Trace.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if other.result and other.started_at > t.started_at and (other.inputs.get("origin") or other.run_id) == origin:
            done.append((other.started_at, other.run_id))
    return min(done)[1] if done else None


def _status_html(t: Trace, runs_dir: str | Path | None) -> str:
    """ok, the error, running or unfinished (see `trace_status`), and who finished a run
    that a later run resumed."""
    status = trace_status(t, runs_dir)
    later = resumed_by(t, runs_dir) if status not in ("ok", "running") and runs_dir is not None else None
    if later is not None:
        stopped = f"{html.escape(t.error)}; " if t.error else ""
        return f"<span class=err>{stopped}</span>resumed: finished by run <code>{html.escape(later)}</code>"
    if status in ("failed", "stopped"):
        return f"<span class=err>{status}: {html.escape(t.error or '')}</span>"
    if status in ("ok", "running"):
        return status
    hint = (f" (to finish it: <code>lavida-agent resume {html.escape(t.run_id)} --out FILE</code>)"
            if t.workflow in ("t2i", "edit") else "")  # fmt: skip
    known = runs_dir is not None and live.SUPPORTED  # else a run elsewhere looks stopped
    why = "its process stopped before the run did" if known else "still running, or its process stopped"
    return f"<span class=err>unfinished: {why}</span>{hint}"


def render_html(trace: Trace | dict[str, Any], store: Any, *, scale: int = 4,
                runs_dir: str | Path | None = None) -> str:  # fmt: skip
    """Render a trace as one self-contained HTML page (no external resources).

    Args:
        trace: a `Trace` or its JSON dict.
        store: the `ArtifactStore` holding the trace's images (a missing image is drawn as a
            grey placeholder, so an old trace still renders).
        scale: nearest-neighbour upscale of every image (64 px -> 256 px by default).
        runs_dir: where the run's trace lives; with it, a run without an end says whether
            it is still running (`trace_status`).

    Returns:
        The HTML text: one `<img>` (inline base64 PNG) per node, in run order.
    """
    t = trace if isinstance(trace, Trace) else Trace.model_validate(trace)
    esc = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>lavida-agent trace {esc(t.run_id)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{esc(t.workflow)} run <code>{esc(t.run_id)}</code></h1>",
           "<table>",
           f"<tr><th>thread</th><td><code>{esc(t.thread_id)}</code></td></tr>",
           f"<tr><th>started</th><td>{esc(t.started_at)}</td></tr>",
           f"<tr><th>elapsed</th><td>{t.elapsed_s:.3f} s</td></tr>",
           f"<tr><th>status</th><td>{_status_html(t, runs_dir)}</td></tr>",
           "</table>",
           "<h2>Inputs</h2>", _pre(t.inputs)]  # fmt: skip
    # Timings.
    out.append("<h2>Timings</h2><table><tr><th>#</th><th>node</th><th>start (s)</th>"
               "<th>elapsed (s)</th><th>sampler steps</th></tr>")  # fmt: skip
    for n in t.nodes:
        el = f"{n.elapsed_s:.4f}" if n.elapsed_s is not None else "-"
        out.append(f"<tr><td>{n.index}</td><td>{esc(n.node)}</td><td>{n.start_s:.4f}</td>"
                   f"<td>{el}</td><td>{n.sampler_steps}</td></tr>")  # fmt: skip
    out.append("</table>")
    # Nodes.
    legend = "".join(f"<span style='background:rgb{c}'>{esc(k)}</span>"
                     for k, c in _KIND_COLORS.items())  # fmt: skip
    out.append(f"<h2>Steps</h2><p class=legend>boxes: {legend}</p>")
    for n in t.nodes:
        image, note = _node_image(n.view, store, t.canvas, scale)
        out.append(f"<div class=node id='node-{n.index}'>"
                   f"<img alt='{esc(n.node)}' width='{image.shape[1]}' height='{image.shape[0]}' "
                   f"src='{_data_uri(image)}'><div class=meta>"
                   f"<h3>{n.index}. {esc(n.node)}</h3><p>{esc(n.view.caption)}</p>")  # fmt: skip
        if note:
            out.append(f"<p class=err>{esc(note)}</p>")
        if n.error:
            out.append(f"<p class=err>error: {esc(n.error)}</p>")
        for ev in n.events:
            if ev.get("event") == "critique":
                c = ev.get("critique", {})
                cls = "ok" if c.get("verdict") == "accept" else "bad"
                fit = ", ".join(f"{v:.1f}" for v in c.get("fit") or [])
                out.append(f"<p class={cls}><b>critique: {esc(str(c.get('verdict')))}</b> "
                           f"(score {c.get('score')}" + (f"; fit {esc(fit)}" if fit else "") + ")</p><ul>"
                           + "".join(f"<li>{esc(r)}</li>" for r in c.get("reasons", []))
                           + "</ul>")  # fmt: skip
                if c.get("model_text"):
                    said = "seen" if c.get("judged_by") == "scene" else "model"
                    out.append(f"<p>{said}: <i>{esc(c['model_text'])}</i></p>")
                if c.get("dropped_reasons"):
                    out.append("<p>dropped (not about the prompt): "
                               f"{esc('; '.join(c['dropped_reasons']))}</p>")
            elif ev.get("event") == "plan_rejected":
                p = ev.get("plan", {})
                labels = ", ".join(str(i.get("label")) for i in p.get("items", []))
                out.append(f"<p class=bad><b>plan rejected</b> ({esc(labels)}): "
                           f"{esc('; '.join(p.get('problems', [])))}</p>")  # fmt: skip
            elif ev.get("event") == "answer":
                out.append(f"<p><b>answer:</b> {esc(str(ev.get('answer')))}</p>")
        out.append("<details><summary>input / output / events</summary>"
                   + _pre({"input": n.input, "output": n.output, "events": n.events,
                           "previews": n.previews}) + "</details></div></div>")  # fmt: skip
    if t.lineage:
        current = (t.result.get("image_ref") or {}).get("sha256")
        out.append("<h2>Session lineage</h2><p>The session's branch as this run left it (every "
                   "attempt); <code>lavida-agent session show</code> lists every branch.</p>"
                   + _lineage_svg(t.lineage, current))  # fmt: skip
    out.append("<h2>Result</h2>" + _pre(t.result))
    out.append("<h2>Settings</h2>" + _pre(t.settings) + "</body></html>")
    return "\n".join(out)
