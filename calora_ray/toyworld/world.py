"""The pretraining world's concepts: its styles, viewpoints and conditions, the captions that name
them, and which of them each sample shows.

Every sample is a street rendered (calora_ray.toyworld.world_render) in one style, from one
viewpoint, under one condition, with a label map and a caption in the paper's prompt shapes:

    {Photorealistic first-person urban street view | Sketch of first-person urban street view |
     Photorealistic urban street in top-down view | Sketch of urban street in top-down view}
    [ with {class names}] [ in clear weather | in foggy weather | at night | in rainy weather |
                            in snowy weather]

A caption without a condition phrase always shows clear weather ("no phrase" means clear).
"""

from __future__ import annotations

import numpy as np

from calora_ray.concepts import join_class_names
from calora_ray.toyworld.splits import toy_render_seed

STYLES: tuple[str, ...] = ("photorealistic", "sketch")
VIEWPOINTS: tuple[str, ...] = ("first-person", "top-down")
CONDITIONS: tuple[str, ...] = ("clear", "foggy", "night", "rainy", "snowy")

BASE_PROMPTS: dict[tuple[str, str], str] = {
    ("photorealistic", "first-person"): "Photorealistic first-person urban street view",
    ("sketch", "first-person"): "Sketch of first-person urban street view",
    ("photorealistic", "top-down"): "Photorealistic urban street in top-down view",
    ("sketch", "top-down"): "Sketch of urban street in top-down view",
}
CONDITION_PHRASES: dict[str, str] = {
    "clear": " in clear weather",
    "foggy": " in foggy weather",
    "night": " at night",
    "rainy": " in rainy weather",
    "snowy": " in snowy weather",
}
CAPTION_MIN_FRACTION = 0.0   # a class is named when it has any pixel (as training.captions_for does)

# One balanced block of attribute draws: every (style, viewpoint, condition, with_classes)
# appears twice, once with each with_condition flag (forced True unless the condition is clear).
_BLOCK = len(STYLES) * len(VIEWPOINTS) * len(CONDITIONS) * 2 * 2


def caption(style: str, viewpoint: str, condition: str | None = None, class_names=None) -> str:
    """The caption of a render: the base prompt of (style, viewpoint), then ' with {names}' when
    class_names is non-empty, then the condition phrase when condition is given (None: none).

    caption("sketch", "top-down", "night", ["road", "building", "car"])
    -> "Sketch of urban street in top-down view with road, building and car at night"
    """
    if (style, viewpoint) not in BASE_PROMPTS:
        raise ValueError(f"unknown style / viewpoint {style!r} / {viewpoint!r}; styles: {', '.join(STYLES)}; "
                         f"viewpoints: {', '.join(VIEWPOINTS)}")
    if condition is not None and condition not in CONDITION_PHRASES:
        raise ValueError(f"unknown condition {condition!r}; valid: {', '.join(CONDITIONS)} or None")
    text = BASE_PROMPTS[(style, viewpoint)]
    if class_names:
        text += " with " + join_class_names(class_names)
    if condition is not None:
        text += CONDITION_PHRASES[condition]
    return text


def sample_attributes(seed: int) -> dict:
    """The concepts of world sample `seed`: dict(style, viewpoint, condition, with_classes, with_condition).

    Deterministic; balanced: each block of 80 consecutive seeds (starting at a multiple of 80)
    holds every (style, viewpoint, condition) exactly 4 times, with_classes half of the time,
    and for clear weather the condition phrase half of the time (other conditions always name
    themselves, since a caption without a phrase means clear weather).
    """
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"toy world seed must be a non-negative integer, got {seed}")
    block, i = divmod(seed, _BLOCK)
    j = int(np.random.default_rng([block, 7, 11]).permutation(_BLOCK)[i])
    j, phrase = divmod(j, 2)
    j, with_classes = divmod(j, 2)
    j, c = divmod(j, len(CONDITIONS))
    s, v = divmod(j, len(VIEWPOINTS))
    condition = CONDITIONS[c]
    return {"style": STYLES[s], "viewpoint": VIEWPOINTS[v], "condition": condition,
            "with_classes": bool(with_classes), "with_condition": bool(phrase) or condition != "clear"}


def parse_caption(text: str) -> dict:
    """The concepts a prompt asks for: dict(style, viewpoint, condition), each None when the prompt
    does not say (a prompt that is not in the toy world's shapes). The inverse of caption():

    parse_caption("Sketch of urban street in top-down view with road and car at night")
    -> {"style": "sketch", "viewpoint": "top-down", "condition": "night"}

    A world-shaped prompt without a condition phrase asks for clear weather, as in the captions.
    """
    text = " ".join(str(text).split())
    style = viewpoint = condition = None
    for (s, v), base in BASE_PROMPTS.items():
        if text.startswith(base):
            style, viewpoint = s, v
            break
    for c, phrase in CONDITION_PHRASES.items():
        if text.endswith(phrase):
            condition = c
            break
    if condition is None and style is not None:
        condition = "clear"
    return {"style": style, "viewpoint": viewpoint, "condition": condition}


def first_person_indices(split: str, num_images: int) -> list[int]:
    """Indices among the first `num_images` of toy:world's `split` whose sample is first-person
    (about half), known from the seeds alone: nothing is rendered."""
    return [i for i in range(num_images) if sample_attributes(toy_render_seed(split, i))["viewpoint"] == "first-person"]
