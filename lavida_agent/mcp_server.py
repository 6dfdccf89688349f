"""The agent as an MCP server, for MCP hosts (Claude Desktop, Claude Code, IDE agents, ...).

    lavida-agent mcp                  # stdio: the command a desktop host launches
    lavida-agent serve                # HTTP: the same tools at http://127.0.0.1:8000/mcp

    mcp = create_mcp(LavidaAgent.from_pretrained())   # in Python; mcp.run() is stdio

Tools (each runs the same workflow as the CLI and the HTTP API and records its trace):

    generate(prompt, seed?, rounds?, steps?, plan?)         plan, draw, critique, keep the best
    edit(instruction, image? | session?, seed?, rounds?, steps?)   one verified edit turn
    ground(image, expressions)     one box per referring expression, in the input's pixels
    ask(image, question)           an answer about the image
    critique(image, prompt)        does the image show what the prompt asks for
    undo(session) / redo(session) / branch(session, step) / history(session)
    resume(run_id)                 finish a generate or edit run that stopped part-way
    runs(limit?, unfinished?)      the newest runs and their status (a cancelled call's id)

`edit` without `session` starts one from `image`; its result's `session` continues it, so a
host keeps a multi-turn edit by passing that id back (and may `undo` a turn it regrets).

Images in: every `image` argument is a `lavida://images/<sha256>` URI from an earlier result,
a `data:image/png;base64,...` URL or bare base64, or (stdio only: the server runs on the
host's machine) a file path. Over HTTP a path is refused, so a remote client cannot make the
server read its files.

Results: an image-making tool answers with the image (PNG, upscaled `display_scale` times,
nearest neighbour, so a host can show a 64 px canvas), the JSON result as text, and the
same JSON as structured content: the CLI's `--json` fields plus `image`, the result's
`lavida://images/` URI, and `trace_uri`; attempts name their images by URI too. The local
paths of the store and the trace (`result`, `trace`) are left out over HTTP. Resources:
`lavida://images/{sha256}` (the canvas-sized PNG) and `lavida://traces/{run_id}` (the JSON
trace).

Progress: every workflow event (node start and end, each sampler step, plan, critique) is a
progress notification whose `progress` counts events (no `total`: the number of rounds is not
known in advance) and whose `message` names the step, so hosts that give up on silent calls
keep waiting. A cancelled call stops its run at the next sampler step, and holds its
session until the run has stopped (so the next turn cannot interleave with it).

Errors: bad arguments (a limit, an unknown image, an instruction the world cannot parse is
still run, as everywhere) come back as tool errors whose text names the argument, never as a
crash. The deployment limits of the HTTP server (`Settings.max_prompt_chars`, `max_steps`,
`max_rounds_limit`, `max_upload_bytes`, `max_pixels`) apply here too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceError, ToolError, UnexpectedToolError
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from lavida_agent import __version__, schemas
from lavida_agent.api import (
    EditResult,
    EventCallback,
    LavidaAgent,
    RunResult,
    Session,
    _in_thread,
    run_with_events,
)
from lavida_agent.errors import LavidaError
from lavida_agent.settings import SEED_LIMIT
from lavida_agent.tools.artifacts import ImageRef

logger = logging.getLogger(__name__)

__all__ = ("IMAGE_URI", "TRACE_URI", "create_mcp")

IMAGE_URI = "lavida://images/"
TRACE_URI = "lavida://traces/"
_SHA_RE = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")

INSTRUCTIONS = """\
lavida-agent draws, edits, grounds and answers questions about 64x64 ShapesWorld images:
one to four flat shapes (circle, square, triangle, diamond; red, green, blue, yellow,
purple, orange; small or large) on a white, black or gray background. Prompts: "a red
circle left of a blue square", "two green triangles on a black background". Edits:
"make the circle green", "remove the square", "move the triangle to the top left",
"add a small yellow diamond right of the circle". Pass an image back as the
lavida://images/... URI a result gave; continue an edit with its `session`."""

# Argument types: what the host's model reads in the tool's input schema.
Seed = Annotated[int | None, Field(ge=0, lt=SEED_LIMIT, description="Base seed (round r "
                                   "uses seed + r); default random, in the result.")]  # fmt: skip
Rounds = Annotated[int | None, Field(ge=1, description="Most images to draw (the agent keeps the "
                                     "best); default the server's (3).")]  # fmt: skip
Steps = Annotated[int | None, Field(ge=1, description="Denoising steps per image.")]
PlanArg = Annotated[bool | list[schemas.LayoutIn] | None, BeforeValidator(schemas.check_layout),
                    Field(description=schemas.GenerateRequest.model_fields["plan"].description)]
ImageArg = Annotated[str, Field(description="A lavida://images/<sha256> URI from an earlier "
                                "result, a data:image/...;base64 URL or base64, or (stdio) a "
                                "file path.")]  # fmt: skip
# Hints for hosts (some approve read-only tools without asking): nothing here reaches outside
# the process; drawing tools add images and sessions, which no tool here deletes.
READS = ToolAnnotations(read_only_hint=True, open_world_hint=False)
DRAWS = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
SessionArg = Annotated[str, Field(description="The `session` an earlier edit returned.")]
Prompt = Annotated[str, Field(description='What to draw, in the ShapesWorld grammar: "a red '
                              'circle left of a blue square", "two green triangles on a black '
                              'background".')]  # fmt: skip
Instruction = Annotated[str, Field(description='The edit: "make the circle green", "remove the '
                                   'square", "move the triangle to the top left", "add a small '
                                   'yellow diamond right of the circle".')]  # fmt: skip
Expressions = Annotated[list[str], Field(description='Referring expressions, one box each: '
                                         '"the red circle", "the large square".')]  # fmt: skip
Question = Annotated[str, Field(description='"what color is the circle?", "how many triangles '
                                'are there?", "is there a square?"')]  # fmt: skip
SessionOpt = Annotated[str | None, Field(description="Continue this session (its current "
                                         "image); with `image` too, restart it from that "
                                         "image.")]  # fmt: skip


def create_mcp(
    agent: LavidaAgent,
    *,
    read_files: bool = True,
    display_scale: int = 4,
    session_lock: Callable[[str], asyncio.Lock] | None = None,
) -> MCPServer:
    """An MCP server whose tools run `agent`'s workflows.

    Args:
        agent: the agent to serve (its settings give the limits and folders).
        read_files: accept file paths as `image` arguments (stdio: the client is local).
        display_scale: nearest-neighbour upscale of the images the tools return.
        session_lock: one `asyncio.Lock` per session id, shared with another surface on the
            same agent (the HTTP server passes its own); default: locks of this server.
    """
    tools = _Tools(agent, read_files=read_files, display_scale=display_scale,
                   session_lock=session_lock)  # fmt: skip
    mcp: MCPServer = _StrictServer("lavida-agent", version=__version__,
                                   instructions=INSTRUCTIONS, log_level="WARNING")  # fmt: skip

    @mcp.tool(title="Generate an image", annotations=DRAWS)
    async def generate(ctx: Context, prompt: Prompt, seed: Seed = None, rounds: Rounds = None,
                       steps: Steps = None, plan: PlanArg = None) -> CallToolResult:  # fmt: skip
        """Draw an image for `prompt`: the model plans a layout (unless `plan` is false or a
        layout to draw), draws up to `rounds` attempts, critiques each and keeps the best. The
        result says whether the model's own check accepted it, and holds the plan, every
        attempt and the trace. To change where things go, pass a result's `plan` back, edited."""
        req = tools.check(schemas.GenerateRequest, prompt=prompt, seed=seed, rounds=rounds,
                          steps=steps, plan=plan)  # fmt: skip

        def call(on_event: EventCallback) -> Awaitable[Any]:
            return agent.agenerate(req.prompt, seed=req.seed, rounds=req.rounds,
                                   plan=req.plan_arg(), num_steps=req.steps,
                                   on_event=on_event)  # fmt: skip

        result = await tools.run(ctx, call)
        return tools.answer(result, result.to_dict())

    @mcp.tool(title="Edit an image", annotations=DRAWS)
    async def edit(ctx: Context, instruction: Instruction, image: ImageArg | None = None,
                   session: SessionOpt = None, seed: Seed = None, rounds: Rounds = None,
                   steps: Steps = None) -> CallToolResult:  # fmt: skip
        """Edit an image by `instruction`: the model plans the edit (what changes where), edits,
        verifies and re-edits up to `rounds` times, and commits the best attempt. Give `image`
        to start a new session, or `session` to edit its current image; the result's `session`
        continues it (`undo`, `redo`, `history`)."""
        req = tools.check(schemas.SessionEditRequest, instruction=instruction, seed=seed,
                          rounds=rounds, steps=steps)  # fmt: skip
        if image is None and session is None:
            raise ToolError("image: give the image to edit, or the session to continue")
        source = await tools.image(image) if image is not None else None
        async with tools.lock(session) if session else contextlib.nullcontext():
            s = await tools.session(session, must_exist=source is None)

            def call(on_event: EventCallback) -> Awaitable[Any]:
                return s.aedit(req.instruction, image=source, seed=req.seed, rounds=req.rounds,
                               num_steps=req.steps, on_event=on_event)  # fmt: skip

            result = await tools.run(ctx, call)
        data = {"session": result.thread_id, **result.to_dict()}
        return tools.answer(result, data)

    @mcp.tool(title="Resume a run", annotations=DRAWS)
    async def resume(
        ctx: Context,
        run_id: Annotated[str, Field(description="The `run_id` of a generate or edit run.")],
    ) -> CallToolResult:
        """Finish a generate or edit run that stopped part-way (a cancelled call, a restarted
        server) from its last checkpoint: what it finished is not drawn again, and the result
        is what the whole run would have given."""
        session = await tools.guard(asyncio.to_thread(agent.resume_session, run_id))
        async with tools.lock(session) if session else contextlib.nullcontext():
            result = await tools.run(ctx, lambda on_event: agent.aresume(run_id, on_event=on_event))
        data = {"resumed_from": run_id, **({"session": session} if session else {}),
                **result.to_dict()}  # fmt: skip
        return tools.answer(result, data)

    @mcp.tool(title="Recent runs", annotations=READS)
    async def runs(
        limit: Annotated[int, Field(ge=1, le=200, description="How many, newest first.")] = 10,
        unfinished: Annotated[bool, Field(description="Only generate and edit runs that did "
                                          "not finish (what `resume` takes).")] = False,
    ) -> CallToolResult:  # fmt: skip
        """The newest runs first: run_id, workflow, status (ok, running, stopped, failed,
        unfinished, resumed), when, and what was asked. A call that was cancelled or timed out is here
        with its run_id."""
        from lavida_agent.traces import recent_runs

        found = await tools.guard(asyncio.to_thread(
            recent_runs, agent.settings.runs_dir, limit=limit, unfinished=unfinished))  # fmt: skip
        return tools.json_answer({"runs": found})

    @mcp.tool(title="Find objects", annotations=READS)
    async def ground(ctx: Context, image: ImageArg, expressions: Expressions) -> CallToolResult:
        """One box `[x0, y0, x1, y1]` per referring expression, in the input image's pixels,
        with what the model perceived in the image (`caption`, `objects`). Every expression
        gets a box, even one naming nothing in the image: `present` says whether the image
        holds it (false: the box is only the nearest look-alike; null: not checked), and
        `found_by` how the box was chosen ('scene' or 'fit': an object the model perceived;
        'direct': the model's own box)."""
        req = tools.check(schemas.GroundRequest, expressions=expressions)
        return await tools.look(ctx, image, lambda pixels, on_event: agent.aground(
            pixels, req.expressions, on_event=on_event))  # fmt: skip

    @mcp.tool(title="Ask about an image", annotations=READS)
    async def ask(ctx: Context, image: ImageArg, question: Question) -> CallToolResult:
        """Answer a question about the image ("what color is the circle?", "how many
        triangles are there?", "is there a square?", "what is left of the diamond?")."""
        req = tools.check(schemas.AskRequest, question=question)
        return await tools.look(ctx, image, lambda pixels, on_event: agent.aask(
            pixels, req.question, on_event=on_event))  # fmt: skip

    @mcp.tool(title="Critique an image", annotations=READS)
    async def critique(ctx: Context, image: ImageArg, prompt: Prompt) -> CallToolResult:
        """Does the image show what the text-to-image `prompt` asks for? A verdict ("accept"
        or "reject") and the reasons."""
        req = tools.check(schemas.CritiqueRequest, prompt=prompt)
        return await tools.look(ctx, image, lambda pixels, on_event: agent.acritique(
            pixels, req.prompt, on_event=on_event))  # fmt: skip

    @mcp.tool(title="Undo an edit", annotations=DRAWS)
    async def undo(session: SessionArg) -> CallToolResult:
        """Go back one turn of the session. `history` then lists the turns up to there; `redo`
        returns to the undone turn (until the next edit)."""
        return await tools.move(session, lambda s: s.undo())

    @mcp.tool(title="Redo an edit", annotations=DRAWS)
    async def redo(session: SessionArg) -> CallToolResult:
        """Return to where the session's last undo or branch left from."""
        return await tools.move(session, lambda s: s.redo())

    @mcp.tool(title="Go back to a step", annotations=DRAWS)
    async def branch(
        session: SessionArg,
        step: Annotated[int, Field(ge=0, description="The `index` of a step `history` lists "
                                   "(a lineage index, not a turn number; `undo` goes back to "
                                   "the start).")],  # fmt: skip
        image: schemas.ImagePrefix | None = None,
    ) -> CallToolResult:
        """Make the image of the session's step `step` current (a new branch)."""
        return await tools.move(session, lambda s: s.branch(step, image=image))

    @mcp.tool(title="Edit history", annotations=READS)
    async def history(
        session: SessionArg,
        all: Annotated[bool, Field(description="Every attempt of the current branch's lineage "  # noqa: A002
                                   "(the turns before a restart too), not only the turns that "
                                   "made the current image.")] = False,
    ) -> CallToolResult:
        """The turns that made the session's current image, oldest first (a restart from a new
        image begins a new history): instruction, seed, verdict and image of each, and the
        current image."""
        s = await tools.session(session)

        def build() -> dict[str, Any]:
            steps = [{"index": st.index, "turn": st.turn, "instruction": st.instruction,
                      "seed": st.seed, "verdict": st.critique.verdict if st.critique else None,
                      "image": IMAGE_URI + st.result.sha256}
                     for st in (s.steps() if all else s.history())]  # fmt: skip
            current = s.current
            image = IMAGE_URI + current.sha256 if current is not None else None
            return {"session": session, "steps": steps, "image": image}

        return tools.json_answer(await tools.guard(asyncio.to_thread(build)))

    @mcp.resource(IMAGE_URI + "{sha256}", mime_type="image/png", title="A stored image")
    async def image_resource(sha256: str) -> bytes:
        """An image in the artifact store, by the sha256 of its pixels (PNG)."""
        if not _SHA_RE.fullmatch(sha256):
            raise ResourceError(f"no image {sha256!r}")
        try:
            return await asyncio.to_thread(agent.store.read_bytes, sha256)
        except KeyError:
            raise ResourceError(f"no image {sha256} in the store") from None

    @mcp.resource(TRACE_URI + "{run_id}", mime_type="application/json", title="A run's trace")
    async def trace_resource(run_id: str) -> str:
        """A run's JSON trace: nodes, inputs, outputs, timings, seeds, boxes, image refs."""
        from lavida_agent.traces import find_trace

        try:
            path = find_trace(run_id, agent.settings.runs_dir)
        except LavidaError as exc:
            raise ResourceError(str(exc)) from None
        return await asyncio.to_thread(path.read_text, encoding="utf-8")

    return mcp


class _StrictServer(MCPServer):
    """An `MCPServer` that refuses arguments a tool does not take (a misspelt `sead` would
    otherwise be dropped and the call run with a random seed), and says a badly typed one in
    one `field: message` line."""

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:  # fmt: skip
        schema = self._tool_input_schema(name)
        if schema is not None and isinstance(arguments, dict):
            unknown = sorted(set(arguments) - set(schema.get("properties", {})))
            if unknown:
                known = ", ".join(sorted(schema.get("properties", {})))
                raise ToolError(f"{unknown[0]}: unknown argument of {name} (it takes {known})")
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc, UnexpectedToolError) or not isinstance(exc.__cause__, ValidationError):
                raise  # (a tool body's own crash stays a crash, logged with its traceback)
            # The SDK's own check of the arguments' types: said the way every surface says
            # it (`seed: Input should be ...`), not as pydantic's multi-line report.
            _, message = schemas.validation_message(exc.__cause__)
            raise ToolError(f"Error executing tool {name}: {message}") from exc.__cause__


class _Tools:
    """What the tools share: argument checks, image loading, running with progress, results."""

    def __init__(self, agent: LavidaAgent, *, read_files: bool, display_scale: int,
                 session_lock: Callable[[str], asyncio.Lock] | None) -> None:  # fmt: skip
        if (
            isinstance(display_scale, bool)
            or not isinstance(display_scale, int)
            or not 1 <= display_scale <= 16
        ):
            raise ValueError(f"display_scale must be an integer in 1..16, got {display_scale!r}")
        self.agent = agent
        self.read_files = read_files
        self.display_scale = display_scale
        self.limits = schemas.Limits.from_settings(agent.settings)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._session_lock = session_lock

    # -- arguments ----------------------------------------------------------------------------

    def check(self, model: type[BaseModel], **fields: Any) -> Any:
        """The arguments validated by the HTTP request `model`, under the deployment's limits."""
        try:
            return model.model_validate({k: v for k, v in fields.items() if v is not None},
                                        context={"limits": self.limits})  # fmt: skip
        except ValidationError as exc:
            raise ToolError(schemas.validation_message(exc)[1]) from None

    async def image(self, text: str) -> Any:
        """An `image` argument as pixels (decoded off the loop) or an `ImageRef` in the store."""
        from lavida_agent.tools.images import ImageError, load_image

        settings = self.agent.settings
        text = text.strip()
        if text.startswith(IMAGE_URI):
            sha = text.removeprefix(IMAGE_URI)
            try:
                if not _SHA_RE.fullmatch(sha):
                    raise KeyError(sha)
                return await asyncio.to_thread(self.agent.store.ref, sha)
            except KeyError:
                raise ToolError(f"image: no image {sha!r} in the store") from None
        source: Any
        path = Path(text).expanduser() if self.read_files else None
        if path is not None and not text.startswith("data:") and _is_file(path):
            source = path
        elif text.startswith("data:") or _looks_like_base64(text):
            try:
                source = schemas.decode_base64(text, "image", settings.max_upload_bytes)
            except LavidaError as exc:
                raise ToolError(str(exc)) from None
        elif path is None:
            raise ToolError("image: not an image this server can take; send a "
                            f"data:image/png;base64 URL, base64, or a {IMAGE_URI}<sha256> URI "
                            "(it does not read files)")  # fmt: skip
        else:
            source = path  # load_image says the file is missing
        try:
            return await asyncio.to_thread(load_image, source, max_pixels=settings.max_pixels)
        except ImageError as exc:
            raise ToolError(f"image: {exc}") from None
        except OSError as exc:  # a name the file system refuses (too long, ...)
            raise ToolError(f"image: not a readable file ({exc.strerror or exc})") from None

    # -- sessions -----------------------------------------------------------------------------

    def lock(self, session_id: str) -> asyncio.Lock:
        """One lock per session: turns, undo, redo and branch of a session run one at a time."""
        if self._session_lock is not None:
            return self._session_lock(session_id)
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    async def session(self, session_id: str | None, *, must_exist: bool = True) -> Session:
        """The session `session_id` (a new one for None)."""
        if session_id is not None and not schemas.SESSION_ID_RE.fullmatch(session_id):
            raise ToolError(f"session: no session {session_id!r}")
        s = await asyncio.to_thread(self.agent.session, session_id)
        if session_id is not None and must_exist and not await asyncio.to_thread(lambda: s.exists):
            raise ToolError(
                f"session: no session {session_id!r} (an edit with an image starts one)"
            )
        return s

    async def move(self, session_id: str, how: Callable[[Session], ImageRef]) -> CallToolResult:
        """Undo, redo or branch `session_id`; answers with its new current image. A cancelled
        call still waits for the move to finish before the session's lock is released."""
        async with self.lock(session_id):
            s = await self.session(session_id)
            ref = await self.guard(_in_thread(lambda cancel: how(s)))
        data = {"session": session_id, "image": IMAGE_URI + ref.sha256}
        return await asyncio.to_thread(lambda: self._answer(self.agent.store.open(ref), data))

    # -- running ------------------------------------------------------------------------------

    async def run(self, ctx: Context, call: Callable[[EventCallback], Awaitable[T]]) -> T:
        """`call(on_event)` (an async agent call), reporting each workflow event as progress.
        A cancelled call holds the caller (and its session's lock) until the run stopped."""
        count = 0
        run = run_with_events(lambda on_event: self.guard(call(on_event)))
        async with contextlib.aclosing(run):
            async for kind, value in run:
                if kind == "result":
                    return value
                count += 1
                await ctx.report_progress(count, None, progress_message(value))
        raise AssertionError("run_with_events ends with the result")  # pragma: no cover

    async def look(
        self, ctx: Context, image: str, call: Callable[[Any, EventCallback], Awaitable[Any]]
    ) -> CallToolResult:
        """A reading tool (ground, ask, critique): `call(pixels, on_event)` on the `image`
        argument, answered with its JSON (the image is the caller's own: not sent back)."""
        pixels = await self.image(image)
        result = await self.run(ctx, lambda on_event: call(pixels, on_event))
        return self.answer(result, result.to_dict(), show=False)

    @staticmethod
    async def guard(aw: Awaitable[T]) -> T:
        """Await an agent call; its errors become tool errors with their message (the host's
        model reads them). Anything else is a crash, which the SDK logs and reports without
        details."""
        try:
            return await aw
        except LavidaError as exc:
            if exc.http_status >= 500:
                logger.error("%s", exc)
            raise ToolError(str(exc)) from None

    # -- results ------------------------------------------------------------------------------

    def answer(
        self, result: RunResult, data: dict[str, Any], *, show: bool = True
    ) -> CallToolResult:
        """A run's result: the image (if `show`) and `data` plus its image and trace URIs.

        Attempts name their images by URI. The store and trace paths (`result`, `trace`) are
        kept for a local client only: a remote one cannot open them, and they would show it
        the server's folders."""
        data = {**data, "image": IMAGE_URI + result.image_ref.sha256,
                "trace_uri": TRACE_URI + result.run_id}  # fmt: skip
        if "attempts" in data:
            data["attempts"] = [{**a, "image": IMAGE_URI + Path(a["image"]).stem}
                                for a in data["attempts"]]  # fmt: skip
        if not self.read_files:
            data = {k: v for k, v in data.items() if k not in ("result", "trace")}
        if not show:
            return self.json_answer(data)
        # an edit of a non-square input is shown in the input's shape (`image` stays the canvas)
        pixels = result.content() if isinstance(result, EditResult) else self.agent.store.open(result.image_ref)
        return self._answer(pixels, data)

    def _answer(self, pixels: Any, data: dict[str, Any]) -> CallToolResult:
        from lavida_agent.tools.images import encode_png, resize_nearest

        png = encode_png(resize_nearest(pixels, self.display_scale))
        picture = ImageContent(type="image", data=base64.b64encode(png).decode("ascii"),
                               mime_type="image/png")  # fmt: skip
        return CallToolResult(content=[picture, _json_text(data)], structured_content=data)

    @staticmethod
    def json_answer(data: dict[str, Any]) -> CallToolResult:
        return CallToolResult(content=[_json_text(data)], structured_content=data)


def _json_text(data: dict[str, Any]) -> TextContent:
    return TextContent(type="text", text=json.dumps(data, default=str))


_B64_RE = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for a file: base64, most likely
        return False


def _looks_like_base64(text: str) -> bool:
    """Bare base64 of an image file: long and only base64 characters (existing files were
    tried first)."""
    return len(text) >= 64 and _B64_RE.fullmatch(text) is not None


def progress_message(ev: dict[str, Any]) -> str:
    """One line for a workflow event (`graphs/events.py`), as a progress message."""
    kind = ev.get("event", "")
    node = ev.get("node")
    if kind == "run_start":  # the id a host needs to `resume` a call it had to give up on
        return f"run {ev.get('run_id')} started ({ev.get('workflow')})"
    if kind == "sampler_step":
        return f"{node}: step {ev.get('step')}/{ev.get('total')}"
    if kind == "node_start":
        return f"{node} started"
    if kind == "node_end":
        return f"{node} done in {float(ev.get('elapsed_s', 0.0)):.2f}s"
    if kind == "critique":
        crit = ev.get("critique") or {}
        reasons = "; ".join(crit.get("reasons") or [])
        return f"critique: {crit.get('verdict')}" + (f" ({reasons})" if reasons else "")
    if kind == "plan":
        items = (ev.get("plan") or {}).get("items") or []
        return "plan: " + (", ".join(str(i.get("label")) for i in items) or "no objects")
    return kind.replace("_", " ") + (f" ({node})" if node else "")
