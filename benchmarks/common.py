"""What both benchmarks share: the two models, one scoring sample, one LoRA training step, and
interleaved timing.

Models (random weights, built in code, nothing downloaded):
  tiny  calora_ray.models.build_tiny(): 56 candidates, 4x16x16 latents, LoRA rank 4.
  mid   an SD-1.5-shaped UNet2DConditionModel (SD-1.5's block types, layers_per_block 2,
        cross_attention_dim 768, 128 candidates like SD-1.5) with narrower channels
        (64, 128, 256, 256); 4x32x32 latents; text conditioning is a random (B, 77, 768) tensor;
        LoRA rank 64 (the paper's).

The machine these run on is shared, so every comparison is timed interleaved (A B A B ...) in
one process after warm-up, and reported as medians and a ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The scripts run as `python benchmarks/<script>.py` from a checkout, installed or not.
# (imports below this line are deliberately late: they need the path above)
from calora_ray.concepts import resolve_concept
from calora_ray.lora import attach_lora
from calora_ray.losses import diffusion_target, noisy_latents
from calora_ray.models import Components, build_tiny, encode_prompts, expand_conditioning
from calora_ray.scoring import AUGMENTED_PER_SAMPLE, augmented_indices
from calora_ray.sensitivity import (SensitivitySums, find_candidates, grad_only_for,
                                    sample_gradient_norms)
from calora_ray.training import diffusion_step_loss

MODELS = ("tiny", "mid")
SCORING_TIMESTEP = 81  # the paper's t
LEARNING_RATE = 1e-4  # AdamW, as jobs/finetune.py
WEIGHT_DECAY = 1e-2


@dataclass
class BenchModel:
    """A base model (all weights frozen) with the conditioning a benchmark feeds it."""

    name: str
    components: Components  # mid: unet + scheduler only (vae / text encoder are None)
    latent_shape: tuple[int, int, int]  # (C, h, w)
    base_cond: dict  # UNet conditioning kwargs of the base prompt, batch 1
    augmented_conds: list[dict]  # one per c_aug of the `style` concept, batch 1
    lora_rank: int
    description: str


def _mid_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def build_model(name: str, seed: int = 0) -> BenchModel:
    """The `tiny` or `mid` benchmark model, deterministic by seed, frozen, in eval mode."""
    concept = resolve_concept("style")
    if name == "tiny":
        components = build_tiny(seed)
        base = encode_prompts(components, [concept.base_prompt], 64, 64)
        augmented = [encode_prompts(components, [p], 64, 64) for p in concept.augmented_prompts]
        latent_shape, rank = (4, 16, 16), 4
    elif name == "mid":
        from diffusers import DDIMScheduler

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = _mid_unet().eval()
            texts = torch.randn(1 + len(concept.augmented_prompts), 1, 77, 768)
        # SD-1.5's noise schedule; the scheduler only matters for x_t and the target.
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
        components = Components(name="mid", unet=unet, vae=None, text_encoder=None, tokenizer=None,
                                scheduler=scheduler)
        base = {"encoder_hidden_states": texts[0]}
        augmented = [{"encoder_hidden_states": t} for t in texts[1:]]
        latent_shape, rank = (4, 32, 32), 64
    else:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    components.unet.requires_grad_(False)
    params = sum(p.numel() for p in components.unet.parameters())
    n = len(find_candidates(components.unet))
    return BenchModel(name, components, latent_shape, base, augmented, rank,
                      f"{params / 1e6:.1f}M UNet params, {n} candidates, latents {latent_shape}")


def parse_choices(text: str, choices, flag: str) -> list[str]:
    """A comma-separated flag value, each name one of `choices` (at least one): else a SystemExit naming `flag`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {', '.join(choices)}")
    return names


def parse_models(text: str) -> list[str]:
    return parse_choices(text, MODELS, "--models")


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------- scoring


def scoring_sample(model: BenchModel, index: int, seed: int = 0):
    """(x_t, t, target) of scoring sample `index` at t = 81: x_0 and noise are random latents.

    With random weights a generated x_0 is no more meaningful than a random one, and the gradient
    cost does not depend on the values; P1 times x_0 sampling separately where the model has one.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x0 = torch.randn((1, *model.latent_shape), generator=g)
    noise = torch.randn((1, *model.latent_shape), generator=g)
    scheduler = model.components.noise_scheduler
    t = torch.full((1,), SCORING_TIMESTEP, dtype=torch.long)
    return noisy_latents(scheduler, x0, noise, t), t, diffusion_target(scheduler, x0, noise, t)


def parse_estimators(text: str) -> list[str]:
    """--estimators: a comma-separated list of scoring.AUGMENTED_PER_SAMPLE ('all', 'one')."""
    return parse_choices(text, AUGMENTED_PER_SAMPLE, "--estimators")


def sample_prompts(model: BenchModel, augmented_per_sample: str, index: int, seed: int = 0) -> list[int]:
    """The c_aug (indices into model.augmented_conds) scoring sample `index` runs under an estimator:
    the library's own draw (scoring.augmented_indices), so a benchmark scores what jobs/score.py would."""
    return augmented_indices(seed, index, len(model.augmented_conds), augmented_per_sample)


def _augmented_conds(model: BenchModel, prompts: list[int] | None) -> list[dict]:
    return model.augmented_conds if prompts is None else [model.augmented_conds[k] for k in prompts]


def augmented_predictions(model: BenchModel, sample, prompts: list[int] | None = None) -> list[torch.Tensor]:
    """The no-grad part of score_one alone: the UNet under each c_aug of `prompts` (None: every one)."""
    noisy, t, _ = sample
    with torch.no_grad():
        return [model.components.unet(noisy, t, **c).sample for c in _augmented_conds(model, prompts)]


def score_one(model: BenchModel, weights: list[torch.Tensor], sample,
              prompts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample scoring work: L_diff + one L_concept per c_aug of `prompts` (None: every one),
    all candidate gradients."""
    noisy, t, target = sample
    with grad_only_for(model.components.unet, weights):
        return sample_gradient_norms(model.components.unet, weights, noisy, t, target, model.base_cond,
                                     _augmented_conds(model, prompts))


def score_candidates(model: BenchModel, num_samples: int, seed: int = 0,
                     augmented_per_sample: str = "all") -> SensitivitySums:
    """Concept sensitivity of every candidate of the base UNet over `num_samples` samples."""
    candidates = find_candidates(model.components.unet)
    weights = [m.weight for m in candidates.values()]
    sums = SensitivitySums(list(candidates))
    for i in range(num_samples):
        sums.add(*score_one(model, weights, scoring_sample(model, i, seed),
                            sample_prompts(model, augmented_per_sample, i, seed)))
    return sums


# ----------------------------------------------------------------------------- training


@dataclass
class LoraStep:
    """One AdamW training step of LoRA on `modules` of a private copy of the base UNet."""

    components: Components
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor
    cond: dict
    generator: torch.Generator
    modules: list[str]

    def __call__(self) -> None:
        # What calora_ray.training.train does per step of a lora_task, minus data loading and VAE encoding.
        loss = diffusion_step_loss(self.components, self.latents, self.cond, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.components.unet.parameters() if p.requires_grad)

    @property
    def optimizer_state_bytes(self) -> int:
        """exp_avg + exp_avg_sq bytes (0 before the first step)."""
        return sum(s[k].numel() * s[k].element_size()
                   for s in self.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s)


def lora_step(model: BenchModel, modules: list[str], batch_size: int, seed: int = 0) -> LoraStep:
    """A training step with LoRA (rank = model's, alpha = rank) on `modules` of a UNet copy."""
    unet = copy.deepcopy(model.components.unet)
    torch.manual_seed(seed)  # peft draws the LoRA init from the global generator
    attach_lora(unet, modules, model.lora_rank, model.lora_rank)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch_size, *model.latent_shape), generator=g)
    return LoraStep(dataclasses.replace(model.components, unet=unet),
                    torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                    latents, expand_conditioning(model.base_cond, batch_size), g, list(modules))


# ----------------------------------------------------------------------------- timing


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                      min_sample_s: float = 0.2, clock: Callable[[], float] = time.perf_counter
                      ) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured in rounds A B C A B C ... after `warmup` rounds.

    A fast fn is called several times per measurement (so one lasts >= min_sample_s) and the
    mean per call is recorded; each round rotates the order so no fn always follows the same one.
    clock: wall time by default; time.process_time gives the CPU time this process spent (with one
    torch thread, the compute a call costs, whatever else the shared machine runs meanwhile).
    """
    names = list(fns)
    inner = {}
    for _ in range(max(warmup, 1)):
        for n in names:
            start = clock()
            fns[n]()
            inner[n] = max(1, round(min_sample_s / max(clock() - start, 1e-6)))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            for _ in range(inner[n]):
                fns[n]()
            times[n].append((clock() - start) / inner[n])
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i: robust to load that drifts over the run."""
    return statistics.median(x / y for x, y in zip(a, b))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s)), python {platform.python_version()}")


def setup(threads: int) -> None:
    """Fix the thread count: on a shared 2-core machine two OpenMP threads that wait on each other
    make single steps up to 50x slower at random; one thread is slower but steady."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def print_table(headers: list[str], rows: list[list]) -> None:
    """A markdown table (pastes straight into docs/benchmarks.md)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
