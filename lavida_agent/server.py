"""The HTTP server: native endpoints and the OpenAI-compatible Images API over one `LavidaAgent`.

    app = create_app(Settings.from_env())           # what `lavida-agent serve` runs
    app = create_app(agent=LavidaAgent(engine=FakeEngine()))   # tests

Routes are thin: parse and validate (`schemas.py`), call the agent's async twins (the model
runs in worker threads, never on the event loop; the real model loads on first use), shape
the response. One agent serves every request, so concurrent requests share the engine; with
a `BatchingEngine` their forwards are batched.

Native endpoints (JSON bodies; those taking an image also accept multipart/form-data with an
`image` file part):

    POST /v1/generate                 GenerateRequest    -> GenerateResponse
    POST /v1/edit                     EditRequest        -> EditResponse (a new session)
    POST /v1/ground                   GroundRequest      -> GroundResponse
    POST /v1/ask                      AskRequest         -> AskResponse
    POST /v1/critique                 CritiqueRequest    -> CritiqueResponse
    POST /v1/sessions                 SessionCreateRequest -> SessionResponse
    POST /v1/sessions/{id}/edit       SessionEditRequest -> EditResponse
    GET  /v1/sessions/{id}/history                       -> SessionHistoryResponse
    POST /v1/sessions/{id}/undo                          -> SessionResponse
    POST /v1/sessions/{id}/redo                          -> SessionResponse
    POST /v1/sessions/{id}/branch     BranchRequest      -> SessionResponse
    POST /v1/runs/stream              RunStreamRequest   -> text/event-stream
    POST /v1/runs/{run_id}/resume                        -> GenerateResponse | EditResponse
    GET  /v1/runs?limit=&unfinished=  the newest runs and their status (ok, running, stopped,
                                      failed, unfinished, resumed)
    GET  /v1/traces/{run_id}          the JSON trace;  /v1/traces/{run_id}.html the viewer
    GET  /v1/artifacts/{sha256}       a stored image (PNG; content-addressed, cached forever)
    GET  /healthz
    POST /mcp                         the MCP tools (`mcp_server.py`), streamable HTTP, when
                                      the MCP SDK is installed

OpenAI-compatible (the official `openai` client works unchanged):

    POST /v1/images/generations       JSON, `{"created", "data": [{"b64_json"|"url", "run_id"}], ...}`
    POST /v1/images/edits             multipart (`image`, optional `mask`) or JSON (base64)

`size` is "64x64" (the native canvas; also "auto") or "256x256"/"512x512"/"1024x1024", a
nearest-neighbour upscale of the 64 px image; other sizes are a 400. `stream: true` (with
`n=1`) answers with server-sent events shaped like OpenAI's image streaming:
`image_generation.partial_image` (up to `partial_images` previews of the current x0
prediction) then `image_generation.completed` (`image_edit.*` for edits). `mask` (edits):
transparent pixels (alpha < 128; for a mask without alpha: white pixels) mark the editable
region; the whole image is edited, then every pixel outside the region is restored from the
input, so the mask is a hard constraint on the output, not a hint to the planner.

Streaming (`/v1/runs/stream`): one SSE event per workflow event (`run_start`, `node_start`,
`node_end`, `sampler_step`, `plan`, `image`, `critique`, `answer`, ..., `run_end`), `preview`
events (base64 PNG) when `preview_every > 0`, `: ping` comments every 15 s of silence, and
finally `result` (the same JSON as the non-streaming endpoint) or `error`. A client that
disconnects cancels its run at the next sampler step.

Security and limits: binds to loopback by default (`Settings.host`). With `Settings.api_key`
set, every route except `/healthz` and `/v1/artifacts/*` needs `Authorization: Bearer KEY`
(constant-time compare; 401 otherwise). Artifact URLs are capabilities: a sha256 of the
pixels, which only someone who has the image (or was given the URL) knows, so OpenAI-style
`url` responses can be fetched without the key. A request body over
`2 * max_upload_bytes + 64 KiB` is refused (413) before it is read; a decoded image over
`max_upload_bytes` is a 413 naming the field; images over `max_pixels`, prompts over
`max_prompt_chars`, `n` over `max_n`, `steps` over `max_steps`, `rounds` over
`max_rounds_limit`, unknown fields and malformed values are 400s naming the field; a wrong
content type is a 415. Every error is `{"error": {"code", "message", "type", "param"}}`; an
unexpected exception is logged and answered with a 500 of the same shape, and the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hmac
import io
import json
import logging
import re
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from lavida_agent import __version__, schemas
from lavida_agent.api import (
    AskResult,
    CritiqueResult,
    EditResult,
    EventCallback,
    GenerateResult,
    GroundResult,
    LavidaAgent,
    Session,
    run_with_events,
)
from lavida_agent.errors import GenerationCancelled, InvalidInputError, LavidaError
from lavida_agent.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ("ApiError", "create_app")

T = TypeVar("T")

HEARTBEAT_S = 15.0
"""Seconds of silence after which a stream sends a `: ping` comment (keeps proxies and
clients from timing out during long runs)."""

SEED_STRIDE = 1000
"""OpenAI `n > 1`: image i uses seed `seed + SEED_STRIDE * i` (rounds use seed + round)."""

UPSCALED_SIZES = (256, 512, 1024)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_OPEN_PATHS = ("/healthz", "/v1/artifacts/")
MCP_MISSING = "the MCP server needs the MCP SDK: pip install 'lavida-agent[mcp]'"
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 499: "cancelled", 503: "server_error"}  # fmt: skip


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error answered as `{"error": {"code", "message", "type", "param"}}`."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def _error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    etype = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": code, "message": message, "type": etype, "param": param}}


def _error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(_error_body(status, code, message, param), status_code=status,
                        headers=headers)  # fmt: skip


def _lavida_error(exc: LavidaError) -> ApiError:
    return ApiError(exc.http_status, exc.code, str(exc))


def _validation_error(exc: ValidationError, *, strip_tag: bool = False) -> ApiError:
    """The first pydantic error as a 400 naming the field (`param`)."""
    param, message = schemas.validation_message(exc, strip_tag=strip_tag)
    return ApiError(400, "invalid_" + ("field" if param else "request"), message, param=param)


class _BodyTooLarge(Exception):
    pass


# ----------------------------------------------------------------------------------------
# The guard: auth, body size and the last-resort error handler (pure ASGI, outermost)
# ----------------------------------------------------------------------------------------


class _Guard:
    """Checks the API key and the body size before the app reads anything, and turns any
    exception that escapes the app into a logged 500 JSON error (the server keeps serving)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body

    def _authorized(self, scope: dict[str, Any]) -> bool:
        path = scope["path"]
        if self.key is None or path == _OPEN_PATHS[0] or path.startswith(_OPEN_PATHS[1]):
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    def _too_large(self) -> JSONResponse:
        return _error_response(413, "request_too_large", f"request body over {self.max_body} bytes")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def reply(resp: Response) -> None:
            await resp(scope, receive, send_tracked)

        if not self._authorized(scope):
            await reply(_error_response(401, "unauthorized", "missing or invalid API key "
                                        "(send 'Authorization: Bearer <key>')",
                                        headers={"WWW-Authenticate": "Bearer"}))  # fmt: skip
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and not length.isdigit():
            await reply(_error_response(400, "invalid_request", "bad Content-Length"))
            return
        if length is not None and int(length) > self.max_body:
            await reply(self._too_large())
            return
        received = 0

        async def receive_limited() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, receive_limited, send_tracked)
        except _BodyTooLarge:
            if not started:
                await reply(self._too_large())
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await reply(_error_response(500, "internal_error", "internal server error"))


# ----------------------------------------------------------------------------------------
# The service: everything the routes share
# ----------------------------------------------------------------------------------------


class _Service:
    def __init__(self, settings: Settings, agent: LavidaAgent) -> None:
        self.settings = settings
        self.agent = agent
        self.limits = schemas.Limits.from_settings(settings)
        self._preview_agents: dict[int, LavidaAgent] = {}
        self._preview_lock = threading.Lock()
        self._session_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # -- parsing ----------------------------------------------------------------------------

    async def parse(
        self,
        request: Request,
        model: type[BaseModel] | TypeAdapter[Any],
        *,
        multipart: bool = False,
        files: Sequence[str] = ("image",),
    ) -> tuple[Any, dict[str, bytes]]:
        """The validated request model, and the uploaded files (multipart) by field name."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        uploads: dict[str, bytes] = {}
        data: Any
        if ctype == "application/json" or ctype.endswith("+json"):
            raw = await request.body()
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
            except RecursionError:
                raise ApiError(400, "invalid_json", "the body is nested too deeply") from None
            if not isinstance(data, dict):
                raise ApiError(400, "invalid_json", "the body must be a JSON object")
        elif multipart and ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            data = await self._form(request, model, files, uploads)
        else:
            accepted = "application/json" + (" or multipart/form-data" if multipart else "")
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type must be {accepted}, got {ctype or 'none'!r}")  # fmt: skip
        try:
            context = {"limits": self.limits}
            if isinstance(model, TypeAdapter):
                return model.validate_python(data, context=context), uploads
            return model.model_validate(data, context=context), uploads
        except ValidationError as exc:
            raise _validation_error(exc, strip_tag=isinstance(model, TypeAdapter)) from None

    async def _form(
        self, request: Request, model: Any, files: Sequence[str], uploads: dict[str, bytes]
    ) -> dict[str, Any]:
        try:
            form = await request.form(max_files=len(files) + 1, max_fields=64,
                                      max_part_size=self.settings.max_upload_bytes)  # fmt: skip
        except StarletteHTTPException as exc:
            raise ApiError(400, "invalid_form", f"malformed form data: {exc.detail}") from None
        try:
            fields = model.model_fields if isinstance(model, type) else {}
            data: dict[str, Any] = {}
            for key in dict.fromkeys(form.keys()):
                name = key.removesuffix("[]")
                values = form.getlist(key)
                is_list = "list[" in str(getattr(fields.get(name), "annotation", ""))
                if not is_list and len(values) > 1:
                    what = "one image per request" if name in files else "a single value"
                    raise ApiError(400, "invalid_field", f"{name}: expected {what}, got "
                                   f"{len(values)}", param=name)  # fmt: skip
                if name in files and isinstance(values[0], UploadFile):
                    uploads[name] = await values[0].read()
                    continue
                if any(isinstance(v, UploadFile) for v in values):
                    raise ApiError(400, "invalid_field", f"{name}: must not be a file",
                                   param=name)  # fmt: skip
                data[name] = values if is_list else values[0]
            return data
        finally:
            await form.close()

    # -- images -----------------------------------------------------------------------------

    def _raw_image(self, req: Any, uploads: dict[str, bytes], param: str = "image") -> bytes | None:
        raw = uploads.get(param)
        text = getattr(req, param, None)
        if raw is None and text is not None:
            try:
                raw = schemas.decode_base64(text, param, self.settings.max_upload_bytes)
            except InvalidInputError as exc:
                code = "invalid_image" if exc.http_status == 400 else exc.code
                raise ApiError(exc.http_status, code, str(exc), param=param) from None
        if raw is not None and len(raw) > self.settings.max_upload_bytes:
            raise ApiError(413, "image_too_large", f"{param}: {len(raw)} bytes is over the limit "
                           f"of {self.settings.max_upload_bytes}", param=param)  # fmt: skip
        return raw

    async def image(self, req: Any, uploads: dict[str, bytes], *, required: bool = True) -> Any:
        """The request's input image as pixels (decoded here, off the loop) or an `ImageRef`."""
        raw = self._raw_image(req, uploads)
        sha = getattr(req, "image_sha256", None)
        if raw is not None and sha is not None:
            raise ApiError(400, "invalid_field", "give either image or image_sha256, not both",
                           param="image_sha256")  # fmt: skip
        if sha is not None:
            try:
                return await run_in_threadpool(self.agent.store.ref, sha)
            except KeyError:
                raise ApiError(404, "not_found", f"image_sha256: no image {sha} in the store",
                               param="image_sha256") from None  # fmt: skip
        if raw is None:
            if required:
                raise ApiError(400, "invalid_field", "image: Field required", param="image")
            return None
        return await run_in_threadpool(self._load, raw, "image")

    def _load(self, raw: bytes, param: str) -> np.ndarray:
        from lavida_agent.tools.images import ImageError, load_image

        try:
            return load_image(raw, max_pixels=self.settings.max_pixels)
        except ImageError as exc:
            raise ApiError(400, "invalid_image", f"{param}: {exc}", param=param) from None

    def _editable_mask(self, raw: bytes, size: tuple[int, int]) -> np.ndarray:
        """The OpenAI mask as a canvas-sized bool array: True where the edit may change pixels."""
        from PIL import Image, ImageOps

        from lavida_agent.tools.images import letterbox

        try:
            with Image.open(io.BytesIO(raw)) as opened:
                if opened.width * opened.height > self.settings.max_pixels:
                    raise ApiError(400, "invalid_image", "mask: too many pixels", param="mask")
                img = ImageOps.exif_transpose(opened)  # as the image is read (`load_image`)
                if img.width * img.height > self.settings.max_pixels:
                    raise ApiError(400, "invalid_image", "mask: too many pixels", param="mask")
                if img.size != size:
                    msg = (f"mask: size {img.width}x{img.height} differs from the image's "
                           f"{size[0]}x{size[1]}")  # fmt: skip
                    raise ApiError(400, "invalid_image", msg, param="mask")
                if "A" in img.getbands() or "transparency" in img.info:
                    editable = np.asarray(img.convert("RGBA").getchannel("A")) < 128
                else:
                    editable = np.asarray(img.convert("L")) >= 128
        except ApiError:
            raise
        except Image.UnidentifiedImageError:  # its message holds the BytesIO's repr
            raise ApiError(400, "invalid_image", "mask: not an image file Pillow can read",
                           param="mask") from None  # fmt: skip
        except Exception as exc:
            raise ApiError(400, "invalid_image", f"mask: not a readable image ({exc})",
                           param="mask") from None  # fmt: skip
        rgb = np.repeat(np.where(editable, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
        canvas, _ = letterbox(rgb, size=self.agent.settings.canvas, interpolation="nearest")
        return canvas[..., 0] >= 128  # the padding (fill 0) stays as it is

    # -- responses --------------------------------------------------------------------------

    @staticmethod
    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def image_out(self, base: str, ref: Any, fmt: str = "b64_json") -> schemas.ImageOut:
        """An `ImageRef` as `ImageOut` (sync: reads the PNG when inlined)."""
        b64 = None
        if fmt == "b64_json":
            b64 = base64.b64encode(self.agent.store.read_bytes(ref)).decode("ascii")
        return schemas.ImageOut(sha256=ref.sha256, width=ref.width, height=ref.height,
                                url=f"{base}/v1/artifacts/{ref.sha256}", b64_json=b64)  # fmt: skip

    @staticmethod
    def _boxes(items: Sequence[Any]) -> list[schemas.BoxOut]:
        return [schemas.BoxOut(label=i.label, box=i.box.as_list()) for i in items]

    def generate_out(self, base: str, r: GenerateResult, fmt: str) -> schemas.GenerateResponse:
        by_round = {c.round: c for c in r.critiques}
        attempts = [schemas.AttemptOut(round=a.round, seed=a.seed,
                                       verdict=getattr(by_round.get(a.round), "verdict", None),
                                       reasons=list(getattr(by_round.get(a.round), "reasons", [])),
                                       grounding_failed=getattr(by_round.get(a.round), "grounding_failed", []),
                                       strays=[schemas.StrayOut(box=m.box.as_list(), score=m.score)
                                               for m in getattr(by_round.get(a.round), "strays", [])],
                                       dropped_reasons=list(getattr(by_round.get(a.round), "dropped_reasons", [])),
                                       fit=list(getattr(by_round.get(a.round), "fit", [])),
                                       worst_token=getattr(by_round.get(a.round), "worst_token", None),
                                       image=self.image_out(base, a.image, "url"))
                    for a in r.attempts]  # fmt: skip
        return schemas.GenerateResponse(
            run_id=r.run_id, trace_url=f"{base}/v1/traces/{r.run_id}", thread_id=r.thread_id,
            prompt=r.prompt, seed=r.seed, accepted=r.accepted, rounds=len(r.attempts),
            max_rounds=r.max_rounds, plan=self._boxes(r.layout), attempts=attempts,
            image=self.image_out(base, r.image_ref, fmt),
        )  # fmt: skip

    def edit_out(self, base: str, r: EditResult, fmt: str) -> schemas.EditResponse:
        attempts = [schemas.AttemptOut(round=s.round, seed=s.seed,
                                       verdict=s.critique.verdict if s.critique else None,
                                       reasons=list(s.critique.reasons) if s.critique else [],
                                       grounding_failed=s.critique.grounding_failed if s.critique else [],
                                       fit=list(s.critique.fit) if s.critique else [],
                                       keep_fit=list(s.critique.keep_fit) if s.critique else [],
                                       image=self.image_out(base, s.result, "url"))
                    for s in r.attempts]  # fmt: skip
        plan = r.plan
        return schemas.EditResponse(
            run_id=r.run_id, trace_url=f"{base}/v1/traces/{r.run_id}", session_id=r.thread_id,
            instruction=r.instruction, seed=r.seed, accepted=r.accepted, step=r.step,
            rounds=len(r.attempts), max_rounds=r.max_rounds, plan=self._boxes(r.layout),
            targets=list(plan.targets) if plan else [],
            absent=list(plan.absent) if plan else [],
            regions=[b.as_list() for b in plan.regions] if plan else [],
            keep=self._boxes(plan.keep) if plan else [],
            attempts=attempts, image=self.image_out(base, r.image_ref, fmt),
            source_size=list(r.letterbox_source) if r.letterbox_source else None,
            content_box=list(box) if (box := r.content_box()) else None,
        )  # fmt: skip

    def ground_out(self, base: str, r: GroundResult) -> schemas.GroundResponse:
        return schemas.GroundResponse(
            run_id=r.run_id, trace_url=f"{base}/v1/traces/{r.run_id}",
            expressions=list(r.expressions), boxes=self._boxes(r.boxes),
            canvas_boxes=self._boxes(r.canvas_boxes), source_size=list(r.source_size),
            found_by=list(r.found_by), present=list(r.present), caption=r.caption,
            objects=self._boxes(r.objects),
        )  # fmt: skip

    def ask_out(self, base: str, r: AskResult) -> schemas.AskResponse:
        return schemas.AskResponse(run_id=r.run_id, trace_url=f"{base}/v1/traces/{r.run_id}",
                                   question=r.question, answer=r.answer,
                                   answered_by=r.answered_by, caption=r.caption,
                                   objects=self._boxes(r.objects))  # fmt: skip

    def critique_out(self, base: str, r: CritiqueResult) -> schemas.CritiqueResponse:
        return schemas.CritiqueResponse(run_id=r.run_id, trace_url=f"{base}/v1/traces/{r.run_id}",
                                        prompt=r.prompt, verdict=r.verdict, reasons=list(r.reasons),
                                        judged_by=r.judged_by, model_text=r.model_text,
                                        caption=r.caption, objects=self._boxes(r.objects))  # fmt: skip

    # -- sessions -----------------------------------------------------------------------------

    def session_lock(self, session_id: str) -> asyncio.Lock:
        """One lock per session: turns, undo and branch of a session run one at a time."""
        lock = self._session_locks.get(session_id)
        if lock is None:
            lock = asyncio.Lock()
            self._session_locks[session_id] = lock
        return lock

    async def session(self, session_id: str, *, must_exist: bool = True) -> Session:
        if not schemas.SESSION_ID_RE.fullmatch(session_id):
            raise ApiError(404, "not_found", f"no session {session_id!r}")
        session = await run_in_threadpool(self.agent.session, session_id)
        if must_exist and not await run_in_threadpool(lambda: session.exists):
            raise ApiError(404, "not_found", f"no session {session_id!r}")
        return session

    async def resume(self, run_id: str) -> GenerateResult | EditResult:
        """`agent.aresume(run_id)`, holding the session's lock when the run is an edit turn."""
        session = await run_in_threadpool(self.agent.resume_session, run_id)
        async with self.session_lock(session) if session else contextlib.nullcontext():
            return await self.agent.aresume(run_id)

    # -- previews -----------------------------------------------------------------------------

    async def agent_for(self, preview_every: int) -> LavidaAgent:
        """The agent, or a view of it recording previews every `preview_every` steps.

        The view is a shallow copy sharing the engine, store, checkpointer and compiled graphs,
        with only `settings.preview_every` changed. (Replace by a per-call `preview_every`
        argument once `LavidaAgent.generate/edit` take one.) No run has more than `max_steps`
        steps, so every period beyond that previews nothing alike and shares one view: at
        most `max_steps + 1` views, however clients pick their periods.
        """
        preview_every = min(preview_every, self.agent.settings.max_steps + 1)
        if preview_every <= 0 or preview_every == self.agent.settings.preview_every:
            return self.agent

        def build() -> LavidaAgent:
            with self._preview_lock:
                view = self._preview_agents.get(preview_every)
                if view is None:
                    _ = self.agent.engine, self.agent.store, self.agent.checkpointer  # share them
                    view = copy.copy(self.agent)
                    view.settings = self.agent.settings.replace(preview_every=preview_every)
                    self._preview_agents[preview_every] = view
                return view

        return await run_in_threadpool(build)

    async def events(
        self, start: Callable[[LavidaAgent, EventCallback], Awaitable[T]], preview_every: int
    ) -> AsyncIterator[tuple[str, Any]]:
        """Run `start(agent, on_event)` and yield `("event", ev)` per workflow event,
        `("ping", None)` after `HEARTBEAT_S` of silence, and finally `("result", result)`
        (or raise the run's error). Closing the iterator cancels the run."""
        agent = await self.agent_for(preview_every)
        run = run_with_events(lambda on_event: start(agent, on_event), heartbeat_s=HEARTBEAT_S)
        async with contextlib.aclosing(run):  # closing this iterator cancels the run now
            async for item in run:
                yield item

    def preview_png(self, ev: dict[str, Any]) -> bytes | None:
        ref = ev.get("preview")
        if not isinstance(ref, dict) or "sha256" not in ref:
            return None
        try:
            return self.agent.store.read_bytes(ref["sha256"])
        except (KeyError, ValueError):
            return None


def _sse(event: str, data: Any) -> bytes:
    text = json.dumps(data, default=str, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n".encode()


def _scale(size: str | None, canvas: int) -> int:
    """The upscale factor of an OpenAI `size` (the size the answer then states is its
    image's: an edit keeps its input's shape); 400 naming `size` for others."""
    allowed = [canvas] + [s for s in UPSCALED_SIZES if s > canvas and s % canvas == 0]
    if size is None or size == "auto":
        return 1
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if m is None or m.group(1) != m.group(2) or int(m.group(1)) not in allowed:
        names = ", ".join(f"'{s}x{s}'" for s in allowed)
        raise ApiError(400, "invalid_size", f"size: {size!r} is not supported; use {names} or "
                       "'auto'", param="size")  # fmt: skip
    return int(m.group(1)) // canvas


def _png_b64(image: np.ndarray, scale: int) -> str:
    from lavida_agent.tools.images import encode_png, resize_nearest

    big = resize_nearest(image, scale) if scale > 1 else image
    return base64.b64encode(encode_png(big)).decode("ascii")


async def _gather(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Await all; on the first failure (or when cancelled) cancel the rest, wait until they
    have stopped, and raise."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        raise


DROP_POLL_S = 0.25
"""How often a non-streaming request looks whether its client is still there."""


async def _unless_dropped(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled when the client goes away first, as a stream's run is: the run
    stops at its next step and `/v1/runs/{id}/resume` can finish it. Run on, a dropped
    session edit would commit a turn its client never saw, and the client's retry would
    apply the edit twice.

    Raises:
        GenerationCancelled: the client went away (its answer reaches no one).
    """
    if await request.is_disconnected():  # gone while it waited (for a session's lock)
        if asyncio.iscoroutine(work):
            work.close()
        raise GenerationCancelled("the client closed the request before its run started")
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DROP_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.wait({task})  # until the run has stopped (`api._in_thread`)
                raise GenerationCancelled("the client closed the request; its run stopped")
        return task.result()
    except asyncio.CancelledError:  # the handler itself (server shutdown): the run goes too
        task.cancel()
        await asyncio.wait({task})
        raise


# ----------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------


PRUNE_EVERY_S = 3600.0


async def _prune_every(agent: LavidaAgent, keep_days: float) -> None:
    """`Settings.keep_days`: prune what was idle for longer, now and every `PRUNE_EVERY_S`
    (a failure is logged; the next hour tries again)."""
    while True:
        try:
            done = await run_in_threadpool(agent.prune, keep_days * 86400)
            if done.threads:
                logger.info("pruned %d runs and sessions idle for %g days: %d runs, %d images, %d bytes",
                            len(done.threads), keep_days, len(done.runs), done.images, done.bytes_freed)  # fmt: skip
        except Exception:
            logger.exception("pruning the runs and sessions idle for %g days failed", keep_days)
        await asyncio.sleep(PRUNE_EVERY_S)


def create_app(
    settings: Settings | None = None, *, agent: LavidaAgent | None = None, mcp: bool | None = None
) -> FastAPI:
    """The FastAPI app over one `LavidaAgent` shared by every request.

    Args:
        settings: server settings (limits, API key); default: `agent.settings`, else
            `Settings.from_env()`.
        agent: the agent to serve (e.g. on a `FakeEngine` or a `BatchingEngine`); default: a
            new `LavidaAgent(settings=settings)`, whose model loads on first use and which is
            closed when the app shuts down.
        mcp: serve the MCP tools (`mcp_server.py`) at `/mcp` (streamable HTTP) on the same
            agent, behind the same API key and limits: `None` (default) when the MCP SDK is
            installed, `True` to require it, `False` not to. Its sessions run in the app's
            lifespan, so an ASGI test client must enter that (`app.router.lifespan_context`).
    """
    if settings is None:
        settings = agent.settings if agent is not None else Settings.from_env()
    owns_agent = agent is None
    svc = _Service(settings, agent if agent is not None else LavidaAgent(settings=settings))
    mount = _McpMount.create(svc, required=mcp is True) if mcp is not False else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pruning = asyncio.create_task(_prune_every(svc.agent, settings.keep_days)) if settings.keep_days else None
        try:
            async with mount.running() if mount else contextlib.nullcontext():
                yield
        finally:
            if pruning is not None:
                pruning.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruning
        if owns_agent:
            await run_in_threadpool(svc.agent.close)

    app = FastAPI(title="lavida-agent", version=__version__, lifespan=lifespan,
                  summary="Generate, edit, ground and ask with a masked-diffusion model as an "
                  "agent; OpenAI-compatible /v1/images/*.")  # fmt: skip
    app.state.service = svc
    app.add_middleware(_Guard, api_key=settings.api_key,  # type: ignore[arg-type]
                       max_body=2 * settings.max_upload_bytes + 64 * 1024)  # fmt: skip
    _install_error_handlers(app)
    _native_routes(app, svc)
    _session_routes(app, svc)
    _stream_routes(app, svc)
    _openai_routes(app, svc)
    _resume_route(app, svc)
    if mount is not None:
        # A route of this app (not a mounted sub-app): its 404s, error handlers and the guard
        # (API key, body limit) stay in front of it.
        app.router.add_route("/mcp", mount, methods=["GET", "POST", "DELETE"],
                             include_in_schema=False)  # fmt: skip
    _install_openapi(app)
    return app


class _McpMount:
    """The MCP tools (`mcp_server.py`) as the app's `/mcp` route (streamable HTTP).

    Over HTTP the tools take no file paths as images (a client must not make the server read
    its files) and say no server paths in results, and they share the HTTP session locks, so
    a session's turns from both surfaces queue. The SDK's session manager runs only once, so
    each lifespan of the app (a restarted server, a second test client) builds its own.

    Host checks (DNS rebinding): with an API key, the key guards `/mcp` like every route and
    no Host is refused. Without one, a loopback bind accepts only loopback Hosts (with or
    without a port) and Origins, which a page in a browser cannot forge; any other bind is
    open to its network by choice, like the rest of the API.
    """

    def __init__(self, server: Any, settings: Settings) -> None:
        from mcp.server.transport_security import TransportSecuritySettings

        self.server = server
        loopback = ("127.0.0.1", "localhost", "[::1]")
        guarded = settings.api_key is None and settings.host in ("127.0.0.1", "localhost", "::1")
        self.security = TransportSecuritySettings(
            enable_dns_rebinding_protection=guarded,
            allowed_hosts=[h + p for h in loopback for p in ("", ":*")],
            allowed_origins=[f"{s}://{h}{p}" for s in ("http", "https") for h in loopback
                             for p in ("", ":*")],
        )  # fmt: skip
        self.max_body = 2 * settings.max_upload_bytes + 64 * 1024  # as the guard's
        self.handler: Any = None

    @classmethod
    def create(cls, svc: _Service, *, required: bool) -> _McpMount | None:
        """The mount over the service's agent, or None without the SDK (unless `required`)."""
        create_mcp = mcp_factory(required=required)
        if create_mcp is None:
            return None
        server = create_mcp(svc.agent, read_files=False, session_lock=svc.session_lock)
        return cls(server, svc.settings)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """A fresh session manager for one lifespan of the app."""
        sub = self.server.streamable_http_app(
            streamable_http_path="/mcp", transport_security=self.security,
            max_request_body_size=self.max_body)  # fmt: skip
        self.handler = next(r.app for r in sub.routes if getattr(r, "path", None) == "/mcp")
        try:
            async with self.server.session_manager.run():
                yield
        finally:
            self.handler = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.handler is None:  # the app's lifespan is not running (a bare ASGI transport)
            await _error_response(503, "unavailable", "the MCP endpoint runs in the app's "
                                  "lifespan, which has not started")(scope, receive, send)  # fmt: skip
            return
        await self.handler(scope, receive, send)


def mcp_factory(*, required: bool) -> Callable[..., Any] | None:
    """`mcp_server.create_mcp`, or None when the MCP SDK (an optional extra) is missing.

    Raises:
        InvalidInputError: the SDK is missing and `required`, saying how to install it.
    """
    try:
        from lavida_agent.mcp_server import create_mcp
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] not in ("mcp", "mcp_types"):
            raise
        if required:
            raise InvalidInputError(MCP_MISSING) from None
        return None
    return create_mcp


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(LavidaError)
    async def _lavida(request: Request, exc: LavidaError) -> JSONResponse:
        e = _lavida_error(exc)
        if e.status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.url.path, exc)
        return _error_response(e.status, e.code, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query")]
        param = ".".join(loc) or None
        msg = str(err.get("msg", "invalid request"))
        return _error_response(400, "invalid_field", f"{param}: {msg}" if param else msg, param)


def _install_openapi(app: FastAPI) -> None:
    """Add the hand-parsed request models to the OpenAPI components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary,
                               routes=app.routes)  # fmt: skip
            spec.setdefault("components", {}).setdefault("schemas", {}).update(
                schemas.json_schemas()
            )
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _body(name: str, *, multipart: bool = False) -> dict[str, Any]:
    ref = {"schema": {"$ref": f"#/components/schemas/{name}"}}
    content = {"application/json": ref}
    if multipart:
        content["multipart/form-data"] = ref
    return {"requestBody": {"required": True, "content": content}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse} for code in (400, 401, 404, 413, 415, 500)
}


# -- native -------------------------------------------------------------------------------


def _native_routes(app: FastAPI, svc: _Service) -> None:
    @app.get("/healthz", response_model=schemas.HealthResponse, tags=["meta"])
    async def healthz() -> schemas.HealthResponse:
        """Liveness (no auth; does not load the model)."""
        return schemas.HealthResponse(version=__version__)

    @app.post("/v1/generate", response_model=schemas.GenerateResponse, responses=_ERRORS,
              openapi_extra=_body("GenerateRequest"), tags=["native"])  # fmt: skip
    async def generate(request: Request) -> schemas.GenerateResponse:
        """Plan, draw, critique and refine an image for a prompt."""
        req, _ = await svc.parse(request, schemas.GenerateRequest)
        r = await _unless_dropped(request, svc.agent.agenerate(
            req.prompt, seed=req.seed, rounds=req.rounds, plan=req.plan_arg(), num_steps=req.steps))  # fmt: skip
        return await run_in_threadpool(svc.generate_out, svc.base(request), r, req.response_format)

    @app.post("/v1/edit", response_model=schemas.EditResponse, responses=_ERRORS,
              openapi_extra=_body("EditRequest", multipart=True), tags=["native"])  # fmt: skip
    async def edit(request: Request) -> schemas.EditResponse:
        """Edit an image by an instruction; the response's `session_id` continues it."""
        req, uploads = await svc.parse(request, schemas.EditRequest, multipart=True)
        image = await svc.image(req, uploads)
        r = await _unless_dropped(request, svc.agent.aedit(
            image, req.instruction, seed=req.seed, rounds=req.rounds, num_steps=req.steps))  # fmt: skip
        return await run_in_threadpool(svc.edit_out, svc.base(request), r, req.response_format)

    @app.post("/v1/ground", response_model=schemas.GroundResponse, responses=_ERRORS,
              openapi_extra=_body("GroundRequest", multipart=True), tags=["native"])  # fmt: skip
    async def ground(request: Request) -> schemas.GroundResponse:
        """Find each referring expression; boxes in the input image's pixels."""
        req, uploads = await svc.parse(request, schemas.GroundRequest, multipart=True)
        r = await _unless_dropped(request, svc.agent.aground(await svc.image(req, uploads), req.expressions))
        return svc.ground_out(svc.base(request), r)

    @app.post("/v1/ask", response_model=schemas.AskResponse, responses=_ERRORS,
              openapi_extra=_body("AskRequest", multipart=True), tags=["native"])  # fmt: skip
    async def ask(request: Request) -> schemas.AskResponse:
        """Answer a question about an image."""
        req, uploads = await svc.parse(request, schemas.AskRequest, multipart=True)
        r = await _unless_dropped(request, svc.agent.aask(await svc.image(req, uploads), req.question))
        return svc.ask_out(svc.base(request), r)

    @app.post("/v1/critique", response_model=schemas.CritiqueResponse, responses=_ERRORS,
              openapi_extra=_body("CritiqueRequest", multipart=True), tags=["native"])  # fmt: skip
    async def critique(request: Request) -> schemas.CritiqueResponse:
        """Judge whether an image shows what a text-to-image prompt asks for, and why not."""
        req, uploads = await svc.parse(request, schemas.CritiqueRequest, multipart=True)
        r = await _unless_dropped(request, svc.agent.acritique(await svc.image(req, uploads), req.prompt))
        return svc.critique_out(svc.base(request), r)

    @app.get("/v1/traces/{run_id}.html", response_class=HTMLResponse, responses=_ERRORS,
             tags=["native"])  # fmt: skip
    async def trace_html(run_id: str) -> HTMLResponse:
        """The run's trace as a self-contained HTML page (every step's image inline)."""
        from lavida_agent.traces import load_trace, render_html

        def render() -> str:
            return render_html(load_trace(_trace_file(run_id)), svc.agent.store,
                               runs_dir=svc.agent.settings.runs_dir)  # fmt: skip

        return HTMLResponse(await run_in_threadpool(render))

    @app.get("/v1/traces/{run_id}", responses={200: {"content": {"application/json": {}}},
                                                **_ERRORS}, tags=["native"])  # fmt: skip
    async def trace_json(run_id: str) -> Response:
        """The run's JSON trace (nodes, inputs, outputs, timings, seeds, boxes, image refs)."""
        return Response(await run_in_threadpool(lambda: _trace_file(run_id).read_bytes()),
                        media_type="application/json")  # fmt: skip

    def _trace_file(run_id: str) -> Path:
        """The run's trace file; a 404 that does not name the server's folder when none."""
        from lavida_agent.traces import find_trace

        return find_trace(run_id, svc.agent.settings.runs_dir)

    @app.get("/v1/artifacts/{sha256}", responses={200: {"content": {"image/png": {}}}, **_ERRORS},
             tags=["native"])  # fmt: skip
    async def artifact(sha256: str) -> Response:
        """A stored image as PNG, by the sha256 of its pixels (`.png` suffix optional)."""
        sha = sha256.removesuffix(".png")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ApiError(404, "not_found", f"no artifact {sha256!r}")
        try:
            data = await run_in_threadpool(svc.agent.store.read_bytes, sha)
        except KeyError:
            raise ApiError(404, "not_found", f"no artifact {sha}") from None
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{sha}"'}
        return Response(data, media_type="image/png", headers=headers)


# -- sessions -------------------------------------------------------------------------------


def _session_routes(app: FastAPI, svc: _Service) -> None:
    @app.post("/v1/sessions", response_model=schemas.SessionResponse, responses=_ERRORS,
              openapi_extra=_body("SessionCreateRequest", multipart=True),
              tags=["sessions"])  # fmt: skip
    async def create_session(request: Request) -> schemas.SessionResponse:
        """Start a multi-step edit session from an image."""
        req, uploads = await svc.parse(request, schemas.SessionCreateRequest, multipart=True)
        image = await svc.image(req, uploads)
        session = await run_in_threadpool(svc.agent.session)
        ref = await run_in_threadpool(session.start, image)
        out = await run_in_threadpool(svc.image_out, svc.base(request), ref, req.response_format)
        return schemas.SessionResponse(session_id=session.thread_id, image=out)

    @app.post("/v1/sessions/{session_id}/edit", response_model=schemas.EditResponse,
              responses=_ERRORS, openapi_extra=_body("SessionEditRequest", multipart=True),
              tags=["sessions"])  # fmt: skip
    async def session_edit(session_id: str, request: Request) -> schemas.EditResponse:
        """One edit turn on the session's current image (an `image` restarts it)."""
        req, uploads = await svc.parse(request, schemas.SessionEditRequest, multipart=True)
        image = await svc.image(req, uploads, required=False)
        async with svc.session_lock(session_id):
            session = await svc.session(session_id, must_exist=image is None)
            r = await _unless_dropped(request, session.aedit(
                req.instruction, image=image, seed=req.seed, rounds=req.rounds, num_steps=req.steps))  # fmt: skip
        return await run_in_threadpool(svc.edit_out, svc.base(request), r, req.response_format)

    @app.get("/v1/sessions/{session_id}/history", response_model=schemas.SessionHistoryResponse,
             responses=_ERRORS, tags=["sessions"])  # fmt: skip
    async def session_history(session_id: str, request: Request,
                              all: bool = False) -> schemas.SessionHistoryResponse:  # noqa: A002
        """The turns that made the session's current image, oldest first (a restart from a
        new image begins a new history); `?all=true`: every attempt of the current branch's
        lineage, the turns before a restart too (their `index` is what `branch` takes)."""
        session = await svc.session(session_id)
        base = svc.base(request)

        def build() -> schemas.SessionHistoryResponse:
            steps = [schemas.SessionStepOut(index=s.index, turn=s.turn, instruction=s.instruction,
                                            seed=s.seed, parent_sha256=s.parent.sha256,
                                            verdict=s.critique.verdict if s.critique else None,
                                            image=svc.image_out(base, s.result, "url"))
                     for s in (session.steps() if all else session.history())]  # fmt: skip
            current = session.current
            image = svc.image_out(base, current, "url") if current is not None else None
            return schemas.SessionHistoryResponse(session_id=session_id, steps=steps, image=image)

        return await run_in_threadpool(build)

    async def _move(session_id: str, request: Request, how: Callable[[Session], Any],
                    fmt: str) -> schemas.SessionResponse:  # fmt: skip
        async with svc.session_lock(session_id):
            session = await svc.session(session_id)
            ref = await run_in_threadpool(how, session)
        out = await run_in_threadpool(svc.image_out, svc.base(request), ref, fmt)
        return schemas.SessionResponse(session_id=session_id, image=out)

    @app.post("/v1/sessions/{session_id}/undo", response_model=schemas.SessionResponse,
              responses=_ERRORS, tags=["sessions"])  # fmt: skip
    async def session_undo(session_id: str, request: Request) -> schemas.SessionResponse:
        """Go back one turn (a new branch; the old one stays in the history)."""
        return await _move(session_id, request, lambda s: s.undo(), "b64_json")

    @app.delete("/v1/sessions/{session_id}", response_model=schemas.DeleteResponse,
                responses=_ERRORS, tags=["sessions"])  # fmt: skip
    async def session_delete(session_id: str, dry_run: bool = False) -> schemas.DeleteResponse:
        """Delete the session: every branch, its turns' traces and the images nothing else
        refers to. Waits for a turn of it this server runs; 409 while another process runs one."""
        if not schemas.SESSION_ID_RE.fullmatch(session_id):
            raise ApiError(404, "not_found", f"no session {session_id!r}")
        async with svc.session_lock(session_id):
            done = await run_in_threadpool(svc.agent.delete_session, session_id, dry_run=dry_run)
        return schemas.DeleteResponse(**done.to_dict())

    @app.post("/v1/sessions/{session_id}/redo", response_model=schemas.SessionResponse,
              responses=_ERRORS, tags=["sessions"])  # fmt: skip
    async def session_redo(session_id: str, request: Request) -> schemas.SessionResponse:
        """Return to where the last undo or branch left from."""
        return await _move(session_id, request, lambda s: s.redo(), "b64_json")

    @app.post("/v1/sessions/{session_id}/branch", response_model=schemas.SessionResponse,
              responses=_ERRORS, openapi_extra=_body("BranchRequest"),
              tags=["sessions"])  # fmt: skip
    async def session_branch(session_id: str, request: Request) -> schemas.SessionResponse:
        """Make lineage step `step`'s image current (a new branch)."""
        req, _ = await svc.parse(request, schemas.BranchRequest)
        return await _move(session_id, request, lambda s: s.branch(req.step, image=req.image),
                           req.response_format)  # fmt: skip


# -- streaming runs ---------------------------------------------------------------------------

_RUN_ADAPTER: TypeAdapter[Any] = TypeAdapter(schemas.RunStreamRequest)


def _resume_route(app: FastAPI, svc: _Service) -> None:
    @app.get("/v1/runs", responses=_ERRORS, tags=["native"])
    async def list_runs(limit: int = 20, unfinished: bool = False) -> dict[str, Any]:
        """The newest runs first: `run_id`, workflow, status (ok, running, stopped, failed,
        unfinished, resumed), start and what was asked; `unfinished=true` keeps what
        `/v1/runs/{run_id}/resume` may take (an edit turn whose session an undo, redo or
        branch moved since leaves no trace to tell by: resume then says so with a 400)."""
        from lavida_agent.traces import recent_runs

        if not 1 <= limit <= 1000:
            raise ApiError(400, "invalid_field", "limit: must be in 1..1000", param="limit")
        found = await run_in_threadpool(lambda: recent_runs(svc.agent.settings.runs_dir,
                                                            limit=limit, unfinished=unfinished))  # fmt: skip
        return {"runs": found}

    @app.delete("/v1/runs/{run_id}", response_model=schemas.DeleteResponse, responses=_ERRORS,
                tags=["native"])  # fmt: skip
    async def delete_run(run_id: str, dry_run: bool = False) -> schemas.DeleteResponse:
        """Delete a generate, ground, ask or critique run (with the runs that resumed it): its
        trace, checkpoints and the images nothing else refers to. A session's turn goes with
        its session (`DELETE /v1/sessions/{id}`, 400 here); 409 while it runs."""
        done = await run_in_threadpool(svc.agent.delete_run, run_id, dry_run=dry_run)
        return schemas.DeleteResponse(**done.to_dict())

    @app.post("/v1/runs/{run_id}/resume",
              response_model=schemas.GenerateResponse | schemas.EditResponse, responses=_ERRORS,
              tags=["native"])  # fmt: skip
    async def resume_run(run_id: str, request: Request) -> Any:
        """Finish a generate or edit run that stopped part-way (a cancelled request, a server
        restart) from its last checkpoint; the answer is the run's usual response."""
        r = await _unless_dropped(request, svc.resume(run_id))
        if isinstance(r, EditResult):
            return await run_in_threadpool(svc.edit_out, svc.base(request), r, "b64_json")
        return await run_in_threadpool(svc.generate_out, svc.base(request), r, "b64_json")


def _stream_routes(app: FastAPI, svc: _Service) -> None:
    @app.post("/v1/runs/stream", responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"oneOf": [{"$ref": f"#/components/schemas/{n}"} for n in
                                       ("GenerateRun", "EditRun", "GroundRun", "AskRun",
                                        "CritiqueRun")]}}}}},
              tags=["native"])  # fmt: skip
    async def run_stream(request: Request) -> StreamingResponse:
        """Run a workflow and stream its events (server-sent events), then the result."""
        req, _ = await svc.parse(request, _RUN_ADAPTER)
        image = None
        if req.workflow != "generate":
            image = await svc.image(req, {}, required=not getattr(req, "session_id", None))
        base = svc.base(request)
        session: Session | None = None
        if req.workflow == "edit" and req.session_id is not None:
            session = await svc.session(req.session_id, must_exist=image is None)

        async def start(agent: LavidaAgent, on_event: EventCallback) -> Any:
            if req.workflow == "generate":
                r = await agent.agenerate(req.prompt, seed=req.seed, rounds=req.rounds,
                                          plan=req.plan_arg(), num_steps=req.steps,
                                          on_event=on_event)  # fmt: skip
                return await run_in_threadpool(svc.generate_out, base, r, req.response_format)
            if req.workflow == "edit":
                kw = dict(seed=req.seed, rounds=req.rounds, num_steps=req.steps, on_event=on_event)
                if session is not None:
                    s = await run_in_threadpool(Session, agent, session.thread_id)
                    async with svc.session_lock(session.thread_id):
                        r = await s.aedit(req.instruction, image=image, **kw)
                else:
                    r = await agent.aedit(image, req.instruction, **kw)
                return await run_in_threadpool(svc.edit_out, base, r, req.response_format)
            if req.workflow == "ground":
                return svc.ground_out(base, await agent.aground(image, req.expressions,
                                                                on_event=on_event))  # fmt: skip
            if req.workflow == "critique":
                return svc.critique_out(base, await agent.acritique(image, req.prompt, on_event=on_event))
            return svc.ask_out(base, await agent.aask(image, req.question, on_event=on_event))

        async def body() -> AsyncIterator[bytes]:
            events = svc.events(start, req.preview_every)
            try:
                async with contextlib.aclosing(events):
                    async for kind, ev in events:
                        for chunk in _native_sse(svc, kind, ev, previews=req.preview_every > 0):
                            yield chunk
            except Exception as exc:  # noqa: BLE001 - reported to the client as an event
                yield _sse("error", _stream_error(exc))

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers=_SSE_HEADERS)


def _native_sse(svc: _Service, kind: str, ev: Any, *, previews: bool) -> list[bytes]:
    """The SSE chunks of one item of `_Service.events` (native stream)."""
    if kind == "ping":
        return [b": ping\n\n"]
    if kind == "result":
        return [_sse("result", ev.model_dump(mode="json"))]
    name = str(ev.get("event", "event"))
    if name != "sampler_step":
        return [_sse(name, ev)]
    png = svc.preview_png(ev) if previews else None
    ev = {k: v for k, v in ev.items() if k != "preview"}
    out = [_sse(name, ev)]
    if png is not None:
        b64 = base64.b64encode(png).decode("ascii")
        out.append(_sse("preview", {**ev, "event": "preview", "b64_json": b64}))
    return out


def _stream_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return _error_body(exc.status, exc.code, exc.message, exc.param)
    if isinstance(exc, LavidaError):
        return _error_body(exc.http_status, exc.code, str(exc))
    logger.error("stream failed", exc_info=exc)
    return _error_body(500, "internal_error", "internal server error")


# -- OpenAI-compatible ------------------------------------------------------------------------


def _openai_routes(app: FastAPI, svc: _Service) -> None:
    def seeds(req: Any) -> list[int]:
        base = req.seed if req.seed is not None else svc.agent.settings.seed
        if base is None:
            base = secrets.randbelow(2**31)
        return [base + SEED_STRIDE * i for i in range(req.n)]

    async def respond(request: Request, req: Any, kind: str,
                      run: Callable[[LavidaAgent, int, EventCallback | None], Awaitable[tuple[np.ndarray, str]]],
                      crop: Callable[[np.ndarray], np.ndarray] | None = None) -> Response:  # fmt: skip
        """Shared by generations and edits: `run(agent, seed, on_event)` -> (final image, its
        run id)."""
        scale = _scale(req.size, svc.agent.settings.canvas)
        if req.stream:
            if req.n != 1:
                raise ApiError(400, "invalid_field", "n: streaming supports n=1 only", param="n")
            return _openai_stream(svc, req, kind, run, seeds(req)[0], scale, crop)
        if req.partial_images:
            raise ApiError(400, "invalid_field", "partial_images: needs stream=true",
                           param="partial_images")  # fmt: skip
        results = await _unless_dropped(request, _gather([run(svc.agent, s, None) for s in seeds(req)]))
        images = [img for img, _ in results]
        base = svc.base(request)

        def shape() -> dict[str, Any]:
            from lavida_agent.tools.images import resize_nearest
            from lavida_agent.traces import add_served

            data = []
            for img, run_id in results:
                if req.response_format == "url":
                    ref = svc.agent.store.put(resize_nearest(img, scale) if scale > 1 else img)
                    add_served(run_id, ref, svc.agent.settings.runs_dir)  # kept while its run is
                    data.append({"url": f"{base}/v1/artifacts/{ref.sha256}.png", "run_id": run_id})
                else:
                    data.append({"b64_json": _png_b64(img, scale), "run_id": run_id})
            h, w = images[0].shape[:2]  # an edit of a non-square input comes back in its shape
            out = schemas.OpenAIImagesResponse(created=int(time.time()), data=data, size=f"{w * scale}x{h * scale}")
            return out.model_dump(mode="json", exclude_none=True)

        return JSONResponse(await run_in_threadpool(shape))

    @app.post("/v1/images/generations", response_model=schemas.OpenAIImagesResponse,
              responses=_ERRORS, openapi_extra=_body("OpenAIImageGenerationRequest"),
              tags=["openai"])  # fmt: skip
    async def images_generations(request: Request) -> Response:
        """OpenAI `images.generate`: the agent's t2i workflow per image (`n` run concurrently)."""
        req, _ = await svc.parse(request, schemas.OpenAIImageGenerationRequest)

        async def run(agent: LavidaAgent, seed: int, on_event: EventCallback | None) -> tuple[np.ndarray, str]:
            r = await agent.agenerate(req.prompt, seed=seed, rounds=req.rounds,
                                      num_steps=req.steps, on_event=on_event)  # fmt: skip
            return r.image, r.run_id

        return await respond(request, req, "image_generation", run)

    @app.post("/v1/images/edits", response_model=schemas.OpenAIImagesResponse, responses=_ERRORS,
              openapi_extra=_body("OpenAIImageEditRequest", multipart=True),
              tags=["openai"])  # fmt: skip
    async def images_edits(request: Request) -> Response:
        """OpenAI `images.edit`: the agent's edit workflow; `mask` limits what may change."""
        req, uploads = await svc.parse(request, schemas.OpenAIImageEditRequest, multipart=True,
                                       files=("image", "mask"))  # fmt: skip
        image = await svc.image(req, uploads)
        mask_raw = svc._raw_image(req, uploads, "mask")
        editable = None
        if mask_raw is not None:
            h, w = image.shape[:2]
            editable = await run_in_threadpool(svc._editable_mask, mask_raw, (w, h))

        async def run(agent: LavidaAgent, seed: int, on_event: EventCallback | None) -> tuple[np.ndarray, str]:
            r = await agent.aedit(image, req.prompt, seed=seed, rounds=req.rounds,
                                  num_steps=req.steps, on_event=on_event)  # fmt: skip
            if editable is None or r.source_ref is None:
                return r.content(), r.run_id  # in the input's shape, as the CLI writes it
            original = await run_in_threadpool(svc.agent.store.open, r.source_ref)
            return r.content(np.where(editable[..., None], r.image, original)), r.run_id

        from lavida_agent.tools.boxes import letterbox_params

        h, w = image.shape[:2]  # the partial images of a stream come in the input's shape too
        x0, y0, x1, y1 = letterbox_params(w, h, svc.agent.settings.canvas).content_box(w, h)
        return await respond(request, req, "image_edit", run, crop=lambda im: im[y0:y1, x0:x1])


def _openai_stream(svc: _Service, req: Any, kind: str, run: Callable[..., Awaitable[tuple[np.ndarray, str]]],
                   seed: int, scale: int,
                   crop: Callable[[np.ndarray], np.ndarray] | None = None) -> StreamingResponse:  # fmt: skip
    """SSE shaped like OpenAI's image streaming: `<kind>.partial_image` x <= partial_images,
    then `<kind>.completed`."""
    wanted = req.partial_images or 0
    steps = req.steps or svc.agent.settings.num_steps
    every = max(1, steps // (wanted + 1)) if wanted else 0
    common = {"background": "opaque", "output_format": "png", "quality": "auto"}  # `size`: each image's

    async def partial(ev: dict[str, Any], index: int) -> bytes | None:
        png = svc.preview_png(ev)
        if png is None:
            return None
        from lavida_agent.tools.images import decode_png

        image = decode_png(png) if crop is None else crop(decode_png(png))
        b64 = await run_in_threadpool(_png_b64, image, scale)
        h, w = image.shape[:2]
        return _sse(f"{kind}.partial_image", {"type": f"{kind}.partial_image", "b64_json": b64,
                    "created_at": int(time.time()), "partial_image_index": index,
                    **common, "size": f"{w * scale}x{h * scale}"})  # fmt: skip

    async def completed(image: np.ndarray) -> bytes:
        b64 = await run_in_threadpool(_png_b64, image, scale)
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                 "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}  # fmt: skip
        h, w = image.shape[:2]  # an edit of a non-square input comes back in its shape
        return _sse(f"{kind}.completed", {"type": f"{kind}.completed", "b64_json": b64,
                    "created_at": int(time.time()), **common, "size": f"{w * scale}x{h * scale}",
                    "usage": usage})  # fmt: skip

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        events = svc.events(lambda a, cb: run(a, seed, cb), every)
        try:
            async with contextlib.aclosing(events):
                async for what, ev in events:
                    if what == "ping":
                        yield b": ping\n\n"
                    elif what == "result":
                        yield await completed(ev[0])
                    elif sent < wanted and ev.get("event") == "sampler_step":
                        chunk = await partial(ev, sent)
                        if chunk is not None:
                            sent += 1
                            yield chunk
        except Exception as exc:  # noqa: BLE001 - reported to the client as an event
            yield _sse("error", _stream_error(exc))

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers=_SSE_HEADERS)

