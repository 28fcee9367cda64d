"""Pretrain `toy-sd` on the pretraining world, on CPU (jobs/pretrain_toy.py).

Two phases with step (or time) budgets, as a CPU prototype found (docs/toyworld.md, "Why this recipe"):

1. an AutoencoderKL (f = 4: 64x64 images -> 4x16x16 latents) with L1 + MSE reconstruction and a
   small KL, then the latent scaling factor 1/std measured on the training renders;
2. a UNet2DConditionModel on the frozen VAE's latents, trained jointly with a small CLIP text
   encoder: v-prediction, cosine schedule, 10 % empty captions (classifier-free guidance), EMA.

The output is an ordinary diffusers directory: `load_components(dir)` and
`StableDiffusionPipeline.from_pretrained(dir)` load it like any model.

    build_toy_sd(...)            -> Components with fresh weights (the toy-sd architecture)
    vae_loss / reconstruction_psnr / encode_posteriors / latent_scaling_factor
    ema_update, run_phase        -> the pieces of the two phases
    pretrain_toy_sd(cfg)         -> the whole job: data, phases, checkpoints, outputs, card

Both phases run on the training loop's core (calora_ray.training: `StepLoop`, `Progress`, its
logger, `write_loss_files`, and `save_state` / `load_state` for checkpoint.safetensors:
safetensors + JSON, loaded without running code).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from calora_ray import __version__
from calora_ray.config import PretrainConfig, to_dict
from calora_ray.datasets import open_dataset
from calora_ray.errors import UserValueError
from calora_ray.models import Components, build_tokenizer, load_components, save_components
from calora_ray.outputs import prepare_run_dir, run_identity
from calora_ray.plots import image_grid
from calora_ray.sampling import sample_images
from calora_ray.toyworld.world import BASE_PROMPTS, CONDITION_PHRASES
from calora_ray.training import (Progress, StepLoop, diffusion_step_loss, load_state, log, save_state, step_generator,
                                 write_loss_files)

CHECKPOINT = "checkpoint.safetensors"
REPORT = "pretrain.json"
CARD = "MODEL_CARD.md"
DIFFUSERS_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
SAMPLE_CONDITIONS = ("foggy", "night", "rainy", "snowy")


# ----------------------------------------------------------------------------- the architecture


def _norm_groups(channels) -> int:
    """The most GroupNorm groups (<= 32) that divide every width with at least 2 channels a group."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 and c // g >= 2 for c in channels))


def build_vae(channels, resolution: int):
    """AutoencoderKL with len(channels) blocks (f = 2^(len - 1)), 4 latent channels, one layer a block."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=_norm_groups(channels), sample_size=resolution)


def build_unet(channels, cross_attention_dim: int, sample_size: int):
    """Latent UNet: the first (full latent resolution) level without attention, every lower level
    and the mid block with self- and cross-attention; one layer a block, 8 heads."""
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels), norm_num_groups=_norm_groups(channels), attention_head_dim=8,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim)


def build_text_encoder(vocab_size: int, width: int, layers: int, max_length: int = 77):
    """A CLIPTextModel of `layers` layers of `width` (heads of 16 dims), ids as build_tokenizer's."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 16), max_position_embeddings=max_length, projection_dim=width,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu"))


def build_scheduler():
    """The shipped sampler; its config is also the training noise schedule (DDPM view of it).

    v-prediction on the cosine schedule: the prototype's ε-prediction ignored "night". The
    cosine schedule's terminal SNR is already ~2e-9 (sqrt(alpha_bar_T) ~ 5e-5), so
    rescale_betas_zero_snr would change the schedule for no gain. Trailing spacing starts
    sampling at t = 999, where that is pure noise; clip_sample=False (clipping washed night out);
    set_alpha_to_one makes the last step return the predicted clean latent; steps_offset=1 is what
    StableDiffusionPipeline would force (trailing spacing ignores it).
    """
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=1,
        rescale_betas_zero_snr=False)


def architecture(cfg: PretrainConfig) -> dict:
    """The build_toy_sd keyword arguments of a config."""
    return dict(resolution=cfg.resolution, vae_channels=cfg.vae_channels, unet_channels=cfg.unet_channels,
                text_width=cfg.text_width, text_layers=cfg.text_layers)


def build_toy_sd(*, resolution: int, vae_channels, unet_channels, text_width: int, text_layers: int,
                 seed: int = 0) -> Components:
    """Fresh (randomly initialised, deterministic by seed) toy-sd components, in train-ready fp32."""
    tokenizer = build_tokenizer()
    factor = 2 ** (len(vae_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(vae_channels, resolution)
        unet = build_unet(unet_channels, text_width, resolution // factor)
        text_encoder = build_text_encoder(len(tokenizer), text_width, text_layers, tokenizer.model_max_length)
    return Components(name="toy-sd", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler=build_scheduler())


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=2)
def render_world_images(split: str, num_images: int, resolution: int) -> tuple[np.ndarray, list[str]]:
    """The first `num_images` renders of toy:world `split`: uint8 (N, H, W, 3) and their captions.

    Cached per process (read-only), so benchmarks/pretrain_adherence.py's continued runs render once."""
    dataset = open_dataset("toy:world", split=split, num_images=num_images, resolution=resolution)
    images = np.empty((num_images, resolution, resolution, 3), np.uint8)
    captions: list[str] = []
    for i in tqdm(range(num_images), desc=f"render {split}", file=sys.stderr, mininterval=2, leave=False,
                  disable=num_images < 500):
        item = dataset[i]
        images[i] = item["image"]
        captions.append(item["caption"])
    return images, tuple(captions)  # callers only read the array


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], as the pipelines' VAE expects."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, model_max_length) ids, padded exactly as StableDiffusionPipeline pads a prompt."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- losses and measures


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float) -> torch.Tensor:
    """L1 + MSE between x (B, 3, H, W) in [-1, 1] and its reconstruction from a posterior sample,
    plus kl_weight x the KL to N(0, I) per latent element."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    recon = vae.decode(z).sample
    kl = posterior.kl().sum() / z.numel()
    return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * kl


@torch.no_grad()
def reconstruction_psnr(vae, images: np.ndarray, batch_size: int = 64) -> float:
    """Mean per-image PSNR (dB, pixel range [0, 1]) of decode(posterior mean) on uint8 (N, H, W, 3) images."""
    psnrs = []
    device = next(vae.parameters()).device
    for start in range(0, len(images), batch_size):
        x = to_model_range(torch.from_numpy(images[start:start + batch_size]).to(device))
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(1 / mse))
    return float(torch.cat(psnrs).mean())


@torch.no_grad()
def encode_posteriors(vae, images: np.ndarray, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std, each (N, 4, H/f, W/f), of uint8 (N, H, W, 3) images (unscaled)."""
    means, stds = [], []
    device = next(vae.parameters()).device
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_model_range(torch.from_numpy(images[start:start + batch_size]).to(device))).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor) -> float:
    """1 / std of posterior samples z = mean + std * eps over all images and elements (SD's recipe),
    computed exactly: Var z = Var(mean) + E[std^2]."""
    variance = mean.double().var() + std.double().pow(2).mean()
    return float(1.0 / variance.sqrt())


def text_embeddings(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """(B, 77) ids -> (B, 77, width) last hidden states: what the SD pipeline feeds the UNet."""
    return text_encoder(ids)[0]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (modules of one architecture)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay at optimizer step `step` (1-based): warms up as (1 + n) / (10 + n), as diffusers' EMAModel."""
    return min(decay, (1 + step) / (10 + step))


def warmup_lr(optimizer, learning_rate: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant (the EMA does the averaging a decay would)."""
    lr = learning_rate * min(1.0, step / warmup_steps) if warmup_steps else learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ----------------------------------------------------------------------------- one time-boxed phase


def run_phase(name: str, step_fn: Callable[[int], tuple[float, float]], progress: Progress, *,
              max_steps: int | None, max_minutes: float | None, batch_size: int, log_every: int,
              checkpoint_minutes: float, save_checkpoint: Callable[[], None],
              interrupt_at_step: int | None = None) -> None:
    """Call `step_fn(step) -> (loss, lr)` for steps progress.step + 1, ... until the budget is spent,
    on the training loop's core (training.StepLoop: a loss row, the mean loss since the last one,
    every `log_every` steps, and its log line).

    Updates `progress` in place; calls `save_checkpoint()` every `checkpoint_minutes` of training,
    at the end of the phase and, on Ctrl-C (KeyboardInterrupt), before re-raising.
    """
    loop = StepLoop(name, progress, max_steps=max_steps, max_minutes=max_minutes, log_every=log_every,
                    images_per_step=batch_size)
    try:
        for step in loop:
            loop.record(*step_fn(step))
            if loop.checkpoint_due(every_minutes=checkpoint_minutes):
                save_checkpoint()
            if interrupt_at_step == step:
                raise KeyboardInterrupt(f"--simulate-interrupt-at-step {interrupt_at_step}")
    except KeyboardInterrupt:
        save_checkpoint()
        log(f"{name}: interrupted at step {progress.step}; {CHECKPOINT} saved, run the same command again to continue")
        raise


# ----------------------------------------------------------------------------- the job


def prepare_output(cfg: PretrainConfig) -> Path:
    """The output doubles as the run directory: new, or the same run again (resume), or an error."""
    output = prepare_run_dir(Path(cfg.output).expanduser().resolve(), run_identity(cfg, job="pretrain_toy"),
                             cfg.overwrite, "pretrain_toy")
    # The model directory is committed; the resumable training state (~100 MB) is not.
    (output / ".gitignore").write_text(f"{CHECKPOINT}\n.*.tmp\n")
    return output


def sample_prompts() -> list[str]:
    """Every style x viewpoint, with no condition phrase (clear) and under four conditions."""
    return [base + phrase for base in BASE_PROMPTS.values()
            for phrase in ("", *(CONDITION_PHRASES[c] for c in SAMPLE_CONDITIONS))]


def final_loss(history: list[dict], last_steps: int = 100) -> float | None:
    """Mean logged loss over (about) the last `last_steps` steps."""
    if not history:
        return None
    end = history[-1]["step"]
    rows = [h for h in history if h["step"] > end - last_steps] or history[-1:]
    return sum(h["loss"] for h in rows) / len(rows)


def pretrain_toy_sd(cfg: PretrainConfig, command: str | None = None) -> Path:
    """jobs/pretrain_toy.py: train toy-sd into cfg.output (a diffusers directory); resumable.

    Running again with the same output continues from checkpoint.safetensors (larger budgets extend the
    current phase; the VAE is frozen once the UNet phase has begun). Returns the output path.
    """
    output = prepare_output(cfg)
    ckpt_path = output / CHECKPOINT
    ckpt = load_state(ckpt_path) if ckpt_path.is_file() or ckpt_path.with_suffix(".pt").is_file() else None
    vae_state = Progress.from_state(ckpt["vae_phase"]) if ckpt else Progress()
    unet_state = Progress.from_state(ckpt["unet_phase"]) if ckpt and ckpt.get("unet_phase") else None
    if ckpt is None:
        log(f"pretrain_toy: starting a new run in {output}")
    else:
        log(f"pretrain_toy: resuming from {ckpt_path}: vae step {vae_state.step}, "
            f"unet step {unet_state.step if unet_state else 0}")
    if unet_state is not None and unet_state.spent(cfg.unet_steps, cfg.unet_minutes) and _outputs_current(output, unet_state):
        log("pretrain_toy: the run is complete and its outputs are written; nothing to do (raise --unet-minutes "
            "or --unet-steps to train on, or pass --overwrite to start over)")
        return output

    wall = dict(ckpt["wall_s"]) if ckpt else {}
    components = build_toy_sd(**architecture(cfg), seed=cfg.seed)
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserValueError("--device cuda: no CUDA device is visible (use --device cpu or auto)")
    components.to(device)
    vae, unet, text_encoder = components.vae, components.unet, components.text_encoder
    t = time.perf_counter()
    images, captions = render_world_images("train", cfg.num_images, cfg.resolution)
    val_images, _ = render_world_images("val", cfg.val_images, cfg.resolution)
    wall["render"] = time.perf_counter() - t
    images_t = torch.from_numpy(images).to(device)

    # ---- phase 1: the VAE (frozen once the UNet phase has begun)
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
    if ckpt:
        vae.load_state_dict(ckpt["vae"])
        if ckpt.get("vae_optimizer") is not None:
            vae_optimizer.load_state_dict(ckpt["vae_optimizer"])
    unet_optimizer = ema_unet = ema_text_encoder = None
    state = {"scaling_factor": ckpt.get("scaling_factor") if ckpt else None,
             "latent_mean": ckpt.get("latent_mean") if ckpt else None,
             "vae_psnr": ckpt.get("vae_psnr") if ckpt else None}

    def save_checkpoint():
        wall["vae"], wall["unet"] = vae_state.elapsed_s, unet_state.elapsed_s if unet_state else 0.0
        save_state({
            "format": 1, "identity": run_identity(cfg, job="pretrain_toy"), "wall_s": wall, **state,
            "vae_phase": dataclasses.asdict(vae_state), "vae": vae.state_dict(),
            "vae_optimizer": None if unet_state else vae_optimizer.state_dict(),
            "unet_phase": dataclasses.asdict(unet_state) if unet_state else None,
            "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
            "ema_unet": ema_unet.state_dict() if ema_unet else None,
            "ema_text_encoder": ema_text_encoder.state_dict() if ema_text_encoder else None,
            "unet_optimizer": unet_optimizer.state_dict() if unet_optimizer else None,
        }, ckpt_path)
        write_phase_losses(output, vae_state, unet_state)

    resumed = ckpt is not None
    if unet_state is None:
        def vae_step(step: int) -> tuple[float, float]:
            g = step_generator(cfg.seed, 0, step)
            lr = warmup_lr(vae_optimizer, cfg.vae_learning_rate, step, cfg.warmup_steps)
            x = to_model_range(images_t[torch.randint(0, len(images_t), (cfg.vae_batch_size,), generator=g)])
            loss = vae_loss(vae, x, g, cfg.kl_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            vae_optimizer.step()
            vae_optimizer.zero_grad(set_to_none=True)
            return float(loss.detach()), lr

        vae.train()
        run_phase("vae", vae_step, vae_state, max_steps=cfg.vae_steps, max_minutes=cfg.vae_minutes,
                  batch_size=cfg.vae_batch_size, log_every=cfg.log_every, checkpoint_minutes=cfg.checkpoint_minutes,
                  save_checkpoint=save_checkpoint)
        vae.eval()
        state["vae_psnr"] = reconstruction_psnr(vae, val_images)
    elif not vae_state.spent(cfg.vae_steps, cfg.vae_minutes):
        log("pretrain_toy: the VAE is frozen once the UNet phase has begun; its larger budget is ignored")
    vae.eval().requires_grad_(False)
    log(f"vae: {vae_state.step} steps, {vae_state.elapsed_s / 60:.1f} min, held-out PSNR {state['vae_psnr']:.2f} dB")

    # ---- phase 2: UNet + text encoder on the VAE's latents
    t = time.perf_counter()
    latent_mean, latent_std = encode_posteriors(vae, images)
    wall["encode"] = time.perf_counter() - t
    if unet_state is None:
        state["scaling_factor"] = latent_scaling_factor(latent_mean, latent_std)
        state["latent_mean"] = float(latent_mean.mean())
    scale = state["scaling_factor"]
    vae.register_to_config(scaling_factor=scale)
    log(f"latents: scaling factor {scale:.4f} (1/std), mean {state['latent_mean']:.4f}")

    ids = token_ids(components.tokenizer, captions).to(device)
    empty_ids = token_ids(components.tokenizer, [""])[0].to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    unet_optimizer = torch.optim.AdamW(params, lr=cfg.unet_learning_rate)
    ema_unet, ema_text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    if unet_state is not None:
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        ema_unet.load_state_dict(ckpt["ema_unet"])
        ema_text_encoder.load_state_dict(ckpt["ema_text_encoder"])
        unet_optimizer.load_state_dict(ckpt["unet_optimizer"])
    else:
        unet_state = Progress()
    for m in (ema_unet, ema_text_encoder):
        m.eval().requires_grad_(False)

    def unet_step(step: int) -> tuple[float, float]:
        g = step_generator(cfg.seed, 1, step)
        lr = warmup_lr(unet_optimizer, cfg.unet_learning_rate, step, cfg.warmup_steps)
        pick = torch.randint(0, len(images_t), (cfg.unet_batch_size,), generator=g)
        noise = torch.randn(latent_mean[pick].shape, generator=g).to(device)
        latents = (latent_mean[pick] + latent_std[pick] * noise) * scale
        batch_ids = ids[pick].clone()
        batch_ids[(torch.rand(len(pick), generator=g) < cfg.caption_dropout).to(device)] = empty_ids
        cond = {"encoder_hidden_states": text_embeddings(text_encoder, batch_ids)}
        loss = diffusion_step_loss(components, latents, cond, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        unet_optimizer.step()
        unet_optimizer.zero_grad(set_to_none=True)
        decay = ema_decay_at(step, cfg.ema_decay)
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text_encoder, text_encoder, decay)
        return float(loss.detach()), lr

    unet.train()
    text_encoder.train()
    run_phase("unet", unet_step, unet_state, max_steps=cfg.unet_steps, max_minutes=cfg.unet_minutes,
              batch_size=cfg.unet_batch_size, log_every=cfg.log_every, checkpoint_minutes=cfg.checkpoint_minutes,
              save_checkpoint=save_checkpoint, interrupt_at_step=None if resumed else cfg.simulate_interrupt_at_step)
    log(f"unet: {unet_state.step} steps, {unet_state.elapsed_s / 60:.1f} min, "
        f"final loss {final_loss(unet_state.history):.4f}")

    # ---- outputs: the EMA weights as a diffusers directory, then what a person looks at
    trained = Components(name="toy-sd", unet=ema_unet.cpu(), vae=vae.cpu(), text_encoder=ema_text_encoder.cpu(),
                         tokenizer=components.tokenizer, scheduler=components.scheduler)
    state["device"] = device.type
    write_outputs(cfg, output, trained, vae_state, unet_state, state, wall, command)
    return output


def _outputs_current(output: Path, unet_state: Progress) -> bool:
    """The diffusers directory and report exist and reflect the checkpoint's last UNet step."""
    report = output / REPORT
    if not all((output / p).exists() for p in DIFFUSERS_PARTS) or not report.is_file():
        return False
    return json.loads(report.read_text()).get("steps", {}).get("unet") == unet_state.step


def write_phase_losses(output: Path, vae_state: Progress, unet_state: Progress | None) -> None:
    """logs/{vae,unet}/loss.csv and loss.png of the phases so far (with every checkpoint, and the outputs)."""
    write_loss_files(output / "logs" / "vae", vae_state.history, "toy-sd VAE", ylabel="L1 + MSE + KL",
                     log_scale=True)
    if unet_state is not None:
        write_loss_files(output / "logs" / "unet", unet_state.history, "toy-sd UNet + text encoder (v-prediction)")


def write_outputs(cfg: PretrainConfig, output: Path, trained: Components, vae_state: Progress,
                  unet_state: Progress, state: dict, wall: dict, command: str | None) -> None:
    """The diffusers directory (save_pretrained), loss curves, samples.png (from the directory as
    written, loaded back like any model), pretrain.json and MODEL_CARD.md."""
    save_components(trained, output)
    write_phase_losses(output, vae_state, unet_state)
    t = time.perf_counter()
    loaded = load_components(str(output))
    prompts = sample_prompts()
    rows = sample_images(loaded, prompts, cfg.sample_images, cfg.seed, cfg.sample_steps, cfg.guidance,
                         cfg.resolution)
    image_grid(rows, prompts).save(output / "samples.png")
    wall["samples"] = time.perf_counter() - t
    sizes = {p.relative_to(output).as_posix(): p.stat().st_size for p in sorted(output.rglob("*.safetensors"))}
    report = {
        "model": "toy-sd",
        "steps": {"vae": vae_state.step, "unet": unet_state.step},
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
        "final_loss": {"vae": final_loss(vae_state.history), "unet": final_loss(unet_state.history)},
        "device": state.get("device", "cpu"),
        "vae_psnr_db": state["vae_psnr"],
        "latent_scaling_factor": state["scaling_factor"],
        "latent_mean": state["latent_mean"],
        "parameters": {"unet": num_parameters(trained.unet), "vae": num_parameters(trained.vae),
                       "text_encoder": num_parameters(trained.text_encoder)},
        "safetensors_bytes": sizes,
        "safetensors_total_mb": round(sum(sizes.values()) / 1e6, 2),
        "sample_prompts": prompts,
        "command": command,
        "calora_ray_version": __version__,
        "torch_version": torch.__version__,
        "config": to_dict(cfg),
    }
    (output / CARD).write_text(model_card(cfg, report))
    tmp = output / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(output / REPORT)  # last: its presence means the outputs match the checkpoint


def model_card(cfg: PretrainConfig, r: dict) -> str:
    """MODEL_CARD.md from the pretrain.json record."""
    w, p = r["wall_s"], r["parameters"]
    losses = r["final_loss"]
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    config = "\n".join(f"| `{k}` | `{v}` |" for k, v in r["config"].items() if k not in ("overwrite",))
    return f"""# toy-sd

The project's pretrained toy text-to-image model: a miniature Stable Diffusion trained (this copy:
on {"a GPU" if r.get("device") == "cuda" else "CPU"}) on the **pretraining world** (`--data toy:world`: streets rendered in every style x viewpoint x
condition, with captions in the paper's prompt shapes). It is an ordinary diffusers directory:

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{cfg.output}")   # no network needed
image = pipe("Sketch of urban street in top-down view at night", guidance_scale={cfg.guidance}).images[0]
```

and `--model toy-sd` loads it in every job.

## Model
| part | what | parameters |
|---|---|---|
| VAE | `AutoencoderKL`, blocks {cfg.vae_channels}, f = {2 ** (len(cfg.vae_channels) - 1)}, 4 latent channels; scaling factor {r['latent_scaling_factor']:.4f} (1/std of the training latents; their mean {r['latent_mean']:.4f}) | {p['vae']:,} |
| UNet | `UNet2DConditionModel`, blocks {cfg.unet_channels}, cross-attention below the full latent resolution, `cross_attention_dim` {cfg.text_width} | {p['unet']:,} |
| text encoder | `CLIPTextModel`, {cfg.text_layers} layers of width {cfg.text_width}; word-level tokenizer (`calora_ray.models.build_tokenizer`) | {p['text_encoder']:,} |
| scheduler | `DDIMScheduler`: v-prediction, `squaredcos_cap_v2`, `timestep_spacing="trailing"`, `clip_sample=False` | |

Weights are stored in fp32 ({r['safetensors_total_mb']} MB of safetensors): transformers loads a text
encoder in the dtype it was saved in, and fine-tuning on CPU wants fp32.

## Training
Command:

```
{r['command'] or '(run through the library, no command recorded)'}
```

| phase | steps | training time | final loss (last ~100 steps) |
|---|---|---|---|
| VAE: L1 + MSE + {cfg.kl_weight} x KL, batch {cfg.vae_batch_size}, lr {cfg.vae_learning_rate} | {r['steps']['vae']} | {w.get('vae', 0) / 60:.1f} min | {fmt(losses['vae'])} |
| UNet + text encoder: v-prediction MSE, batch {cfg.unet_batch_size}, lr {cfg.unet_learning_rate}, {cfg.caption_dropout:.0%} empty captions, EMA {cfg.ema_decay} | {r['steps']['unet']} | {w.get('unet', 0) / 60:.1f} min | {fmt(losses['unet'])} |

Rendering {cfg.num_images} + {cfg.val_images} images took {w.get('render', 0):.0f} s, encoding the
latents {w.get('encode', 0):.0f} s, the sample grid {w.get('samples', 0):.0f} s (in the last run).
VAE reconstruction PSNR on {cfg.val_images} held-out renders (toy:world val split):
**{r['vae_psnr_db']:.2f} dB**. The saved UNet and text encoder are the EMA weights.

Loss curves: `logs/vae/loss.png`, `logs/unet/loss.png` (rows in `loss.csv` beside them).

## Samples
`samples.png`: {cfg.sample_images} images per prompt (seeds {cfg.seed}..{cfg.seed + cfg.sample_images - 1}),
DDIM {cfg.sample_steps} steps, guidance {cfg.guidance}; every style x viewpoint, clear and
{', '.join(SAMPLE_CONDITIONS)}.

![samples](samples.png)

## Reproducibility
The phases have step budgets (`--vae-steps`, `--unet-steps`; `--vae-minutes` / `--unet-minutes`
time-box a phase instead, and then a busier machine takes fewer steps). Every step's draws derive
from (seed, phase, step), so the same command on the same device and torch build retraces the same
run; `{CHECKPOINT}` (not committed) lets it continue an interrupted run, which is not guaranteed to
equal an uninterrupted one bit for bit. A CUDA run (`--device cuda`) draws the same batches but its
float arithmetic differs, so its weights differ from a CPU run's.

## Configuration
| key | value |
|---|---|
{config}
"""
