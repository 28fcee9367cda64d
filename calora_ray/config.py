"""One typed config per job, filled from defaults < YAML file < command-line flags.

Every field becomes a flag of the same name (``top_k_percent`` -> ``--top-k-percent``) and a
YAML key of the same name. A job config is one flat dataclass: the options several jobs share are
small dataclasses (``ModelConfig``, ``DataConfig``, ``DistributedConfig``, ``TrainingConfig``,
``RayConnectConfig``) that a job config inherits, so ``cfg.model`` is the model and ``cfg.steps``
the steps, and a function that needs only the model options takes any config that has them. A YAML
file may hold keys for several jobs: top-level keys apply to every job that has them, and a section
named after a job (``score:``, ``finetune:``) applies to that job only.

    cfg = parse_config(ScoreConfig, sys.argv[1:], job="score")
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.labels import CONTROL_PALETTES
from .errors import UserError
from .selection import ABLATION_MODES, SELECTION_MODES

class ConfigError(UserError, ValueError):
    """A bad config value; the message names the flag or YAML key."""


def _help(text: str, **extra) -> dict:
    """Field metadata: the flag's help text; cli=False: YAML only; hidden=True: a test hook, not
    in --help; internal=True: set by the code, neither a flag nor a YAML key; identity=False: a
    knob a rerun may change and still resume the same run (outputs.run_identity);
    identity="unless-default": part of a run's identity only when not its default (an option added
    later, so the runs made before it still resume)."""
    return {"help": text, **extra}


def _check_next(self, cls) -> None:
    """Run the checks of the shared configs after `cls` in the job config's bases (each shared
    config's __post_init__ ends with this, so every one of them validates its own fields)."""
    nxt = getattr(super(cls, self), "__post_init__", None)
    if nxt is not None:
        nxt()


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not one of {', '.join(map(str, choices))}")


@dataclass
class ModelConfig:
    model: str = field(default="tiny", metadata=_help(
        "Base model: 'tiny' (random SD-shaped model built in code, for tests), 'tiny-sdxl' "
        "(the same with an SDXL-shaped UNet), 'toy-sd' (the project's pretrained toy model), "
        "a local diffusers directory, or a Hugging Face hub id such as "
        "'stable-diffusion-v1-5/stable-diffusion-v1-5'."))
    model_seed: int = field(default=0, metadata=_help("Seed of the weights of the 'tiny' presets."))
    mixed_precision: str = field(default="no", metadata=_help(
        "Compute dtype of the frozen base model on CUDA: 'no' (fp32), 'fp16' or 'bf16'. "
        "On CPU: generate and serve run bf16 when asked (fp16 is refused there: CPUs have no fp16 "
        "arithmetic); the other jobs ignore it (fp32). Generation's VAE decodes in fp32 always. "
        "Trainable LoRA weights stay fp32.",
        choices=("no", "fp16", "bf16")))

    def __post_init__(self):
        check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _check_next(self, ModelConfig)


@dataclass
class DistributedConfig:
    num_workers: int = field(default=1, metadata=_help(
        "Ray Train workers (processes; one GPU each with --use-gpu). Scoring splits the samples "
        "over them; fine-tuning shards the data and averages the LoRA gradients.", identity=False))
    use_gpu: str = field(default="auto", metadata=_help(
        "'auto' (a GPU per worker when the cluster has them, else CPU), 'true' or 'false'.",
        choices=("auto", "true", "false"), identity=False))
    cpus_per_worker: int | None = field(default=None, metadata=_help(
        "CPUs reserved per worker; default: with GPUs, the CPUs per GPU of the GPU nodes; without, the "
        "cluster's CPUs divided by --num-workers.", identity=False))
    storage_path: str | None = field(default=None, metadata=_help(
        "Where Ray Train keeps the run state and checkpoints: a local directory or any URI pyarrow "
        "or fsspec understands (s3://, gs://, ...; needed for multi-node resume). Default: the "
        "output directory for fine-tuning, a temporary directory for scoring.", identity=False))
    max_failures: int = field(default=2, metadata=_help(
        "Restarts from the latest checkpoint after a worker fails (FailureConfig).", identity=False))
    resource_wait_s: float = field(default=60.0, metadata=_help(
        "How long to wait for the cluster (e.g. an autoscaler) to offer the requested CPUs/GPUs "
        "before failing with a clear error.", identity=False))

    def __post_init__(self):
        check_choice("use_gpu", self.use_gpu, ("auto", "true", "false"))
        if self.num_workers < 1:
            raise ConfigError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ConfigError(f"--cpus-per-worker must be >= 1, got {self.cpus_per_worker}")
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be >= 0, got {self.max_failures}")
        if self.resource_wait_s < 0:
            raise ConfigError(f"--resource-wait-s must be >= 0, got {self.resource_wait_s}")
        _check_next(self, DistributedConfig)


@dataclass
class RayConnectConfig:
    """Which Ray cluster a job joins, and how long it waits for it (every job that starts Ray)."""

    address: str | None = field(default=None, metadata=_help(
        "The Ray cluster to join: host:port of its GCS, 'auto' (the cluster `ray start` recorded on this "
        "machine, which must be running), 'local' (a fresh local cluster, even when one is recorded), or "
        "ray://host:port (Ray Client). Default: RAY_ADDRESS (`ray job submit` sets it), else the cluster Ray "
        "recorded on this machine, else a new local one.", identity=False))
    ray_connect_timeout_s: float = field(default=60.0, metadata=_help(
        "How long to wait for that cluster to answer before failing with an error that names its address "
        "(a cluster whose processes died never answers).", identity=False))
    verbose: bool = field(default=False, metadata=_help(
        "Show Ray's own messages on the console too (its warnings, Ray Train's INFO lines, its C++ core's log "
        "lines, its helper actors' output). Default: the job's own progress, results, warnings and errors, "
        "and one line naming Ray's log directory, which keeps the rest.", identity=False))

    def __post_init__(self):
        if isinstance(self.address, str) and self.address.strip().lower() in ("", "none", "null"):
            self.address = None
        if not self.ray_connect_timeout_s > 0:
            raise ConfigError(f"--ray-connect-timeout-s must be > 0, got {self.ray_connect_timeout_s}")
        _check_next(self, RayConnectConfig)


@dataclass
class ControlPaletteConfig:
    """The colours of a segmentation ControlNet's conditioning image (train_controlnet, generate, serve)."""

    control_palette: str = field(default="cityscapes", metadata=_help(
        "Colours of the ControlNet's conditioning image, the label map drawn as a colour image (the labels "
        "themselves stay Cityscapes train ids): 'cityscapes' for the ControlNets jobs/train_controlnet.py "
        "makes; 'ade20k' for a public SD-1.5 segmentation ControlNet such as lllyasviel/control_v11p_sd15_seg, "
        "trained on ADE20K's palette: each train id in the colour of its nearest ADE20K class "
        "(docs/public-controlnets.md has the table). train_controlnet: the palette the new ControlNet learns, "
        "recorded in its controlnet.json; generate / serve: the palette the --controlnet was trained on (a "
        "ControlNet whose controlnet.json records another one is refused).",
        choices=CONTROL_PALETTES, identity="unless-default"))

    def __post_init__(self):
        check_choice("control_palette", self.control_palette, CONTROL_PALETTES)
        _check_next(self, ControlPaletteConfig)


DATA_HELP = _help(
    "Image-label source: 'toy' (= 'toy:target', the procedural Cityscapes stand-in), "
    "'toy:source' (the other toy domain), or a directory in the Cityscapes layout "
    "(leftImg8bit/<split>/<city>/*_leftImg8bit.png, gtFine/<split>/<city>/*_gtFine_labelIds.png).")


@dataclass
class DataConfig:
    data: str = field(default="toy", metadata=DATA_HELP)
    split: str = field(default="train", metadata=_help("Split to read ('train', 'val', ...)."))
    num_images: int | None = field(default=None, metadata=_help(
        "Use only the first N images of the split (the few-shot setting); default: the source's "
        "default (toy: 30 train / 100 val) or every image of a directory."))
    resolution: int = field(default=64, metadata=_help(
        "Square side in pixels: images are resized (shorter side) and centre-cropped to it; labels "
        "with nearest-neighbour only. Must be a multiple of the VAE's downsampling times 8."))

    def __post_init__(self):
        if self.num_images is not None and self.num_images < 1:
            raise ConfigError(f"--num-images must be >= 1, got {self.num_images}")
        if self.resolution < 8:
            raise ConfigError(f"--resolution must be >= 8, got {self.resolution}")
        _check_next(self, DataConfig)




@dataclass
class ScoreConfig(ModelConfig, DataConfig, DistributedConfig, RayConnectConfig):
    """jobs/score.py: concept sensitivity of every attention projection, and the top-k% selection."""

    concept: str = field(default="style", metadata=_help(
        "Concept whose sensitivity is scored: 'style', 'viewpoint', or a concept defined under "
        "'concepts:' in the YAML config (or by --base-prompt/--augmented-prompts)."))
    concepts: dict = field(default_factory=dict, metadata=_help(
        "YAML only: user-defined concepts, {name: {base_prompt: str, augmented_prompts: [str, ...]}}.",
        cli=False))
    base_prompt: str | None = field(default=None, metadata=_help(
        "Override the concept's base prompt c."))
    augmented_prompts: list[str] | None = field(default=None, metadata=_help(
        "Override the concept's augmented prompts c_aug (one or more)."))
    timestep: int = field(default=81, metadata=_help(
        "Diffusion timestep t at which gradients are taken (paper: 81 of 1000)."))
    num_samples: int = field(default=16, metadata=_help(
        "Number of (x_0, noise) samples; each is scored against one augmented prompt or all of them "
        "(--augmented-per-sample)."))
    augmented_per_sample: str = field(default="one", metadata=_help(
        "Augmented prompts each sample is scored against: 'one' (one c_aug per sample, drawn from the "
        "sample's seed: the same expectation, for 2 UNet forwards and 2 gradients per sample instead of "
        "1 + A of each; on toy-sd it ranks as well per sample, so better per second: docs/benchmarks.md) "
        "or 'all' (every c_aug: the paper's estimator).",
        choices=("all", "one")))
    x0: str = field(default="generated", metadata=_help(
        "Where x_0 comes from: 'generated' (sampled from the base model with the base prompt; needs "
        "no target data) or 'target' (encoded images of --data).",
        choices=("generated", "target")))
    x0_steps: int = field(default=20, metadata=_help("Sampling steps when --x0 generated."))
    x0_guidance: float = field(default=7.5, metadata=_help("Guidance scale when --x0 generated."))
    self_attention_only: bool = field(default=False, metadata=_help(
        "Only self-attention projections (attn1) are candidates."))
    top_k_percent: float = field(default=2.0, metadata=_help(
        "Select the top k%% of candidates (paper: 2); at least one module is always selected."))
    k_by: str = field(default="count", metadata=_help(
        "What k%% counts: 'count' (matrices, as in the paper) or 'params' (parameters).",
        choices=("count", "params")))
    selection_mode: str = field(default="normalized", metadata=_help(
        "'normalized' (CA-LoRA), or a baseline: 'unnormalized' (rank by the concept gradient "
        "alone), 'random' (k%% at random, seeded), 'all' (every candidate = plain LoRA).",
        choices=SELECTION_MODES))
    batch_size: int = field(default=4, metadata=_help(
        "Samples drawn per batch (x_0 generation, VAE encoding, augmented-prompt forwards)."))
    seed: int = field(default=0, metadata=_help("Seed of x_0, noise and random selection."))
    output: str = field(default="outputs/score", metadata=_help(
        "Output directory: sensitivity.json and sensitivity.png."))
    overwrite: bool = field(default=False, metadata=_help("Replace an existing output directory."))

    def __post_init__(self):
        check_choice("x0", self.x0, ("generated", "target"))
        check_choice("augmented_per_sample", self.augmented_per_sample, ("all", "one"))
        check_choice("k_by", self.k_by, ("count", "params"))
        check_choice("selection_mode", self.selection_mode, SELECTION_MODES)
        if not (0 < self.top_k_percent <= 100):
            raise ConfigError(f"--top-k-percent must be in (0, 100], got {self.top_k_percent}")
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.timestep < 0:
            raise ConfigError(f"--timestep must be >= 0, got {self.timestep}")
        _check_next(self, ScoreConfig)


@dataclass
class TrainingConfig:
    """The shared training loop's knobs (LoRA fine-tuning here; the ControlNet job reuses them)."""

    steps: int = field(default=1000, metadata=_help("Optimizer steps (paper: 10k).", identity=False))
    batch_size: int = field(default=4, metadata=_help("Images per worker per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Micro-batches per optimizer step (effective batch = batch_size x this x num_workers)."))
    learning_rate: float = field(default=1e-4, metadata=_help("AdamW learning rate (paper: 1e-4)."))
    weight_decay: float = field(default=1e-2, metadata=_help("AdamW weight decay."))
    lr_scheduler: str = field(default="constant", metadata=_help(
        "Learning-rate schedule (diffusers.optimization.get_scheduler).",
        choices=("constant", "constant_with_warmup", "linear", "cosine")))
    lr_warmup_steps: int = field(default=0, metadata=_help("Warm-up steps of the schedule."))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute UNet activations in the backward pass: less memory, ~30%% more time.", identity=False))
    seed: int = field(default=0, metadata=_help(
        "Seed of LoRA init, batches, noise and timesteps; each step's draws derive from "
        "(seed, worker rank, step), so a resumed run continues exactly as an uninterrupted one."))
    log_every: int = field(default=10, metadata=_help("Log and record the loss every N steps.", identity=False))
    checkpoint_every: int = field(default=100, metadata=_help(
        "Save a checkpoint (adapter, optimizer, schedule, step) every N steps, and at the end.", identity=False))
    report_to: str = field(default="none", metadata=_help(
        "'tensorboard' writes loss, learning rate, throughput and validation images under "
        "OUTPUT/logs (on the rank-0 worker's disk); 'none' writes none.",
        choices=("none", "tensorboard"), identity=False))
    validation_every: int = field(default=0, metadata=_help(
        "Every N steps sample the --validation-prompts into OUTPUT/logs/validation (0 = never).", identity=False))
    validation_prompts: list[str] = field(default_factory=lambda: [
        "Photorealistic first-person urban street view",
        "Photorealistic first-person urban street view at night"], metadata=_help(
        "Prompts of the validation images.", identity=False))
    validation_steps: int = field(default=20, metadata=_help("Sampling steps of the validation images.", identity=False))
    simulate_failure_at_step: int | None = field(default=None, metadata=_help(
        "Testing: the last worker raises at this step on the first attempt (no checkpoint yet "
        "restored), to exercise FailureConfig restarts.", hidden=True, identity=False))

    def __post_init__(self):
        check_choice("report_to", self.report_to, ("none", "tensorboard"))
        check_choice("lr_scheduler", self.lr_scheduler, ("constant", "constant_with_warmup", "linear", "cosine"))
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "log_every", "checkpoint_every",
                     "validation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "validation_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        _check_next(self, TrainingConfig)


@dataclass
class FinetuneConfig(ModelConfig, DataConfig, DistributedConfig, TrainingConfig, RayConnectConfig):
    """jobs/finetune.py: LoRA on the selected projections, trained with the diffusion loss."""

    data: str = field(default="toy:target", metadata=DATA_HELP)
    selection: str = field(default="all", metadata=_help(
        "Which projections get LoRA: a sensitivity.json written by jobs/score.py (its 'selected' "
        "list), or 'all' (every candidate projection = plain LoRA).", identity=False))
    rank: int = field(default=64, metadata=_help("LoRA rank r (paper: 64; the tiny model: 4)."))
    alpha: float | None = field(default=None, metadata=_help("LoRA alpha; default: equal to --rank."))
    caption: str = field(default="Photorealistic first-person urban street view", metadata=_help(
        "Caption of every training image (the concept's base prompt)."))
    caption_with_classes: bool = field(default=False, metadata=_help(
        "Append ' with {class names}' (the classes present in each label) to the caption."))
    output: str = field(default="outputs/finetune", metadata=_help(
        "Output (and run) directory: pytorch_lora_weights.safetensors (diffusers format), "
        "finetune.json, loss.csv, loss.png; checkpoints under ray_train/ unless --storage-path. "
        "Running again with the same output resumes from the latest checkpoint.", identity=False))
    overwrite: bool = field(default=False, metadata=_help(
        "Delete the output directory (and its checkpoints) first and start over.", identity=False))

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        _check_next(self, FinetuneConfig)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class SampleConfig(ModelConfig):
    """jobs/sample.py: text-to-image samples of a model (and a LoRA), with a labelled grid."""

    lora: str | None = field(default=None, metadata=_help(
        "A directory with pytorch_lora_weights.safetensors (jobs/finetune.py output) to load "
        "with the stock pipeline's load_lora_weights."))
    prompt: list[str] = field(default_factory=lambda: [
        "Photorealistic first-person urban street view",
        "Photorealistic first-person urban street view at night"], metadata=_help(
        "One or more prompts (each gets --num-images images, one row of the grid)."))
    num_images: int = field(default=4, metadata=_help("Images per prompt."))
    seed: int = field(default=0, metadata=_help(
        "Image i of every prompt uses seed + i, so rows are comparable and runs reproducible."))
    steps: int = field(default=25, metadata=_help("Sampling steps."))
    guidance: float = field(default=4.0, metadata=_help("Classifier-free guidance scale."))
    resolution: int | None = field(default=None, metadata=_help(
        "Image side in pixels; default: the model's native size (UNet sample size x VAE factor)."))
    output: str = field(default="outputs/samples", metadata=_help(
        "Output directory: one PNG per image and grid.png."))
    overwrite: bool = field(default=False, metadata=_help("Replace an existing output directory."))

    def __post_init__(self):
        for name in ("num_images", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.prompt or not all(p.strip() for p in self.prompt):
            raise ConfigError("--prompt needs at least one non-empty prompt")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"--resolution must be >= 8, got {self.resolution}")
        _check_next(self, SampleConfig)


@dataclass
class PretrainConfig:
    """jobs/pretrain_toy.py: pretrain `toy-sd` (VAE, then UNet + text encoder) on the pretraining world."""

    output: str = field(default="models/toy-sd", metadata=_help(
        "Output (and run) directory: a standard diffusers directory (model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/), MODEL_CARD.md, samples.png, pretrain.json, "
        "logs/{vae,unet}/loss.{csv,png} and checkpoint.safetensors. Running the same command again "
        "resumes from checkpoint.safetensors.", identity=False))
    overwrite: bool = field(default=False, metadata=_help(
        "Delete the output directory (and its checkpoint) first and start over.", identity=False))
    seed: int = field(default=0, metadata=_help(
        "Seed of the initial weights, batches, noise, timesteps and caption dropout."))
    num_images: int = field(default=8000, metadata=_help(
        "Training renders of the pretraining world (toy:world, train split), rendered once into memory."))
    val_images: int = field(default=256, metadata=_help(
        "Held-out renders (toy:world, val split) on which the VAE's reconstruction PSNR is measured."))
    resolution: int = field(default=64, metadata=_help(
        "Image side in pixels; must be a multiple of the VAE factor times 2^(UNet levels - 1)."))
    # --- architecture
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64], metadata=_help(
        "AutoencoderKL block channels; n blocks downsample by 2^(n-1) (3 blocks: f=4, 64x64 -> 4x16x16)."))
    unet_channels: list[int] = field(default_factory=lambda: [48, 128, 128], metadata=_help(
        "UNet2DConditionModel block channels, one layer per block; cross-attention at every level but "
        "the first (full latent resolution)."))
    text_width: int = field(default=64, metadata=_help(
        "Width of the CLIP text encoder (= the UNet's cross_attention_dim)."))
    text_layers: int = field(default=2, metadata=_help("Transformer layers of the CLIP text encoder."))
    # --- phase 1: the VAE
    vae_minutes: float | None = field(default=20.0, metadata=_help(
        "Training-time budget of the VAE phase in minutes (null in YAML: no time limit, --vae-steps only).", identity=False))
    vae_steps: int | None = field(default=None, metadata=_help(
        "At most this many VAE steps (default: only the time budget limits the phase).", identity=False))
    vae_batch_size: int = field(default=16, metadata=_help("Images per VAE step."))
    vae_learning_rate: float = field(default=1e-3, metadata=_help("AdamW learning rate of the VAE."))
    kl_weight: float = field(default=1e-5, metadata=_help(
        "Weight of the VAE's KL term (per latent element) against L1 + MSE reconstruction (per pixel)."))
    # --- phase 2: UNet + text encoder on the frozen VAE's latents
    unet_minutes: float | None = field(default=62.0, metadata=_help(
        "Training-time budget of the UNet + text encoder phase in minutes (null in YAML: --unet-steps only).", identity=False))
    unet_steps: int | None = field(default=None, metadata=_help(
        "At most this many UNet steps (default: only the time budget limits the phase).", identity=False))
    unet_batch_size: int = field(default=64, metadata=_help("Latents per UNet step."))
    unet_learning_rate: float = field(default=5e-4, metadata=_help(
        "AdamW learning rate of the UNet and the text encoder."))
    warmup_steps: int = field(default=100, metadata=_help(
        "Linear learning-rate warm-up steps of each phase (then constant)."))
    caption_dropout: float = field(default=0.1, metadata=_help(
        "Fraction of UNet training captions replaced by the empty prompt, for classifier-free guidance."))
    ema_decay: float = field(default=0.999, metadata=_help(
        "Decay of the EMA of the UNet and text-encoder weights (the saved model is the EMA)."))
    # --- bookkeeping
    log_every: int = field(default=10, metadata=_help(
        "Write a loss.csv row (the mean loss since the last row) every N steps.", identity=False))
    checkpoint_minutes: float = field(default=5.0, metadata=_help(
        "Save checkpoint.safetensors every N minutes of training (and at the end of each phase, and on Ctrl-C).", identity=False))
    sample_images: int = field(default=4, metadata=_help(
        "Images per prompt in samples.png (prompts: every style x viewpoint, clear and 4 conditions).", identity=False))
    sample_steps: int = field(default=25, metadata=_help("DDIM steps of the sample grid.", identity=False))
    guidance: float = field(default=4.0, metadata=_help("Classifier-free guidance scale of the sample grid.", identity=False))
    simulate_interrupt_at_step: int | None = field(default=None, metadata=_help(
        "Testing: after this UNet step, stop as Ctrl-C would (a run that resumed from a checkpoint "
        "ignores it).", hidden=True, identity=False))
    device: str = field(default="cpu", metadata=_help(
        "Where to train: cpu (the committed model's recipe, ~90 min on 2 cores), cuda, or auto "
        "(cuda when present). fp32 either way; a GPU run draws the same batches but is not bit-identical.", identity=False))

    def __post_init__(self):
        for name in ("num_images", "val_images", "resolution", "text_layers", "vae_batch_size", "unet_batch_size",
                     "log_every", "sample_images", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("vae_channels", "unet_channels"):
            channels = getattr(self, name)
            if len(channels) < 2 or any(c < 8 or c % 8 for c in channels):
                raise ConfigError(f"--{name.replace('_', '-')} needs at least 2 channel counts, each a positive "
                                  f"multiple of 8, got {channels}")
        if self.text_width < 8 or self.text_width % 8:
            raise ConfigError(f"--text-width must be a positive multiple of 8, got {self.text_width}")
        factor = 2 ** (len(self.vae_channels) - 1) * 2 ** (len(self.unet_channels) - 1)
        if self.resolution % factor:
            raise ConfigError(f"--resolution {self.resolution} must be a multiple of {factor} (VAE factor "
                              f"{2 ** (len(self.vae_channels) - 1)} x UNet downsampling {2 ** (len(self.unet_channels) - 1)})")
        for phase in ("vae", "unet"):
            minutes, steps = getattr(self, f"{phase}_minutes"), getattr(self, f"{phase}_steps")
            if minutes is None and steps is None:
                raise ConfigError(f"--{phase}-minutes and --{phase}-steps are both unset: the {phase} phase needs a budget")
            if minutes is not None and minutes <= 0:
                raise ConfigError(f"--{phase}-minutes must be > 0, got {minutes}")
            if steps is not None and steps < 1:
                raise ConfigError(f"--{phase}-steps must be >= 1, got {steps}")
        for name in ("vae_learning_rate", "unet_learning_rate", "checkpoint_minutes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.kl_weight < 0 or self.warmup_steps < 0 or self.guidance < 0:
            raise ConfigError("--kl-weight, --warmup-steps and --guidance must be >= 0")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        check_choice("device", self.device, ("cpu", "cuda", "auto"))
        _check_next(self, PretrainConfig)



@dataclass
class MeasureConfig:
    """jobs/measure.py: prompt adherence, domain alignment (kernel MMD), memorisation and label
    fidelity of generated samples, measured with the toy-world probe (or CLIP for real models)."""

    samples: str = field(default="outputs/samples", metadata=_help(
        "The samples to measure: a jobs/sample.py output (samples.json + PNGs) or Parquet shards "
        "written by jobs/generate.py (a directory or any fsspec URI)."))
    reference: str | None = field(default="toy:target", metadata=_help(
        "Domain-alignment reference: a dataset source (toy:target, toy:world, a Cityscapes-layout "
        "directory) or Parquet shards; its --reference-split. null/none: skip the MMD."))
    reference_split: str = field(default="val", metadata=_help("Split of --reference (dataset sources only)."))
    reference_images: int = field(default=200, metadata=_help("At most this many reference images."))
    train_data: str | None = field(default="toy:target", metadata=_help(
        "The images the model was fine-tuned on (memorisation: distance of each sample to its nearest "
        "training image); its train split. null/none: skip memorisation."))
    train_images: int = field(default=30, metadata=_help("How many --train-data images (the few-shot split)."))
    max_samples: int | None = field(default=None, metadata=_help("Measure at most this many samples (default: all)."))
    probe: str | None = field(default=None, metadata=_help(
        "Directory of the toy-world probe's weights; trained (deterministically, ~2 min on 2 cores) "
        "and cached there when absent. Default: <venv>/share/calora_ray/probe."))
    clip: str | None = field(default=None, metadata=_help(
        "A CLIP model (hub id or local directory, e.g. openai/clip-vit-large-patch14) for real models: "
        "CMMD and CLIP-score instead of the toy probe."))
    kernel_bandwidth: float | None = field(default=None, metadata=_help(
        "RBF kernel bandwidth of the MMD; default: the median pairwise distance of the reference features."))
    resolution: int = field(default=64, metadata=_help("Images are resized to this side before the probe."))
    seed: int = field(default=0, metadata=_help("Seed of the probe training and of subsampling."))
    output: str = field(default="outputs/measure.json", metadata=_help("The JSON report (any fsspec URI)."))

    def __post_init__(self):
        for name in ("reference_images", "train_images", "resolution"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.kernel_bandwidth is not None and self.kernel_bandwidth <= 0:
            raise ConfigError(f"--kernel-bandwidth must be > 0, got {self.kernel_bandwidth}")
        for name in ("reference", "train_data"):
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() in ("", "none", "null"):
                setattr(self, name, None)
        _check_next(self, MeasureConfig)


@dataclass
class ControlNetConfig(ModelConfig, DataConfig, DistributedConfig, TrainingConfig, ControlPaletteConfig,
                       RayConnectConfig):
    """jobs/train_controlnet.py: a segmentation ControlNet (conditioning: the colour-coded label map)
    trained on target (image, label) pairs on top of the base UNet with the CA-LoRA adapter applied."""

    data: str = field(default="toy:target", metadata=DATA_HELP)
    lora: str | None = field(default=None, metadata=_help(
        "A jobs/finetune.py output (pytorch_lora_weights.safetensors): applied to the UNet, frozen, "
        "while the ControlNet trains; the same adapter is then used for generation.", identity=False))
    caption: str = field(default="Photorealistic first-person urban street view", metadata=_help(
        "Caption of every training pair (the paper's base prompt)."))
    caption_with_classes: bool = field(default=True, metadata=_help(
        "Append ' with {class names}' (the classes present in each label), as generation prompts do."))
    timesteps: str = field(default="cubic", metadata=_help(
        "How training draws diffusion timesteps: 'cubic' puts most steps at high noise, where a sampler "
        "lays out the image (T2I-Adapter's recipe for structure control); 'uniform' as the original "
        "ControlNet recipe.", choices=("uniform", "cubic")))
    proportion_empty_prompts: float = field(default=0.0, metadata=_help(
        "Share of training pairs whose caption is replaced by the empty prompt (the ControlNet paper "
        "uses 0.5): the mask is then the only clue, and guidance's unconditional branch, which also runs "
        "the ControlNet, is trained too."))
    output: str = field(default="outputs/controlnet", metadata=_help(
        "Output (and run) directory: the ControlNet in the diffusers format (config.json + "
        "diffusion_pytorch_model.safetensors; ControlNetModel.from_pretrained loads it), controlnet.json, "
        "loss.csv, loss.png; checkpoints under ray_train/ unless --storage-path. Running again with the "
        "same output resumes from the latest checkpoint.", identity=False))
    overwrite: bool = field(default=False, metadata=_help(
        "Delete the output directory (and its checkpoints) first and start over.", identity=False))

    def __post_init__(self):
        check_choice("timesteps", self.timesteps, ("uniform", "cubic"))
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ConfigError(f"--proportion-empty-prompts: {self.proportion_empty_prompts} is not in [0, 1]")
        _check_next(self, ControlNetConfig)


@dataclass
class GenerateConfig(ModelConfig, ControlPaletteConfig, RayConnectConfig):
    """jobs/generate.py: label maps -> a synthetic segmentation dataset in Parquet shards (Ray Data)."""

    lora: str | None = field(default=None, metadata=_help(
        "A jobs/finetune.py output (pytorch_lora_weights.safetensors), applied to the UNet."))
    controlnet: str | None = field(default=None, metadata=_help(
        "Required: a segmentation ControlNet directory (jobs/train_controlnet.py output) that turns the "
        "colour-coded label map into the image, so the label is exact by construction."))
    masks: str = field(default="toy", metadata=_help(
        "Where the label maps come from: 'toy' (= 'toy:target'), 'toy:source', 'toy:world', a "
        "Cityscapes-layout directory (gtFine/<split>/<city>/*_gtFine_labelIds.png), or Parquet shards "
        "with a 'label' column (this job's output, or yours); paths or any fsspec URI (s3://...)."))
    split: str = field(default="train", metadata=_help("Split of --masks (toy and Cityscapes sources)."))
    num_masks: int | None = field(default=None, metadata=_help(
        "Use only the first N masks of the source (default: all; toy: 30 train / 100 val)."))
    num_samples: int = field(default=100, metadata=_help(
        "Samples to generate; sample i uses usable mask i mod (number of usable masks)."))
    seed: int = field(default=0, metadata=_help(
        "Job seed: sample i's noise seed, condition, augmentation and sample_id derive from (seed, i)."))
    resolution: str | None = field(default=None, metadata=_help(
        "Image size in pixels: HxW (height x width, e.g. 512x1024 for Cityscapes' 2:1 on SD-1.5, "
        "64x128 on toy-sd) or one side for a square; default: the model's native square. Masks are "
        "cropped at that aspect (centred, or as --max-zoom places it) and resized nearest-neighbour "
        "to it; masks smaller than it on either side are skipped; toy masks are rendered at it."))
    steps: int = field(default=25, metadata=_help("Sampling steps."))
    guidance: float = field(default=4.0, metadata=_help("Classifier-free guidance scale."))
    conditioning_scale: float = field(default=1.0, metadata=_help("ControlNet conditioning scale."))
    conditions: list[str] = field(default_factory=lambda: ["clear", "foggy", "night", "rainy", "snowy"], metadata=_help(
        "Conditions the prompts name, any of clear, foggy, night, rainy, snowy (phrased as the toy "
        "world's captions: ' in clear weather', ' at night', ...)."))
    condition_weights: list[float] | None = field(default=None, metadata=_help(
        "Relative frequency of each of --conditions (default: equal)."))
    prompt_template: str | None = field(default=None, metadata=_help(
        "Default: the paper's 'Photorealistic first-person urban street view with {classes}{condition}'. "
        "A template of yours may use {classes} ('road, building and car'), {condition} (' at night') "
        "and {condition_name} ('night')."))
    flip: bool = field(default=False, metadata=_help(
        "Layout augmentation: flip each mask left-right with probability 1/2 (seeded per sample)."))
    max_zoom: float = field(default=1.0, metadata=_help(
        "Layout augmentation: crop a random square of 1/z of the mask's shorter side, z uniform in "
        "[1, max_zoom] (1 = centre crop of the whole shorter side)."))
    rows_per_shard: int = field(default=512, metadata=_help(
        "Rows per Parquet shard (the last shard holds the rest): the unit of work, commit and resume."))
    row_group_size: int = field(default=64, metadata=_help("Rows per Parquet row group.", identity=False))
    num_actors: int | None = field(default=None, metadata=_help(
        "Generator actors (each loads the model once): default one per GPU of the cluster, or 1 without GPUs.", identity=False))
    min_actors: int | None = field(default=None, metadata=_help(
        "With --max-actors: an autoscaling pool of at least this many actors (default 1).", identity=False))
    max_actors: int | None = field(default=None, metadata=_help(
        "An autoscaling actor pool (Ray Data's ActorPoolStrategy(min_size, max_size)): actors are added, up "
        "to this many, while shards wait and the cluster (or its autoscaler) offers their GPUs / CPUs, and "
        "removed when idle. Instead of --num-actors.", identity=False))
    batch_size: int = field(default=4, metadata=_help("Images per generate() call inside an actor.", identity=False))
    cpus_per_actor: int | None = field(default=None, metadata=_help(
        "CPUs reserved per actor (its torch threads): default: with GPUs, the CPUs per GPU of the GPU nodes; "
        "without, the cluster's CPUs / actors.", identity=False))
    use_gpu: str = field(default="auto", metadata=_help(
        "'auto' (one GPU per actor when the cluster has them), 'true' or 'false'.",
        choices=("auto", "true", "false"), identity=False))
    strict: bool = field(default=False, metadata=_help(
        "Fail on the first bad mask, naming it (default: skip bad masks and list them in manifest.json).", identity=False))
    preview_samples: int = field(default=8, metadata=_help("Samples shown in preview.png.", identity=False))
    measure_samples: int = field(default=64, metadata=_help(
        "For the toy models (tiny, toy-sd): measure label fidelity and prompt adherence of the first N "
        "rows with the toy-world probe (jobs/measure.py's metrics) and put them on the dataset card "
        "(0: skip; the probe trains once, a few minutes, when not cached).", identity=False))
    output: str = field(default="outputs/generate", metadata=_help(
        "Output URI (a path, file://, s3://, ...): data/shard-*.parquet, manifest.json, README.md, "
        "preview.png. Running the same command again resumes: completed shards are kept.", identity=False))
    overwrite: bool = field(default=False, metadata=_help("Delete the output first and start over.", identity=False))
    simulate_failure_at_shard: int | None = field(default=None, metadata=_help(
        "Testing: the actor asked for this shard raises (to exercise resume).", hidden=True, identity=False))

    def __post_init__(self):
        check_choice("use_gpu", self.use_gpu, ("auto", "true", "false"))
        for name in ("num_samples", "steps", "rows_per_shard", "row_group_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        self.resolution = resolution_text(self.resolution, "--resolution")
        for name in ("num_masks", "num_actors", "min_actors", "max_actors"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 1:
            raise ConfigError(f"--cpus-per-actor must be >= 1, got {self.cpus_per_actor}")
        if self.min_actors is not None and self.max_actors is None:
            raise ConfigError("--min-actors needs --max-actors (an autoscaling pool); for a fixed pool use --num-actors")
        if self.max_actors is not None:
            if self.num_actors is not None:
                raise ConfigError("--num-actors (a fixed pool) and --max-actors (an autoscaling one) exclude each other")
            if (self.min_actors or 1) > self.max_actors:
                raise ConfigError(f"--min-actors {self.min_actors} is more than --max-actors {self.max_actors}")
        if self.seed < 0 or self.guidance < 0 or self.preview_samples < 0 or self.measure_samples < 0:
            raise ConfigError("--seed, --guidance, --preview-samples and --measure-samples must be >= 0")
        if self.max_zoom < 1:
            raise ConfigError(f"--max-zoom must be >= 1, got {self.max_zoom}")
        if not self.conditions:
            raise ConfigError("--conditions needs at least one condition")
        if self.condition_weights is not None:
            if len(self.condition_weights) != len(self.conditions):
                raise ConfigError(f"--condition-weights needs one weight per condition ({len(self.conditions)}), "
                                  f"got {len(self.condition_weights)}")
            if any(w < 0 for w in self.condition_weights) or sum(self.condition_weights) <= 0:
                raise ConfigError("--condition-weights must be >= 0 with a positive sum")
        if self.prompt_template is not None:
            try:
                self.prompt_template.format(classes="road", condition=" at night", condition_name="night")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"--prompt-template: may use only {{classes}}, {{condition}} and "
                                  f"{{condition_name}} ({type(e).__name__}: {e})") from None
        _check_next(self, GenerateConfig)


@dataclass
class Limits:
    """What one request to the Serve endpoint may ask for: jobs/serve.py's flags, the bounds of the
    OpenAPI schema, and /v1/info's "limits" (one representation, used by all three)."""

    max_body_bytes: int = field(default=8 * 2**20, metadata=_help("Largest request body (413 above)."))
    max_side: int = field(default=1024, metadata=_help("Largest mask width or height in pixels."))
    max_num_images: int = field(default=4, metadata=_help("Largest num_images of one request."))
    max_steps: int = field(default=50, metadata=_help("Largest num_inference_steps of one request."))
    default_steps: int = field(default=25, metadata=_help("num_inference_steps when a request gives none."))
    default_guidance: float = field(default=4.0, metadata=_help("guidance_scale when a request gives none."))
    max_guidance: float = field(default=50.0, metadata=_help("Largest guidance_scale of one request."))
    max_conditioning_scale: float = field(default=10.0, metadata=_help(
        "Largest conditioning_scale of one request."))
    max_prompt_chars: int = field(default=2000, metadata=_help("Longest prompt of one request, in characters."))
    resolution: str | None = field(default=None, metadata=_help(
        "Generate every image at this size: HxW (height x width, e.g. 512x1024) or one side; each "
        "request's mask is cropped at that aspect (centred) and resized nearest-neighbour to it, and "
        "must be at least that large. Default: each image at its mask's own size (each side a "
        "multiple of side_multiple)."))
    side_multiple: int = field(default=32, metadata=_help(
        "Each side of a mask must be a multiple of this: set by the replica from the model "
        "(VAE factor x 8 with a ControlNet).", internal=True))

    def __post_init__(self):
        self.resolution = resolution_text(self.resolution, "--resolution")
        for name in ("max_body_bytes", "max_side", "max_num_images", "max_steps", "max_prompt_chars", "default_steps",
                     "side_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.default_guidance < 0 or self.max_guidance < 0 or self.max_conditioning_scale < 0:
            raise ConfigError("--default-guidance, --max-guidance and --max-conditioning-scale must be >= 0")
        if self.default_steps > self.max_steps:
            raise ConfigError(f"--default-steps {self.default_steps} exceeds --max-steps {self.max_steps}")
        _check_next(self, Limits)


@dataclass
class ServeConfig(ModelConfig, Limits, ControlPaletteConfig, RayConnectConfig):
    """jobs/serve.py: the generator behind an HTTP endpoint (Ray Serve, FastAPI; OpenAPI at /docs)."""

    lora: str | None = field(default=None, metadata=_help(
        "A jobs/finetune.py output (pytorch_lora_weights.safetensors), applied to the UNet."))
    controlnet: str | None = field(default=None, metadata=_help(
        "Required: the segmentation ControlNet directory (jobs/train_controlnet.py output) that makes "
        "the mask the image's label."))
    host: str = field(default="127.0.0.1", metadata=_help(
        "Address the HTTP proxy binds (0.0.0.0 exposes it to the network)."))
    port: int = field(default=8000, metadata=_help("HTTP port."))
    num_replicas: int = field(default=1, metadata=_help(
        "Replicas (each loads the model once); with --max-replicas, the autoscaling minimum."))
    max_replicas: int | None = field(default=None, metadata=_help(
        "Autoscale between --num-replicas and this many replicas on --target-ongoing-requests."))
    target_ongoing_requests: float = field(default=8.0, metadata=_help(
        "Autoscaling target of requests in flight per replica."))
    num_gpus: float | None = field(default=None, metadata=_help(
        "GPUs per replica; default 1 when the cluster has GPUs, else 0 (a fraction shares a GPU "
        "without memory isolation)."))
    num_cpus: float = field(default=1.0, metadata=_help("CPUs reserved per replica."))
    threads: int | None = field(default=None, metadata=_help(
        "Torch threads per replica; default: --num-cpus rounded up (1 with a GPU)."))
    max_batch_size: int = field(default=8, metadata=_help(
        "@serve.batch: most requests generated together (one generate() call per step count, "
        "guidance, conditioning scale and size among them)."))
    batch_wait_timeout_s: float = field(default=0.05, metadata=_help(
        "@serve.batch: how long the first request of a batch waits for others."))
    max_images_per_call: int = field(default=16, metadata=_help(
        "Most images in one generate() call (bounds a batch's memory); more are split over calls."))
    max_ongoing_requests: int = field(default=16, metadata=_help(
        "Requests a replica accepts at once (>= --max-batch-size, or batches never fill)."))
    max_queued_requests: int = field(default=64, metadata=_help(
        "Requests waiting for a replica before new ones get 503 (bounds memory under load)."))

    def __post_init__(self):
        for name in ("port", "num_replicas", "max_batch_size", "max_images_per_call", "max_ongoing_requests",
                     "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ConfigError(f"--max-replicas {self.max_replicas} is below --num-replicas {self.num_replicas}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if (self.num_gpus or 0) < 0 or self.num_cpus < 0 or self.batch_wait_timeout_s < 0:
            raise ConfigError("--num-gpus, --num-cpus and --batch-wait-timeout-s must be >= 0")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"--target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"--max-ongoing-requests {self.max_ongoing_requests} must be >= --max-batch-size "
                              f"{self.max_batch_size}: a replica never holds more requests than that at once")
        _check_next(self, ServeConfig)


@dataclass
class EvaluateConfig(RayConnectConfig):
    """jobs/evaluate.py: does a synthetic dataset help a segmenter? Train mmsegmentation on the few
    real images alone and on real + each synthetic set (mixed per batch), same schedule and seeds;
    mIoU on held-out real images, as Ray tasks (one per set and seed)."""

    real: str = field(default="toy:target", metadata=_help(
        "The real training images: 'toy:target' (= 'toy'), 'toy:source', or a Cityscapes-layout directory "
        "(leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_labelIds.png)."))
    real_split: str = field(default="train", metadata=_help("Split of --real."))
    real_images: int | None = field(default=30, metadata=_help(
        "Train on the first N images of --real (the few-shot set); none: every image of the split."))
    val: str | None = field(default=None, metadata=_help(
        "The held-out real images mIoU is measured on (same kinds as --real); default: --real."))
    val_split: str = field(default="val", metadata=_help("Split of --val (never the training images)."))
    val_images: int | None = field(default=None, metadata=_help(
        "Evaluate on the first N images of --val; default: all (toy: 100)."))
    synthetic: list[str] = field(default_factory=list, metadata=_help(
        "Synthetic sets, each trained with the real images in its own runs: jobs/generate.py outputs "
        "(committed shards only) or any Parquet files with 'image' and 'label' PNG columns; paths or any "
        "fsspec URI. A rerun with more sets trains only the new sets' runs.", identity=False))
    synthetic_rows: int | None = field(default=None, metadata=_help(
        "Use at most the first N rows of each synthetic set (default: all)."))
    synthetic_ratio: float = field(default=0.5, metadata=_help(
        "Share of every training batch drawn from the synthetic set (the paper: 0.5, i.e. 1:1)."))
    model_config: str = field(default="toy-fcn-r18-w16", metadata=_help(
        "The segmenter: a config shipped in calora_ray/seg_configs ('toy-fcn-r18-w16', 'toy-segformer-b0', "
        "'cityscapes-segformer-b5', 'cityscapes-deeplabv3plus-r101'), 'mmseg::<path>' (a config shipped "
        "with mmsegmentation), or a path to any mmseg config file. Its model, optimizer, schedule and "
        "pipelines are used; the data, iterations and evaluation are this job's."))
    iters: int | None = field(default=None, metadata=_help(
        "Training iterations of every run; default: the model config's (toy configs: 2000)."))
    batch_size: int | None = field(default=None, metadata=_help(
        "Images per training batch (real + synthetic); default: the model config's."))
    seeds: int = field(default=3, metadata=_help(
        "Runs per set, with seeds 0..N-1 (model init, batches, augmentation). A rerun with more seeds "
        "adds runs.", identity=False))
    val_interval: int | None = field(default=None, metadata=_help(
        "Also evaluate every N iterations (recorded in the run's metrics.json); default: only at the end.",
        identity=False))
    loader_workers: int | None = field(default=None, metadata=_help(
        "DataLoader worker processes per run; default: the model config's.", identity=False))
    num_gpus_per_trial: float | None = field(default=None, metadata=_help(
        "GPUs per run (Ray task); default: 1 when the cluster has GPUs, else 0. Runs go in parallel as "
        "far as the cluster's GPUs (or CPUs) allow.", identity=False))
    cpus_per_trial: int | None = field(default=None, metadata=_help(
        "CPUs reserved per run (its torch threads and loader workers); default: with GPUs, the CPUs per GPU "
        "of the GPU nodes; without, every CPU (runs one after another).", identity=False))
    resource_wait_s: float = field(default=60.0, metadata=_help(
        "How long to wait for the cluster (e.g. an autoscaler) to offer one run's CPUs/GPUs before "
        "failing with a clear error.", identity=False))
    output: str = field(default="outputs/evaluate", metadata=_help(
        "Output directory: metrics.json, report.md, per_class_iou.png and runs/<set>/seed<k>/ (each "
        "run's mmseg work dir: checkpoint, logs, its metrics.json). Running the same command again skips "
        "the runs whose metrics are complete.", identity=False))
    overwrite: bool = field(default=False, metadata=_help(
        "Delete the output directory first and start over.", identity=False))

    def __post_init__(self):
        for name in ("seeds", "resource_wait_s"):
            if getattr(self, name) < (1 if name == "seeds" else 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {1 if name == 'seeds' else 0}, "
                                  f"got {getattr(self, name)}")
        for name in ("real_images", "val_images", "synthetic_rows", "iters", "batch_size", "val_interval",
                     "cpus_per_trial"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ConfigError(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if self.num_gpus_per_trial is not None and self.num_gpus_per_trial < 0:
            raise ConfigError(f"--num-gpus-per-trial must be >= 0, got {self.num_gpus_per_trial}")
        if not 0 < self.synthetic_ratio < 1:
            raise ConfigError(f"--synthetic-ratio must be in (0, 1), got {self.synthetic_ratio}")
        if isinstance(self.val, str) and self.val.lower() in ("", "none", "null"):
            self.val = None
        if len(set(self.synthetic)) != len(self.synthetic):
            raise ConfigError(f"--synthetic lists a set twice: {' '.join(self.synthetic)}")
        _check_next(self, EvaluateConfig)


@dataclass
class AblateConfig(ModelConfig, DistributedConfig, RayConnectConfig):
    """jobs/ablate.py: the paper's ablation (which projections get LoRA) as a Ray Tune sweep of Ray Train
    fine-tuning runs, each measured the same way; a report with the paper's Table 3 and Fig. 6 shapes."""

    model: str = field(default="toy-sd", metadata=_help(
        "The model every trial fine-tunes: 'toy-sd' (the toy world's diffusion model), 'tiny', or a diffusers "
        "directory / hub id."))
    modes: list[str] = field(default_factory=lambda: ["none", "all", "normalized", "unnormalized", "random"],
                             metadata=_help(
        "Selection modes: none (pretrained), all (full LoRA), normalized (CA-LoRA), unnormalized, random. "
        "This and --ks, --concepts, --seeds choose the grid: a rerun may extend it.", identity=False))
    ks: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0, 10.0], metadata=_help(
        "Top-k %% of the projections for `normalized` (CA-LoRA): one trial per k (Fig. 6).", identity=False))
    main_k: float = field(default=2.0, metadata=_help(
        "k %% of `unnormalized` and `random`, and of the Table 3 rows (the paper: 2)."))
    concepts: list[str] = field(default_factory=lambda: ["style", "viewpoint"], metadata=_help(
        "Concepts whose sensitivity ranks the projections (one jobs/score.py run each).", identity=False))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=_help(
        "Seeds: each trial once per seed (LoRA init, batches, random selection, sampling noise).",
        identity=False))
    data: str = field(default="toy:target", metadata=_help(
        "The few-shot target set every trial trains on (its val split: the held-out alignment reference "
        "and the masks of label fidelity)."))
    num_images: int = field(default=30, metadata=_help("Training images (the first N of --data's train split)."))
    resolution: int = field(default=64, metadata=_help("Training, scoring and sampling resolution."))
    timestep: int = field(default=81, metadata=_help("Scoring timestep (the paper: 81)."))
    score_samples: int = field(default=16, metadata=_help("Samples of each concept's scoring run."))
    score_x0_steps: int = field(default=10, metadata=_help("Sampling steps of the scoring run's x_0."))
    timesteps: list[int] = field(default_factory=lambda: [1, 81, 201, 481], metadata=_help(
        "Scoring timesteps of the paper's Table 5: each concept is also scored at these, its ranking compared "
        "with --timestep's, and CA-LoRA at --main-k trained on each one's selection (one more trial per t, "
        "concept and seed; --timestep itself adds none).", identity=False))
    stability_samples: list[int] = field(default_factory=lambda: [4, 8, 16], metadata=_help(
        "Ranking stability: scoring runs with these numbers of samples are compared with one of 4 x "
        "--score-samples at another seed (Spearman, top-k overlap); [] in the YAML skips it.", identity=False))
    rank: int = field(default=16, metadata=_help("LoRA rank of every trial."))
    steps: int = field(default=600, metadata=_help("Optimizer steps of every trial (the same budget for all)."))
    batch_size: int = field(default=4, metadata=_help("Images per step."))
    learning_rate: float = field(default=1e-3, metadata=_help("AdamW learning rate of every trial."))
    checkpoint_every: int = field(default=100, metadata=_help(
        "Checkpoint every N steps (a killed trial continues from there).", identity=False))
    sample_images: int = field(default=8, metadata=_help(
        "Samples per prompt (clear, night, foggy, rainy, snowy) for the metrics."))
    sample_steps: int = field(default=20, metadata=_help("Sampling steps of the measured samples."))
    guidance: float = field(default=4.0, metadata=_help("Guidance scale of the measured samples."))
    reference_images: int = field(default=100, metadata=_help("Held-out target images of the alignment."))
    controlnet: str | None = field(default="models/toy-sd-controlnet", metadata=_help(
        "A segmentation ControlNet of --model for label fidelity (none: not measured)."))
    fidelity_masks: int = field(default=16, metadata=_help("Held-out masks of the label-fidelity samples."))
    eval_pairs: int = field(default=0, metadata=_help(
        "Downstream mIoU of Table 3's trials (none, full LoRA, each selection at --main-k): generate this many "
        "mask-conditioned pairs with the trial's model (jobs/generate.py, --controlnet, clear prompt, the "
        "training masks) and train the segmenter on the real images alone and with them 1:1 (jobs/evaluate.py). "
        "0: not measured.", identity=False))
    eval_iters: int = field(default=1000, metadata=_help(
        "Segmenter iterations of each downstream run (the same for every trial; one segmenter seed).",
        identity=False))
    eval_model_config: str = field(default="toy-fcn-r18-w16", metadata=_help(
        "The downstream segmenter (jobs/evaluate.py's --model-config).", identity=False))
    stage: str = field(default="all", metadata=_help(
        "What to run: 'all' (scoring, the missing trials, the downstream mIoU with --eval-pairs, the report); "
        "'trials' (without the downstream mIoU); 'downstream' (only the downstream mIoU of the finished "
        "trials); 'report' (nothing: grid.json and the report from the records in --output, listing what "
        "has not run).", choices=("all", "trials", "downstream", "report"), identity=False))
    max_concurrent_trials: int | None = field(default=None, metadata=_help(
        "Trials at once; default: as many trainers as the cluster holds (GPUs / --num-workers, or CPUs / "
        "the CPUs of one trial).", identity=False))
    work_dir: str = field(default="outputs/ablation", metadata=_help(
        "Scoring runs, each trial's fine-tuning run (checkpoints, adapter) and Tune's state.", identity=False))
    output: str = field(default="outputs/ablation/report", metadata=_help(
        "The results: trials/<trial>.json (one per finished trial; a rerun runs only the missing ones), "
        "grids/, report.md, fig6.png, results.json. docs/ablation for the documented sweep.", identity=False))

    def __post_init__(self):
        for mode in self.modes:
            check_choice("modes", mode, ABLATION_MODES)
        if not self.seeds or not self.modes:
            raise ConfigError("--modes and --seeds must not be empty")
        if any(not 0 < k <= 100 for k in [*self.ks, self.main_k]):
            raise ConfigError(f"--ks and --main-k must be in (0, 100], got {self.ks} and {self.main_k}")
        for name in ("num_images", "steps", "batch_size", "rank", "sample_images", "sample_steps",
                     "reference_images", "score_samples", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if any(n < 1 for n in self.stability_samples):
            raise ConfigError(f"--stability-samples must all be >= 1, got {self.stability_samples}")
        if any(not 0 <= t < 1000 for t in [*self.timesteps, self.timestep]):
            raise ConfigError(f"--timesteps and --timestep must be in [0, 1000), got {self.timesteps}, {self.timestep}")
        if isinstance(self.controlnet, str) and self.controlnet.lower() in ("", "none", "null"):
            self.controlnet = None
        if self.eval_pairs < 0:
            raise ConfigError(f"--eval-pairs must be >= 0, got {self.eval_pairs}")
        check_choice("stage", self.stage, ("all", "trials", "downstream", "report"))
        if self.stage == "downstream" and not self.eval_pairs:
            raise ConfigError("--stage downstream needs --eval-pairs N (N >= 1)")
        if self.eval_pairs and self.controlnet is None:
            raise ConfigError("--eval-pairs needs --controlnet: the downstream pairs are mask-conditioned samples")
        _check_next(self, AblateConfig)


# ----------------------------------------------------------------------------- image sizes


def parse_resolution(value: str | int | None, flag: str = "--resolution") -> tuple[int, int] | None:
    """(height, width) of a size given as 'HxW' ('512x1024') or one side ('512', 512, a square);
    None stays None. A ConfigError naming `flag` for anything else."""
    if value is None:
        return None
    text = str(value).strip().lower()
    parts = text.split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{flag} {value!r}: expected HxW (height x width, e.g. 512x1024) or one side (512)")
    height, width = (int(parts[0]), int(parts[-1]))
    if height < 8 or width < 8:
        raise ConfigError(f"{flag} {value!r}: each side must be >= 8")
    return height, width


def resolution_text(value: str | int | None, flag: str = "--resolution") -> str | None:
    """The canonical text of a size: '512' for a square, '512x1024' otherwise (what configs store)."""
    size = parse_resolution(value, flag)
    return None if size is None else size_label(size)


def size_label(size: tuple[int, int]) -> str:
    """'64' for (64, 64), '64x128' for (64, 128): how runs, manifests and cards name a size."""
    height, width = size
    return str(height) if height == width else f"{height}x{width}"


def size_identity(size: tuple[int, int]) -> int | str:
    """A size as run records and manifests store it: the side (an int) for a square, as before
    non-square sizes existed, so older runs still resume; 'HxW' otherwise."""
    return size[0] if size[0] == size[1] else size_label(size)


# ----------------------------------------------------------------------------- parsing


def option_fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type) of every option of a config (its own and its shared configs'),
    without the internal fields the code sets."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _base_type(tp):
    """(scalar type, is_list) of an annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(name: str, value, tp, where: str):
    """Check a YAML value against the field type; return it converted."""
    scalar, is_list = _base_type(tp)
    if value is None:
        return None
    if is_list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{name}' must be a list, got {value!r}")
        return [_coerce(name, v, scalar, where) for v in value]
    if scalar is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{name}' must be a mapping, got {value!r}")
        return value
    if scalar is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{name}' must be true or false, got {value!r}")
        return value
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if scalar is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # YAML reads `resolution: 512` as a number
    if scalar is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, scalar):
        raise ConfigError(f"{where}: '{name}' must be of type {scalar.__name__}, got {value!r}")
    return value


def from_text(cls, key: str, value, where: str = "argument"):
    """One option's value given as text (`serve run key=value`), or already typed (YAML `args:`):
    numbers, booleans and 'none' converted by the field's type; an unknown key is an error."""
    fields = option_fields(cls)
    name = key.replace("-", "_")
    if name not in fields:
        raise ConfigError(f"unknown key '{key}' for {cls.__name__}; known keys: {', '.join(sorted(fields))}")
    if not isinstance(value, str):
        return _coerce(name, value, fields[name][1], where)
    scalar, is_list = _base_type(fields[name][1])
    if value.lower() in ("none", "null"):
        return None
    try:
        if scalar is bool:
            return {"true": True, "false": False}[value.lower()]
        return [scalar(v) for v in value.split(",")] if is_list else scalar(value)
    except (KeyError, ValueError):
        raise ConfigError(f"'{key}' must be of type {scalar.__name__}, got {value!r}") from None


def load_yaml(path: str | Path, cls, job: str) -> dict[str, Any]:
    """Option values from a YAML file: its top-level keys this job has, then its job section."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of option names to values")
    fields = option_fields(cls)
    known_anywhere = set().union(*(option_fields(c) for c in JOB_CONFIGS.values()))
    values: dict[str, Any] = {}
    sections = [(doc, f"{path}")]
    if isinstance(doc.get(job), dict):
        sections.append((doc[job], f"{path} [{job}]"))
    for section, where in sections:
        for key, value in section.items():
            if key in JOB_CONFIGS:
                continue
            name = str(key).replace("-", "_")
            if name not in fields:
                # Top-level keys of other jobs are fine; a key no job knows is a typo.
                if section is doc and name in known_anywhere:
                    continue
                raise ConfigError(f"{where}: unknown key '{key}' for job '{job}'; "
                                  f"known keys: {', '.join(sorted(fields))}")
            values[name] = _coerce(name, value, fields[name][1], where)
    return values


def build_parser(cls, job: str, description: str | None = None) -> argparse.ArgumentParser:
    """argparse parser whose flags and help texts come from the config's fields."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{job}.py", description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML file with option values "
                        "(flags given on the command line win over it).")
    defaults = cls()
    for name, (f, tp) in option_fields(cls).items():
        if not f.metadata.get("cli", True):
            continue
        default = getattr(defaults, name)
        scalar, is_list = _base_type(tp)
        text = argparse.SUPPRESS if f.metadata.get("hidden") else f.metadata.get("help", "") + f" (default: {default})"
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=text)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        flag = "--" + name.replace("_", "-")
        if scalar is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            parser.add_argument(flag, nargs="+", type=scalar, metavar=name.upper(), **kwargs)
        else:
            optional = type(None) in typing.get_args(tp)
            convert = _none_or(scalar) if optional and scalar in (int, float) else scalar
            parser.add_argument(flag, type=convert, metavar=name.upper() if scalar is not str else None, **kwargs)
    return parser


def _none_or(scalar):
    """argparse type for an optional number: `none` / `null` unset it (e.g. --vae-minutes none)."""
    def convert(text: str):
        return None if text.strip().lower() in ("none", "null") else scalar(text)
    convert.__name__ = scalar.__name__  # argparse names the type in its error message
    return convert


def build_config(cls, values: dict[str, Any]):
    """The job's config from option values over its defaults; __post_init__ validates."""
    unknown = sorted(set(values) - set(option_fields(cls)))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return cls(**values)


def parse_config(cls, argv: list[str] | None, job: str, description: str | None = None):
    """defaults < --config YAML < flags; returns the job's config dataclass.

    A ConfigError from validation is reported the argparse way (usage line + message, exit 2).
    """
    parser = build_parser(cls, job, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    try:
        values = load_yaml(config_file, cls, job) if config_file else {}
        values.update(args)
        return build_config(cls, values)
    except ConfigError as e:
        parser.error(str(e))


def to_dict(cfg) -> dict[str, Any]:
    """option -> value (what a report or a run record stores)."""
    return dataclasses.asdict(cfg)


JOB_CONFIGS = {"score": ScoreConfig, "finetune": FinetuneConfig, "sample": SampleConfig,
               "pretrain_toy": PretrainConfig, "measure": MeasureConfig, "train_controlnet": ControlNetConfig,
               "generate": GenerateConfig, "serve": ServeConfig,
               "evaluate": EvaluateConfig, "ablate": AblateConfig}
