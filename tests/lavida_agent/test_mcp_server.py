"""The MCP server in process (the SDK's in-memory client) over a `FakeEngine`: the tools and
their schemas, images in every accepted form, multi-turn sessions, progress, resources, and
bad arguments as tool errors that leave the state intact."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from lavida_agent.api import LavidaAgent
from lavida_agent.graphs.engine import EditPlanResult
from lavida_agent.tools.images import decode_png, encode_png
from tests.fakes import draw, pause

mcp = pytest.importorskip("mcp")

from mcp import Client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from lavida_agent.mcp_server import IMAGE_URI, TRACE_URI, create_mcp, progress_message  # noqa: E402

RED = {"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}
BLUE = {"label": "blue square", "box": [36.0, 36.0, 52.0, 52.0]}
TOOLS = {"generate", "edit", "ground", "ask", "critique", "undo", "redo", "branch", "history",
         "resume", "runs"}  # fmt: skip


def _scene() -> np.ndarray:
    return draw(np.zeros((64, 64, 3), np.uint8), [RED, BLUE])


def _b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode()


def _error(result) -> str:
    assert result.is_error, result
    return result.content[0].text


def _ok(result) -> dict:
    assert not result.is_error, result.content
    data = result.structured_content
    assert json.loads(result.content[-1].text) == data  # the JSON as text too, for old hosts
    return data


async def test_tools_and_their_input_schemas(agent):
    async with Client(create_mcp(agent)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        gen = tools["generate"].input_schema
        assert gen["required"] == ["prompt"] and "ctx" not in gen["properties"]
        seed = next(s for s in gen["properties"]["seed"]["anyOf"] if s["type"] == "integer")
        assert seed["minimum"] == 0 and "description" in gen["properties"]["seed"]
        assert set(tools["edit"].input_schema["required"]) == {"instruction"}
        assert tools["ground"].input_schema["properties"]["expressions"]["type"] == "array"
        assert all(t.description for t in tools.values())
    read_only = {n for n, t in tools.items() if t.annotations.read_only_hint}
    assert read_only == {"ground", "ask", "critique", "history", "runs"}
    assert not any(t.annotations.destructive_hint or t.annotations.open_world_hint
                   for t in tools.values())  # fmt: skip


async def test_generate_returns_the_image_the_result_and_progress(agent):
    async with Client(create_mcp(agent)) as client:
        events: list[tuple[float, str | None]] = []

        async def progress(value: float, total: float | None, message: str | None) -> None:
            events.append((value, message))

        result = await client.call_tool("generate", {"prompt": "a red circle", "seed": 5, "rounds": 2},
                                        progress_callback=progress)  # fmt: skip
        data = _ok(result)
        assert data["seed"] == 5 and data["max_rounds"] == 2 and data["accepted"]
        assert (
            data["image"].startswith(IMAGE_URI) and data["trace_uri"] == TRACE_URI + data["run_id"]
        )
        picture = result.content[0]
        assert picture.type == "image" and picture.mime_type == "image/png"
        shown = decode_png(base64.b64decode(picture.data))
        stored = agent.store.open(agent.store.ref(data["image"].removeprefix(IMAGE_URI)))
        assert shown.shape == (256, 256, 3)  # 4x, nearest neighbour
        assert np.array_equal(shown[::4, ::4], stored)
        values = [v for v, _ in events]
        assert values == list(range(1, len(values) + 1))  # one notification per workflow event
        messages = [m for _, m in events]
        assert messages[0] == f"run {data['run_id']} started (t2i)" and messages[-1] == "run end"
        assert "generate_image: step 1/4" in messages and "generate_image: step 4/4" in messages
        assert any(m.startswith("critique: ") for m in messages)
        # the same call again replays: same seed, same image
        again = _ok(await client.call_tool("generate", {"prompt": "a red circle", "seed": 5,
                                                        "rounds": 2}))  # fmt: skip
        assert again["image"] == data["image"] and again["run_id"] != data["run_id"]


async def test_generate_draws_a_layout_given_back(agent, engine):
    async with Client(create_mcp(agent)) as client:
        first = _ok(await client.call_tool("generate", {"prompt": "a red circle", "seed": 1}))
        moved = [{"label": item["label"], "box": [40.0, 40.0, 60.0, 60.0]} for item in first["plan"]]
        planned = engine.calls["plan_layout"]
        again = _ok(await client.call_tool("generate", {"prompt": "a red circle", "seed": 1,
                                                        "plan": moved}))  # fmt: skip
        assert again["plan"] == moved and engine.calls["plan_layout"] == planned
        flipped = [{"label": "red circle", "box": [60, 40, 40, 60]}]
        text = _error(await client.call_tool("generate", {"prompt": "a red circle",
                                                          "plan": flipped}))  # fmt: skip
        assert "plan: layout item 0" in text and "x1 (40.0) must be >= x0 (60.0)" in text
        short = [{"label": "red circle", "box": [1, 2]}]  # refused by the SDK's type check
        text = _error(await client.call_tool("generate", {"prompt": "a red circle", "plan": short}))
        assert "plan: layout item 0" in text and "plan.bool" not in text, text


async def test_an_edit_of_a_wide_image_is_shown_in_its_shape(agent, engine):
    from lavida_agent.tools.images import decode_png

    async with Client(create_mcp(agent)) as client:
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[[0.0, 16.0, 32.0, 48.0]]))
        result = await client.call_tool("edit", {"image": _b64(np.full((64, 128, 3), 200, np.uint8)),
                                                 "instruction": "repaint", "seed": 1})  # fmt: skip
        data = _ok(result)
        shown = decode_png(base64.b64decode(result.content[0].data))
        assert data["content_box"] == [0, 16, 64, 48]
        assert shown.shape[0] * 2 == shown.shape[1]  # 2:1 as the input, not the letterboxed square


async def test_edit_sessions_continue_undo_redo_branch_and_history(agent, engine):
    async with Client(create_mcp(agent)) as client:
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
        first = _ok(await client.call_tool("edit", {"image": "data:image/png;base64," + _b64(_scene()),
                                                    "instruction": "redo blue", "seed": 1}))  # fmt: skip
        session = first["session"]
        assert first["step"] == 0 and first["session"] == first["thread_id"]
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
        second = _ok(await client.call_tool("edit", {"session": session, "instruction": "redo red",
                                                     "seed": 2}))  # fmt: skip
        assert second["session"] == session and second["step"] == 1
        hist = _ok(await client.call_tool("history", {"session": session}))
        assert [(s["index"], s["instruction"]) for s in hist["steps"]] == [(0, "redo blue"),
                                                                           (1, "redo red")]  # fmt: skip
        assert hist["image"] == second["image"] == hist["steps"][1]["image"]
        every = _ok(await client.call_tool("history", {"session": session, "all": True}))
        assert [s["index"] for s in every["steps"]] == [0, 1]  # no restart: the same steps
        undo = _ok(await client.call_tool("undo", {"session": session}))
        assert undo["image"] == first["image"] and undo["session"] == session
        assert _ok(await client.call_tool("redo", {"session": session}))["image"] == second["image"]
        back = _ok(await client.call_tool("branch", {"session": session, "step": 0}))
        assert back["image"] == first["image"]
        sha = second["image"].rsplit("/", 1)[-1]  # step 1 of the branch left behind, by its image
        again = _ok(await client.call_tool("branch", {"session": session, "step": 1, "image": sha[:12]}))
        assert again["image"] == second["image"]
        # an image restarts the session from it
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
        blank = np.full((64, 64, 3), 255, np.uint8)
        restart = _ok(await client.call_tool("edit", {"session": session, "image": _b64(blank),
                                                      "instruction": "redo red"}))  # fmt: skip
        assert restart["session"] == session
        assert restart["attempts"][0]["image"] and restart["image"] != second["image"]


async def test_images_by_uri_data_url_base64_and_path(agent, tmp_path):
    async with Client(create_mcp(agent)) as client:
        scene = _scene()
        path = tmp_path / "scene.png"
        path.write_bytes(encode_png(scene))
        sha = agent.store.put(scene).sha256
        wrapped = "\n".join(_b64(scene)[i : i + 76] for i in range(0, len(_b64(scene)), 76))
        forms = [IMAGE_URI + sha, "data:image/png;base64," + _b64(scene), _b64(scene), wrapped,
                 str(path)]  # fmt: skip
        boxes = []
        for form in forms:
            data = _ok(
                await client.call_tool("ground", {"image": form, "expressions": ["red circle"]})
            )
            boxes.append(data["boxes"])
            assert data["image"] == IMAGE_URI + sha  # the same canvas, stored once
        assert boxes == [[RED["box"]]] * 5


async def test_a_server_that_reads_no_files_refuses_paths(agent, tmp_path):
    path = tmp_path / "scene.png"
    path.write_bytes(encode_png(_scene()))
    async with Client(create_mcp(agent, read_files=False)) as c:
        text = _error(await c.call_tool("ask", {"image": str(path), "question": "what is it?"}))
        assert "does not read files" in text and "data:image/png;base64" in text
        ok = await c.call_tool("ask", {"image": _b64(_scene()), "question": "what is it?"})
        assert not ok.is_error


async def test_bad_arguments_are_tool_errors_naming_them(agent, engine):
    async with Client(create_mcp(agent)) as client:
        engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
        session = _ok(await client.call_tool("edit", {"image": _b64(_scene()),
                                                      "instruction": "redo blue"}))["session"]  # fmt: skip
        before = dict(engine.calls)
        cases = [
            ("generate", {"prompt": "  "}, "prompt must not be empty"),
            ("generate", {"prompt": "a red circle", "steps": 65}, "above the server limit of 64"),
            ("generate", {"prompt": "a red circle", "rounds": 99}, "rounds=99"),
            ("generate", {"prompt": "x" * 2001}, "2001 characters"),
            ("generate", {"prompt": "a red circle", "seed": -1}, "seed"),
            # the SDK's own type checks, said in one line as every other error
            ("generate", {"prompt": "a red circle", "seed": "abc"},
             "Error executing tool generate: seed: Input should be a valid integer"),
            ("generate", {"prompt": 5}, "prompt: Input should be a valid string"),
            ("generate", {}, "prompt: Field required"),
            ("ground", {"image": "x", "expressions": "the red circle"}, "expressions: Input should be a valid list"),
            ("edit", {"instruction": "redo blue"}, "image: give the image to edit"),
            ("edit", {"session": "no-such-session", "instruction": "redo"}, "no session 'no-such-session'"),
            ("edit", {"session": "../etc", "instruction": "redo"}, "session: no session"),
            ("edit", {"image": "data:image/png;base64,@@@", "instruction": "x"}, "image: not valid base64"),
            ("ask", {"image": IMAGE_URI + "0" * 64, "question": "what?"}, "no image '" + "0" * 64),
            ("ask", {"image": "/no/such/file.png", "question": "what?"}, "no such image file"),
        ("ask", {"image": "img_" + "a" * 300, "question": "what?"}, "image: not a readable file"),
            ("ask", {"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode(),
                     "question": "what?"}, "image: "),
            ("ground", {"image": _b64(_scene()), "expressions": []}, "expressions"),
        ("generate", {"prompt": "a red circle", "sead": 3}, "sead: unknown argument of generate"),
            ("undo", {"session": "nope"}, "no session 'nope'"),
            ("branch", {"session": session, "step": 7}, "no step 7"),
            ("redo", {"session": session}, "nothing to redo"),
        ]  # fmt: skip
        for tool, args, expected in cases:
            text = _error(await client.call_tool(tool, args))
            assert expected in text and "\n" not in text and "pydantic" not in text, (tool, args, text)
        assert dict(engine.calls) == before  # each was refused before the model ran
        hist = _ok(await client.call_tool("history", {"session": session}))
        assert [s["instruction"] for s in hist["steps"]] == ["redo blue"]


async def test_a_tool_that_crashes_on_a_validation_error_stays_a_crash(agent, monkeypatch):
    """Only the arguments' own check is said as `field: message`; a pydantic error inside a
    tool is a bug, and its text does not reach the client."""
    from pydantic import TypeAdapter

    async def crash(*args, **kwargs):
        TypeAdapter(int).validate_python("internal")

    monkeypatch.setattr(agent, "agenerate", crash)
    async with Client(create_mcp(agent)) as client:
        text = _error(await client.call_tool("generate", {"prompt": "a red circle"}))
    assert text == "Error executing tool generate"


async def test_images_over_the_upload_limit_are_refused(engine, tmp_path):
    with LavidaAgent(engine=engine, num_steps=4, max_upload_bytes=1024) as small:
        async with Client(create_mcp(small)) as c:
            noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            text = _error(await c.call_tool("ask", {"image": _b64(noisy), "question": "what?"}))
            assert "over" in text and "1024" in text


async def test_image_and_trace_resources(agent):
    async with Client(create_mcp(agent)) as client:
        data = _ok(await client.call_tool("generate", {"prompt": "a red circle", "seed": 1,
                                                       "rounds": 1}))  # fmt: skip
        image = (await client.read_resource(data["image"])).contents[0]
        assert image.mime_type == "image/png"
        sha = data["image"].removeprefix(IMAGE_URI)
        assert base64.b64decode(image.blob) == agent.store.read_bytes(sha)
        trace = json.loads((await client.read_resource(data["trace_uri"])).contents[0].text)
        assert trace["run_id"] == data["run_id"] and trace["workflow"] == "t2i"
        templates = {
            t.uri_template for t in (await client.list_resource_templates()).resource_templates
        }
        assert templates == {IMAGE_URI + "{sha256}", TRACE_URI + "{run_id}"}
        for uri in (TRACE_URI + "nope", TRACE_URI + "..", IMAGE_URI + "abc", IMAGE_URI + "0" * 64):
            with pytest.raises(MCPError):
                await client.read_resource(uri)


async def test_a_cancelled_call_stops_its_run(agent, engine):
    """Cancelling the caller cancels the tool's task; the run stops at its next sampler step."""
    started, release = pause(engine, "generate")
    async with Client(create_mcp(agent)) as c:
        call = asyncio.ensure_future(c.call_tool("generate", {"prompt": "a red circle", "seed": 1}))
        assert await asyncio.to_thread(started.wait, 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        del engine.generate
        assert await asyncio.to_thread(_cancelled_trace, agent, 10) is not None
        # the server keeps serving
        assert not (await c.call_tool("generate", {"prompt": "a red circle", "rounds": 1})).is_error


async def test_a_cancelled_edit_holds_its_session_until_its_run_stops(agent, engine):
    """Edit A is cancelled in its last engine call (its edit still commits); edit B on the
    same session must wait for A's run to stop, or A's late checkpoint would hide B."""
    engine.enqueue_edit_plan(EditPlanResult(target_boxes=[BLUE["box"]], layout=[BLUE]))
    entered, release = pause(engine, "noun_fit", at=2)  # edit A's (the first is turn0's)
    async with Client(create_mcp(agent)) as client:
        first = _ok(await client.call_tool("edit", {"image": _b64(_scene()),
                                                    "instruction": "turn0", "seed": 1}))  # fmt: skip
        session = first["session"]
        for _ in range(2):
            engine.enqueue_edit_plan(EditPlanResult(target_boxes=[RED["box"]], layout=[RED]))
        a = asyncio.ensure_future(client.call_tool("edit", {"session": session,
                                                            "instruction": "A", "seed": 2}))  # fmt: skip
        assert await asyncio.to_thread(entered.wait, 10)
        a.cancel()
        b = asyncio.ensure_future(client.call_tool("edit", {"session": session,
                                                            "instruction": "B", "seed": 3}))  # fmt: skip
        done, _ = await asyncio.wait([b], timeout=1.0)
        assert not done, [t.result() for t in done]  # B waits while A is still in the engine
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await a
        assert _ok(await b)["step"] == 2
        hist = _ok(await client.call_tool("history", {"session": session}))
        assert [s["instruction"] for s in hist["steps"]] == ["turn0", "A", "B"]
        assert hist["image"] == hist["steps"][-1]["image"]


def _cancelled_trace(agent, timeout_s: float) -> dict | None:
    """The first trace in the runs folder that ended cancelled, waiting up to `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in agent.settings.runs_dir.glob("*.json"):
            trace = json.loads(path.read_text())
            if "cancel" in (trace.get("error") or ""):
                return trace
        time.sleep(0.05)
    return None


def test_progress_messages_name_the_step():
    assert progress_message({"event": "sampler_step", "node": "edit_image", "step": 3,
                             "total": 16}) == "edit_image: step 3/16"  # fmt: skip
    assert progress_message({"event": "node_end", "node": "plan_layout",
                             "elapsed_s": 0.5}) == "plan_layout done in 0.50s"  # fmt: skip
    assert progress_message({"event": "critique", "critique": {
        "verdict": "reject", "reasons": ["missing blue square"]}}) == \
        "critique: reject (missing blue square)"  # fmt: skip
    assert progress_message({"event": "plan", "plan": {"items": [{"label": "red circle"}]}}) == \
        "plan: red circle"  # fmt: skip
    assert progress_message({"event": "run_start", "run_id": "r1", "workflow": "edit"}) == \
        "run r1 started (edit)"  # fmt: skip
    assert progress_message({"event": "run_end"}) == "run end"


def test_display_scale_is_checked(agent):
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="display_scale"):
            create_mcp(agent, display_scale=bad)


# -- over HTTP (the `/mcp` route of the server) ----------------------------------------------

_INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
         "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "test", "version": "0"}}}  # fmt: skip
_MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


def _post_mcp(client, body=None, **headers) -> int:
    return client.post("/mcp", json=body or _INIT, headers={**_MCP_HEADERS, **headers}).status_code


def test_http_mcp_runs_in_each_lifespan_of_the_app(agent):
    from fastapi.testclient import TestClient

    from lavida_agent.server import create_app

    app = create_app(agent=agent)
    for _ in range(2):  # a restarted app (or a second test client) gets a fresh session manager
        with TestClient(app, base_url="http://127.0.0.1:8000") as client:
            assert _post_mcp(client) == 200
    bare = TestClient(app, base_url="http://127.0.0.1:8000")  # no lifespan: says so
    response = bare.post("/mcp", json=_INIT, headers=_MCP_HEADERS)
    assert response.status_code == 503 and "lifespan" in response.json()["error"]["message"]


def test_http_mcp_host_checks_follow_the_bind_and_the_key(agent):
    from fastapi.testclient import TestClient

    from lavida_agent.server import create_app

    with TestClient(create_app(agent=agent), base_url="http://127.0.0.1:8000") as client:
        assert _post_mcp(client, Host="localhost") == 200  # loopback, with or without a port
        assert _post_mcp(client, Host="127.0.0.1:9999") == 200
        assert _post_mcp(client, Host="attacker.example") == 421  # DNS rebinding
        assert _post_mcp(client, Origin="http://attacker.example") in (403, 421)
    keyed = agent.settings.replace(api_key="k")
    with TestClient(create_app(keyed, agent=agent), base_url="http://myserver.lan") as client:
        assert _post_mcp(client) == 401  # the key guards /mcp like every route
        assert _post_mcp(client, Authorization="Bearer k") == 200  # and then any Host is fine


def test_http_mcp_takes_bodies_up_to_the_servers_own_limit(agent):
    from fastapi.testclient import TestClient

    from lavida_agent.server import create_app

    with TestClient(create_app(agent=agent), base_url="http://127.0.0.1:8000") as client:
        limit = 2 * agent.settings.max_upload_bytes + 64 * 1024
        big = {**_INIT, "params": {**_INIT["params"], "pad": "x" * (5 * 2**20)}}  # over 4 MiB
        assert _post_mcp(client, big) != 413  # the SDK's own default would refuse this
        huge = {**_INIT, "params": {**_INIT["params"], "pad": "x" * limit}}
        response = client.post("/mcp", json=huge, headers=_MCP_HEADERS)
        assert response.status_code == 413 and response.json()["error"]["code"]  # the guard's


async def test_remote_results_hold_no_server_paths(agent):
    async with Client(create_mcp(agent, read_files=False)) as client:
        data = _ok(await client.call_tool("generate", {"prompt": "a red circle", "rounds": 2}))
        assert "result" not in data and "trace" not in data
        assert all(a["image"].startswith(IMAGE_URI) for a in data["attempts"])
        assert str(agent.settings.home) not in json.dumps(data)
    async with Client(create_mcp(agent)) as client:  # a local client keeps the paths
        data = _ok(await client.call_tool("generate", {"prompt": "a red circle", "rounds": 1}))
        assert data["result"].endswith(".png") and data["trace"].endswith(".json")


async def test_resume_finishes_a_cancelled_call(agent, engine):
    """A call cancelled mid-run (a host's timeout) is finished by `resume(run_id)`."""
    entered, release = pause(engine, "generate")  # the first drawing
    async with Client(create_mcp(agent)) as client:
        call = asyncio.ensure_future(client.call_tool("generate", {"prompt": "a red circle",
                                                                   "seed": 4, "rounds": 3}))  # fmt: skip
        assert await asyncio.to_thread(entered.wait, 10)
        call.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        del engine.generate
        trace = await asyncio.to_thread(_cancelled_trace, agent, 10)
        listed = _ok(await client.call_tool("runs", {"unfinished": True}))["runs"]
        assert [r["run_id"] for r in listed] == [trace["run_id"]]  # found without progress
        data = _ok(await client.call_tool("resume", {"run_id": trace["run_id"]}))
        assert data["resumed_from"] == trace["run_id"] and data["seed"] == 4
        assert engine.calls["plan_layout"] == 3  # planned once (three plans drawn up): not again
        again = _ok(await client.call_tool("resume", {"run_id": trace["run_id"]}))
        assert again["image"] == data["image"]  # a retried resume gets the result again
        for bad in ("nope", "/etc/passwd.json", "../runs/x"):
            text = _error(await client.call_tool("resume", {"run_id": bad}))
            assert f"no trace for run {bad!r}" in text and str(agent.settings.home) not in text
