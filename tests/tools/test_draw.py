"""Tests for tools/draw.py: box overlays and sample grids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lavida_agent.tools import draw
from lavida_agent.tools.boxes import Box

GRAY = (128, 128, 128)


@pytest.fixture
def canvas():
    return np.full((64, 64, 3), GRAY, np.uint8)


def _border_mask(shape, box, t=1):
    """Pixels of the `t`-pixel outline drawn inside an exclusive box."""
    x0, y0, x1, y1 = box
    m = np.zeros(shape[:2], bool)
    m[y0:y1, x0:x1] = True
    m[y0 + t : y1 - t, x0 + t : x1 - t] = False
    return m


def test_draw_boxes_paints_exactly_the_border(canvas):
    box = (10, 12, 30, 40)
    before = canvas.copy()
    out = draw.draw_boxes(canvas, [box], colors=(255, 0, 0))
    np.testing.assert_array_equal(canvas, before)  # input not mutated
    assert out.shape == canvas.shape and out.dtype == np.uint8
    border = _border_mask(out.shape, box)
    assert (out[border] == (255, 0, 0)).all()
    assert (out[~border] == GRAY).all()  # nothing outside the outline changed


def test_thickness_draws_inwards(canvas):
    box = (10, 10, 30, 30)
    out = draw.draw_boxes(canvas, [Box(*box)], colors=[(0, 255, 0)], thickness=3)
    border = _border_mask(out.shape, box, t=3)
    assert (out[border] == (0, 255, 0)).all()
    assert (out[~border] == GRAY).all()


def test_scale_upsamples_and_scales_boxes(canvas):
    out = draw.draw_boxes(canvas, [(1, 2, 5, 6)], colors=(255, 0, 0), scale=4)
    assert out.shape == (256, 256, 3)
    border = _border_mask(out.shape, (4, 8, 20, 24))
    assert (out[border] == (255, 0, 0)).all()
    assert (out[~border] == GRAY).all()


def test_default_colors_cycle_palette(canvas):
    bs = [(i * 8, 0, i * 8 + 6, 6) for i in range(len(draw.PALETTE) + 1)]
    out = draw.draw_boxes(canvas, bs)
    for i, (x0, y0, _, _) in enumerate(bs):
        assert tuple(out[y0, x0]) == draw.PALETTE[i % len(draw.PALETTE)]


def test_labels_change_pixels_above_box(canvas):
    box = (10, 30, 40, 50)
    plain = draw.draw_boxes(canvas, [box], colors=(255, 0, 255), scale=4)
    labelled = draw.draw_boxes(
        canvas, [box], labels=["red circle"], colors=(255, 0, 255), scale=4
    )
    diff = np.any(plain != labelled, axis=2)
    ys, xs = np.nonzero(diff)
    assert len(ys) > 0
    assert ys.max() < 30 * 4 and xs.min() >= 10 * 4  # label sits above the box, from its left
    # Filled background in the box colour; white (anti-aliased) text on magenta.
    pixels = labelled[diff]
    assert (pixels == (255, 0, 255)).all(axis=1).mean() > 0.5
    assert pixels[:, 1].max() > 200


def test_label_at_top_edge_goes_inside(canvas):
    out = draw.draw_boxes(canvas, [(0, 0, 40, 30)], labels=["top"], scale=4)
    base = draw.draw_boxes(canvas, [(0, 0, 40, 30)], scale=4)
    ys, _ = np.nonzero(np.any(out != base, axis=2))
    assert ys.min() >= 0 and ys.max() < 30 * 4


def test_none_and_empty_labels_and_non_ascii(canvas):
    a = draw.draw_boxes(canvas, [(5, 20, 20, 40)], labels=[None], scale=2)
    b = draw.draw_boxes(canvas, [(5, 20, 20, 40)], labels=[""], scale=2)
    c = draw.draw_boxes(canvas, [(5, 20, 20, 40)], scale=2)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    out = draw.draw_boxes(canvas, [(5, 20, 20, 40)], labels=["café ✓"], scale=2)
    assert out.shape == (128, 128, 3)


def test_boxes_outside_and_empty_do_not_crash(canvas):
    # The outline of a box larger than the canvas lies off-canvas; an empty box has none.
    out = draw.draw_boxes(canvas, [(-10, -10, 100, 100), (5, 5, 5, 9)])
    np.testing.assert_array_equal(out, canvas)
    labelled = draw.draw_boxes(canvas, [(-10, -10, 100, 100)], labels=["big"])
    assert labelled.shape == canvas.shape and (labelled[:4, :4] != GRAY).any()  # label clamped


def test_accepts_pil_and_no_boxes(canvas):
    out = draw.draw_boxes(Image.fromarray(canvas), [])
    np.testing.assert_array_equal(out, canvas)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": ["a", "b"]}, "2 labels for 1 boxes"),
        ({"colors": [(1, 2, 3), (4, 5, 6)]}, "2 colors for 1 boxes"),
        ({"colors": (1, 2, 300)}, "colors"),
        ({"colors": [(1, 2)]}, r"colors\[0\]"),
        ({"thickness": 0}, "thickness"),
        ({"scale": 0}, "scale"),
        ({"font_scale": -1.0}, "font_scale"),
    ],
)
def test_draw_boxes_validation(canvas, kwargs, match):
    with pytest.raises(ValueError, match=match):
        draw.draw_boxes(canvas, [(1, 1, 5, 5)], **kwargs)


# -- grids --------------------------------------------------------------------------------


def _tiles(n, h=8, w=10):
    return [np.full((h, w, 3), 20 * (i + 1), np.uint8) for i in range(n)]


def test_grid_layout():
    tiles = _tiles(5)
    grid = draw.make_grid(tiles, ncols=3, pad=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * 8 + 3 * 2, 3 * 10 + 4 * 2, 3)
    for i, t in enumerate(tiles):
        r, c = divmod(i, 3)
        top, left = 2 + r * (8 + 2), 2 + c * (10 + 2)
        np.testing.assert_array_equal(grid[top : top + 8, left : left + 10], t)
    # Padding and the empty sixth cell are background.
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
    assert (grid[12:20, 26:36] == 255).all()


def test_grid_fewer_images_than_columns_and_no_pad():
    grid = draw.make_grid(_tiles(2), ncols=8, pad=0)
    assert grid.shape == (8, 20, 3)


def test_grid_mixed_sizes_are_centred():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((8, 10, 3), 100, np.uint8)
    grid = draw.make_grid([a, b], ncols=2, pad=1, background=(255, 255, 255))
    assert grid.shape == (8 + 2, 2 * 10 + 3, 3)
    np.testing.assert_array_equal(grid[1 + 2 : 1 + 6, 1 + 3 : 1 + 7], a)  # centred in 8x10
    assert (grid[1, 1] == 255).all()  # around the small tile: background


def test_grid_labels_and_scale():
    tiles = _tiles(3, 16, 16)
    before = [t.copy() for t in tiles]
    grid = draw.make_grid(tiles, ncols=3, labels=["one", None, "three"], scale=4)
    for t, b in zip(tiles, before, strict=True):
        np.testing.assert_array_equal(t, b)
    assert grid.shape[1] == 3 * 64 + 4 * 2
    label_h = grid.shape[0] - 64 - 2 * 2
    assert label_h > 0
    strip = grid[2 + 64 : 2 + 64 + label_h]
    assert (strip[:, 2 : 2 + 64] != 255).any()  # text drawn under the first cell
    assert (strip[:, 2 + 66 : 2 + 66 + 64] == 255).all()  # no caption for the second
    np.testing.assert_array_equal(grid[2 : 2 + 64, 2 : 2 + 64], np.full((64, 64, 3), 20))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([], 2), {}, "at least one image"),
        ((_tiles(2), 0), {}, "ncols"),
        ((_tiles(2), 2), {"pad": -1}, "pad"),
        ((_tiles(2), 2), {"labels": ["a"]}, "1 labels for 2 images"),
        ((_tiles(2), 2), {"background": (0, 0)}, "background"),
    ],
)
def test_grid_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        draw.make_grid(*args, **kwargs)
