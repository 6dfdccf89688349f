"""`BatchingEngine`: concurrent callers, batched backend calls, per-row seeds, errors,
cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import types
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lavida_agent.graphs import t2i
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.engine import Engine
from lavida_agent.graphs.runtime import (
    BatchingEngine,
    EngineClosedError,
    GenerateRequest,
    GroundRequest,
    PlanLayoutRequest,
)
from lavida_agent.graphs.state import T2IOutput
from tests.fakes import FakeBatchedBackend, FakeEngine

PROMPTS = [f"shape {i} and other {i}" for i in range(8)]


def test_satisfies_engine_protocol():
    with BatchingEngine(FakeBatchedBackend()) as engine:
        assert isinstance(engine, Engine)
        assert isinstance(FakeEngine(), Engine)


def _direct(store, prompt, seed):
    ctx = Context(engine=FakeEngine(), artifacts=store, selection="accept", num_steps=4, seed=seed)
    return T2IOutput.model_validate(t2i.graph.invoke({"prompt": prompt}, context=ctx))


def test_eight_concurrent_runs_are_batched_and_correct(store):
    backend = FakeBatchedBackend(call_delay_s=0.01)
    barrier = threading.Barrier(8)

    with BatchingEngine(backend, max_batch=16, max_wait_ms=30) as engine:
        def run(i):
            ctx = Context(engine=engine, artifacts=store, selection="accept", num_steps=4, seed=1000 + i)
            barrier.wait()
            return T2IOutput.model_validate(t2i.graph.invoke({"prompt": PROMPTS[i]}, context=ctx))

        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(run, range(8)))

    # Each run's result is exactly what it gives alone, with its own seed.
    for i, out in enumerate(outs):
        alone = _direct(store, PROMPTS[i], 1000 + i)
        assert out.accepted and out.attempts[0].seed == 1000 + i
        assert out.attempts[0].image == alone.attempts[0].image
    assert len({o.attempts[0].image.sha256 for o in outs}) == 8
    # Sequentially 8 runs make 8 x 4 backend calls (plan, generate, critique, ground).
    assert backend.total_calls < 8 * 4
    assert max(n for _, n in backend.batch_sizes) > 1


async def test_eight_concurrent_async_runs(store):
    backend = FakeBatchedBackend(call_delay_s=0.01)
    with BatchingEngine(backend, max_wait_ms=30) as engine:
        async def run(i):
            ctx = Context(engine=engine, artifacts=store, selection="accept", num_steps=2, seed=i)
            return T2IOutput.model_validate(
                await t2i.graph.ainvoke({"prompt": PROMPTS[i]}, context=ctx))

        outs = await asyncio.gather(*(run(i) for i in range(8)))
    assert [o.attempts[0].seed for o in outs] == list(range(8))
    assert all(o.accepted for o in outs)
    assert backend.total_calls < 8 * 4


def test_incompatible_requests_are_not_batched():
    backend = FakeBatchedBackend()
    with BatchingEngine(backend, max_wait_ms=50) as engine:
        futs = [engine.submit(GenerateRequest(prompt="a", plan=None, seed=s, num_steps=n))
                for s, n in [(1, 2), (2, 3), (3, 2), (4, 3)]]  # fmt: skip
        futs.append(engine.submit(PlanLayoutRequest(prompt="a", seed=0)))
        image = np.zeros((64, 64, 3), np.uint8)
        futs += [engine.submit(GroundRequest(image=image, expressions=["the red circle"], candidates=k))
                 for k in (1, None, 1)]  # fmt: skip
        for f in futs:
            f.result(timeout=5)
    assert sorted(backend.batch_sizes) == [("generate", 2), ("generate", 2), ("ground", 1), ("ground", 2),
                                           ("plan_layout", 1)]  # fmt: skip


def test_the_record_of_batches_is_bounded_and_the_count_whole(monkeypatch):
    import lavida_agent.graphs.runtime as runtime

    monkeypatch.setattr(runtime, "BATCHES_KEPT", 3)
    with BatchingEngine(FakeBatchedBackend()) as engine:
        for i in range(5):
            engine.plan_layout(f"shape {i}", seed=i)
    assert list(engine.batches) == [("plan_layout", 1)] * 3 and engine.calls == 5


def test_on_step_runs_in_the_callers_thread():
    seen = []
    with BatchingEngine(FakeBatchedBackend()) as engine:
        engine.generate("a", plan=None, seed=1, num_steps=3,
                        on_step=lambda ev: seen.append((ev.step, threading.get_ident())))
    assert [s for s, _ in seen] == [1, 2, 3]
    assert {t for _, t in seen} == {threading.get_ident()}


def test_errors_reach_the_right_caller():
    backend = FakeBatchedBackend()
    backend.fail_rows.add("bad")
    with BatchingEngine(backend, max_wait_ms=50) as engine:
        good = engine.submit(GenerateRequest(prompt="good", plan=None, seed=1, num_steps=2))
        bad = engine.submit(GenerateRequest(prompt="bad", plan=None, seed=1, num_steps=2))
        assert good.result(timeout=5).shape == (64, 64, 3)
        with pytest.raises(RuntimeError, match="row failed: bad"):
            bad.result(timeout=5)
    assert backend.batch_sizes == [("generate", 2)]


def test_a_failing_backend_call_fails_every_row_and_the_engine_keeps_working():
    class Boom(FakeBatchedBackend):
        def critique(self, requests):
            raise ValueError("backend down")

    img = np.zeros((64, 64, 3), np.uint8)
    with BatchingEngine(Boom(), max_wait_ms=20) as engine:
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(engine.critique, img, "p") for _ in range(3)]
            for f in futs:
                with pytest.raises(ValueError, match="backend down"):
                    f.result(timeout=5)
        assert engine.plan_layout("a", seed=0)[0]["label"] == "a"


def test_cancelled_request_never_reaches_the_backend():
    backend = FakeBatchedBackend()
    with BatchingEngine(backend, max_wait_ms=200) as engine:
        fut = engine.submit(PlanLayoutRequest(prompt="x", seed=0))
        assert fut.cancel()
        time.sleep(0.3)
    assert backend.total_calls == 0


async def test_cancelling_the_awaiting_task_cancels_the_request():
    backend = FakeBatchedBackend()
    with BatchingEngine(backend, max_wait_ms=300) as engine:
        task = asyncio.ensure_future(engine.asubmit(PlanLayoutRequest(prompt="x", seed=0)))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)
    assert backend.total_calls == 0


def test_close_runs_queued_requests_then_refuses_new_ones():
    backend = FakeBatchedBackend()
    engine = BatchingEngine(backend, max_wait_ms=1000)
    fut = engine.submit(PlanLayoutRequest(prompt="x", seed=0))
    engine.close()  # does not wait out max_wait_ms
    assert fut.result(timeout=1)[0]["label"] == "x"
    with pytest.raises(EngineClosedError):
        engine.submit(PlanLayoutRequest(prompt="y", seed=0))


def test_close_can_cancel_queued_requests():
    engine = BatchingEngine(FakeBatchedBackend(), max_wait_ms=1000)
    fut = engine.submit(PlanLayoutRequest(prompt="x", seed=0))
    engine.close(cancel_pending=True)
    assert fut.cancelled()


class _SlowBackend:
    """A backend whose `generate` runs `steps` steps of 20 ms, reporting each row's step and
    stopping (as `PipelineBackend` does) when its `interrupt` hook says so."""

    def __init__(self, steps: int = 100) -> None:
        self.steps, self.interrupt, self.ran = steps, None, []

    def generate(self, requests):
        for i in range(self.steps):
            if self.interrupt is not None and self.interrupt():
                raise RuntimeError(f"interrupted at step {i}")
            self.ran.append(i)
            for r in requests:
                if r.on_step is not None:
                    r.on_step(types.SimpleNamespace(step=i + 1, total=self.steps))
            time.sleep(0.02)
        return [np.zeros((2, 2, 3), np.uint8) for _ in requests]


def _request(seed: int) -> GenerateRequest:
    return GenerateRequest(prompt="x", plan=None, seed=seed, num_steps=4)


def test_a_running_batch_stops_when_every_caller_stopped_waiting():
    backend = _SlowBackend()
    with BatchingEngine(backend, max_wait_ms=50) as engine:
        def stop_at_5(ev):
            if ev.step == 5:
                raise KeyboardInterrupt

        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(engine.call, _request(s), stop_at_5) for s in (1, 2)]
            for call in calls:
                with pytest.raises(KeyboardInterrupt):
                    call.result(10)
        deadline = time.monotonic() + 2
        while engine._running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(engine.batches) == [("generate", 2)] and len(backend.ran) < 15  # not all 100 steps


def test_a_batch_someone_still_waits_for_runs_to_the_end():
    backend = _SlowBackend(steps=20)
    with BatchingEngine(backend, max_wait_ms=50) as engine:
        def stop_at_5(ev):
            if ev.step == 5:
                raise KeyboardInterrupt

        with ThreadPoolExecutor(2) as pool:
            stopped = pool.submit(engine.call, _request(1), stop_at_5)
            waited = pool.submit(engine.call, _request(2))
            with pytest.raises(KeyboardInterrupt):
                stopped.result(10)
            assert waited.result(10).shape == (2, 2, 3)
    assert backend.ran == list(range(20))


def test_closing_with_cancel_pending_stops_the_running_batch():
    backend = _SlowBackend()
    engine = BatchingEngine(backend, max_wait_ms=0)
    fut = engine.submit(_request(1))
    time.sleep(0.1)
    engine.close(cancel_pending=True, timeout=5)
    with pytest.raises(RuntimeError, match="interrupted at step"):
        fut.result(1)
    assert len(backend.ran) < 20


def test_a_backend_outlives_a_closed_engine():
    """A backend reused by a new engine after `close(cancel_pending=True)` runs normally:
    the closed engine's stop check is not left on it, and the engine is let go."""
    import gc

    from lavida_agent.graphs import runtime

    backend = _SlowBackend(steps=3)
    first = BatchingEngine(backend, max_wait_ms=0)
    first.close(cancel_pending=True)
    assert backend.interrupt is None  # its own hook back
    with BatchingEngine(backend, max_wait_ms=0) as second:
        assert second.call(_request(1)).shape == (2, 2, 3)
    open_before = len(runtime._OPEN)
    del first, second
    gc.collect()
    engines = [BatchingEngine(_SlowBackend(), max_wait_ms=0) for _ in range(5)]
    assert len(runtime._OPEN) == open_before + 5
    for engine in engines:
        engine.close()
    assert len(runtime._OPEN) == open_before  # closed engines leave the exit hook's set
