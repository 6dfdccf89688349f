"""Scene graph and query helpers."""

import networkx as nx
import numpy as np
import pytest
from lavida_agent.tools.shapes_world.graph import extreme, matching, related, scene_graph
from lavida_agent.tools.shapes_world.sampler import sample_scene
from lavida_agent.tools.shapes_world.scene import RELATIONS, Object, Scene, holds

# 0: red circle top left, 1: blue square top right, 2: red triangle bottom centre,
# 3: green circle at the same centre x as 0 (ties with it for "left").
SCENE = Scene(
    "white",
    (
        Object("circle", "red", "small", (4, 4, 16, 16)),  # centre (10, 10)
        Object("square", "blue", "large", (40, 4, 60, 24)),  # centre (50, 14)
        Object("triangle", "red", "large", (22, 40, 42, 60)),  # centre (32, 50)
        Object("circle", "green", "small", (4, 24, 16, 36)),  # centre (10, 30)
    ),
)


def test_scene_graph_nodes_and_edges():
    graph = scene_graph(SCENE)
    assert isinstance(graph, nx.MultiDiGraph)
    assert graph.graph["background"] == "white"
    assert graph.nodes[0] == {
        "shape": "circle", "color": "red", "size": "small", "box": (4, 4, 16, 16),
        "center": (10.0, 10.0), "region": "top left",
    }  # fmt: skip
    assert graph.nodes[2]["region"] == "bottom"
    assert graph.has_edge(0, 1, key="left of") and graph.has_edge(1, 0, key="right of")
    assert graph.has_edge(0, 2, key="above") and graph.has_edge(2, 0, key="below")
    # Same centre x: neither is left of the other.
    assert not graph.has_edge(0, 3, key="left of") and not graph.has_edge(3, 0, key="left of")
    # Centres 4 px apart in y (10 vs 14) are not "above": the rule needs more than 4.
    assert not graph.has_edge(0, 1, key="above")


def test_scene_graph_matches_holds_on_random_scenes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        graph = scene_graph(scene)
        for i, a in enumerate(scene.objects):
            for j, b in enumerate(scene.objects):
                for r in RELATIONS:
                    expected = i != j and holds(r, a, b)
                    assert graph.has_edge(i, j, key=r) == expected
                    if expected:
                        assert graph.edges[i, j, r]["relation"] == r


def test_related():
    assert related(SCENE, 1, "left of") == [0, 2, 3]
    assert related(SCENE, 0, "below") == [2, 3]
    assert related(SCENE, 2, "below") == []
    with pytest.raises(ValueError):
        related(SCENE, 0, "near")
    with pytest.raises(IndexError):
        related(SCENE, 4, "above")


def test_extreme():
    everything = range(4)
    assert extreme(SCENE, everything, "right") == 1
    assert extreme(SCENE, everything, "bottom") == 2
    assert extreme(SCENE, everything, "top") == 0
    assert extreme(SCENE, everything, "left") is None  # 0 and 3 tie at centre x 10
    assert extreme(SCENE, [0, 2], "left") == 0
    assert extreme(SCENE, [2], "top") == 2
    assert extreme(SCENE, [], "top") is None
    assert extreme(SCENE, [0, 1], "top", margin=4) is None  # 10 vs 14 is within the margin
    with pytest.raises(ValueError):
        extreme(SCENE, everything, "middle")


def test_matching():
    assert matching(SCENE) == [0, 1, 2, 3]
    assert matching(SCENE, shape="circle") == [0, 3]
    assert matching(SCENE, color="red") == [0, 2]
    assert matching(SCENE, color="red", size="large") == [2]
    assert matching(SCENE, shape="diamond") == []
