"""`LavidaAgent`: the Python API. Generate, edit, ground, ask, and multi-step edit sessions.

    agent = LavidaAgent.from_pretrained()            # the embedded checkpoint
    result = agent.generate("a red circle left of a blue square", seed=7)
    result.save("out.png", scale=8)
    result.accepted, result.attempts, result.critiques, result.trace_path

    with agent.session() as s:                       # a LangGraph thread
        s.start("photo.png")
        s.edit("make the circle green")
        s.undo(); s.edit("remove the square")
        s.history(), s.lineage()

    agent.resume(run_id)        # finish a generate/edit run that was cancelled or killed
    agent.delete_run(run_id); agent.delete_session(session_id)
    agent.prune(older_than=30 * 86400)  # every run and session idle for 30 days

Every call runs a LangGraph workflow (`graphs/`) compiled with the SQLite checkpointer of
`Settings.db_path`, on its own thread (`thread_id`), records a JSON trace under
`Settings.runs_dir` (`run_id`), and returns a typed result carrying the final image (array
and `ImageRef`), the layout, every attempt and critique, the ids and the trace.

Input images of any size are letterboxed to the model's canvas (`Settings.canvas`, 64 px):
`ground` maps the boxes back to the input image's pixels; generated and edited images are
canvas-sized (crop the padding with `EditResult.content()`, or `save(..., crop=True)`).

The `a*` twins (`agenerate`, `aedit`, `aground`, `aask`, `acritique`, `aresume`,
`Session.aedit`) run the same call
in a worker thread; cancelling the awaiting task stops the run at the next sampler step
(`GenerationCancelled`). Sync calls take `cancel=threading.Event()` for the same purpose.
`on_event` receives every workflow event (dicts, see `graphs/events.py`) plus `run_start`
and `run_end` (however the run ends: its `status` is ok, stopped or failed); for the async
twins it is called from the worker thread (a pool of the agent's module, `RUN_THREADS`, not
the event loop's default executor). A cancelled twin's `CancelledError` carries the stopped
run's `run_id`. `close()` stops the runs in progress (resumable) before it closes the
database. Prompts, instructions, questions and expressions are limited to
`Settings.max_prompt_chars` characters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from lavida_agent import live
from lavida_agent.errors import (
    BusyError,
    GenerationCancelled,
    InvalidInputError,
    LavidaError,
    ModelLoadError,
    NotFoundError,
    WorkflowError,
    map_exceptions,
)
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.engine import Engine
from lavida_agent.graphs.state import (
    Attempt,
    Critique,
    EditPlan,
    EditState,
    EditStep,
    LayoutItem,
    Perception,
    Plan,
    given_layout,
)
from lavida_agent.settings import SEED_LIMIT, Settings
from lavida_agent.tools.artifacts import ArtifactStore, ImageRef
from lavida_agent.tools.boxes import LetterboxParams, from_letterbox, letterbox_params
from lavida_agent.traces import Trace, TraceFile, TraceRecorder, save_trace, trace_status

logger = logging.getLogger(__name__)

__all__ = (
    "AskResult",
    "Cleanup",
    "CritiqueResult",
    "EditResult",
    "EventCallback",
    "GenerateResult",
    "GroundResult",
    "LavidaAgent",
    "RunResult",
    "Session",
    "run_with_events",
)

EventCallback = Callable[[dict[str, Any]], None]
# Gets the model's layout `[{"label", "box": [x0, y0, x1, y1]}]`; returns True/None to keep
# it or a replacement layout in the same form.
# (There is no "reject": return a replacement, or set `cancel` to stop the run.)
PlanReviewer = Callable[[list[dict[str, Any]]], "Literal[True] | None | list[dict[str, Any]]"]
ImageInput = Any
"""A path, encoded bytes, a PIL image, an `(H, W[, C])` array, or an `ImageRef` in the store."""

R = TypeVar("R")

# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What every call returns: the final image, layout, attempts, critiques, ids and trace.

    Attributes:
        image: the final image, `(H, W, 3)` uint8 RGB (the model canvas, 64 px by default).
        image_ref: the same image in the artifact store.
        layout: the boxes of the run (planned layout, edit layout or grounded boxes).
        attempts: every image drawn (t2i `Attempt`s or edit `EditStep`s); empty for
            ground/ask.
        critiques: one `Critique` per attempt, same order.
        run_id: id of this run (its trace is `<runs_dir>/<run_id>.json`).
        thread_id: the LangGraph thread (a session id for edits).
        trace: the run's `Trace`.
        trace_path: where the trace was written.
    """

    image: np.ndarray = field(repr=False)
    image_ref: ImageRef
    layout: list[LayoutItem] = field(default_factory=list)
    attempts: list[Any] = field(default_factory=list)
    critiques: list[Critique] = field(default_factory=list)
    run_id: str
    thread_id: str
    trace: Trace = field(repr=False)
    trace_path: Path | None = None
    store: ArtifactStore | None = field(default=None, repr=False, compare=False)
    kept: int | None = None
    """The round of the attempt the workflow kept as the result (None: none, or no rounds)."""

    def save(self, path: str | Path, *, scale: int = 1) -> Path:
        """Write the final image to `path` (format from the suffix), upscaled `scale`x."""
        return _save(self.image, path, scale)

    def image_path(self, ref: ImageRef) -> str:
        """Absolute path of a stored image (e.g. an attempt's) as a string."""
        return str(self.store.path(ref)) if self.store is not None else ref.path



@dataclass(frozen=True, kw_only=True)
class GenerateResult(RunResult):
    """Result of `generate`: the best attempt's image, the plan, every attempt and critique."""

    prompt: str
    seed: int = 0
    plan: Plan | None = None
    rejected_plans: list[Plan] = field(default_factory=list)
    accepted: bool = False
    max_rounds: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's `--json` shape, without `out`)."""
        by_round = {c.round: c for c in self.critiques}
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "rounds": len(self.attempts),
            "max_rounds": self.max_rounds,
            "accepted": self.accepted,
            "plan": [{"label": i.label, "box": i.box.as_list()} for i in self.layout],
            "plan_problems": list(self.plan.problems) if self.plan else [],
            "rejected_plans": [{"items": [{"label": i.label, "box": i.box.as_list()} for i in p.items],
                                "problems": list(p.problems)} for p in self.rejected_plans],  # fmt: skip
            "attempts": [_attempt_dict(self, a.seed, by_round.get(a.round), a.image)
                         for a in self.attempts],  # fmt: skip
            "kept": self.kept,
            "result": self.image_path(self.image_ref),
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "trace": str(self.trace_path) if self.trace_path else None,
        }


@dataclass(frozen=True, kw_only=True)
class EditResult(RunResult):
    """Result of an edit turn: the session's new current image and this turn's attempts."""

    instruction: str
    seed: int = 0
    source_ref: ImageRef | None = None
    plan: EditPlan | None = None
    accepted: bool = False
    step: int | None = None
    letterbox: LetterboxParams | None = None
    max_rounds: int = 1

    def save(self, path: str | Path, *, scale: int = 1, crop: bool = False) -> Path:
        """Write the final image to `path` (format from the suffix), upscaled `scale`x;
        with `crop`, without the letterbox padding of a non-square input (`content()`)."""
        return _save(self.content() if crop else self.image, path, scale)

    def content(self, image: np.ndarray | None = None) -> np.ndarray:
        """The image (or `image`, another of the canvas' size) without the letterbox padding
        added to a non-square input."""
        image = self.image if image is None else image
        box = self.content_box()
        return image if box is None else image[box[1] : box[3], box[0] : box[2]]

    def content_box(self) -> tuple[int, int, int, int] | None:
        """`(x0, y0, x1, y1)`: where the input's content lies in the canvas image (None: the
        input was not letterboxed, the whole image is content)."""
        if self.letterbox is None or self.source_ref is None:
            return None
        lb, source = self.letterbox, self.letterbox_source
        return lb.content_box(*source) if source is not None else (0, 0, lb.size, lb.size)

    letterbox_source: tuple[int, int] | None = None
    """`(width, height)` of the original input image when one was letterboxed."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's `--json` shape, without `image`/`out`)."""
        plan = self.plan
        return {
            "instruction": self.instruction,
            "seed": self.seed,
            "rounds": len(self.attempts),
            "max_rounds": self.max_rounds,
            "accepted": self.accepted,
            "plan": [{"label": i.label, "box": i.box.as_list()} for i in self.layout],
            "targets": list(plan.targets) if plan else [],
            "absent": list(plan.absent) if plan else [],
            "caption": plan.caption if plan else None,
            "regions": [b.as_list() for b in plan.regions] if plan else [],
            "keep": [{"label": i.label, "box": i.box.as_list()} for i in plan.keep] if plan else [],
            "attempts": [_attempt_dict(self, s.seed, s.critique, s.result)
                         for s in self.attempts],  # fmt: skip
            "kept": self.kept,
            "step": self.step,
            "result": self.image_path(self.image_ref),
            "content_box": list(box) if (box := self.content_box()) else None,
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "trace": str(self.trace_path) if self.trace_path else None,
        }


@dataclass(frozen=True, kw_only=True)
class GroundResult(RunResult):
    """Result of `ground`: one box per expression, in the *input* image's pixels.

    `layout` (same as `boxes`) is in input pixels; `canvas_boxes` in the model canvas, where
    `image` (the letterboxed input) lives. `found_by` says per box how it was chosen
    ('direct': the model's own box; 'scene': the object the expression picks out of what
    the model perceived; 'fit': a perceived object's box its head noun fits better), from
    the model's `caption` and its grounded `objects` (input pixels; see `graphs/ground.py`).
    `present` says per expression whether the image holds it at all (False: the box is only
    the nearest look-alike; None: not checked).
    """

    expressions: list[str]
    boxes: list[LayoutItem] = field(default_factory=list)
    canvas_boxes: list[LayoutItem] = field(default_factory=list)
    source_size: tuple[int, int] = (0, 0)
    letterbox: LetterboxParams | None = None
    found_by: list[str] = field(default_factory=list)
    present: list[bool | None] = field(default_factory=list)
    caption: str | None = None
    objects: list[LayoutItem] = field(default_factory=list)

    @property
    def located(self) -> list[LayoutItem]:
        """The boxes to show: found, of expressions not known to be absent."""
        return [b for b, here in zip(self.boxes, self.present, strict=True) if b.box.area > 0 and here is not False]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's `--json` shape, without `image`)."""
        return {
            "expressions": list(self.expressions),
            "boxes": [b.box.as_list() for b in self.boxes],
            "found_by": list(self.found_by),
            "present": list(self.present),
            "caption": self.caption,
            "objects": [{"label": o.label, "box": o.box.as_list()} for o in self.objects],
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "trace": str(self.trace_path) if self.trace_path else None,
        }


@dataclass(frozen=True, kw_only=True)
class AskResult(RunResult):
    """Result of `ask`: the answer about the (letterboxed) image, and how it was reached.

    `answered_by` is 'scene' when the answer was read off what the model perceived
    (`caption`, and each captioned object grounded: `objects`, boxes in the input image's
    pixels), 'direct' when the model answered the question itself (see
    `graphs/understand.py`).
    """

    question: str
    answer: str
    answered_by: str | None = None
    caption: str | None = None
    objects: list[LayoutItem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's `--json` shape, without `image`)."""
        return {
            "question": self.question,
            "answer": self.answer,
            "answered_by": self.answered_by,
            "caption": self.caption,
            "objects": [{"label": o.label, "box": o.box.as_list()} for o in self.objects],
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "trace": str(self.trace_path) if self.trace_path else None,
        }


@dataclass(frozen=True, kw_only=True)
class CritiqueResult(RunResult):
    """Result of `critique`: does the (letterboxed) image show what `prompt` asks for.

    `judged_by` is 'scene' when the prompt was checked against what the model perceived
    (`caption`, and each captioned object grounded: `objects`, boxes in the input image's
    pixels) by the world's prompt rules, 'model' when the model's critique answered
    (`model_text`; see `graphs/critique.py`). `reasons` say why not.
    """

    prompt: str
    verdict: str
    reasons: list[str] = field(default_factory=list)
    judged_by: str | None = None
    model_text: str = ""
    dropped_reasons: list[str] = field(default_factory=list)
    caption: str | None = None
    objects: list[LayoutItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """`True` when the verdict is `accept`."""
        return self.verdict == "accept"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the CLI's `--json` shape, without `image`)."""
        return {
            "prompt": self.prompt,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "judged_by": self.judged_by,
            "model_text": self.model_text,
            "dropped_reasons": list(self.dropped_reasons),
            "caption": self.caption,
            "objects": [{"label": o.label, "box": o.box.as_list()} for o in self.objects],
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "trace": str(self.trace_path) if self.trace_path else None,
        }


@dataclass
class Cleanup:
    """What `delete_run`, `delete_session` or `prune` deleted (with `dry_run`: would delete)."""

    threads: list[str] = field(default_factory=list)
    """The threads deleted: sessions, and the threads of generate, ground, ask and critique runs."""
    runs: list[str] = field(default_factory=list)
    """The runs whose traces were deleted."""
    images: int = 0
    """Images removed from the artifact store: those nothing refers to any more."""
    bytes_freed: int = 0
    """Of the traces, the images and (`prune`: it compacts the database) the database file."""
    busy: list[str] = field(default_factory=list)
    """`prune`: threads old enough but with a run on them now, kept."""
    busy_runs: list[str] = field(default_factory=list)
    """The runs on those threads (what `runs` lists as running)."""
    images_waiting: int = 0
    """Images nothing refers to, kept only because they were stored less than `grace_s`
    ago (a run may not have recorded them yet); a `prune` after that takes them."""
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"threads": list(self.threads), "runs": list(self.runs), "images": self.images,
                "images_waiting": self.images_waiting, "bytes_freed": self.bytes_freed,
                "busy": list(self.busy), "busy_runs": list(self.busy_runs), "dry_run": self.dry_run}


_UNREADABLE = "\0unreadable trace "  # `_delete`'s name for a trace file that is no trace


def _check_id(ident: Any) -> None:
    if not isinstance(ident, str) or not ident.strip():
        raise InvalidInputError(f"a run or session id is a non-empty string, got {ident!r}")


@contextlib.contextmanager
def _home_errors(settings: Settings) -> Iterator[None]:
    """A database or folder of the home that cannot be used, said as such (not as a raw
    `sqlite3` or `OSError`)."""
    import sqlite3

    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise BusyError(f"the database {settings.db_path!r} is locked by another process: try again") from exc
        raise InvalidInputError(f"cannot use the database {settings.db_path!r}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise InvalidInputError(f"cannot use the database {settings.db_path!r}: {exc}") from exc
    except OSError as exc:
        raise InvalidInputError(f"cannot use the home {str(settings.home)!r}: {exc.strerror or exc}"
                                + (f" ({exc.filename})" if exc.filename else "")) from exc


def _check_seconds(value: Any, name: str = "grace_s") -> None:
    """A number of seconds >= 0 (`grace_s`, `older_than`)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidInputError(f"{name} must be a number of seconds >= 0, got {value!r}")


def _attempt_dict(
    result: RunResult, seed: int, critique: Critique | None, image: ImageRef
) -> dict[str, Any]:
    return {
        "seed": seed,
        "verdict": critique.verdict if critique else None,
        "judged_by": critique.judged_by if critique else None,
        "reasons": list(critique.reasons) if critique else [],
        "grounding_failed": critique.grounding_failed if critique else [],
        "strays": [{"box": m.box.as_list(), "score": m.score} for m in critique.strays] if critique else [],
        "worst_token": critique.worst_token if critique else None,
        "fit": list(critique.fit) if critique else [],
        "keep_fit": list(critique.keep_fit) if critique else [],
        "dropped_reasons": list(critique.dropped_reasons) if critique else [],
        "image": result.image_path(image),
    }


def _save(image: np.ndarray, path: str | Path, scale: int) -> Path:
    """`image` written to `path` (format from the suffix), upscaled `scale`x."""
    from lavida_agent.tools.images import resize_nearest, save_image

    with map_exceptions():
        return save_image(resize_nearest(image, scale) if scale != 1 else image, path)


class _CallbackError(Exception):
    """A caller's `on_event` raised `error`: carried past `map_exceptions` (which would take
    a `ValueError` for invalid input) and re-raised unchanged by `_stream_run`."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Callback:
    """A caller's `on_event`, whose exceptions travel as `_CallbackError`."""

    def __init__(self, fn: EventCallback):
        self.fn = fn

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self.fn(event)
        except Exception as exc:
            raise _CallbackError(exc) from exc


def _frame(params: LetterboxParams, size: tuple[int, int]) -> dict[str, int]:
    """`EditInput.frame`: what restores a session image's letterbox (`_unframe`)."""
    return {"width": size[0], "height": size[1], "size": params.size}


def _placed(params: LetterboxParams, w: int, h: int) -> dict[str, Any]:
    """A trace's record of where a `w` x `h` input lies in the canvas its boxes are in."""
    return {"source_size": [w, h], "letterbox": vars(params), "content_box": list(params.content_box(w, h))}


def _unframe(frame: dict[str, Any] | None) -> tuple[LetterboxParams, tuple[int, int]] | None:
    if frame is None:
        return None
    w, h = int(frame["width"]), int(frame["height"])
    return letterbox_params(w, h, int(frame["size"])), (w, h)


# ----------------------------------------------------------------------------------------
# Engine guard: cancellation at engine-call and sampler-step granularity
# ----------------------------------------------------------------------------------------


class _GuardedEngine:
    """Wraps an `Engine`: raise `GenerationCancelled` once `cancel` (or `closing`: the agent
    is closing) is set.

    Checked before every engine call and at every sampler step (through `on_step`).
    """

    def __init__(self, engine: Engine, cancel: threading.Event | None,
                 closing: threading.Event | None = None) -> None:  # fmt: skip
        self._engine = engine
        self._cancel = cancel
        self._closing = closing

    def _check(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise GenerationCancelled("the run was cancelled")
        if self._closing is not None and self._closing.is_set():
            raise GenerationCancelled("the run was cancelled: its agent was closed")

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._engine, name)
        if not callable(target) or name.startswith("_"):
            return target

        @functools.wraps(target)
        def call(*args: Any, **kwargs: Any) -> Any:
            self._check()
            on_step = kwargs.get("on_step")
            if "on_step" in kwargs:

                def guarded(ev: Any) -> None:
                    self._check()
                    if on_step is not None:
                        on_step(ev)

                kwargs["on_step"] = guarded
            return target(*args, **kwargs)

        return call


def _new_id() -> str:
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------


class LavidaAgent:
    """The model as an agent: LangGraph workflows around one engine, with traces.

    Args:
        engine: an `Engine` to use (e.g. `tests.fakes.FakeEngine`, or a `BatchingEngine`);
            default: the real model, loaded lazily on first use from `settings.model_path`.
        settings: the `Settings`; default `Settings.from_env()`.
        **overrides: settings fields that override `settings` (or the environment).
    """

    def __init__(
        self, *, engine: Engine | None = None, settings: Settings | None = None, **overrides: Any
    ) -> None:
        if settings is None:
            settings = Settings.from_env(**overrides)
        elif overrides:
            settings = settings.replace(**overrides)
        self.settings = settings
        self._engine = engine
        self._owns_engine = False
        self._lock = threading.RLock()
        self._store: ArtifactStore | None = None
        self._checkpointer: Any = None
        self._graphs: dict[str, Any] = {}
        # thread id -> what of this agent is on it now: (label, run id or None for an undo...)
        self._active: dict[str, list[tuple[str, str | None]]] = {}
        self._active_lock = threading.Lock()
        self._live: dict[str, live.ThreadLock] = {}  # thread id -> its lock, while it runs here
        # session id -> [its turn lock, turns holding or waiting for it], and the OS thread
        # whose turn holds it (`_turn`); a session no turn wants any more is dropped
        self._turns: dict[str, list[Any]] = {}
        self._turn_owner: dict[str, int] = {}
        self._closing = threading.Event()  # set by `close`: the runs in progress stop
        self._maintaining = 0  # deletes and prunes in progress (`close` waits for them)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, engine: Engine | None = None, **settings: Any
    ) -> LavidaAgent:
        """An agent on the checkpoint at `path` (None: the embedded one), loaded now.

        Raises:
            ModelLoadError: the checkpoint cannot be loaded.
            InvalidInputError: a bad setting.
        """
        if path is not None and settings.get("model_path") is not None:
            raise InvalidInputError("give the checkpoint as `path` or as `model_path`, not both")
        model_path = str(path) if path is not None else settings.pop("model_path", None)
        agent = cls(engine=engine, model_path=model_path, **settings)
        agent.engine  # noqa: B018 - load eagerly so a bad checkpoint fails here
        return agent

    @classmethod
    def load(cls, path: str | Path, **settings: Any) -> LavidaAgent:
        """An agent on the checkpoint folder `path` (e.g. a Lavida-O-class checkpoint)."""
        if not Path(path).expanduser().is_dir():
            raise ModelLoadError(f"no checkpoint folder at {str(path)!r}")
        return cls.from_pretrained(Path(path).expanduser(), **settings)

    def __repr__(self) -> str:
        return f"LavidaAgent(model={self.settings.model_path or 'embedded'!r})"

    # -- lazily built parts ---------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The engine (the real model is loaded on first access)."""
        with self._lock:
            if self._engine is None:
                self._engine, self._owns_engine = _load_engine(self.settings)
            return self._engine

    @property
    def store(self) -> ArtifactStore:
        """The artifact store of `settings.artifacts_dir`."""
        with self._lock:
            if self._store is None:
                self._store = ArtifactStore(self.settings.artifacts_dir)  # type: ignore[arg-type]
            return self._store

    @property
    def checkpointer(self) -> Any:
        """The checkpointer of `settings.db_path` (SQLite file, or memory for `:memory:`)."""
        from lavida_agent.graphs.persistence import checkpointer_from_path

        with self._lock:
            if self._checkpointer is None:
                self._checkpointer = checkpointer_from_path(self.settings.db_path)
            return self._checkpointer

    def _graph(self, workflow: str) -> Any:
        with self._lock:
            if workflow not in self._graphs:
                from lavida_agent.graphs import critique, edit, ground, t2i, understand

                builders = {"t2i": t2i.build_t2i_graph, "edit": edit.build_edit_graph,
                            "ground": ground.build_ground_graph,
                            "understand": understand.build_understand_graph,
                            "critique": critique.build_critique_graph}  # fmt: skip
                self._graphs[workflow] = builders[workflow]().compile(
                    checkpointer=self.checkpointer, name=workflow
                )
            return self._graphs[workflow]

    def close(self, *, timeout: float = 30.0) -> None:
        """Stop the runs in progress (each ends with `GenerationCancelled`, resumable, as a
        cancelled run does; waiting up to `timeout` seconds for them, and for a delete or
        prune in progress), then close the
        database connection, and the engine if this agent loaded it. The agent may be used
        again: what it needs is opened anew."""
        self._closing.set()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with self._active_lock:
                    if not self._maintaining and not any(r for on in self._active.values() for _, r in on):
                        break
                time.sleep(0.01)
            self._close()
        finally:
            self._closing.clear()

    def _close(self) -> None:
        with self._lock:
            conn = getattr(self._checkpointer, "conn", None)
            if conn is not None and hasattr(conn, "close"):
                conn.close()
            self._checkpointer, self._graphs = None, {}
            if self._owns_engine and hasattr(self._engine, "close"):
                self._engine.close()  # type: ignore[union-attr]
                self._engine, self._owns_engine = None, False

    def __enter__(self) -> LavidaAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------

    def _seed(self, seed: int | None) -> int:
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < SEED_LIMIT:
                raise InvalidInputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
            return int(seed)
        if self.settings.seed is not None:
            return self.settings.seed
        return secrets.randbelow(2**31)

    def _context(
        self, *, num_steps: int | None, rounds: int | None, cancel: threading.Event | None,
        review_plan: bool = False, recorded: dict[str, Any] | None = None,
    ) -> Context:
        """The run's knobs from the settings, or (`recorded`: a trace's `settings`, for a
        resume) as the run that is being finished had them."""
        knobs = {k: getattr(self.settings, k) for k in _RECORDED_KNOBS}
        knobs.update({k: v for k, v in (recorded or {}).items() if k in _RECORDED_KNOBS})
        with map_exceptions():
            return Context(engine=_GuardedEngine(self.engine, cancel, self._closing), artifacts=self.store,
                           num_steps=num_steps if num_steps is not None else self.settings.num_steps,
                           max_rounds=rounds if rounds is not None else self.settings.max_rounds,
                           preview_every=self.settings.preview_every, review_plan=review_plan,
                           **knobs)  # fmt: skip

    def _prepare_image(
        self, image: ImageInput
    ) -> tuple[np.ndarray, ImageRef, LetterboxParams, tuple[int, int]]:
        """Load any image, letterbox it to the canvas and store it."""
        from lavida_agent.tools.images import letterbox, load_image

        with map_exceptions():
            if isinstance(image, ImageRef):
                pixels = self.store.open(image)
            else:
                pixels = load_image(image, max_pixels=self.settings.max_pixels)
            h, w = pixels.shape[:2]
            canvas, params = letterbox(pixels, size=self.settings.canvas)
            return canvas, self.store.put(canvas), params, (w, h)

    def _check_text(self, name: str, text: Any) -> None:
        """A prompt, instruction, question or expression: a non-empty string of at most
        `settings.max_prompt_chars` (a long text is slow for every request batched with it)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"{name} must be a non-empty string")
        if len(text) > self.settings.max_prompt_chars:
            raise InvalidInputError(f"{name} is {len(text)} characters: at most {self.settings.max_prompt_chars} "
                                    "(settings.max_prompt_chars, LAVIDA_MAX_PROMPT_CHARS)")  # fmt: skip

    def _settings_record(self, context: Context) -> dict[str, Any]:
        return {"model_path": self.settings.model_path, "device": self.settings.device,
                "dtype": self.settings.dtype, "canvas": self.settings.canvas,
                "num_steps": context.num_steps, "max_rounds": context.max_rounds,
                "iou_threshold": context.iou_threshold, "grounding_check": context.grounding_check,
                "stray_check": context.stray_check,
                "plan_retries": context.plan_retries, "selection": context.selection,
                "rank_by": context.rank_by, "critique_by": context.critique_by,
                "answer_by": context.answer_by,
                "ground_by": context.ground_by,
                "engine": type(context.engine._engine).__name__}  # fmt: skip

    def _run(
        self,
        workflow: str,
        graph: Any,
        payload: Any,
        *,
        thread_id: str,
        context: Context,
        inputs: dict[str, Any],
        on_event: EventCallback | None,
        lineage: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
        on_interrupt: Callable[[dict[str, Any]], Any] | None = None,
        resume: bool = False,
    ) -> tuple[str, dict[str, Any], Trace, Path]:
        """Stream one workflow run on `thread_id`, recording its trace.

        A node that pauses with `interrupt(payload)` is answered by `on_interrupt(payload)`
        and the run resumes with that answer (nothing before the pause runs again). With
        `resume`, `payload` is ignored and the thread runs on from its last checkpoint.

        The trace is written when the run starts (no result, no error: unfinished, which
        `resume` reads after a crash) and again when it ends.

        Returns:
            `(run_id, final state values, trace, trace path)`.
        """
        run_id = _new_id()
        rec = TraceRecorder(run_id=run_id, thread_id=thread_id, workflow=workflow, inputs=inputs,
                            settings=self._settings_record(context),
                            canvas=self.settings.canvas)  # fmt: skip
        config = {"configurable": {"thread_id": thread_id},
                  "recursion_limit": 16 + 6 * context.max_rounds}  # fmt: skip
        if isinstance(payload, dict) and not resume:
            payload = {**payload, "run_id": run_id}  # the state names the run that started it
        what = f"session {thread_id!r}" if workflow == "edit" else f"{workflow} thread {thread_id!r}"
        with self._on_thread(thread_id, run_id, what, alone=resume):
            return self._stream_run(run_id, rec, workflow, graph, payload, config, context,
                                    on_event, lineage, on_interrupt, resume)  # fmt: skip

    def _refuse_busy(self, thread_id: str, what: str, *, run_id: str | None = None) -> None:
        """Raise `BusyError` when a run (of this agent or another process) is on the thread:
        its state is still changing, so nothing can be read from it yet. `run_id`: the run
        asked about, said as such when it is the one still running."""
        with self._active_lock:
            mine = list(self._active.get(thread_id, ()))
        if run_id is not None and any(r == run_id for _, r in mine):
            raise BusyError(f"run {run_id} is still running here: resume it once it has ended")
        if mine:
            raise _busy_here(what, mine)
        other = live.holder(self.settings.runs_dir, thread_id)  # type: ignore[arg-type]
        if other is not None and run_id is not None and run_id in other.get("run_ids", ()):
            raise BusyError(f"run {run_id} is still running in another process (pid "
                            f"{other.get('pid')}): resume it once it has ended")  # fmt: skip
        if other is not None:
            raise BusyError(live.busy_message(what, other))

    @contextlib.contextmanager
    def _on_thread(self, thread_id: str, run_id: str | None, what: str, *, alone: bool,
                   doing: str | None = None) -> Iterator[None]:  # fmt: skip
        """Record `run_id` (or, for a change that is no run, `doing`: "an undo") as on
        `thread_id` for the block, and hold the thread against other processes
        (`live.hold`) while anything of this agent is on it.

        Args:
            what: how a refusal names the thread.
            alone: refuse when a run of this agent is on the thread already. (Runs share a
                thread with each other, never with a change that is no run.)

        Raises:
            BusyError: another process is on the thread (or, with `alone` or during an
                undo, redo, branch or restart, this agent).
        """
        entry = (doing or f"run {run_id}", run_id)
        with self._active_lock:
            on = self._active.setdefault(thread_id, [])
            if on and (alone or any(r is None for _, r in on)):
                raise _busy_here(what, on)
            if not on:
                try:
                    self._live[thread_id] = live.hold(self.settings.runs_dir, thread_id,  # type: ignore[arg-type]
                                                      run_id=run_id, doing=entry[0], what=what)  # fmt: skip
                except BaseException:
                    self._active.pop(thread_id, None)
                    raise
            on.append(entry)
            self._record_live(thread_id)
        try:
            yield
        finally:
            with self._active_lock:
                on.remove(entry)
                if on:
                    self._record_live(thread_id)
                else:
                    self._active.pop(thread_id, None)
                    self._live.pop(thread_id).release()

    @contextlib.contextmanager
    def _turn(self, thread_id: str) -> Iterator[None]:
        """One turn at a time on session `thread_id` inside this agent: a second turn waits
        for the first and then edits its result (two turns from the same state would both
        build on it, and the last writer's checkpoint would hide the other's edit).

        Raises:
            BusyError: the calling thread's own turn holds the session (a turn started from
                that turn's `on_event` callback, which would wait for itself).
        """
        me = threading.get_ident()
        with self._active_lock:
            if self._turn_owner.get(thread_id) == me:
                raise BusyError(f"session {thread_id!r} is in a turn of this thread already (a turn started "
                                "from its own callback): start the next turn after it returns")  # fmt: skip
            entry = self._turns.setdefault(thread_id, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                self._turn_owner[thread_id] = me
                try:
                    yield
                finally:
                    del self._turn_owner[thread_id]
        finally:
            with self._active_lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._turns[thread_id]

    def _record_live(self, thread_id: str) -> None:
        """Write what this agent runs on `thread_id` into its lock (under `_active_lock`)."""
        on = self._active[thread_id]
        with contextlib.suppress(OSError):  # only what others are told; the lock holds anyway
            self._live[thread_id].record([label for label, _ in on], [r for _, r in on if r])

    def _stream_run(self, run_id: str, rec: TraceRecorder, workflow: str, graph: Any,
                    payload: Any, config: dict[str, Any], context: Context,
                    on_event: EventCallback | None,
                    lineage: Callable[[dict[str, Any]], dict[str, Any] | None] | None,
                    on_interrupt: Callable[[dict[str, Any]], Any] | None,
                    resume: bool) -> tuple[str, dict[str, Any], Trace, Path]:  # fmt: skip
        thread_id = rec.trace.thread_id
        save_trace(rec.trace, self.settings.runs_dir)  # type: ignore[arg-type]
        emit = _Callback(on_event) if on_event is not None else None
        try:
            if emit is not None:
                emit({"event": "run_start", "run_id": run_id, "thread_id": thread_id, "workflow": workflow})
            with map_exceptions():
                pending: Any = None if resume else payload
                while True:
                    for mode, chunk in graph.stream(pending, config, context=context,
                                                    stream_mode=["tasks", "custom"]):  # fmt: skip
                        rec.feed(mode, chunk)
                        if mode == "custom" and emit is not None:
                            emit(chunk)
                    pending = self._answer_interrupt(graph, config, workflow, on_interrupt, emit)
                    if pending is None:
                        break
        except BaseException as exc:
            node = rec.current_node or rec.failed_node
            error: BaseException = exc
            if isinstance(exc, _CallbackError):  # the caller's own exception, as it was raised
                error = exc.error
                trace = rec.finish(error=f"on_event raised {type(error).__name__}: {error}", error_code="callback")
                save_trace(trace, self.settings.runs_dir)  # type: ignore[arg-type]
                raise error from None
            if isinstance(exc, Exception) and not isinstance(exc, LavidaError):
                where = f" in node {node!r}" if node else ""
                error = WorkflowError(f"{workflow} failed{where}: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
            code = (error.code if isinstance(error, LavidaError)
                    else "interrupted" if isinstance(error, KeyboardInterrupt)
                    else type(error).__name__)  # fmt: skip
            trace = rec.finish(error=str(error) or type(error).__name__, error_code=code)
            path = save_trace(trace, self.settings.runs_dir)  # type: ignore[arg-type]
            with contextlib.suppress(AttributeError):  # every error names its run (Ctrl-C too)
                error.run_id = run_id  # type: ignore[attr-defined]
                error.resumable = workflow in ("t2i", "edit")  # type: ignore[attr-defined]
            if on_event is not None:  # the run's end is told however it ends
                with contextlib.suppress(Exception):  # (the run's own error is the one to raise)
                    on_event({"event": "run_end", "run_id": run_id, "thread_id": thread_id,
                              "trace": str(path), "status": trace_status(trace), "error": trace.error,
                              "error_code": code})  # fmt: skip
            if error is exc:
                raise
            raise error from exc
        values = dict(graph.get_state(config).values)
        result = self._result_record(workflow, values)
        trace = rec.finish(result=result, lineage=lineage(values) if lineage else None)
        path = save_trace(trace, self.settings.runs_dir)  # type: ignore[arg-type]
        if on_event is not None:
            on_event({"event": "run_end", "run_id": run_id, "thread_id": thread_id,
                      "trace": str(path), "status": "ok", "error": None, "error_code": None})  # fmt: skip
        return run_id, values, trace, path

    @staticmethod
    def _answer_interrupt(
        graph: Any, config: dict[str, Any], workflow: str,
        on_interrupt: Callable[[dict[str, Any]], Any] | None, on_event: EventCallback | None,
    ) -> Any:
        """The `Command` that resumes a paused run, or None when the run has finished."""
        from langgraph.types import Command

        paused = [i for task in graph.get_state(config).tasks for i in task.interrupts]
        if not paused:
            return None
        request = paused[0].value
        if on_interrupt is None:
            raise WorkflowError(f"{workflow} paused for {request.get('kind', 'input')!r} and nothing answers it")
        if on_event is not None:
            on_event({"event": "interrupt", **request})
        return Command(resume=on_interrupt(request))

    @staticmethod
    def _result_record(workflow: str, values: dict[str, Any]) -> dict[str, Any]:
        if workflow == "t2i":
            best = values.get("best")
            return {"accepted": values.get("accepted", False),
                    "image_ref": best.image if best else None,
                    "kept_round": best.round if best else None,
                    "rounds": len(values.get("attempts", []))}  # fmt: skip
        if workflow == "edit":
            steps, current = values.get("steps", []), values.get("current_step")
            return {"accepted": values.get("accepted", False),
                    "image_ref": values.get("current"),
                    "current_step": current,
                    "kept_round": steps[current].round if current is not None and current < len(steps) else None,
                    "steps": len(steps)}  # fmt: skip
        if workflow == "ground":
            return {"boxes": values.get("boxes", []), "image_ref": values.get("image")}
        return {"answer": values.get("answer"), "image_ref": values.get("image")}

    # -- generate -------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        rounds: int | None = None,
        plan: bool | Sequence[dict[str, Any]] | None = None,
        num_steps: int | None = None,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
        review_plan: PlanReviewer | None = None,
    ) -> GenerateResult:
        """Plan, draw, critique and refine an image for `prompt` (the `t2i` workflow).

        Args:
            prompt: what to draw.
            seed: base seed (round `r` uses `seed + r`); default `settings.seed`, else random
                (the seed used is in the result, so the run replays).
            rounds: most images to draw (default `settings.max_rounds`).
            plan: `True` to let the model plan a layout, `False` to draw without one, or a
                layout (`[{"label": str, "box": [x0, y0, x1, y1]}]` in canvas pixels) to use;
                default `settings.plan`.
            num_steps: denoising steps per image (default `settings.num_steps`).
            on_event: called with every workflow event (dicts).
            cancel: set this event to stop the run (`GenerationCancelled`).
            review_plan: a human (or program) in the loop: called once with the model's
                layout (`[{"label", "box"}]`, canvas pixels) before anything is drawn;
                return `True`/`None` to keep it or a new layout to draw instead. The run
                pauses at the `review_plan` node and resumes with the answer; the trace
                records both layouts. Ignored when there is no model plan (`plan=False` or
                a given layout).

        Returns:
            `GenerateResult`: the best attempt's image, the plan, every attempt and critique.

        Raises:
            InvalidInputError: an empty prompt or a bad argument.
            GenerationCancelled: `cancel` was set.
            ModelLoadError, WorkflowError: the model could not load / the workflow failed.
        """
        self._check_text("prompt", prompt)
        base_seed = self._seed(seed)
        use_plan = self.settings.plan if plan is None else plan
        reviewing = review_plan is not None and use_plan is True
        context = self._context(num_steps=num_steps, rounds=rounds, cancel=cancel, review_plan=reviewing)
        payload: dict[str, Any] = {"prompt": prompt, "seed": base_seed}
        if use_plan is False:
            # No layout: an empty input plan skips the planner and the grounding checks.
            payload["plan"] = Plan(items=[], source="input")
        elif use_plan is not True:
            with map_exceptions():
                payload["plan"] = Plan(items=given_layout(use_plan, canvas=self.settings.canvas),
                                       source="input")  # fmt: skip
        thread_id = _new_id()
        inputs = {"prompt": prompt, "seed": base_seed,
                  "plan": use_plan if isinstance(use_plan, bool) else payload["plan"],
                  "rounds": context.max_rounds, "num_steps": context.num_steps}  # fmt: skip
        def answer(request: dict[str, Any]) -> Any:
            from lavida_agent.graphs.t2i import review_answer

            layout = [LayoutItem.model_validate(i).to_engine() for i in request["plan"].get("items", [])]
            reply = review_plan(layout)  # type: ignore[misc]
            with map_exceptions():  # the reviewer's mistake, refused before the run resumes on it
                items = review_answer(reply, canvas=self.settings.canvas)
            return True if items is None else [i.to_engine() for i in items]

        ran = self._run("t2i", self._graph("t2i"), payload, thread_id=thread_id, context=context,
                        inputs=inputs, on_event=on_event,
                        on_interrupt=answer if reviewing else None)  # fmt: skip
        return self._generate_result(*ran, thread_id=thread_id)

    def _generate_result(self, run_id: str, values: dict[str, Any], trace: Trace, path: Path, *,
                         thread_id: str) -> GenerateResult:  # fmt: skip
        """A finished t2i run's result, from its final state."""
        attempts: list[Attempt] = list(values.get("attempts", []))
        best: Attempt | None = values.get("best") or (attempts[-1] if attempts else None)
        if best is None:
            raise WorkflowError(f"t2i run {run_id} produced no image")
        final_plan: Plan | None = values.get("plan")
        with map_exceptions():
            image = self.store.open(best.image)
        return GenerateResult(
            image=image, image_ref=best.image,
            layout=list(final_plan.items) if final_plan else [], attempts=attempts,
            critiques=list(values.get("critiques", [])), run_id=run_id, thread_id=thread_id,
            trace=trace, trace_path=path, store=self.store, prompt=values["prompt"],
            seed=values.get("base_seed") or 0, plan=final_plan,
            rejected_plans=list(values.get("rejected_plans", [])),
            accepted=bool(values.get("accepted")), max_rounds=values.get("max_rounds") or 1,
            kept=best.round,
        )  # fmt: skip

    # -- resume ---------------------------------------------------------------------------

    def resume_session(self, run_id: str) -> str | None:
        """The session a `resume(run_id)` would write to (an edit run's thread), or None (a
        generate run has a thread of its own): what a surface locks around the resume.

        Raises:
            NotFoundError: no trace for `run_id`.
        """
        from lavida_agent.traces import find_trace, load_trace

        with map_exceptions():
            trace = load_trace(find_trace(run_id, self.settings.runs_dir))
        return trace.thread_id if trace.workflow == "edit" else None

    def check_resume(self, run_id: str) -> None:
        """Raise what `resume(run_id)` would raise before it runs anything (no model needed):
        a surface says so at once, before it loads the model."""
        self._resumable(run_id)

    def _resumable(self, run_id: str) -> tuple[Trace, Session | None, Any, str]:
        """`resume`'s checks: the run's trace, its session (edit runs), graph and origin."""
        from lavida_agent.traces import find_trace, load_trace

        with map_exceptions():
            old = load_trace(find_trace(run_id, self.settings.runs_dir))
        if old.workflow not in ("t2i", "edit"):
            raise InvalidInputError(f"run {run_id} is a {old.workflow!r} run: only generate and "
                                    "edit runs can be resumed (run the others again)")  # fmt: skip
        model = old.settings.get("model_path")
        if model != self.settings.model_path:
            raise InvalidInputError(f"run {run_id} ran on model {model!r}; this agent runs "
                                    f"{self.settings.model_path!r}")  # fmt: skip
        self._refuse_busy(old.thread_id, f"run {run_id}'s session {old.thread_id!r}"
                          if old.workflow == "edit" else f"run {run_id}", run_id=run_id)  # fmt: skip
        session = self.session(old.thread_id) if old.workflow == "edit" else None
        graph = session._session.graph if session is not None else self._graph("t2i")
        with map_exceptions():
            state = graph.get_state({"configurable": {"thread_id": old.thread_id}})
        if not state.config.get("configurable", {}).get("checkpoint_id"):
            raise InvalidInputError(f"run {run_id} cannot be resumed: this agent's checkpoint database "
                                    f"({self.settings.db_path}) holds nothing of its thread "
                                    f"{old.thread_id!r} (it ran on another database or in memory, or "
                                    "stopped before its first step: run it again)")  # fmt: skip
        origin = old.inputs.get("origin") or run_id
        # Finished work is read back only from a checkpoint the run itself wrote ("loop"): a
        # restart, undo, redo or branch ("update") leaves nothing of the run to finish.
        done_elsewhere = not state.tasks and (state.metadata or {}).get("source") != "loop"
        if state.values.get("run_id") != origin or done_elsewhere:
            if old.result:
                raise InvalidInputError(f"run {run_id} finished, and its session has moved on "
                                        "since: its result is in its trace (lavida-agent trace "
                                        f"{run_id})")  # fmt: skip
            raise InvalidInputError(f"run {run_id} cannot be resumed: its thread "
                                    f"{old.thread_id!r} has moved on since (another turn, a "
                                    "restart, an undo or a branch)")  # fmt: skip
        return old, session, graph, origin

    def resume(
        self, run_id: str, *, on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerateResult | EditResult:  # fmt: skip
        """Finish a `generate` or `edit` run that stopped part-way (cancelled, failed, or its
        process killed), from its last checkpoint: the steps it finished are not run again.

        The run's trace (written when it started) names its thread, workflow, inputs and
        settings, which the resumed run takes (rounds, steps, selection, checks), whatever
        this agent's settings are; the thread's checkpoints (`Settings.db_path`) hold what
        it did. The resumed run is a new run on the same thread, with its own trace
        (`inputs.resumed_from`, and `inputs.origin`: the run that started the work). Each
        round draws from its own seed, so the result is what the uninterrupted run would
        have given. A run paused at `review_plan` resumes with the model's plan. A run that
        had finished (a dropped request, a process killed before its final trace write)
        draws nothing more: its result is read from its last checkpoint; resuming a run
        again does the same. `traces.recent_runs` shows a run a later one finished as
        'resumed' (the traces of other runs are never rewritten).

        Raises:
            NotFoundError: no trace for `run_id`.
            BusyError: a run is on its thread now (in this agent or another process).
            InvalidInputError: its thread has moved on since (another turn of its session,
                a restart, an undo), this agent's database holds none of its checkpoints, it
                ran on another model, or it is not a generate or edit run.
        """
        old, session, graph, origin = self._resumable(run_id)
        if session is None:
            return self._resume(run_id, old, None, graph, origin, on_event, cancel)
        with self._turn(old.thread_id):  # a resumed turn is a turn: not beside another one
            return self._resume(run_id, *self._resumable(run_id), on_event, cancel)  # as it is now

    def _resume(self, run_id: str, old: Trace, session: Session | None, graph: Any, origin: str,
                on_event: EventCallback | None, cancel: threading.Event | None) -> GenerateResult | EditResult:  # fmt: skip
        rounds = old.inputs.get("rounds") or old.settings.get("max_rounds")
        context = self._context(num_steps=old.settings.get("num_steps"), rounds=rounds,
                                cancel=cancel, recorded=old.settings)  # fmt: skip
        inputs = {**old.inputs, "resumed_from": run_id, "origin": origin}
        result: GenerateResult | EditResult
        if session is not None:
            result = session._edit(context, None, inputs, on_event, resume=True,
                                   before=old.inputs.get("steps_before"))  # fmt: skip
        else:
            ran = self._run("t2i", graph, None, thread_id=old.thread_id, context=context,
                            inputs=inputs, on_event=on_event, resume=True)  # fmt: skip
            result = self._generate_result(*ran, thread_id=old.thread_id)
        return result

    # -- edit -----------------------------------------------------------------------------

    def edit(
        self,
        image: ImageInput,
        instruction: str,
        *,
        seed: int | None = None,
        rounds: int | None = None,
        num_steps: int | None = None,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> EditResult:
        """Edit `image` by `instruction` (plan, edit, verify, re-edit) on a new session.

        The result's `thread_id` is a session: continue it with `agent.session(thread_id)`.
        Arguments as in `generate`; `image` is anything `load_image` accepts (letterboxed).
        """
        return self.session().edit(instruction, image=image, seed=seed, rounds=rounds,
                                   num_steps=num_steps, on_event=on_event, cancel=cancel)  # fmt: skip

    # -- ground / ask ----------------------------------------------------------------------

    def ground(
        self,
        image: ImageInput,
        expressions: str | Sequence[str],
        *,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GroundResult:
        """Find each referring expression in `image`; boxes in the input image's pixels.

        A box that was not found is degenerate (zero area).
        """
        exprs = [expressions] if isinstance(expressions, str) else list(expressions)
        if not exprs or not all(isinstance(e, str) and e.strip() for e in exprs):
            raise InvalidInputError("ground needs one or more non-empty expressions")
        for e in exprs:
            self._check_text("an expression", e)
        canvas, ref, params, (w, h) = self._prepare_image(image)
        context = self._context(num_steps=None, rounds=None, cancel=cancel)
        thread_id = _new_id()
        inputs = {"image": ref, "expressions": exprs, **_placed(params, w, h)}
        run_id, values, trace, path = self._run(
            "ground", self._graph("ground"), {"image": ref, "expressions": exprs},
            thread_id=thread_id, context=context, inputs=inputs, on_event=on_event)  # fmt: skip
        canvas_boxes: list[LayoutItem] = list(values.get("boxes", []))
        boxes = self._input_items(canvas_boxes, params, w, h)
        seen: Perception | None = values.get("perception")
        return GroundResult(image=canvas, image_ref=ref, layout=boxes, run_id=run_id,
                            thread_id=thread_id, trace=trace, trace_path=path, store=self.store,
                            expressions=exprs, boxes=boxes, canvas_boxes=canvas_boxes,
                            source_size=(w, h), letterbox=params,
                            found_by=list(values.get("found_by", [])),
                            present=list(values.get("present", [])),
                            caption=seen.caption if seen is not None else None,
                            objects=self._input_items(seen.objects if seen else [], params, w, h))  # fmt: skip

    def ask(
        self,
        image: ImageInput,
        question: str,
        *,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> AskResult:
        """Answer `question` about `image` (the `understand` workflow)."""
        self._check_text("question", question)
        canvas, ref, params, (w, h) = self._prepare_image(image)
        context = self._context(num_steps=None, rounds=None, cancel=cancel)
        thread_id = _new_id()
        run_id, values, trace, path = self._run(
            "understand", self._graph("understand"), {"image": ref, "question": question},
            thread_id=thread_id, context=context,
            inputs={"image": ref, "question": question, **_placed(params, w, h)},
            on_event=on_event)  # fmt: skip
        seen: Perception | None = values.get("perception")
        objects = self._input_items(seen.objects if seen is not None else [], params, w, h)
        return AskResult(image=canvas, image_ref=ref, run_id=run_id, thread_id=thread_id,
                         trace=trace, trace_path=path, store=self.store, question=question,
                         answer=str(values.get("answer") or ""),
                         answered_by=values.get("answered_by"),
                         caption=seen.caption if seen is not None else None,
                         objects=objects)  # fmt: skip

    def critique(
        self,
        image: ImageInput,
        prompt: str,
        *,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> CritiqueResult:
        """Judge whether `image` shows what the text-to-image `prompt` asks for, and why not
        (the `critique` workflow)."""
        self._check_text("prompt", prompt)
        canvas, ref, params, (w, h) = self._prepare_image(image)
        context = self._context(num_steps=None, rounds=None, cancel=cancel)
        thread_id = _new_id()
        run_id, values, trace, path = self._run(
            "critique", self._graph("critique"), {"image": ref, "prompt": prompt},
            thread_id=thread_id, context=context,
            inputs={"image": ref, "prompt": prompt, **_placed(params, w, h)},
            on_event=on_event)  # fmt: skip
        seen: Perception | None = values.get("perception")
        return CritiqueResult(image=canvas, image_ref=ref, run_id=run_id, thread_id=thread_id,
                              trace=trace, trace_path=path, store=self.store, prompt=prompt,
                              verdict=str(values.get("verdict") or "reject"),
                              reasons=list(values.get("reasons", [])),
                              judged_by=values.get("judged_by"),
                              model_text=str(values.get("model_text") or ""),
                              dropped_reasons=list(values.get("dropped_reasons", [])),
                              caption=seen.caption if seen is not None else None,
                              objects=self._input_items(seen.objects if seen else [], params, w, h))  # fmt: skip

    @staticmethod
    def _input_items(items: Sequence[LayoutItem], params: LetterboxParams, w: int, h: int,
                     ) -> list[LayoutItem]:  # fmt: skip
        """Canvas boxes mapped back to the input image's pixels (labels kept)."""
        return [LayoutItem(label=i.label, box=_to_input_box(i.box.as_list(), params, w, h))
                for i in items]  # fmt: skip

    # -- sessions -------------------------------------------------------------------------

    def session(self, thread_id: str | None = None) -> Session:
        """A multi-step edit session: a new one, or the existing thread `thread_id`.

        Raises:
            InvalidInputError: `thread_id` is empty.
        """
        if thread_id is not None and not (isinstance(thread_id, str) and thread_id.strip()):
            raise InvalidInputError(f"a session id is a non-empty string (None starts a new session), got "
                                    f"{thread_id!r}")  # fmt: skip
        return Session(self, thread_id or _new_id())

    # -- deleting -------------------------------------------------------------------------

    def delete(self, ids: str | Sequence[str], *, dry_run: bool = False, grace_s: float = 3600) -> Cleanup:
        """Delete runs and sessions by id, then the images nothing refers to any more (see
        `prune` for which go at once). Every id is checked before anything is deleted.

        A run id deletes its thread: a generate, ground, ask or critique run with the runs
        that resumed it (or the run a resume finished); an edit run only when it is its
        session's one turn (a one-shot `edit`), else its session goes with `delete_session`.
        A session id deletes the session: its checkpoints (every branch) and its turns'
        traces.

        Raises:
            NotFoundError: an id is no run and no session.
            InvalidInputError: an id is one turn of a longer session; an empty id; or the
                home's store, runs folder or database set apart from it (`_check_own_home`).
            BusyError: a run is on a thread now (here or in another process).
        """
        from lavida_agent.traces import trace_files

        _check_seconds(grace_s)
        ids = [ids] if isinstance(ids, str) else list(ids)
        self._check_own_home()
        with self._maintenance(), _home_errors(self.settings):
            files = trace_files(self.settings.runs_dir) if self._home_exists() else []  # type: ignore[arg-type]
            threads = list(dict.fromkeys(self._thread_of(i, files) for i in ids))
            return self._delete(threads, files, dry_run=dry_run, grace_s=grace_s)

    def delete_run(self, run_id: str, *, dry_run: bool = False, grace_s: float = 3600) -> Cleanup:
        """`delete` of one run id.

        Raises:
            NotFoundError: no such run.
            InvalidInputError: the run is one turn of a longer session (delete the session).
            BusyError: a run is on its thread now (here or in another process).
        """
        from lavida_agent.traces import find_trace

        find_trace(run_id, self.settings.runs_dir)  # type: ignore[arg-type]
        return self.delete([run_id], dry_run=dry_run, grace_s=grace_s)

    def delete_session(self, session_id: str, *, dry_run: bool = False, grace_s: float = 3600) -> Cleanup:
        """`delete` of one session id: its checkpoints (every branch) and its turns' traces.

        Raises:
            NotFoundError: no such session.
            InvalidInputError: `session_id` is the thread of another workflow's run.
            BusyError: a turn (or an undo...) is on it now, here or in another process.
        """
        from lavida_agent.traces import trace_files

        _check_seconds(grace_s)
        self._check_own_home()
        with self._maintenance(), _home_errors(self.settings):
            files = trace_files(self.settings.runs_dir) if self._home_exists() else []  # type: ignore[arg-type]
            return self._delete([self._session_thread(session_id, files)], files, dry_run=dry_run, grace_s=grace_s)

    def prune(self, older_than: float | dt.timedelta, *, dry_run: bool = False,
              grace_s: float = 3600) -> Cleanup:  # fmt: skip
        """Delete every run and session last active more than `older_than` ago (seconds, or a
        `timedelta`; 0: all), except those with a run on them now, then the images nothing
        refers to any more, and compact the database.

        An image nothing refers to goes when it was last stored more than `grace_s` seconds
        ago, or, if it belonged to what was deleted, at once unless a run is in progress
        (here or in another process on this home): a run may have stored an image and not
        yet recorded it. `Cleanup.images_waiting` counts the images nothing refers to that
        stay for that reason; a `prune` after the grace takes them. A trace file that cannot
        be read is deleted when its file is as old.

        Raises:
            InvalidInputError: a negative or non-numeric `older_than` or `grace_s`, or the
                home's store, runs folder or database set apart from it.
        """
        if isinstance(older_than, dt.timedelta):
            older_than = older_than.total_seconds()
        _check_seconds(older_than, "older_than")
        _check_seconds(grace_s)
        self._check_own_home()
        if not self._home_exists():
            return Cleanup(dry_run=dry_run)
        with self._maintenance(), _home_errors(self.settings):
            return self._prune(older_than, dry_run=dry_run, grace_s=grace_s)

    def _prune(self, older_than: float, *, dry_run: bool, grace_s: float) -> Cleanup:
        from lavida_agent.graphs.persistence import compact, last_written
        from lavida_agent.traces import trace_files

        cutoff = time.time() - older_than
        last: dict[str, float] = {}
        files = trace_files(self.settings.runs_dir)  # type: ignore[arg-type]
        for f in files:
            key = f.thread_id if f.thread_id is not None else _UNREADABLE + f.run_id
            last[key] = max(last.get(key, 0.0), f.mtime)
        for thread in self._thread_ids():
            with map_exceptions():
                last[thread] = max(last.get(thread, 0.0), last_written(self.checkpointer, thread) or 0.0)
        old = sorted(t for t, when in last.items() if when < cutoff)
        out = self._delete(old, files, dry_run=dry_run, grace_s=grace_s, skip_busy=True)
        if not dry_run:
            with map_exceptions():
                out.bytes_freed += compact(self.checkpointer)
        return out

    def _runs_on(self, thread: str) -> list[str]:
        """The runs on `thread` now, of this agent or another process."""
        with self._active_lock:
            mine = [r for _, r in self._active.get(thread, ()) if r]
        other = live.holder(self.settings.runs_dir, thread) or {}  # type: ignore[arg-type]
        return list(dict.fromkeys([*mine, *other.get("run_ids", ())]))

    @contextlib.contextmanager
    def _maintenance(self) -> Iterator[None]:
        """A delete or prune in progress: `close` waits for it."""
        with self._active_lock:
            self._maintaining += 1
        try:
            yield
        finally:
            with self._active_lock:
                self._maintaining -= 1

    def _check_own_home(self) -> None:
        """Refuse to delete unless the store, runs folder and database are the home's own: what
        else refers to an image in a shared store, or which runs a database elsewhere holds,
        cannot be known from here."""
        s = self.settings
        apart = [f"{name} {str(path)!r}" for name, path, own in (
            ("artifacts_dir", s.artifacts_dir, s.home / "artifacts"), ("runs_dir", s.runs_dir, s.home / "runs"),
            ("db_path", s.db_path, s.home / "lavida.db"))
            if Path(str(path)).expanduser().absolute() != own]  # fmt: skip
        if apart:
            raise InvalidInputError(f"deleting works on a whole home (its own store, runs folder and database: what "
                                    f"else refers to their images cannot be known otherwise), and {', '.join(apart)} "
                                    f"is set apart from the home {str(s.home)!r}")  # fmt: skip

    def _home_exists(self) -> bool:
        """Has anything been written to the home (so that deleting need not create it)?"""
        s = self.settings
        return Path(str(s.db_path)).is_file() or Path(str(s.runs_dir)).is_dir() or Path(str(s.artifacts_dir)).is_dir()

    def _thread_of(self, ident: str, files: list[TraceFile]) -> str:
        """The thread that deleting run or session `ident` deletes (`files`: the traces)."""
        from lavida_agent.traces import find_trace

        _check_id(ident)
        try:
            path = find_trace(ident, self.settings.runs_dir)  # type: ignore[arg-type]
        except NotFoundError:
            try:
                return self._session_thread(ident, files)
            except NotFoundError:
                raise NotFoundError(f"no run or session {ident[:80]!r}") from None
        mine = next((f for f in files if f.path == path), None)
        if mine is None:
            raise NotFoundError(f"no run or session {ident[:80]!r}")  # written just now: not yet listed
        if mine.thread_id is None:  # a file that is no trace: the file alone goes
            return _UNREADABLE + ident
        if mine.workflow == "edit":
            turns = {f.origin for f in files if f.thread_id == mine.thread_id}
            if len(turns) > 1:
                raise InvalidInputError(f"run {ident} is one of {len(turns)} turns of session {mine.thread_id}: "
                                        "delete the session (all its turns) instead")  # fmt: skip
        return mine.thread_id

    def _session_thread(self, session_id: str, files: list[TraceFile]) -> str:
        """`session_id`, checked to be a session's thread (`files`: the traces)."""
        _check_id(session_id)
        if not self._home_exists():  # (asking the checkpointer would make the home)
            raise NotFoundError(f"no session {session_id[:80]!r}")
        session = self.session(session_id)
        if session.exists:
            return session_id
        turns = [f for f in files if f.thread_id == session_id]
        if any(f.workflow != "edit" for f in turns) or session_id in self._thread_ids():
            raise InvalidInputError(f"{session_id!r} is the thread of another workflow's run, not a "
                                    "session: delete that run by its run id")  # fmt: skip
        if not turns:
            if any(f.run_id == session_id for f in files):
                raise NotFoundError(f"no session {session_id!r}: it is a run (delete it as one)")
            raise NotFoundError(f"no session {session_id[:80]!r}")
        return session_id

    def _thread_ids(self) -> set[str]:
        from lavida_agent.graphs.persistence import thread_ids

        if not self._home_exists():
            return set()
        with map_exceptions():
            return thread_ids(self.checkpointer)

    def _delete(self, threads: Sequence[str], files: list[TraceFile], *, dry_run: bool, grace_s: float,
                skip_busy: bool = False) -> Cleanup:  # fmt: skip
        """Delete `threads` (`files`: the traces as read; `_UNREADABLE` + a run id: that
        unreadable trace file alone), then sweep the store. Each thread is held against runs
        while it goes; without `skip_busy` every one is held first, so a busy one refuses
        the whole call before anything goes (with it, a busy one is kept and said)."""
        from lavida_agent.graphs.persistence import referenced_shas
        from lavida_agent.traces import trace_files

        out = Cleanup(dry_run=dry_run)
        started = time.time()  # an image stored since is a run's own, whatever it was before
        with map_exceptions():
            held = referenced_shas(self.checkpointer, threads=threads)  # the images their states name
        gone: set[str] = set()  # the threads deleted
        gone_files: set[Path] = set()  # and their traces

        def hold(thread: str) -> contextlib.AbstractContextManager[None]:
            return self._on_thread(thread, None, f"thread {thread!r}", alone=True, doing="a delete")

        by_thread: dict[str, list[TraceFile]] = {}
        for f in files:
            by_thread.setdefault(_UNREADABLE + f.run_id if f.thread_id is None else f.thread_id, []).append(f)
        with contextlib.ExitStack() as holding:
            if not skip_busy:
                for thread in threads:
                    holding.enter_context(hold(thread))
            for thread in threads:
                unreadable = thread.startswith(_UNREADABLE)
                mine = by_thread.get(thread, [])
                try:
                    with hold(thread) if skip_busy else contextlib.nullcontext():
                        if not dry_run:
                            if not unreadable:
                                with map_exceptions():
                                    self.checkpointer.delete_thread(thread)
                            for f in mine:
                                f.path.unlink(missing_ok=True)
                except BusyError:
                    out.busy.append(thread)
                    out.busy_runs += self._runs_on(thread)
                    continue
                gone.add(thread)
                gone_files.update(f.path for f in mine)
                if not unreadable:
                    out.threads.append(thread)
                out.runs += [f.run_id for f in mine]
                out.bytes_freed += sum(f.size for f in mine)
        theirs = set().union(*(held.get(t, ()) for t in gone), *(f.shas for f in files if f.path in gone_files))
        with self._active_lock:
            running = bool(self._active)
        running = running or bool(live.holders(self.settings.runs_dir))  # type: ignore[arg-type]
        with map_exceptions():  # read again: what runs wrote meanwhile is kept too
            held = referenced_shas(self.checkpointer)
        files = trace_files(self.settings.runs_dir)  # type: ignore[arg-type]
        keep = set().union(*(shas for t, shas in held.items() if t not in gone),
                           *(f.shas for f in files if f.path not in gone_files))  # fmt: skip
        swept = self.store.sweep(keep, older_than_s=grace_s, also=set() if running else theirs - keep,
                                 also_before=started, dry_run=dry_run)  # fmt: skip
        out.images, out.images_waiting = swept.removed, swept.waiting
        out.bytes_freed += swept.freed
        return out

    # -- async twins ----------------------------------------------------------------------

    async def agenerate(self, prompt: str, **kwargs: Any) -> GenerateResult:
        """`generate` in a worker thread; cancelling the task stops the run."""
        return await _in_thread(self.generate, prompt, **kwargs)

    async def aedit(self, image: ImageInput, instruction: str, **kwargs: Any) -> EditResult:
        """`edit` in a worker thread; cancelling the task stops the run."""
        return await _in_thread(self.edit, image, instruction, **kwargs)

    async def aground(
        self, image: ImageInput, expressions: str | Sequence[str], **kwargs: Any
    ) -> GroundResult:
        """`ground` in a worker thread."""
        return await _in_thread(self.ground, image, expressions, **kwargs)

    async def aask(self, image: ImageInput, question: str, **kwargs: Any) -> AskResult:
        """`ask` in a worker thread."""
        return await _in_thread(self.ask, image, question, **kwargs)

    async def aresume(self, run_id: str, **kwargs: Any) -> GenerateResult | EditResult:
        """`resume` in a worker thread; cancelling the task stops the run."""
        return await _in_thread(self.resume, run_id, **kwargs)

    async def acritique(self, image: ImageInput, prompt: str, **kwargs: Any) -> CritiqueResult:
        """`critique` in a worker thread."""
        return await _in_thread(self.critique, image, prompt, **kwargs)


async def run_with_events(
    start: Callable[[EventCallback], Awaitable[R]], *, heartbeat_s: float | None = None
) -> AsyncIterator[tuple[str, Any]]:
    """Run `start(on_event)` (an async twin given its `on_event`) and yield `("event", ev)`
    per workflow event, in order, `("ping", None)` after `heartbeat_s` of silence, and last
    `("result", result)` (or raise the run's error).

    `on_event` is called from the worker thread; the events reach the loop through a queue.
    Closing the iterator (a client gone, a cancelled call) cancels the run and waits until it
    has stopped, so a caller holding a session's lock does not release it early.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def on_event(ev: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    task = asyncio.ensure_future(start(on_event))
    task.add_done_callback(lambda _: queue.put_nowait(None))  # after every event it sent
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=heartbeat_s)
            except TimeoutError:
                yield "ping", None
                continue
            if ev is None:
                break
            yield "event", ev
        yield "result", task.result()
    finally:
        if not task.done():
            task.cancel()  # the async twin sets the run's cancel event
            await _stopped(task)
            if not task.cancelled():
                task.exception()  # retrieved: the run's own interruption is not logged


async def _stopped(fut: asyncio.Future[Any]) -> None:
    """Wait until `fut` is done, however often this waiter is cancelled meanwhile."""
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([fut])


async def _in_thread(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """Run `fn(*args, cancel=event, **kwargs)` in the runs' thread pool; on task cancellation
    set the event (the run stops at its next engine call or sampler step), wait until the
    run has stopped, and re-raise (the `CancelledError` carries the stopped run's `run_id`).

    Waiting matters: a caller that holds a lock around this call (a session's turn) must not
    release it while the run is still writing checkpoints, or the next turn on that session
    would interleave with it and the last writer's checkpoint would hide the other's edit.
    """
    cancel = kwargs.pop("cancel", None) or threading.Event()
    loop = asyncio.get_running_loop()
    # run_in_executor (not to_thread): no contextvars are copied, so a run started from inside
    # another LangGraph node is not mistaken for a subgraph of it.
    fut = loop.run_in_executor(_run_pool(), functools.partial(fn, *args, cancel=cancel, **kwargs))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError as exc:
        cancel.set()
        await _stopped(fut)
        error = None if fut.cancelled() else fut.exception()  # retrieved, so not logged
        if getattr(error, "run_id", None):  # the stopped run, resumable: say which it was
            exc.run_id = error.run_id  # type: ignore[attr-defined, union-attr]
            raise exc from error
        raise


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
RUN_THREADS = 64
"""Threads of the pool the `a*` twins run in (their own: the event loop's default executor,
a few threads, would queue runs behind each other and stall the app's own `to_thread` and
DNS lookups). A run's thread mostly waits for the engine, which batches across them."""


def _run_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(RUN_THREADS, thread_name_prefix="lavida-run")
        return _POOL


_RECORDED_KNOBS = ("iou_threshold", "grounding_check", "stray_check", "plan_retries", "selection",
                   "rank_by", "critique_by", "answer_by", "ground_by")  # fmt: skip
"""Context knobs a trace records (`settings`) and a resume restores."""


def _to_input_box(box: list[float], params: LetterboxParams, w: int, h: int) -> list[float]:
    """A canvas box mapped back to input pixels, clipped to the image, rounded to 0.01 px."""
    b = from_letterbox(box, params).clip(w, h)
    return [round(v, 2) for v in b.as_tuple()]


def _busy_here(what: str, on: list[tuple[str, str | None]]) -> BusyError:
    """The refusal for a thread this agent has something on (the first of `on`)."""
    return BusyError(f"{what} is running now ({on[0][0]}): try again when it ends")


def _load_engine(settings: Settings) -> tuple[Engine, bool]:
    """The real engine for `settings` and whether the caller owns it (torch is imported here only).

    Default device, dtype and grounding use `graphs.engine.load_engine`, cached per model
    path and shared by every agent of the process, so not owned: closing one agent must not
    close it under the others. Any other device/dtype/`ground_views`/`ground_candidates` builds a
    `BatchingEngine(PipelineBackend(pipeline))` of the caller's own.
    """
    path = settings.model_path
    where = repr(path) if path else "the embedded checkpoint"
    if path is not None and not Path(path).expanduser().exists():
        raise ModelLoadError(f"no checkpoint at {path!r}")
    try:
        own_read = settings.ground_candidates is not None or settings.ground_views is not None
        if settings.device is None and settings.dtype == "float32" and not own_read:
            from lavida_agent.graphs.engine import EngineUnavailableError, load_engine

            try:
                return load_engine(path), False
            except EngineUnavailableError as exc:  # its hint is for graph callers; say the cause
                cause = exc.__cause__ or exc
                raise ModelLoadError(f"cannot load the model from {where}: {type(cause).__name__}: "
                                     f"{cause}") from exc  # fmt: skip
        import torch

        from lavida_agent.graphs.pipeline_backend import PipelineBackend  # type: ignore
        from lavida_agent.graphs.runtime import BatchingEngine
        from lavida_agent.model.pipeline_lavida import LavidaPipeline

        pipe = LavidaPipeline.from_pretrained(path, device=settings.device,
                                              dtype=getattr(torch, settings.dtype))  # fmt: skip
        if settings.ground_candidates is not None:  # branches on the image alone, unless views too
            pipe.defaults = {**pipe.defaults, "ground_candidates": settings.ground_candidates, "ground_views": 1}
        if settings.ground_views is not None:
            pipe.defaults = {**pipe.defaults, "ground_views": settings.ground_views}
        engine: Engine = BatchingEngine(PipelineBackend(pipe))
        return engine, True
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model from {where}: {exc}") from exc


# ----------------------------------------------------------------------------------------
# Sessions
# ----------------------------------------------------------------------------------------


class Session:
    """A multi-step edit session (one LangGraph thread): edit, history, undo, redo, branch, resume.

    Get one with `agent.session()` (new) or `agent.session(thread_id)` (resume: the state is
    in the SQLite database, so this works across processes).
    """

    def __init__(self, agent: LavidaAgent, thread_id: str) -> None:
        from lavida_agent.graphs.session import EditSession

        if not isinstance(thread_id, str) or not thread_id.strip():
            raise InvalidInputError(f"not a session id: {thread_id!r}")
        self.agent = agent
        self.thread_id = thread_id
        self._session = EditSession(thread_id, checkpointer=agent.checkpointer,
                                    context=Context(artifacts=agent.store))  # fmt: skip

    def __repr__(self) -> str:
        return f"Session({self.thread_id!r})"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    # -- reading --------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """True once the session has a checkpoint (started or edited). The thread of another
        workflow's run (a `generate` run's `thread_id`) is not a session."""
        return "instruction" in self._session.graph.get_state(self._session.config).values

    def _require(self) -> None:
        if not self.exists:
            raise NotFoundError(f"no session {self.thread_id!r}")

    def _refuse_foreign(self) -> None:
        """Refuse to write a session onto the thread of another workflow's run (a generate
        run's `thread_id`): its checkpoints would be overwritten and its run lost."""
        snapshot = self._session.graph.get_state(self._session.config)
        if snapshot.config.get("configurable", {}).get("checkpoint_id") and "instruction" not in snapshot.values:
            raise InvalidInputError(f"{self.thread_id!r} is the thread of another workflow's run (generate, "
                                    "ground, ask or critique), not a session: start a session under a new id")  # fmt: skip

    def state(self) -> EditState:
        """The session's state on its current branch."""
        self._require()
        with map_exceptions():
            return EditState.model_validate(
                {"instruction": "", **self._session.graph.get_state(self._session.config).values}
            )

    @property
    def current(self) -> ImageRef | None:
        """The session's current image (None before the first image)."""
        return self.state().current if self.exists else None

    def current_image(self, *, crop: bool = False) -> np.ndarray:
        """The current image as an array (the canvas); with `crop`, without the letterbox
        bars of a non-square input (in the shape of the image the session started from)."""
        st = self.state() if self.exists else None  # read once
        if st is None or st.current is None:
            raise InvalidInputError(f"session {self.thread_id!r} has no image yet")
        with map_exceptions():
            image = self.agent.store.open(st.current)
        frame = _unframe(st.frame) if crop else None
        if frame is None:
            return image
        (lb, (w, h)) = frame
        x0, y0, x1, y1 = lb.content_box(w, h)
        return image[y0:y1, x0:x1]

    def history(self) -> list[EditStep]:
        """The turns that made the current image, oldest first (one per turn; a restart from
        a new image begins a new history)."""
        from lavida_agent.graphs.session import committed

        return committed(self.state())

    def steps(self) -> list[EditStep]:
        """Every verified attempt of the current branch's lineage, in order."""
        return list(self.state().steps)

    def lineage(self, *, all_branches: bool = False) -> dict[str, Any]:
        """The lineage DAG as node-link JSON (nodes: image sha256; edges: edit steps)."""
        import networkx as nx

        from lavida_agent.graphs.session import lineage_json

        self._require()
        if not all_branches:
            st = self.state()
            return lineage_json(st.steps, st.heads)
        data: dict[str, Any] = nx.node_link_data(self._session.lineage(all_branches=True),
                                                 edges="edges")  # fmt: skip
        return data

    # -- writing --------------------------------------------------------------------------

    def start(self, image: ImageInput) -> ImageRef:
        """Start (or restart) the session from `image` (letterboxed); returns its ref."""
        self._refuse_foreign()
        _, ref, params, size = self.agent._prepare_image(image)
        with self._alone("a restart"), map_exceptions():
            self._session.graph.update_state(
                self._session.config,
                {"instruction": "", "current": ref, "current_step": None, "image": None,
                 "candidate": None, "accepted": False, "undone": [],  # a restart ends redo
                 "run_id": None, "frame": _frame(params, size)},  # ... and any unfinished turn
                as_node="commit_edit",
            )  # fmt: skip
        return ref

    def edit(
        self,
        instruction: str,
        *,
        image: ImageInput | None = None,
        seed: int | None = None,
        rounds: int | None = None,
        num_steps: int | None = None,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> EditResult:
        """Run one turn: edit the current image (or `image`, which (re)starts the session).
        Turns of one session called from several threads run one after another, each on the
        result of the one before.

        Raises:
            InvalidInputError: an empty instruction, or no image yet in the session.
        """
        self.agent._check_text("instruction", instruction)
        with self.agent._turn(self.thread_id):  # turns of one session run one after another
            return self._run_turn(instruction, image, seed, rounds, num_steps, on_event, cancel)

    def _run_turn(self, instruction: str, image: ImageInput | None, seed: int | None, rounds: int | None,
              num_steps: int | None, on_event: EventCallback | None,
              cancel: threading.Event | None) -> EditResult:  # fmt: skip
        self._refuse_foreign()
        agent = self.agent
        base_seed = agent._seed(seed)
        ref, frame = None, None
        if image is not None:
            _, ref, params, size = agent._prepare_image(image)
            frame = _frame(params, size)
        elif not self.exists:
            raise InvalidInputError(
                f"session {self.thread_id!r} has no image: start it with an image first"
            )
        context = agent._context(num_steps=num_steps, rounds=rounds, cancel=cancel)
        st = self.state() if self.exists else None
        # `image` always goes in (None: edit the current image), so a turn that restarted
        # from an image and never committed cannot leave that image as this turn's source.
        payload: dict[str, Any] = {"instruction": instruction, "seed": base_seed, "image": ref}
        if image is not None:  # the session's letterbox is now this image's
            payload["frame"] = frame
        before = len(st.steps) if st is not None else 0
        inputs = {"instruction": instruction, "image": ref, "seed": base_seed,
                  "rounds": context.max_rounds, "num_steps": context.num_steps,
                  "steps_before": before}  # fmt: skip
        framed = _unframe(frame if image is not None else st.frame if st is not None else None)
        if framed is not None:
            inputs.update(_placed(framed[0], *framed[1]))
        return self._edit(context, payload, inputs, on_event, before=before)

    def _edit(self, context: Context, payload: Any, inputs: dict[str, Any],
              on_event: EventCallback | None, *, before: int | None = None,
              resume: bool = False) -> EditResult:  # fmt: skip
        """Run (or, with `resume`, finish) one turn; its attempts are the steps after the
        first `before` (default: those of the turn the state is on)."""
        agent = self.agent
        instruction = inputs["instruction"]

        def lineage(values: dict[str, Any]) -> dict[str, Any]:
            from lavida_agent.graphs.session import lineage_json

            return lineage_json(values.get("steps", []), values.get("heads", []))

        if before is None:
            turn = self.state().turn
            before = sum(1 for step in self.state().steps if step.turn < turn)
        run_id, values, trace, path = agent._run(
            "edit", self._session.graph, payload, thread_id=self.thread_id, context=context,
            inputs=inputs, on_event=on_event, lineage=lineage, resume=resume)  # fmt: skip
        st = EditState.model_validate({"instruction": instruction, **values})
        base_seed = inputs.get("seed") or 0
        attempts = st.steps[before:]
        if st.current is None:
            raise WorkflowError(f"edit run {run_id} left the session without an image")
        with map_exceptions():
            pixels = agent.store.open(st.current)
        plan = attempts[-1].plan if attempts else None
        lb = _unframe(st.frame)
        return EditResult(
            image=pixels, image_ref=st.current, layout=list(plan.layout) if plan else [],
            attempts=attempts, critiques=[s.critique for s in attempts if s.critique],
            run_id=run_id, thread_id=self.thread_id, trace=trace, trace_path=path,
            store=agent.store, instruction=instruction, seed=base_seed,
            source_ref=attempts[0].parent if attempts else None, plan=plan,
            accepted=st.accepted, step=st.current_step,
            letterbox=lb[0] if lb else None, letterbox_source=lb[1] if lb else None,
            max_rounds=context.max_rounds,
            kept=next((a.round for a in attempts if a.index == st.current_step), None),
        )  # fmt: skip

    async def aedit(self, instruction: str, **kwargs: Any) -> EditResult:
        """`edit` in a worker thread; cancelling the task stops the run."""
        return await _in_thread(self.edit, instruction, **kwargs)

    def undo(self) -> ImageRef:
        """Go back one turn (a new branch; the old one stays in the history). Returns the
        new current image.

        Raises:
            InvalidInputError: nothing to undo.
        """
        return self._move("an undo", lambda session: session.undo())

    def redo(self) -> ImageRef:
        """Return to where the last `undo` or `branch` left from (a new branch again).
        Returns the new current image.

        Raises:
            InvalidInputError: nothing to redo (no undo or branch since the last edit).
        """
        return self._move("a redo", lambda session: session.redo())

    def _alone(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """The session held for a change that is no run (`doing`: "an undo"): refused while
        a run is on it, here or in another process."""
        return self.agent._on_thread(self.thread_id, None, f"session {self.thread_id!r}",
                                     alone=True, doing=doing)

    def _move(self, doing: str, how: Callable[[Any], Any]) -> ImageRef:
        """`how(graph session)` (`doing`: an undo, a redo, a branch), alone on the session;
        the new current image."""
        self._require()
        with self._alone(doing), map_exceptions():
            how(self._session)
        ref = self.current
        assert ref is not None
        return ref

    def branch(self, step: int, *, image: str | None = None) -> ImageRef:
        """Make lineage step `step`'s image current (a new branch). Returns that image.

        Step numbers are per branch: after a branch, two steps `2` may exist. `image` (a
        sha256, or a prefix of one) picks the step `step` whose result is that image, on
        whichever branch holds it (a step a result reported, e.g. `EditResult.image_ref`).

        Raises:
            InvalidInputError: no such step on this branch (with `image`: on any branch).
        """
        self._require()
        n = len(self.state().steps)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidInputError(f"step must be a lineage index (an int >= 0), got {step!r}")
        if image is None and step >= n:
            raise InvalidInputError(f"no step {step!r} on the current branch of session {self.thread_id!r} "
                                    f"(steps 0..{n - 1}; a step of another branch is named with its image: "
                                    "`image=`, `--image` in the CLI)" if n else "the session's current branch has no "
                                    "steps (it is at its input image): name a step of another branch by its "
                                    "image (`image=`, `--image` in the CLI)")  # fmt: skip
        if image is None:
            return self._move("a branch", lambda session: session.branch(step))
        prefix = image.lower() if isinstance(image, str) else ""
        if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
            raise InvalidInputError(f"image must be a sha256 or a prefix of one (4 or more hex "
                                    f"digits), got {image!r}")  # fmt: skip
        found: dict[str, Any] = {}  # image -> the newest checkpoint whose step `step` it is
        for snap in self._session.snapshots():  # newest first
            steps = EditState.model_validate({"instruction": "", **snap.values}).steps
            if len(steps) > step and steps[step].result.sha256.startswith(prefix):
                found.setdefault(steps[step].result.sha256, snap.config)
        if not found:
            raise InvalidInputError(f"no step {step} with image {image!r} in session {self.thread_id!r}")
        if len(found) > 1:
            raise InvalidInputError(f"image {image!r} matches {len(found)} images of step {step}: "
                                    "give more of its sha256")  # fmt: skip
        [config] = found.values()
        return self._move("a branch", lambda session: session.branch(step, at=config))
