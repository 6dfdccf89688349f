"""Renderer: flat colours, exact boxes, symmetric shapes."""

import numpy as np
import pytest
from lavida_agent.tools.shapes_world.render import render, shape_mask
from lavida_agent.tools.shapes_world.scene import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Object,
    Scene,
    size_class,
)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_pixel_bbox_equals_box_for_every_side_and_offset(shape):
    for side in range(10, 25):
        for x0, y0 in [(2, 2), (3, 17), (40 - side // 2, 5), (62 - side, 62 - side)]:
            box = (x0, y0, x0 + side, y0 + side)
            size = size_class(side) or "small"  # sides 15..17 belong to no class; draw anyway
            scene = Scene("white", (Object(shape, "red", size, box),))
            image = render(scene)
            drawn = np.any(image != BACKGROUNDS["white"], axis=-1)
            assert _bbox(drawn) == box, (shape, side, box)


def test_flat_colours_only():
    scene = Scene(
        "gray",
        (
            Object("circle", "red", "large", (2, 2, 24, 24)),
            Object("triangle", "blue", "small", (30, 5, 43, 18)),
            Object("diamond", "yellow", "large", (5, 30, 26, 51)),
            Object("square", "purple", "small", (40, 40, 52, 52)),
        ),
    )
    image = render(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    colours = {tuple(int(c) for c in p) for p in image.reshape(-1, 3)}
    expected = {BACKGROUNDS["gray"]} | {COLORS[c] for c in ("red", "blue", "yellow", "purple")}
    assert colours == expected


@pytest.mark.parametrize("side", [10, 11, 18, 24])
def test_shape_masks_are_symmetric_and_shaped(side):
    circle, square = shape_mask("circle", side), shape_mask("square", side)
    triangle, diamond = shape_mask("triangle", side), shape_mask("diamond", side)
    assert square.all()
    for mask in (circle, triangle, diamond):
        assert (mask == mask[:, ::-1]).all()
    for mask in (circle, diamond):
        assert (mask == mask[::-1, :]).all()
    assert 0.74 < circle.mean() < 0.84
    # Triangle: apex up, the bottom row is full and the widest row.
    widths = triangle.sum(axis=1)
    assert widths[-1] == side and widths[0] <= 2 and (np.diff(widths) >= 0).all()
    # Diamond: widest in the middle, tips at the edge midpoints.
    d_widths = diamond.sum(axis=1)
    assert d_widths.max() == side and d_widths[0] <= 2 and d_widths[-1] <= 2


def test_upscaled_render_is_nearest_neighbour():
    scene = Scene("black", (Object("diamond", "green", "small", (7, 9, 20, 22)),))
    small, big = render(scene), render(scene, canvas=256)
    assert big.shape == (256, 256, 3)
    assert (big == small.repeat(4, axis=0).repeat(4, axis=1)).all()


def test_boxes_past_the_canvas_are_clipped():
    scene = Scene("white", (Object("square", "red", "large", (54, -4, 74, 16)),))
    image = render(scene)
    drawn = np.any(image != BACKGROUNDS["white"], axis=-1)
    assert _bbox(drawn) == (54, 0, 64, 16)


def test_shape_mask_rejects_bad_input():
    with pytest.raises(ValueError):
        shape_mask("star", 10)
    with pytest.raises(ValueError):
        shape_mask("circle", 0)


@pytest.mark.parametrize("shape", ["square", "circle", "diamond", "triangle"])
def test_core_box_holds_only_the_shapes_pixels(shape):
    import math

    from lavida_agent.tools.shapes_world.render import core_box

    for side in range(4, 33):
        mask = shape_mask(shape, side)
        for off in (0.0, 3.0):  # the rule is relative to the box, wherever it is
            x0, y0, x1, y1 = core_box(shape, (off, off, off + side, off + side))
            cols = range(math.ceil(x0 - off), math.floor(x1 - off))
            rows = range(math.ceil(y0 - off), math.floor(y1 - off))
            assert all(mask[r, c] for r in rows for c in cols), (shape, side)
            if side >= 12:  # not an empty box: a large object keeps a fair part of itself
                assert len(cols) * len(rows) >= 0.1 * side * side, (shape, side)
    with pytest.raises(ValueError, match="unknown shape"):
        core_box("hexagon", (0, 0, 8, 8))
