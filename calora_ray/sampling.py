"""Text-to-image samples for looking at what a model (and a LoRA) does: `sample_images` (also
the training loop's validation images and pretraining's sample grid) and jobs/sample.py's
`run_sampling` (PNGs, a labelled grid from plots.image_grid, samples.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image

from .config import SampleConfig
from .lora import load_lora, lora_file
from .models import Components, load_components
from .outputs import check_output_dir, staged_output_dir, write_json
from .plots import image_grid


def sample_images(components: Components, prompts: list[str], num_images: int, seed: int, steps: int,
                  guidance: float, resolution: int) -> list[list[Image.Image]]:
    """num_images per prompt; image i of each prompt starts from the noise of seed + i."""
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        rows.append(pipe([prompt] * num_images, num_inference_steps=steps, guidance_scale=guidance,
                         height=resolution, width=resolution, generator=generators).images)
    return rows


def run_sampling(cfg: SampleConfig) -> Path:
    """jobs/sample.py: images + grid.png + samples.json (prompts, seeds, model, LoRA hash)."""
    check_output_dir(cfg.output, cfg.overwrite)
    if cfg.lora is not None:
        lora_file(cfg.lora)  # checked before the model loads
    components = load_components(cfg.model, cfg.model_seed)
    if torch.cuda.is_available():
        components.to(torch.device("cuda"))
    resolution = cfg.resolution or components.unet.config.sample_size * components.vae_scale_factor
    lora_sha256 = None if cfg.lora is None else load_lora(components, cfg.lora)
    rows = sample_images(components, cfg.prompt, cfg.num_images, cfg.seed, cfg.steps, cfg.guidance, resolution)
    with staged_output_dir(cfg.output, cfg.overwrite) as staging:
        files = []
        for p, row in enumerate(rows):
            for i, img in enumerate(row):
                name = f"p{p:02d}_s{cfg.seed + i}.png"
                img.save(staging / name)
                files.append({"file": name, "prompt": cfg.prompt[p], "seed": cfg.seed + i})
        title = f"{cfg.model}" + (f" + LoRA {cfg.lora}" if cfg.lora else "")
        image_grid(rows, [f"{prompt}   [{title}]" for prompt in cfg.prompt]).save(staging / "grid.png")
        write_json(staging / "samples.json", {
            "model": cfg.model, "lora": cfg.lora,
            "lora_sha256": lora_sha256, "resolution": resolution, "images": files,
            "config": dataclasses.asdict(cfg)})
    return Path(cfg.output)

