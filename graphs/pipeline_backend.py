"""`PipelineBackend`: the batched backend of `runtime.py` over a real `LavidaPipeline`.

    engine = BatchingEngine(PipelineBackend(LavidaPipeline.from_pretrained(path)))

Each backend method turns one batch of requests into **one** batched pipeline call (plus, for
`plan_edit`, one `understand` and one `ground` call), every row sampled from its own generator
seeded with `request.seed` (the pipeline builds one `torch.Generator` per seed), so a row's
result does not depend on what it was batched with. Rows with and without a plan go into the
same call: the pipeline packs rows left-padded, and a mixed batch gives exactly the images of
separate calls (tested), so splitting it would only cost forwards.

The pipeline is passed in and duck-typed: this module never imports torch (or
`lavida_agent.model`), so `lavida_agent.graphs` stays importable without them.

Conversions to the graph types (`engine.py`):

- plans: `(label, (x0, y0, x1, y1))` tuples <-> `PlanItem` dicts with float boxes; an empty
  plan is sent as "no plan" (it carries no layout);
- grounding: one `[x0, y0, x1, y1]` float box per expression, `[0, 0, 0, 0]` when the model's
  box is degenerate (`None`);
- critique: `CritiqueOutput` row -> `CritiqueResult(ok, reasons, text)`;
- step callbacks: each `StepInfo` becomes one `StepEvent` per row that has an `on_step`, with
  that row's preview (decoded every `preview_every` steps and at the last step).

`plan_edit` uses the model only (never the classical detector); see `PipelineBackend.plan_edit`.
Images must be `(S, S, 3)` `uint8` with `S = pipeline.config.image_size` (64 for the embedded
model); a row with another shape fails alone with a `ValueError` (letterbox images first,
`lavida_agent.tools.images.letterbox`), the rest of its batch runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lavida_agent.graphs.engine import (
    AGENT_VIEWS,
    BoxList,
    CritiqueResult,
    EditPlanResult,
    PlanItem,
    StepCallback,
    StepEvent,
    Surprise,
)
from lavida_agent.graphs.perceive import nearest_size_class, noun_fits
from lavida_agent.graphs.runtime import (
    AnswerRequest,
    CritiqueRequest,
    EditRequest,
    GenerateRequest,
    GroundRequest,
    NounFitRequest,
    PlanEditRequest,
    PlanFitRequest,
    PlanLayoutRequest,
    RegenerateRegionsRequest,
    SurpriseRequest,
)
from lavida_agent.tools.boxes import iou, round_half_up
from lavida_agent.tools.shapes_world import language as lang
from lavida_agent.tools.shapes_world.checkers import TOUCHED_TOLERANCE
from lavida_agent.tools.shapes_world.language import DESCRIBE, Caption, parse_caption
from lavida_agent.tools.shapes_world.render import core_box
from lavida_agent.tools.shapes_world.scene import SHAPES
from lavida_agent.tools.shapes_world.scene import (
    CANVAS,
    MARGIN,
    MIN_GAP,
    SIZES,
    RELATION_SLACK,
    region_box,
    region_of,
    size_class,
)

logger = logging.getLogger(__name__)

__all__ = ("Caption", "PipelineBackend", "parse_caption")

NOT_FOUND: BoxList = [0.0, 0.0, 0.0, 0.0]

IntBox = tuple[int, int, int, int]
ModelPlan = list[tuple[str, IntBox]]
"""A plan as the pipeline takes it: `(label, (x0, y0, x1, y1))` in integer pixels."""

# Sides (in 64-px canvas units) of boxes this module plans for objects it has not seen: the
# middle of each size class of SHAPES_WORLD.md (small 10-14, large 18-24).
_PLANNED_SIDE = {"small": 12, "large": 21}
# Two grounded boxes this close name one object (the benchmark's Acc@0.5 criterion).
SAME_OBJECT_IOU = 0.5


# ----------------------------------------------------------------------------------------
# Small conversions
# ----------------------------------------------------------------------------------------


def _to_plan_items(plan: Sequence[tuple[str, Sequence[int]]]) -> list[PlanItem]:
    return [{"label": str(label), "box": [float(v) for v in box]} for label, box in plan]


def _keep_cores(plan: EditPlanResult) -> list[tuple[float, float, float, float]]:
    """The `core_box` of every kept object whose label names its shape (`the red circle`)."""
    cores = []
    for item in plan.keep:
        shape = next((w for w in reversed(str(item["label"]).split()) if w in SHAPES), None)
        if shape is not None:
            cores.append(core_box(shape, item["box"]))
    return cores


def _int_box(box: Sequence[float], canvas: int) -> IntBox:
    """Round to integer pixels (halves up, as `tools.boxes.round_half_up`), clipped to the canvas."""
    x0, y0, x1, y1 = (min(canvas, max(0, round_half_up(float(v)))) for v in box)
    return (x0, y0, x1, y1)


def _cover_box(box: Sequence[float], canvas: int) -> IntBox:
    """The integer box covering `box` (floor the start, ceil the end), clipped."""
    x0, y0 = (min(canvas, max(0, math.floor(float(v)))) for v in box[:2])
    x1, y1 = (min(canvas, max(0, math.ceil(float(v)))) for v in box[2:])
    return (x0, y0, x1, y1)


def _to_model_plan(plan: Sequence[PlanItem] | None, canvas: int) -> ModelPlan | None:
    """Graph plan -> pipeline plan; an empty plan says nothing, so it is sent as None. A
    label given as a referring expression (`the small red circle`, a layout's form) loses
    its article: the model's plans say `small red circle`, and its plan slot is short."""
    if not plan:
        return None
    return [(str(i["label"]).strip().removeprefix("the ").strip(), _int_box(i["box"], canvas)) for i in plan]


def _box_list(box: Sequence[int] | None) -> BoxList:
    return list(NOT_FOUND) if box is None else [float(v) for v in box]


def _refexp(noun: lang.Noun) -> str:
    """The referring expression for a noun, in the forms grounding was trained on."""
    if noun.color is not None:
        return f"the {noun.color} {noun.shape}"
    if noun.size is not None:
        return f"the {noun.size} {noun.shape}"
    return f"the {noun.shape}"


def _side(box: Sequence[float]) -> float:
    return max(float(box[2]) - float(box[0]), float(box[3]) - float(box[1]))


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return ((float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2)


def _box_at(cx: float, cy: float, w: float, h: float, canvas: int) -> BoxList:
    """A `w x h` box centred at `(cx, cy)`, shifted to lie inside the canvas margin, on whole
    pixels with its sides rounded first (rounding each edge alone can make a square box one
    pixel wider than tall, a box no object of the world has)."""
    w, h = float(round(w)), float(round(h))
    m = MARGIN * canvas / CANVAS
    x0 = float(round(min(max(cx - w / 2, m), canvas - m - w)))
    y0 = float(round(min(max(cy - h / 2, m), canvas - m - h)))
    return [x0, y0, x0 + w, y0 + h]


def _world_side(side: float, scale: float) -> float:
    """`side` (canvas pixels) moved into the nearer size class's range of sides: a grounded
    box a pixel or two off can fall between the classes, where no object of the world is
    (and its plan label would have no size word)."""
    s = side / scale
    lo, hi = SIZES[nearest_size_class(s)]
    return min(max(s, lo), hi) * scale


# ----------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------


@dataclass
class _EditDraft:
    """One `plan_edit` row between its model calls."""

    spec: lang.EditSpec
    referred: str | None = None  # expression of the edited object (or the add anchor)
    caption_text: str | None = None
    caption: Caption | None = None
    keep_exprs: tuple[str, ...] = ()
    boxes: dict[str, BoxList | None] | None = None


class PipelineBackend:
    """The `BatchedBackend` of `runtime.py` over a `LavidaPipeline` (duck-typed).

    Args:
        pipeline: a `LavidaPipeline` (or anything with its batched methods and `config`).
        preview_every: decode a preview for `on_step` every k sampler steps (and at the last
            one); 0 never decodes. Previews cost one VQ decode of the batch, and only batches
            with at least one `on_step` pay it. The graphs then keep the previews on their own
            `Context.preview_every` cadence.
        plan_steps: text-decoding steps of `plan_layout` (None: the pipeline default).
        text_steps: text-decoding steps of answers, captions and critiques (None: default).
        use_edit_plans: condition `edit` on the edit plan (see `edit`); False edits from the
            instruction alone.
        local_edits: redraw only the edit plan's `target_boxes` (`pipeline.edit(regions=)`),
            keeping the source's codes and pixels everywhere else; False redraws the whole
            image. Rows without a plan or without target boxes are redrawn whole.
        interrupt: passed to every pipeline call; returning True stops the running batch
            (every row of it fails with the pipeline's `PipelineInterrupted`).
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        preview_every: int = 1,
        plan_steps: int | None = None,
        text_steps: int | None = None,
        use_edit_plans: bool = True,
        local_edits: bool = True,
        interrupt: Callable[[], bool] | None = None,
    ) -> None:
        if preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {preview_every}")
        self.pipeline = pipeline
        self.preview_every = preview_every
        self.plan_steps = plan_steps
        self.text_steps = text_steps
        self.use_edit_plans = use_edit_plans
        self.local_edits = local_edits
        self.interrupt = interrupt

    @property
    def canvas(self) -> int:
        """Side of the model's square images in pixels."""
        return int(self.pipeline.config.image_size)

    # -- shared helpers -------------------------------------------------------------------

    def _image_error(self, image: Any) -> ValueError | None:
        arr = np.asarray(image)
        if arr.shape == (self.canvas, self.canvas, 3) and arr.dtype == np.uint8:
            return None
        return ValueError(
            f"expected a uint8 ({self.canvas}, {self.canvas}, 3) image, got {arr.dtype} "
            f"{arr.shape}; letterbox other images first (lavida_agent.tools.images.letterbox)"
        )

    def _valid_rows(self, images: Sequence[Any]) -> tuple[list[Any], list[int]]:
        """Per-row results pre-filled with image errors, and the indices of good rows."""
        results: list[Any] = [None] * len(images)
        good = []
        for i, image in enumerate(images):
            err = self._image_error(image)
            if err is None:
                good.append(i)
            else:
                results[i] = err
        return results, good

    def _rows_with(self, requests: Sequence[Any], items: Callable[[Any], Sequence[Any]]) -> tuple[list[Any], list[int]]:
        """`_valid_rows`, and a row whose `items(request)` is empty answered `[]` without a
        model call."""
        results, good = self._valid_rows([r.image for r in requests])
        for i in list(good):
            if not items(requests[i]):
                results[i] = []
                good.remove(i)
        return results, good

    def _callback(
        self, sinks: Sequence[StepCallback | None]
    ) -> tuple[Callable[[Any], None] | None, int]:
        """The pipeline `callback` fanning `StepInfo` out to each row's `on_step`."""
        if not any(s is not None for s in sinks):
            return None, 0  # nobody listens: no callback, no preview decoding

        def callback(info: Any) -> None:
            previews = info.previews
            rows = range(len(sinks)) if getattr(info, "rows", None) is None else info.rows
            for j, i in enumerate(rows):  # the rows this step advances, in the order of previews
                sink = sinks[i]
                if sink is None:
                    continue
                preview = None if previews is None else np.asarray(previews[j], dtype=np.uint8)
                try:
                    sink(StepEvent(step=int(info.step), total=int(info.total), preview=preview))
                except Exception:  # one listener must not fail the batch
                    logger.exception("on_step callback of row %d failed", i)

        return callback, self.preview_every

    @staticmethod
    def _images(out: Any) -> list[np.ndarray]:
        return [np.ascontiguousarray(im, dtype=np.uint8) for im in out.images]

    # -- BatchedBackend -------------------------------------------------------------------

    def plan_layout(self, requests: Sequence[PlanLayoutRequest]) -> list[Any]:
        """One `pipeline.plan` call (the batch shares one temperature); `PlanItem` dicts."""
        if not requests:
            return []
        out = self.pipeline.plan([r.prompt for r in requests], seed=[r.seed for r in requests],
                                 temperature=requests[0].temperature, num_steps=self.plan_steps,
                                 interrupt=self.interrupt)  # fmt: skip
        return [_to_plan_items(p) for p in out.plans]

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Any]:
        """One `pipeline.generate` call for the batch (all rows share `num_steps`).

        `feedback` is **not** a model input: the embedded model was never trained with
        critique feedback in its sequence, so it is ignored here (the graph still records it
        in the attempt). A refine round differs from the first one through its new seed, or
        through region re-masking (`regenerate_regions`).
        """
        if not requests:
            return []
        canvas = self.canvas
        callback, preview_every = self._callback([r.on_step for r in requests])
        out = self.pipeline.generate(
            [r.prompt for r in requests],
            plans=[_to_model_plan(r.plan, canvas) for r in requests],
            seed=[r.seed for r in requests], num_steps=requests[0].num_steps,
            callback=callback, preview_every=preview_every, interrupt=self.interrupt,
        )  # fmt: skip
        return list(self._images(out))

    def regenerate_regions(self, requests: Sequence[RegenerateRegionsRequest]) -> list[Any]:
        """One `pipeline.regenerate_regions` call: re-mask each row's boxes, denoise them.

        Boxes are widened to whole pixels (floor/ceil) so the re-masked codes cover them.
        """
        results, good = self._valid_rows([r.image for r in requests])
        if not good:
            return results
        rows = [requests[i] for i in good]
        canvas = self.canvas
        callback, preview_every = self._callback([r.on_step for r in rows])
        out = self.pipeline.regenerate_regions(
            [np.asarray(r.image) for r in rows], [r.prompt for r in rows],
            [[_cover_box(b, canvas) for b in r.boxes] for r in rows],
            plans=[_to_model_plan(r.plan, canvas) for r in rows],
            seed=[r.seed for r in rows], num_steps=rows[0].num_steps,
            callback=callback, preview_every=preview_every, interrupt=self.interrupt,
        )  # fmt: skip
        for i, image in zip(good, self._images(out), strict=True):
            results[i] = image
        return results

    def critique(self, requests: Sequence[CritiqueRequest]) -> list[Any]:
        """One `pipeline.critique` call; each row as a `CritiqueResult`."""
        results, good = self._valid_rows([r.image for r in requests])
        if not good:
            return results
        rows = [requests[i] for i in good]
        out = self.pipeline.critique([np.asarray(r.image) for r in rows],
                                     [r.prompt for r in rows], num_steps=self.text_steps,
                                     seed=[0] * len(rows), interrupt=self.interrupt)  # fmt: skip
        for k, i in enumerate(good):
            reasons = [str(s) for s in out.reasons[k]]
            results[i] = CritiqueResult(ok=bool(out.ok[k]), reasons=reasons, text=str(out.texts[k]))
        return results

    def plan_fit(self, requests: Sequence[PlanFitRequest]) -> list[Any]:
        """One `pipeline.region_fit` call: a score per planned box of every row."""
        results, good = self._rows_with(requests, lambda r: r.plan)
        if good:
            rows = [requests[i] for i in good]
            plans = [_to_model_plan(r.plan, self.canvas) for r in rows]
            out = self.pipeline.region_fit([np.asarray(r.image) for r in rows], [r.prompt for r in rows],
                                           [[box for _, box in p or []] for p in plans], plans=plans)  # fmt: skip
            for i, scores in zip(good, out, strict=True):
                results[i] = [float(s) for s in scores]
        return results

    def surprise(self, requests: Sequence[SurpriseRequest]) -> list[Any]:
        """One `pipeline.surprise` call; the worst token and the stray marks of each row (a
        row without a plan has none)."""
        results, good = self._valid_rows([r.image for r in requests])
        if good:
            rows = [requests[i] for i in good]
            images, prompts = [np.asarray(r.image) for r in rows], [r.prompt for r in rows]
            plans = [_to_model_plan(r.plan, self.canvas) for r in rows]
            scores = self.pipeline.surprise(images, prompts, plans)
            marks = self.pipeline.stray_marks(images, prompts, plans, scores=scores)
            for i, row, found in zip(good, scores, marks, strict=True):
                results[i] = Surprise.read(row, found)
        return results

    def noun_fit(self, requests: Sequence[NounFitRequest]) -> list[Any]:
        """One `pipeline.noun_fit` call for every item whose label is a ShapesWorld
        referring expression (its head noun is scored); other items score 0.0."""
        results, good = self._rows_with(requests, lambda r: r.items)
        asks: list[tuple[int, int, tuple[str, str | None, str | None], IntBox]] = []
        for i in good:
            results[i] = [0.0] * len(requests[i].items)
            for k, item in enumerate(requests[i].items):
                try:
                    n = lang.parse_refexp(str(item["label"])).noun
                except lang.GrammarError:
                    continue
                asks.append((i, k, (n.shape, n.color, n.size), _int_box(item["box"], self.canvas)))
        if asks:
            out = self.pipeline.noun_fit([np.asarray(requests[i].image) for i, *_ in asks],
                                         [noun for _, _, noun, _ in asks], [[box] for *_, box in asks],
                                         contrast=requests[0].contrast)  # one batch key: one mode  # fmt: skip
            for (i, k, _, _), (score,) in zip(asks, out, strict=True):
                results[i][k] = float(score)
        return results

    def ground(self, requests: Sequence[GroundRequest]) -> list[Any]:
        """One `pipeline.ground` call (one model forward) for every row with expressions."""
        results, good = self._rows_with(requests, lambda r: r.expressions)
        if good:
            found = self._ground([requests[i].image for i in good],
                                 [list(requests[i].expressions) for i in good],
                                 candidates=requests[0].candidates,
                                 views=requests[0].views)  # one batch key: one read
            for i, boxes in zip(good, found, strict=True):
                results[i] = [_box_list(b) for b in boxes]
        return results

    def _ground(
        self, images: Sequence[Any], expressions: Sequence[list[str]], candidates: int | None = None,
        views: int | None = None, sizes: bool | None = None,
    ) -> list[list[Any]]:
        out = self.pipeline.ground([np.asarray(im) for im in images], list(expressions),
                                   candidates=candidates, views=views, sizes=sizes)  # fmt: skip
        return [list(row) for row in out.boxes]

    def answer(self, requests: Sequence[AnswerRequest]) -> list[Any]:
        """One `pipeline.understand` call; the answer text per row."""
        results, good = self._valid_rows([r.image for r in requests])
        if good:
            texts = self._understand([requests[i].image for i in good],
                                     [requests[i].question for i in good])  # fmt: skip
            for i, text in zip(good, texts, strict=True):
                results[i] = text
        return results

    def _understand(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        out = self.pipeline.understand([np.asarray(im) for im in images], list(questions),
                                       num_steps=self.text_steps, seed=[0] * len(images),
                                       interrupt=self.interrupt)  # fmt: skip
        return [str(t) for t in out.texts]

    def edit(self, requests: Sequence[EditRequest]) -> list[Any]:
        """One `pipeline.edit` call, each row conditioned on its edit plan.

        The plan is given to the model in the format its edit plans were trained on
        (`model/training.py:touched_plan`): every object of `plan.layout` with a
        `{size} {color} {shape}` label at its planned box, then `("removed", box)` at the
        source box of the object the instruction names (recolor, remove, move, resize,
        replace), which by this module's convention is `plan.target_boxes[0]`. Add and
        background edits remove nothing; an empty plan (or an instruction outside the
        ShapesWorld grammar with no layout) is sent as no plan. With `local_edits` only the
        plan's `target_boxes` are redrawn, less the cells wholly inside the `core_box` of an
        object of `plan.keep` (so a background edit, whose region is the canvas, redraws the
        background around the objects instead of the objects too).
        """
        results, good = self._valid_rows([r.image for r in requests])
        if not good:
            return results
        rows = [requests[i] for i in good]
        callback, preview_every = self._callback([r.on_step for r in rows])
        plans = [self._model_edit_plan(r.instruction, r.plan) if self.use_edit_plans else None
                 for r in rows]  # fmt: skip
        kw = {}
        if self.local_edits:
            regions = [[_int_box(b, self.canvas) for b in r.plan.target_boxes]
                       if r.plan is not None and r.plan.target_boxes else None for r in rows]  # fmt: skip
            if any(r is not None for r in regions):
                kw["regions"] = regions
                # the objects to keep keep their cores: a background edit redraws around them
                kw["keep"] = [_keep_cores(r.plan) if reg is not None else None for r, reg in zip(rows, regions)]
        out = self.pipeline.edit(
            [np.asarray(r.image) for r in rows], [r.instruction for r in rows], plans=plans,
            seed=[r.seed for r in rows], num_steps=rows[0].num_steps, callback=callback,
            preview_every=preview_every, interrupt=self.interrupt, **kw,
        )  # fmt: skip
        for i, image in zip(good, self._images(out), strict=True):
            results[i] = image
        return results

    def _model_edit_plan(self, instruction: str, plan: EditPlanResult | None) -> ModelPlan | None:
        if plan is None:
            return None
        canvas = self.canvas
        layout = sorted(plan.layout, key=lambda i: _centre(i["box"]))  # left to right
        items = [(self._plan_label(i["label"], i["box"]), _int_box(i["box"], canvas))
                 for i in layout]  # fmt: skip
        try:
            spec: lang.EditSpec | None = lang.parse_edit(instruction)
        except lang.GrammarError:
            spec = None
        if spec is not None and spec.target is not None and plan.target_boxes:
            items.append(("removed", _int_box(plan.target_boxes[0], canvas)))
        return items[:4] or None  # training plans hold at most 4 items

    def _plan_label(self, label: str, box: Sequence[float]) -> str:
        """`the red circle` at a 12-px box -> `small red circle` (the plan label format)."""
        try:
            ref = lang.parse_refexp(label)
        except lang.GrammarError:
            return label.removeprefix("the ").strip()
        size = ref.size or size_class(int(round(_side(box) * CANVAS / self.canvas)))
        return " ".join(w for w in (size, ref.color, ref.shape) if w)

    # -- plan_edit ------------------------------------------------------------------------

    def plan_edit(self, requests: Sequence[PlanEditRequest]) -> list[Any]:
        """Plan each edit with the model alone: one caption call and one grounding call.

        Step 1: parse the instruction (`language.parse_edit`, pure text) for the edit's
        category and the object it names (the add anchor for `add ... left of the X`).
        Step 2: ask the model `describe the image.` (`understand`, one batched call) and
        parse its caption: the objects the model sees.
        Step 3: ground, in one batched call, the named object and every *other* captioned
        object that a `the {color} {shape}` (else `the {size} {shape}`) expression names
        uniquely, each unsized expression in its sized forms too (`pipeline.ground(sizes=True)`:
        the model's read of `the red square` leans to a large look-alike beside a small red
        square). Objects matching the named noun are never kept (the edit may touch them).
        Step 4: derive, in canvas pixels:

        - `targets`: the named object's expression (the anchor's for a relative add);
        - `target_boxes` (regions to redraw; the first is the named object's source box):
          its grounded box (recolor, remove, replace), plus the resized box (resize), plus
          the new box (move); the new box (add); the whole canvas (background);
        - `layout`: the object expected after the edit, labelled with a referring expression
          so the graph can verify it by grounding: same box (recolor, replace), a side of
          the class asked for with the centre kept within 2 px (resize, `_resized_box`),
          same size in the named cell (move), a size-class box in the named cell or on the
          named side of the anchor (add); empty for remove and background. A new box (move,
          add) is the allowed one nearest the cell's centre (or just beside the anchor)
          that keeps twice the world's gap from every object the plan knows of (the kept
          ones and the anchor), else the clearest (`_place`): drawn on top of another
          object, it merges with it. Every box of `layout` is a whole-pixel square, and the
          edited object's side is one the world has (a grounded side between the size
          classes goes to the nearer one): the boxes the model's plans were trained on;
        - `keep`: the other captioned objects with their grounded boxes, minus any whose
          expression would name an object of `layout` after the edit (ambiguous then).

        Honest limits: everything rests on the model's caption and grounding; objects the
        caption misses are not kept (nor avoided), a degenerate grounded box drops a keep
        item, so does one grounded on the edited object's box (IoU >= `SAME_OBJECT_IOU`: a
        second name for it), and when the named object is not grounded the whole canvas
        becomes the region and `layout` is left empty. Planned boxes are guesses (the spec
        allows anywhere in a cell), so the graph's IoU check on them is approximate. An
        instruction outside the ShapesWorld grammar gets an empty plan (the model edits
        from the instruction alone and only its own verdict checks the result).
        """
        results, good = self._valid_rows([r.image for r in requests])
        # Step 1: the instruction's grammar; rows outside it get an empty plan.
        drafts: dict[int, _EditDraft] = {}
        for i in good:
            try:
                spec = lang.parse_edit(requests[i].instruction)
            except lang.GrammarError as e:
                logger.warning("plan_edit: %s; planning nothing for this instruction", e)
                results[i] = EditPlanResult()
                continue
            named = spec.anchor if spec.category == "add" else spec.target
            drafts[i] = _EditDraft(spec, referred=_refexp(named) if named is not None else None)
        if not drafts:
            return results
        rows = sorted(drafts)
        # Step 2: one caption call for every row.
        texts = self._understand([requests[i].image for i in rows], [DESCRIBE] * len(rows))
        for i, text in zip(rows, texts, strict=True):
            d = drafts[i]
            d.caption_text, d.caption = text, parse_caption(text)
            d.keep_exprs = self._keep_expressions(d.caption, d.spec)
        # Step 3: one grounding call for the named objects and the keep candidates.
        exprs = {i: list(dict.fromkeys([*([drafts[i].referred] if drafts[i].referred else []),
                                        *drafts[i].keep_exprs]))
                 for i in rows}  # fmt: skip
        to_ground = [i for i in rows if exprs[i]]
        found = (self._ground([requests[i].image for i in to_ground], [exprs[i] for i in to_ground],
                              views=AGENT_VIEWS, sizes=True)
                 if to_ground else [])  # e.g. a background edit on an image the caption finds empty  # fmt: skip
        for i, boxes in zip(to_ground, found, strict=True):
            drafts[i].boxes = {e: (None if b is None else [float(v) for v in b])
                               for e, b in zip(exprs[i], boxes, strict=True)}  # fmt: skip
        # Step 4: regions, layout and keep list per row.
        for i in rows:
            results[i] = self._edit_plan(drafts[i])
        return results

    def _keep_expressions(self, caption: Caption, spec: lang.EditSpec) -> tuple[str, ...]:
        """Unique expressions for the captioned objects the edit does not name."""
        objs = [o for o in caption.objects if spec.target is None or not noun_fits(o, spec.target)]
        out = []
        for o in objs:
            if o.color is not None and sum(p.color == o.color and p.shape == o.shape
                                           for p in caption.objects) == 1:  # fmt: skip
                out.append(f"the {o.color} {o.shape}")
            elif o.size is not None and sum(p.size == o.size and p.shape == o.shape
                                            for p in caption.objects) == 1:  # fmt: skip
                out.append(f"the {o.size} {o.shape}")
            else:
                logger.debug("plan_edit: no unique expression for captioned %r", o.text)
        return tuple(out)

    def _edit_plan(self, d: _EditDraft) -> EditPlanResult:
        canvas, scale = self.canvas, self.canvas / CANVAS
        spec, boxes = d.spec, d.boxes or {}
        whole: BoxList = [0.0, 0.0, float(canvas), float(canvas)]
        referred_box = boxes.get(d.referred) if d.referred else None
        # The named object, completed from the caption when the instruction omits words.
        named = spec.anchor if spec.category == "add" else spec.target
        seen = _resolve_noun(d.caption, named) if named is not None else None
        targets = [d.referred] if d.referred else []
        layout: list[PlanItem] = []
        regions: list[BoxList]

        def item(noun: lang.Noun, box: BoxList) -> PlanItem:
            return {"label": _refexp(noun), "box": box}

        # A kept box on the box of the object the edit changes grounds that object again
        # under another name (objects never overlap): keeping it would spare the very cells
        # the edit must redraw.
        edited = referred_box if spec.category != "add" and _proper(referred_box) else None
        kept = {e: b for e in d.keep_exprs if _proper(b := boxes.get(e))
                and (edited is None or iou(b, edited) < SAME_OBJECT_IOU)}  # fmt: skip
        # Where a new or moved object goes: clear of every object the plan knows of.
        others = list(kept.values())
        if spec.category == "background":
            regions = [whole]
        elif spec.category == "add":
            assert spec.new is not None  # EditSpec checks it
            side = _PLANNED_SIDE[spec.new.size or "small"] * scale
            if spec.region is not None:
                new_box = _place(side, side, _in_cell(spec.region, canvas), others, canvas)
                regions, layout = [new_box], [item(spec.new, new_box)]
            elif referred_box is not None and spec.relation is not None:
                anchor = referred_box
                new_box = _place(side, side, _beside(anchor, spec.relation, side, canvas),
                                 [*others, anchor], canvas)  # fmt: skip
                regions, layout = [new_box], [item(spec.new, new_box)]
            else:
                logger.warning("plan_edit: anchor %r not grounded; region = whole canvas",
                               d.referred)  # fmt: skip
                regions = [whole]
        elif referred_box is None:
            logger.warning("plan_edit: %r not grounded; region = whole canvas", d.referred)
            regions = [whole]
        else:
            assert seen is not None and spec.target is not None
            # every object of the world has a square box: a grounded box that is not one
            # missed part of the object, and a region it gives would leave that part behind
            grounded = _box_at(*_centre(referred_box), _side(referred_box), _side(referred_box), canvas)
            # ... and its side is one the world's objects have; the region covers both boxes
            side = _world_side(_side(referred_box), scale)
            src = _box_at(*_centre(referred_box), side, side, canvas)
            w, h = src[2] - src[0], src[3] - src[1]
            regions = [_union(grounded, src)]
            if spec.category == "recolor":
                layout = [item(lang.Noun(seen.shape, spec.color, seen.size), src)]
            elif spec.category == "replace":
                assert spec.shape is not None
                layout = [item(lang.Noun(spec.shape, seen.color, seen.size), src)]
            elif spec.category == "resize":
                new_box = _resized_box(src, spec.direction or "larger", others, canvas)
                regions.append(new_box)
                layout = [item(lang.Noun(seen.shape, seen.color), new_box)]
            elif spec.category == "move":
                assert spec.region is not None
                new_box = _place(w, h, _in_cell(spec.region, canvas), others, canvas)
                regions.append(new_box)
                layout = [item(seen, new_box)]
            # remove: nothing should be there afterwards
        after = {i["label"] for i in layout}
        keep: list[PlanItem] = []
        for e in d.keep_exprs:
            if e in after:
                continue  # after the edit this expression would name the edited object too
            if e not in kept:
                logger.debug("plan_edit: keep candidate %r not grounded apart from the edited "
                             "object; not kept", e)  # fmt: skip
                continue
            keep.append({"label": e, "box": kept[e]})
        return EditPlanResult(targets=targets, target_boxes=regions, layout=layout, keep=keep,
                              caption=d.caption_text)  # fmt: skip


def _resolve_noun(caption: Caption | None, named: lang.Noun) -> lang.Noun:
    """The named noun completed with the colour/size of the one captioned object it fits."""
    fits = [o for o in (caption.objects if caption else ()) if noun_fits(o, named)]
    if len(fits) == 1:
        o = fits[0]
        return lang.Noun(named.shape, named.color or o.color, named.size or o.size)
    return named


def _resized_side(side: float, direction: str) -> float:
    """`larger`: at least the large class (capped at 24); `smaller`: at most small (>= 10)."""
    if direction == "larger":
        return float(min(SIZES["large"][1], max(side + 2, _PLANNED_SIDE["large"])))
    return float(max(SIZES["small"][0], min(side - 2, _PLANNED_SIDE["small"])))


def _resized_box(src: BoxList, direction: str, others: Sequence[Sequence[float]], canvas: int) -> BoxList:
    """The box of a resized object: the first side, nearest `_resized_side`'s first, of the
    class the world's `larger` / `smaller` asks for (a bigger side, from small the large
    class), whose box can keep its centre within half the world's 4-px tolerance, inside the
    canvas margin, and twice the world's gap from every object in `others`. With none, the
    box that moves the centre least, within the tolerance and clear first. (A large object
    near the edge grown in place moved its centre by more than the tolerance; one grown
    beside another object touched it.)"""
    scale = canvas / CANVAS
    side, (cx, cy) = _side(src) / scale, _centre(src)
    lo, hi = SIZES["large" if direction == "larger" else "small"]
    first = _resized_side(side, direction)
    sides = [s for s in range(lo, hi + 1) if (s > side if direction == "larger" else s < side)]
    tol, gap = TOUCHED_TOLERANCE / 2 * scale, 2 * MIN_GAP * scale
    near: Placement = ((cx, cy), lambda x, y: math.dist((x, y), (cx, cy)) <= tol)
    fallback = []
    for rank, s in enumerate(sorted(sides, key=lambda s: (abs(s - first), -s))):
        box = _place(s * scale, s * scale, near, others, canvas)  # at the old centre if none is near
        shift, clear = math.dist(_centre(box), (cx, cy)), _clearance(box, others) >= gap
        if shift <= tol and clear:
            return box
        fallback.append((shift > 2 * tol, not clear, shift, rank, box))
    return min(fallback)[-1] if fallback else _box_at(cx, cy, first * scale, first * scale, canvas)


Placement = tuple[tuple[float, float], Callable[[float, float], bool]]
"""Where a planned object may go: its preferred centre, and which centres are allowed."""


def _union(a: BoxList, b: BoxList) -> BoxList:
    """The smallest box holding both."""
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


def _proper(box: Sequence[float] | None) -> bool:
    """A box with area (grounding marks an object it did not find with a degenerate box)."""
    return box is not None and box[2] > box[0] and box[3] > box[1]


def _in_cell(region: str, canvas: int) -> Placement:
    """Centres in a named 3 x 3 cell (as the world reads a position), its centre preferred."""
    return _centre(region_box(region, canvas)), lambda cx, cy: region_of(cx, cy, canvas) == region


def _beside(anchor: BoxList, relation: str, side: float, canvas: int) -> Placement:
    """Centres for which `relation` holds against `anchor` (SHAPES_WORLD.md's centre rule,
    with twice its slack), the centre of a `side` box just beside the anchor preferred."""
    gap, slack = 2 * MIN_GAP * canvas / CANVAS, 2 * RELATION_SLACK * canvas / CANVAS
    (acx, acy), (ax0, ay0, ax1, ay1) = _centre(anchor), anchor
    preferred, ok = {
        "left of": ((ax0 - gap - side / 2, acy), lambda cx, cy: cx + slack < acx),
        "right of": ((ax1 + gap + side / 2, acy), lambda cx, cy: cx > acx + slack),
        "above": ((acx, ay0 - gap - side / 2), lambda cx, cy: cy + slack < acy),
        "below": ((acx, ay1 + gap + side / 2), lambda cx, cy: cy > acy + slack),
    }[relation]
    return preferred, ok


def _clearance(box: Sequence[float], others: Sequence[Sequence[float]]) -> float:
    """Pixels between `box` and the nearest of `others` (negative: they overlap)."""
    return min((max(o[0] - box[2], box[0] - o[2], o[1] - box[3], box[1] - o[3]) for o in others),
               default=math.inf)  # fmt: skip


def _place(
    w: float, h: float, where: Placement, others: Sequence[Sequence[float]], canvas: int
) -> BoxList:
    """A `w x h` box for a new (or moved) object: the one nearest the preferred centre that
    keeps twice the world's gap from every box in `others`, else the clearest allowed one.

    Candidates sit on whole pixels inside the canvas margin, with their centre allowed by
    `where`; with none allowed (an anchor at the canvas edge), the box at the preferred
    centre, shifted inside the margin.
    """
    (px, py), ok = where
    m, gap = MARGIN * canvas / CANVAS, 2 * MIN_GAP * canvas / CANVAS
    xs = range(math.ceil(m), math.floor(canvas - m - w) + 1)
    ys = range(math.ceil(m), math.floor(canvas - m - h) + 1)
    boxes = [[float(x), float(y), x + w, y + h] for x in xs for y in ys if ok(x + w / 2, y + h / 2)]
    if not boxes:
        return _box_at(px, py, w, h, canvas)
    boxes.sort(key=lambda b: math.dist(_centre(b), (px, py)))  # stable: ties keep grid order
    clear = next((b for b in boxes if _clearance(b, others) >= gap), None)
    return clear or max(boxes, key=lambda b: _clearance(b, others))
