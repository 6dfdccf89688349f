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
    holds,
    region_box,
    region_of,
    size_class,
)

__all__ = [
    "BACKGROUNDS", "CANVAS", "COLORS", "REGIONS", "RELATIONS", "SHAPES", "SIZES",
    "Object", "Scene", "holds", "region_box", "region_of", "size_class",
]  # fmt: skip
