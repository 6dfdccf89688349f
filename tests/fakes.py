"""Scripted stand-ins for the model: `FakeEngine` (the `Engine` protocol, one request at a
time) and `FakeBatchedBackend` (the batched-backend protocol of `graphs/runtime.py`).

`FakeEngine` draws deterministic images: seeded noise in 0..127 as background plus one
filled rectangle per planned object, its colour derived from the label with every channel
in 128..255, so grounding by exact colour never confuses noise with an object. `ground`
really looks for that colour, so it works across processes and on stored images. Verdicts,
plans, boxes and edit plans can be scripted with `enqueue_*` (llm's MockModel style);
otherwise defaults apply. `calls` counts every call per method, and `exit_on` makes the
process die (`os._exit`) on a chosen call, to test crash recovery.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from lavida_agent.graphs.engine import (
    BoxList,
    CritiqueResult,
    EditPlanResult,
    PlanItem,
    StepCallback,
    StepEvent,
    StrayMark,
    Surprise,
)
from lavida_agent.graphs.runtime import (
    AnswerRequest,
    CritiqueRequest,
    EditRequest,
    GenerateRequest,
    GroundRequest,
    NounFitRequest,
    PlanEditRequest,
    PlanFitRequest,
    SurpriseRequest,
    PlanLayoutRequest,
    RegenerateRegionsRequest,
)
from lavida_agent.tools.boxes import iou as box_iou

CANVAS = 64
NOT_FOUND: BoxList = [0.0, 0.0, 0.0, 0.0]


def label_color(label: str) -> np.ndarray:
    """A colour unique to `label`, every channel in 128..255 (never in the noise)."""
    rng = np.random.default_rng(zlib.crc32(label.encode()))
    return rng.integers(128, 256, size=3, dtype=np.uint8)


def noise(shape: tuple[int, int], prompt: str, seed: int) -> np.ndarray:
    """Background noise, values 0..127, determined by (prompt, seed)."""
    rng = np.random.default_rng([zlib.crc32(prompt.encode()), seed & 0xFFFFFFFF])
    return rng.integers(0, 128, size=(*shape, 3), dtype=np.uint8)


def _clip(box: Sequence[float]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return max(0, x0), max(0, y0), min(CANVAS, x1), min(CANVAS, y1)


def default_edit_plan(instruction: str) -> EditPlanResult:
    """One region in the middle of the canvas holding one object named by the instruction,
    so an unscripted edit draws something its own grounding can verify."""
    box = [20.0, 20.0, 44.0, 44.0]
    return EditPlanResult(targets=[], target_boxes=[box], layout=[{"label": instruction, "box": box}])


def draw(image: np.ndarray, items: Sequence[PlanItem]) -> np.ndarray:
    """Fill each item's box with its label colour."""
    out = image.copy()
    for item in items:
        x0, y0, x1, y1 = _clip(item["box"])
        out[y0:y1, x0:x1] = label_color(item["label"])
    return out


def default_plan(prompt: str) -> list[PlanItem]:
    """One object per ' and '-separated phrase, laid out left to right."""
    labels = [p.strip() for p in prompt.split(" and ") if p.strip()] or ["object"]
    width = CANVAS // len(labels)
    return [{"label": lab, "box": [i * width + 2.0, 20.0, (i + 1) * width - 2.0, 44.0]}
            for i, lab in enumerate(labels)]  # fmt: skip


class FakeEngine:
    """A scripted, deterministic `Engine`.

    Args:
        step_delay_s: sleep per sampler step (simulates work; 0 by default).
        exit_on: `(method, n)`: call `os._exit(exit_code)` at the start of the n-th call
            (1-based) of `method`, as a crashed process would.
        drop_labels: labels that `generate` "forgets" to draw (so grounding blames them).
    """

    def __init__(
        self,
        *,
        step_delay_s: float = 0.0,
        exit_on: tuple[str, int] | None = None,
        exit_code: int = 17,
        drop_labels: Sequence[str] = (),
    ) -> None:
        self.step_delay_s = step_delay_s
        self.exit_on = exit_on
        self.exit_code = exit_code
        self.drop_labels = set(drop_labels)
        self.calls: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, dict[str, object]]] = []
        self._plans: collections.deque[list[PlanItem]] = collections.deque()
        self._critiques: collections.deque[CritiqueResult] = collections.deque()
        self._fits: collections.deque[list[float]] = collections.deque()
        self._surprises: collections.deque[Surprise] = collections.deque()
        self._grounds: collections.deque[list[BoxList]] = collections.deque()
        self._edit_plans: collections.deque[EditPlanResult] = collections.deque()
        self._answers: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    # -- scripting ------------------------------------------------------------------------

    def enqueue_plan(self, items: list[PlanItem]) -> None:
        """The next `plan_layout` returns `items`."""
        self._plans.append(items)

    def enqueue_fit(self, scores: list[float]) -> None:
        """The next `plan_fit` returns `scores` (one per plan item)."""
        self._fits.append(list(scores))

    def enqueue_surprise(self, worst: float = 0.0, strays: Sequence[StrayMark] = ()) -> None:
        """The next `surprise` returns this (default: worst 0.0, object colour off the plan
        as a stray)."""
        self._surprises.append(Surprise(worst=worst, strays=list(strays)))

    def enqueue_critique(self, ok: bool, reasons: Sequence[str] = (), text: str = "") -> None:
        """The next `critique` returns this verdict (default: accept)."""
        self._critiques.append(CritiqueResult(ok=ok, reasons=list(reasons), text=text))

    def enqueue_ground(self, boxes: list[BoxList]) -> None:
        """The next `ground` returns `boxes` (default: found by colour)."""
        self._grounds.append(boxes)

    def enqueue_edit_plan(self, plan: EditPlanResult) -> None:
        """The next `plan_edit` returns `plan`."""
        self._edit_plans.append(plan)

    def enqueue_answer(self, text: str) -> None:
        """The next `answer` returns `text`."""
        self._answers.append(text)

    def _record(self, method: str, **info: object) -> None:
        with self._lock:
            self.calls[method] += 1
            n = self.calls[method]
            self.log.append((method, info))
        if self.exit_on is not None and self.exit_on == (method, n):
            os._exit(self.exit_code)

    def _sample(self, num_steps: int, on_step: StepCallback | None, final: np.ndarray) -> None:
        for step in range(1, num_steps + 1):
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            if on_step is not None:
                on_step(StepEvent(step=step, total=num_steps, preview=final))

    # -- the Engine protocol --------------------------------------------------------------

    def plan_layout(self, prompt: str, *, seed: int, temperature: float = 0.0) -> list[PlanItem]:
        self._record("plan_layout", prompt=prompt, seed=seed, temperature=temperature)
        return self._plans.popleft() if self._plans else default_plan(prompt)

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
        self._record("generate", prompt=prompt, seed=seed, num_steps=num_steps,
                     feedback=list(feedback or []))  # fmt: skip
        items = [i for i in (plan or default_plan(prompt)) if i["label"] not in self.drop_labels]
        image = draw(noise((CANVAS, CANVAS), prompt, seed), items)
        self._sample(num_steps, on_step, image)
        return image

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
        self._record("regenerate_regions", prompt=prompt, seed=seed, boxes=boxes)
        fresh = draw(noise((CANVAS, CANVAS), prompt, seed), plan or default_plan(prompt))
        out = image.copy()
        for box in boxes:
            x0, y0, x1, y1 = _clip(box)
            out[y0:y1, x0:x1] = fresh[y0:y1, x0:x1]
        self._sample(num_steps, on_step, out)
        return out

    def critique(self, image: np.ndarray, prompt: str) -> CritiqueResult:
        self._record("critique", prompt=prompt)
        return self._critiques.popleft() if self._critiques else CritiqueResult(ok=True)

    def plan_fit(self, image: np.ndarray, prompt: str, *, plan: list[PlanItem]) -> list[float]:
        """10 x the IoU of what `find` sees for each label with its planned box."""
        self._record("plan_fit", labels=[i["label"] for i in plan])
        if self._fits:
            return self._fits.popleft()
        return [10.0 * box_iou(find(image, i["label"]), i["box"]) for i in plan]

    def surprise(self, image: np.ndarray, prompt: str, *, plan: list[PlanItem]) -> Surprise:
        """Worst 0.0; one stray (score -10) around every object-coloured pixel (a channel
        >= 128) more than 4 px from each planned box, none when there is none."""
        self._record("surprise", labels=[i["label"] for i in plan])
        if self._surprises:
            return self._surprises.popleft()
        off = (np.asarray(image) >= 128).any(axis=-1)
        for item in plan:
            x0, y0, x1, y1 = _clip(item["box"])
            off[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = False
        if not off.any():
            return Surprise(worst=0.0)
        ys, xs = np.nonzero(off)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        return Surprise(worst=-10.0, strays=[StrayMark(box=box, score=-10.0)])

    def noun_fit(self, image: np.ndarray, items: list[PlanItem], *, contrast: bool = False) -> list[float]:
        """10 x the IoU of what `find` sees for each label with its box; with `contrast`,
        5 less (positive when the named object covers most of the box)."""
        self._record("noun_fit", labels=[i["label"] for i in items], contrast=contrast)
        if self._fits:
            return self._fits.popleft()
        return [10.0 * box_iou(find(image, i["label"]), i["box"]) - 5.0 * contrast for i in items]

    def ground(
        self, image: np.ndarray, expressions: list[str], *, candidates: int | None = None,
        views: int | None = None,
    ) -> list[BoxList]:
        self._record("ground", expressions=list(expressions),
                     **({} if candidates is None else {"candidates": candidates}),
                     **({} if views is None else {"views": views}))  # fmt: skip
        if self._grounds:
            return self._grounds.popleft()
        return [find(image, e) for e in expressions]

    def answer(self, image: np.ndarray, question: str) -> str:
        self._record("answer", question=question)
        return self._answers.popleft() if self._answers else f"{int(image.mean())}"

    def plan_edit(self, image: np.ndarray, instruction: str) -> EditPlanResult:
        self._record("plan_edit", instruction=instruction)
        if self._edit_plans:
            return self._edit_plans.popleft()
        return default_edit_plan(instruction)

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
        self._record("edit", instruction=instruction, seed=seed)
        out = image.copy()
        fresh = noise((CANVAS, CANVAS), instruction, seed)
        for box in plan.target_boxes if plan else []:
            x0, y0, x1, y1 = _clip(box)
            out[y0:y1, x0:x1] = fresh[y0:y1, x0:x1]
        items = [i for i in (plan.layout if plan else []) if i["label"] not in self.drop_labels]
        out = draw(out, items)
        self._sample(num_steps, on_step, out)
        return out


def find(image: np.ndarray, label: str) -> BoxList:
    """The bounding box of `label`'s colour in `image` (NOT_FOUND when absent)."""
    mask = np.all(image == label_color(label), axis=-1)
    if not mask.any():
        return list(NOT_FOUND)
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class FakeBatchedBackend:
    """The batched-backend protocol over a `FakeEngine`, counting backend calls.

    Each method takes a list of requests and answers row by row with the engine (each row
    keeps its own seed), after sleeping `call_delay_s` once per call: the fixed cost of one
    batched forward that batching amortises.
    """

    def __init__(self, engine: FakeEngine | None = None, *, call_delay_s: float = 0.0) -> None:
        self.engine = engine or FakeEngine()
        self.call_delay_s = call_delay_s
        self.calls: collections.Counter[str] = collections.Counter()
        self.batch_sizes: list[tuple[str, int]] = []
        self.fail_rows: set[str] = set()
        """Prompts/instructions whose row returns an exception (per-row failure)."""

    def _call(self, method: str, n: int) -> None:
        self.calls[method] += 1
        self.batch_sizes.append((method, n))
        if self.call_delay_s:
            time.sleep(self.call_delay_s)

    @property
    def total_calls(self) -> int:
        """Backend calls over all methods."""
        return sum(self.calls.values())

    def plan_layout(self, requests: Sequence[PlanLayoutRequest]) -> list[object]:
        self._call("plan_layout", len(requests))
        return [self.engine.plan_layout(r.prompt, seed=r.seed, temperature=r.temperature) for r in requests]

    def generate(self, requests: Sequence[GenerateRequest]) -> list[object]:
        self._call("generate", len(requests))
        out: list[object] = []
        for r in requests:
            if r.prompt in self.fail_rows:
                out.append(RuntimeError(f"row failed: {r.prompt}"))
                continue
            out.append(self.engine.generate(r.prompt, plan=r.plan, seed=r.seed,
                                            num_steps=r.num_steps, feedback=r.feedback,
                                            on_step=r.on_step))  # fmt: skip
        return out

    def regenerate_regions(self, requests: Sequence[RegenerateRegionsRequest]) -> list[object]:
        self._call("regenerate_regions", len(requests))
        return [self.engine.regenerate_regions(r.image, r.prompt, plan=r.plan, boxes=r.boxes,
                                               seed=r.seed, num_steps=r.num_steps,
                                               on_step=r.on_step) for r in requests]  # fmt: skip

    def critique(self, requests: Sequence[CritiqueRequest]) -> list[object]:
        self._call("critique", len(requests))
        return [self.engine.critique(r.image, r.prompt) for r in requests]

    def plan_fit(self, requests: Sequence[PlanFitRequest]) -> list[object]:
        self._call("plan_fit", len(requests))
        return [self.engine.plan_fit(r.image, r.prompt, plan=r.plan) for r in requests]

    def surprise(self, requests: Sequence[SurpriseRequest]) -> list[object]:
        self._call("surprise", len(requests))
        return [self.engine.surprise(r.image, r.prompt, plan=r.plan) for r in requests]

    def noun_fit(self, requests: Sequence[NounFitRequest]) -> list[object]:
        self._call("noun_fit", len(requests))
        return [self.engine.noun_fit(r.image, r.items, contrast=r.contrast) for r in requests]

    def ground(self, requests: Sequence[GroundRequest]) -> list[object]:
        self._call("ground", len(requests))
        return [self.engine.ground(r.image, r.expressions, candidates=r.candidates, views=r.views)
                for r in requests]

    def answer(self, requests: Sequence[AnswerRequest]) -> list[object]:
        self._call("answer", len(requests))
        return [self.engine.answer(r.image, r.question) for r in requests]

    def plan_edit(self, requests: Sequence[PlanEditRequest]) -> list[object]:
        self._call("plan_edit", len(requests))
        return [self.engine.plan_edit(r.image, r.instruction) for r in requests]

    def edit(self, requests: Sequence[EditRequest]) -> list[object]:
        self._call("edit", len(requests))
        return [self.engine.edit(r.image, r.instruction, plan=r.plan, seed=r.seed,
                                 num_steps=r.num_steps, on_step=r.on_step)
                for r in requests]  # fmt: skip


# ----------------------------------------------------------------------------------------
# A tiny random `LavidaPipeline` (torch imported lazily: importing this module stays light)
# ----------------------------------------------------------------------------------------

TINY_VQ = dict(hidden_channels=16, num_vq_embeddings=32, latent_channels=8, num_res_blocks=0,
               norm_num_groups=4)  # fmt: skip
"""The VQ config of the model tests (`tests/model/conftest.py`)."""


def tiny_pipeline(seed: int = 0, corpus: Sequence[str] = ()) -> object:
    """A seeded, randomly initialised `LavidaPipeline` small enough for CPU tests.

    Built as `tests/model/conftest.py` builds its components: the project's tokenizer (plus
    the words of `corpus`), a tiny VQ (`TINY_VQ`, codebook 32) and the `tiny` preset. Its
    outputs are noise, but every shape, seed and callback behaves as with real weights.
    Two calls with the same arguments give identical pipelines.
    """
    import torch

    from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
    from lavida_agent.model.configuration_vq import VQConfig
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
    from lavida_agent.model.modeling_vq import VQImageTokenizer
    from lavida_agent.model.pipeline_lavida import LavidaPipeline
    from lavida_agent.model.tokenization_lavida import build_tokenizer
    from lavida_agent.model.training import token_ids

    tok = build_tokenizer(["move the red circle to the top left .", "objects : 3 ;", *corpus])
    config = LavidaConfig(**{**PRESETS["tiny"], **token_ids(tok), "codebook_size": 32})
    vq = VQImageTokenizer(VQConfig(**TINY_VQ), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = LavidaForMaskedDiffusion(config)
    return LavidaPipeline(model.eval(), vq.eval(), tok)


def intercept(engine: FakeEngine, method: str, at: int, action: Callable[[], object]) -> None:
    """Run `action()` when `engine.<method>` is called for the `at`-th time (1-based), just
    before that call runs; every call then runs as usual. `del engine.<method>` undoes it."""
    original = getattr(engine, method)
    count = [0]

    def wrapped(*args: object, **kwargs: object) -> object:
        count[0] += 1
        if count[0] == at:
            action()
        return original(*args, **kwargs)

    setattr(engine, method, wrapped)


def pause(engine: FakeEngine, method: str, at: int = 1) -> tuple[threading.Event, threading.Event]:
    """Make the `at`-th call of `engine.<method>` wait (up to 10 s) until released: returns
    `(entered, release)`."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(10)

    intercept(engine, method, at, hold)
    return entered, release
