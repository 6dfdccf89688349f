"""Detector: exact on clean renders, robust to decoder-like blur and noise, honest about blobs."""


import cv2
import numpy as np
import pytest
from lavida_agent.tools.shapes_world.detect import (
    MIN_AREA,
    Detection,
    detect,
    match_objects,
    scenes_match,
)
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.sampler import sample_scene
from lavida_agent.tools.shapes_world.scene import BACKGROUNDS, COLORS, SHAPES, Object, Scene


def _degrade(image: np.ndarray, rng: np.random.Generator, sigma=0.6, noise=10) -> np.ndarray:
    """Mimic a VQ decoder: Gaussian blur plus uniform colour noise of +-`noise` per channel."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
    return np.clip(blurred + rng.uniform(-noise, noise, blurred.shape), 0, 255).astype(np.uint8)


def test_exact_on_2000_random_scenes():
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng) for _ in range(2000)]
    images = [render(s) for s in scenes]
    detections = [detect(im) for im in images]
    failures = [
        i
        for i, (s, d) in enumerate(zip(scenes, detections, strict=True))
        if not scenes_match(s, d, box_tol=0)
    ]
    assert not failures, [(scenes[i], detections[i]) for i in failures[:3]]


def test_robust_to_blur_and_colour_noise():
    rng = np.random.default_rng(11)
    noise_rng = np.random.default_rng(12)
    for _ in range(300):
        scene = sample_scene(rng)
        found = detect(_degrade(render(scene), noise_rng))
        assert scenes_match(scene, found, box_tol=1), (scene, found)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [10, 13, 14, 18, 21, 24])
def test_every_shape_and_side_on_every_background(shape, side):
    for background in BACKGROUNDS:
        for color in COLORS:
            size = "small" if side < 16 else "large"
            obj = Object(shape, color, size, (20, 9, 20 + side, 9 + side))
            scene = Scene(background, (obj,))
            assert detect(render(scene)) == Detection(background, (obj,), ())


def test_specks_are_ignored_and_unknown_colours_reported():
    image = render(Scene("white", (Object("circle", "red", "large", (4, 4, 26, 26)),)))
    image[40:43, 40:43] = (0, 200, 200)  # 9 px speck of a non-palette colour
    assert 9 < MIN_AREA
    image[30:42, 5:17] = (0, 200, 200)  # 12 x 12 cyan square: unknown colour
    image[46:60, 46:60] = BACKGROUNDS["black"]  # a background colour is not a palette colour
    found = detect(image)
    assert [o.name for o in found.objects] == ["red circle"]
    assert found.unknown == ((5, 30, 17, 42), (46, 46, 60, 60))


def test_unknown_shapes_and_sizes_are_reported():
    image = render(Scene("gray", ()))
    image[5:25, 5:25] = COLORS["blue"]
    image[10:20, 10:20] = BACKGROUNDS["gray"]  # a ring: no template fits
    image[40:44, 40:60] = COLORS["green"]  # a bar: not square
    image[50:54, 5:9] = COLORS["red"]  # 16 px, too small for a size class
    found = detect(image)
    assert found.objects == ()
    assert set(found.unknown) == {(5, 5, 25, 25), (40, 40, 60, 44), (5, 50, 9, 54)}


def test_sides_between_classes_go_to_the_nearest_class():
    def size_of(side):
        scene = Scene("white", (Object("square", "red", "small", (5, 5, 5 + side, 5 + side)),))
        found = detect(render(scene))
        return found.objects[0].size if found.objects else None

    assert [size_of(s) for s in (15, 16, 17)] == ["small", "small", "large"]
    assert size_of(30) is None


def test_touching_objects_of_different_colours_are_split():
    scene = Scene(
        "white",
        (
            Object("square", "red", "large", (10, 10, 30, 30)),
            Object("square", "blue", "large", (30, 10, 50, 30)),  # shares an edge
        ),
    )
    assert scenes_match(scene, detect(render(scene)))


def test_touching_objects_of_the_same_colour_merge_into_an_unknown_blob():
    scene = Scene(
        "white",
        (
            Object("circle", "red", "large", (10, 10, 30, 30)),
            Object("circle", "red", "small", (29, 14, 41, 26)),
        ),
    )
    found = detect(render(scene))
    assert found.objects == () and found.unknown == ((10, 10, 41, 30),)


def test_background_detection_and_none():
    for name, rgb in BACKGROUNDS.items():
        image = np.full((64, 64, 3), rgb, np.uint8)
        image = np.clip(image.astype(int) + 12, 0, 255).astype(np.uint8)  # a decoder's shift
        assert detect(image).background == name
    red = np.full((64, 64, 3), COLORS["red"], np.uint8)
    found = detect(red)
    assert found.background is None and found.objects == ()
    with pytest.raises(ValueError, match="no background"):
        _ = found.scene


def test_detection_scene_and_dict_round_trip():
    scene = sample_scene(np.random.default_rng(3), n_objects=3)
    found = detect(render(scene))
    assert scenes_match(scene, found)
    assert found.scene.background == scene.background
    assert match_objects(scene.objects, found.scene.objects, box_tol=0) is not None
    d = found.to_dict()
    assert set(d) == {"background", "objects", "unknown"}
    assert set(d["objects"][0]) == {"shape", "color", "size", "box"}
    assert isinstance(d["objects"][0]["box"], list)
    assert Detection.from_dict(d) == found


def test_match_objects_is_order_independent():
    a = Object("circle", "red", "small", (2, 2, 14, 14))
    b = Object("square", "blue", "large", (30, 30, 50, 50))
    moved = b.moved_to((31, 30, 51, 50))
    assert match_objects([a, b], [moved, a]) == [(0, 1), (1, 0)]
    assert match_objects([a, b], [moved, a], box_tol=0) is None
    assert match_objects([a, b], [a]) is None


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError):
        detect(np.zeros((64, 64), np.uint8))
