"""ShapesWorld checkers: the judge of generation, editing, grounding and answers.

The checkers see only the classical detector's output (`detect.detect`) and the parsed
specs of `language`; they never call a model. Reasons use the one critique vocabulary of
`language.REASON_TEMPLATES`, so a checker's reasons and the model's self-critique read
the same (`missing blue square`, `circle is green, expected red`, ...).

- `check_prompt`: is an image correct for a T2I prompt (SHAPES_WORLD.md and its
  clarifications: nothing missing, nothing extra including unnamed blobs, exact counts,
  named colours, sizes, relation and background)?
- `check_edit`: did an edit do what the instruction asked and nothing else (touched object
  centre within 4 px, untouched objects within 2 px and unchanged, background kept unless
  asked), plus the PSNR of the pixels outside the touched objects' boxes.
- `grounding_correct`, `normalize_answer`, `answer_correct`: Acc@0.5 and exact answers.

Inputs may be images (arrays, paths or encoded bytes; non-64 px images are letterboxed to
64 px first), `Detection`s, or ground-truth `Scene`s (rendered when pixels are needed).
Centre distances are Euclidean.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lavida_agent.tools.boxes import iou
from lavida_agent.tools.images import letterbox, load_image
from lavida_agent.tools.shapes_world.detect import Detection, detect
from lavida_agent.tools.shapes_world.language import (
    UNKNOWN_OBJECT,
    EditSpec,
    Noun,
    PromptSpec,
    parse_edit,
    parse_prompt,
    prompt_reasons,
    reason,
)
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.scene import (
    BACKGROUNDS,
    CANVAS,
    Box,
    Object,
    Scene,
    holds,
    region_of,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CheckResult", "EditCheckResult", "Observation", "observe", "check_prompt", "check_edit",
    "psnr", "grounding_correct", "normalize_answer", "answer_correct",
]  # fmt: skip

UNTOUCHED_TOLERANCE = 2.0  # px: an object the edit does not touch keeps its centre this close
TOUCHED_TOLERANCE = 4.0  # px: a recoloured, replaced or resized object keeps its centre this close
GROUNDING_IOU = 0.5  # Acc@0.5

ImageLike = np.ndarray | str | Path | bytes
Observable = ImageLike | Detection | Scene | tuple[Detection | Scene, np.ndarray]


@dataclass(frozen=True)
class CheckResult:
    """Whether an image is correct for a prompt, and why not."""

    correct: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class EditCheckResult:
    """Whether an edit is correct, why not, and how well the rest of the image was kept.

    Attributes:
        correct: The requested change is there and nothing else changed.
        reasons: What is wrong, in the critique vocabulary.
        psnr_outside: PSNR in dB over the pixels outside the boxes of the touched objects
            (source and result boxes); `inf` when those pixels are identical. For a
            background edit, where every background pixel is touched, it is measured over
            the objects' own pixels instead. When the instruction names no unique object in
            the source, over the whole image.
    """

    correct: bool
    reasons: list[str]
    psnr_outside: float

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "reasons": list(self.reasons),
                "psnr_outside": self.psnr_outside}  # fmt: skip


@dataclass(frozen=True)
class Observation:
    """What a checker knows about one image: the detection and, when available, its pixels."""

    background: str | None
    objects: tuple[Object, ...]
    unknown: tuple[Box, ...] = ()
    image: np.ndarray | None = None


def _to_canvas(image: np.ndarray) -> np.ndarray:
    """The image at the 64 px canvas the detector and the boxes are defined on."""
    if image.shape[:2] == (CANVAS, CANVAS):
        return image
    # Pad with the corner colour (the background) so padding never looks like an object.
    fill = tuple(int(v) for v in image[0, 0])
    square, _ = letterbox(image, CANVAS, fill=fill, interpolation="nearest")
    return square


def observe(x: Observable) -> Observation:
    """Turn an image, a `Detection`, a `Scene` or a `(detection, image)` pair into an `Observation`.

    Raises:
        lavida_agent.tools.images.ImageError: For an unreadable image.
    """
    if isinstance(x, Observation):
        return x
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], (Detection, Scene)):
        base = observe(x[0])
        image = _to_canvas(load_image(x[1]))
        return Observation(base.background, base.objects, base.unknown, image)
    if isinstance(x, Scene):
        return Observation(x.background, x.objects, (), render(x))
    if isinstance(x, Detection):
        return Observation(x.background, x.objects, x.unknown, None)
    image = _to_canvas(load_image(x))
    det = detect(image)
    return Observation(det.background, det.objects, det.unknown, image)


# =========================================================================== prompts


def check_prompt(prompt: str | PromptSpec, image_or_detection: Observable) -> CheckResult:
    """Judge an image against a text-to-image prompt.

    Args:
        prompt: Prompt text (parsed with `parse_prompt`) or a `PromptSpec`.
        image_or_detection: An image (array, path or bytes), a `Detection` or a `Scene`.

    Returns:
        `CheckResult(correct, reasons)`; reasons as in `language.prompt_reasons`.

    Raises:
        GrammarError: For prompt text outside the grammar.
        lavida_agent.tools.images.ImageError: For an unreadable image.
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    obs = observe(image_or_detection)
    reasons = prompt_reasons(spec, obs)
    return CheckResult(not reasons, reasons)


# =========================================================================== edits


def _dist(a: Object, b: Object) -> float:
    (ax, ay), (bx, by) = a.center, b.center
    return math.hypot(ax - bx, ay - by)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB between two uint8 images over `mask` (`(H, W)` bool); inf if identical.

    An empty mask has nothing to compare and also gives inf.
    """
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        diff = diff[mask]
    if diff.size == 0:
        return math.inf
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _box_mask(boxes: Sequence[Box], shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


def _object_pixels(obs: Observation) -> np.ndarray:
    """`(H, W)` mask of the pixels of the objects: inside their boxes, not background-coloured."""
    assert obs.image is not None
    inside = _box_mask([o.box for o in obs.objects], obs.image.shape)
    if obs.background is None:
        return inside
    return inside & np.any(obs.image != np.array(BACKGROUNDS[obs.background], np.uint8), axis=-1)


class _Pool:
    """The result's objects not yet accounted for."""

    def __init__(self, objects: Sequence[Object]) -> None:
        self.free = list(objects)

    def take(self, ok: Callable[[Object], bool], near: Object | None = None) -> Object | None:
        """The free object passing `ok` (closest to `near` when given), removed from the pool."""
        hits = [o for o in self.free if ok(o)]
        if not hits:
            return None
        best = min(hits, key=lambda o: _dist(o, near)) if near is not None else hits[0]
        self.free.remove(best)
        return best


def _touched_strict(spec: EditSpec, src: Object | None, anchor: Object | None,
                    pool: _Pool) -> Object | None:  # fmt: skip
    """Take the result object that shows the requested change exactly, if any."""
    c = spec.category
    if c == "add":
        assert spec.new is not None
        new = spec.new
        if spec.region is not None:
            return pool.take(lambda o: new.matches(o) and region_of(*o.center) == spec.region)
        assert anchor is not None and spec.relation is not None
        rel = spec.relation
        return pool.take(lambda o: new.matches(o) and holds(rel, o, anchor), near=anchor)
    if src is None or c in ("remove", "background"):
        return None
    near = lambda o: _dist(o, src) <= TOUCHED_TOLERANCE  # noqa: E731
    if c == "recolor":
        return pool.take(lambda o: (o.shape, o.color, o.size) == (src.shape, spec.color, src.size)
                         and near(o), near=src)  # fmt: skip
    if c == "replace":
        return pool.take(lambda o: (o.shape, o.color, o.size) == (spec.shape, src.color, src.size)
                         and near(o), near=src)  # fmt: skip
    if c == "move":
        return pool.take(lambda o: (o.shape, o.color, o.size) == (src.shape, src.color, src.size)
                         and region_of(*o.center) == spec.region)  # fmt: skip

    def grown(o: Object) -> bool:
        if spec.direction == "larger":
            return o.side > src.side and (src.size != "small" or o.size == "large")
        return o.side < src.side and (src.size != "large" or o.size == "small")

    return pool.take(lambda o: (o.shape, o.color) == (src.shape, src.color) and near(o)
                     and grown(o), near=src)  # fmt: skip


def _touched_diagnosis(spec: EditSpec, src: Object | None, anchor: Object | None,
                       pool: _Pool) -> tuple[list[str], Object | None]:  # fmt: skip
    """Why the requested change is not there; takes the near-miss object from the pool."""
    c = spec.category
    near = (lambda o: src is not None and _dist(o, src) <= TOUCHED_TOLERANCE)  # noqa: E731
    if c == "add":
        assert spec.new is not None
        new = spec.new
        got = pool.take(new.matches)
        if got is None:
            return [reason("missing", noun=new.text)], None
        if spec.region is not None:
            return [reason("region", noun=new.text, region=spec.region)], got
        assert spec.anchor is not None
        return [reason("relation", noun=new.text, relation=spec.relation,
                       anchor=spec.anchor.text)], got  # fmt: skip
    assert src is not None
    name = Noun.of(src).text
    if c == "remove":
        got = pool.take(lambda o: Noun.of(src).matches(o) and near(o), near=src)
        return ([reason("not_removed", noun=name)] if got else []), got
    if c == "recolor":
        assert spec.color is not None
        got = pool.take(lambda o: o.shape == src.shape and near(o), near=src)
        if got is None:
            return [reason("missing", noun=f"{spec.color} {src.shape}")], None
        if got.color != spec.color:
            return [reason("color", shape=src.shape, found=got.color, expected=spec.color)], got
        return [reason("size", shape=src.shape, found=got.size, expected=src.size)], got
    if c == "replace":
        assert spec.shape is not None
        got = pool.take(lambda o: o.shape in (src.shape, spec.shape) and near(o), near=src)
        if got is None:
            return [reason("missing", noun=f"{src.color} {spec.shape}")], None
        if got.shape == src.shape:
            return [reason("replace", noun=name, new=f"a {spec.shape}")], got
        if got.color != src.color:
            return [reason("color", shape=spec.shape, found=got.color, expected=src.color)], got
        return [reason("size", shape=spec.shape, found=got.size, expected=src.size)], got
    if c == "move":
        got = pool.take(lambda o: (o.shape, o.color) == (src.shape, src.color))
        if got is None:
            return [reason("missing", noun=name)], None
        if region_of(*got.center) != spec.region:
            return [reason("region", noun=name, region=spec.region)], got
        return [reason("size", shape=src.shape, found=got.size, expected=src.size)], got
    # resize
    got = pool.take(lambda o: (o.shape, o.color) == (src.shape, src.color), near=src)
    if got is None:
        return [reason("missing", noun=name)], None
    if not near(got):
        return [reason("moved", noun=name)], got
    return [reason("resize", noun=name, direction=spec.direction)], got


def _untouched_diagnosis(obj: Object, pool: _Pool) -> list[str]:
    """Why an object the edit should not touch is not where it was."""
    name = Noun.of(obj).text
    same = pool.take(lambda o: (o.shape, o.color) == (obj.shape, obj.color), near=obj)
    if same is not None:
        if _dist(same, obj) > UNTOUCHED_TOLERANCE:
            return [reason("moved", noun=name)]
        return [reason("size", shape=obj.shape, found=same.size, expected=obj.size)]
    recoloured = pool.take(lambda o: o.shape == obj.shape
                           and _dist(o, obj) <= UNTOUCHED_TOLERANCE, near=obj)  # fmt: skip
    if recoloured is not None:
        return [reason("color", shape=obj.shape, found=recoloured.color, expected=obj.color)]
    return [reason("missing", noun=name)]


def check_edit(
    source: Observable, instruction: str | EditSpec, result: Observable
) -> EditCheckResult:
    """Judge an edit: the requested change is there and nothing else changed.

    Args:
        source: The image before the edit (array, path, bytes), a `Scene`, or a
            `(Detection | Scene, image)` pair.
        instruction: Instruction text (parsed with `parse_edit`) or an `EditSpec`.
        result: The image after the edit, in the same forms.

    Returns:
        `EditCheckResult(correct, reasons, psnr_outside)`. PSNR is `nan` when either side
        was given as a bare `Detection` (no pixels).

    Raises:
        GrammarError: For instruction text outside the grammar.
        lavida_agent.tools.images.ImageError: For an unreadable image.
    """
    spec = parse_edit(instruction) if isinstance(instruction, str) else instruction
    src, res = observe(source), observe(result)
    reasons: list[str] = []

    # Step 1: resolve the touched object (and the add anchor) in the source.
    touched: Object | None = None
    anchor: Object | None = None
    ref = spec.anchor if spec.category == "add" else spec.target
    if ref is not None:
        hits = [o for o in src.objects if ref.matches(o)]
        if len(hits) != 1:
            kind = "no_referent" if not hits else "ambiguous"
            noun = ref.text if not hits else ref.plural_text
            reasons.append(reason(kind, noun=noun))
        elif spec.category == "add":
            anchor = hits[0]
        else:
            touched = hits[0]
    if reasons:  # nothing to judge against: report only that
        value = math.nan if src.image is None or res.image is None else psnr(src.image, res.image)
        return EditCheckResult(False, reasons, value)
    untouched = [o for o in src.objects if o is not touched]

    # Step 2: untouched objects must be where they were, unchanged (strict pass first so a
    # near-miss never steals another object's exact match).
    pool = _Pool(res.objects)
    lost: list[Object] = []
    kept: dict[int, Object] = {}
    for i, o in enumerate(untouched):
        got = pool.take(lambda r, o=o: (r.shape, r.color, r.size) == (o.shape, o.color, o.size)
                        and _dist(r, o) <= UNTOUCHED_TOLERANCE, near=o)  # fmt: skip
        if got is None:
            lost.append(o)
        else:
            kept[i] = got
    if anchor is not None:  # the anchor stays put; relations are judged where it ended up
        anchor = kept.get(untouched.index(anchor), anchor)

    # Step 3: the requested change.
    result_box: Box | None = None
    if spec.category != "background":
        got = _touched_strict(spec, touched, anchor, pool)
        if got is None:  # always the case for remove: nothing should be there
            why, got = _touched_diagnosis(spec, touched, anchor, pool)
            reasons += why
        result_box = got.box if got is not None else None

    # Step 4: what happened to the untouched objects, anything extra, the background.
    for o in lost:
        reasons += _untouched_diagnosis(o, pool)
    reasons += [reason("extra", noun=Noun.of(o).text) for o in pool.free]
    reasons += [reason("extra", noun=UNKNOWN_OBJECT) for b in res.unknown
                if all(iou(b, s) < 0.5 for s in src.unknown)]  # fmt: skip
    expected_bg = spec.background if spec.category == "background" else src.background
    if res.background != expected_bg:
        reasons.append(reason("background", found=res.background or "unknown",
                              expected=expected_bg or "unknown"))  # fmt: skip

    # Step 5: PSNR outside what the edit touched.
    if src.image is None or res.image is None:
        value = math.nan
    elif spec.category == "background":
        value = psnr(src.image, res.image, _object_pixels(src))
    else:
        boxes = [b for b in (touched.box if touched else None, result_box) if b is not None]
        value = psnr(src.image, res.image, ~_box_mask(boxes, src.image.shape))
    return EditCheckResult(not reasons, reasons, value)


# =========================================================================== grounding, answers


def grounding_correct(pred_box: Sequence[float] | None, true_box: Sequence[float]) -> bool:
    """Acc@0.5: the predicted box overlaps the true one with IoU >= 0.5 (None is wrong)."""
    if pred_box is None:
        return False
    try:
        return iou(tuple(pred_box), tuple(true_box)) >= GROUNDING_IOU  # type: ignore[arg-type]
    except ValueError:
        logger.debug("invalid predicted box %r counted as wrong", pred_box)
        return False


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, single spaces, `an` read as `a`; nothing else."""
    words = _PUNCT.sub("", text.lower()).split()
    return " ".join("a" if w == "an" else w for w in words)


def answer_correct(pred: str, truth: str) -> bool:
    """Exact match after `normalize_answer` (`3` is not `three`)."""
    return normalize_answer(pred) == normalize_answer(truth)
