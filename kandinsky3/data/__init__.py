"""Synthetic training data: procedurally rendered, captioned shape scenes (see ``shapes.py``)."""

from .shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    OBJECT_COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Placement,
    Scene,
    ShapeSpec,
    ShapesDataset,
    caption,
    caption_with_spec,
    check_scene,
    eval_prompts,
    image_to_tensor,
    layout,
    parse_caption,
    region_of,
    render,
    render_array,
    sample_scene,
    tensor_to_image,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "HELD_OUT_PAIRS", "OBJECT_COLOURS", "POSITIONS", "RELATIONS", "SHAPES",
    "SIZES", "SPLITS", "Placement", "Scene", "ShapeSpec", "ShapesDataset", "caption",
    "caption_with_spec", "check_scene", "eval_prompts", "image_to_tensor", "layout", "parse_caption",
    "region_of", "render", "render_array", "sample_scene", "tensor_to_image",
]
