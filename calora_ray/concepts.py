"""Concepts as prompt sets: a base prompt c and the augmented prompts c_aug that change one concept.

The paper scores each projection by how strongly the change c -> c_aug moves its gradient
(docs/method.md, "Prompts and concepts"). `style` and `viewpoint` ship with the paper's prompt plus paraphrases that stay
inside the toy world's caption vocabulary; users define their own concepts in the YAML config.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserValueError

BASE_PROMPT = "Photorealistic first-person urban street view"


@dataclass(frozen=True)
class Concept:
    name: str
    base_prompt: str
    augmented_prompts: tuple[str, ...]


BUILTIN_CONCEPTS: dict[str, Concept] = {
    "style": Concept(
        name="style",
        base_prompt=BASE_PROMPT,
        augmented_prompts=(
            "Sketch of first-person urban street view",  # the paper's c_aug
            "Sketch of first-person urban street view in clear weather",
            "Sketch of first-person urban street view with road, building and sky",
        ),
    ),
    "viewpoint": Concept(
        name="viewpoint",
        base_prompt=BASE_PROMPT,
        augmented_prompts=(
            "Photorealistic urban street in top-down view",  # the paper's c_aug
            "Photorealistic urban street in top-down view in clear weather",
            "Photorealistic urban street in top-down view with road, building and car",
        ),
    ),
}


def resolve_concept(
    name: str,
    user_concepts: dict | None = None,
    base_prompt: str | None = None,
    augmented_prompts: list[str] | None = None,
) -> Concept:
    """The concept called `name`: user-defined (YAML `concepts:`) first, then built-in.

    `base_prompt` / `augmented_prompts` override the found concept's prompts; when both are given
    `name` may be new (a concept defined on the command line).
    """
    user_concepts = user_concepts or {}
    if name in user_concepts:
        spec = user_concepts[name]
        if not isinstance(spec, dict) or "augmented_prompts" not in spec:
            raise UserValueError(
                f"concept '{name}' in the config must be a mapping with 'augmented_prompts' "
                f"(a list of prompts) and optionally 'base_prompt'; got {spec!r}")
        aug = spec["augmented_prompts"]
        if isinstance(aug, str):
            aug = [aug]
        concept = Concept(name, str(spec.get("base_prompt", BASE_PROMPT)), tuple(str(a) for a in aug))
    elif name in BUILTIN_CONCEPTS:
        concept = BUILTIN_CONCEPTS[name]
    elif augmented_prompts:
        concept = Concept(name, base_prompt or BASE_PROMPT, tuple(augmented_prompts))
    else:
        known = sorted(set(BUILTIN_CONCEPTS) | set(user_concepts))
        raise UserValueError(
            f"unknown concept '{name}': known concepts are {', '.join(known)}; define a new one under "
            f"'concepts:' in the YAML config or with --base-prompt and --augmented-prompts")
    concept = Concept(
        concept.name,
        base_prompt if base_prompt is not None else concept.base_prompt,
        tuple(augmented_prompts) if augmented_prompts else concept.augmented_prompts,
    )
    if not concept.augmented_prompts or not all(p.strip() for p in concept.augmented_prompts):
        raise UserValueError(f"concept '{name}' needs at least one non-empty augmented prompt")
    if not concept.base_prompt.strip():
        raise UserValueError(f"concept '{name}' has an empty base prompt")
    return concept


def join_class_names(names) -> str:
    """'a' / 'a and b' / 'a, b and c' (no serial comma); '' for no names."""
    names = [str(n) for n in names]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + f" and {names[-1]}"
