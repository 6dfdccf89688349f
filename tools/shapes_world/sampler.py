"""ShapesWorld scene sampler: random valid scenes and random valid placements.

Everything random is drawn from the `np.random.Generator` passed in, so a seed replays a
scene exactly. Every sampled scene satisfies `valid_scene`: 1..4 objects, square boxes
whose side lies in the size class's range, >= `MARGIN` px from the canvas border and
>= `MIN_GAP` px between boxes. Scenes may be ambiguous (two red circles); the language
generators deal with that.

Callers can pin any attribute of any object (`shapes=["circle", None]`, `colors="red"`),
and `place_object` adds one object to an existing layout, optionally with its centre in a
named 3 x 3 region (used for `add ... at the {region}` and `move` edits).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from lavida_agent.tools.shapes_world.scene import (
    BACKGROUNDS,
    CANVAS,
    COLORS,
    MARGIN,
    MAX_OBJECTS,
    MIN_GAP,
    REGIONS,
    SHAPES,
    SIZES,
    Box,
    Object,
    Scene,
    region_of,
    size_class,
    valid_box,
)

logger = logging.getLogger(__name__)

__all__ = ["Spec", "place_object", "sample_object_specs", "sample_scene"]

# A per-object constraint: None (anything), one value for every object, or one entry per
# object where None leaves that object free.
Spec = str | Sequence[str | None] | None


def _choice(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def _expand(spec: Spec, n: int, what: str, allowed: Sequence[str]) -> list[str | None]:
    """Turn a `Spec` into one entry per object, checking names and length."""
    if spec is None:
        values: list[str | None] = [None] * n
    elif isinstance(spec, str):
        values = [spec] * n
    else:
        values = list(spec)
        if len(values) != n:
            raise ValueError(f"{what} has {len(values)} entries for {n} objects: {spec!r}")
    for v in values:
        if v is not None and v not in allowed:
            raise ValueError(f"unknown {what[:-1]} {v!r}; expected one of {tuple(allowed)}")
    return values


def _spec_length(*specs: Spec) -> int | None:
    """The object count implied by the list-valued specs, or None if none is a list."""
    lengths = {len(s) for s in specs if s is not None and not isinstance(s, str)}
    if len(lengths) > 1:
        raise ValueError(f"per-object constraints disagree on the object count: {sorted(lengths)}")
    return lengths.pop() if lengths else None


def sample_object_specs(
    rng: np.random.Generator,
    n: int,
    *,
    shapes: Spec = None,
    colors: Spec = None,
    sizes: Spec = None,
) -> list[tuple[str, str, str]]:
    """Draw `(shape, color, size)` for `n` objects, honouring any pinned values.

    Args:
        rng: Source of every random draw.
        n: Number of objects.
        shapes: None, one shape for all objects, or one entry (shape or None) per object.
        colors: Same, for colours.
        sizes: Same, for size classes.

    Returns:
        `n` tuples `(shape, color, size)`; free attributes are uniform over the vocabulary.

    Raises:
        ValueError: For an unknown name or a list whose length is not `n`.
    """
    per_object = zip(
        _expand(shapes, n, "shapes", SHAPES),
        _expand(colors, n, "colors", tuple(COLORS)),
        _expand(sizes, n, "sizes", tuple(SIZES)),
        strict=True,
    )
    return [
        (
            shape or _choice(rng, SHAPES),
            color or _choice(rng, tuple(COLORS)),
            size or _choice(rng, tuple(SIZES)),
        )
        for shape, color, size in per_object
    ]


def _axis_starts(side: int, cell: int | None, canvas: int) -> np.ndarray:
    """Box starts along one axis that keep the margin, with the centre in grid cell `cell`.

    `cell` is 0..2 along the axis (column for x, row for y); None allows every start.
    """
    starts = np.arange(MARGIN, canvas - MARGIN - side + 1)
    if cell is not None and len(starts):
        # region_of defines the cells; the grid is the same on both axes, so the index of
        # the cell containing (c, c) modulo 3 is c's cell along either axis.
        cells = np.array([REGIONS.index(region_of(c, c, canvas)) % 3 for c in starts + side / 2.0])
        starts = starts[cells == cell]
    return starts


def _valid_positions(
    xs: np.ndarray, ys: np.ndarray, side: int, others: Sequence[Box]
) -> np.ndarray:
    """All `(x0, y0)` from `xs x ys` whose box keeps `MIN_GAP` to every box in `others`."""
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    ok = np.ones(gx.shape, bool)
    for ox0, oy0, ox1, oy1 in others:
        ok &= (
            (gx + side + MIN_GAP <= ox0)
            | (ox1 + MIN_GAP <= gx)
            | (gy + side + MIN_GAP <= oy0)
            | (oy1 + MIN_GAP <= gy)
        )
    return np.stack([gx[ok], gy[ok]], axis=1)


def place_object(
    rng: np.random.Generator,
    shape: str,
    color: str,
    size: str,
    others: Sequence[Box],
    *,
    region: str | None = None,
    side: int | None = None,
    max_tries: int = 200,
) -> Object | None:
    """Put one object at a random valid position among the boxes `others`.

    The side is uniform over the size class's range (or `side` when given); the position is
    uniform over the valid positions for that side. When no position fits the drawn side,
    the other sides of the class are tried in random order.

    Args:
        rng: Source of every random draw.
        shape: Shape name.
        color: Colour name.
        size: Size class, `"small"` or `"large"`.
        others: Boxes already on the canvas; the new box keeps `MIN_GAP` to each.
        region: If given, the new box's centre lies in this named 3 x 3 cell (`region_of`).
        side: If given, the exact box side; must belong to `size`.
        max_tries: Random position draws per side before falling back to enumerating every
            position, so None means that no position exists, never bad luck.

    Returns:
        The placed `Object`, or None when no valid position exists.

    Raises:
        ValueError: For an unknown name, region, or a side outside the size class.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(SIZES)}")
    if region is not None and region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    if side is not None and size_class(side) != size:
        raise ValueError(f"side {side} is not {size} (range {SIZES[size]})")
    # Object() validates shape and colour before any random draw.
    Object(shape=shape, color=color, size=size, box=(0, 0, 1, 1))

    lo, hi = SIZES[size]
    sides = [side] if side is not None else list(range(lo, hi + 1))
    first = sides.pop(int(rng.integers(len(sides))))
    order = [first] + [sides[i] for i in rng.permutation(len(sides))]
    col = row = None
    if region is not None:
        row, col = divmod(REGIONS.index(region), 3)

    for s in order:
        xs = _axis_starts(s, col, CANVAS)
        ys = _axis_starts(s, row, CANVAS)
        if not len(xs) or not len(ys):
            continue
        for _ in range(max_tries):
            x0, y0 = int(xs[rng.integers(len(xs))]), int(ys[rng.integers(len(ys))])
            box = (x0, y0, x0 + s, y0 + s)
            if valid_box(box, others):
                return Object(shape=shape, color=color, size=size, box=box)
        positions = _valid_positions(xs, ys, s, others)
        if len(positions):
            x0, y0 = (int(v) for v in positions[rng.integers(len(positions))])
            return Object(shape=shape, color=color, size=size, box=(x0, y0, x0 + s, y0 + s))
    return None


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int | None = None,
    background: str | None = None,
    shapes: Spec = None,
    colors: Spec = None,
    sizes: Spec = None,
    max_tries: int = 200,
) -> Scene:
    """Draw a random valid scene.

    Args:
        rng: Source of every random draw.
        n_objects: Number of objects, 1..4; uniform when None (or taken from the length of
            a per-object list in `shapes`, `colors` or `sizes`).
        background: Background name; uniform when None.
        shapes: None, one shape for every object, or one entry (shape or None) per object.
        colors: Same, for colours.
        sizes: Same, for size classes.
        max_tries: Layout attempts. Objects are placed largest first, each at a uniformly
            random valid position; an attempt fails when an object no longer fits, and the
            whole layout is then drawn again.

    Returns:
        A `Scene` with `valid_scene(scene)` true. Object `i` carries the constraints given
        for entry `i`.

    Raises:
        ValueError: For an unknown name, an object count outside 1..4, lists of different
            lengths, or constraints that no layout in `max_tries` attempts satisfied.
    """
    implied = _spec_length(shapes, colors, sizes)
    if n_objects is None:
        n_objects = implied if implied is not None else int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    if background is None:
        background = _choice(rng, tuple(BACKGROUNDS))
    elif background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    specs = sample_object_specs(rng, n_objects, shapes=shapes, colors=colors, sizes=sizes)

    # Large objects first: they are the hardest to fit once others are down.
    order = sorted(range(n_objects), key=lambda i: specs[i][2] != "large")
    for attempt in range(max_tries):
        placed: dict[int, Object] = {}
        for i in order:
            obj = place_object(rng, *specs[i], [o.box for o in placed.values()])
            if obj is None:
                break
            placed[i] = obj
        else:
            if attempt:
                logger.debug("scene laid out after %d failed attempts", attempt)
            return Scene(background=background, objects=tuple(placed[i] for i in range(n_objects)))
    raise ValueError(f"could not lay out {n_objects} objects {specs} in {max_tries} attempts")
