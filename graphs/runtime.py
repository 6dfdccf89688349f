"""The batching runtime: many concurrent graph runs, one model, batched forwards.

`BatchingEngine(backend)` implements the `Engine` protocol for any number of callers (threads,
or asyncio tasks through the async `a*` helpers) while one worker thread owns the backend.
Each engine call becomes a request; the worker collects requests for up to `max_wait_ms`,
takes the oldest one and every queued request *compatible* with it (same method, same
`batch_key()`, e.g. the same `num_steps`), at most `max_batch`, and makes one backend call
for all of them. Results and exceptions go back to the right caller.

The batched backend protocol (`BatchedBackend`): one method per engine method, each taking a
list of requests and returning a list of the same length and order; a row may be an
`Exception` instance to fail that row only, and an exception raised by the call fails every
row. Every request carries its own seed: the backend must draw each row from its own
generator (`torch.Generator().manual_seed(request.seed)`), never from a shared one; with a
pipeline that computes each row as it would alone (`LavidaPipeline` does, bit for bit:
`model/batch_invariant.py`), a batched result then equals the unbatched one.

Sampler step events are delivered in the *caller's* thread (the blocking engine methods
drain them while they wait), so `on_step` may use thread-bound things such as LangGraph's
stream writer. Cancelling a pending request (`PendingRequest.cancel()`, or cancelling the
awaiting asyncio task) drops it before it reaches the backend; a request already running
runs on while any other request of its batch is still wanted, and a batch whose every
request was abandoned stops at its next step (a backend with an `interrupt` hook). `close()`
stops the worker: queued requests are run first (`cancel_pending=False`) or cancelled.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from lavida_agent.graphs.engine import (
    BoxList,
    CritiqueResult,
    EditPlanResult,
    PlanItem,
    StepCallback,
    StepEvent,
    Surprise,
)

logger = logging.getLogger(__name__)
BATCHES_KEPT = 10_000  # `BatchingEngine.batches` keeps this many of its latest calls

__all__ = (
    "AnswerRequest",
    "BatchedBackend",
    "BatchingEngine",
    "CritiqueRequest",
    "EditRequest",
    "EngineClosedError",
    "GenerateRequest",
    "GroundRequest",
    "PendingRequest",
    "PlanEditRequest",
    "NounFitRequest",
    "PlanFitRequest",
    "PlanLayoutRequest",
    "RegenerateRegionsRequest",
    "Request",
    "SurpriseRequest",
)

T = TypeVar("T")

# ----------------------------------------------------------------------------------------
# Requests: one frozen dataclass per engine method
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Request:
    """Base of all requests. `batch_key()` says which requests may share a backend call."""

    method = ""

    def batch_key(self) -> Hashable:
        """Requests of the same method with equal keys are batched together."""
        return None


@dataclass(frozen=True, kw_only=True)
class PlanLayoutRequest(Request):
    """`Engine.plan_layout` as a request."""

    method = "plan_layout"
    prompt: str
    seed: int
    temperature: float = 0.0

    def batch_key(self) -> Hashable:
        return self.temperature  # one planner call decodes at one temperature


@dataclass(frozen=True, kw_only=True)
class GenerateRequest(Request):
    """`Engine.generate` as a request (batched by `num_steps`)."""

    method = "generate"
    prompt: str
    plan: list[PlanItem] | None
    seed: int
    num_steps: int
    feedback: list[str] | None = None
    on_step: StepCallback | None = field(default=None, compare=False)

    def batch_key(self) -> Hashable:
        return self.num_steps


@dataclass(frozen=True, kw_only=True)
class RegenerateRegionsRequest(Request):
    """`Engine.regenerate_regions` as a request (batched by `num_steps`)."""

    method = "regenerate_regions"
    image: np.ndarray = field(compare=False)
    prompt: str
    plan: list[PlanItem] | None
    boxes: list[BoxList]
    seed: int
    num_steps: int
    on_step: StepCallback | None = field(default=None, compare=False)

    def batch_key(self) -> Hashable:
        return self.num_steps


@dataclass(frozen=True, kw_only=True)
class CritiqueRequest(Request):
    """`Engine.critique` as a request."""

    method = "critique"
    image: np.ndarray = field(compare=False)
    prompt: str


@dataclass(frozen=True, kw_only=True)
class PlanFitRequest(Request):
    """`Engine.plan_fit` as a request."""

    method = "plan_fit"
    image: np.ndarray = field(compare=False)
    prompt: str
    plan: list[PlanItem]


@dataclass(frozen=True, kw_only=True)
class SurpriseRequest(Request):
    """`Engine.surprise` as a request."""

    method = "surprise"
    image: np.ndarray = field(compare=False)
    prompt: str
    plan: list[PlanItem]


@dataclass(frozen=True, kw_only=True)
class NounFitRequest(Request):
    """`Engine.noun_fit` as a request."""

    method = "noun_fit"
    image: np.ndarray = field(compare=False)
    items: list[PlanItem]
    contrast: bool = False

    def batch_key(self) -> Hashable:
        return self.contrast


@dataclass(frozen=True, kw_only=True)
class GroundRequest(Request):
    """`Engine.ground` as a request."""

    method = "ground"
    image: np.ndarray = field(compare=False)
    expressions: list[str]
    candidates: int | None = None
    views: int | None = None

    def batch_key(self) -> Hashable:
        return (self.candidates, self.views)  # one pipeline call reads one way


@dataclass(frozen=True, kw_only=True)
class AnswerRequest(Request):
    """`Engine.answer` as a request."""

    method = "answer"
    image: np.ndarray = field(compare=False)
    question: str


@dataclass(frozen=True, kw_only=True)
class PlanEditRequest(Request):
    """`Engine.plan_edit` as a request."""

    method = "plan_edit"
    image: np.ndarray = field(compare=False)
    instruction: str


@dataclass(frozen=True, kw_only=True)
class EditRequest(Request):
    """`Engine.edit` as a request (batched by `num_steps`)."""

    method = "edit"
    image: np.ndarray = field(compare=False)
    instruction: str
    plan: EditPlanResult | None
    seed: int
    num_steps: int
    on_step: StepCallback | None = field(default=None, compare=False)

    def batch_key(self) -> Hashable:
        return self.num_steps


class BatchedBackend(Protocol):
    """What `BatchingEngine` drives: list of requests in, list of results (same order) out.

    A row may be an `Exception` instance (that caller gets it raised). Each row must be
    sampled with its own generator seeded from `request.seed`; `on_step` of a row, when set,
    is called with that row's `StepEvent`s.
    """

    def plan_layout(self, requests: Sequence[PlanLayoutRequest]) -> Sequence[Any]: ...
    def generate(self, requests: Sequence[GenerateRequest]) -> Sequence[Any]: ...
    def regenerate_regions(
        self, requests: Sequence[RegenerateRegionsRequest]
    ) -> Sequence[Any]: ...
    def critique(self, requests: Sequence[CritiqueRequest]) -> Sequence[Any]: ...
    def plan_fit(self, requests: Sequence[PlanFitRequest]) -> Sequence[Any]: ...
    def surprise(self, requests: Sequence[SurpriseRequest]) -> Sequence[Any]: ...
    def noun_fit(self, requests: Sequence[NounFitRequest]) -> Sequence[Any]: ...
    def ground(self, requests: Sequence[GroundRequest]) -> Sequence[Any]: ...
    def answer(self, requests: Sequence[AnswerRequest]) -> Sequence[Any]: ...
    def plan_edit(self, requests: Sequence[PlanEditRequest]) -> Sequence[Any]: ...
    def edit(self, requests: Sequence[EditRequest]) -> Sequence[Any]: ...


class EngineClosedError(RuntimeError):
    """A request was submitted to (or left pending in) a closed `BatchingEngine`."""


class PendingRequest(concurrent.futures.Future):  # type: ignore[type-arg]
    """A submitted request: a `concurrent.futures.Future` of its result.

    `cancel()` drops a request that has not started; `abandon()` also marks a running one as
    wanted by no one, and a batch whose every request is abandoned stops at its next step
    (a backend with an `interrupt` hook: `BatchingEngine`)."""

    def __init__(self, request: Request) -> None:
        super().__init__()
        self.request = request
        self.key: tuple[str, Hashable] = (request.method, request.batch_key())
        self.submitted_at = time.monotonic()
        self.abandoned = False

    def abandon(self) -> None:
        """Cancel the request, or, once it runs, let its batch stop if no one else waits."""
        self.abandoned = True
        self.cancel()


# ----------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------


class BatchingEngine:
    """An `Engine` for concurrent callers, batching compatible requests into backend calls.

    A backend with an `interrupt` attribute (`PipelineBackend`) gets the engine's check: a
    running batch stops at its next step once every request in it is abandoned (each
    caller stopped waiting: `call` interrupted, `asubmit` cancelled) or the engine closes
    with `cancel_pending` (and at interpreter exit, which closes every engine that way, so
    no worker is left computing while the process ends).

    Args:
        backend: a `BatchedBackend` (owned by the worker thread from now on).
        max_batch: most requests per backend call.
        max_wait_ms: how long the worker waits, after the oldest request arrived, for more
            compatible requests before it calls the backend with what it has.
        name: worker thread name.
    """

    def __init__(
        self,
        backend: BatchedBackend,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        name: str = "lavida-batching-engine",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._pending: list[PendingRequest] = []
        self._cond = threading.Condition()
        self._closing = False
        self._cancel_pending = False
        self._running: list[PendingRequest] = []  # the batch in the backend now
        self.batches: collections.deque[tuple[str, int]] = collections.deque(maxlen=BATCHES_KEPT)
        """(method, size) of the last `BATCHES_KEPT` backend calls, for inspection (bounded:
        an engine serves a process for as long as it lives)."""
        self.calls = 0
        """Backend calls made, all of them."""
        # The backend's own hook is kept apart the first time, so an engine built later on
        # the same backend checks it, not a closed engine's hook as well.
        self._hooked = hasattr(backend, "interrupt")
        if self._hooked:
            own = getattr(backend, "_own_interrupt", backend.interrupt)
            backend._own_interrupt = own  # type: ignore[attr-defined]
            backend.interrupt = (self.stopping if own is None  # type: ignore[attr-defined]
                                 else lambda: bool(own()) or self.stopping())  # fmt: skip
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()
        _OPEN.add(self)

    @property
    def canvas(self) -> int | None:
        """The backend's canvas side in pixels, when it says one (plan boxes must fit it)."""
        return getattr(self.backend, "canvas", None)

    def stopping(self) -> bool:
        """Should the running batch stop now: every request of it abandoned, or the engine
        closing with `cancel_pending`."""
        running = self._running
        return (self._closing and self._cancel_pending) or (
            bool(running) and all(p.abandoned for p in running))

    # -- lifecycle ------------------------------------------------------------------------

    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests and stop the worker.

        Args:
            cancel_pending: cancel queued requests instead of running them first.
            timeout: seconds to wait for the worker to finish (None: wait).
        """
        with self._cond:
            self._closing = True
            self._cancel_pending = cancel_pending
            self._cond.notify_all()
        _OPEN.discard(self)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        if self._hooked and not self._worker.is_alive():  # give the backend its own hook back
            self.backend.interrupt = self.backend._own_interrupt  # type: ignore[attr-defined]

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closing

    def __enter__(self) -> BatchingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting -----------------------------------------------------------------------

    def submit(self, request: Request) -> PendingRequest:
        """Queue `request`; returns a future of its result (thread-safe, non-blocking).

        `on_step` callbacks of a request submitted this way run in the worker thread.

        Raises:
            EngineClosedError: the engine is closed.
        """
        if not hasattr(self.backend, request.method):
            raise ValueError(f"the backend has no method {request.method!r}")
        pending = PendingRequest(request)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the batching engine is closed")
            self._pending.append(pending)
            self._cond.notify_all()
        return pending

    async def asubmit(self, request: Request) -> Any:
        """Await the result of `request`; cancelling the awaiting task abandons the request."""
        pending = self.submit(request)
        try:
            return await asyncio.wrap_future(pending)
        except asyncio.CancelledError:
            pending.abandon()
            raise

    def call(self, request: Request, on_step: StepCallback | None = None) -> Any:
        """Submit `request` and block for its result, running `on_step` in this thread.

        If this thread is interrupted (e.g. `KeyboardInterrupt`) the request is cancelled.
        """
        events: queue.SimpleQueue[StepEvent | None] = queue.SimpleQueue()
        if on_step is not None:
            request = _with_on_step(request, events.put)
        pending = self.submit(request)
        pending.add_done_callback(lambda _: events.put(None))
        try:
            while (ev := events.get()) is not None:
                if on_step is not None:
                    on_step(ev)
        except BaseException:
            pending.abandon()
            raise
        return pending.result()

    # -- the Engine protocol --------------------------------------------------------------

    def plan_layout(self, prompt: str, *, seed: int, temperature: float = 0.0) -> list[PlanItem]:
        """See `Engine.plan_layout`."""
        request = PlanLayoutRequest(prompt=prompt, seed=seed, temperature=temperature)
        result: list[PlanItem] = self.call(request)
        return result

    def generate(
        self,
        prompt: str,
        *,
        plan: list[PlanItem] | None,
        seed: int,
        num_steps: int,
        feedback: list[str] | None = None,
        on_step: StepCallback | None = None,
    ) -> np.ndarray:
        """See `Engine.generate`."""
        req = GenerateRequest(prompt=prompt, plan=plan, seed=seed, num_steps=num_steps,
                              feedback=feedback)  # fmt: skip
        image: np.ndarray = self.call(req, on_step)
        return image

    def regenerate_regions(
        self,
        image: np.ndarray,
        prompt: str,
        *,
        plan: list[PlanItem] | None,
        boxes: list[BoxList],
        seed: int,
        num_steps: int,
        on_step: StepCallback | None = None,
    ) -> np.ndarray:
        """See `Engine.regenerate_regions`."""
        req = RegenerateRegionsRequest(image=image, prompt=prompt, plan=plan, boxes=boxes,
                                       seed=seed, num_steps=num_steps)  # fmt: skip
        out: np.ndarray = self.call(req, on_step)
        return out

    def critique(self, image: np.ndarray, prompt: str) -> CritiqueResult:
        """See `Engine.critique`."""
        result: CritiqueResult = self.call(CritiqueRequest(image=image, prompt=prompt))
        return result

    def plan_fit(self, image: np.ndarray, prompt: str, *, plan: list[PlanItem]) -> list[float]:
        """See `Engine.plan_fit`."""
        scores: list[float] = self.call(PlanFitRequest(image=image, prompt=prompt, plan=plan))
        return scores

    def surprise(self, image: np.ndarray, prompt: str, *, plan: list[PlanItem]) -> Surprise:
        """See `Engine.surprise`."""
        result: Surprise = self.call(SurpriseRequest(image=image, prompt=prompt, plan=plan))
        return result

    def noun_fit(self, image: np.ndarray, items: list[PlanItem], *, contrast: bool = False) -> list[float]:
        """See `Engine.noun_fit`."""
        scores: list[float] = self.call(NounFitRequest(image=image, items=items, contrast=contrast))
        return scores

    def ground(
        self, image: np.ndarray, expressions: list[str], *, candidates: int | None = None,
        views: int | None = None,
    ) -> list[BoxList]:
        """See `Engine.ground`."""
        request = GroundRequest(image=image, expressions=expressions, candidates=candidates, views=views)
        boxes: list[BoxList] = self.call(request)
        return boxes

    def answer(self, image: np.ndarray, question: str) -> str:
        """See `Engine.answer`."""
        text: str = self.call(AnswerRequest(image=image, question=question))
        return text

    def plan_edit(self, image: np.ndarray, instruction: str) -> EditPlanResult:
        """See `Engine.plan_edit`."""
        plan: EditPlanResult = self.call(PlanEditRequest(image=image, instruction=instruction))
        return plan

    def edit(
        self,
        image: np.ndarray,
        instruction: str,
        *,
        plan: EditPlanResult | None,
        seed: int,
        num_steps: int,
        on_step: StepCallback | None = None,
    ) -> np.ndarray:
        """See `Engine.edit`."""
        req = EditRequest(image=image, instruction=instruction, plan=plan, seed=seed,
                          num_steps=num_steps)  # fmt: skip
        out: np.ndarray = self.call(req, on_step)
        return out

    # -- the worker -----------------------------------------------------------------------

    def _next_batch(self) -> list[PendingRequest] | None:
        """Block until a batch is due; None when closed and nothing is left to run."""
        with self._cond:
            while True:
                if self._closing and self._cancel_pending:
                    for p in self._pending:
                        p.cancel()
                    self._pending.clear()
                self._pending = [p for p in self._pending if not p.cancelled()]
                if not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                # Step 1: the oldest request decides the batch key.
                key = self._pending[0].key
                same = [p for p in self._pending if p.key == key]
                # Step 2: wait (bounded) for more compatible requests, unless full or closing.
                deadline = self._pending[0].submitted_at + self.max_wait_s
                remaining = deadline - time.monotonic()
                if len(same) < self.max_batch and remaining > 0 and not self._closing:
                    self._cond.wait(remaining)
                    continue
                # Step 3: take up to max_batch of them, in arrival order.
                batch = same[: self.max_batch]
                taken = set(map(id, batch))
                self._pending = [p for p in self._pending if id(p) not in taken]
                # A request cancelled meanwhile is dropped here, never run.
                return [p for p in batch if p.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            method = batch[0].request.method
            self.batches.append((method, len(batch)))
            self.calls += 1
            self._running = batch
            try:
                results = list(getattr(self.backend, method)([p.request for p in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"backend.{method} returned {len(results)} results for {len(batch)} "
                        "requests"
                    )
            except BaseException as e:  # one failing call fails every row of it
                logger.debug("backend.%s failed for a batch of %d: %r", method, len(batch), e)
                for p in batch:
                    p.set_exception(e)
                continue
            finally:
                self._running = []
            for p, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    p.set_exception(result)
                else:
                    p.set_result(result)


_OPEN: weakref.WeakSet[BatchingEngine] = weakref.WeakSet()  # engines not closed yet


@atexit.register
def _close_at_exit() -> None:
    """At interpreter exit: stop every open engine's worker (its running batch at its next
    step) and wait for it, so no thread is inside torch while the process ends (that aborts
    it). An engine whose backend has no `interrupt` hook cannot stop a running call: it is
    not waited for (its worker is a daemon, as before)."""
    for engine in list(_OPEN):
        engine.close(cancel_pending=True, timeout=30 if engine._hooked else 0)


def _with_on_step(request: Request, put: Callable[[StepEvent], None]) -> Request:
    """A copy of `request` whose `on_step` forwards events to `put` (if it takes one)."""
    if not hasattr(request, "on_step"):
        return request
    return dataclasses.replace(request, on_step=put)  # type: ignore[type-var]
