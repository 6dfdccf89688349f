"""ShapesWorld scene graph and the queries built on it.

`scene_graph` turns a `Scene` into a networkx `MultiDiGraph`: one node per object (by index
into `scene.objects`) and one edge `a -> b` keyed by each relation of `RELATIONS` for which
`holds(relation, a, b)`. The query helpers answer the questions that captions, referring
expressions, understanding questions and the evaluator ask; they work on the scene
directly (no graph needed), with the same relation rule.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import networkx as nx
from lavida_agent.tools.shapes_world.scene import RELATIONS, Scene, holds, region_of

logger = logging.getLogger(__name__)

__all__ = ["SIDES", "extreme", "matching", "related", "scene_graph"]

# side -> (centre coordinate index, sign): the extreme is the candidate maximising
# sign * centre[index], so `left` is the smallest centre x and `top` the smallest centre y.
SIDES: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "top": (1, -1),
    "bottom": (1, 1),
}


def scene_graph(scene: Scene) -> nx.MultiDiGraph:
    """Build the relation graph of `scene`.

    Args:
        scene: The scene.

    Returns:
        A `MultiDiGraph` with graph attribute `background`; node `i` (index into
        `scene.objects`) has attributes `shape`, `color`, `size`, `box`, `center` and
        `region` (the named 3 x 3 cell of the centre); for every ordered pair `(i, j)` and
        relation `r` with `holds(r, objects[i], objects[j])` there is an edge `i -> j`
        with key `r` and attribute `relation=r` ("i is r j").
    """
    graph = nx.MultiDiGraph(background=scene.background)
    for i, obj in enumerate(scene.objects):
        graph.add_node(
            i,
            shape=obj.shape,
            color=obj.color,
            size=obj.size,
            box=obj.box,
            center=obj.center,
            region=region_of(*obj.center),
        )
    for i, a in enumerate(scene.objects):
        for j, b in enumerate(scene.objects):
            if i == j:
                continue
            for relation in RELATIONS:
                if holds(relation, a, b):
                    graph.add_edge(i, j, key=relation, relation=relation)
    return graph


def _check_index(scene: Scene, i: int) -> None:
    if not 0 <= i < len(scene.objects):
        raise IndexError(f"object index {i} out of range for {len(scene.objects)} objects")


def related(scene: Scene, i: int, relation: str) -> list[int]:
    """Indices of the objects that are `relation` object `i`, in scene order.

    This answers "what is {relation} the {object i}?": `related(scene, i, "left of")` lists
    every `j != i` with `holds("left of", objects[j], objects[i])`.

    Raises:
        ValueError: For an unknown relation.
        IndexError: For an index outside the scene.
    """
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    _check_index(scene, i)
    anchor = scene.objects[i]
    return [j for j, o in enumerate(scene.objects) if j != i and holds(relation, o, anchor)]


def extreme(
    scene: Scene, candidates: Iterable[int], side: str, *, margin: float = 0.0
) -> int | None:
    """The candidate furthest towards `side` by centre ("the circle on the left").

    Args:
        scene: The scene.
        candidates: Object indices to choose among.
        side: `"left"`, `"right"`, `"top"` or `"bottom"`.
        margin: The winner must beat the runner-up by more than this many pixels; with the
            default 0 only an exact tie is refused.

    Returns:
        The index of the extreme candidate, or None when there are no candidates or the
        extreme is tied (within `margin`). A single candidate is its own extreme.

    Raises:
        ValueError: For an unknown side.
        IndexError: For an index outside the scene.
    """
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; expected one of {tuple(SIDES)}")
    axis, sign = SIDES[side]
    indices = list(candidates)
    for i in indices:
        _check_index(scene, i)
    ranked = sorted(((sign * scene.objects[i].center[axis], i) for i in indices), reverse=True)
    if not ranked:
        return None
    if len(ranked) > 1 and ranked[0][0] - ranked[1][0] <= margin:
        return None
    return ranked[0][1]


def matching(
    scene: Scene,
    shape: str | None = None,
    color: str | None = None,
    size: str | None = None,
) -> list[int]:
    """Indices, in scene order, of the objects with the given attributes (None matches any)."""
    return [
        i
        for i, o in enumerate(scene.objects)
        if (shape is None or o.shape == shape)
        and (color is None or o.color == color)
        and (size is None or o.size == size)
    ]
