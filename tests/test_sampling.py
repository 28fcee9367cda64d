"""jobs/sample.py: images, a labelled grid, determinism by seed, and a LoRA that changes them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from calora_ray.config import SampleConfig, build_config
from calora_ray.lora import attach_lora, save_lora
from calora_ray.models import build_tiny
from calora_ray.sampling import image_grid, run_sampling

PROMPTS = ["Photorealistic first-person urban street view", "Sketch of urban street in top-down view at night"]


def sample(out, **values):
    cfg = build_config(SampleConfig, {"model": "tiny", "prompt": PROMPTS, "num_images": 2, "steps": 3,
                                      "output": str(out), **values})
    return run_sampling(cfg)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_images_grid_and_record(tmp_path):
    out = sample(tmp_path / "a")
    record = json.loads((out / "samples.json").read_text())
    assert [(i["prompt"], i["seed"]) for i in record["images"]] == [(p, s) for p in PROMPTS for s in (0, 1)]
    for item in record["images"]:
        assert Image.open(out / item["file"]).size == (64, 64)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 2 * 128 and grid.size[1] > 2 * 128  # 2 columns of 128-px cells, 2 labelled rows
    again = sample(tmp_path / "b")
    assert np.array_equal(pixels(out / "p01_s1.png"), pixels(again / "p01_s1.png"))  # same seed, same image
    assert not np.array_equal(pixels(out / "p00_s0.png"), pixels(out / "p00_s1.png"))


def test_lora_changes_the_samples(tmp_path):
    tiny = build_tiny(0)
    attach_lora(tiny.unet, ["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"], 4, 4)
    with torch.no_grad():
        for name, p in tiny.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(tiny, tiny.unet, tmp_path / "lora")
    base = sample(tmp_path / "base")
    adapted = sample(tmp_path / "adapted", lora=str(tmp_path / "lora"))
    assert json.loads((adapted / "samples.json").read_text())["lora_sha256"]
    assert np.abs(pixels(base / "p00_s0.png") - pixels(adapted / "p00_s0.png")).max() > 0


def test_missing_lora_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors"):
        sample(tmp_path / "x", lora=str(tmp_path))
    assert not (tmp_path / "x").exists()


def test_grid_labels_rows():
    img = Image.new("RGB", (32, 32), "red")
    grid = image_grid([[img, img], [img]], ["first row", "second row"])
    assert grid.size[0] == 256
    assert (np.asarray(grid)[..., 0] == 255).sum() > 3 * 128 * 128 * 0.9  # three red cells pasted
