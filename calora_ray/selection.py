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


def _ranks(values: list[float]) -> list[float]:
    """Ranks 0..n-1 of `values`, ties sharing their mean rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman's rank correlation of two score dicts over the same modules (nan if one is constant):
    how alike two scoring runs rank the projections."""
    if set(a) != set(b):
        raise ValueError(f"the two rankings score different modules ({len(set(a) ^ set(b))} differ)")
    names = sorted(a)
    ra, rb = _ranks([a[n] for n in names]), _ranks([b[n] for n in names])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else math.nan


def top_k_overlap(a: dict[str, float], b: dict[str, float], top_k_percent: float) -> float:
    """|top-k of a ∩ top-k of b| / k (k by count): the share of one run's selection the other selects too."""
    first, second = select_top_k(a, top_k_percent), select_top_k(b, top_k_percent)
    return len(set(first) & set(second)) / len(first)
