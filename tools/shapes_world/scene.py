"""ShapesWorld v1 scene model: the vocabulary, `Object`, `Scene` and the spatial relations.

This file is the single source of the constants fixed by `SHAPES_WORLD.md` (canvas size,
palette, backgrounds, size classes) and of the relation predicates every other part of
ShapesWorld uses: the sampler, the text generators and parsers, the detector and the
checkers. Pure Python (no numpy, no OpenCV), so it is cheap to import anywhere.

Boxes are `(x0, y0, x1, y1)` in pixels, x right, y down, x1/y1 exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

CANVAS = 64  # side of the square canvas in pixels

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

# Size class -> inclusive range of the bounding-box side in pixels.
SIZES: dict[str, tuple[int, int]] = {"small": (10, 14), "large": (18, 24)}

MAX_OBJECTS = 4
MIN_GAP = 2  # pixels between two objects' boxes
MARGIN = 2  # pixels between an object's box and the canvas border
RELATION_SLACK = 4  # `A left of B` means centre_x(A) + 4 < centre_x(B)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# The 3 x 3 grid of named regions, row-major from the top left.
REGIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Object:
    """One flat-coloured shape on the canvas."""

    shape: str
    color: str
    size: str
    box: Box

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")
        object.__setattr__(self, "box", tuple(int(v) for v in self.box))
        if len(self.box) != 4:
            raise ValueError(f"box must have 4 coordinates, got {self.box!r}")

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    @property
    def side(self) -> int:
        """The larger side of the bounding box in pixels."""
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0)

    @property
    def name(self) -> str:
        """`"red circle"`: colour and shape, the words a prompt uses for the object."""
        return f"{self.color} {self.shape}"

    def moved_to(self, box: Box) -> Object:
        return replace(self, box=tuple(box))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Object:
        return cls(shape=d["shape"], color=d["color"], size=d["size"], box=tuple(d["box"]))


@dataclass(frozen=True)
class Scene:
    """A background colour and 0..4 objects (the sampler always draws 1..4)."""

    background: str
    objects: tuple[Object, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; expected one of {tuple(BACKGROUNDS)}"
            )
        object.__setattr__(self, "objects", tuple(self.objects))

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(background=d["background"], objects=tuple(Object.from_dict(o) for o in d["objects"]))

    def sorted_left_to_right(self) -> tuple[Object, ...]:
        """Objects ordered by centre x, then centre y (the canonical caption order)."""
        return tuple(sorted(self.objects, key=lambda o: (o.center[0], o.center[1])))


# --------------------------------------------------------------------------- relations


def holds(relation: str, a: Object, b: Object) -> bool:
    """Whether `a {relation} b` holds by the centre rule of SHAPES_WORLD.md."""
    (ax, ay), (bx, by) = a.center, b.center
    if relation == "left of":
        return ax + RELATION_SLACK < bx
    if relation == "right of":
        return bx + RELATION_SLACK < ax
    if relation == "above":
        return ay + RELATION_SLACK < by
    if relation == "below":
        return by + RELATION_SLACK < ay
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def region_of(x: float, y: float, canvas: int = CANVAS) -> str:
    """The named 3 x 3 cell containing the point `(x, y)`."""
    col = min(2, max(0, int(x * 3 // canvas)))
    row = min(2, max(0, int(y * 3 // canvas)))
    return REGIONS[row * 3 + col]


def region_box(region: str, canvas: int = CANVAS) -> Box:
    """The pixel box `(x0, y0, x1, y1)` of a named 3 x 3 cell.

    Integer pixels `x` with `x0 <= x < x1` are exactly those `region_of` puts in the cell.
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    i = REGIONS.index(region)
    row, col = divmod(i, 3)
    edges = [-(-k * canvas // 3) for k in range(4)]  # ceil(k * canvas / 3)
    return (edges[col], edges[row], edges[col + 1], edges[row + 1])


def size_class(side: int) -> str | None:
    """`"small"`, `"large"` or None for a side outside both ranges."""
    for name, (lo, hi) in SIZES.items():
        if lo <= side <= hi:
            return name
    return None


def boxes_apart(a: Box, b: Box, gap: int = MIN_GAP) -> bool:
    """True when boxes `a` and `b` are separated by at least `gap` pixels on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def valid_box(box: Box, others: tuple[Box, ...] | list[Box] = (), canvas: int = CANVAS) -> bool:
    """Whether `box` lies inside the canvas with `MARGIN` and keeps `MIN_GAP` to every other box."""
    x0, y0, x1, y1 = box
    inside = x0 >= MARGIN and y0 >= MARGIN and x1 <= canvas - MARGIN and y1 <= canvas - MARGIN
    return inside and x1 > x0 and y1 > y0 and all(boxes_apart(box, o) for o in others)


def valid_scene(scene: Scene) -> bool:
    """Whether every constraint of SHAPES_WORLD.md holds (count, sizes, margins, gaps)."""
    if len(scene.objects) > MAX_OBJECTS:
        return False
    boxes = [o.box for o in scene.objects]
    for i, o in enumerate(scene.objects):
        x0, y0, x1, y1 = o.box
        if x1 - x0 != y1 - y0 or size_class(x1 - x0) != o.size:
            return False
        if not valid_box(o.box, boxes[:i] + boxes[i + 1 :]):
            return False
    return True
