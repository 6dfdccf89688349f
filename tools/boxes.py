"""Box geometry: `Box`, format conversions, IoU, location-bin quantisation and letterbox maps.

Everything here is pure Python + numpy (no OpenCV, no torch), so the model can use the same
geometry as the tools without pulling heavier dependencies.

Conventions (`SHAPES_WORLD.md`):
- a box is `(x0, y0, x1, y1)` in pixels, x right, y down, **x1/y1 exclusive**, so
  `width = x1 - x0` and a box covering pixel columns 3..5 is `(3, y0, 6, y1)`;
- coordinates may be floats (model outputs, letterbox transforms); `Box.as_int()` rounds;
- location bins: a 64 px canvas has 65 bins `0..64` (the small-scale analogue of
  Lavida-O's 1025), `bin = round(coord * (bins - 1) / canvas)`, so integer pixel coordinates
  on the default grid map to themselves.

Module-level functions (`iou`, `quantize`, `to_letterbox`, ...) accept a `Box` or any
4-sequence `(x0, y0, x1, y1)`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_CANVAS = 64  # ShapesWorld canvas side in pixels

BoxLike = Union["Box", Sequence[float], np.ndarray]

__all__ = [
    "DEFAULT_CANVAS",
    "Box",
    "BoxLike",
    "LetterboxParams",
    "as_box",
    "dequantize",
    "from_letterbox",
    "intersection",
    "iou",
    "iou_matrix",
    "letterbox_params",
    "quantize",
    "round_half_up",
    "to_letterbox",
]


def round_half_up(value: float) -> int:
    """Round to the nearest integer, halves away from minus infinity (`2.5 -> 3`, `-0.5 -> 0`).

    Python's built-in `round` rounds halves to even (`round(2.5) == 2`), which would make bin
    and pixel rounding depend on parity; this one is monotone and predictable.
    """
    return int(math.floor(value + 0.5))


def _finite(name: str, value: Any) -> float:
    """Return `value` as a float, or raise `ValueError` naming it when it is not a finite number."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got bool {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _positive_int(name: str, value: Any) -> int:
    """Return `value` as an int > 0, or raise `ValueError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive(name: str, value: Any) -> float:
    """Return `value` as a finite float > 0, or raise `ValueError` naming it."""
    out = _finite(name, value)
    if out <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return out


@dataclass(frozen=True)
class Box:
    """An axis-aligned box `(x0, y0, x1, y1)` in pixels, x1/y1 exclusive.

    Coordinates are stored as Python floats (so `Box(1, 2, 3, 4) == Box(1.0, 2.0, 3.0, 4.0)`
    and boxes hash and serialise the same whatever numeric type built them). Empty boxes
    (`x1 == x0` or `y1 == y0`) are allowed; inverted ones are not.

    Example:
        >>> b = Box(10, 20, 30, 50)
        >>> b.width, b.height, b.center
        (20.0, 30.0, (20.0, 35.0))
        >>> Box.from_xywh(10, 20, 20, 30) == b
        True

    Raises:
        ValueError: a coordinate is not a finite number, or `x1 < x0`, or `y1 < y0`.
    """

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        # Coerce numpy scalars / ints to float once, here, so every later computation and
        # every JSON dump sees plain floats.
        for name in ("x0", "y0", "x1", "y1"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if self.x1 < self.x0:
            raise ValueError(f"x1 ({self.x1}) must be >= x0 ({self.x0})")
        if self.y1 < self.y0:
            raise ValueError(f"y1 ({self.y1}) must be >= y0 ({self.y0})")

    # -- measures -------------------------------------------------------------------------

    @property
    def width(self) -> float:
        """`x1 - x0`."""
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        """`y1 - y0`."""
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        """`width * height` (0 for an empty box)."""
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """`(cx, cy)`, the midpoint of the box (for a pixel box: `x0 + width / 2`)."""
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    @property
    def is_empty(self) -> bool:
        """True when the box has zero width or height."""
        return self.width == 0 or self.height == 0

    # -- conversions ----------------------------------------------------------------------

    def as_tuple(self) -> tuple[float, float, float, float]:
        """Return `(x0, y0, x1, y1)` as floats."""
        return (self.x0, self.y0, self.x1, self.y1)

    def as_int(self) -> tuple[int, int, int, int]:
        """Return `(x0, y0, x1, y1)` rounded half up to ints (the order stays valid)."""
        return (
            round_half_up(self.x0),
            round_half_up(self.y0),
            round_half_up(self.x1),
            round_half_up(self.y1),
        )

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        """Build from top-left corner and size.

        Raises:
            ValueError: `w` or `h` is negative (reported as `x1 < x0` / `y1 < y0`).
        """
        return cls(x, y, x + w, y + h)

    def to_xywh(self) -> tuple[float, float, float, float]:
        """Return `(x0, y0, width, height)`."""
        return (self.x0, self.y0, self.width, self.height)

    @classmethod
    def from_cxcywh(cls, cx: float, cy: float, w: float, h: float) -> Box:
        """Build from centre and size."""
        return cls(cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)

    def to_cxcywh(self) -> tuple[float, float, float, float]:
        """Return `(cx, cy, width, height)`."""
        cx, cy = self.center
        return (cx, cy, self.width, self.height)

    def to_normalized(self, width: float, height: float) -> Box:
        """Return this box with x divided by `width` and y by `height` (image -> [0, 1] units).

        Raises:
            ValueError: `width` or `height` is not > 0.
        """
        w, h = _positive("width", width), _positive("height", height)
        return Box(self.x0 / w, self.y0 / h, self.x1 / w, self.y1 / h)

    @classmethod
    def from_normalized(cls, box: BoxLike, width: float, height: float) -> Box:
        """Scale a box in [0, 1] units back to pixels of a `width` x `height` image.

        Raises:
            ValueError: `width` or `height` is not > 0, or `box` is not a valid box.
        """
        b = as_box(box)
        w, h = _positive("width", width), _positive("height", height)
        return cls(b.x0 * w, b.y0 * h, b.x1 * w, b.y1 * h)

    # -- transforms -----------------------------------------------------------------------

    def clip(self, width: float, height: float) -> Box:
        """Clip to the image `[0, width] x [0, height]`; a box fully outside becomes empty.

        Raises:
            ValueError: `width` or `height` is negative.
        """
        w, h = _finite("width", width), _finite("height", height)
        if w < 0 or h < 0:
            raise ValueError(f"width and height must be >= 0, got {width!r} x {height!r}")
        x0 = min(max(self.x0, 0.0), w)
        y0 = min(max(self.y0, 0.0), h)
        return Box(x0, y0, min(max(self.x1, x0), w), min(max(self.y1, y0), h))

    def scale(self, sx: float, sy: float | None = None) -> Box:
        """Multiply x coordinates by `sx` and y by `sy` (default `sx`); both must be > 0."""
        sx_ = _positive("sx", sx)
        sy_ = sx_ if sy is None else _positive("sy", sy)
        return Box(self.x0 * sx_, self.y0 * sy_, self.x1 * sx_, self.y1 * sy_)

    def translate(self, dx: float, dy: float) -> Box:
        """Shift by `(dx, dy)` pixels."""
        dx_, dy_ = _finite("dx", dx), _finite("dy", dy)
        return Box(self.x0 + dx_, self.y0 + dy_, self.x1 + dx_, self.y1 + dy_)


def as_box(box: BoxLike) -> Box:
    """Return `box` as a `Box` (a `Box` is returned unchanged).

    Args:
        box: a `Box`, or a sequence / 1-D array of 4 numbers `(x0, y0, x1, y1)`.

    Raises:
        ValueError: `box` does not have exactly 4 numbers or is not a valid box.
    """
    if isinstance(box, Box):
        return box
    if isinstance(box, str | bytes):
        raise ValueError(f"expected a box (x0, y0, x1, y1), got {box!r}")
    try:
        values = box.reshape(-1).tolist() if isinstance(box, np.ndarray) else list(box)
    except TypeError:
        raise ValueError(f"expected a box (x0, y0, x1, y1), got {box!r}") from None
    if len(values) != 4:
        raise ValueError(f"a box needs 4 coordinates (x0, y0, x1, y1), got {len(values)}: {box!r}")
    return Box(*values)


# -- overlap ------------------------------------------------------------------------------


def intersection(a: BoxLike, b: BoxLike) -> Box | None:
    """Return the overlap of `a` and `b`, or None when they do not overlap with positive area."""
    a, b = as_box(a), as_box(b)
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1, y1 = min(a.x1, b.x1), min(a.y1, b.y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return Box(x0, y0, x1, y1)


def iou(a: BoxLike, b: BoxLike) -> float:
    """Intersection over union of two boxes, in [0, 1].

    Two empty boxes (zero union) have IoU 0: there is no area to agree on.
    """
    a, b = as_box(a), as_box(b)
    inter = intersection(a, b)
    inter_area = 0.0 if inter is None else inter.area
    union = a.area + b.area - inter_area
    if union <= 0:
        return 0.0
    # Clamp: floating-point rounding can push inter/union a hair above 1 for identical boxes.
    return min(1.0, max(0.0, inter_area / union))


def iou_matrix(boxes_a: Iterable[BoxLike], boxes_b: Iterable[BoxLike]) -> np.ndarray:
    """Pairwise IoU, vectorised.

    Args:
        boxes_a: N boxes.
        boxes_b: M boxes.

    Returns:
        `np.ndarray` of shape `(N, M)`, float64, entry `[i, j] = iou(boxes_a[i], boxes_b[j])`.
    """
    a = np.array([as_box(x).as_tuple() for x in boxes_a], dtype=np.float64).reshape(-1, 4)
    b = np.array([as_box(x).as_tuple() for x in boxes_b], dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (N,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (M,)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    iw, ih = np.clip(iw, 0, None), np.clip(ih, 0, None)  # (N, M) each
    inter = iw * ih  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0)


# -- location bins ------------------------------------------------------------------------


def _grid(canvas: Any, bins: Any) -> tuple[float, int]:
    """Validate `(canvas, bins)` and return them with the default `bins = canvas + 1` filled in."""
    c = _positive("canvas", canvas)
    if bins is None:
        if c != int(c):
            raise ValueError(f"bins is required when canvas is not an integer, got {canvas!r}")
        n = int(c) + 1
    else:
        if isinstance(bins, bool) or not isinstance(bins, int | np.integer):
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        n = int(bins)
        if n < 2:
            raise ValueError(f"bins must be >= 2, got {bins!r}")
    return c, n


def quantize(
    box: BoxLike, canvas: float = DEFAULT_CANVAS, bins: int | None = None
) -> tuple[int, int, int, int]:
    """Map a pixel box to location bins `0..bins-1` (`bin = round(coord * (bins-1) / canvas)`).

    Coordinates outside `[0, canvas]` are clamped to the edge bins, so any model or detector
    output can be turned into valid location tokens. Rounding is half up and monotone, so the
    bin order stays valid (`bx0 <= bx1`, `by0 <= by1`).

    Args:
        box: the box in pixels of a `canvas` x `canvas` image.
        canvas: side of the (square) canvas in pixels; > 0.
        bins: number of bins; default `canvas + 1` (65 for 64 px: integer pixels are exact).

    Returns:
        `(bx0, by0, bx1, by1)`, ints in `0..bins-1`.

    Raises:
        ValueError: invalid box, `canvas <= 0`, or `bins < 2`.
    """
    b = as_box(box)
    c, n = _grid(canvas, bins)
    step = (n - 1) / c

    def one(v: float) -> int:
        return min(n - 1, max(0, round_half_up(v * step)))

    return (one(b.x0), one(b.y0), one(b.x1), one(b.y1))


def dequantize(
    bins_tuple: Sequence[int], canvas: float = DEFAULT_CANVAS, bins: int | None = None
) -> Box:
    """Map location bins back to a pixel box (`coord = bin * canvas / (bins - 1)`).

    The inverse of `quantize` up to half a bin (`canvas / (bins - 1) / 2` pixels); exact for
    integer pixel coordinates on the default `bins = canvas + 1` grid.

    Raises:
        ValueError: not 4 integers, a bin outside `0..bins-1`, an inverted box, `canvas <= 0`
            or `bins < 2`.
    """
    c, n = _grid(canvas, bins)
    values = list(bins_tuple)
    if len(values) != 4:
        raise ValueError(f"expected 4 bins (x0, y0, x1, y1), got {len(values)}: {bins_tuple!r}")
    for name, v in zip(("x0", "y0", "x1", "y1"), values, strict=True):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"bin {name} must be an integer, got {v!r}")
        if not 0 <= v <= n - 1:
            raise ValueError(f"bin {name}={v} is outside 0..{n - 1}")
    step = c / (n - 1)
    return Box(*(int(v) * step for v in values))


# -- letterbox ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LetterboxParams:
    """How an image was letterboxed into a `size` x `size` square.

    A point `(x, y)` of the source maps to `(x * scale + pad_x, y * scale + pad_y)` in the
    square. The longer source side is scaled to exactly `size`; the shorter is scaled by the
    same factor, rounded to whole pixels and centred (`pad_*` are whole pixels; when the
    padding is odd the extra pixel goes to the right/bottom).

    Attributes:
        scale: source pixels -> square pixels.
        pad_x: columns of fill left of the image content.
        pad_y: rows of fill above the image content.
        size: side of the square.
    """

    scale: float
    pad_x: int
    pad_y: int
    size: int

    def content_size(self, width: int, height: int) -> tuple[int, int]:
        """Size `(w, h)` of the resized source inside the square (same rounding as the pads).

        Image code and box code both call this, so the pixels and the boxes agree.
        """
        w = min(self.size, max(1, round_half_up(width * self.scale)))
        h = min(self.size, max(1, round_half_up(height * self.scale)))
        return w, h

    def content_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """`(x0, y0, x1, y1)`: where the `width` x `height` source lies in the square."""
        w, h = self.content_size(width, height)
        return self.pad_x, self.pad_y, self.pad_x + w, self.pad_y + h


def letterbox_params(width: int, height: int, size: int = DEFAULT_CANVAS) -> LetterboxParams:
    """Compute the letterbox of a `width` x `height` image into a `size` x `size` square.

    Raises:
        ValueError: any argument is not a positive integer.
    """
    w, h = _positive_int("width", width), _positive_int("height", height)
    s = _positive_int("size", size)
    scale = s / max(w, h)
    params = LetterboxParams(scale=scale, pad_x=0, pad_y=0, size=s)
    cw, ch = params.content_size(w, h)
    return LetterboxParams(scale=scale, pad_x=(s - cw) // 2, pad_y=(s - ch) // 2, size=s)


def to_letterbox(box: BoxLike, params: LetterboxParams) -> Box:
    """Map a box from source pixels into the letterboxed square."""
    b = as_box(box)
    return Box(
        b.x0 * params.scale + params.pad_x,
        b.y0 * params.scale + params.pad_y,
        b.x1 * params.scale + params.pad_x,
        b.y1 * params.scale + params.pad_y,
    )


def from_letterbox(box: BoxLike, params: LetterboxParams) -> Box:
    """Map a box from the letterboxed square back to source pixels (not clipped: see `Box.clip`)."""
    b = as_box(box)
    return Box(
        (b.x0 - params.pad_x) / params.scale,
        (b.y0 - params.pad_y) / params.scale,
        (b.x1 - params.pad_x) / params.scale,
        (b.y1 - params.pad_y) / params.scale,
    )
