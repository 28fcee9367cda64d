"""Text-to-image samples for looking at what a model (and a LoRA) does, and labelled grids.

`image_grid` is the one grid maker: jobs/sample.py, the training loop's validation images and the
reports use it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .config import SampleConfig, to_dict
from .lora import LORA_WEIGHT_NAME, file_sha256
from .models import Components, load_components
from .outputs import check_output_dir, staged_output_dir, write_json


def image_grid(rows: list[list[Image.Image]], labels: list[str], cell: int | None = None) -> Image.Image:
    """Rows of images, each row under its wrapped label (e.g. the prompt). Nearest-neighbour
    upscaling keeps small images (32-64 px) readable; cells are at least 128 px."""
    size = max(img.size[0] for row in rows for img in row)
    cell = cell or max(128, size)
    cols = max(len(row) for row in rows)
    wrapped = [textwrap.wrap(label, width=max(20, cols * cell // 7))[:3] for label in labels]
    strip = [12 * len(lines) + 6 for lines in wrapped]
    grid = Image.new("RGB", (cols * cell, sum(cell + h for h in strip)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for row, lines, h in zip(rows, wrapped, strip):
        for j, line in enumerate(lines):
            draw.text((3, y + 3 + 12 * j), line, fill="black")
        for i, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (i * cell, y + h))
        y += h + cell
    return grid


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
    lora_file = None
    if cfg.lora is not None:
        lora_file = Path(cfg.lora) / LORA_WEIGHT_NAME
        if not lora_file.is_file():
            raise FileNotFoundError(f"--lora {cfg.lora}: no {LORA_WEIGHT_NAME} there (pass a jobs/finetune.py output)")
    components = load_components(cfg.model, cfg.model_seed)
    if torch.cuda.is_available():
        components.to(torch.device("cuda"))
    resolution = cfg.resolution or components.unet.config.sample_size * components.vae_scale_factor
    if cfg.lora is not None:
        components.pipeline().load_lora_weights(str(cfg.lora))  # patches the shared UNet in place
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
            "lora_sha256": file_sha256(lora_file) if lora_file else None,
            "resolution": resolution, "images": files, "config": to_dict(cfg)})
    return Path(cfg.output)

