"""Request and response models of the HTTP server (`server.py`).

Two families, both plain pydantic models that never reuse the graph state classes:

- **Native** (`/v1/generate`, `/v1/edit`, `/v1/ground`, `/v1/ask`, `/v1/sessions/...`,
  `/v1/runs/stream`): requests name the API's arguments (`prompt`, `instruction`, `seed`,
  `steps`, `rounds`, ...); responses carry ids, the plan, every attempt and the final image.
- **OpenAI-compatible** (`/v1/images/generations`, `/v1/images/edits`): the Images API
  shapes (`{"created", "data": [{"b64_json" | "url"}]}`) plus the extensions `seed`,
  `steps` and `rounds`.

Every request model forbids unknown fields, so a typo is a 400 naming the field. The
server's per-deployment limits (prompt length, `n`, steps, rounds) are checked by field
validators that read a `Limits` from the validation context:
`Model.model_validate(data, context={"limits": limits})`; without a context only the static
rules apply.

Images travel in requests as base64 strings in JSON (a `data:image/...;base64,` prefix is
accepted) or as file parts in multipart forms; `image_sha256` names an image already in the
artifact store instead. In responses, an image is an `ImageOut`: its sha256, size, an
artifact URL and, unless the request asked for `response_format="url"`, its PNG as base64.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lavida_agent.errors import InvalidInputError
from lavida_agent.settings import SEED_LIMIT

if TYPE_CHECKING:
    from lavida_agent.settings import Settings

__all__ = (
    "AskRequest",
    "AskResponse",
    "AttemptOut",
    "CritiqueRequest",
    "CritiqueResponse",
    "BoxOut",
    "BranchRequest",
    "EditRequest",
    "EditResponse",
    "ErrorBody",
    "ErrorResponse",
    "GenerateRequest",
    "GenerateResponse",
    "GroundRequest",
    "GroundResponse",
    "HealthResponse",
    "ImageOut",
    "LayoutIn",
    "Limits",
    "OpenAIImage",
    "OpenAIImageEditRequest",
    "OpenAIImageGenerationRequest",
    "OpenAIImagesResponse",
    "RunStreamRequest",
    "SessionCreateRequest",
    "SessionEditRequest",
    "SessionHistoryResponse",
    "SessionResponse",
    "SessionStepOut",
    "StrayOut",
    "RUN_WORKFLOWS",
    "SESSION_ID_RE",
    "PayloadTooLarge",
    "decode_base64",
    "validation_message",
)

SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""What a session id looks like (the ids the API makes are 32 hex digits)."""

ResponseFormat = Literal["b64_json", "url"]


@dataclass(frozen=True)
class Limits:
    """Per-request limits (from `Settings`), checked by the request models' validators."""

    max_prompt_chars: int = 2000
    max_n: int = 4
    max_steps: int = 64
    max_rounds: int = 8
    max_expressions: int = 16
    canvas: int = 64

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(max_prompt_chars=settings.max_prompt_chars, max_n=settings.max_n,
                   max_steps=settings.max_steps, max_rounds=settings.max_rounds_limit,
                   canvas=settings.canvas)  # fmt: skip


class PayloadTooLarge(InvalidInputError):
    """An uploaded image over the deployment's `max_upload_bytes`."""

    code = "image_too_large"
    http_status = 413


def decode_base64(text: str, param: str, limit: int) -> bytes:
    """An image sent as base64 (a `data:image/...;base64,` prefix is accepted) as bytes.

    Raises:
        PayloadTooLarge: more than `limit` bytes (checked before decoding too).
        InvalidInputError: not valid base64. Both messages start with `param`.
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())  # line-wrapped base64 (76-column MIME lines) is still base64
    if len(text) * 3 // 4 > limit + 3:
        raise PayloadTooLarge(f"{param}: over {limit} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{param}: not valid base64") from None
    if len(raw) > limit:
        raise PayloadTooLarge(f"{param}: {len(raw)} bytes is over the limit of {limit}")
    return raw


def validation_message(exc: ValidationError, *, strip_tag: bool = False) -> tuple[str | None, str]:
    """The first pydantic error as `(field, "field: message")`, the way every surface says it.

    `strip_tag` drops a discriminated union's tag (`generate`, ...) from the field's path.
    """
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    if strip_tag and loc:
        loc = loc[1:]
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        loc = ["workflow"]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    if err.get("type") == "union_tag_not_found":
        msg = f"required: the workflow to run, one of {', '.join(map(repr, RUN_WORKFLOWS))}"
    return param, f"{param}: {msg}" if param else msg


def _limits(info: ValidationInfo) -> Limits | None:
    ctx = info.context
    return ctx.get("limits") if isinstance(ctx, dict) else None


def _text(value: str, info: ValidationInfo) -> str:
    """A prompt-like field: not blank, at most `max_prompt_chars` characters."""
    if not value.strip():
        raise ValueError(f"{info.field_name or 'text'} must not be empty")
    lim = _limits(info)
    if lim is not None and len(value) > lim.max_prompt_chars:
        raise ValueError(f"{info.field_name} is {len(value)} characters long "
                         f"(limit {lim.max_prompt_chars})")  # fmt: skip
    return value


def _steps_limit(v: int | None, info: ValidationInfo) -> int | None:
    lim = _limits(info)
    if v is not None and lim is not None and v > lim.max_steps:
        raise ValueError(f"steps={v} is above the server limit of {lim.max_steps}")
    return v


def _rounds_limit(v: int | None, info: ValidationInfo) -> int | None:
    lim = _limits(info)
    if v is not None and lim is not None and v > lim.max_rounds:
        raise ValueError(f"rounds={v} is above the server limit of {lim.max_rounds}")
    return v


class _Request(BaseModel):
    """Base of every request: unknown fields are an error naming the field."""

    model_config = ConfigDict(extra="forbid")


class _SamplingFields(_Request):
    """`seed`, `steps` and `rounds`, bounded by the server's limits."""

    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT,
                             description="Base seed (round r uses seed + r); default random, "
                             "recorded in the response.")  # fmt: skip
    steps: int | None = Field(default=None, ge=1, description="Denoising steps per image.")
    rounds: int | None = Field(default=None, ge=1, description="Most images drawn (reflection).")

    _check_steps = field_validator("steps")(_steps_limit)
    _check_rounds = field_validator("rounds")(_rounds_limit)


class _ImageFields(_Request):
    """An input image: base64 `image` (JSON) / a file part (multipart), or `image_sha256`."""

    image: str | None = Field(default=None, description="The image, base64 (PNG, JPEG, ...).",
                              json_schema_extra={"format": "base64"})  # fmt: skip
    image_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                     description="An image in the artifact store.")  # fmt: skip


# ----------------------------------------------------------------------------------------
# Native requests
# ----------------------------------------------------------------------------------------


class LayoutIn(_Request):
    """One object of a layout to draw: a label and its box, in canvas pixels (64 px)."""

    label: str = Field(description='What to draw there, e.g. "large red circle".')
    box: list[StrictFloat] = Field(min_length=4, max_length=4,
                                   description="[x0, y0, x1, y1], canvas pixels.")  # fmt: skip


def check_layout(v: Any, lim: Limits | None = None) -> Any:
    """A layout given as a plan (a list; anything else passes through), checked whole before
    the `bool | list` union is: its error names the item and says what is wrong with it, not
    one line per member of the union (the HTTP request and the MCP `generate` tool alike)."""
    if not isinstance(v, list):
        return v
    from lavida_agent.graphs.state import given_layout

    v = [i.model_dump() if isinstance(i, LayoutIn) else i for i in v]  # (built in Python)
    if lim is not None and len(v) > lim.max_expressions:
        raise ValueError(f"a layout of {len(v)} objects (limit {lim.max_expressions})")
    for k, item in enumerate(v):
        extra = sorted(set(item) - {"label", "box"}) if isinstance(item, dict) else []
        if extra:
            raise ValueError(f"layout item {k}: unknown field {extra[0]!r}")
    given_layout(v, canvas=lim.canvas if lim is not None else None)
    return v


class GenerateRequest(_SamplingFields):
    """`POST /v1/generate`: plan, draw, critique and refine an image for `prompt`."""

    prompt: str
    plan: bool | list[LayoutIn] | None = Field(
        default=None, description="true: the model plans a layout first; false: draw without "
        "one; a layout ([{label, box}], e.g. a result's plan, edited) to draw instead; default: "
        "the server's setting.")  # fmt: skip
    response_format: ResponseFormat = "b64_json"

    _check_prompt = field_validator("prompt")(_text)

    @field_validator("plan", mode="before")
    @classmethod
    def _check_plan(cls, v: Any, info: ValidationInfo) -> Any:
        return check_layout(v, _limits(info))

    def plan_arg(self) -> bool | list[dict[str, Any]] | None:
        """`plan` as `LavidaAgent.generate` takes it (a layout as plain dicts)."""
        if isinstance(self.plan, list):
            return [item.model_dump() for item in self.plan]
        return self.plan


class EditRequest(_SamplingFields, _ImageFields):
    """`POST /v1/edit`: edit an image by `instruction` (starts a new session)."""

    instruction: str
    response_format: ResponseFormat = "b64_json"

    _check_instruction = field_validator("instruction")(_text)


class GroundRequest(_ImageFields):
    """`POST /v1/ground`: one box per referring expression, in the input image's pixels."""

    expressions: list[Annotated[str, AfterValidator(_text)]] = Field(min_length=1)

    @field_validator("expressions")
    @classmethod
    def _check_expressions(cls, v: list[str], info: ValidationInfo) -> list[str]:
        v = [i.model_dump() if isinstance(i, LayoutIn) else i for i in v]  # (built in Python)
        lim = _limits(info)
        if lim is not None and len(v) > lim.max_expressions:
            raise ValueError(f"{len(v)} expressions (limit {lim.max_expressions})")
        return v


class AskRequest(_ImageFields):
    """`POST /v1/ask`: answer a question about an image."""

    question: str

    _check_question = field_validator("question")(_text)


class CritiqueRequest(_ImageFields):
    """`POST /v1/critique`: does the image show what a text-to-image prompt asks for."""

    prompt: str

    _check_prompt = field_validator("prompt")(_text)


class SessionCreateRequest(_ImageFields):
    """`POST /v1/sessions`: start a multi-step edit session from an image."""

    response_format: ResponseFormat = "b64_json"


class SessionEditRequest(_SamplingFields, _ImageFields):
    """`POST /v1/sessions/{id}/edit`: one turn; an `image` restarts the session from it."""

    instruction: str
    response_format: ResponseFormat = "b64_json"

    _check_instruction = field_validator("instruction")(_text)


ImagePrefix = Annotated[str, Field(
    min_length=4, max_length=64, pattern=r"^[0-9a-f]+$",
    description="The step `step` whose result is this image (its sha256, or a prefix of one), "
                "on whichever branch holds it: step numbers are per branch.")]  # fmt: skip
"""A branch's `image` argument (HTTP and MCP)."""


class BranchRequest(_Request):
    """`POST /v1/sessions/{id}/branch`: make lineage step `step`'s image current."""

    step: int = Field(ge=0)
    image: ImagePrefix | None = None
    response_format: ResponseFormat = "b64_json"


class _StreamFields(_Request):
    preview_every: int = Field(default=0, ge=0, description="Send a `preview` event (base64 "
                               "PNG) every k sampler steps; 0: none.")  # fmt: skip


class GenerateRun(GenerateRequest, _StreamFields):
    workflow: Literal["generate"]


class EditRun(EditRequest, _StreamFields):
    workflow: Literal["edit"]
    session_id: str | None = Field(default=None, description="Continue this session (no image"
                                   " needed) instead of starting a new one.")  # fmt: skip


class GroundRun(GroundRequest, _StreamFields):
    workflow: Literal["ground"]


class AskRun(AskRequest, _StreamFields):
    workflow: Literal["ask"]


class CritiqueRun(CritiqueRequest, _StreamFields):
    workflow: Literal["critique"]


RunStreamRequest = Annotated[GenerateRun | EditRun | GroundRun | AskRun | CritiqueRun,
                             Field(discriminator="workflow")]  # fmt: skip
"""`POST /v1/runs/stream`: any workflow, streamed as server-sent events."""

RUN_WORKFLOWS: tuple[str, ...] = tuple(
    m.model_fields["workflow"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in (GenerateRun, EditRun, GroundRun, AskRun, CritiqueRun)
)
"""The `workflow` values `POST /v1/runs/stream` takes (the API's names, not the graphs')."""


# ----------------------------------------------------------------------------------------
# OpenAI-compatible requests
# ----------------------------------------------------------------------------------------


class _OpenAIFields(_Request):
    """Fields shared by generations and edits. Accepted but ignored (one model, one look):
    `model`, `quality`, `style`, `background` (not "transparent"), `moderation`, `user`,
    `output_compression`, `input_fidelity`, `safety_identifier`."""

    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, description="'64x64' (native) or '256x256', "
                             "'512x512', '1024x1024' (nearest-neighbour upscale); "
                             "'auto' = native.")  # fmt: skip
    response_format: ResponseFormat = "b64_json"
    output_format: Literal["png"] | None = None
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0, le=3)
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: str | None = None
    user: str | None = None
    output_compression: int | None = None
    safety_identifier: str | None = None
    # Extensions.
    seed: int | None = Field(default=None, ge=0, lt=2**62, description="Extension: image i "
                             "uses seed + 1000 * i.")  # fmt: skip
    steps: int | None = Field(default=None, ge=1, description="Extension: denoising steps.")
    rounds: int | None = Field(default=None, ge=1, description="Extension: most rounds.")

    _check_prompt = field_validator("prompt")(_text)
    _check_steps = field_validator("steps")(_steps_limit)
    _check_rounds = field_validator("rounds")(_rounds_limit)

    @field_validator("n", "response_format", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        """OpenAI types these "... or null": an explicit null (a client's unset field) is the default."""
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("n")
    @classmethod
    def _check_n(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        if lim is not None and v > lim.max_n:
            raise ValueError(f"n={v} is above the server limit of {lim.max_n}")
        return v


class OpenAIImageGenerationRequest(_OpenAIFields):
    """`POST /v1/images/generations` (JSON), as the OpenAI Images API."""


class OpenAIImageEditRequest(_OpenAIFields):
    """`POST /v1/images/edits` (multipart: `image` file, optional `mask` file, fields)."""

    image: str | None = Field(default=None, description="JSON alternative to the file part: "
                              "the image, base64.")  # fmt: skip
    mask: str | None = Field(default=None, description="JSON alternative to the file part: "
                             "the mask, base64.")  # fmt: skip
    input_fidelity: str | None = None


# ----------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------


class ImageOut(BaseModel):
    """An image in a response: always by reference, inline as base64 PNG when asked."""

    sha256: str
    width: int
    height: int
    url: str = Field(description="GET it for the PNG (`/v1/artifacts/{sha256}`).")
    b64_json: str | None = Field(default=None, description="The PNG, base64.")


class BoxOut(BaseModel):
    label: str
    box: list[float] = Field(description="[x0, y0, x1, y1] in pixels.")


class StrayOut(BaseModel):
    """A mark away from every planned box that the prompt and plan argue against."""

    box: list[float] = Field(description="[x0, y0, x1, y1] in canvas pixels.")
    score: float = Field(description="How surely stray (lower: more; nats for the real engine).")


class AttemptOut(BaseModel):
    """One image drawn during a run (t2i attempt or edit step), with its critique."""

    round: int
    seed: int
    verdict: Literal["accept", "reject"] | None = None
    reasons: list[str] = Field(default_factory=list)
    grounding_failed: list[str] = Field(
        default_factory=list,
        description="Objects whose grounding check failed; an accepted t2i image can have some "
        "(grounding_check=rank trusts the model's verdict and only ranks by the checks).",
    )
    strays: list[StrayOut] = Field(
        default_factory=list,
        description="t2i: marks away from every planned box that the prompt and plan argue "
        "against (stray_check=gate); each rejected the image.",
    )
    dropped_reasons: list[str] = Field(
        default_factory=list,
        description="The model's critique reasons that cannot be about the prompt (e.g. "
        "`missing blue circle` when the prompt has no blue circle); not in `reasons`.",
    )
    worst_token: float | None = Field(
        default=None,
        description="t2i: the lowest score of any image token (how strongly the prompt and plan "
        "argue against the least explained part; higher is cleaner; ranks the attempts of one "
        "run under rank_by=surprise, the default).",
    )
    fit: list[float] = Field(
        default_factory=list,
        description="t2i: how well the prompt and plan explain each planned box (plan order; "
        "higher is better; ranks the attempts of one run); edit: how much better each object "
        "the edit produces reads as its own noun than as a look-alike.",
    )
    keep_fit: list[float] = Field(
        default_factory=list,
        description="edit producing no object (remove, background): the same for each kept "
        "object; breaks ties between attempts.",
    )
    image: ImageOut


class _RunOut(BaseModel):
    run_id: str
    trace_url: str


class GenerateResponse(_RunOut):
    thread_id: str
    prompt: str
    seed: int
    accepted: bool
    rounds: int
    max_rounds: int
    plan: list[BoxOut]
    attempts: list[AttemptOut]
    image: ImageOut


class EditResponse(_RunOut):
    session_id: str
    instruction: str
    seed: int
    accepted: bool
    step: int | None
    rounds: int
    max_rounds: int
    plan: list[BoxOut]
    targets: list[str]
    absent: list[str] = Field(
        default_factory=list,
        description="Targets the input image does not hold (by the model's caption and its "
        "reading of the grounded box): the edit could only act on a look-alike, so every "
        "attempt is rejected naming them.",
    )
    regions: list[list[float]]
    keep: list[BoxOut] = Field(
        default_factory=list,
        description="The objects the edit plan keeps (label and box, model canvas): every "
        "attempt is checked for them, and a background edit redraws around their cores.",
    )
    attempts: list[AttemptOut]
    image: ImageOut
    source_size: list[int] | None = Field(
        default=None, description="[width, height] of the image the session started from, as "
        "given (null when the session knows none).")  # fmt: skip
    content_box: list[int] | None = Field(
        default=None, description="[x0, y0, x1, y1]: where that image's content lies in `image` "
        "(canvas pixels; the whole canvas for a square input); cropping `image` to it gives the "
        "edit in the input's shape, as the CLI writes it (null: the whole image).")  # fmt: skip


class GroundResponse(_RunOut):
    expressions: list[str]
    boxes: list[BoxOut] = Field(description="In the input image's pixels.")
    canvas_boxes: list[BoxOut] = Field(description="In the model canvas (letterboxed input).")
    source_size: list[int] = Field(description="[width, height] of the input image.")
    found_by: list[Literal["direct", "scene", "fit"]] = Field(
        default_factory=list,
        description="Per box: 'direct' (the model's own box), 'scene' (the object the "
        "expression picks out of the perceived scene: `caption`, `objects`) or 'fit' (a "
        "perceived object's box the expression's head noun fits better).",
    )
    present: list[bool | None] = Field(
        default_factory=list,
        description="Per expression: whether the image holds what it names (the perceived "
        "scene has it, or the model reads its box as it). False: the box is only the nearest "
        "look-alike. None: not checked (nothing perceived, or outside the ShapesWorld grammar).",
    )
    caption: str | None = Field(default=None, description="The model's caption, if it perceived.")
    objects: list[BoxOut] = Field(
        default_factory=list, description="Each captioned object grounded, in input pixels."
    )


class AskResponse(_RunOut):
    question: str
    answer: str
    answered_by: Literal["scene", "direct"] | None = Field(
        default=None,
        description="'scene': read off the perceived scene (`caption`, `objects`); "
        "'direct': the model's own answer to the question.",
    )
    caption: str | None = Field(default=None, description="The model's caption, if it perceived.")
    objects: list[BoxOut] = Field(
        default_factory=list, description="Each captioned object grounded, in input pixels."
    )


class CritiqueResponse(_RunOut):
    prompt: str
    verdict: Literal["accept", "reject"]
    reasons: list[str] = Field(default_factory=list, description="Why not (`missing blue square`).")
    judged_by: Literal["scene", "model"] | None = Field(
        default=None,
        description="'scene': the prompt checked against the perceived scene (`caption`, "
        "`objects`) by the world's prompt rules; 'model': the model's critique (`model_text`).",
    )
    model_text: str = ""
    caption: str | None = Field(default=None, description="The model's caption, if it perceived.")
    objects: list[BoxOut] = Field(
        default_factory=list, description="Each captioned object grounded, in input pixels."
    )


class SessionStepOut(BaseModel):
    index: int
    turn: int
    instruction: str
    seed: int
    verdict: Literal["accept", "reject"] | None = None
    parent_sha256: str
    image: ImageOut


class SessionResponse(BaseModel):
    session_id: str
    image: ImageOut = Field(description="The session's current image.")


class SessionHistoryResponse(BaseModel):
    session_id: str
    image: ImageOut | None
    steps: list[SessionStepOut] = Field(description="The turns that made the current image, oldest "
                                        "first (a restart from a new image begins a new history).")


class DeleteResponse(BaseModel):
    """What a delete removed (`dry_run`: would remove)."""

    threads: list[str] = Field(description="The threads deleted: the session, or the run's thread.")
    runs: list[str] = Field(description="The runs whose traces were deleted.")
    images: int = Field(description="Images removed from the store: those nothing refers to any more.")
    images_waiting: int = Field(default=0, description="Images nothing refers to, kept only because "
                                "they were stored within the grace (an hour): a prune after it takes them.")
    bytes_freed: int
    busy: list[str] = Field(default_factory=list)
    busy_runs: list[str] = Field(default_factory=list)
    dry_run: bool


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    run_id: str | None = Field(default=None, description="Extension: the run that made the "
                               "image (its trace; `DELETE /v1/runs/{run_id}` removes it).")  # fmt: skip


class OpenAIImagesResponse(BaseModel):
    """The OpenAI Images API response (`openai.types.ImagesResponse`)."""

    created: int
    data: list[OpenAIImage]
    output_format: Literal["png"] = "png"
    size: str


class ErrorBody(BaseModel):
    code: str
    message: str
    type: str = Field(description="OpenAI-style error class, e.g. 'invalid_request_error'.")
    param: str | None = Field(default=None, description="The request field at fault.")


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"code", "message", "type", "param"}}` with a 4xx/5xx."""

    error: ErrorBody


def json_schemas() -> dict[str, Any]:
    """JSON schemas of the request models that routes parse by hand (for OpenAPI docs)."""
    from pydantic.json_schema import models_json_schema

    models = [GenerateRequest, EditRequest, GroundRequest, AskRequest, CritiqueRequest,
              SessionCreateRequest, SessionEditRequest, BranchRequest, GenerateRun, EditRun,
              GroundRun, AskRun, CritiqueRun,
              OpenAIImageGenerationRequest, OpenAIImageEditRequest]  # fmt: skip
    _, top = models_json_schema([(m, "validation") for m in models],
                                ref_template="#/components/schemas/{model}")  # fmt: skip
    defs: dict[str, Any] = top.get("$defs", {})
    return defs
