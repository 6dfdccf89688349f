"""`lavida-agent mcp` as a host launches it: a subprocess speaking MCP over stdio, on the
shipped model. Nothing but protocol may reach its stdout."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from lavida_agent.tools.images import encode_png
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.scene import Object, Scene

pytest.importorskip("mcp")

from mcp import Client, StdioServerParameters  # noqa: E402


def _command() -> str:
    exe = Path(sys.executable).with_name("lavida-agent")
    return str(exe) if exe.exists() else shutil.which("lavida-agent") or "lavida-agent"


def test_stdio_server_runs_the_shipped_model(tmp_path):
    scene = Scene("white", (Object("circle", "red", "large", (6, 6, 30, 30)),
                            Object("square", "blue", "large", (36, 36, 60, 60))))  # fmt: skip
    path = tmp_path / "scene.png"
    path.write_bytes(encode_png(np.asarray(render(scene))))
    params = StdioServerParameters(command=_command(), args=["mcp"],
                                   env={**os.environ, "LAVIDA_HOME": str(tmp_path / "home")})  # fmt: skip

    async def session() -> tuple[dict, dict]:
        async with Client(params) as client:
            answer = await client.call_tool("ask", {"image": str(path),
                                                    "question": "what color is the circle?"})  # fmt: skip
            boxes = await client.call_tool("ground", {"image": answer.structured_content["image"],
                                                      "expressions": ["the blue square"]})  # fmt: skip
            return answer.structured_content, boxes.structured_content

    answer, boxes = asyncio.run(asyncio.wait_for(session(), timeout=120))
    assert answer["answer"] == "red"
    x0, y0, x1, y1 = boxes["boxes"][0]
    assert abs(x0 - 36) <= 3 and abs(y0 - 36) <= 3 and abs(x1 - 60) <= 3 and abs(y1 - 60) <= 3
