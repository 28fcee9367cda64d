"""The toy world: the pretraining world's captioned renders (see world.py and /work/shared/TOYWORLD.md)."""

from calora_ray.toyworld.world import (
    BASE_PROMPTS,
    CONDITION_PHRASES,
    CONDITIONS,
    STYLES,
    VIEWPOINTS,
    caption,
    join_class_names,
    render_world,
    render_world_sample,
    sample_attributes,
)

__all__ = [
    "BASE_PROMPTS",
    "CONDITIONS",
    "CONDITION_PHRASES",
    "STYLES",
    "VIEWPOINTS",
    "caption",
    "join_class_names",
    "render_world",
    "render_world_sample",
    "sample_attributes",
]
