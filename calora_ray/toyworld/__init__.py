"""The toy world: procedural street scenes with their label maps, rendered offline.

    city.py          the target / source city (render_scene, DOMAINS) and the drawing primitives
                     every renderer shares (layouts, the first-person camera, the painter)
    topdown.py       the top-down (orthographic) street layout
    world.py         the pretraining world's concepts: styles, viewpoints, conditions, captions,
                     each sample's attributes
    world_render.py  the pretraining world's renderer (render_world, render_world_sample)
    splits.py        the toy datasets' splits: the render seed of each sample (toy_render_seed)
    pretrain.py      pretraining toy-sd on the world (a driver; not imported here)
"""

from calora_ray.toyworld.city import DOMAINS, render_grid, render_scene
from calora_ray.toyworld.splits import TOY_SEED_STRIDE, TOY_SPLITS, toy_render_seed
from calora_ray.toyworld.world import (
    BASE_PROMPTS,
    CONDITION_PHRASES,
    CONDITIONS,
    STYLES,
    VIEWPOINTS,
    caption,
    first_person_indices,
    parse_caption,
    sample_attributes,
)
from calora_ray.toyworld.world_render import WORLD_HORIZON_MAX, render_world, render_world_grid, render_world_sample

__all__ = [
    "BASE_PROMPTS",
    "CONDITIONS",
    "CONDITION_PHRASES",
    "DOMAINS",
    "STYLES",
    "TOY_SEED_STRIDE",
    "TOY_SPLITS",
    "VIEWPOINTS",
    "WORLD_HORIZON_MAX",
    "caption",
    "first_person_indices",
    "parse_caption",
    "render_grid",
    "render_scene",
    "render_world",
    "render_world_grid",
    "render_world_sample",
    "sample_attributes",
    "toy_render_seed",
]
