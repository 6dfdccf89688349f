"""`LavidaPipeline`: every task of the unified model behind one diffusers-style object.

`plan`, `generate`, `edit`, `regenerate_regions`, `ground`, `understand` and `critique`
take lists and return lists (one batched pass per call; a single image or text stands for
a list of one, one text for every image; empty lists give empty outputs) and return typed
outputs. All but `ground` (deterministic) accept `seed` (an integer per request, or one
for all; None draws one from torch's global generator and reports it) or `generator`,
and an `interrupt` check; the samplers also a step `callback`. Every request draws from
its own generator, so a row comes out the same alone or in any batch; the same seed for
two requests draws the same result twice. Conditions are encoded once per call and cached (one-way attention);
image passes run with elastic activation (und rows skip the split layers).

Folder layout written by `save_pretrained` (all offline, safetensors + JSON):

    pipeline_index.json   {"transformer": "transformer", "vq": "vq", "tokenizer": "tokenizer",
                           "defaults": {...sampler and guidance defaults...}}
    transformer/          config.json + model.safetensors (LavidaForMaskedDiffusion)
    vq/                   config.json + model.safetensors (VQImageTokenizer)
    tokenizer/            tokenizer.json + tokenizer_config.json
    drawer_unplanned/     optional: model.safetensors, drawing weights (some of the model's
                          `image_only_parameter_names`, the rest shared) that draw an image
                          without a plan; listed in the index as "unplanned_drawer"
    drawer_edit/          optional, the same for edits without a plan or regions (single
                          shot); listed as "edit_drawer"
    drawer_edit_regions/  optional, the same for edits with regions (the local redraws of
                          planned and agent edits); listed as "edit_regions_drawer"
    planner_edit/         optional: model.safetensors, answer-side weights (some of the
                          model's `text_only_parameter_names`) that write an edit plan's
                          boxes around the object it takes away, and the whole first plan
                          with `edit_planner_first_step`; listed as "edit_planner"
    reader/               optional, answer-side weights that write `understand`'s captions
                          and answers; listed as "reader"

An optional model's file holds a weight either whole or as a low-rank change to the base's:
`NAME.delta_up` (out x r) and `NAME.delta_down` (r x in), the weight being the base's plus
their product (`low_rank_delta`; `lavida-agent train ... --rank R` writes them).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from lavida_agent.tools.boxes import iou_matrix, quantize

from .configuration_lavida import LavidaConfig
from .modeling_lavida import LavidaForMaskedDiffusion
from .modeling_vq import VQImageTokenizer, images_to_tensor, tensor_to_images
from .sampling_image import ImageMaskSampler
from .sampling_text import TextMaskSampler
from .tasks import (
    CRITIQUE_LEN,
    PLAN_LEN,
    Example,
    PlanItem,
    box_cells,
    inner_cells,
    build_critique,
    build_edit,
    build_ground,
    build_t2i,
    answer_length,
    build_understand,
    drop_conditions,
    pack,
    parse_plan,
    plan_item_boxes,
    snap_edit_plan,
    snap_plan,
)
from .tokenization_lavida import clean_decoded

logger = logging.getLogger(__name__)

# the model's sides, by the method that names their parameters
PARTS = {"generation": "image_only_parameter_names", "understanding": "text_only_parameter_names"}
# pipeline_index.json key -> (folder, `LavidaPipeline` attribute, part) of each optional
# model with some weights of its own (`with_own_weights`): drawers, then planners
OWN_MODELS = {
    "unplanned_drawer": ("drawer_unplanned", "unplanned_model", "generation"),
    "edit_drawer": ("drawer_edit", "edit_model", "generation"),
    "edit_regions_drawer": ("drawer_edit_regions", "edit_region_model", "generation"),
    "edit_planner": ("planner_edit", "edit_planner", "understanding"),
    "reader": ("reader", "reader", "understanding"),
}
# a weight stored as a low-rank change to the base's: NAME + these two suffixes
DELTA_UP, DELTA_DOWN = ".delta_up", ".delta_down"

__all__ = [
    "CritiqueOutput",
    "GroundingOutput",
    "ImageOutput",
    "LavidaPipeline",
    "PipelineInterrupted",
    "PlanOutput",
    "StepInfo",
    "TextOutput",
    "default_weights_path",
]

Box = tuple[int, int, int, int]

DEFAULTS: dict = {
    "num_steps": 16,
    "guidance_scale": 2.0,
    "image_guidance_scale": 0.0,
    "temperature": 1.0,
    "order": "stratified",
    "shift": 5.0,
    # t2i without a plan: fewer codes early, so the layout settles before most codes commit
    # (single-shot t2i 0.246 -> 0.330 over benchmark seeds 0-3; weights README, stop 21)
    "unplanned_shift": 10.0,
    # a background edit keeps every object and changes one colour: sampling freely only
    # loses the objects' edges (agent background edits 0.625 -> 0.81 over benchmark seeds
    # 0-3; weights README, stop 24)
    "background_edit_temperature": 0.5,
    "text_steps": 8,
    "ground_steps": 4,  # 1 = every coordinate in one forward; 4 = one per box per forward
    "ground_candidates": 4,  # boxes decoded per expression; > 1: the head noun's fit picks
    # the default read: the image in this many views, the head noun's fit picks among all
    # the boxes they find (1: the image alone, in `ground_candidates` branches)
    "ground_views": 12,
    # an unsized noun (`the red square`) is read in its sized forms too (`ground(sizes=...)`;
    # grounding benchmark seeds 0-3 and edits, weights README, stop 35)
    "ground_sizes": False,
    # `plan_edit`'s first step (the whole plan) by the edit planner too, not only the boxes
    # written knowing the grounded `removed` one (a planner trained on both states; weights
    # README, stop 32)
    "edit_planner_first_step": False,
}


def default_weights_path() -> Path:
    """Folder of the embedded ShapesWorld model shipped inside the package."""
    return Path(__file__).resolve().parent / "weights"


class PipelineInterrupted(RuntimeError):
    """The `interrupt` check returned True; the loop stopped before finishing."""


@dataclass
class StepInfo:
    """What a step callback receives: `step` of `total` (1-based), and a preview image per
    row (uint8 (H, W, 3), the current x0 prediction decoded) on preview steps, else None.
    `rows`: the call's request rows this step advances, in the order of `previews` (None:
    every row; a `generate` batch that mixes rows with and without a plan and has an
    unplanned drawer steps each kind in its own pass)."""

    task: str
    step: int
    total: int
    previews: list[np.ndarray] | None = None
    rows: list[int] | None = None


@dataclass
class ImageOutput:
    images: list[np.ndarray]  # uint8 (64, 64, 3) per request
    codes: torch.Tensor  # (B, G, G)
    plans: list[list[PlanItem]] | None = None
    seeds: list[int | None] = field(default_factory=list)


@dataclass
class PlanOutput:
    plans: list[list[PlanItem]]
    texts: list[str]


@dataclass
class TextOutput:
    texts: list[str]


@dataclass
class GroundingOutput:
    boxes: list[list[Box | None]]  # per image, one box (or None if unparsable) per expression
    # per image, per expression, the candidate boxes: the greedy branch first, or with views
    # the box most views found first
    candidates: list[list[list[Box | None]]] = field(default_factory=list)
    # with views: per image, per expression, how many views found each candidate
    votes: list[list[list[int]]] = field(default_factory=list)


@dataclass
class CritiqueOutput:
    ok: list[bool]
    reasons: list[list[str]]
    texts: list[str]


def _generators(seed, generator, n: int, device) -> tuple[list[torch.Generator | None], list[int | None]]:
    """One generator per request: from `generator` (one shared by every request, or one per
    request), or from seeds (one for every request, or one per request). A seed of None
    draws one from torch's global generator, so `torch.manual_seed` makes the call
    reproducible (that generator advances, as diffusers' does; it is never re-seeded), and
    the seed drawn is the one reported. Returns the generators and the seeds (None per
    request with `generator`)."""
    if generator is not None:
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * n
        if len(gens) != n:
            raise ValueError(f"got {len(gens)} generators for {n} requests")
        bad = next((g for g in gens if not isinstance(g, torch.Generator)), None)
        if bad is not None:
            raise ValueError(f"generator must be a torch.Generator (or a list of one per request), got {bad!r}")
        return gens, [None] * n
    seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed] * n
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} requests")
    gens, used = [], []
    for s in seeds:
        if s is None:
            s = int(torch.randint(0, 2**63 - 1, ()).item())  # what JSON readers take whole
        elif isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < GENERATOR_SEED_LIMIT:
            raise ValueError(f"a seed is an integer in [0, 2**64), or None; got {s!r}")
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        gens.append(g)
        used.append(int(s))
    return gens, used


GENERATOR_SEED_LIMIT = 2**64
"""Seeds are below this, as torch's generators take them (the agent's seeds are below
`settings.SEED_LIMIT`, 2**63, and each round adds a few)."""


@contextlib.contextmanager
def _no_hf_bars() -> Iterator[None]:
    """transformers' progress bars off for the block: a few MB load and save at once."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _paired(images, texts, name: str) -> tuple[list, list]:
    """`(images, texts)` as lists of one entry per image: a single image or text stands for
    a list of one, and one text for every image; any other length is a `ValueError`."""
    images = _as_list(images)
    return images, _as_list(texts, len(images), name)


def _plan_rows(plans, n: int) -> list[list[PlanItem] | None]:
    """One plan per request (None: none; `plans=None`: none for any), each a list of items
    `(label, (x0, y0, x1, y1))` or `{"label", "box"}` (the agent's layout items)."""
    if plans is None:
        return [None] * n
    rows = _as_list(plans, n, "plans (one plan per request, each a list of items)")
    return [None if plan is None else [_plan_item(item) for item in plan] for plan in rows]


def _plan_item(item) -> PlanItem:
    label, box = (item.get("label"), item.get("box")) if isinstance(item, dict) else (
        item if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None))  # fmt: skip
    if not isinstance(label, str) or not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
        raise ValueError(f"a plan item is (label, (x0, y0, x1, y1)) or {{'label', 'box'}}, got {item!r} "
                         "(plans hold one list of items per request)")  # fmt: skip
    return label, tuple(float(v) if isinstance(v, np.floating) else v for v in box)


def _check_steps(num_steps, default: int) -> int:
    """`num_steps` (None: `default`), which must be a whole number of steps, at least 1."""
    if num_steps is None:
        return int(default)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1 (or None for the default), got {num_steps!r}")
    return int(num_steps)


RERANK_MARGIN = 20.0
"""Grounding keeps a candidate other than the greedy box only when its noun fits it more
than this many nats better (on seeds 0-1 of the grounding benchmark, margins 0 / 5 / 20
scored 0.819 / 0.824 / 0.833 against the greedy 0.778: the greedy box is right more often
than a small difference in fit)."""

STRAY_THRESHOLD = -4.5
"""`stray_marks` reports cells scoring below this many nats. Measured on the shipped weights'
own drawings from their own plans (tuning seeds 123-126 of the t2i suite, three seeds a
prompt, 672 images): away from the plan no image the detector calls right has a cell below
-2.95, while 10 of the 73 it calls wrong (a faint blob or smear away from every planned box)
score -5.1 to -11.3 (weights README, "Stop 43")."""

CANDIDATE_SPREAD = 4
"""Grounding candidates: the first coordinates of two branches are at least this many
location bins apart (4 bins = 4 px on the 64 px canvas: less than the smallest object)."""


def _kth_peak(logp: torch.Tensor, k: int, spread: int) -> int:
    """The bin of the k-th highest peak of `logp` (1-D), peaks at least `spread` bins apart;
    the highest bin when there are not k + 1 finite peaks."""
    lp = logp.clone()
    for _ in range(k + 1):
        v = int(lp.argmax())
        if not math.isfinite(float(lp[v])):
            return int(logp.argmax())
        lp[max(0, v - spread) : v + spread + 1] = -math.inf
    return v


def _dilate(cells: np.ndarray) -> np.ndarray:
    """`cells` (2-D bool) grown by one cell in all eight directions."""
    return cv2.dilate(cells.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def _components(cells: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of `cells` (2-D bool), each as a mask, in reading order
    (OpenCV labels them in the order their first cell is met)."""
    n, labels = cv2.connectedComponents(cells.astype(np.uint8), connectivity=8)
    return [labels == k for k in range(1, n)]


GROUND_VIEWS: tuple[tuple[bool, int, int], ...] = (
    (False, 0, 0), (True, 0, 0), (False, 2, 0), (False, 0, 2), (False, -2, -2), (False, 3, -1),
    (True, 1, 1), (True, -2, 2), (False, -1, 3), (True, 2, -2), (False, 1, -3), (True, -3, 0),
    (True, 0, 2), (False, -3, 2), (True, 3, 1), (False, 2, 2), (True, -1, -3), (False, -2, 1),
    (True, 1, -1), (False, 3, 3), (True, -2, -1), (False, -3, -3), (True, 2, 3), (False, 1, 1),
)  # fmt: skip
"""The views `ground(views=V)` reads an image in, the first V of them: `(mirror, dx, dy)` is
the image mirrored left to right when `mirror` (and `left` and `right` swapped in every
expression), then moved `dx`, `dy` pixels with its edge rows and columns repeated. Each view
puts the objects on other image codes, and the model's mistakes differ from view to view
(the identity comes first)."""

_SIDES = re.compile(r"\b(left|right)\b")


def _view_image(image: np.ndarray, view: tuple[bool, int, int]) -> np.ndarray:
    mirror, dx, dy = view
    h, w = image.shape[:2]
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    return image[ys][:, w - 1 - xs if mirror else xs]


def _view_text(text: str, view: tuple[bool, int, int]) -> str:
    return _SIDES.sub(lambda m: "right" if m[1] == "left" else "left", text) if view[0] else text


def _unview_box(box: Box | None, view: tuple[bool, int, int], size: int) -> Box | None:
    """A box found in a view, in the pixels of the image itself (clipped to it)."""
    if box is None:
        return None
    mirror, dx, dy = view
    x0, y0, x1, y1 = box[0] - dx, box[1] - dy, box[2] - dx, box[3] - dy
    if mirror:
        x0, x1 = size - x1, size - x0
    x0, y0, x1, y1 = (min(max(v, 0), size) for v in (x0, y0, x1, y1))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _agreed(boxes: Sequence[Box | None]) -> tuple[list[Box], list[int]]:
    """The distinct boxes the views found, most votes first: the box most others overlap
    (IoU >= 0.5; the earliest view on a tie) with its votes, then the same among the boxes
    it did not take, and so on."""
    seen = [b for b in boxes if b is not None]
    near = iou_matrix(seen, seen) >= 0.5  # every box is near itself
    open_ = np.ones(len(seen), dtype=bool)
    found, votes = [], []
    while open_.any():
        count = np.where(open_, (near & open_).sum(1), -1)
        best = int(count.argmax())  # the first of the most-voted: the earliest view
        found.append(seen[best])
        votes.append(int(count[best]))
        open_ &= ~near[best]
    return found, votes


def _sized_forms(expression: str) -> list[str]:
    """`expression`, then each of its sized forms when it is in the grammar and names
    neither a size, a side nor a relation (`the red square` -> `the small red square`, ...)."""
    from lavida_agent.tools.shapes_world.language import GrammarError, Noun, parse_refexp
    from lavida_agent.tools.shapes_world.scene import SIZES

    try:
        spec = parse_refexp(expression)
    except GrammarError:
        return [expression]
    if spec.size is not None or spec.side is not None or spec.relation is not None:
        return [expression]
    return [expression, *(f"the {Noun(spec.shape, spec.color, size).text}" for size in SIZES)]


def _as_list(x, n: int | None = None, name: str = "value") -> list:
    if isinstance(x, (list, tuple)):
        if n is not None and len(x) != n:
            raise ValueError(f"{name}: expected {n} entries, got {len(x)}")
        return list(x)
    return [x] * (1 if n is None else n)


def _edit_object(instruction: str) -> str | None:
    """The expression `plan_edit` grounds: the object an instruction in the ShapesWorld
    grammar takes away (`the green diamond`); None for one in the grammar that takes no
    object away (add, background); the whole instruction outside the grammar."""
    from lavida_agent.tools.shapes_world.language import GrammarError, parse_edit

    try:
        spec = parse_edit(instruction)
    except GrammarError:
        return instruction
    return None if spec.target is None or spec.category in ("add", "background") else f"the {spec.target.text}"


def _passes(drawers: Sequence[object], callback) -> list[tuple[list[int], object, object]]:
    """`(rows, model, callback)` per pass of a call whose row i is drawn by `drawers[i]`
    (None: the base model): the base model's rows first, then each drawer's in the order
    it first appears; one pass when every row has the same drawer. With several passes each
    callback tags its `StepInfo` with the rows it advances."""
    groups: dict[int, tuple[object, list[int]]] = {id(None): (None, [])}
    for i, drawer in enumerate(drawers):
        groups.setdefault(id(drawer), (drawer, []))[1].append(i)
    passes = [(rows, drawer) for drawer, rows in groups.values() if rows]
    if len(passes) == 1:
        return [(passes[0][0], passes[0][1], callback)]
    tag = (lambda ix: None) if callback is None else (lambda ix: lambda info: callback(replace(info, rows=list(ix))))
    return [(rows, drawer, tag(rows)) for rows, drawer in passes]


def low_rank_delta(base: torch.Tensor, tuned: torch.Tensor, rank: int, *,
                   dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`(up, down)`, stored as `dtype`: `base + up @ down` is the best rank-`rank`
    approximation of the 2-D `tuned` (the truncated SVD of `tuned - base`, its singular
    values split evenly between the two factors).

    Raises:
        ValueError: a rank below 1, or tensors that are not one 2-D shape.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if base.ndim != 2 or base.shape != tuned.shape:
        raise ValueError(f"a low-rank change needs two matrices of one shape, got {tuple(base.shape)} "
                         f"and {tuple(tuned.shape)}")  # fmt: skip
    u, sv, vh = torch.linalg.svd(tuned.detach().float().cpu() - base.detach().float().cpu(), full_matrices=False)
    root = sv[:rank].sqrt()
    return (u[:, :rank] * root).to(dtype), (root[:, None] * vh[:rank]).to(dtype)


def apply_low_rank(base: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The weight a low-rank change stands for: `base + up @ down`, computed in fp32 and
    returned in `base`'s dtype and device (so a saved change loads bit for bit)."""
    change = up.float().to(base.device) @ down.float().to(base.device)
    return (base.detach().float() + change).to(base.dtype)


def expand_own_weights(model: LavidaForMaskedDiffusion, stored: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:  # fmt: skip
    """An optional model's file as whole weights: `(weights, factors)`, every
    `NAME.delta_up` / `NAME.delta_down` pair replaced by `NAME`, `model`'s own plus their
    product, and `factors` holding each such pair by `NAME` (to write it back the same way).

    Raises:
        ValueError: a factor without its partner, or of a weight `model` does not have.
    """
    own = dict(model.named_parameters())
    weights: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in stored.items():
        if key.endswith(DELTA_DOWN):
            if key[: -len(DELTA_DOWN)] + DELTA_UP not in stored:
                raise ValueError(f"{key} has no {DELTA_UP} beside it")
            continue
        if not key.endswith(DELTA_UP):
            weights[key] = value
            continue
        name = key[: -len(DELTA_UP)]
        down = stored.get(name + DELTA_DOWN)
        if down is None:
            raise ValueError(f"{key} has no {DELTA_DOWN} beside it")
        if name not in own:
            raise ValueError(f"a low-rank change of {name}, which the model does not have")
        factors[name] = (value, down)
        weights[name] = apply_low_rank(own[name], value, down)
    return weights, factors


def with_own_weights(model: LavidaForMaskedDiffusion, weights: dict[str, torch.Tensor], *,
                     part: str = "generation") -> LavidaForMaskedDiffusion:  # fmt: skip
    """A second model that reads `model`'s own parameters everywhere except in `weights`,
    some or all of one side's parameters: "generation", the drawing weights
    (`image_only_parameter_names`, a drawer); "understanding", the answer-side ones
    (`text_only_parameter_names`, a planner).

    The two share every other parameter object (a fine-tune of one shows in both); only the
    tensors of `weights` take extra memory. `weights` must hold that side's parameters only,
    at least one, shaped as the model's (`ValueError` otherwise).
    """
    import copy

    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    side = set(getattr(model, PARTS[part])())
    own = dict(model.named_parameters())
    extra = sorted(set(weights) - side)
    if extra or not weights:
        raise ValueError(f"own weights must be some of the model's {part} parameters"
                         + (f"; not {part} weights: {', '.join(extra[:3])}" if extra else "; got none"))
    names = set(weights)
    bad = [k for k, v in weights.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{part} weights of another architecture ({', '.join(bad[:3])})")
    # deepcopy's memo hands back the shared parameters themselves: only `weights` are copied
    other = copy.deepcopy(model, memo={id(p): p for k, p in own.items() if k not in names})
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name in names:
                p.copy_(weights[name])
    return other.eval()


class LavidaPipeline:
    """The unified model plus its image tokenizer and text tokenizer.

    Example:
        >>> pipe = LavidaPipeline.from_pretrained()  # the embedded ShapesWorld model
        >>> out = pipe.generate(["a red circle left of a blue square"], seed=1)
        >>> out.images[0].shape
        (64, 64, 3)
    """

    def __init__(self, model: LavidaForMaskedDiffusion, vq: VQImageTokenizer, tokenizer, defaults: dict | None = None,
                 unplanned_model: LavidaForMaskedDiffusion | None = None,
                 edit_model: LavidaForMaskedDiffusion | None = None,
                 edit_planner: LavidaForMaskedDiffusion | None = None,
                 edit_region_model: LavidaForMaskedDiffusion | None = None,
                 reader: LavidaForMaskedDiffusion | None = None):  # fmt: skip
        self.model = model.eval()
        # Drawers and planners (`with_own_weights(model, ...)`: the same model with one side's
        # weights trained for one kind of row); None: `model` does that work too.
        # `unplanned_model` draws `generate`'s rows without a plan; `edit_model` draws `edit`'s
        # rows with neither a plan nor regions (the single shot), `edit_region_model` those
        # with regions (local redraws: planned and agent edits); `edit_planner` writes
        # `plan_edit`'s boxes again around the object an edit takes away; `reader` writes
        # `understand`'s captions and answers.
        self.unplanned_model = unplanned_model.eval() if unplanned_model is not None else None
        self.edit_model = edit_model.eval() if edit_model is not None else None
        self.edit_planner = edit_planner.eval() if edit_planner is not None else None
        self.edit_region_model = edit_region_model.eval() if edit_region_model is not None else None
        self.reader = reader.eval() if reader is not None else None
        # per optional model (by attribute), the weights it holds as low-rank changes to
        # `model`'s: {name: (up, down)}, written back that way by `save_pretrained`
        self.low_rank: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.vq = vq.eval()
        self.tokenizer = tokenizer
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.forward_count = 0  # model forwards since construction (benchmarks, tests)
        loc0 = self.config.loc_token_offset
        self._loc_ids = torch.arange(loc0, loc0 + self.config.num_loc_tokens)

    @property
    def config(self) -> LavidaConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ save / load

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, device: str | torch.device | None = None,
        dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None,
    ) -> LavidaPipeline:  # fmt: skip
        """Load a pipeline folder (default: the embedded weights), offline, in `dtype`
        (default float32; `torch_dtype` is diffusers' name for it)."""
        from transformers import AutoTokenizer

        if dtype is not None and torch_dtype is not None:
            raise ValueError("give dtype or torch_dtype (the same setting), not both")
        dtype = dtype or torch_dtype or torch.float32

        root = Path(path) if path is not None else default_weights_path()
        index_file = root / "pipeline_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(
                f"no pipeline_index.json in {root}: not a LavidaPipeline folder"
                + (" (the embedded weights are missing: train them with `lavida-agent train`)" if path is None else "")
            )
        index = json.loads(index_file.read_text())
        with _no_hf_bars():
            model = LavidaForMaskedDiffusion.from_pretrained(root / index["transformer"], dtype=dtype)
        vq = VQImageTokenizer.from_pretrained(root / index["vq"], dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(root / index["tokenizer"])
        from safetensors.torch import load_file

        others, low_rank = {}, {}
        for key, (_, attr, part) in OWN_MODELS.items():
            if index.get(key):
                stored = load_file(root / index[key] / "model.safetensors")
                weights, low_rank[attr] = expand_own_weights(model, {k: v.to(dtype) for k, v in stored.items()})
                others[attr] = with_own_weights(model, weights, part=part)
        pipe = cls(model, vq, tokenizer, defaults=index.get("defaults"), **others)
        pipe.low_rank = {k: v for k, v in low_rank.items() if v}
        if device is not None:
            pipe.to(device)
        return pipe

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype = torch.float16) -> None:
        """Write the pipeline folder (weights stored as `dtype`, fp16 by default)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        model = self.model
        if dtype != next(model.parameters()).dtype:
            import copy

            model = copy.deepcopy(model).to(dtype)
        with _no_hf_bars():
            model.save_pretrained(root / "transformer")
        self.vq.save_pretrained(root / "vq", dtype=dtype)
        self.tokenizer.save_pretrained(root / "tokenizer")
        index = {"transformer": "transformer", "vq": "vq", "tokenizer": "tokenizer"}
        from safetensors.torch import save_file

        own = dict(self.model.named_parameters())
        for key, (folder, attr, part) in OWN_MODELS.items():
            other = getattr(self, attr)
            if other is None:
                continue
            # only the weights of its side that are its own: the rest load shared
            names = set(getattr(self.model, PARTS[part])())
            its = dict(other.named_parameters())
            weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in its.items()
                       if k in names and v is not own[k] and not torch.equal(v, own[k])}  # fmt: skip
            # a weight still equal to its low-rank change is written as that change
            for name, (up, down) in self.low_rank.get(attr, {}).items():
                if name in weights and torch.equal(apply_low_rank(own[name], up, down), its[name]):
                    del weights[name]
                    weights[name + DELTA_UP] = up.detach().to("cpu", dtype).contiguous()
                    weights[name + DELTA_DOWN] = down.detach().to("cpu", dtype).contiguous()
            if not weights:
                continue  # the base's own weights: nothing to save
            (root / folder).mkdir(exist_ok=True)
            save_file(weights, root / folder / "model.safetensors")
            index[key] = folder
        index["defaults"] = self.defaults
        (root / "pipeline_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def _no_images(self) -> ImageOutput:
        """What an image method returns for no requests."""
        G = self.config.image_grid
        return ImageOutput(images=[], codes=torch.empty(0, G, G, dtype=torch.long), plans=[], seeds=[])

    def to(self, *args, **kwargs) -> LavidaPipeline:
        """Move (and/or cast) every part as `nn.Module.to` does: `to("cuda")`,
        `to(torch.bfloat16)`, `to("cuda", torch.bfloat16)`, `to(device=..., dtype=...)`."""
        self.model.to(*args, **kwargs)
        for _, attr, _ in OWN_MODELS.values():
            if getattr(self, attr) is not None:
                getattr(self, attr).to(*args, **kwargs)
        self.vq.to(*args, **kwargs)
        return self

    # ------------------------------------------------------------------ helpers

    def _forward(self, model=None, **kw):
        self.forward_count += 1
        return (self.model if model is None else model)(**kw)

    def _encode_images(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            pix = images_to_tensor(np.stack([self._check_image(im) for im in images])).to(self.device)
            return list(self.vq.encode(pix).codes.cpu().numpy())

    def _decode_codes(self, codes: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            return list(tensor_to_images(self.vq.decode(codes.to(self.device))))

    def _check_image(self, image) -> np.ndarray:
        image = np.asarray(image)
        size = self.config.image_size
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 ({size}, {size}, 3) image, got {image.dtype} {image.shape}; "
                "letterbox other images first (lavida_agent.tools.images.letterbox)"
            )
        return image

    def _split(self, examples: list[Example], target_len: int):
        """Pack left-padded and split into the condition prefix and the last `target_len`
        positions (the target: equal length in every row, so left padding aligns it)."""
        batch = pack(examples, self.config, pad_left=True).to(self.device)
        L = batch.input_ids.shape[1]
        c = L - target_len
        src_codes = None
        if batch.gen_codes is not None:
            keep = [i for i, t in enumerate(batch.gen_is_target) if not t]
            src_codes = batch.gen_codes[keep] if keep else None
        cond = dict(
            input_ids=batch.input_ids[:, :c], gen_codes=src_codes, pixel_values=batch.pixel_values,
            segment_ids=batch.segment_ids[:, :c], attention_mask=batch.attention_mask[:, :c],
        )  # fmt: skip
        tgt = dict(input_ids=batch.input_ids[:, c:], segment_ids=batch.segment_ids[:, c:],
                   attention_mask=batch.attention_mask[:, c:])  # fmt: skip
        return cond, tgt

    @torch.no_grad()
    def _decode_image(
        self,
        examples: list[Example],
        *,
        groups: int,
        combine: Callable[[list[torch.Tensor]], torch.Tensor],
        start: torch.Tensor | None,
        gens: list,
        num_steps: int,
        temperature: float | Sequence[float],
        order: str,
        callback,
        preview_every: int,
        interrupt,
        task: str,
        shift: float | Sequence[float] | None = None,
        model: LavidaForMaskedDiffusion | None = None,
        decode: Callable[[torch.Tensor], list[np.ndarray]] | None = None,
    ) -> torch.Tensor:
        """The image loop: `examples` holds `groups` blocks of B rows (e.g. [cond, uncond]);
        `combine` turns the per-group logits into guided logits; `shift` is one schedule
        shift or one per row (default: `defaults["shift"]`); `model` draws (default: the
        pipeline's); `decode` turns codes into the previews (default `_decode_codes`; a
        region redraw keeps the caller's pixels outside, as its result does). Returns codes
        (B, G, G)."""
        if preview_every < 0:
            raise ValueError(f"preview_every must be >= 0 (0: no previews), got {preview_every}")
        cfg = self.config
        G, P = cfg.image_grid, cfg.positions_per_image
        B = len(examples) // groups
        cond, tgt = self._split(examples, P)
        cache = self._forward(model, **cond, use_cache=True, elastic=True).cache
        sample = (
            torch.full((B, G * G), cfg.image_mask_code, dtype=torch.long, device=self.device)
            if start is None else start.reshape(B, G * G).to(self.device).clone()
        )  # fmt: skip
        # each row on its own schedule: a region edit's result must not depend on its batch
        n_masked = (sample == cfg.image_mask_code).sum(1).tolist()
        shift = self.defaults["shift"] if shift is None else shift
        sampler = ImageMaskSampler(cfg.image_mask_code, shift=shift, order=order,
                                   temperature=temperature)  # fmt: skip
        sampler.set_timesteps(num_steps, n_masked, G)
        total = len(sampler.timesteps)
        for i in sampler.timesteps:
            if interrupt is not None and interrupt():
                raise PipelineInterrupted(f"{task} interrupted after {i} of {total} steps")
            codes = sample.view(B, G, G).repeat(groups, 1, 1)
            logits = self._forward(model, **tgt, gen_codes=codes, condition_cache=cache, elastic=True).image_logits
            logits = logits.view(groups, B, G * G, -1)
            guided = combine([logits[g] for g in range(groups)])
            out = sampler.step(guided, i, sample, generator=gens)
            sample = out.prev_sample
            if callback is not None:
                previews = None
                if preview_every and ((i + 1) % preview_every == 0 or i + 1 == total):
                    previews = (decode or self._decode_codes)(out.pred_original_sample.view(B, G, G))
                callback(StepInfo(task, i + 1, total, previews))
        return sample.view(B, G, G)

    def _decode_text(self, examples, answer_len, **kw) -> list[str]:
        """Decode fixed-length answers to text (`_decode_text_ids`' arguments)."""
        ids = self._decode_text_ids(examples, answer_len, **kw)
        return [self._clean(t) for t in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=False)]

    @torch.no_grad()
    def _decode_text_ids(self, examples, answer_len, *, gens, num_steps, temperature, block_length=None,
                         allowed=None, callback=None, interrupt=None, task="text",
                         first_choices=None, start: torch.Tensor | None = None, model=None) -> torch.Tensor:  # fmt: skip
        """Decode fixed-length answers; returns their token ids `(B, answer_len)`.

        `first_choices` (token ids) decides the first token before anything else, from the
        fully masked answer, among those ids only. `start` (`(B, answer_len)` ids, the mask
        id where unknown) completes partly known answers instead: one token a step, each
        row's most confident masked one first, until none is masked (`num_steps` unused).
        `model`: another model to decode with (a planner; None: `self.model`)."""
        cfg = self.config
        cond, tgt = self._split(examples, answer_len)
        cache = self._forward(model, **cond, use_cache=True).cache
        sample = tgt["input_ids"].clone() if start is None else start.to(self.device).clone()
        if first_choices is not None:
            logits = self._forward(model, **tgt, condition_cache=cache).text_logits[:, 0]  # (B, V)
            choices = torch.as_tensor(list(first_choices), device=logits.device)
            sample[:, 0] = choices[logits[:, choices].argmax(-1)]
        sampler = TextMaskSampler(cfg.mask_token_id, block_length=block_length or answer_len,
                                  temperature=temperature)  # fmt: skip
        if start is None:
            sampler.set_timesteps(num_steps, answer_len)
            timesteps = sampler.timesteps
        else:
            sampler.set_timesteps(answer_len, answer_len)  # one token a step
            timesteps = sampler.timesteps[: int((sample == cfg.mask_token_id).sum(1).max())]
        total = len(timesteps)
        for i in timesteps:
            if interrupt is not None and interrupt():
                raise PipelineInterrupted(f"{task} interrupted after {i} of {total} steps")
            logits = self._forward(model, **{**tgt, "input_ids": sample}, condition_cache=cache).text_logits
            sample = sampler.step(logits, i, sample, generator=gens, allowed=allowed).prev_sample
            if callback is not None:
                callback(StepInfo(task, i + 1, total))
        return sample

    def _clean(self, text: str) -> str:
        for tok in ("[EOS]", "[PAD]", "[MASK]"):
            text = text.replace(tok, " ")
        return clean_decoded(text)

    def _text_allowed(self, words_only: bool = False) -> torch.Tensor:
        """Answers never contain image placeholders or the mask token; with `words_only`
        (answers to questions, captions) no box or `<LOC_i>` token either: an out-of-grammar
        question then gets words, not coordinates."""
        allowed = torch.ones(self.config.vocab_size, dtype=torch.bool)
        c = self.config
        for t in (c.mask_token_id, c.img_gen_token_id, c.img_src_token_id, c.img_enc_token_id, c.pad_token_id):
            allowed[t] = False
        if words_only:
            for t in (c.box_start_token_id, c.box_end_token_id, c.loc_begin_token_id, c.loc_end_token_id):
                allowed[t] = False
            allowed[c.loc_token_offset:c.loc_token_offset + c.num_loc_tokens] = False
        return allowed

    # ------------------------------------------------------------------ tasks

    def plan(
        self, prompts: Sequence[str], *, seed=0, generator=None, num_steps: int | None = None,
        temperature: float = 0.0, callback=None, interrupt=None, snap: bool = True,
    ) -> PlanOutput:  # fmt: skip
        """Plan layouts: one list of `(label, box)` per prompt (FACTS §6.1).

        With `snap` (default) every box is made one the world can hold (`snap_plan`:
        square, its label's size range, same centre); `texts` keeps the raw model output.
        """
        prompts = _as_list(prompts)
        if not prompts:
            return PlanOutput(plans=[], texts=[])
        gens, _ = _generators(seed, generator, len(prompts), self.device)
        exs = [build_t2i(self.tokenizer, self.config, p, with_plan=True, with_image=False) for p in prompts]
        texts = self._decode_text(
            exs, PLAN_LEN, gens=gens, num_steps=_check_steps(num_steps, 2 * self.defaults["text_steps"]),
            temperature=temperature, allowed=self._text_allowed(), callback=callback,
            interrupt=interrupt, task="plan",
        )  # fmt: skip
        plans = [parse_plan(t) for t in texts]
        return PlanOutput(plans=[snap_plan(p) for p in plans] if snap else plans, texts=texts)

    def plan_edit(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], *, seed=0, generator=None,
        num_steps: int | None = None, temperature: float = 0.0, callback=None, interrupt=None,
        ground: bool = True, snap: bool = True,
    ) -> PlanOutput:  # fmt: skip
        """The edit's plan from the model alone: what the edit changes, as plan items.

        The format of `model/training.py:touched_plan`: each object the edit produces with its
        `{size} {color} {shape}` label at its target box, then `("removed", box)` for each
        object it takes away (a recolour lists both at the same box); a background edit
        plans nothing. Feed the plan back with `edit(plans=..., regions=...)`. With `snap`
        (default) each object the plan produces gets a box the world can hold
        (`snap_edit_plan`: a square of its size word's side about the model's box's centre,
        as `plan` snaps its plans); `removed` boxes are the model's as written.

        With `ground` (the default) the plan is made in two steps: the model writes it, then
        each row that takes an object away gets, as its first `removed` box, the model's own
        grounding (`ground`) of the object the instruction names, and every other box of the
        row is masked and written again knowing it (`_decode_text_ids(start=...)`, the most
        confident coordinate first), by `edit_planner` when the pipeline has one (trained on
        exactly that state; the embedded weights do), else by the model. With
        `defaults["edit_planner_first_step"]` (the embedded weights set it) the planner writes
        the first plan as well. The model names the
        right objects in its edit plans far more often than it finds them; its grounding
        finds them (`model/weights/README.md`, "Stop 28" and "Stop 29"). The object is the
        instruction's `the {color} {shape}` for an instruction in the ShapesWorld grammar,
        else the whole instruction; a row whose object grounding does not find keeps its
        first plan. `ground=False`: the model's first plan alone. The
        grounding (in `ground`'s default views) makes a plan ~6x slower on the CPU (0.87 s an
        edit against 0.14 s, batches of 16).

        An instruction in the grammar that takes no object away (add, background) gets no
        `removed` item: the model writes one into most add plans, and it would take an object
        of the scene away. `texts` are the model's plans as written, before snapping and
        this.
        """
        images, instructions = _paired(images, instructions, "instructions")
        if not images:
            return PlanOutput(plans=[], texts=[])
        gens, _ = _generators(seed, generator, len(images), self.device)
        codes = self._encode_images(images)
        exs = [build_edit(self.tokenizer, self.config, ins, im, c, with_plan=True, with_image=False)
               for ins, im, c in zip(instructions, images, codes)]  # fmt: skip
        ids = self._decode_text_ids(
            exs, PLAN_LEN, gens=gens, num_steps=_check_steps(num_steps, 2 * self.defaults["text_steps"]),
            temperature=temperature, allowed=self._text_allowed(), callback=callback,
            interrupt=interrupt, task="plan_edit",
            model=self.edit_planner if self.defaults["edit_planner_first_step"] else None,
        )  # fmt: skip
        objects = [_edit_object(ins) for ins in instructions]
        if ground:
            ids = self._ground_removed(images, objects, exs, ids, gens=gens, temperature=temperature,
                                       callback=callback, interrupt=interrupt)  # fmt: skip
        texts = [self._clean(t) for t in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=False)]
        # an instruction that takes no object away plans none (the model writes some)
        plans = [[it for it in parse_plan(t) if o is not None or it[0] != "removed"] for t, o in zip(texts, objects)]
        return PlanOutput(plans=[snap_edit_plan(p) for p in plans] if snap else plans, texts=texts)

    def _ground_removed(self, images, objects, exs, ids: torch.Tensor, *, gens, temperature, callback,
                        interrupt) -> torch.Tensor:  # fmt: skip
        """`plan_edit`'s second step on its first plans' token ids `(B, PLAN_LEN)`; `objects`:
        each row's `_edit_object`."""
        cfg = self.config
        removed = self.tokenizer.convert_tokens_to_ids("removed")
        ids = ids.cpu().clone()
        items = [plan_item_boxes(row, cfg, removed) for row in ids.tolist()]
        rows = [b for b, its in enumerate(items) if any(r for _, r in its) and objects[b] is not None]
        if not rows:
            return ids
        found = self.ground([images[b] for b in rows], [[objects[b]] for b in rows], sizes=True).boxes
        # a row whose object was not found keeps its first plan: the planner was trained
        # with the removed box shown
        rows, found = [b for b, (box,) in zip(rows, found) if box is not None], [f for (f,) in found if f is not None]
        if not rows:
            return ids
        start = ids[rows].clone()
        for k, (b, box) in enumerate(zip(rows, found, strict=True)):
            first = next(p for p, r in items[b] if r)
            for p, _ in items[b]:
                start[k, p: p + 4] = cfg.mask_token_id
            bins = quantize(box, canvas=cfg.image_size, bins=cfg.num_loc_tokens)
            start[k, first: first + 4] = torch.tensor(bins) + cfg.loc_token_offset
        allowed = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        allowed[self._loc_ids] = True
        ids[rows] = self._decode_text_ids(
            [exs[b] for b in rows], PLAN_LEN, gens=[gens[b] for b in rows], num_steps=None,
            temperature=temperature, allowed=allowed, callback=callback, interrupt=interrupt,
            task="plan_edit_boxes", start=start, model=self.edit_planner,
        ).cpu()  # fmt: skip
        return ids

    def generate(
        self, prompts: Sequence[str], *, plans: Sequence[list[PlanItem] | None] | None = None,
        seed=0, generator=None, num_steps: int | None = None, guidance_scale: float | None = None,
        temperature: float | None = None, order: str | None = None, shift: float | None = None,
        micro_conditions: str = "", callback=None, preview_every: int = 0, interrupt=None,
    ) -> ImageOutput:  # fmt: skip
        """Text-to-image, optionally conditioned on plans (one per prompt, or None).

        Rows without a plan are drawn by `unplanned_model` when the pipeline has one (the
        embedded weights do); a batch that mixes rows with and without a plan then runs in
        two passes, the planned rows first, each calling `callback` with its own `StepInfo.rows`.

        Args:
            prompts: captions.
            plans: a plan per prompt (`plan()` output) or None for direct generation.
            seed: one seed, or one per prompt (ignored when `generator` is given).
            generator: a `torch.Generator` or one per prompt.
            num_steps, guidance_scale, temperature, order: sampler settings (defaults
                from `pipeline_index.json`).
            shift: the schedule shift of every row; by default `shift` for a row with a plan
                and `unplanned_shift` (larger: fewer codes early) for one without.
            callback: called with a `StepInfo` after every step.
            preview_every: decode a preview every k steps (0 = never).
            interrupt: called before each step; True stops with `PipelineInterrupted`.
        """
        prompts = _as_list(prompts)
        plans = _plan_rows(plans, len(prompts))
        gens, seeds = _generators(seed, generator, len(prompts), self.device)
        if not prompts:
            return self._no_images()
        d = self.defaults
        g = d["guidance_scale"] if guidance_scale is None else guidance_scale
        cond = [build_t2i(self.tokenizer, self.config, p, plan=pl, micro_conditions=micro_conditions)
                for p, pl in zip(prompts, plans)]  # fmt: skip
        codes = torch.empty(len(prompts), self.config.image_grid, self.config.image_grid, dtype=torch.long)
        for ix, model, step in _passes([self.unplanned_model if pl is None else None for pl in plans], callback):
            # Plans change the segment count, so CFG rows align by padding on the left only.
            exs, groups = [cond[i] for i in ix], 1
            if g:
                exs = exs + [drop_conditions(e, self.config, prompt=True, source=False) for e in exs]
                groups = 2
            codes[ix] = self._decode_image(
                exs, groups=groups, combine=(lambda lg: (1 + g) * lg[0] - g * lg[1]) if g else (lambda lg: lg[0]),
                start=None, gens=[gens[i] for i in ix], num_steps=_check_steps(num_steps, d["num_steps"]),
                temperature=d["temperature"] if temperature is None else temperature,
                order=order or d["order"], callback=step, preview_every=preview_every,
                interrupt=interrupt, task="generate", model=model,
                shift=shift if shift is not None
                else [d["unplanned_shift" if plans[i] is None else "shift"] for i in ix],
            ).cpu()  # fmt: skip
        return ImageOutput(images=self._decode_codes(codes), codes=codes, plans=list(plans), seeds=seeds)

    def regenerate_regions(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], boxes: Sequence[Sequence[Box]], *,
        plans=None, seed=0, generator=None, num_steps: int | None = None,
        guidance_scale: float | None = None, temperature: float | None = None, order: str | None = None,
        callback=None, preview_every: int = 0, interrupt=None,
    ) -> ImageOutput:  # fmt: skip
        """Re-mask the codes inside `boxes` (pixels) and denoise only them again.

        Masked diffusion can inpaint: codes outside the boxes stay exactly as they were.
        """
        images, prompts = _paired(images, prompts, "prompts")
        n = len(images)
        boxes = _as_list(boxes, n, "boxes")
        plans = _plan_rows(plans, n)
        gens, seeds = _generators(seed, generator, n, self.device)
        if not n:
            return self._no_images()
        cfg, d = self.config, self.defaults
        codes, redrawn = self._mask_boxes(self._encode_images(images), boxes)
        g = d["guidance_scale"] if guidance_scale is None else guidance_scale
        cond = [build_t2i(self.tokenizer, cfg, p, plan=pl) for p, pl in zip(prompts, plans)]
        exs = cond + [drop_conditions(e, cfg, prompt=True, source=False) for e in cond] if g else cond
        out = self._decode_image(
            exs, groups=2 if g else 1,
            combine=(lambda lg: (1 + g) * lg[0] - g * lg[1]) if g else (lambda lg: lg[0]),
            start=codes, gens=gens, num_steps=_check_steps(num_steps, d["num_steps"]),
            temperature=d["temperature"] if temperature is None else temperature,
            order=order or d["order"], callback=callback, preview_every=preview_every,
            interrupt=interrupt, task="regenerate_regions",
            decode=lambda codes: self._keep_outside(images, codes, redrawn),
        )  # fmt: skip
        return ImageOutput(images=self._keep_outside(images, out, redrawn), codes=out.cpu(),
                           plans=list(plans), seeds=seeds)  # fmt: skip

    @torch.no_grad()
    def region_fit(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], boxes: Sequence[Sequence[Box]], *,
        plans: Sequence[list[PlanItem] | None] | None = None, batch_size: int = 32,
    ) -> list[list[float]]:  # fmt: skip
        """How well the prompt (and plan) explains what each box of each image shows.

        For every box: its VQ cells are masked and predicted back from the rest of the image
        twice in one forward, once with the prompt and plan and once with them dropped (the
        CFG row). The score is the difference of the two log-likelihoods of the image's own
        codes in the box, in nats (a pointwise mutual information): high when the conditions
        make what is drawn there likely, negative when they argue against it (a blue circle
        where the plan puts a red one, a faint blob where it puts a square). Deterministic.

        Scores compare the attempts at one prompt and plan (the t2i workflow ranks its
        attempts by the lowest score of their planned objects); across prompts they are not
        calibrated. Cost: one condition pass plus one image pass per `batch_size` boxes.

        Returns:
            One list per image, one score per box.
        """
        images, prompts = _paired(images, prompts, "prompts")
        n = len(images)
        boxes = _as_list(boxes, n, "boxes")
        plans = _plan_rows(plans, n)
        # callers pass one image many times (a candidate per colour): encode each once
        first = {id(im): k for k, im in reversed(list(enumerate(images)))}
        unique = sorted(set(first.values()))
        encoded = dict(zip(unique, self._encode_images([images[k] for k in unique]))) if unique else {}
        codes = [encoded[first[id(im)]] for im in images]
        rows = [(i, box) for i in range(n) for box in boxes[i]]
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            masked, cells = self._mask_boxes([codes[i] for i, _ in chunk], [[box] for _, box in chunk])
            ll = self._predict_back([prompts[i] for i, _ in chunk], [plans[i] for i, _ in chunk],
                                    [codes[i] for i, _ in chunk], masked)  # fmt: skip
            B = len(chunk)
            ll = (ll * torch.from_numpy(cells).reshape(B, -1).repeat(2, 1).to(ll)).sum(1)
            scores += (ll[:B] - ll[B:]).tolist()
        out, k = [], 0
        for i in range(n):
            out.append(scores[k : k + len(boxes[i])])
            k += len(boxes[i])
        return out

    def _predict_back(
        self, prompts: Sequence[str], plans: Sequence[list[PlanItem] | None], codes: Sequence[np.ndarray],
        masked: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Log-likelihood of each row's own `codes` at every cell, predicted from `masked`
        (its codes with some cells masked) in one forward, once with the row's prompt and
        plan and once with them dropped (the CFG row): `(2B, G*G)`, the conditioned rows
        first. Only the masked cells are predictions; the caller picks them."""
        cfg = self.config
        B = len(prompts)
        cond = [build_t2i(self.tokenizer, cfg, p, plan=pl) for p, pl in zip(prompts, plans)]
        exs = cond + [drop_conditions(e, cfg, prompt=True, source=False) for e in cond]
        c, tgt = self._split(exs, cfg.positions_per_image)
        cache = self._forward(**c, use_cache=True, elastic=True).cache
        truth = torch.from_numpy(np.stack(codes)).long().to(self.device)
        logits = self._forward(**tgt, gen_codes=masked.to(self.device).repeat(2, 1, 1), condition_cache=cache,
                               elastic=True).image_logits  # fmt: skip
        logp = torch.log_softmax(logits.float().reshape(2 * B, cfg.image_grid**2, -1), -1)
        return logp.gather(-1, truth.reshape(B, -1).repeat(2, 1)[..., None])[..., 0]

    @torch.no_grad()
    def surprise(
        self, images: Sequence[np.ndarray], prompts: Sequence[str],
        plans: Sequence[list[PlanItem] | None] | None = None, *, batch_size: int = 32,
    ) -> np.ndarray:  # fmt: skip
        """How much the prompt (and plan) argue against each image token, given its
        neighbours.

        Every VQ cell is masked and predicted back from the cells around it (two passes,
        the black and the white cells of a checkerboard, so each cell's four nearest
        neighbours stay visible), with the prompt and plan and with them dropped. A cell's
        score is the difference of the two log-likelihoods of its own code, in nats (the
        pointwise mutual information of `region_fit`, per cell): near zero or positive where
        the image shows what the conditions lead the model to expect (plain background, a
        clean planned shape), strongly negative where they argue against it (a faint blob
        the plan puts nowhere, a shape's ragged edge). Deterministic; two image-pass rows
        per image.

        Returns:
            `(n, G, G)` float scores, one per image token (`image_grid` cells a side).
        """
        images, prompts = _paired(images, prompts, "prompts")
        n = len(images)
        plans = _plan_rows(plans, n)
        G = self.config.image_grid
        black = np.add.outer(np.arange(G), np.arange(G)) % 2 == 0
        codes = self._encode_images(images) if n else []
        rows = [(i, cells) for i in range(n) for cells in (black, ~black)]
        scores = np.zeros((n, G, G))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            masked = torch.from_numpy(np.stack([codes[i] for i, _ in chunk])).long()
            masked[torch.from_numpy(np.stack([cells for _, cells in chunk]))] = self.config.image_mask_code
            ll = self._predict_back([prompts[i] for i, _ in chunk], [plans[i] for i, _ in chunk],
                                    [codes[i] for i, _ in chunk], masked).cpu().numpy()  # fmt: skip
            B = len(chunk)
            for b, (i, cells) in enumerate(chunk):
                scores[i][cells] = (ll[b] - ll[B + b]).reshape(G, G)[cells]
        return scores

    def stray_marks(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], plans: Sequence[list[PlanItem] | None], *,
        threshold: float = STRAY_THRESHOLD, scores: np.ndarray | None = None, batch_size: int = 32,
    ) -> list[list[tuple[Box, float]]]:  # fmt: skip
        """Marks away from the plan that the prompt and plan argue against: a faint blob, a
        smear, a shape nobody asked for. The cells at least one cell away from every planned
        box whose `surprise` is below `threshold`, grouped 8-connected. A row without a plan
        (None) has nothing to compare with and gets no marks. `scores`: the rows' `surprise`
        when the caller has it already (no model call then).

        Returns:
            One list per image of `(box, score)`: each mark's pixel box (its cells) and its
            lowest cell score, lowest first.
        """
        images, prompts = _paired(images, prompts, "prompts")
        plans = _plan_rows(plans, len(images))
        planned = [i for i, plan in enumerate(plans) if plan is not None]
        if scores is None:  # only the rows with a plan are read
            read = self.surprise([images[i] for i in planned], [prompts[i] for i in planned],
                                 [plans[i] for i in planned], batch_size=batch_size)  # fmt: skip
            scores = dict(zip(planned, read))
        cell = self.config.image_size // self.config.image_grid
        out: list[list[tuple[Box, float]]] = [[] for _ in images]
        for i in planned:
            row = scores[i]
            away = ~_dilate(box_cells([box for _, box in plans[i]], self.config))
            for comp in _components(away & (row < threshold)):
                ys, xs = np.nonzero(comp)
                box = (int(xs.min()) * cell, int(ys.min()) * cell, (int(xs.max()) + 1) * cell,
                       (int(ys.max()) + 1) * cell)  # fmt: skip
                out[i].append((box, float(row[comp].min())))
            out[i].sort(key=lambda m: m[1])
        return out

    def _mask_boxes(
        self, codes: Sequence[np.ndarray], boxes: Sequence[Sequence[Box] | None],
        keep: Sequence[Sequence[Box] | None] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
        """Mask every code whose cell overlaps one of the row's boxes (pixels), except the
        cells wholly inside one of its `keep` boxes; a row whose boxes are None is masked
        whole. Returns the codes (B, G, G) and the redrawn cells."""
        for name, rows in (("regions", boxes), ("keep", keep or ())):
            for row in rows:
                if row is not None and not (isinstance(row, (list, tuple, np.ndarray)) and all(
                        isinstance(box, (list, tuple, np.ndarray)) and len(box) == 4 for box in row)):  # fmt: skip
                    raise ValueError(f"{name} hold one list of (x0, y0, x1, y1) boxes per image (or None), got "
                                     f"{row!r}")  # fmt: skip
        cfg = self.config
        codes = torch.from_numpy(np.stack(codes))  # (B, G, G)
        for b, row in enumerate(boxes):
            cells = np.ones(codes.shape[1:], dtype=bool) if row is None else box_cells(row, cfg)
            if row is not None and keep is not None and keep[b]:
                cells &= ~inner_cells(keep[b], cfg)
            codes[b][torch.from_numpy(cells)] = cfg.image_mask_code
        return codes, (codes == cfg.image_mask_code).numpy()

    def _keep_outside(self, images: Sequence[np.ndarray], codes: torch.Tensor, redrawn: np.ndarray) -> list[np.ndarray]:
        """Decode `codes`; pixels outside the redrawn cells are the caller's own, not a VQ
        reconstruction of them."""
        cell = self.config.image_size // self.config.image_grid
        result = []
        for b, image in enumerate(self._decode_codes(codes)):
            keep = ~np.kron(redrawn[b], np.ones((cell, cell), dtype=bool))
            result.append(np.where(keep[..., None], np.asarray(images[b]), image))
        return result

    def edit(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], *, plans=None,
        regions: Sequence[Sequence[Box] | None] | None = None,
        keep: Sequence[Sequence[Box] | None] | None = None, seed=0,
        generator=None, num_steps: int | None = None, guidance_scale: float | None = None,
        image_guidance_scale: float | None = None, temperature: float | Sequence[float] | None = None,
        order: str | None = None, callback=None, preview_every: int = 0, interrupt=None,
    ) -> ImageOutput:  # fmt: skip
        """Instruction-based editing with two- or three-way CFG (FACTS §7).

        `temperature` (one, or one per image) defaults to `temperature` for each row, except
        `background_edit_temperature` for a ShapesWorld background edit (`change the
        background to gray`), which should redraw nothing but one colour.

        Rows: full condition; fully unconditional; with `image_guidance_scale > 0` also a
        source-only row. c = (1 + g_img) full - g_img source_only; out = (1 + g) c - g uncond.

        `regions` (one list of pixel boxes per image, or None for that image) makes an edit
        local: only the codes whose cells overlap the boxes are masked and redrawn, from the
        source's own codes everywhere else, and the pixels outside those cells are the
        source's. Without regions the whole image is redrawn (the model keeps what it can:
        with the shipped weights such a single shot is right 0.20 of the time on the quality
        benchmark, against 0.75 when `plan_edit`'s plan and boxes are passed as `plans` and
        `regions`; the `edit` workflow plans, redraws in regions and verifies).
        `keep` (per image, pixel boxes, with `regions`) spares the cells wholly inside its
        boxes: for a background edit, the region is the canvas and `keep` holds each
        object's `core_box`, so the objects stay where they are while the background changes.

        Rows with neither a plan nor regions (the single shot) are drawn by `edit_model`, rows
        with regions by `edit_region_model`, when the pipeline has them; a batch whose rows
        have different drawers runs in one pass per drawer, each calling `callback` with its
        own `StepInfo.rows`.
        """
        images, instructions = _paired(images, instructions, "instructions")
        n = len(images)
        plans = _plan_rows(plans, n)
        gens, seeds = _generators(seed, generator, n, self.device)
        if keep is not None and regions is None and any(k is not None for k in _as_list(keep)):
            raise ValueError("keep spares cells of the regions: it needs regions")
        if not n:
            return self._no_images()
        cfg, d = self.config, self.defaults
        g = d["guidance_scale"] if guidance_scale is None else guidance_scale
        gi = d["image_guidance_scale"] if image_guidance_scale is None else image_guidance_scale
        src = self._encode_images(images)
        cond = [build_edit(self.tokenizer, cfg, ins, im, c, plan=pl)
                for ins, im, c, pl in zip(instructions, images, src, plans)]  # fmt: skip

        def combine(lg):
            if not g:
                return lg[0]
            c = (1 + gi) * lg[0] - gi * lg[2] if gi else lg[0]
            return (1 + g) * c - g * lg[1]

        start = redrawn = None
        region_rows = [None] * n
        if regions is not None:
            region_rows = _as_list(regions, n, "regions")
            keep_rows = _as_list(keep, n, "keep") if keep is not None else None
            start, redrawn = self._mask_boxes(src, region_rows, keep_rows)
        temperature = (self._edit_temperatures(instructions) if temperature is None
                       else float(temperature) if isinstance(temperature, numbers.Real)
                       else [float(t) for t in _as_list(list(np.asarray(temperature, dtype=float).ravel()), n,
                                                        "temperature (one, or one per image)")])  # fmt: skip
        drawers = [self.edit_region_model if r is not None else self.edit_model if pl is None else None
                   for pl, r in zip(plans, region_rows)]  # fmt: skip
        out = torch.empty(n, cfg.image_grid, cfg.image_grid, dtype=torch.long)
        for ix, model, step in _passes(drawers, callback):
            exs = [cond[i] for i in ix]
            if g:
                exs += [drop_conditions(cond[i], cfg, prompt=True, source=True) for i in ix]
            if g and gi:
                exs += [drop_conditions(cond[i], cfg, prompt=True, source=False) for i in ix]
            out[ix] = self._decode_image(
                exs, groups=len(exs) // len(ix), combine=combine, start=None if start is None else start[ix],
                gens=[gens[i] for i in ix], num_steps=_check_steps(num_steps, d["num_steps"]),
                temperature=[temperature[i] for i in ix] if isinstance(temperature, list) else temperature,
                order=order or d["order"], callback=step, preview_every=preview_every,
                interrupt=interrupt, task="edit", model=model,
                decode=None if redrawn is None else
                (lambda codes, ix=ix: self._keep_outside([images[i] for i in ix], codes, redrawn[ix])),
            ).cpu()  # fmt: skip
        images_out = self._decode_codes(out) if redrawn is None else self._keep_outside(images, out, redrawn)
        return ImageOutput(images=images_out, codes=out.cpu(), plans=list(plans), seeds=seeds)

    def _edit_temperatures(self, instructions: Sequence[str]) -> list[float]:
        """Each edit's default temperature: `background_edit_temperature` for a background
        edit in the ShapesWorld grammar, `temperature` for any other instruction."""
        from lavida_agent.tools.shapes_world.language import GrammarError, parse_edit

        def background(text: str) -> bool:
            try:
                return parse_edit(text).category == "background"
            except GrammarError:
                return False

        d = self.defaults
        return [float(d["background_edit_temperature"] if background(t) else d["temperature"])
                for t in instructions]  # fmt: skip

    @torch.no_grad()
    def ground(
        self, images: Sequence[np.ndarray], expressions: Sequence[Sequence[str]], *, num_steps: int | None = None,
        candidates: int | None = None, views: int | None = None, sizes: bool | None = None,
    ) -> GroundingOutput:  # fmt: skip
        """Locate every expression: all boxes of the batch are filled together (FACTS §5).

        Each forward fills every still-masked coordinate; then, per expression, the most
        confident of them is kept and the rest are masked again, so the later coordinates
        of a box are read knowing the earlier ones (and stay on the same object: four
        independent argmaxes mixed two objects' edges, or crossed, in a quarter of the
        shipped model's boxes). A kept coordinate bounds its partner (x1 > x0, y1 > y0).
        `num_steps=1` is the single-forward grand mode: every coordinate at once.

        Two reads propose more than one box per expression; for an expression in the
        ShapesWorld grammar the box kept is then the candidate its head noun explains best
        (`noun_fit`: `region_fit` of `a {color} {shape}` planned at the box) when it fits
        more than `RERANK_MARGIN` nats better than the first candidate, else the first.
        Grounding's own likelihood does not tell a purple square from the purple circle next
        to it; the drawing side of the model does (`model/weights/README.md`, "Stop 17").

        - `views=V > 1` (the default, `pipeline_index.json`'s `ground_views`): the image is
          read greedily in the first V of `GROUND_VIEWS` (mirrored, moved a few pixels; one
          batch), each box is mapped back, and the candidates are the distinct boxes found,
          the one most views agree on first. The model's mistakes differ from view to view:
          some view nearly always finds the right object, and its noun tells which (README,
          "Stop 22").
        - `candidates=K > 1`: the image as given, every row decoded K times in the same
          forwards: branch k starts from the k-th highest peak of the first (most
          confident) coordinate, peaks at least `CANDIDATE_SPREAD` bins apart, and completes
          greedily (a branch without a peak of its own repeats branch 0, the greedy box).

        - `sizes=True` (None: `pipeline_index.json`'s `ground_sizes`; the embedded weights
          set it): an expression in the grammar that names neither a size, a side nor a
          relation (`the red square`) is also read as each of its sized forms (`the small red
          square`, `the large red square`), in the same batch and the same way, and their
          candidates follow its own (with their votes). The model's read of an unsized noun
          leans to the larger of two look-alikes (`the red square` found on a large blue
          square beside a small red one); a size word pulls it off, and the rerank keeps the
          box the noun fits. On the 160 object edits of tuning seeds 124-127 (default
          views) the named object is found 157 times, against 138 without
          (`model/weights/README.md`, "Stop 35"). `plan_edit` and the edit agent's plan
          ground the objects of an edit this way.

        With neither given (nor `num_steps=1`, which reads the image alone, greedily) the
        default read applies; `candidates` alone reads the image as given (`candidates=1`:
        the greedy decode alone), `views` alone reads it greedily in each view. Both above 1
        is an error.

        Args:
            images: one image per request.
            expressions: the expressions of each request (each gets one box).
            num_steps: forwards, 1 to 4 (default `pipeline_index.json`'s `ground_steps`, 4);
                with candidates, 2 to 4 (the first forward only chooses the branches; a
                default of 1 becomes 2).
            candidates: boxes decoded per expression (K >= 1; None: see above, or 1 with
                `num_steps=1`).
            views: views the image is read in (1 to `len(GROUND_VIEWS)`; None: see above).

        Returns:
            `boxes` (the kept box of each expression), `candidates` (every candidate, the
            first one first) and, with views, `votes` (how many views found each candidate).
        """
        if not isinstance(images, (list, tuple)) and isinstance(expressions, (list, tuple)) \
                and all(isinstance(e, str) for e in expressions):  # fmt: skip
            expressions = [list(expressions)]  # one image, several expressions
        images = _as_list(images)
        expressions = [list(e) if not isinstance(e, str) else [e]
                       for e in _as_list(expressions, len(images), "expressions (one list per image)")]  # fmt: skip
        if not images:
            return GroundingOutput(boxes=[])
        d = self.defaults
        if views is None:
            views = d["ground_views"] if candidates is None and num_steps != 1 else 1
        V = int(views)
        if not 1 <= V <= len(GROUND_VIEWS):
            raise ValueError(f"views must be 1 to {len(GROUND_VIEWS)}, got {views}")
        if candidates is None:
            candidates = 1 if V > 1 or num_steps == 1 else d["ground_candidates"]
        K = int(candidates)
        if K < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if K > 1 and V > 1:
            raise ValueError(f"read with candidates or with views, not both (got candidates={K}, views={V})")
        steps = _check_steps(num_steps, max(d["ground_steps"], 1 if K == 1 else 2))
        if not (1 if K == 1 else 2) <= steps <= 4:
            raise ValueError(f"num_steps must be {1 if K == 1 else 2} to 4 for a 4-coordinate box "
                             f"with {K} candidate(s), got {steps}")  # fmt: skip
        # each expression's readings: itself, then (with sizes) its sized forms
        sizes = d["ground_sizes"] if sizes is None else sizes
        forms = [[_sized_forms(e) if sizes else [e] for e in ex] for ex in expressions]
        flat = [[t for f in row for t in f] for row in forms]
        at = [[range(end - len(f), end) for f, end in zip(row, itertools.accumulate(map(len, row)))] for row in forms]
        if V == 1:
            kept_f, cands_f = self._read_boxes(images, flat, K, steps)
            cands = [[[b for f in fs for b in cands_f[i][f]] for fs in row] for i, row in enumerate(at)]
            kept = [[next((kept_f[i][f] for f in fs if kept_f[i][f] is not None), None) for fs in row]
                    for i, row in enumerate(at)]  # fmt: skip
            votes: list[list[list[int]]] = []
        else:
            shown = GROUND_VIEWS[:V]
            read, _ = self._read_boxes([_view_image(self._check_image(im), v) for im in images for v in shown],
                                       [[_view_text(e, v) for e in ex] for ex in flat for v in shown],
                                       1, steps)  # fmt: skip
            size = self.config.image_size
            agreed = [[_agreed([_unview_box(read[i * V + j][f], v, size) for j, v in enumerate(shown)])
                       for f in range(len(ex))] for i, ex in enumerate(flat)]  # fmt: skip
            cands = [[[b for f in fs for b in agreed[i][f][0]] for fs in row] for i, row in enumerate(at)]
            votes = [[[n for f in fs for n in agreed[i][f][1]] for fs in row] for i, row in enumerate(at)]
            kept = [[c[0] if c else None for c in row] for row in cands]
        if K > 1 or V > 1 or sizes:
            self._rerank(images, expressions, cands, kept)
        return GroundingOutput(boxes=kept, candidates=cands, votes=votes)

    def _read_boxes(self, images, expressions, K: int, steps: int) -> tuple[list[list[Box | None]], list]:
        """Decode every expression's box (K branches each); returns the greedy boxes and,
        per image and expression, all K."""
        exs = [build_ground(self.tokenizer, self.config, self._check_image(im), ex)
               for im, ex in zip(images, expressions) for _ in range(K)]  # fmt: skip
        batch = pack(exs, self.config, pad_left=True).to(self.device)
        inputs = batch.model_inputs()
        ids = inputs["input_ids"].clone()
        loc = self._loc_ids.to(self.device)
        n_bins = len(loc)
        bins_of = torch.arange(n_bins, device=self.device)
        # per row: (n_expr, 4) positions of the coordinate slots, and the bins chosen so far
        slots = [(ids[r] == self.config.mask_token_id).nonzero().squeeze(1).view(-1, 4) for r in range(len(exs))]
        chosen = [torch.full(s.shape, -1, dtype=torch.long, device=self.device) for s in slots]
        for step in range(steps):
            logits = self._forward(**{**inputs, "input_ids": ids}).text_logits
            for r, pos in enumerate(slots):
                if pos.numel() == 0:
                    continue
                logp = torch.log_softmax(logits[r, pos.flatten()][:, loc].float(), -1).view(*pos.shape, n_bins)
                known = chosen[r]  # -1 where not kept yet
                # a kept coordinate bounds its partner: x0 < x1, y0 < y1 (an unknown low end
                # is -1 and an unknown high end counts as n_bins: no bound)
                for lo_i, hi_i in ((0, 2), (1, 3)):
                    lo = known[:, lo_i, None]
                    hi = known[:, hi_i, None].where(known[:, hi_i, None] >= 0, n_bins)
                    logp[:, hi_i] = logp[:, hi_i].masked_fill(bins_of <= lo, -math.inf)
                    logp[:, lo_i] = logp[:, lo_i].masked_fill(bins_of >= hi, -math.inf)
                best, arg = logp.max(-1)  # (n_expr, 4)
                open_ = known < 0
                if step == steps - 1:
                    keep = open_
                else:
                    # the most confident open coordinate of each expression
                    pick = best.masked_fill(~open_, -math.inf).argmax(-1)
                    keep = torch.zeros_like(open_).scatter_(1, pick[:, None], True) & open_
                    if step == 0 and r % K:  # branch k > 0: that coordinate's k-th peak
                        arg = arg.clone()
                        for e, c in enumerate(pick.tolist()):
                            arg[e, c] = _kth_peak(logp[e, c], r % K, CANDIDATE_SPREAD)
                known[keep] = arg[keep]
                ids[r, pos[keep]] = loc[arg[keep]]
        scale = self.config.image_size / (self.config.num_loc_tokens - 1)
        rows = []
        for known in chosen:
            boxes = []
            for q in known.tolist():
                x0, y0, x1, y1 = (v * scale for v in q)
                boxes.append((round(x0), round(y0), round(x1), round(y1)) if x1 > x0 and y1 > y0 else None)
            rows.append(boxes)
        greedy = rows[::K]
        cands = [[[rows[i * K + k][e] for k in range(K)] for e in range(len(greedy[i]))] for i in range(len(greedy))]
        return [list(row) for row in greedy], cands

    def _rerank(self, images, expressions, cands, kept) -> None:
        """Replace a greedy box in `kept` by the candidate its expression's head noun fits
        more than `RERANK_MARGIN` nats better (one `noun_fit` call for the whole batch)."""
        from lavida_agent.tools.shapes_world.language import GrammarError, parse_refexp

        asks = []  # (row, expression index, distinct boxes, noun)
        for i, row in enumerate(expressions):
            for e, text in enumerate(row):
                boxes = list(dict.fromkeys(b for b in cands[i][e] if b is not None))
                if len(boxes) < 2 or kept[i][e] is None:
                    continue
                try:
                    noun = parse_refexp(text).noun
                except GrammarError:
                    continue
                asks.append((i, e, boxes, noun))
        if not asks:
            return
        fits = self.noun_fit([images[i] for i, *_ in asks], [(n.shape, n.color, n.size) for *_, n in asks],
                             [boxes for _, _, boxes, _ in asks])  # fmt: skip
        for (i, e, boxes, _), scores in zip(asks, fits):
            g = boxes.index(kept[i][e])
            best = max(range(len(boxes)), key=lambda k: (scores[k], -k))
            if scores[best] > scores[g] + RERANK_MARGIN:
                kept[i][e] = boxes[best]

    @torch.no_grad()
    def noun_fit(
        self, images: Sequence[np.ndarray], nouns: Sequence[tuple[str, str | None, str | None]],
        boxes: Sequence[Sequence[Box]], *, contrast: bool = False,
    ) -> list[list[float]]:  # fmt: skip
        """How well a noun explains each box: `region_fit` of `a {color} {shape}` planned as
        `{size} {color} {shape}` on a square of its size class centred on the box.

        A noun is `(shape, color or None, size or None)`. A missing size comes from the
        box's side; a missing colour is every colour, and the best of them counts. One
        `region_fit` call for all rows.

        `contrast=True` scores the noun against its neighbours instead: its fit minus the
        best fit of a noun one word away (the same colour in another shape, or the same
        shape in another colour; without a colour, any other shape). Positive when the
        model reads the named object in the box rather than a look-alike: a test of what
        is drawn there, comparable across boxes and images. Costs 9 rows a box (24 without
        a colour) against 1 (6).

        Returns:
            One list per image, one score per box.
        """
        from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES, SIZES, size_class

        canvas = self.config.image_size
        unit = canvas / 64  # ShapesWorld sizes are in 64 px canvas units
        rows = []  # (image index, box index, is the noun itself, prompt, plan item)
        for i, ((shape, color, size), row) in enumerate(zip(nouns, boxes)):
            named = [(shape, c) for c in ([color] if color else COLORS)]
            if not contrast:
                rivals = []
            elif color:
                rivals = [(s, color) for s in SHAPES if s != shape] + [(shape, c) for c in COLORS if c != color]
            else:
                rivals = [(s, c) for s in SHAPES if s != shape for c in COLORS]
            for k, (x0, y0, x1, y1) in enumerate(row):
                side = max(x1 - x0, y1 - y0) / unit
                sz = size or size_class(int(round(side))) or ("small" if side < 16 else "large")
                lo, hi = SIZES[sz]
                s = round(min(hi, max(lo, round(side))) * unit)
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                bx, by = min(max(round(cx - s / 2), 0), canvas - s), min(max(round(cy - s / 2), 0), canvas - s)
                square = (bx, by, bx + s, by + s)
                for own, pairs in ((True, named), (False, rivals)):
                    for sh, c in pairs:
                        rows.append((i, k, own, f"a {c} {sh}", (f"{sz} {c} {sh}", square)))
        best = {True: [[-math.inf] * len(row) for row in boxes], False: [[-math.inf] * len(row) for row in boxes]}
        if rows:
            scores = self.region_fit([images[i] for i, *_ in rows], [p for *_, p, _ in rows],
                                     [[item[1]] for *_, item in rows], plans=[[item] for *_, item in rows])  # fmt: skip
            for (i, k, own, *_), (score,) in zip(rows, scores):
                best[own][i][k] = max(best[own][i][k], score)
        if not contrast:
            return best[True]
        return [[a - b for a, b in zip(mine, rival)] for mine, rival in zip(best[True], best[False])]

    def understand(
        self, images: Sequence[np.ndarray], questions: Sequence[str], *, num_steps: int | None = None,
        seed=0, generator=None, temperature: float = 0.0, callback=None, interrupt=None,
    ) -> TextOutput:  # fmt: skip
        """Answer questions about images (and captions for `describe the image.`), with
        `reader`'s answer-side weights when the pipeline has them."""
        images, questions = _paired(images, questions, "questions")
        gens, _ = _generators(seed, generator, len(images), self.device)
        texts: list[str] = [""] * len(images)
        # Captions and short answers have different slot lengths: one batched pass each
        # (with several, each callback tags its `StepInfo` with the rows it advances).
        lengths = [answer_length(q) for q in questions]
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            step = callback
            if callback is not None and len(set(lengths)) > 1:
                step = lambda info, rows=rows: callback(replace(info, rows=list(rows)))  # noqa: E731
            exs = [build_understand(self.tokenizer, self.config, self._check_image(images[i]), questions[i])
                   for i in rows]  # fmt: skip
            out = self._decode_text(
                exs, length, gens=[gens[i] for i in rows],
                num_steps=_check_steps(num_steps, self.defaults["text_steps"]), temperature=temperature,
                allowed=self._text_allowed(words_only=True), callback=step, interrupt=interrupt,
                task="understand", model=self.reader,
            )  # fmt: skip
            for i, text in zip(rows, out):
                texts[i] = text
        return TextOutput(texts=texts)

    def critique(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], *, num_steps: int | None = None,
        seed=0, generator=None, callback=None, interrupt=None,
    ) -> CritiqueOutput:  # fmt: skip
        """The model's own verdict: does each image match its prompt, and what is wrong."""
        from lavida_agent.tools.shapes_world.language import parse_verdict

        images, prompts = _paired(images, prompts, "prompts")
        if not images:
            return CritiqueOutput(ok=[], reasons=[], texts=[])
        gens, _ = _generators(seed, generator, len(images), self.device)
        exs = [build_critique(self.tokenizer, self.config, self._check_image(im), p)
               for im, p in zip(images, prompts)]  # fmt: skip
        # Verdict first: `yes`/`no` is decided from the image and prompt alone, then the
        # reasons follow it. Left to confidence order, content words are committed first and
        # force a `no` (the shipped model rejected every image; see issue 4's notes).
        texts = self._decode_text(
            exs, CRITIQUE_LEN, gens=gens, num_steps=_check_steps(num_steps, self.defaults["text_steps"]),
            temperature=0.0, allowed=self._text_allowed(), callback=callback, interrupt=interrupt,
            task="critique", first_choices=self.tokenizer.convert_tokens_to_ids(["yes", "no"]),
        )  # fmt: skip
        ok, reasons = [], []
        for t in texts:
            try:
                verdict, why = parse_verdict(t)
            except ValueError:  # the verdict word was decided first; only the reasons are garbled
                verdict, why = (t.split()[0].rstrip(":") == "yes" if t.split() else False), []
                if not verdict:  # keep the reasons that parse (the text stays in `texts`)
                    try:
                        why = parse_verdict(t, lenient=True)[1]
                    except ValueError:
                        pass
                    why = why or [f"unparsable critique: {t!r}"]
            ok.append(verdict)
            reasons.append(list(why))
        return CritiqueOutput(ok=ok, reasons=reasons, texts=texts)
