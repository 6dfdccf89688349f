"""Pydantic models for everything a workflow run produces, and the graph states built on them.

Two sections, as in ODR's `state.py`:

- **Values**: `Box`, `LayoutItem`, `Plan`, `Attempt`, `GroundingCheck`, `Critique`,
  `EditPlan`, `EditStep`, `Perception`: small, JSON-serialisable records of what the model
  planned, drew, judged, edited and saw.
- **Graph states**: `*Input` (what a caller passes), `*State` (what nodes see) and `*Output`
  (what `invoke` returns) for the `t2i`, `edit`, `ground`, `understand` and `critique`
  workflows. List fields that grow over a run use an `operator.add` reducer (append); every
  other field is overwritten by the node that writes it.

Images are only `ImageRef`s (content hash, size and path in the artifact store), never bytes
or arrays, so checkpoints and traces stay small (PEERS.md §0 item 8). Numbers are plain
`int`/`float` (msgpack cannot hold numpy scalars).
"""

from __future__ import annotations

import numbers
import operator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lavida_agent.graphs.engine import BoxList, PlanItem
from lavida_agent.tools.artifacts import ImageRef
from lavida_agent.tools.boxes import as_box

__all__ = (
    "Attempt",
    "Box",
    "Critique",
    "CritiqueInput",
    "CritiqueOutput",
    "CritiqueState",
    "EditInput",
    "EditOutput",
    "EditPlan",
    "EditState",
    "EditStep",
    "FoundBy",
    "GroundInput",
    "GroundOutput",
    "GroundState",
    "GroundingCheck",
    "LayoutItem",
    "Perception",
    "Plan",
    "T2IInput",
    "T2IOutput",
    "T2IState",
    "UnderstandInput",
    "UnderstandOutput",
    "UnderstandState",
    "box_iou",
    "given_layout",
)

# ----------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------


class Box(BaseModel):
    """An axis-aligned box in canvas pixels (x right, y down, x1/y1 exclusive).

    Accepts `[x0, y0, x1, y1]` as input, so engine output validates directly.
    """

    model_config = ConfigDict(frozen=True)

    x0: float
    y0: float
    x1: float
    y1: float

    @model_validator(mode="before")
    @classmethod
    def _from_sequence(cls, data: Any) -> Any:
        if isinstance(data, list | tuple):
            if len(data) != 4:
                raise ValueError(f"a box needs 4 numbers [x0, y0, x1, y1], got {data!r}")
            return dict(zip(("x0", "y0", "x1", "y1"), data, strict=True))
        return data

    def as_list(self) -> BoxList:
        """The box as `[x0, y0, x1, y1]`, the engine's format."""
        return [self.x0, self.y0, self.x1, self.y1]

    @property
    def area(self) -> float:
        """Area in square pixels (0 for a degenerate box)."""
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is degenerate)."""
    iw = min(a.x1, b.x1) - max(a.x0, b.x0)
    ih = min(a.y1, b.y1) - max(a.y0, b.y0)
    inter = max(0.0, iw) * max(0.0, ih)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


class LayoutItem(BaseModel):
    """One object of a layout: a label (referring expression) and its box."""

    model_config = ConfigDict(frozen=True)

    label: str
    box: Box

    def to_engine(self) -> PlanItem:
        """The engine's `{"label", "box"}` form."""
        return {"label": self.label, "box": self.box.as_list()}


def given_layout(items: Any, *, canvas: int | None = None) -> list[LayoutItem]:
    """A layout given from outside (a caller's plan, a reviewer's reply), checked item by
    item before anything is drawn from it.

    Raises:
        ValueError: naming the first bad item: not a `{"label", "box"}` object, an empty
            label, a box that is not four finite numbers with x0 < x1 and y0 < y1, or (with
            `canvas`) a box reaching outside the `canvas`-pixel square.
    """
    if not isinstance(items, list | tuple):
        raise ValueError(f'a layout is a list of {{"label", "box"}} items, got {items!r}')
    out = []
    for k, item in enumerate(items):
        try:
            raw = item.get("box") if isinstance(item, dict) else None
            if isinstance(raw, list | tuple) and any(isinstance(v, bool) or not isinstance(v, numbers.Real)
                                                     for v in raw):  # fmt: skip
                raise ValueError(f"the box {raw!r} must hold numbers (no bool or string read as one)")
            parsed = LayoutItem.model_validate(item)
            box = as_box(parsed.box.as_list())  # finite, ordered
            if not parsed.label.strip():
                raise ValueError("the label is empty")
            if box.x1 <= box.x0 or box.y1 <= box.y0:
                raise ValueError(f"the box {parsed.box.as_list()} has no area")
            if canvas is not None and (min(box.x0, box.y0) < 0 or max(box.x1, box.y1) > canvas):
                raise ValueError(f"the box {parsed.box.as_list()} reaches outside the "
                                 f"{canvas}x{canvas} canvas")  # fmt: skip
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'item'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"layout item {k} ({item!r}): {why}") from None
        except ValueError as exc:
            raise ValueError(f"layout item {k} ({item!r}): {exc}") from None
        out.append(parsed)
    return out


class Plan(BaseModel):
    """A layout to draw: where each object of the prompt goes."""

    items: list[LayoutItem] = Field(default_factory=list)
    source: Literal["model", "user", "input"] = Field(
        default="model", description="Who made it: the planner, a reviewer, or the caller."
    )
    seed: int | None = Field(default=None, description="Planner seed (None if not planned).")
    temperature: float = Field(
        default=0.0, description="Planner temperature (0: greedy; re-plans sample)."
    )
    problems: list[str] = Field(
        default_factory=list,
        description="What the plan check found wrong with it (empty: passed or not checked).",
    )

    @classmethod
    def from_engine(
        cls, items: list[PlanItem], *, source: Literal["model", "user", "input"], seed: int | None,
        temperature: float = 0.0,
    ) -> Plan:  # fmt: skip
        """Build a plan from the engine's list of `{"label", "box"}` dicts."""
        return cls(items=[LayoutItem.model_validate(i) for i in items], source=source, seed=seed,
                   temperature=temperature)  # fmt: skip

    def to_engine(self) -> list[PlanItem]:
        """The engine's list-of-dicts form."""
        return [item.to_engine() for item in self.items]


class Attempt(BaseModel):
    """One image drawn by the t2i loop: everything needed to replay it exactly."""

    round: int = Field(description="0 for the first image, then 1, 2, ... per refinement.")
    image: ImageRef
    seed: int = Field(description="Sampler seed of this attempt (base seed + round).")
    num_steps: int
    mode: Literal["generate", "regenerate_regions"]
    plan: Plan | None = Field(default=None, description="The layout the image was drawn with.")
    feedback: list[str] = Field(default_factory=list, description="Critique text fed back in.")
    regions: list[Box] = Field(default_factory=list, description="Re-masked boxes (regions mode).")
    parent: ImageRef | None = Field(default=None, description="Image the regions were redrawn in.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per phase.")


class GroundingCheck(BaseModel):
    """One object looked for by grounding: where it should be and where it was found."""

    label: str
    expected: Box
    found: Box
    iou: float
    ok: bool
    role: Literal["planned", "target", "keep"] = Field(
        default="planned",
        description="planned: a t2i layout object; target: an object the edit should produce; "
        "keep: an object the edit must leave where it was.",
    )


class Stray(BaseModel):
    """A mark away from every planned box that the prompt and plan argue against
    (`Engine.surprise`): a faint blob, a smear, an object nobody asked for."""

    box: Box
    score: float = Field(description="How surely stray (lower: more; the real engine's in nats).")


class Perception(BaseModel):
    """What the model sees in an image: its caption, and every captioned object grounded.

    `objects` are labelled `{size} {color} {shape}` in caption order, each with the box the
    model grounded `the {label}` to; `complete` says whether the caption parsed whole (every
    object with its size and colour, a known background), so the objects are the scene.
    """

    caption: str
    objects: list[LayoutItem] = Field(default_factory=list)
    background: str | None = None
    complete: bool = False


class Critique(BaseModel):
    """The verdict on one image, and how it was reached.

    For t2i, `verdict` is the model's (`Context.grounding_check="rank"`, the default), or
    with `"gate"` `accept` only when the model accepts *and* every grounding check passes
    (each planned object found where it was planned, IoU >= the threshold). The model's
    verdict is read off the scene it perceives (`judged_by="scene"`, `perception` kept) or
    is its own critique answer (`"model"`; `Context.critique_by`). Edits are
    verified by their grounding checks alone. Failed checks are kept in `grounding` either
    way, and a rejection blames their objects. A t2i image with `strays` (marks off the plan,
    `Context.stray_check="gate"`, the default) is rejected and drawn afresh.
    """

    round: int
    image: ImageRef
    verdict: Literal["accept", "reject"]
    reasons: list[str] = Field(default_factory=list)
    blamed: list[LayoutItem] = Field(
        default_factory=list, description="Objects (with their expected boxes) judged wrong."
    )
    model_ok: bool = Field(
        description="The model's verdict: its perceived scene checked against the prompt "
        "(`judged_by='scene'`), or its own critique answer (`Engine.critique`, 'model')."
    )
    model_text: str = Field(default="", description="The critique answer, or the caption read.")
    judged_by: Literal["scene", "model"] = "model"
    perception: Perception | None = Field(
        default=None, description="What the model saw in the image (`judged_by='scene'`)."
    )
    dropped_reasons: list[str] = Field(
        default_factory=list,
        description="The model's reasons that cannot be about the prompt (`missing blue circle` "
                    "for a prompt without one), left out of `reasons`; a rejection with only "
                    "such reasons leaves the verdict to the grounding checks.",
    )  # fmt: skip
    grounding: list[GroundingCheck] = Field(default_factory=list)
    strays: list[Stray] = Field(
        default_factory=list,
        description="t2i: marks away from every planned box that the prompt and plan argue "
        "against (`Engine.surprise`); each rejects the image.",
    )
    worst_token: float | None = Field(
        default=None,
        description="t2i: the lowest score of any image token (`Engine.surprise`: how strongly "
        "the prompt and plan argue against the least explained part; higher is cleaner); "
        "None when not measured.",
    )
    fit: list[float] = Field(
        default_factory=list,
        description="t2i: how well the prompt and plan explain each planned box (`Engine."
        "plan_fit`, plan order); empty when not measured.",
    )
    keep_fit: list[float] = Field(
        default_factory=list,
        description="edit producing no object (remove, background): how much better each kept "
        "object reads at its box as itself than as its best look-alike one word away "
        "(`Engine.noun_fit(contrast=True)`, keep order); empty when not measured.",
    )
    score: float = Field(description="(model_ok + checks passed) / (1 + checks); ranks attempts.")

    @property
    def fit_score(self) -> float | None:
        """The worst planned object's fit (None when not measured): the attempt is as good
        as its least explained object."""
        return min(self.fit) if self.fit else None

    @property
    def keep_fit_score(self) -> float | None:
        """The worst kept object's noun contrast (None when not measured)."""
        return min(self.keep_fit) if self.keep_fit else None

    @property
    def accepted(self) -> bool:
        """`True` when the verdict is `accept`."""
        return self.verdict == "accept"

    @property
    def grounding_failed(self) -> list[str]:
        """Labels of the objects whose grounding check failed (an accepted t2i image can have
        some under `grounding_check="rank"`)."""
        return [c.label for c in self.grounding if not c.ok]


class EditPlan(BaseModel):
    """The plan for one edit: what it refers to, where to redraw, what must result."""

    targets: list[str] = Field(default_factory=list, description="Referring expressions.")
    grounded: list[LayoutItem] = Field(
        default_factory=list, description="The targets as grounded in the source image."
    )
    regions: list[Box] = Field(default_factory=list, description="Boxes to re-mask and redraw.")
    layout: list[LayoutItem] = Field(default_factory=list, description="Objects after the edit.")
    keep: list[LayoutItem] = Field(default_factory=list, description="Objects that must not move.")
    absent: list[str] = Field(
        default_factory=list,
        description="Targets the source image does not hold (`perceive.presence`): the edit "
        "can only act on a look-alike, so every attempt is rejected naming them.",
    )
    caption: str | None = Field(
        default=None, description="The model's caption of the source image, which the plan "
        "and `absent` were read from (None: the planner read none).",
    )


class EditStep(BaseModel):
    """One edit attempt in the lineage: parent image -> result, and its verification."""

    index: int = Field(description="Position in the lineage (`EditState.steps`).")
    turn: int = Field(description="Which instruction of the session (0, 1, ...).")
    round: int = Field(description="Attempt within the turn (0, then re-edits).")
    parent: ImageRef
    parent_step: int | None = Field(
        default=None, description="Index of the step that produced `parent` (None: an input)."
    )
    instruction: str
    plan: EditPlan
    result: ImageRef
    seed: int
    num_steps: int
    critique: Critique | None = None
    timings: dict[str, float] = Field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# Graph states
# ----------------------------------------------------------------------------------------


class T2IInput(BaseModel):
    """What a caller passes to the `t2i` workflow."""

    prompt: str
    seed: int | None = Field(default=None, description="Base seed; None: the context's seed.")
    plan: Plan | None = Field(default=None, description="A ready layout (skips planning).")
    run_id: str | None = Field(default=None, description="The run that started this work "
                               "(what a resume checks it is finishing).")  # fmt: skip


class T2IState(T2IInput):
    """Everything the `t2i` nodes read and write."""

    base_seed: int | None = Field(default=None, description="Resolved base seed of the run.")
    max_rounds: int | None = Field(default=None, description="Loop bound, recorded at start.")
    selection: Literal["accept", "best"] = Field(
        default="best", description="`Context.selection`, recorded at start."
    )
    rejected_plans: list[Plan] = Field(
        default_factory=list, description="Plans the plan check turned down, in order."
    )
    plan_reviewed: bool = False
    attempts: Annotated[list[Attempt], operator.add] = Field(default_factory=list)
    """Every image drawn, in order (append-only)."""
    critiques: Annotated[list[Critique], operator.add] = Field(default_factory=list)
    """One critique per attempt, same order (append-only)."""
    best: Attempt | None = None
    accepted: bool = False


class T2IOutput(BaseModel):
    """What `invoke` returns for `t2i` (validate the dict with `T2IOutput.model_validate`)."""

    prompt: str
    plan: Plan | None = None
    rejected_plans: list[Plan] = Field(default_factory=list)
    attempts: list[Attempt] = Field(default_factory=list)
    critiques: list[Critique] = Field(default_factory=list)
    best: Attempt | None = None
    accepted: bool = False


class EditInput(BaseModel):
    """What a caller passes to the `edit` workflow (one turn of a session).

    `image` starts a session (or restarts it from an outside image); without it the turn
    edits the session's current image.
    """

    instruction: str
    image: ImageRef | None = None
    seed: int | None = None
    run_id: str | None = Field(default=None, description="The run that started this turn "
                               "(what a resume checks it is finishing).")  # fmt: skip
    frame: dict[str, Any] | None = Field(
        default=None, description="The caller's image given with `image`, before it was "
        "letterboxed: its `width` and `height` and the canvas `size`, so that a later turn, a "
        "reopened session or a resume crops results to the caller's shape, and `plan_edit` "
        "keeps an added or moved object inside the content. None: no letterbox known.")  # fmt: skip


class EditState(EditInput):
    """Everything the `edit` nodes read and write; a thread accumulates turns."""

    turn: int = Field(default=0, description="Index of the turn being run (or next to run).")
    round: int = Field(default=0, description="Attempts made in this turn so far.")
    max_rounds: int | None = Field(default=None, description="Loop bound, recorded per turn.")
    selection: Literal["accept", "best"] = Field(
        default="best", description="`Context.selection`, recorded per turn."
    )
    source: ImageRef | None = Field(default=None, description="Image this turn edits.")
    source_step: int | None = None
    edit_plan: EditPlan | None = None
    candidate: EditStep | None = Field(default=None, description="Drawn, not yet verified.")
    steps: Annotated[list[EditStep], operator.add] = Field(default_factory=list)
    """The lineage: every verified edit attempt of the session (append-only)."""
    heads: Annotated[list[int], operator.add] = Field(default_factory=list)
    """Per committed turn, the index of the step kept as the result (append-only)."""
    current: ImageRef | None = Field(default=None, description="Head image of the session.")
    current_step: int | None = None
    accepted: bool = False
    undone: list[str] = Field(
        default_factory=list,
        description="Checkpoint ids `undo`/`branch` moved away from, newest last: what `redo` "
        "returns to. A committed turn clears it.",
    )


class EditOutput(BaseModel):
    """What `invoke` returns for `edit`."""

    instruction: str
    current: ImageRef | None = None
    current_step: int | None = None
    accepted: bool = False
    steps: list[EditStep] = Field(default_factory=list)
    heads: list[int] = Field(default_factory=list)


class GroundInput(BaseModel):
    """Find each referring expression in an image."""

    image: ImageRef
    expressions: list[str]


FoundBy = Literal["direct", "scene", "fit"]
"""How a `ground` box was chosen: 'direct', the model's own box for the expression;
'scene', the object the expression picks out of the perceived scene; 'fit', a perceived
object's box that the expression's head noun explains better than the direct box."""


class GroundState(GroundInput):
    """State of the `ground` workflow."""

    perception: Perception | None = None
    boxes: list[LayoutItem] = Field(default_factory=list)
    found_by: list[FoundBy] = Field(default_factory=list)
    present: list[bool | None] = Field(default_factory=list)


class GroundOutput(BaseModel):
    """One box per expression, labelled with it, how each was chosen, whether the image
    holds it, and the perceived scene they were chosen from (if any)."""

    boxes: list[LayoutItem] = Field(default_factory=list)
    found_by: list[FoundBy] = Field(
        default_factory=list,
        description="Per expression: 'direct' (the model's own box), 'scene' (the object the "
        "expression picks out of `perception`) or 'fit' (a perceived object's box that the "
        "expression's head noun explains better).",
    )
    present: list[bool | None] = Field(
        default_factory=list,
        description="Per expression: whether the image holds what it names. True when the "
        "perceived scene has it or the model reads its box as it rather than as a look-alike; "
        "False when neither (the box is then only the nearest look-alike); None when not "
        "checked (nothing perceived, or an expression outside the ShapesWorld grammar).",
    )
    perception: Perception | None = None


class UnderstandInput(BaseModel):
    """Ask a question about an image."""

    image: ImageRef
    question: str


class UnderstandState(UnderstandInput):
    """State of the `understand` workflow."""

    perception: Perception | None = None
    answer: str | None = None
    answered_by: Literal["scene", "direct"] | None = None


class UnderstandOutput(BaseModel):
    """The answer, how it was reached, and the perceived scene it was read from (if any)."""

    answer: str | None = None
    answered_by: Literal["scene", "direct"] | None = Field(
        default=None,
        description="'scene': read from `perception` by the world's question rules; "
        "'direct': the model's own answer to the question.",
    )
    perception: Perception | None = None


class CritiqueInput(BaseModel):
    """Judge an image against a text-to-image prompt."""

    image: ImageRef
    prompt: str


class CritiqueState(CritiqueInput):
    """State of the `critique` workflow."""

    perception: Perception | None = None
    verdict: Literal["accept", "reject"] | None = None
    reasons: list[str] = Field(default_factory=list)
    judged_by: Literal["scene", "model"] | None = None
    model_text: str = ""
    dropped_reasons: list[str] = Field(default_factory=list)


class CritiqueOutput(BaseModel):
    """The verdict, its reasons, how it was reached, and the perceived scene (if any)."""

    verdict: Literal["accept", "reject"] | None = None
    reasons: list[str] = Field(
        default_factory=list, description="Why not, in the critique vocabulary (`missing blue square`)."
    )
    judged_by: Literal["scene", "model"] | None = Field(
        default=None,
        description="'scene': the prompt checked against `perception` by the world's prompt "
        "rules; 'model': the model's own critique answer (`model_text`).",
    )
    perception: Perception | None = None
    model_text: str = Field(default="", description="The caption read, or the critique answer.")
    dropped_reasons: list[str] = Field(
        default_factory=list,
        description="The model's reasons that cannot be about the prompt, left out of `reasons`.",
    )


STATE_VALUE_TYPES: tuple[type, ...] = (
    Attempt, Box, Critique, EditPlan, EditStep, GroundingCheck, LayoutItem, Perception, Plan,
    ImageRef,
)  # fmt: skip
"""Types a checkpoint may hold as values (the msgpack allow-list, see `persistence.py`)."""
