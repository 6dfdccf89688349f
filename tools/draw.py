"""OpenCV overlays for traces and visual critique: boxes with labels, and sample grids.

Everything takes and returns canonical `(H, W, 3)` uint8 **RGB** arrays (colours are RGB
triples) and never mutates its input. ShapesWorld images are only 64 px wide, so both
functions can first upscale with nearest-neighbour (`scale=`), which keeps pixels honest and
makes label text legible. Label text uses OpenCV's Hershey font, which only has ASCII glyphs:
other characters are drawn as `?`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from lavida_agent.tools.boxes import BoxLike, as_box
from lavida_agent.tools.images import load_image, resize_nearest

logger = logging.getLogger(__name__)

Color = tuple[int, int, int]

# Saturated colours absent from the ShapesWorld palette and backgrounds, so an overlay never
# blends into the object it marks.
PALETTE: tuple[Color, ...] = (
    (255, 0, 255),  # magenta
    (0, 255, 255),  # cyan
    (0, 255, 0),  # lime
    (255, 0, 128),  # pink
    (128, 128, 255),  # periwinkle
    (255, 255, 0),  # pure yellow
)

_FONT = cv2.FONT_HERSHEY_SIMPLEX

__all__ = ["PALETTE", "draw_boxes", "make_grid"]


def _canonical_copy(image: Any) -> np.ndarray:
    """A new canonical RGB array from anything `load_image` accepts (it always copies)."""
    return load_image(image)


def _color(value: Any, what: str) -> Color:
    """Validate one RGB triple of ints 0..255."""
    try:
        rgb = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an (r, g, b) triple, got {value!r}") from None
    if len(rgb) != 3 or any(not 0 <= v <= 255 for v in rgb):
        raise ValueError(f"{what} must be an (r, g, b) triple of 0..255, got {value!r}")
    return rgb  # type: ignore[return-value]


def _is_single_color(colors: Any) -> bool:
    """True when `colors` is one RGB triple rather than a list of them."""
    return (
        isinstance(colors, tuple | list | np.ndarray)
        and len(colors) == 3
        and all(isinstance(v, int | np.integer) for v in colors)
    )


def _ascii(text: str) -> str:
    """Replace characters the Hershey font cannot draw (non-printable ASCII) with `?`."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))


def _font_scale(height: int, width: int) -> float:
    """Font scale giving roughly 8 px text on 64-256 px images, growing with larger ones."""
    return max(0.3, min(height, width) / 700.0)


def _text_color(background: Color) -> Color:
    """Black or white, whichever reads better on `background` (Rec. 601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _draw_label(
    canvas: np.ndarray, text: str, x: int, y: int, color: Color, font_scale: float, above: bool
) -> None:
    """Draw `text` on a filled `color` background anchored at the box corner `(x, y)`.

    The label sits just above the box when it fits (`above`), otherwise just inside its top.
    """
    h, w = canvas.shape[:2]
    (tw, th), base = cv2.getTextSize(text, _FONT, font_scale, 1)
    lh, lw = th + base + 2, tw + 2  # label box with a 1 px margin
    ly0 = y - lh if above and y - lh >= 0 else y
    lx0 = min(max(x, 0), max(0, w - lw))  # keep it on the canvas horizontally
    ly0 = min(max(ly0, 0), max(0, h - lh))
    cv2.rectangle(canvas, (lx0, ly0), (lx0 + lw - 1, ly0 + lh - 1), color, thickness=cv2.FILLED)
    cv2.putText(
        canvas, text, (lx0 + 1, ly0 + 1 + th), _FONT, font_scale, _text_color(color), 1, cv2.LINE_AA
    )


def draw_boxes(
    image: Any,
    boxes: Sequence[BoxLike],
    labels: Sequence[str | None] | None = None,
    colors: Color | Sequence[Color] | None = None,
    thickness: int = 1,
    scale: int = 1,
    font_scale: float | None = None,
) -> np.ndarray:
    """Draw boxes (and optional labels) on a copy of an image.

    The outline is drawn *inside* each box: a box `(x0, y0, x1, y1)` (x1/y1 exclusive) paints
    columns `x0` and `x1 - 1` and rows `y0` and `y1 - 1` (and `thickness - 1` more pixels
    inwards), so the overlay marks exactly the pixels the box covers.

    Args:
        image: anything `images.load_image` accepts; not modified.
        boxes: boxes in pixels of `image` (`Box` or 4-sequences).
        labels: one text per box (`None` or `""` for no label), drawn on a filled background
            in the box colour.
        colors: one RGB triple for all boxes, or one per box; default cycles `PALETTE`.
        thickness: outline width in output pixels, >= 1.
        scale: integer nearest-neighbour upscale applied before drawing (boxes scale with it).
        font_scale: OpenCV font scale; default grows with the output size.

    Returns:
        A new `(H * scale, W * scale, 3)` uint8 RGB array.

    Raises:
        ValueError: lengths of `labels`/`colors` differ from `boxes`, or a bad argument.
        ImageError: `image` cannot be loaded.
    """
    if isinstance(thickness, bool) or not isinstance(thickness, int) or thickness < 1:
        raise ValueError(f"thickness must be an integer >= 1, got {thickness!r}")
    box_list = [as_box(b) for b in boxes]
    n = len(box_list)
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} boxes")
    if colors is None:
        color_list = [PALETTE[i % len(PALETTE)] for i in range(n)]
    elif _is_single_color(colors):
        color_list = [_color(colors, "colors")] * n
    else:
        color_list = [
            _color(c, f"colors[{i}]")
            for i, c in enumerate(colors)  # type: ignore[arg-type]
        ]
        if len(color_list) != n:
            raise ValueError(f"got {len(color_list)} colors for {n} boxes")

    out = _canonical_copy(image)
    if scale != 1:
        out = resize_nearest(out, scale)
    h, w = out.shape[:2]
    fs = _font_scale(h, w) if font_scale is None else float(font_scale)
    if not math.isfinite(fs) or fs <= 0:
        raise ValueError(f"font_scale must be > 0, got {font_scale!r}")

    corners = []
    for box, color in zip(box_list, color_list, strict=True):
        x0, y0, x1, y1 = box.scale(scale).as_int()
        corners.append((x0, y0))
        # Nested 1 px rectangles rather than one thick one: OpenCV centres thick lines on the
        # outline, which would spill outside the box.
        for t in range(thickness):
            if x1 - 1 - t < x0 + t or y1 - 1 - t < y0 + t:
                break
            cv2.rectangle(out, (x0 + t, y0 + t), (x1 - 1 - t, y1 - 1 - t), color, 1, cv2.LINE_8)
    # Labels after all outlines, so no outline crosses a label.
    if labels is not None:
        for (x0, y0), label, color in zip(corners, labels, color_list, strict=True):
            if label:
                _draw_label(out, _ascii(label), x0, y0, color, fs, above=True)
    return out


def make_grid(
    images: Sequence[Any],
    ncols: int,
    pad: int = 2,
    labels: Sequence[str | None] | None = None,
    scale: int = 1,
    background: Color = (255, 255, 255),
    font_scale: float | None = None,
) -> np.ndarray:
    """Tile images into a grid, row-major, with optional captions under each cell.

    Cells are as large as the largest (upscaled) image; smaller images are centred in theirs.
    With fewer images than `ncols` the grid has only as many columns as images.

    Args:
        images: anything `images.load_image` accepts, one per cell; at least one.
        ncols: columns, >= 1.
        pad: pixels of `background` between cells and around the grid, >= 0.
        labels: one caption per image (`None`/`""` for none), drawn in a strip under it.
        scale: integer nearest-neighbour upscale applied to every image first.
        background: RGB colour of the padding and caption strips.
        font_scale: OpenCV font scale for captions; default grows with the cell size.

    Returns:
        A new uint8 RGB array of shape
        `(rows * (cell_h + label_h) + (rows + 1) * pad, cols * cell_w + (cols + 1) * pad, 3)`.

    Raises:
        ValueError: no images, bad `ncols`/`pad`, or `labels` of the wrong length.
    """
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be an integer >= 1, got {ncols!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    if len(images) == 0:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    bg = _color(background, "background")

    tiles = [_canonical_copy(im) for im in images]
    if scale != 1:
        tiles = [resize_nearest(t, scale) for t in tiles]
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    fs = _font_scale(cell_h, cell_w) if font_scale is None else float(font_scale)
    label_h = 0
    if labels is not None and any(labels):
        (_, th), base = cv2.getTextSize("Ag", _FONT, fs, 1)
        label_h = th + base + 4

    cols = min(ncols, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    step_y, step_x = cell_h + label_h + pad, cell_w + pad
    grid = np.empty((rows * step_y + pad, cols * step_x + pad, 3), dtype=np.uint8)
    grid[...] = bg
    text_color = _text_color(bg)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = pad + r * step_y, pad + c * step_x
        th_, tw_ = tile.shape[:2]
        oy, ox = top + (cell_h - th_) // 2, left + (cell_w - tw_) // 2
        grid[oy : oy + th_, ox : ox + tw_] = tile
        if labels is not None and labels[i]:
            # Draw into a view of the strip so long captions are clipped to their own cell.
            strip = grid[top + cell_h : top + cell_h + label_h, left : left + cell_w]
            (_, th), _ = cv2.getTextSize("Ag", _FONT, fs, 1)
            cv2.putText(
                strip, _ascii(labels[i]), (1, 2 + th), _FONT, fs, text_color, 1, cv2.LINE_AA
            )
    return grid
