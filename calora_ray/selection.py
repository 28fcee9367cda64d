"""Which projections get LoRA (docs/method.md, stage 2): top-k% by score, and the paper's baselines.

Plain functions over {module name: value} dicts; no torch, no I/O.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

SELECTION_MODES = ("normalized", "unnormalized", "random", "all")
ABLATION_MODES = ("none", "all", "normalized", "unnormalized", "random")  # + the pretrained model (jobs/ablate.py)


def num_selected(num_candidates: int, top_k_percent: float) -> int:
    """ceil(k% x candidates), at least one. Exact arithmetic: 5% of 100 is 5, not 6."""
    if not (0 < top_k_percent <= 100):
        raise ValueError(f"top_k_percent must be in (0, 100], got {top_k_percent}")
    return max(1, math.ceil(Fraction(str(top_k_percent)) * num_candidates / 100))


def _take(order: list[str], top_k_percent: float, k_by: str, param_counts: dict[str, int] | None) -> list[str]:
    """The first modules of `order` that make up k% (by count, or by parameters)."""
    if k_by == "count":
        return order[: num_selected(len(order), top_k_percent)]
    if k_by != "params":
        raise ValueError(f"k_by must be 'count' or 'params', got {k_by!r}")
    if param_counts is None:
        raise ValueError("k_by='params' needs the parameter count of every candidate")
    budget = Fraction(str(top_k_percent)) * sum(param_counts[n] for n in order) / 100
    chosen, total = [], 0
    for name in order:
        if chosen and total >= budget:
            break
        chosen.append(name)
        total += param_counts[name]
    return chosen


def select_top_k(scores: dict[str, float], top_k_percent: float, k_by: str = "count",
                 param_counts: dict[str, int] | None = None) -> list[str]:
    """Highest-scoring modules, best first. Ties keep the UNet order (stable sort)."""
    order = sorted(scores, key=lambda n: -scores[n])
    return _take(order, top_k_percent, k_by, param_counts)


def select_random(names: list[str], top_k_percent: float, seed: int, k_by: str = "count",
                  param_counts: dict[str, int] | None = None) -> list[str]:
    """k% of `names` uniformly at random (seeded): the paper's random-selection baseline."""
    order = list(names)
    random.Random(seed).shuffle(order)
    return _take(order, top_k_percent, k_by, param_counts)


def select_modules(mode: str, normalized_scores: dict[str, float], unnormalized_scores: dict[str, float],
                   top_k_percent: float, k_by: str = "count", param_counts: dict[str, int] | None = None,
                   seed: int = 0) -> list[str]:
    """Selected module names for a --selection-mode (best first where there is a ranking)."""
    if mode == "normalized":
        return select_top_k(normalized_scores, top_k_percent, k_by, param_counts)
    if mode == "unnormalized":
        return select_top_k(unnormalized_scores, top_k_percent, k_by, param_counts)
    if mode == "random":
        return select_random(list(normalized_scores), top_k_percent, seed, k_by, param_counts)
    if mode == "all":
        return list(normalized_scores)
    raise ValueError(f"unknown selection mode {mode!r}; one of {', '.join(SELECTION_MODES)}")
