"""Task formats: token sequences, segments and targets for every task, and their parsers.

Training and inference build sequences with the same functions, so the model always sees
one format. A sequence is a list of *segments*; with one-way attention a position sees
only its own and earlier segments (DESIGN.md "condition caching"):

    t2i         [0] <user> {t2i template} <assistant>  [1] plan?  [last] <img_gen> x P
    plan        [0] <user> {t2i template} <assistant>  [1] plan  (the t2i prefix, no image)
    edit        [0] <user> <img_enc> x T <img_src> x P {edit template} <assistant>
                [1] plan?  [last] <img_gen> x P
    ground      [0] <user> <img_enc> x T {ground template} <assistant>
                [1] (<box_p> expr </box_p> <LOC_BEGIN> x0 y0 x1 y1 <LOC_END>) per expression
    understand  [0] <user> <img_enc> x T {question} <assistant>  [1] answer + [EOS] padding
    critique    [0] <user> <img_enc> x T {critique template} <assistant>  [1] verdict + [EOS]

Plans are `<box_p> label </box_p> <LOC_BEGIN> <LOC_x0> <LOC_y0> <LOC_x1> <LOC_y1> <LOC_END>`
per object (FACTS §5, §6.1) with 65 location bins over the 64 px canvas, then [EOS]
padding to a fixed length: masked diffusion learns the answer length by filling the tail
with [EOS] (FACTS §3.2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from lavida_agent import prompts
from lavida_agent.tools.boxes import dequantize, quantize

from .modeling_vq import images_to_tensor
from .tokenization_lavida import clean_decoded, loc_token

__all__ = [
    "ANSWER_LEN",
    "CAPTION_LEN",
    "answer_length",
    "CRITIQUE_LEN",
    "PLAN_LEN",
    "Example",
    "PlanItem",
    "SequenceBuilder",
    "box_cells",
    "inner_cells",
    "build_critique",
    "build_edit",
    "build_ground",
    "build_t2i",
    "build_understand",
    "drop_conditions",
    "pack",
    "parse_boxes",
    "plan_item_boxes",
    "parse_plan",
    "plan_text",
    "snap_plan",
]

PLAN_LEN = 48  # 4 objects x 11 tokens (`<box_p> small red circle </box_p> ...`) + [EOS] tail
ANSWER_LEN = 6  # answers to questions: at most `a {color} {shape}` or `nothing`, + [EOS] tail
CAPTION_LEN = 28  # longest canonical caption is 23 words/punctuation + [EOS] tail
CRITIQUE_LEN = 16
CANVAS = 64

PlanItem = tuple[str, tuple[int, int, int, int]]  # (label, (x0, y0, x1, y1)) in pixels


@dataclass
class Example:
    """One unpadded sequence with its image tensors and targets.

    Attributes:
        input_ids: token ids with placeholders at image positions.
        segment_ids: segment of each position.
        text_targets: the true token at every *target* text position (-100 elsewhere).
            Masking decides which of them the model must predict.
        gen_codes: VQ grids (G, G) for every `img_gen`/`img_src` run, in order.
        gen_is_target: for each entry of `gen_codes`, whether it is an `img_gen` slot.
        images: RGB uint8 (H, W, 3) images for every `img_enc` run, in order.
        task: task name, for logging and per-task metrics.
        loc_only: mask only location tokens among text targets (grounding).
    """

    input_ids: list[int] = field(default_factory=list)
    segment_ids: list[int] = field(default_factory=list)
    text_targets: list[int] = field(default_factory=list)
    gen_codes: list[np.ndarray] = field(default_factory=list)
    gen_is_target: list[bool] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    task: str = ""
    loc_only: bool = False
    # Edit rows: the VQ cells the edit touches (`box_cells` of the edit plan's boxes), or
    # None; read by `training.add_noise` to train the pipeline's local (region) redraw.
    edit_region: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def target_positions(self) -> list[int]:
        return [i for i, t in enumerate(self.text_targets) if t != -100]


_SPECIAL_OR_TEXT = re.compile(r"<[^<>\s]+>|[^<]+|<")


class SequenceBuilder:
    """Append text, plans and images segment by segment into an `Example`."""

    def __init__(self, tokenizer, config, task: str):
        self.tok = tokenizer
        self.cfg = config
        self.ex = Example(task=task)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, lower-cased except for `<...>` special tokens (`<LOC_12>`)."""
        text = _SPECIAL_OR_TEXT.sub(lambda m: m.group(0) if m.group(0).startswith("<") else m.group(0).lower(), text)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def tokens(self, ids: list[int], segment: int, target: bool = False) -> SequenceBuilder:
        self.ex.input_ids += ids
        self.ex.segment_ids += [segment] * len(ids)
        self.ex.text_targets += list(ids) if target else [-100] * len(ids)
        return self

    def text(self, text: str, segment: int, target: bool = False) -> SequenceBuilder:
        return self.tokens(self.encode(text), segment, target)

    def padded_answer(self, text: str | None, length: int, segment: int) -> SequenceBuilder:
        """A target answer of exactly `length` tokens: the words, then [EOS] padding.

        With `text=None` (inference) every position is the mask token.
        """
        if text is None:
            return self.tokens([self.cfg.mask_token_id] * length, segment)
        ids = self.encode(text)[: length - 1]
        ids = ids + [self.cfg.eos_token_id] * (length - len(ids))
        return self.tokens(ids, segment, target=True)

    def enc_image(self, image: np.ndarray, segment: int) -> SequenceBuilder:
        n = self.cfg.vision_tokens_per_image
        self.ex.images.append(image)
        return self.tokens([self.cfg.img_enc_token_id] * n, segment)

    def gen_image(self, codes: np.ndarray | None, segment: int, target: bool) -> SequenceBuilder:
        """An image in the gen branch: a target (`img_gen`) or an edit source (`img_src`).

        `codes=None` (a target at inference) means fully masked.
        """
        G = self.cfg.image_grid
        if codes is None:
            codes = np.full((G, G), self.cfg.image_mask_code, dtype=np.int64)
        placeholder = self.cfg.img_gen_token_id if target else self.cfg.img_src_token_id
        self.ex.gen_codes.append(np.asarray(codes, dtype=np.int64))
        self.ex.gen_is_target.append(target)
        return self.tokens([placeholder] * self.cfg.positions_per_image, segment)

    def build(self) -> Example:
        return self.ex


# ----------------------------------------------------------------------------- plans


def plan_text(items: list[PlanItem], canvas: int = CANVAS) -> str:
    """`[("red circle", (4, 4, 16, 16))]` -> `"<box_p> red circle </box_p> <LOC_BEGIN> ..."`."""
    parts = []
    for label, box in items:
        q = quantize(box, canvas=canvas)
        locs = " ".join(loc_token(v) for v in q)
        parts.append(f"<box_p> {label} </box_p> <LOC_BEGIN> {locs} <LOC_END>")
    return " ".join(parts)


_ITEM_RE = re.compile(
    r"<box_p>\s*(?P<label>[^<]*?)\s*</box_p>\s*<LOC_BEGIN>\s*"
    r"<LOC_(\d+)>\s*<LOC_(\d+)>\s*<LOC_(\d+)>\s*<LOC_(\d+)>\s*<LOC_END>"
)


def parse_plan(text: str, canvas: int = CANVAS) -> list[PlanItem]:
    """Parse plan text back into `(label, box)` items; malformed fragments are skipped."""
    items = []
    for m in _ITEM_RE.finditer(text):
        q = tuple(int(v) for v in m.groups()[1:])
        if q[2] <= q[0] or q[3] <= q[1] or max(q) > canvas:  # an empty or inverted box
            continue
        x0, y0, x1, y1 = dequantize(q, canvas=canvas).as_tuple()
        items.append((clean_decoded(m.group("label")), (int(x0), int(y0), int(x1), int(y1))))
    return items


def snap_plan(items: list[PlanItem], canvas: int = CANVAS) -> list[PlanItem]:
    """Plan items with a layout the world can hold (SHAPES_WORLD.md): every box square, its
    side in the range of the label's size word (`SIZES`; the box's mean side for a label
    without one), inside the canvas with `MARGIN`, and `MIN_GAP` apart from every other box.
    Labels are kept as they are.

    The model writes the four coordinates of a box in parallel, and each box without sight
    of the others' final values, so it can plan a 2 x 20 px "large" circle, or two boxes on
    top of each other; the drawer turns either into a blob. Boxes are first squared about
    their centres, then every overlapping pair is pushed apart along the axis that needs
    the shorter move, each away from the other's centre (so the order of the centres along
    that axis, hence every left/right/above/below relation between the two, is kept), until
    none overlap; a layout too crowded to separate keeps its last positions. This is the
    world's layout grammar applied to the output, as a constrained decoder would.
    """
    from lavida_agent.tools.shapes_world.scene import MARGIN, MIN_GAP, SIZES

    hi_side = canvas - 2 * MARGIN
    boxes = []  # [x, y, side], whole pixels
    for label, (x0, y0, x1, y1) in items:
        size = next((w for w in str(label).split() if w in SIZES), None)
        lo, hi = SIZES[size] if size else (1, hi_side)
        side = int(round(min(max((x1 - x0 + y1 - y0) / 2, lo), hi)))
        boxes.append([int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2)), side])

    def clamp(b: list[int]) -> None:
        for k in (0, 1):
            b[k] = min(max(b[k], MARGIN), canvas - MARGIN - b[2])

    def part(first: list[int], second: list[int], k: int, n: int) -> None:
        """Move `first` down and `second` up axis `k` by `n` together, half each; what a
        wall stops one of them from moving, the other moves (as far as its own wall lets)."""
        room_first, room_second = first[k] - MARGIN, canvas - MARGIN - second[2] - second[k]
        down = min(room_first, max(n // 2, n - room_second))
        first[k] -= down
        second[k] += min(room_second, n - down)

    for b in boxes:
        clamp(b)
    for _ in range(32):  # sweeps: a feasible layout of <= 4 boxes settles in a few
        moved = False
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                needs = []  # (pixels to part on axis k, k, the box whose centre comes first)
                for k in (0, 1):
                    first, second = (a, b) if 2 * a[k] + a[2] <= 2 * b[k] + b[2] else (b, a)
                    needs.append((first[k] + first[2] + MIN_GAP - second[k], k, first, second))
                n, k, first, second = min(needs, key=lambda t: t[0])
                if n > 0:
                    part(first, second, k, n)
                    moved = True
        if not moved:
            break
    return [(label, (x, y, x + side, y + side)) for (label, _), (x, y, side) in zip(items, boxes)]


def snap_edit_plan(items: list[PlanItem], canvas: int = CANVAS) -> list[PlanItem]:
    """An edit plan (`training.touched_plan`'s format) with each object it produces snapped
    alone (`snap_plan`: a square of its size word's side about the box's centre, inside the
    canvas). `removed` items stay as they are (no size word to snap to), and produced
    objects are not parted from them: a recolour's two items share one box."""
    return [item if item[0] == "removed" else snap_plan([item], canvas)[0] for item in items]


def plan_item_boxes(ids, config, removed_id: int) -> list[tuple[int, bool]]:
    """`(position of its first coordinate, is it a removed item)` of each item of a plan in
    token ids: `<box_p> label </box_p> <LOC_BEGIN> x0 y0 x1 y1 <LOC_END>`, an edit plan's
    taken-away object labelled with the one token `removed_id` (`training.touched_plan`).
    Training's masks and `plan_edit`'s second step find the items the same way."""
    ids = list(ids)
    removed = [config.box_start_token_id, removed_id, config.box_end_token_id]
    return [(p + 1, ids[p - 3 : p] == removed) for p, t in enumerate(ids)
            if t == config.loc_begin_token_id and 3 <= p and p + 4 < len(ids)]  # fmt: skip


def box_cells(boxes, config) -> np.ndarray:
    """`(G, G)` bool: the VQ cells that overlap any of the pixel boxes `(x0, y0, x1, y1)`.

    The pipeline's region edit masks (and redraws) exactly these cells; training masks them
    for the same state (`training.add_noise`).
    """
    G, cell = config.image_grid, config.image_size // config.image_grid
    cells = np.zeros((G, G), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        gx0, gy0 = max(0, int(x0) // cell), max(0, int(y0) // cell)
        gx1, gy1 = min(G, -(-int(x1) // cell)), min(G, -(-int(y1) // cell))
        cells[gy0:gy1, gx0:gx1] = True
    return cells


def inner_cells(boxes, config) -> np.ndarray:
    """`(G, G)` bool: the VQ cells that lie wholly inside one of the pixel boxes.

    With `shapes_world.render.core_box` boxes: the cells that show an object alone, which
    an edit that keeps the object (a background edit) need not redraw.
    """
    G, cell = config.image_grid, config.image_size // config.image_grid
    cells = np.zeros((G, G), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        gx0, gy0 = max(0, math.ceil(x0 / cell)), max(0, math.ceil(y0 / cell))
        gx1, gy1 = min(G, math.floor(x1 / cell)), min(G, math.floor(y1 / cell))
        cells[gy0:gy1, gx0:gx1] = True
    return cells


def parse_boxes(text: str, canvas: int = CANVAS) -> list[tuple[int, int, int, int] | None]:
    """Boxes of every `<LOC_BEGIN> .. <LOC_END>` group in order (None for a malformed one)."""
    out: list[tuple[int, int, int, int] | None] = []
    for group in re.findall(r"<LOC_BEGIN>(.*?)<LOC_END>", text):
        q = [int(v) for v in re.findall(r"<LOC_(\d+)>", group)]
        if len(q) != 4 or q[2] <= q[0] or q[3] <= q[1] or max(q) > canvas:
            out.append(None)
            continue
        b = dequantize(tuple(q), canvas=canvas).as_tuple()
        out.append(tuple(int(round(v)) for v in b))
    return out


# ----------------------------------------------------------------------------- builders


def _prefix(b: SequenceBuilder, template: str, images: list[np.ndarray] = (), **values) -> None:
    b.tokens([b.tok.convert_tokens_to_ids("<user>")], 0)
    for image in images:
        b.enc_image(image, 0)
    b.text(prompts.render(template, **values), 0)
    b.tokens([b.tok.convert_tokens_to_ids("<assistant>")], 0)


def _plan_segment(b: SequenceBuilder, plan, *, plan_is_target: bool, with_plan: bool) -> int:
    """Append the plan segment (1) when there is one; returns the image's segment index.

    A given plan is a condition; `plan_is_target` makes it a training target; `with_plan`
    without a plan leaves a masked slot for the model to fill.
    """
    if not with_plan and plan is None:
        return 1
    if plan is None:
        b.padded_answer(None, PLAN_LEN, 1)
    elif plan_is_target:
        b.padded_answer(plan_text(plan), PLAN_LEN, 1)
    else:
        ids = b.encode(plan_text(plan))
        if len(ids) > PLAN_LEN - 1:
            raise ValueError(f"a plan of {len(plan)} items takes {len(ids)} tokens; the model reads at most "
                             f"{PLAN_LEN - 1} (four items like 'small red circle')")  # fmt: skip
        b.tokens(ids + [b.cfg.eos_token_id] * (PLAN_LEN - len(ids)), 1)
    return 2


def build_t2i(
    tokenizer,
    config,
    prompt: str,
    *,
    codes: np.ndarray | None = None,
    plan: list[PlanItem] | None = None,
    plan_is_target: bool = False,
    with_plan: bool = False,
    with_image: bool = True,
    micro_conditions: str = "",
) -> Example:
    """Text-to-image (optionally with a plan), or plan-only when `with_image=False`.

    Args:
        prompt: the caption.
        codes: the target image's VQ codes (training) or None (fully masked, inference).
        plan: plan items; with `plan_is_target` they are a training target, otherwise a
            given condition. `with_plan=True` and `plan=None` leaves a masked plan slot.
        micro_conditions: universal text conditioning, `"KEY : value;"` text.
    """
    b = SequenceBuilder(tokenizer, config, "t2i" if with_image else "plan")
    caption = f"{prompt} {micro_conditions}".strip()
    _prefix(b, "task_t2i", caption=caption)
    seg = _plan_segment(b, plan, plan_is_target=plan_is_target, with_plan=with_plan)
    if with_image:
        b.gen_image(codes, seg, target=True)
    return b.build()


def build_edit(
    tokenizer,
    config,
    instruction: str,
    source_image: np.ndarray,
    source_codes: np.ndarray,
    *,
    codes: np.ndarray | None = None,
    plan: list[PlanItem] | None = None,
    plan_is_target: bool = False,
    with_plan: bool = False,
    with_image: bool = True,
) -> Example:
    """Image editing: the source enters twice (encoder features in und, VQ codes in gen)."""
    b = SequenceBuilder(tokenizer, config, "edit" if with_image else "edit_plan")
    b.tokens([b.tok.convert_tokens_to_ids("<user>")], 0)
    b.enc_image(source_image, 0)
    b.gen_image(source_codes, 0, target=False)
    b.text(prompts.render("task_edit", instruction=instruction), 0)
    b.tokens([b.tok.convert_tokens_to_ids("<assistant>")], 0)
    seg = _plan_segment(b, plan, plan_is_target=plan_is_target, with_plan=with_plan)
    if with_image:
        b.gen_image(codes, seg, target=True)
    return b.build()


def build_ground(
    tokenizer,
    config,
    image: np.ndarray,
    expressions: list[str],
    boxes: list[tuple[int, int, int, int]] | None = None,
) -> Example:
    """Grounding of several expressions at once: only the location tokens are unknown.

    The answer skeleton names every expression; its 4 location tokens are targets
    (training) or masks (inference), so one forward fills every box (FACTS §5 grand mode).
    """
    b = SequenceBuilder(tokenizer, config, "ground")
    _prefix(b, "task_ground", images=[image])
    mask = config.mask_token_id
    for i, expr in enumerate(expressions):
        b.tokens([b.tok.convert_tokens_to_ids("<box_p>")], 1)
        b.text(expr, 1)
        b.tokens([b.tok.convert_tokens_to_ids(t) for t in ("</box_p>", "<LOC_BEGIN>")], 1)
        if boxes is None:
            b.tokens([mask] * 4, 1)
        else:
            q = quantize(boxes[i], canvas=CANVAS)
            b.tokens([b.tok.convert_tokens_to_ids(loc_token(v)) for v in q], 1, target=True)
        b.tokens([b.tok.convert_tokens_to_ids("<LOC_END>")], 1)
    ex = b.build()
    ex.loc_only = True
    return ex


def answer_length(question: str) -> int:
    """Answer slot length: a question of the ShapesWorld grammar other than the caption
    (`describe the image.`) gets a short slot, anything else, the caption and text outside
    the grammar (`please describe the image.`), the caption's long one.

    A short slot keeps the [EOS] padding from drowning the answer's training signal; a
    question outside the grammar may want more than a word or two.
    """
    from lavida_agent.tools.shapes_world.language import GrammarError, parse_question

    try:
        return CAPTION_LEN if parse_question(question).kind == "caption" else ANSWER_LEN
    except GrammarError:
        return CAPTION_LEN


def build_understand(
    tokenizer, config, image: np.ndarray, question: str, answer: str | None = None
) -> Example:
    """Visual question answering and captioning: answer padded with [EOS] to its slot length."""
    b = SequenceBuilder(tokenizer, config, "understand")
    _prefix(b, "task_understand", images=[image], question=question)
    b.padded_answer(answer, answer_length(question), 1)
    return b.build()


def build_critique(
    tokenizer, config, image: np.ndarray, prompt: str, verdict: str | None = None
) -> Example:
    """Self-critique: does the image match the prompt? `yes` or `no: <reasons>`."""
    b = SequenceBuilder(tokenizer, config, "critique")
    _prefix(b, "task_critique", images=[image], prompt=prompt)
    b.padded_answer(verdict, CRITIQUE_LEN, 1)
    return b.build()


# ----------------------------------------------------------------------------- packing


@dataclass
class Batch:
    """Padded tensors for `LavidaForMaskedDiffusion.forward` (see its docstring)."""

    input_ids: torch.Tensor  # (B, L)
    segment_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L) bool
    text_targets: torch.Tensor  # (B, L), -100 where not a target
    gen_codes: torch.Tensor | None  # (S, G, G)
    gen_is_target: list[bool]
    pixel_values: torch.Tensor | None  # (V, 3, H, W) in [0, 1]
    offsets: list[int]  # left padding of each row
    # (M, G, G) loss weight of each target image's codes (training only; None: plain mean)
    image_weights: torch.Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.segment_ids), move(self.attention_mask),
            move(self.text_targets), move(self.gen_codes), self.gen_is_target,
            move(self.pixel_values), self.offsets, move(self.image_weights),
        )  # fmt: skip

    def model_inputs(self) -> dict:
        return dict(
            input_ids=self.input_ids, gen_codes=self.gen_codes, pixel_values=self.pixel_values,
            segment_ids=self.segment_ids, attention_mask=self.attention_mask,
        )  # fmt: skip


def images_to_pixels(images: list[np.ndarray]) -> torch.Tensor | None:
    """RGB uint8 images -> `(V, 3, H, W)` floats in [0, 1], or None for no image."""
    if not images:
        return None
    return images_to_tensor(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))


def drop_conditions(ex: Example, config, *, prompt: bool, source: bool) -> Example:
    """The example with its conditions replaced by masks, for classifier-free guidance.

    `prompt=True` masks every position before the target image (text, plan and
    vision-encoder positions; FACTS §3.4, §4.2); `source=True` masks the edit source's VQ
    positions, which then hold the text mask token and route to the und branch. Dropped
    images and codes leave the example, so placeholders and tensors stay in step. Used
    by training (condition dropout) and by the pipeline (unconditional CFG rows).
    """
    cfg = config
    ids, targets = list(ex.input_ids), list(ex.text_targets)
    P, T = cfg.positions_per_image, cfg.vision_tokens_per_image
    codes, is_target, images = [], [], []
    slot = view = pos = 0
    while pos < len(ids):
        tok = ids[pos]
        if tok in (cfg.img_gen_token_id, cfg.img_src_token_id):
            if tok == cfg.img_src_token_id and source:
                ids[pos : pos + P] = [cfg.mask_token_id] * P
            else:
                codes.append(ex.gen_codes[slot])
                is_target.append(ex.gen_is_target[slot])
            slot, pos = slot + 1, pos + P
        elif tok == cfg.img_enc_token_id:
            if prompt:
                ids[pos : pos + T] = [cfg.mask_token_id] * T
            else:
                images.append(ex.images[view])
            view, pos = view + 1, pos + T
        else:
            if prompt and not any(is_target):  # every position before the target image
                ids[pos], targets[pos] = cfg.mask_token_id, -100
            pos += 1
    return Example(ids, list(ex.segment_ids), targets, codes, is_target, images, ex.task, ex.loc_only)


def pack(examples: list[Example], config, *, pad_left: bool = False) -> Batch:
    """Pad examples into one batch. Inference pads on the left so every row's condition
    ends at the same index (RoPE is relative, so left padding changes nothing)."""

    if not examples:
        raise ValueError("pack needs at least one example (a caller passed an empty batch)")
    L = max(len(e) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), config.pad_token_id, dtype=torch.long)
    seg = torch.zeros((B, L), dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.bool)
    tgt = torch.full((B, L), -100, dtype=torch.long)
    codes, is_target, images, offsets = [], [], [], []
    for r, e in enumerate(examples):
        n = len(e)
        o = L - n if pad_left else 0
        offsets.append(o)
        ids[r, o : o + n] = torch.tensor(e.input_ids)
        seg[r, o : o + n] = torch.tensor(e.segment_ids)
        # padding takes the row's last segment so it never blocks a one-way mask
        if pad_left:
            seg[r, :o] = e.segment_ids[0]
        else:
            seg[r, n:] = e.segment_ids[-1]
        att[r, o : o + n] = True
        tgt[r, o : o + n] = torch.tensor(e.text_targets)
        codes += e.gen_codes
        is_target += e.gen_is_target
        images += e.images
    gen_codes = torch.from_numpy(np.stack(codes)).long() if codes else None
    return Batch(ids, seg, att, tgt, gen_codes, is_target, images_to_pixels(images), offsets)
