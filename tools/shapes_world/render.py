"""ShapesWorld renderer: a `Scene` to a flat-coloured RGB image.

Every shape fills its box exactly: the tight bounding box of a shape's pixels equals the
object's box, for every side and offset (tested). Rendering has no anti-aliasing, so every
pixel is either the background colour or one palette colour, and the detector can segment
ground-truth renders exactly.

Shapes, for a box of width `w` and height `h` (square in valid scenes):

- `square`: the whole box.
- `circle`: the disc inscribed in the box; a pixel is in when its centre lies in the disc
  (an ellipse for a non-square box).
- `triangle`: upright, apex at the top centre (two pixels wide when `w` is even, so the
  shape stays symmetric), base along the bottom row.
- `diamond`: the square rotated by 45 degrees, with its vertices at the edge midpoints
  (two-pixel flats at the tips when a side is even).

Triangles and diamonds are OpenCV filled polygons (`cv2.fillPoly`, `cv2.LINE_8`). The disc
is a pixel-centre test in numpy because `cv2.circle` only draws odd diameters. Masks are
computed once per `(shape, w, h)` and pasted, so a shape looks the same at every offset.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import cv2
import numpy as np
from lavida_agent.tools.shapes_world.scene import BACKGROUNDS, CANVAS, COLORS, SHAPES, Scene

logger = logging.getLogger(__name__)

__all__ = ["core_box", "render", "shape_mask"]

# The axis-aligned part of each shape, in fractions of its box (x0, y0, x1, y1), with room
# for rasterisation: every pixel whose square lies in it is the shape's (tested, sides 4-32).
_CORE = {"square": (0.0, 0.0, 1.0, 1.0), "circle": (0.17, 0.17, 0.83, 0.83),
         "diamond": (0.27, 0.27, 0.73, 0.73), "triangle": (0.28, 0.52, 0.72, 1.0)}  # fmt: skip


def core_box(shape: str, box) -> tuple[float, float, float, float]:
    """The box inside a `shape` drawn in `box` (pixels) that holds only the shape's pixels.

    What an edit can keep of an object while the background around it changes: the cells
    inside it (`model.tasks.inner_cells`) show the object alone.
    """
    if shape not in _CORE:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    x0, y0, x1, y1 = (float(v) for v in box)
    fx0, fy0, fx1, fy1 = _CORE[shape]
    w, h = x1 - x0, y1 - y0
    return x0 + fx0 * w, y0 + fy0 * h, x0 + fx1 * w, y0 + fy1 * h


def _symmetric_polygon_mask(w: int, h: int, points: list[tuple[int, int]]) -> np.ndarray:
    """Fill the integer polygon `points` on an `(h, w)` grid and mirror it left-right.

    OpenCV's edge rasteriser is not exactly mirror-symmetric, so the left half is kept and
    mirrored; the result is symmetric and its bounding box is still the full grid.
    """
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.array(points, np.int32)], 1, lineType=cv2.LINE_8)
    mask = canvas.astype(bool)
    half = (w + 1) // 2
    mask[:, w - half :] = mask[:, :half][:, ::-1]
    return mask


@lru_cache(maxsize=512)
def _cached_mask(shape: str, w: int, h: int) -> np.ndarray:
    if shape == "square":
        mask = np.ones((h, w), bool)
    elif shape == "circle":
        # Pixel centres inside the inscribed ellipse. The rows and columns through the
        # centre always reach the box edges, so the bounding box is the full box.
        ys = (np.arange(h) + 0.5 - h / 2.0) / (h / 2.0)
        xs = (np.arange(w) + 0.5 - w / 2.0) / (w / 2.0)
        mask = ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0
    elif shape == "triangle":
        # Apex row: one pixel for odd widths, the two middle pixels for even widths.
        left, right = (w - 1) // 2, w // 2
        pts = [(left, 0), (right, 0), (w - 1, h - 1), (0, h - 1)]
        mask = _symmetric_polygon_mask(w, h, pts)
    elif shape == "diamond":
        ml, mr = (w - 1) // 2, w // 2  # middle column(s)
        tl, tr = (h - 1) // 2, h // 2  # middle row(s)
        pts = [(ml, 0), (mr, 0), (w - 1, tl), (w - 1, tr)]
        pts += [(mr, h - 1), (ml, h - 1), (0, tr), (0, tl)]
        mask = _symmetric_polygon_mask(w, h, pts)
        # Mirror top-bottom as well so the diamond is symmetric on both axes.
        half = (h + 1) // 2
        mask[h - half :, :] = mask[:half, :][::-1, :]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


def shape_mask(shape: str, w: int, h: int | None = None) -> np.ndarray:
    """The boolean pixel mask of `shape` filling a `w` x `h` box.

    Args:
        shape: One of `SHAPES`.
        w: Box width in pixels (>= 1).
        h: Box height in pixels; defaults to `w`.

    Returns:
        A read-only `bool` array of shape `(h, w)` whose tight bounding box is the whole
        array. Shared between calls (cached): copy it before writing.

    Raises:
        ValueError: For an unknown shape or a non-positive side.
    """
    h = w if h is None else h
    if w < 1 or h < 1:
        raise ValueError(f"box sides must be positive, got w={w}, h={h}")
    return _cached_mask(shape, int(w), int(h))


def render(scene: Scene, canvas: int = CANVAS) -> np.ndarray:
    """Draw `scene` as an RGB image.

    Args:
        scene: The scene; boxes are in `CANVAS` (64 px) coordinates.
        canvas: Output side in pixels. The scene is always drawn at `CANVAS` px and then
            resized nearest-neighbour, so every size shows the same honest pixels (an exact
            pixel repeat for multiples of 64).

    Returns:
        `np.ndarray` of shape `(canvas, canvas, 3)`, dtype `uint8`, RGB. Objects are drawn
        in scene order; parts of a box outside the canvas are clipped.

    Raises:
        ValueError: For a non-positive `canvas`.
    """
    if canvas < 1:
        raise ValueError(f"canvas must be positive, got {canvas}")
    image = np.empty((CANVAS, CANVAS, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        if x1 <= x0 or y1 <= y0:
            logger.debug("skipping empty box %s", obj.box)
            continue
        mask = shape_mask(obj.shape, x1 - x0, y1 - y0)
        # Clip the box to the canvas and cut the same window out of the mask.
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, CANVAS), min(y1, CANVAS)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        window = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        image[cy0:cy1, cx0:cx1][window] = COLORS[obj.color]
    if canvas != CANVAS:
        image = cv2.resize(image, (canvas, canvas), interpolation=cv2.INTER_NEAREST)
    return image
