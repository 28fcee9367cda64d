"""Which scenes the toy datasets' splits hold: the render seed of every sample.

Each dataset seed owns a block of TOY_SEED_STRIDE render seeds, and the val split lies above every
train seed, so the held-out split never contains a few-shot training scene.
"""

from __future__ import annotations

TOY_SPLITS = ("train", "val")
TOY_SEED_STRIDE = 1_000_003    # each dataset seed owns a block of render seeds (≤ this many images)
_VAL_OFFSET = 2**40            # val render seeds lie above every train render seed (dataset seed < 10**6)


def toy_render_seed(split: str, index: int, seed: int = 0) -> int:
    """The render seed (render_scene's, render_world_sample's) of sample `index` of a toy split.

    train sample i of dataset seed s renders seed s * 1_000_003 + i; val adds 2**40. So the
    held-out split never contains a few-shot training scene, for any num_images and any two
    dataset seeds below 10**6.
    """
    if split not in TOY_SPLITS:
        raise ValueError(f"toy datasets have splits {', '.join(TOY_SPLITS)}; got {split!r}")
    if not 0 <= index < TOY_SEED_STRIDE:
        raise ValueError(f"toy sample index must lie in 0..{TOY_SEED_STRIDE - 1}, got {index}")
    if seed < 0:
        raise ValueError(f"toy dataset seed must be non-negative, got {seed}")
    return seed * TOY_SEED_STRIDE + (_VAL_OFFSET if split == "val" else 0) + index
