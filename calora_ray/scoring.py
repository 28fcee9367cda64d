"""The score job's plain code: draw (x_0, noise) samples, accumulate concept sensitivity, select, report.

`score_samples` is the unit of work (a list of sample indices -> SensitivitySums); every sample's
randomness comes from its own generators seeded by (seed, index), so any split of the indices over
workers gives the same sums. `sample_norms` yields the per-sample numbers those sums add up (the
tests and benchmarks/scoring_estimator_agreement.py read them one sample at a time).
calora_ray.ray_train.run_scoring (what jobs/score.py calls) runs it on Ray Train workers:
`check_score_inputs` first, `prepare_scoring` + `score_samples` + `build_report` in each worker,
`write_score_outputs` at the end.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .concepts import Concept, resolve_concept
from .config import ScoreConfig, to_dict
from .datasets import open_dataset
from .errors import UserValueError
from .losses import diffusion_target, noisy_latents
from .models import (Components, encode_images, encode_prompts, load_components, load_unet_skeleton, model_info,
                     resolve_dtype)
from .outputs import check_output_dir, staged_output_dir, write_json
from .plots import plot_scores
from .selection import select_modules
from .sensitivity import SensitivitySums, find_candidates, grad_only_for, sample_gradient_norms


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index`: its x_0 (or VAE draw) first, then its noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


AUGMENTED_PER_SAMPLE = ("all", "one")


def augmented_indices(seed: int, index: int, num_prompts: int, augmented_per_sample: str = "all") -> list[int]:
    """The augmented prompts (indices into concept.augmented_prompts) sample `index` is scored against.

    'all': every one (the paper's estimator). 'one': a single prompt drawn uniformly, so the mean
    over (sample, prompt) pairs keeps the same expectation for 2 UNet forwards and 2 gradients per
    sample instead of 1 + A of each. The draw comes from a stream of its own seeded by (seed, index),
    not from `sample_generator`, so a sample's x_0 and noise are the same under both estimators, and
    its prompt is the same whatever the batch size, the sharding or the number of workers.
    """
    if augmented_per_sample == "all":
        return list(range(num_prompts))
    if augmented_per_sample == "one":
        # A str seed is hashed (SHA-512) by random.Random: the same draw on every platform and Python.
        return [random.Random(f"augmented-prompt/{seed}/{index}").randrange(num_prompts)]
    raise UserValueError(f"--augmented-per-sample {augmented_per_sample!r} is not one of "
                         f"{', '.join(AUGMENTED_PER_SAMPLE)}")


def draw_x0(components: Components, indices: list[int], generators: list[torch.Generator], x0: str,
            prompt: str, resolution: int, steps: int, guidance: float, dataset=None) -> torch.Tensor:
    """Clean latents x_0 for a batch of sample indices. -> (B, C, h, w)

    'generated': sampled from the base model with the base prompt (output_type='latent');
    'target': the dataset's images (index modulo its length) encoded by the VAE.
    """
    if x0 == "generated":
        pipe = components.pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt=[prompt] * len(indices), height=resolution, width=resolution,
                    num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    output_type="latent").images
    images = [dataset[i % len(dataset)]["image"] for i in indices]
    return encode_images(components, np.stack(images), generators)


def sample_norms(components: Components, candidates: dict, concept: Concept, indices: list[int], *,
                 timestep: int, seed: int, x0: str = "generated", resolution: int = 64,
                 x0_steps: int = 20, x0_guidance: float = 7.5, batch_size: int = 4, dataset=None,
                 augmented_per_sample: str = "all") -> Iterator[tuple[int, list[int], torch.Tensor, torch.Tensor]]:
    """Per sample of `indices`, in order: (index, the augmented prompts it is scored against
    (`augmented_indices`), diff_rms (M,), concept_rms (len(prompts), M)); candidates in `candidates`' order.

    x_0 is drawn a batch at a time; then each sample runs `sample_gradient_norms` on its own prompts,
    and only the prompts some sample of `indices` uses are encoded.
    """
    unet = components.unet
    device = unet.device
    scheduler = components.noise_scheduler
    if not 0 <= timestep < scheduler.config.num_train_timesteps:
        raise UserValueError(f"--timestep {timestep} is outside the model's schedule "
                             f"(0..{scheduler.config.num_train_timesteps - 1})")
    num_prompts = len(concept.augmented_prompts)
    prompts = {i: augmented_indices(seed, i, num_prompts, augmented_per_sample) for i in indices}
    weights = [m.weight for m in candidates.values()]
    base = encode_prompts(components, [concept.base_prompt], resolution, resolution)
    augmented = {k: encode_prompts(components, [concept.augmented_prompts[k]], resolution, resolution)
                 for k in sorted({k for used in prompts.values() for k in used})}
    for start in range(0, len(indices), batch_size):
        batch = list(indices[start:start + batch_size])
        generators = [sample_generator(seed, i) for i in batch]
        x0_latents = draw_x0(components, batch, generators, x0, concept.base_prompt, resolution,
                             x0_steps, x0_guidance, dataset).to(device, unet.dtype)
        noise = torch.stack([torch.randn(x0_latents.shape[1:], generator=g) for g in generators])
        noise = noise.to(device, unet.dtype)
        t = torch.full((len(batch),), timestep, device=device, dtype=torch.long)
        noisy = noisy_latents(scheduler, x0_latents, noise, t)
        target = diffusion_target(scheduler, x0_latents, noise, t)
        with grad_only_for(unet, weights):
            for j, i in enumerate(batch):
                diff_rms, concept_rms = sample_gradient_norms(
                    unet, weights, noisy[j:j + 1], t[j:j + 1], target[j:j + 1], base,
                    [augmented[k] for k in prompts[i]])
                yield i, prompts[i], diff_rms, concept_rms


def score_samples(components: Components, candidates: dict, concept: Concept, indices: list[int], *,
                  timestep: int, seed: int, x0: str = "generated", resolution: int = 64,
                  x0_steps: int = 20, x0_guidance: float = 7.5, batch_size: int = 4, dataset=None,
                  augmented_per_sample: str = "all", progress: bool = True) -> SensitivitySums:
    """Concept sensitivity sums over the samples `indices` (any subset of 0..num_samples-1), each
    scored against every augmented prompt ('all') or one drawn from its seed ('one'; `augmented_indices`)."""
    sums = SensitivitySums(list(candidates))
    bar = tqdm(total=len(indices), desc=f"scoring '{concept.name}'", unit="sample", disable=not progress)
    for _, _, diff_rms, concept_rms in sample_norms(
            components, candidates, concept, indices, timestep=timestep, seed=seed, x0=x0, resolution=resolution,
            x0_steps=x0_steps, x0_guidance=x0_guidance, batch_size=batch_size, dataset=dataset,
            augmented_per_sample=augmented_per_sample):
        sums.add(diff_rms, concept_rms)
        bar.update(1)
    bar.close()
    return sums


def build_report(cfg: ScoreConfig, components: Components, concept: Concept, candidates: dict,
                 sums: SensitivitySums, elapsed: float, num_workers: int = 1) -> dict:
    """sensitivity.json: scores, selection, and everything that produced them."""
    normalized = sums.scores(normalized=True)
    unnormalized = sums.scores(normalized=False)
    params = {n: m.weight.numel() for n, m in candidates.items()}
    selected = select_modules(cfg.selection_mode, normalized, unnormalized, cfg.top_k_percent,
                              cfg.k_by, params, cfg.seed)
    uses_unnormalized = cfg.selection_mode == "unnormalized"
    return {
        "concept": concept.name,
        "base_prompt": concept.base_prompt,
        "augmented_prompts": list(concept.augmented_prompts),
        "timestep": cfg.timestep,
        "num_samples": sums.samples,
        "augmented_per_sample": cfg.augmented_per_sample,
        "num_pairs": sums.count,
        "top_k_percent": cfg.top_k_percent,
        "k_by": cfg.k_by,
        "selection_mode": cfg.selection_mode,
        "normalized": not uses_unnormalized,
        "num_candidates": len(candidates),
        "num_selected": len(selected),
        "selected": selected,
        "selected_params": sum(params[n] for n in selected),
        "candidate_params": sum(params.values()),
        "scores": unnormalized if uses_unnormalized else normalized,
        "scores_normalized": normalized,
        "scores_unnormalized": unnormalized,
        "diffusion_grad_rms": sums.mean_diffusion_rms(),
        "param_counts": params,
        "x0": cfg.x0,
        "x0_steps": cfg.x0_steps if cfg.x0 == "generated" else None,
        "x0_guidance": cfg.x0_guidance if cfg.x0 == "generated" else None,
        "data": cfg.data if cfg.x0 == "target" else None,
        "self_attention_only": cfg.self_attention_only,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
        "ratio_eps": sums.eps,
        "num_workers": num_workers,
        "model": model_info(components),
        "elapsed_s": round(elapsed, 3),
        "calora_ray_version": __version__,
        "config": to_dict(cfg),
    }


def shard_indices(num_samples: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Worker `rank`'s samples: whole batches dealt round-robin, so every batch holds the same
    samples whatever the number of workers (and the sums equal the single-process ones)."""
    batches = [list(range(s, min(s + batch_size, num_samples))) for s in range(0, num_samples, batch_size)]
    return [i for b in batches[rank::world] for i in b]


def prepare_scoring(cfg: ScoreConfig, device: torch.device):
    """Load everything a scoring worker needs: (components, candidates, concept, dataset)."""
    concept = resolve_concept(cfg.concept, cfg.concepts, cfg.base_prompt, cfg.augmented_prompts)
    dataset = None
    if cfg.x0 == "target":
        dataset = open_dataset(cfg.data, split=cfg.split, num_images=cfg.num_images,
                               resolution=cfg.resolution, seed=cfg.seed)
    components = load_components(cfg.model, cfg.model_seed)
    components.to(device, resolve_dtype(cfg.mixed_precision, device))
    _check_resolution(components, cfg.resolution)
    return components, find_candidates(components.unet, cfg.self_attention_only), concept, dataset


def check_score_inputs(cfg: ScoreConfig) -> None:
    """jobs/score.py's cheap inputs, checked before any work: the concept, the output, the model's
    candidate projections, the data (when x_0 comes from it)."""
    resolve_concept(cfg.concept, cfg.concepts, cfg.base_prompt, cfg.augmented_prompts)
    check_output_dir(cfg.output, cfg.overwrite)
    find_candidates(load_unet_skeleton(cfg.model, cfg.model_seed), cfg.self_attention_only)
    if cfg.x0 == "target":
        open_dataset(cfg.data, split=cfg.split, num_images=cfg.num_images,
                     resolution=cfg.resolution, seed=cfg.seed)[0]


def write_score_outputs(cfg: ScoreConfig, report: dict) -> None:
    """sensitivity.json and sensitivity.png, written into place together."""
    with staged_output_dir(cfg.output, cfg.overwrite) as staging:
        write_json(staging / "sensitivity.json", report)
        plot_scores(report["scores"], report["selected"], staging / "sensitivity.png",
                    title=f"{'' if report['normalized'] else 'unnormalised '}sensitivity to '{report['concept']}' "
                          f"({cfg.model}, t={cfg.timestep}, {report['num_samples']} samples x "
                          f"{_prompts_per_sample(report)}); mode {cfg.selection_mode}, "
                          f"top {cfg.top_k_percent:g}% by {cfg.k_by}",
                    ylabel="rms(dL_concept)/rms(dL_diff)" if report["normalized"] else "rms(dL_concept)")


def _prompts_per_sample(report: dict) -> str:
    """'3 prompts' (every c_aug per sample) or '1 of 3 prompts' (--augmented-per-sample one)."""
    num_prompts = len(report["augmented_prompts"])
    one = report.get("augmented_per_sample", "all") == "one" and num_prompts > 1
    return f"{'1 of ' if one else ''}{num_prompts} prompt{'s' if num_prompts > 1 else ''}"


def _check_resolution(components: Components, resolution: int) -> None:
    multiple = components.vae_scale_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise UserValueError(f"--resolution {resolution} must be a multiple of {multiple} for this model "
                             f"(VAE factor {components.vae_scale_factor} x UNet downsampling)")
