"""The HTTP server in-process (`httpx.ASGITransport`) over a `FakeEngine`: every endpoint,
SSE streams, the bad-input matrix, auth, the last-resort 500, and batching under load."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.graphs.runtime import BatchingEngine
from lavida_agent.tools.images import decode_png, encode_png
from PIL import Image

from lavida_agent.api import LavidaAgent
from lavida_agent.server import create_app
from lavida_agent.settings import Settings
from lavida_agent.traces import trace_path
from tests.fakes import FakeBatchedBackend, FakeEngine, default_plan, draw, noise

RED = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}
BLUE = {"label": "blue square", "box": [36.0, 36.0, 52.0, 52.0]}
KEY = "s3cret-key"
GEN = "/v1/images/generations"


def _scene() -> np.ndarray:
    return draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE])


def _b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode()


def _png(b64: str) -> np.ndarray:
    return decode_png(base64.b64decode(b64))


def _huge_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width x height` (refused before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))  # fmt: skip


def _events(text: str) -> list[tuple[str, dict]]:
    """Parse an SSE body into (event, data) pairs (comments skipped)."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        name = next(ln[7:] for ln in lines if ln.startswith("event: "))
        data = "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))
        out.append((name, json.loads(data)))
    return out


@pytest.fixture
async def client(agent):
    app = create_app(agent=agent)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as c:  # fmt: skip
        c.runs_dir = agent.settings.runs_dir
        c.app_agent = agent
        yield c


# -- native endpoints ---------------------------------------------------------------------


async def test_healthz_and_openapi(client):
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/images/generations" in spec["paths"] and "/v1/runs/stream" in spec["paths"]
    assert "GenerateRequest" in spec["components"]["schemas"]


async def test_an_accepted_attempt_lists_the_objects_grounding_did_not_find(client, engine):
    engine.drop_labels = {"blue square"}
    r = await client.post("/v1/generate", json={"prompt": "red circle and blue square", "seed": 5})
    body = r.json()
    assert body["accepted"] and body["attempts"][0]["grounding_failed"] == ["blue square"]


async def test_an_attempt_lists_its_stray_marks(client, engine):
    engine.enqueue_surprise(-5.6, [{"box": [48.0, 0.0, 60.0, 8.0], "score": -5.6}])
    r = await client.post("/v1/generate", json={"prompt": "a red circle and a blue square", "seed": 5, "rounds": 2})
    first, second = r.json()["attempts"]
    assert first["strays"] == [{"box": [48.0, 0.0, 60.0, 8.0], "score": -5.6}] and first["verdict"] == "reject"
    assert first["worst_token"] == -5.6 and second["worst_token"] == 0.0
    assert second["strays"] == [] and second["verdict"] == "accept"


async def test_an_attempt_lists_the_critique_reasons_dropped_as_not_about_the_prompt(client, engine):
    engine.enqueue_critique(False, ["missing purple circle"])
    r = await client.post("/v1/generate", json={"prompt": "a red circle and a blue square", "seed": 5})
    attempt = r.json()["attempts"][0]
    assert attempt["dropped_reasons"] == ["missing purple circle"] and attempt["reasons"] == []
    assert attempt["verdict"] == "accept"


async def test_generate_returns_image_plan_attempts_and_trace(client):
    r = await client.post("/v1/generate", json={"prompt": "red circle and blue square", "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 5 and body["accepted"] and body["rounds"] == 1
    assert [p["label"] for p in body["plan"]] == ["red circle", "blue square"]
    image = _png(body["image"]["b64_json"])
    expected = draw(noise((64, 64), "red circle and blue square", 5),
                    default_plan("red circle and blue square"))  # fmt: skip
    assert np.array_equal(image, expected)
    assert body["attempts"][0]["seed"] == 5 and body["attempts"][0]["verdict"] == "accept"
    # The artifact URL serves the same PNG; the trace is there as JSON and HTML.
    art = await client.get(body["image"]["url"])
    assert art.status_code == 200 and art.headers["content-type"] == "image/png"
    assert np.array_equal(decode_png(art.content), image)
    trace = await client.get(body["trace_url"])
    assert trace.status_code == 200 and trace.json()["run_id"] == body["run_id"]
    page = await client.get(body["trace_url"] + ".html")
    assert page.status_code == 200 and page.text.count("<img") == len(trace.json()["nodes"])


async def test_generate_url_format_and_no_plan(client):
    r = await client.post("/v1/generate", json={"prompt": "red circle", "seed": 1, "plan": False,
                                                "steps": 2, "rounds": 1,
                                                "response_format": "url"})  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["image"]["b64_json"] is None and body["plan"] == []
    assert (await client.get(body["image"]["url"])).status_code == 200


async def test_generate_draws_a_given_layout(client, engine):
    layout = [{"label": "red circle", "box": [4, 4, 20, 20]}, BLUE]
    r = await client.post("/v1/generate", json={"prompt": "a red circle and a blue square",
                                                "seed": 1, "rounds": 1, "plan": layout})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["plan"] == [{"label": "red circle", "box": [4.0, 4.0, 20.0, 20.0]}, BLUE]
    assert engine.calls["plan_layout"] == 0  # the model did not plan
    bad = [([{"label": "red circle", "box": [20, 4, 4, 20]}], "x1 (4.0) must be >= x0 (20.0)"),
           ([{"label": "red circle", "box": [True, 4, 20, 20]}], "must hold numbers"),
           ([{"label": "red circle", "box": ["4", 4, 20, 20]}], "must hold numbers"),
           ([{"label": "red circle", "box": [4, 4, 20]}], "layout item 0"),
           ([{"label": " ", "box": [4, 4, 20, 20]}], "the label is empty"),
           ([{"label": "red circle", "box": [4, 4, 20, 20], "size": 3}], "unknown field 'size'"),
           (["red circle"], "layout item 0"),
           ([{"label": "red circle", "box": [-100, 0, 500, 900]}], "outside the 64x64 canvas"),
           ([RED] * 17, "a layout of 17 objects (limit 16)")]  # fmt: skip
    for plan, why in bad:
        r = await client.post("/v1/generate", json={"prompt": "a red circle", "plan": plan})
        assert r.status_code == 400, (plan, r.text)
        error = r.json()["error"]
        assert error["param"] == "plan" and error["message"].startswith("plan: "), error
        assert why in error["message"], error
    assert engine.calls["generate"] == 1  # nothing drawn from a refused layout


async def test_a_stopped_run_resumes_over_http(client, agent, engine):
    import threading

    from lavida_agent.errors import GenerationCancelled

    cancel = threading.Event()

    def on_event(ev):
        if ev.get("event") == "image":  # drawn; stopped before its critique
            cancel.set()

    with pytest.raises(GenerationCancelled) as stopped:
        await agent.agenerate("red circle", seed=2, rounds=2, on_event=on_event, cancel=cancel)
    r = await client.post(f"/v1/runs/{stopped.value.run_id}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["seed"] == 2 and r.json()["image"]["b64_json"]
    again = await client.post(f"/v1/runs/{stopped.value.run_id}/resume")  # a retried request
    assert again.status_code == 200 and again.json()["image"] == r.json()["image"]
    listed = (await client.get("/v1/runs", params={"limit": 5})).json()["runs"]
    assert listed[0]["run_id"] == again.json()["run_id"] and listed[0]["status"] == "ok"
    assert (await client.get("/v1/runs", params={"limit": 0})).status_code == 400
    for bad in ("nope", "x.json"):
        missing = await client.post(f"/v1/runs/{bad}/resume")
        assert missing.status_code == 404, missing.text
        assert str(agent.settings.home) not in missing.text


async def test_edit_json_and_multipart_and_session_continues(client, engine):
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED], keep=[BLUE]))
    r = await client.post("/v1/edit", json={"image": _b64(_scene()), "instruction": "redo red",
                                            "seed": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["step"] == 0 and body["session_id"] and body["keep"] == [BLUE]
    assert _png(body["image"]["b64_json"]).shape == (64, 64, 3)
    # the produced object's noun contrast (the fake draws it where planned); the kept
    # objects' contrast is read only for edits that produce nothing
    assert body["attempts"][0]["fit"] == [5.0] and body["attempts"][0]["keep_fit"] == []
    r = await client.post("/v1/edit", files={"image": ("s.png", encode_png(_scene()), "image/png")},
                          data={"instruction": "make it green", "seed": "3",
                                "steps": "2"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["seed"] == 3 and r.json()["session_id"] != body["session_id"]
    hist = (await client.get(f"/v1/sessions/{body['session_id']}/history")).json()
    assert [s["instruction"] for s in hist["steps"]] == ["redo red"]


async def test_an_edit_of_an_absent_object_says_so(client, engine):
    engine.enqueue_edit_plan(EditPlanResult(targets=["the green triangle"], target_boxes=[RED["box"]],
                                            caption="a small red circle on a black background"))  # fmt: skip
    engine.enqueue_ground([RED["box"]])  # grounded on the red circle
    engine.enqueue_fit([-4.0])  # where the model reads a look-alike
    r = await client.post("/v1/edit", json={"image": _b64(_scene()), "instruction": "remove the green triangle",
                                            "rounds": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["absent"] == ["the green triangle"] and not body["accepted"]
    assert any(r.startswith("The source image holds no green triangle") for r in body["attempts"][0]["reasons"])


async def test_ground_and_ask(client, engine):
    wide = draw(np.zeros((64, 128, 3), np.uint8),
                [{"label": "red circle", "box": [20, 20, 60, 40]}])  # fmt: skip
    r = await client.post("/v1/ground", json={"image": _b64(wide), "expressions": ["red circle"]})
    assert r.status_code == 200, r.text
    assert r.json()["boxes"][0]["box"] == [20.0, 20.0, 60.0, 40.0]
    assert r.json()["source_size"] == [128, 64]
    assert r.json()["found_by"] == ["direct"] and r.json()["caption"] is None  # not in the grammar
    assert r.json()["present"] == [None]  # not checked
    engine.enqueue_answer("a small red circle on a white background")
    engine.enqueue_ground([[10.0, 26.0, 30.0, 36.0]])
    engine.enqueue_ground([[0.0, 0.0, 0.0, 0.0]])  # the model's own box: not found
    r = await client.post("/v1/ground", json={"image": _b64(wide), "expressions": ["the red circle"]})
    assert r.status_code == 200, r.text
    assert r.json()["found_by"] == ["scene"] and r.json()["caption"].startswith("a small red")
    assert r.json()["present"] == [True]
    assert r.json()["boxes"][0]["box"] == [20.0, 20.0, 60.0, 40.0]
    assert r.json()["objects"] == [{"label": "small red circle", "box": [20.0, 20.0, 60.0, 40.0]}]
    engine.enqueue_answer("two shapes")
    r = await client.post("/v1/ask", files={"image": ("s.png", encode_png(_scene()))},
                          data={"question": "what is there?"})  # fmt: skip
    assert r.status_code == 200 and r.json()["answer"] == "two shapes"
    assert r.json()["answered_by"] == "direct" and r.json()["objects"] == []
    engine.enqueue_answer("a small red circle on a white background")
    engine.enqueue_ground([[10.0, 26.0, 30.0, 36.0]])
    r = await client.post("/v1/ask", json={"image": _b64(wide), "question": "is there a red circle?"})
    assert r.status_code == 200, r.text
    assert (r.json()["answer"], r.json()["answered_by"]) == ("yes", "scene")
    assert r.json()["objects"] == [{"label": "small red circle", "box": [20.0, 20.0, 60.0, 40.0]}]


async def test_image_by_sha256(client):
    gen = (await client.post("/v1/generate", json={"prompt": "red circle", "seed": 1})).json()
    r = await client.post("/v1/ask", json={"image_sha256": gen["image"]["sha256"], "question": "?"})
    assert r.status_code == 200
    r = await client.post("/v1/ask", json={"image_sha256": "0" * 64, "question": "?"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "image_sha256"


async def test_session_history_after_a_restart_and_all_steps(client, engine):
    """A turn given a new image restarts the history there; `?all=true` lists every step of
    the branch, the earlier turns too, whose index `branch` takes."""
    sid = (await client.post("/v1/sessions", json={"image": _b64(_scene())})).json()["session_id"]
    for seed, image in ((1, None), (2, _b64(_scene()))):
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
        body = {"instruction": "redo blue", "seed": seed, **({"image": image} if image else {})}
        assert (await client.post(f"/v1/sessions/{sid}/edit", json=body)).status_code == 200
    assert [s["seed"] for s in (await client.get(f"/v1/sessions/{sid}/history")).json()["steps"]] == [2]
    every = (await client.get(f"/v1/sessions/{sid}/history", params={"all": "true"})).json()["steps"]
    assert [(s["index"], s["seed"]) for s in every] == [(0, 1), (1, 2)]
    assert (await client.post(f"/v1/sessions/{sid}/branch", json={"step": 0})).status_code == 200


async def test_session_lifecycle(client, engine):
    r = await client.post("/v1/sessions", json={"image": _b64(_scene())})
    assert r.status_code == 200, r.text
    sid, start = r.json()["session_id"], r.json()["image"]["sha256"]
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    e1 = (await client.post(f"/v1/sessions/{sid}/edit",
                            json={"instruction": "redo blue", "seed": 1})).json()  # fmt: skip
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
    e2 = (await client.post(f"/v1/sessions/{sid}/edit",
                            json={"instruction": "redo red", "seed": 2})).json()  # fmt: skip
    assert (e1["step"], e2["step"]) == (0, 1) and e2["session_id"] == sid
    hist = (await client.get(f"/v1/sessions/{sid}/history")).json()
    assert [s["index"] for s in hist["steps"]] == [0, 1]
    assert hist["steps"][0]["parent_sha256"] == start
    assert hist["image"]["sha256"] == e2["image"]["sha256"]
    branch = await client.post(f"/v1/sessions/{sid}/branch", json={"step": 0})
    assert branch.status_code == 200 and branch.json()["image"]["sha256"] == e1["image"]["sha256"]
    undo = (await client.post(f"/v1/sessions/{sid}/undo")).json()
    assert undo["image"]["sha256"] == start
    redo = (await client.post(f"/v1/sessions/{sid}/redo")).json()  # back before the undo
    assert redo["image"]["sha256"] == e1["image"]["sha256"]
    again = (await client.post(f"/v1/sessions/{sid}/redo")).json()  # and before the branch
    assert again["image"]["sha256"] == e2["image"]["sha256"]
    nothing = await client.post(f"/v1/sessions/{sid}/redo")
    assert nothing.status_code == 400 and "nothing to redo" in nothing.json()["error"]["message"]
    bad = await client.post(f"/v1/sessions/{sid}/branch", json={"step": 9})
    assert bad.status_code == 400
    # step 1 of the branch left behind, by its image
    back = await client.post(f"/v1/sessions/{sid}/branch", json={"step": 1, "image": e2["image"]["sha256"][:12]})
    assert back.status_code == 200 and back.json()["image"]["sha256"] == e2["image"]["sha256"]
    bad = await client.post(f"/v1/sessions/{sid}/branch", json={"step": 1, "image": "XYZ!"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"
    for method, path in [("GET", "/v1/sessions/nope/history"), ("POST", "/v1/sessions/nope/undo"),
                         ("POST", "/v1/sessions/../x/undo")]:  # fmt: skip
        r = await client.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.post("/v1/sessions/nope/edit", json={"instruction": "x"})
    assert r.status_code == 404


async def test_a_generate_runs_thread_is_not_a_session(client):
    """Its checkpoint is not a session's: 404, and nothing is run or written on it."""
    gen = (await client.post("/v1/generate", json={"prompt": "red circle", "seed": 4, "rounds": 1})).json()
    thread = gen["thread_id"]
    for method, path, body in [("GET", f"/v1/sessions/{thread}/history", None),
                               ("POST", f"/v1/sessions/{thread}/undo", None),
                               ("POST", f"/v1/sessions/{thread}/edit", {"instruction": "x"})]:  # fmt: skip
        r = await client.request(method, path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert (await client.post(f"/v1/runs/{gen['run_id']}/resume")).status_code == 200  # untouched


async def test_runs_and_sessions_are_deleted_with_what_only_they_refer_to(client, engine):
    gen = (await client.post("/v1/generate", json={"prompt": "red circle", "seed": 4, "rounds": 1})).json()
    sid = (await client.post("/v1/sessions", json={"image": _b64(_scene())})).json()["session_id"]
    turns = []
    for _ in range(2):
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
        turns.append((await client.post(f"/v1/sessions/{sid}/edit", json={"instruction": "redo blue"})).json())

    r = await client.delete(f"/v1/runs/{turns[0]['run_id']}")  # a turn goes with its session
    assert r.status_code == 400 and f"one of 2 turns of session {sid}" in r.json()["error"]["message"]
    r = await client.delete(f"/v1/sessions/{gen['thread_id']}")
    assert r.status_code == 400 and "not a session" in r.json()["error"]["message"]
    r = await client.delete(f"/v1/runs/{gen['run_id']}", params={"dry_run": "true"})
    assert r.status_code == 200 and r.json()["dry_run"] and r.json()["runs"] == [gen["run_id"]]
    assert (await client.get(f"/v1/artifacts/{gen['image']['sha256']}")).status_code == 200
    r = await client.delete(f"/v1/runs/{gen['run_id']}")
    assert r.status_code == 200 and r.json()["images"] >= 1 and not r.json()["dry_run"]
    for path in (f"/v1/traces/{gen['run_id']}", f"/v1/artifacts/{gen['image']['sha256']}"):
        assert (await client.get(path)).status_code == 404, path
    assert (await client.delete(f"/v1/runs/{gen['run_id']}")).status_code == 404

    r = await client.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 200 and r.json()["threads"] == [sid]
    assert sorted(r.json()["runs"]) == sorted(t["run_id"] for t in turns)
    assert (await client.get(f"/v1/sessions/{sid}/history")).status_code == 404
    for bad in (sid, "../x", "nope"):
        r = await client.delete(f"/v1/sessions/{bad}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad


async def test_a_server_with_keep_days_prunes_when_it_starts(engine):
    settings = Settings.from_env(keep_days=1e-9, num_steps=2)  # (any idle time is too long)
    with LavidaAgent(engine=engine, settings=settings) as agent:
        old = agent.generate("a red circle", seed=1, rounds=1)
        app = create_app(settings, agent=agent, mcp=False)
        async with app.router.lifespan_context(app):
            for _ in range(200):
                if not trace_path(old.run_id, settings.runs_dir).exists():
                    break
                await asyncio.sleep(0.01)
            assert not trace_path(old.run_id, settings.runs_dir).exists()
        assert agent.checkpointer.get_tuple({"configurable": {"thread_id": old.thread_id}}) is None


async def test_deeply_nested_json_is_a_400(client):
    r = await client.post("/v1/ask", content=b'{"question": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                          headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


async def test_missing_traces_and_artifacts_are_404(client):
    for path in ["/v1/traces/nope", "/v1/traces/nope.html", "/v1/artifacts/" + "a" * 64,
                 "/v1/artifacts/not-a-sha", "/v1/nowhere"]:  # fmt: skip
        r = await client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path
        assert str(client.runs_dir) not in r.text  # the server's folders stay its own
    r = await client.get("/v1/generate")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# -- streaming ------------------------------------------------------------------------------


async def test_run_stream_sends_progress_previews_then_result(client):
    r = await client.post("/v1/runs/stream", json={"workflow": "generate", "prompt": "red circle",
                                                   "seed": 4, "preview_every": 2})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    names = [n for n, _ in events]
    assert names[0] == "run_start" and names[-1] == "result" and names[-2] == "run_end"
    for needed in ("node_start", "node_end", "plan", "sampler_step", "preview", "critique"):
        assert needed in names, needed
    assert names.index("sampler_step") < names.index("result")
    steps = [d for n, d in events if n == "sampler_step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all("preview" not in s for s in steps)
    previews = [d for n, d in events if n == "preview"]
    assert [p["step"] for p in previews] == [2, 4]
    assert _png(previews[0]["b64_json"]).shape == (64, 64, 3)
    result = events[-1][1]
    assert result["seed"] == 4 and _png(result["image"]["b64_json"]).shape == (64, 64, 3)


async def test_preview_periods_beyond_any_run_share_one_view(agent):
    app = create_app(agent=agent)
    svc = app.state.service
    cap = agent.settings.max_steps
    views = {id(await svc.agent_for(k)) for k in (cap + 1, cap + 2, 10**9)}
    assert len(views) == 1 and len(svc._preview_agents) == 1  # bounded, whatever clients send
    assert (await svc.agent_for(2)).settings.preview_every == 2 and await svc.agent_for(0) is agent


async def test_run_stream_other_workflows_and_session(client, engine):
    start = (await client.post("/v1/sessions", json={"image": _b64(_scene())})).json()
    r = await client.post("/v1/runs/stream", json={"workflow": "edit", "instruction": "x",
                                                   "session_id": start["session_id"]})  # fmt: skip
    events = _events(r.text)
    assert events[-1][0] == "result" and events[-1][1]["session_id"] == start["session_id"]
    assert "sampler_step" in [n for n, _ in events]
    r = await client.post("/v1/runs/stream", json={"workflow": "ground", "image": _b64(_scene()),
                                                   "expressions": ["blue square"]})  # fmt: skip
    assert _events(r.text)[-1][1]["boxes"][0]["box"] == BLUE["box"]
    engine.enqueue_answer("yes")
    r = await client.post("/v1/runs/stream", json={"workflow": "ask", "image": _b64(_scene()),
                                                   "question": "any?"})  # fmt: skip
    assert _events(r.text)[-1][1]["answer"] == "yes"
    engine.enqueue_answer("a large red circle on a white background")
    engine.enqueue_ground([[20.0, 20.0, 40.0, 40.0]])
    r = await client.post("/v1/runs/stream", json={"workflow": "critique", "image": _b64(_scene()),
                                                   "prompt": "a red circle"})  # fmt: skip
    events = _events(r.text)
    assert "perception" in [n for n, _ in events] and "verdict" in [n for n, _ in events]
    assert events[-1][1]["verdict"] == "accept" and events[-1][1]["judged_by"] == "scene"


async def test_critique_json_multipart_and_bad_input(client, engine):
    engine.enqueue_answer("a large red circle on a white background")
    engine.enqueue_ground([[20.0, 20.0, 40.0, 40.0]])
    r = await client.post("/v1/critique", json={"image": _b64(_scene()), "prompt": "a red circle and a blue square"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["verdict"], body["reasons"], body["judged_by"]) == ("reject", ["missing blue square"], "scene")
    assert body["objects"] == [{"label": "large red circle", "box": [20.0, 20.0, 40.0, 40.0]}]
    assert (await client.get(body["trace_url"])).json()["workflow"] == "critique"
    engine.enqueue_critique(True)
    r = await client.post("/v1/critique", files={"image": ("s.png", encode_png(_scene()))},
                          data={"prompt": "a cat"})  # fmt: skip
    assert r.status_code == 200 and r.json()["judged_by"] == "model"
    r = await client.post("/v1/critique", json={"image": _b64(_scene()), "prompt": " "})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


class _Broken(FakeEngine):
    def generate(self, *args, **kwargs):
        raise RuntimeError("the GPU caught fire")


async def test_run_failure_is_json_or_an_error_event():
    with LavidaAgent(engine=_Broken(), num_steps=2) as agent:
        app = create_app(agent=agent)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/v1/generate", json={"prompt": "red circle"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "workflow_error"
            r = await c.post("/v1/runs/stream", json={"workflow": "generate", "prompt": "red"})
            events = _events(r.text)
            assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "workflow_error"


# -- OpenAI-compatible ---------------------------------------------------------------------


async def test_openai_generations_sizes_n_seed_and_url(client):
    r = await client.post(GEN, json={"prompt": "red circle", "n": 2, "size": "256x256",
                                     "seed": 9})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and body["size"] == "256x256" and len(body["data"]) == 2
    a, b = (_png(d["b64_json"]) for d in body["data"])
    assert a.shape == (256, 256, 3) and not np.array_equal(a, b)
    native = draw(noise((64, 64), "red circle", 9), default_plan("red circle"))
    assert np.array_equal(a[::4, ::4], native)  # a nearest-neighbour upscale of the 64 px image
    again = (await client.post("/v1/images/generations", json={"prompt": "red circle",
                                                               "seed": 9})).json()  # fmt: skip
    assert np.array_equal(_png(again["data"][0]["b64_json"]), native)
    r = await client.post("/v1/images/generations", json={"prompt": "red circle",
                                                          "response_format": "url",
                                                          "size": "512x512"})  # fmt: skip
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://test/v1/artifacts/")
    assert decode_png((await client.get(url)).content).shape == (512, 512, 3)
    # the upscaled copy lives as long as its run: a prune of everything else keeps it
    (served_by,) = [p.stem for p in Path(client.runs_dir).glob("*.json") if url.split("/")[-1][:64] in p.read_text()]
    assert r.json()["data"][0]["run_id"] == served_by  # (an extension: which run to delete)
    agent = client.app_agent
    others = [p.stem for p in Path(client.runs_dir).glob("*.json") if p.stem != served_by]
    agent.delete(others, grace_s=0)
    assert (await client.get(url)).status_code == 200
    agent.delete([served_by], grace_s=0)
    assert (await client.get(url)).status_code == 404


async def test_openai_generation_stream_partial_images(client):
    r = await client.post(GEN, json={"prompt": "red circle", "stream": True,
                                     "partial_images": 2, "steps": 6})  # fmt: skip
    events = _events(r.text)
    assert [n for n, _ in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    assert [d["partial_image_index"] for _, d in events[:2]] == [0, 1]
    assert all(d["type"] == n for n, d in events)
    assert _png(events[-1][1]["b64_json"]).shape == (64, 64, 3)


async def test_openai_edit_mask_is_turned_as_its_exif_says_like_the_image(client, engine):
    """A phone photo and its mask, both stored sideways with EXIF orientation 6: each is read
    as it displays, so the sizes agree and the mask covers what it covers on screen."""
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[0.0, 0.0, 64.0, 64.0]]))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image, mask = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.full((64, 128, 3), 200, np.uint8)).save(image, format="PNG", exif=exif)
    Image.fromarray(np.full((64, 128), 255, np.uint8)).save(mask, format="PNG", exif=exif)
    r = await client.post("/v1/images/edits", data={"prompt": "repaint", "size": "64x64"},
                          files={"image": ("i.png", image.getvalue(), "image/png"),
                                 "mask": ("m.png", mask.getvalue(), "image/png")})  # fmt: skip
    assert r.status_code == 200, r.text


async def test_an_edit_of_a_wide_image_says_where_its_content_is_and_openai_crops_to_it(client, engine):
    wide = np.full((64, 128, 3), 200, np.uint8)  # letterboxed into 64 x 32 of the canvas
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[0.0, 16.0, 32.0, 48.0]]))
    body = (await client.post("/v1/edit", json={"image": _b64(wide), "instruction": "repaint"})).json()
    assert body["source_size"] == [128, 64] and body["content_box"] == [0, 16, 64, 48]
    assert _png(body["image"]["b64_json"]).shape == (64, 64, 3)  # the canvas: feed it back as it is
    square = (await client.post("/v1/edit", json={"image": _b64(_scene()), "instruction": "repaint"})).json()
    assert square["source_size"] == [64, 64] and square["content_box"] == [0, 0, 64, 64]
    mask = np.zeros((64, 128, 4), np.uint8)  # all editable
    buf = io.BytesIO()
    Image.fromarray(mask, "RGBA").save(buf, format="PNG")
    for files in ({"image": ("i.png", encode_png(wide), "image/png")},
                  {"image": ("i.png", encode_png(wide), "image/png"), "mask": ("m.png", buf.getvalue(), "image/png")}):
        r = await client.post("/v1/images/edits", data={"prompt": "repaint", "size": "256x256"}, files=files)
        assert r.status_code == 200, r.text
        assert _png(r.json()["data"][0]["b64_json"]).shape == (128, 256, 3) and r.json()["size"] == "256x128"


async def test_an_openai_edit_stream_of_a_wide_image_comes_in_its_shape(client, engine):
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[0.0, 16.0, 32.0, 48.0]]))
    r = await client.post("/v1/images/edits", json={"prompt": "repaint", "stream": True, "partial_images": 1,
                                                    "steps": 4, "image": _b64(np.full((64, 128, 3), 200, np.uint8))})
    events = _events(r.text)
    assert [n for n, _ in events] == ["image_edit.partial_image", "image_edit.completed"]
    for _, data in events:
        assert _png(data["b64_json"]).shape == (32, 64, 3) and data["size"] == "64x32"


async def test_openai_nulls_are_the_defaults(client):
    r = await client.post(GEN, json={"prompt": "red circle", "n": None, "response_format": None, "stream": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1 and "b64_json" in r.json()["data"][0]


async def test_openai_edit_multipart_with_mask(client, engine):
    scene = _scene()
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[0.0, 0.0, 64.0, 64.0]]))
    mask = np.zeros((64, 64, 4), np.uint8)
    mask[..., 3] = 255
    mask[:, :32, 3] = 0  # left half editable
    buf = io.BytesIO()
    Image.fromarray(mask, "RGBA").save(buf, format="PNG")
    r = await client.post("/v1/images/edits", data={"prompt": "repaint", "size": "64x64"},
                          files={"image": ("i.png", encode_png(scene), "image/png"),
                                 "mask": ("m.png", buf.getvalue(), "image/png")})  # fmt: skip
    assert r.status_code == 200, r.text
    out = _png(r.json()["data"][0]["b64_json"])
    assert np.array_equal(out[:, 32:], scene[:, 32:])  # outside the mask: untouched
    assert not np.array_equal(out[:, :32], scene[:, :32])
    # Without a mask, and as JSON with a base64 image.
    r = await client.post("/v1/images/edits", json={"prompt": "repaint", "image": _b64(scene),
                                                    "n": 2})  # fmt: skip
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    small = encode_png(np.zeros((8, 8, 3), np.uint8))
    r = await client.post("/v1/images/edits", data={"prompt": "x"},
                          files={"image": ("i.png", encode_png(scene)),
                                 "mask": ("m.png", small)})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"
    r = await client.post("/v1/images/edits", data={"prompt": "x"},
                          files={"image": ("i.png", encode_png(scene)), "mask": ("m.png", b"not a png")})  # fmt: skip
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "mask" and "object at 0x" not in err["message"]


# -- bad inputs, limits, auth ---------------------------------------------------------------


@pytest.fixture
async def strict(engine):
    settings = Settings.from_env(api_key=KEY, max_upload_bytes=32 * 1024, max_prompt_chars=40,
                                 max_n=2, max_steps=8, max_rounds_limit=2, num_steps=2)  # fmt: skip
    with LavidaAgent(engine=engine, settings=settings) as agent:
        app = create_app(settings, agent=agent)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:  # fmt: skip
            yield c


SCENE = _b64(_scene())
BAD_INPUTS = [
    # (path, kwargs, status, param)
    ("/v1/edit", {"json": {"image": base64.b64encode(b"not an image").decode(),
                           "instruction": "x"}}, 400, "image"),  # fmt: skip
    ("/v1/edit", {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\ngarbage")},
                  "data": {"instruction": "x"}}, 400, "image"),  # fmt: skip
    ("/v1/edit", {"json": {"image": "%%%not base64%%%", "instruction": "x"}}, 400, "image"),
    ("/v1/ask", {"json": {"image": base64.b64encode(_huge_png_header(100_000, 100_000)).decode(),
                          "question": "?"}}, 400, "image"),  # fmt: skip
    ("/v1/ask", {"json": {"question": "?"}}, 400, "image"),
    ("/v1/ask", {"json": {"image": "A" * 60_000, "question": "?"}}, 413, "image"),
    (GEN, {"json": {"prompt": ""}}, 400, "prompt"),
    (GEN, {"json": {"prompt": "   "}}, 400, "prompt"),
    (GEN, {"json": {"prompt": "x" * 41}}, 400, "prompt"),
    (GEN, {"json": {}}, 400, "prompt"),
    (GEN, {"json": {"prompt": "x", "n": 0}}, 400, "n"),
    (GEN, {"json": {"prompt": "x", "n": 1000}}, 400, "n"),
    (GEN, {"json": {"prompt": "x", "n": "many"}}, 400, "n"),
    (GEN, {"json": {"prompt": "x", "size": "300x300"}}, 400, "size"),
    (GEN, {"json": {"prompt": "x", "response_format": "gif"}}, 400, "response_format"),
    (GEN, {"json": {"prompt": "x", "steps": 9}}, 400, "steps"),
    (GEN, {"json": {"prompt": "x", "rounds": 3}}, 400, "rounds"),
    (GEN, {"json": {"prompt": "x", "partial_images": 2}}, 400, "partial_images"),
    (GEN, {"json": {"prompt": "x", "stream": True, "n": 2}}, 400, "n"),
    (GEN, {"json": {"prompt": "x", "colour": "red"}}, 400, "colour"),
    ("/v1/generate", {"json": {"prompt": "x", "steps": 0}}, 400, "steps"),
    ("/v1/generate", {"json": {"prompt": "x", "seed": -1}}, 400, "seed"),
    ("/v1/generate", {"json": {"prompt": "x", "extra": {"a": 1}}}, 400, "extra"),
    ("/v1/ground", {"json": {"image": SCENE, "expressions": []}}, 400, "expressions"),
    ("/v1/ground", {"json": {"image": SCENE, "expressions": ["ok", ""]}}, 400, "expressions.1"),
    ("/v1/runs/stream", {"json": {"workflow": "dance"}}, 400, "workflow"),
    ("/v1/runs/stream", {"json": {"prompt": "x"}}, 400, "workflow"),
    ("/v1/runs/stream", {"json": {"workflow": "generate", "prompt": "x", "bad": 1}}, 400, "bad"),
    ("/v1/generate", {"content": b"prompt=x", "headers": {"content-type": "text/plain"}},
     415, None),  # fmt: skip
    ("/v1/generate", {"data": {"prompt": "x"}}, 415, None),
    (GEN, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
    (GEN, {"json": ["prompt"]}, 400, None),
    ("/v1/edit", {"content": b"x" * 200_000, "headers": {"content-type": "application/json"}},
     413, None),  # fmt: skip
]


@pytest.mark.parametrize(("path", "kwargs", "status", "param"), BAD_INPUTS,
                         ids=[f"{i}-{b[0].rsplit('/', 1)[-1]}-{b[3]}-{b[2]}"
                              for i, b in enumerate(BAD_INPUTS)])  # fmt: skip
async def test_bad_input_is_a_json_4xx_naming_the_field(strict, path, kwargs, status, param):
    r = await strict.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] and err["message"] and err["type"] and err["param"] == param
    if param:
        assert param.split(".")[0] in err["message"]
    ok = await strict.post(GEN, json={"prompt": "red circle"})  # the server still works
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


async def test_a_stream_without_its_workflow_names_the_ones_there_are(strict):
    r = await strict.post("/v1/runs/stream", json={"prompt": "a red circle"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and all(repr(w) in message for w in ("generate", "edit", "ground", "ask", "critique"))


async def test_chunked_body_over_the_limit_is_413(strict):
    async def chunks():
        for _ in range(20):
            yield b"x" * 10_000

    r = await strict.post("/v1/generate", content=chunks(),
                          headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_auth(strict):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):  # fmt: skip
        r = await strict.post(GEN, json={"prompt": "x"}, headers={"Authorization": ""} | headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    r = await strict.get("/v1/traces/x", headers={"Authorization": ""})
    assert r.status_code == 401
    assert (await strict.get("/healthz", headers={"Authorization": ""})).status_code == 200
    url = (await strict.post(GEN, json={"prompt": "x", "response_format": "url"})).json()
    r = await strict.get(url["data"][0]["url"], headers={"Authorization": ""})
    assert r.status_code == 200  # artifact URLs are capabilities


async def test_unexpected_errors_are_logged_500s_and_the_server_survives(
    client, monkeypatch, caplog
):
    svc = client._transport.app.state.service

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(svc, "generate_out", bug)
    r = await client.post("/v1/generate", json={"prompt": "red circle"})
    assert r.status_code == 500 and r.json()["error"] == {
        "code": "internal_error", "message": "internal server error", "type": "server_error",
        "param": None}
    assert "ZeroDivisionError" in caplog.text
    monkeypatch.undo()
    assert (await client.post("/v1/generate", json={"prompt": "red circle"})).status_code == 200


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_requests_share_batched_forwards():
    backend = FakeBatchedBackend(call_delay_s=0.02)
    engine = BatchingEngine(backend, max_wait_ms=10)
    try:
        with LavidaAgent(engine=engine, num_steps=2, max_rounds=1) as agent:
            app = create_app(agent=agent)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t", timeout=30) as c:  # fmt: skip
                prompts = [f"shape {i}" for i in range(16)]
                rs = await asyncio.gather(*[
                    c.post("/v1/images/generations", json={"prompt": p, "seed": 100 + i})
                    for i, p in enumerate(prompts)])  # fmt: skip
        for i, (p, r) in enumerate(zip(prompts, rs, strict=True)):
            assert r.status_code == 200, r.text
            expected = draw(noise((64, 64), p, 100 + i), default_plan(p))
            assert np.array_equal(_png(r.json()["data"][0]["b64_json"]), expected)
        for method in ("plan_layout", "generate", "critique"):
            assert 0 < backend.calls[method] < 16, (method, backend.calls)
        assert max(n for _, n in backend.batch_sizes) > 1
    finally:
        engine.close()
