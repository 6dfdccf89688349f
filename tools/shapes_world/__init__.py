"""ShapesWorld v1: the synthetic world the embedded model is trained and measured on."""

from lavida_agent.tools.shapes_world.scene import (
    BACKGROUNDS,
    CANVAS,
    COLORS,
    REGIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Object,
    Scene,
    boxes_apart,
    holds,
    region_box,
    region_of,
    size_class,
    valid_box,
    valid_scene,
)

__all__ = [
    "BACKGROUNDS", "CANVAS", "COLORS", "REGIONS", "RELATIONS", "SHAPES", "SIZES",
    "Object", "Scene", "boxes_apart", "holds", "region_box", "region_of", "size_class",
    "valid_box", "valid_scene",
]  # fmt: skip
