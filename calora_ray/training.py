"""The fine-tuning loop: LoRA on the selected projections, trained with the diffusion loss.

`diffusion_step_loss` is one step's loss on a batch (plain torch); `train_lora` is the loop
(one copy, used by jobs/finetune.py); `run_finetune` validates inputs, runs it and writes the
diffusers-format adapter, the loss curve and a report.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import FinetuneConfig, to_dict
from .losses import diffusion_loss, diffusion_target, noisy_latents
from .lora import (LORA_WEIGHT_NAME, attach_lora, check_modules, file_sha256, read_selection, save_lora,
                   trainable_modules)
from .models import (Components, encode_images, encode_prompts, load_components, model_info, resolve_device,
                     resolve_dtype)
from .outputs import check_output_dir, staged_output_dir, write_json
from .plots import plot_loss
from .sensitivity import find_candidates


def captions_for(labels: list[np.ndarray], caption: str, with_classes: bool) -> list[str]:
    """The training caption of each image: the base prompt, optionally ' with {classes present}'."""
    if not with_classes:
        return [caption] * len(labels)
    from .data.labels import class_names_present

    out = []
    for label in labels:
        names = class_names_present(label)
        listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)
        out.append(f"{caption} with {listed}" if names else caption)
    return out


def diffusion_step_loss(components: Components, latents: torch.Tensor, cond: dict,
                        generator: torch.Generator) -> torch.Tensor:
    """L_diff on a batch: random timesteps and noise (from `generator`), x_t, UNet, MSE to the target.

    latents: (B, C, h, w) clean x_0; cond: UNet conditioning kwargs with B rows.
    """
    scheduler = components.noise_scheduler
    unet = components.unet
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    t = t.to(latents.device)
    pred = unet(noisy_latents(scheduler, latents, noise, t), t, **cond).sample
    return diffusion_loss(pred, diffusion_target(scheduler, latents, noise, t))


def _stack_cond(conds: list[dict]) -> dict:
    out = {"encoder_hidden_states": torch.cat([c["encoder_hidden_states"] for c in conds])}
    if "added_cond_kwargs" in conds[0]:
        out["added_cond_kwargs"] = {k: torch.cat([c["added_cond_kwargs"][k] for c in conds])
                                    for k in conds[0]["added_cond_kwargs"]}
    return out


def train_lora(components: Components, dataset, *, steps: int, batch_size: int, learning_rate: float,
               weight_decay: float = 1e-2, caption: str, caption_with_classes: bool = False, seed: int = 0,
               log_every: int = 10, progress: bool = True) -> list[tuple[int, float]]:
    """Train the UNet's trainable (LoRA) parameters for `steps` AdamW steps; returns [(step, loss)].

    Batches are drawn with replacement from `dataset` by a seeded generator; the same generator
    draws VAE samples, noise and timesteps, so a run is reproducible from `seed`.
    """
    unet = components.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the UNet has no trainable parameters: attach LoRA first")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    resolution = dataset[0]["image"].shape[0]
    cache: dict[str, dict] = {}

    def condition(prompts):
        for p in set(prompts) - cache.keys():
            cache[p] = encode_prompts(components, [p], resolution, resolution)
        return _stack_cond([cache[p] for p in prompts])

    history: list[tuple[int, float]] = []
    unet.train()
    bar = tqdm(range(1, steps + 1), desc="fine-tuning", unit="step", disable=not progress)
    started = time.perf_counter()
    for step in bar:
        idx = torch.randint(0, len(dataset), (batch_size,), generator=generator).tolist()
        items = [dataset[i] for i in idx]
        latents = encode_images(components, np.stack([it["image"] for it in items]), generator)
        cond = condition(captions_for([it["label"] for it in items], caption, caption_with_classes))
        loss = diffusion_step_loss(components, latents, cond, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps or step == 1:
            history.append((step, float(loss)))
            bar.set_postfix(loss=f"{float(loss):.4f}",
                            img_s=f"{step * batch_size / (time.perf_counter() - started):.1f}")
    unet.eval()
    return history


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> Path:
    """jobs/finetune.py: LoRA on the selection, trained on --data; writes the adapter and reports.

    Inputs (selection file, data, output) are validated before the model is loaded; the output
    directory appears only once complete.
    """
    check_output_dir(cfg.output, cfg.overwrite)
    selection = None if cfg.selection == "all" else read_selection(cfg.selection)
    from .data import open_dataset

    dataset = open_dataset(cfg.data.data, split=cfg.data.split, num_images=cfg.data.num_images,
                           resolution=cfg.data.resolution, seed=0)
    # Read every pair once now: a bad label fails in seconds, naming its file, not mid-training.
    for i in tqdm(range(len(dataset)), desc="checking data", unit="image", disable=not progress or len(dataset) < 100):
        dataset[i]
    device = resolve_device(cfg.model.device)
    components = load_components(cfg.model.model, cfg.model.model_seed)
    components.to(device, resolve_dtype(cfg.model.mixed_precision, device))
    candidates = find_candidates(components.unet)
    modules = list(candidates) if selection is None else selection
    check_modules(components.unet, modules, candidates, f"--selection {cfg.selection}")
    torch.manual_seed(cfg.seed)  # peft draws the LoRA init from the global generator
    attach_lora(components.unet, modules, cfg.rank, cfg.lora_alpha)
    trainable = sum(p.numel() for p in components.unet.parameters() if p.requires_grad)
    started = time.perf_counter()
    history = train_lora(components, dataset, steps=cfg.steps, batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, caption=cfg.caption,
                         caption_with_classes=cfg.caption_with_classes, seed=cfg.seed,
                         log_every=cfg.log_every, progress=progress)
    elapsed = time.perf_counter() - started
    with staged_output_dir(cfg.output, cfg.overwrite) as staging:
        weights = save_lora(components, components.unet, staging)
        with open(staging / "loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows(history)
        plot_loss([s for s, _ in history], [v for _, v in history], staging / "loss.png",
                  title=f"LoRA on {len(modules)} projections of {cfg.model.model}, data {cfg.data.data}")
        write_json(staging / "finetune.json", {
            "lora": LORA_WEIGHT_NAME,
            "lora_sha256": file_sha256(weights),
            "selection": cfg.selection,
            "modules": modules,
            "lora_modules": trainable_modules(components.unet),
            "num_modules": len(modules),
            "num_candidates": len(candidates),
            "rank": cfg.rank,
            "alpha": cfg.lora_alpha,
            "trainable_params": trainable,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "num_images": len(dataset),
            "final_loss": history[-1][1],
            "elapsed_s": round(elapsed, 3),
            "model": model_info(components),
            "calora_ray_version": __version__,
            "config": to_dict(cfg),
        })
    return Path(cfg.output)
