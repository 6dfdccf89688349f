"""The `Engine` protocol: everything the workflows ask of the model, and nothing more.

Graph nodes talk to the model only through this protocol, so `lavida_agent.graphs` never
imports torch. An engine is per-request and synchronous; images are numpy `uint8` arrays of
shape `(H, W, 3)`; layouts are lists of `{"label": str, "box": [x0, y0, x1, y1]}` in canvas
pixels (64 x 64 for the embedded model; x right, y down, x1/y1 exclusive).

Contents:
- `PlanItem`, `StepEvent`, `CritiqueResult`, `EditPlanResult`: plain, torch-free result types.
- `Engine`: the protocol (`tests/fakes.FakeEngine` satisfies it structurally;
  `BatchingEngine` in `runtime.py` implements it over a batched backend, e.g. the real
  model's `PipelineBackend` in `pipeline_backend.py`).
- `load_engine()`: the one lazy reference to `lavida_agent.model`, used when a graph runs
  without an engine in its context (e.g. under `langgraph dev`).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

__all__ = (
    "AGENT_VIEWS",
    "BoxList",
    "CritiqueResult",
    "EditPlanResult",
    "Engine",
    "EngineUnavailableError",
    "PlanItem",
    "StepCallback",
    "StepEvent",
    "StrayMark",
    "Surprise",
    "load_engine",
)

BoxList = list[float]
"""A box as `[x0, y0, x1, y1]` in canvas pixels."""

AGENT_VIEWS = 1
"""The t2i and edit workflows ground in the image alone (`Engine.ground(views=AGENT_VIEWS)`,
the engine's default branches): the real engine's default twelve views scored the same
there (benchmark seeds 0-1, `--suites agent --agent-rounds 1`: t2i 0.946 / 0.964 either way,
edits 0.696 / 0.696 against 0.696 / 0.679) in 2.4x the time. The `ground` workflow and its
perception use the default (weights README, "Stop 22")."""


class PlanItem(TypedDict):
    """One object of a layout: what to draw (`label`) and where (`box`)."""

    label: str
    box: BoxList


@dataclass(frozen=True)
class StepEvent:
    """One sampler step, reported through an `on_step` callback.

    Attributes:
        step: 1-based index of the step just finished.
        total: number of steps of this request.
        preview: the current x0 prediction as `(H, W, 3)` `uint8`, or `None` when the engine
            did not decode one for this step (decoding costs a VQ decode).
    """

    step: int
    total: int
    preview: np.ndarray | None = None


StepCallback = Callable[[StepEvent], None]


class StrayMark(TypedDict):
    """Something an image shows away from every planned box that the prompt and plan argue
    against (`Engine.surprise`): where (`box`) and how strongly (`score`, lower is more
    surely stray; the real engine's is in nats)."""

    box: BoxList
    score: float


@dataclass(frozen=True)
class Surprise:
    """What `Engine.surprise` reads in an image, token by token.

    Attributes:
        worst: the lowest score of any image token: how strongly the prompt and plan argue
            against the least explained part of the image (the real engine's is in nats;
            higher is cleaner; ranks the attempts at one prompt and plan).
        strays: marks away from every planned box that the prompt and plan argue against,
            most sure first (empty for a clean background).
    """

    worst: float
    strays: list[StrayMark] = field(default_factory=list)

    @classmethod
    def read(cls, scores: np.ndarray, marks: Sequence[tuple[Sequence[float], float]]) -> Surprise:
        """From a pipeline's per-token `scores` of one image and its `(box, score)` marks
        (`LavidaPipeline.surprise` and `stray_marks`), as plain types."""
        return cls(worst=float(np.min(scores)),
                   strays=[StrayMark(box=[float(v) for v in box], score=float(v)) for box, v in marks])  # fmt: skip


@dataclass(frozen=True)
class CritiqueResult:
    """The model's verdict on its own image.

    Attributes:
        ok: `True` when the model judges that the image matches the prompt.
        reasons: short, user-readable reasons for a rejection (empty when `ok`).
        text: the model's raw critique text, kept for traces.
    """

    ok: bool
    reasons: list[str] = field(default_factory=list)
    text: str = ""


@dataclass(frozen=True)
class EditPlanResult:
    """What the model plans for an edit instruction.

    Attributes:
        targets: referring expressions of the objects the instruction is about, in the source
            image (e.g. `["the red circle"]`); an `add` instruction may have none.
        target_boxes: the regions to re-mask and redraw, one box per region.
        layout: the target layout inside those regions after the edit (label and box of each
            object that should be there), used to verify the edit by grounding.
        keep: objects of the source image that the edit must leave untouched (label and
            their box in the source), used to verify that nothing else moved.
        caption: the model's caption of the source image, when planning read one (the edit
            workflow checks that the image holds what the instruction names).
    """

    targets: list[str] = field(default_factory=list)
    target_boxes: list[BoxList] = field(default_factory=list)
    layout: list[PlanItem] = field(default_factory=list)
    keep: list[PlanItem] = field(default_factory=list)
    caption: str | None = None


@runtime_checkable
class Engine(Protocol):
    """The model, as the workflows see it: one synchronous call per request.

    Every stochastic method takes an explicit `seed`, so an attempt recorded in graph state
    (seed, steps, plan) replays to the same image.
    """

    def plan_layout(self, prompt: str, *, seed: int, temperature: float = 0.0) -> list[PlanItem]:
        """Plan the objects of `prompt` as a layout (label + box per object).

        `temperature` 0 decodes greedily (then `seed` changes nothing); above 0 the planner
        samples, which is how the t2i workflow draws another plan after a failed check.
        """
        ...

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
        """Generate an `(H, W, 3)` `uint8` image, optionally conditioned on a plan and feedback."""
        ...

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
        """Re-mask only the image tokens inside `boxes` and denoise them again."""
        ...

    def critique(self, image: np.ndarray, prompt: str) -> CritiqueResult:
        """The model's own verdict on whether `image` matches `prompt`."""
        ...

    def plan_fit(self, image: np.ndarray, prompt: str, *, plan: list[PlanItem]) -> list[float]:
        """How well the prompt and plan explain what each planned box of `image` shows.

        One score per plan item (higher: a better fit; the real engine's is a
        log-likelihood ratio in nats, see `LavidaPipeline.region_fit`). Scores rank the
        attempts at one prompt and plan; they are not calibrated across prompts.
        Deterministic.
        """
        ...

    def surprise(self, image: np.ndarray, prompt: str, *, plan: list[PlanItem]) -> Surprise:
        """How strongly the prompt and plan argue against each part of `image`, read token
        by token: the worst token's score, and the stray marks away from every planned box
        (a faint blob, a smear, an object nobody asked for). The engine owns the threshold
        of a mark (the real engine's is `pipeline_lavida.STRAY_THRESHOLD`). Deterministic.
        """
        ...

    def noun_fit(self, image: np.ndarray, items: list[PlanItem], *, contrast: bool = False) -> list[float]:
        """How well each item's label, a noun or referring expression (`the blue circle`),
        explains what its box of `image` shows; higher is better, 0.0 for a label the
        engine cannot read. Ranks the boxes for one noun; not calibrated. Deterministic.

        `contrast=True`: how much better the label's noun explains the box than the best
        noun one word away (another shape, or another colour); positive when the box shows
        the named object and not a look-alike, so it is comparable across images (the edit
        workflow ranks and verifies its attempts by it).
        """
        ...

    def ground(
        self, image: np.ndarray, expressions: list[str], *, candidates: int | None = None,
        views: int | None = None,
    ) -> list[BoxList]:
        """One box per referring expression (a degenerate box when nothing is found).

        `candidates`: how many boxes the engine may read per expression before it keeps one
        (the real engine reranks them by fit); `views`: how many views of the image (mirrored,
        moved) it reads them in (1: the image alone). None is the engine's default for each
        (the real engine's: twelve views, or with `candidates` alone the image alone), and
        `candidates=1` alone the greedy read (fastest). An engine that reads one box anyway
        ignores both.
        """
        ...

    def answer(self, image: np.ndarray, question: str) -> str:
        """Answer a question about `image`."""
        ...

    def plan_edit(self, image: np.ndarray, instruction: str) -> EditPlanResult:
        """Decide which objects an edit refers to, where to redraw and the target layout."""
        ...

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
        """Apply `instruction` to `image`, redrawing the planned regions."""
        ...


class EngineUnavailableError(RuntimeError):
    """No engine was given in the context and the model package could not provide one."""


def as_plan_items(items: Sequence[PlanItem] | None) -> list[PlanItem] | None:
    """Normalise engine layout output to `[{"label": str, "box": [float x 4]}]` (plain types)."""
    if items is None:
        return None
    return [{"label": str(i["label"]), "box": [float(v) for v in i["box"]]} for i in items]


@functools.lru_cache(maxsize=4)
def load_engine(model_path: str | None = None) -> Engine:
    """Load the real engine, once per `model_path` (lazily: torch is imported here only).

    Builds `BatchingEngine(PipelineBackend(LavidaPipeline.from_pretrained(model_path)))`:
    one worker thread owns the pipeline and batches concurrent graph runs. A successful load
    is cached (per `model_path`); a failed one is not, so a later call retries.

    Args:
        model_path: a pipeline folder; `None` means the embedded default checkpoint.

    Returns:
        A `BatchingEngine` over the pipeline.

    Raises:
        EngineUnavailableError: the model package is missing or the weights failed to load
            (e.g. the embedded weights are not there yet).
    """
    hint = "Pass `context=Context(engine=...)` when invoking the graph."
    try:
        module = importlib.import_module("lavida_agent.model.pipeline_lavida")
        pipeline_cls = module.LavidaPipeline
    except (ImportError, AttributeError) as e:
        raise EngineUnavailableError(
            "no engine in the graph context and the model package cannot provide one "
            f"(import of lavida_agent.model.pipeline_lavida.LavidaPipeline failed: {e}). {hint}"
        ) from e
    where = model_path or "the embedded checkpoint"
    logger.info("loading engine from %s", where)
    try:
        pipeline = pipeline_cls.from_pretrained(model_path)
    except Exception as e:  # missing folder, missing/corrupt weights, config mismatch
        raise EngineUnavailableError(
            f"no engine in the graph context and the model could not be loaded from {where}: "
            f"{type(e).__name__}: {e}. {hint}"
        ) from e
    # Local imports: runtime.py imports this module.
    from lavida_agent.graphs.pipeline_backend import PipelineBackend
    from lavida_agent.graphs.runtime import BatchingEngine

    return BatchingEngine(PipelineBackend(pipeline))
