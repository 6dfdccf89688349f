"""Tests for tools/boxes.py: Box, conversions, IoU, quantisation and letterbox (property-based)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lavida_agent.tools import boxes
from lavida_agent.tools.boxes import Box

# No per-example deadline: the machine is shared, and timing is not what these tests check.
# (A decorator, not a global profile, so other test modules keep their own settings.)
relaxed = settings(deadline=None)

coord = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
size = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)
canvas_coord = st.floats(min_value=0.0, max_value=64.0, allow_nan=False)


@st.composite
def any_box(draw, lo=-1e4, hi=1e4):
    x0, x1 = sorted(draw(st.floats(lo, hi, allow_nan=False)) for _ in range(2))
    y0, y1 = sorted(draw(st.floats(lo, hi, allow_nan=False)) for _ in range(2))
    return Box(x0, y0, x1, y1)


@st.composite
def canvas_box(draw):
    x0, x1 = sorted(draw(canvas_coord) for _ in range(2))
    y0, y1 = sorted(draw(canvas_coord) for _ in range(2))
    return Box(x0, y0, x1, y1)


@st.composite
def int_canvas_box(draw):
    x0, x1 = sorted(draw(st.integers(0, 64)) for _ in range(2))
    y0, y1 = sorted(draw(st.integers(0, 64)) for _ in range(2))
    return Box(x0, y0, x1, y1)


# -- Box basics ---------------------------------------------------------------------------


def test_box_measures():
    b = Box(10, 20, 30, 50)
    assert (b.width, b.height, b.area, b.center) == (20.0, 30.0, 600.0, (20.0, 35.0))
    assert b.as_tuple() == (10.0, 20.0, 30.0, 50.0)
    assert all(isinstance(v, float) for v in b.as_tuple())
    assert not b.is_empty and Box(3, 3, 3, 9).is_empty


def test_box_coerces_numpy_and_equals_float_box():
    b = Box(np.int64(1), np.float32(2.5), 3, 4)
    assert b == Box(1.0, 2.5, 3.0, 4.0)
    assert hash(b) == hash(Box(1.0, 2.5, 3.0, 4.0))
    assert type(b.x0) is float
    assert json.loads(json.dumps(b.as_tuple())) == [1.0, 2.5, 3.0, 4.0]


def test_box_is_frozen():
    with pytest.raises(AttributeError):
        Box(0, 0, 1, 1).x0 = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "args, match",
    [
        ((5, 0, 4, 1), r"x1 \(4.0\) must be >= x0 \(5.0\)"),
        ((0, 5, 1, 4), r"y1 \(4.0\) must be >= y0 \(5.0\)"),
        ((0, 0, math.nan, 1), "x1 must be finite"),
        ((0, 0, 1, math.inf), "y1 must be finite"),
        (("a", 0, 1, 1), "x0 must be a number"),
        ((True, 0, 1, 1), "x0 must be a number"),
    ],
)
def test_box_validation(args, match):
    with pytest.raises(ValueError, match=match):
        Box(*args)


def test_as_int_rounds_half_up():
    assert Box(0.5, 1.49, 2.5, 3.51).as_int() == (1, 1, 3, 4)
    assert all(isinstance(v, int) for v in Box(0.2, 0, 1, 1).as_int())
    assert boxes.round_half_up(-0.5) == 0 and boxes.round_half_up(2.5) == 3


def test_as_box_accepts_sequences_and_arrays():
    assert boxes.as_box([1, 2, 3, 4]) == Box(1, 2, 3, 4)
    assert boxes.as_box(np.array([1, 2, 3, 4])) == Box(1, 2, 3, 4)
    b = Box(1, 2, 3, 4)
    assert boxes.as_box(b) is b
    with pytest.raises(ValueError, match="4 coordinates"):
        boxes.as_box((1, 2, 3))
    with pytest.raises(ValueError, match="expected a box"):
        boxes.as_box("1234")
    with pytest.raises(ValueError, match="expected a box"):
        boxes.as_box(5)  # type: ignore[arg-type]


def test_clip():
    assert Box(-5, -5, 70, 30).clip(64, 64) == Box(0, 0, 64, 30)
    assert Box(80, 80, 90, 90).clip(64, 64).is_empty
    assert Box(-9, 10, -1, 20).clip(64, 64) == Box(0, 10, 0, 20)
    with pytest.raises(ValueError, match="width and height must be >= 0"):
        Box(0, 0, 1, 1).clip(-1, 5)


@relaxed
@given(any_box(), st.floats(1, 1e4), st.floats(1, 1e4))
def test_clip_stays_inside(b, w, h):
    c = b.clip(w, h)
    assert 0 <= c.x0 <= c.x1 <= w and 0 <= c.y0 <= c.y1 <= h


def test_scale_and_translate():
    assert Box(1, 2, 3, 4).scale(2) == Box(2, 4, 6, 8)
    assert Box(1, 2, 3, 4).scale(2, 3) == Box(2, 6, 6, 12)
    assert Box(1, 2, 3, 4).translate(1, -1) == Box(2, 1, 4, 3)
    with pytest.raises(ValueError, match="sx must be > 0"):
        Box(1, 2, 3, 4).scale(0)


# -- format round trips -------------------------------------------------------------------


@relaxed
@given(coord, coord, size, size)
def test_xywh_round_trip(x, y, w, h):
    b = Box.from_xywh(x, y, w, h)
    x2, y2, w2, h2 = b.to_xywh()
    assert (x2, y2) == (x, y)
    assert w2 == pytest.approx(w, abs=1e-9 * (1 + abs(x)))
    assert h2 == pytest.approx(h, abs=1e-9 * (1 + abs(y)))


@relaxed
@given(any_box())
def test_cxcywh_round_trip(b):
    back = Box.from_cxcywh(*b.to_cxcywh())
    for u, v in zip(back.as_tuple(), b.as_tuple(), strict=True):
        assert u == pytest.approx(v, abs=1e-8)


@relaxed
@given(any_box(), st.floats(1, 1e4), st.floats(1, 1e4))
def test_normalized_round_trip(b, w, h):
    n = b.to_normalized(w, h)
    back = Box.from_normalized(n, w, h)
    for u, v in zip(back.as_tuple(), b.as_tuple(), strict=True):
        assert u == pytest.approx(v, rel=1e-12, abs=1e-9)


def test_normalized_values_and_errors():
    assert Box(0, 16, 32, 64).to_normalized(64, 64) == Box(0, 0.25, 0.5, 1.0)
    assert Box.from_normalized((0, 0.25, 0.5, 1.0), 64, 64) == Box(0, 16, 32, 64)
    with pytest.raises(ValueError, match="width must be > 0"):
        Box(0, 0, 1, 1).to_normalized(0, 5)


def test_from_xywh_rejects_negative_size():
    with pytest.raises(ValueError, match="x1 .* must be >= x0"):
        Box.from_xywh(10, 10, -1, 5)


# -- IoU ----------------------------------------------------------------------------------


def test_iou_known_values():
    assert boxes.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert boxes.iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges: no overlap
    assert boxes.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert boxes.iou(Box(0, 0, 2, 2), [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert boxes.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert boxes.intersection((0, 0, 10, 10), (5, 5, 20, 20)) == Box(5, 5, 10, 10)
    assert boxes.intersection((0, 0, 1, 1), (2, 2, 3, 3)) is None


@relaxed
@given(any_box(), any_box())
def test_iou_symmetric_and_bounded(a, b):
    v = boxes.iou(a, b)
    assert 0.0 <= v <= 1.0
    assert v == boxes.iou(b, a)


@relaxed
@given(any_box())
def test_iou_identical_is_one(b):
    assert boxes.iou(b, b) == (0.0 if b.area == 0 else 1.0)


@relaxed
@given(any_box(lo=-100, hi=100), st.floats(0, 100), st.floats(0.001, 100))
def test_iou_disjoint_is_zero(b, gap, w):
    other = Box(b.x1 + gap, b.y0, b.x1 + gap + w, b.y1)
    assert boxes.iou(b, other) == 0.0


@relaxed
@given(st.lists(any_box(lo=0, hi=64), max_size=5), st.lists(any_box(lo=0, hi=64), max_size=5))
def test_iou_matrix_matches_scalar(a, b):
    m = boxes.iou_matrix(a, b)
    assert m.shape == (len(a), len(b))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert m[i, j] == pytest.approx(boxes.iou(x, y), abs=1e-12)


# -- quantisation -------------------------------------------------------------------------


@relaxed
@given(canvas_box())
def test_quantize_round_trip_within_half_bin(b):
    q = boxes.quantize(b)
    assert all(isinstance(v, int) and 0 <= v <= 64 for v in q)
    back = boxes.dequantize(q)
    for u, v in zip(back.as_tuple(), b.as_tuple(), strict=True):
        assert abs(u - v) <= 0.5 + 1e-9


@relaxed
@given(int_canvas_box())
def test_quantize_exact_on_integer_grid(b):
    q = boxes.quantize(b, canvas=64)
    assert q == b.as_int()
    assert boxes.dequantize(q, canvas=64) == b


@relaxed
@given(canvas_box(), st.integers(2, 1025), st.integers(1, 2048))
def test_quantize_other_grids(b, bins, canvas):
    b = b.scale(canvas / 64)
    q = boxes.quantize(b, canvas=canvas, bins=bins)
    assert all(0 <= v <= bins - 1 for v in q)
    assert q[0] <= q[2] and q[1] <= q[3]
    half_bin = canvas / (bins - 1) / 2
    back = boxes.dequantize(q, canvas=canvas, bins=bins)
    for u, v in zip(back.as_tuple(), b.as_tuple(), strict=True):
        assert abs(u - v) <= half_bin * (1 + 1e-9)


def test_quantize_clamps_outside_canvas():
    assert boxes.quantize((-10, -3, 70, 100)) == (0, 0, 64, 64)


def test_quantize_1025_bins():
    # Lavida-O's 1025-bin grid on a 1024 px canvas is also exact for integer pixels.
    assert boxes.quantize((0, 1, 512, 1024), canvas=1024) == (0, 1, 512, 1024)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"canvas": -64}, "canvas must be > 0"),
        ({"canvas": 0}, "canvas must be > 0"),
        ({"bins": 1}, "bins must be >= 2"),
        ({"bins": 2.5}, "bins must be an integer"),
        ({"canvas": 63.5}, "bins is required"),
    ],
)
def test_quantize_grid_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        boxes.quantize((0, 0, 1, 1), **kwargs)
    with pytest.raises(ValueError, match=match):
        boxes.dequantize((0, 0, 1, 1), **kwargs)


def test_dequantize_validation():
    with pytest.raises(ValueError, match=r"bin x1=65 is outside 0..64"):
        boxes.dequantize((0, 0, 65, 1))
    with pytest.raises(ValueError, match="bin y0=-1 is outside"):
        boxes.dequantize((0, -1, 5, 5))
    with pytest.raises(ValueError, match="must be an integer"):
        boxes.dequantize((0, 0, 1.5, 1))
    with pytest.raises(ValueError, match="expected 4 bins"):
        boxes.dequantize((0, 0, 1))
    with pytest.raises(ValueError, match="x1 .* must be >= x0"):
        boxes.dequantize((10, 0, 5, 5))
    assert boxes.dequantize(np.array([1, 2, 3, 4])) == Box(1, 2, 3, 4)


# -- letterbox ----------------------------------------------------------------------------


def test_letterbox_params_values():
    p = boxes.letterbox_params(100, 50, 64)
    assert p == boxes.LetterboxParams(scale=0.64, pad_x=0, pad_y=16, size=64)
    assert p.content_size(100, 50) == (64, 32)
    p = boxes.letterbox_params(30, 90, 64)
    assert p.content_size(30, 90) == (21, 64)
    assert (p.pad_x, p.pad_y) == (21, 0)  # 64 - 21 = 43: the odd pixel goes right
    assert boxes.letterbox_params(64, 64) == boxes.LetterboxParams(1.0, 0, 0, 64)


@pytest.mark.parametrize(
    "args, match",
    [((0, 5, 64), "width"), ((5, -1, 64), "height"), ((5, 5, 0), "size"), ((5.0, 5, 64), "width")],
)
def test_letterbox_params_validation(args, match):
    with pytest.raises(ValueError, match=match):
        boxes.letterbox_params(*args)


@relaxed
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 1024), st.data())
def test_letterbox_round_trip(w, h, size, data):
    p = boxes.letterbox_params(w, h, size)
    cw, ch = p.content_size(w, h)
    assert max(cw, ch) == size
    assert 0 <= p.pad_x and p.pad_x + cw <= size and 0 <= p.pad_y and p.pad_y + ch <= size
    x0, x1 = sorted(data.draw(st.floats(0, w)) for _ in range(2))
    y0, y1 = sorted(data.draw(st.floats(0, h)) for _ in range(2))
    b = Box(x0, y0, x1, y1)
    there = boxes.to_letterbox(b, p)
    assert -1e-9 <= there.x0 and there.x1 <= size + 1e-9
    back = boxes.from_letterbox(there, p)
    for u, v in zip(back.as_tuple(), b.as_tuple(), strict=True):
        assert abs(u - v) <= 1e-6


def test_letterbox_maps_full_image_to_content_area():
    p = boxes.letterbox_params(200, 100, 64)
    assert boxes.to_letterbox((0, 0, 200, 100), p) == Box(0, 16, 64, 48)
    assert boxes.from_letterbox([0, 16, 64, 48], p) == Box(0, 0, 200, 100)
