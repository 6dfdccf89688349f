"""A real uvicorn server on 127.0.0.1 (free port, in a thread, stopped at the end) driven by the
official `openai` client: `images.generate` (plain and streamed) and `images.edit`."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from lavida_agent.tools.images import decode_png, encode_png

from lavida_agent.api import LavidaAgent
from lavida_agent.server import create_app
from lavida_agent.settings import Settings
from tests.fakes import FakeEngine, draw

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "integration-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(engine: FakeEngine, **settings: object) -> Iterator[str]:
    """Serve an agent on `engine` with uvicorn in a thread; yields the `/v1` base URL."""
    config_settings = Settings.from_env(api_key=KEY, **settings)
    agent = LavidaAgent(engine=engine, settings=config_settings)
    port = _free_port()
    config = uvicorn.Config(create_app(config_settings, agent=agent), host="127.0.0.1",
                            port=port, log_level="warning", lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        agent.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def server_url():
    with _serve(FakeEngine(), num_steps=4) as url:
        yield url


def _decode(b64: str) -> np.ndarray:
    return decode_png(base64.b64decode(b64))


def test_openai_client_generate_edit_and_stream(server_url):
    client = openai.OpenAI(base_url=server_url, api_key=KEY, timeout=30, max_retries=0)

    res = client.images.generate(prompt="red circle and blue square", n=2, size="256x256",
                                 response_format="b64_json", extra_body={"seed": 7})  # fmt: skip
    assert isinstance(res.created, int) and len(res.data) == 2
    images = [_decode(d.b64_json) for d in res.data]
    assert all(i.shape == (256, 256, 3) for i in images)
    assert not np.array_equal(images[0], images[1])

    scene = draw(np.zeros((64, 64, 3), np.uint8),
                 [{"label": "red circle", "box": [8.0, 8.0, 24.0, 24.0]}])  # fmt: skip
    res = client.images.edit(image=("scene.png", encode_png(scene), "image/png"),
                             prompt="make the circle green", size="64x64")  # fmt: skip
    assert _decode(res.data[0].b64_json).shape == (64, 64, 3)

    url = client.images.generate(prompt="red circle", response_format="url").data[0].url
    assert decode_png(httpx.get(url, timeout=10).content).shape == (64, 64, 3)

    events = list(client.images.generate(prompt="red circle", stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_generation.partial_image",
                                        "image_generation.completed"]  # fmt: skip
    assert _decode(events[-1].b64_json).shape == (64, 64, 3)


def test_openai_client_errors(server_url):
    bad = openai.OpenAI(base_url=server_url, api_key="wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="red circle")
    client = openai.OpenAI(base_url=server_url, api_key=KEY, timeout=30, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="red circle", size="1536x1024")
    assert info.value.body["param"] == "size"


class _CountingEngine(FakeEngine):
    """Counts sampler steps actually run (a cancelled run stops counting)."""

    steps = 0

    def _sample(self, num_steps, on_step, final):  # type: ignore[no-untyped-def]
        def count(ev):  # type: ignore[no-untyped-def]
            self.steps += 1
            if on_step is not None:
                on_step(ev)

        super()._sample(num_steps, count, final)


def test_a_client_that_disconnects_cancels_its_run():
    engine = _CountingEngine(step_delay_s=0.02)
    with _serve(engine, num_steps=60, max_steps=100) as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"workflow": "generate", "prompt": "red circle", "plan": False, "rounds": 1}
        run_id = None
        with httpx.stream("POST", f"{url}/runs/stream", json=body, headers=headers,
                          timeout=30) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: ") and run_id is None:
                    run_id = json.loads(line[6:])["run_id"]
                if line == "event: sampler_step":
                    break  # hang up mid-run
        time.sleep(0.3)
        stopped_at = engine.steps
        time.sleep(0.3)
        assert engine.steps == stopped_at < 60  # no step ran after the cancellation
        trace = httpx.get(f"{url}/traces/{run_id}", headers=headers, timeout=30).json()
        assert "cancel" in trace["error"]
        ok = httpx.post(f"{url}/images/generations", json={"prompt": "red circle", "steps": 2},
                        headers=headers, timeout=30)  # fmt: skip
        assert ok.status_code == 200


def test_a_dropped_plain_request_stops_its_run_and_a_retried_edit_is_applied_once():
    engine = _CountingEngine(step_delay_s=0.02)
    with _serve(engine, num_steps=60, max_steps=100, max_rounds=1) as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        png = base64.b64encode(encode_png(np.zeros((64, 64, 3), np.uint8))).decode()
        sid = httpx.post(f"{url}/sessions", json={"image": png}, headers=headers, timeout=30).json()["session_id"]
        edit = {"instruction": "add a blue square", "seed": 1, "steps": 60}
        for path, body in ((f"/sessions/{sid}/edit", edit), ("/images/generations", {"prompt": "red circle",
                                                                                    "steps": 60})):  # fmt: skip
            with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-run
                httpx.post(f"{url}{path}", json=body, headers=headers, timeout=0.5)
            time.sleep(1.0)
            stopped_at = engine.steps
            time.sleep(0.3)
            assert engine.steps == stopped_at  # the run stopped; nothing runs behind the client's back
        history = httpx.get(f"{url}/sessions/{sid}/history", headers=headers, timeout=30).json()
        assert history["steps"] == []  # the dropped turn committed nothing
        retry = httpx.post(f"{url}/sessions/{sid}/edit", json={**edit, "steps": 2}, headers=headers, timeout=30)
        assert retry.status_code == 200, retry.text
        history = httpx.get(f"{url}/sessions/{sid}/history", headers=headers, timeout=30).json()
        assert [s["instruction"] for s in history["steps"]] == ["add a blue square"]  # once


def test_mcp_tools_over_http_behind_the_api_key(server_url):
    """`serve` answers MCP at /mcp (streamable HTTP) on the same agent, behind the same key."""
    pytest.importorskip("mcp")
    import asyncio

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    url = server_url.removesuffix("/v1") + "/mcp"
    assert httpx.post(url, json={}).status_code == 401  # no key, no MCP

    async def session() -> tuple[set[str], dict, int, str]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http, \
                Client(streamable_http_client(url, http_client=http)) as client:  # fmt: skip
            names = {t.name for t in (await client.list_tools()).tools}
            steps = []

            async def progress(value: float, total: float | None, message: str | None) -> None:
                steps.append(message)

            result = await client.call_tool("generate", {"prompt": "a red circle", "seed": 3},
                                            progress_callback=progress)  # fmt: skip
            refused = await client.call_tool("ask", {"image": "/etc/hostname", "question": "what?"})
            return names, result.structured_content, len(steps), refused.content[0].text

    names, data, n_progress, refused = asyncio.run(session())
    assert {"generate", "edit", "ground", "ask", "undo", "history"} <= names
    assert data["seed"] == 3 and data["image"].startswith("lavida://images/")
    assert n_progress > 4  # progress notifications reach an HTTP client too
    assert "does not read files" in refused  # over HTTP, paths are refused
    # the image is the same one the HTTP API serves
    sha = data["image"].removeprefix("lavida://images/")
    assert httpx.get(f"{server_url}/artifacts/{sha}").status_code == 200
