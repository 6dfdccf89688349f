"""Sampler: every scene valid, constraints honoured, seeds replay, errors are clear."""

from collections import Counter

import numpy as np
import pytest
from lavida_agent.tools.shapes_world.sampler import place_object, sample_object_specs, sample_scene
from lavida_agent.tools.shapes_world.scene import (
    REGIONS,
    SIZES,
    region_of,
    size_class,
    valid_box,
    valid_scene,
)


def test_random_scenes_are_valid_and_cover_the_vocabulary():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(500)]
    assert all(valid_scene(s) for s in scenes)
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 90  # uniform 1..4
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == {"circle", "square", "triangle", "diamond"}
    assert len({o.color for o in objects}) == 6
    assert {s.background for s in scenes} == {"white", "black", "gray"}
    for o in objects:
        x0, y0, x1, y1 = o.box
        assert x1 - x0 == y1 - y0 and size_class(x1 - x0) == o.size
    sides = {o.side for o in objects}
    assert sides == set(range(10, 15)) | set(range(18, 25))


def test_same_seed_same_scene():
    a = [sample_scene(np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert sample_scene(np.random.default_rng(8)) != a[0]


def test_constraints_are_honoured_per_object():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(
            rng,
            background="black",
            shapes=["circle", None, "triangle"],
            colors="red",
            sizes=[None, "large", "small"],
        )
        assert valid_scene(scene) and scene.background == "black"
        assert len(scene.objects) == 3
        a, b, c = scene.objects
        assert a.shape == "circle" and c.shape == "triangle"
        assert {o.color for o in scene.objects} == {"red"}
        assert b.size == "large" and c.size == "small"


def test_four_large_objects_always_fit():
    rng = np.random.default_rng(2)
    for _ in range(30):
        scene = sample_scene(rng, n_objects=4, sizes="large")
        assert valid_scene(scene) and all(o.size == "large" for o in scene.objects)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_objects": 0},
        {"n_objects": 5},
        {"background": "pink"},
        {"shapes": ["hexagon"]},
        {"colors": ["red", "blue"], "sizes": ["small"]},
        {"n_objects": 2, "shapes": ["circle"]},
        {"sizes": "medium"},
    ],
)
def test_impossible_or_unknown_constraints_raise(kwargs):
    with pytest.raises(ValueError):
        sample_scene(np.random.default_rng(0), **kwargs)


def test_unlayoutable_scene_raises_clearly():
    # max_tries=0 means no attempt at all: the error must still be a ValueError.
    with pytest.raises(ValueError, match="could not lay out"):
        sample_scene(np.random.default_rng(0), n_objects=1, max_tries=0)


def test_sample_object_specs():
    rng = np.random.default_rng(3)
    specs = sample_object_specs(rng, 3, shapes="square", colors=[None, "blue", None])
    assert len(specs) == 3 and all(s[0] == "square" for s in specs)
    assert specs[1][1] == "blue" and all(s[2] in SIZES for s in specs)


@pytest.mark.parametrize("region", REGIONS)
def test_place_object_in_region(region):
    rng = np.random.default_rng(4)
    for _ in range(20):
        for size in SIZES:
            obj = place_object(rng, "circle", "green", size, [], region=region)
            assert obj is not None and obj.size == size
            assert region_of(*obj.center) == region
            assert valid_box(obj.box)


def test_place_object_respects_others_and_side():
    rng = np.random.default_rng(5)
    others = [(2, 2, 26, 26), (30, 30, 54, 54)]
    for _ in range(50):
        obj = place_object(rng, "square", "orange", "small", others, side=12)
        assert obj is not None and obj.side == 12 and valid_box(obj.box, others)


def test_place_object_returns_none_when_nothing_fits():
    rng = np.random.default_rng(6)
    # The canvas interior is 60 px; a 4 x 4 grid of 14 px boxes with 2 px gaps fills it.
    grid = range(4)
    others = [(2 + 16 * i, 2 + 16 * j, 16 + 16 * i, 16 + 16 * j) for i in grid for j in grid]
    assert place_object(rng, "circle", "red", "small", others) is None
    # A region whose cells cannot hold a large box next to a blocker.
    assert place_object(rng, "circle", "red", "large", [(20, 20, 44, 44)], region="center") is None


def test_place_object_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        place_object(rng, "circle", "red", "small", [], side=20)
    with pytest.raises(ValueError):
        place_object(rng, "circle", "red", "small", [], region="middle")
    with pytest.raises(ValueError):
        place_object(rng, "blob", "red", "small", [])
