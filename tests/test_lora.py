"""LoRA on exactly the selected projections, saved so that a stock diffusers pipeline loads it."""

import json

import pytest
import torch
from safetensors import safe_open

from calora_ray.lora import (LORA_WEIGHT_NAME, SelectionError, attach_lora, check_modules, read_selection,
                             save_lora, trainable_modules)
from calora_ray.models import build_tiny
from calora_ray.sensitivity import find_candidates

PROMPT = "Photorealistic first-person urban street view"


def pick(unet):
    cands = find_candidates(unet)
    # One cross-attention to_k (others named to_k must NOT get an adapter) and one to_out.0.
    return cands, ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                   "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"]


def randomize_lora(unet, seed=0):
    """LoRA B starts at zero (adapter = identity); give it values so outputs change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def images(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def test_trainable_parameters_only_on_selected_modules(tiny):
    tiny.unet.requires_grad_(False)
    cands, selected = pick(tiny.unet)
    attach_lora(tiny.unet, selected, rank=4, alpha=4)
    assert trainable_modules(tiny.unet) == sorted(selected)
    trainable = [n for n, p in tiny.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # `to_k` did not leak onto the other 13 to_k projections
    lora_layers = [n for n, m in tiny.unet.named_modules() if hasattr(m, "lora_A")]
    assert sorted(lora_layers) == sorted(selected)
    # r x (in + out) per adapted projection: attn2.to_k 32 -> 64 (text width 32), to_out.0 64 -> 64
    assert [(cands[n].in_features, cands[n].out_features) for n in selected] == [(32, 64), (64, 64)]
    assert sum(p.numel() for n, p in tiny.unet.named_parameters() if p.requires_grad) == 4 * 96 + 4 * 128


@pytest.mark.parametrize("rank,alpha", [(4, 4), (4, 16)])
def test_save_then_stock_pipeline_load_gives_identical_images(tmp_path, tiny, rank, alpha):
    """alpha != r is the silent failure: without saved metadata the loader assumes alpha = r."""
    from diffusers import StableDiffusionPipeline

    cands, selected = pick(tiny.unet)
    attach_lora(tiny.unet, selected, rank=rank, alpha=alpha)
    randomize_lora(tiny.unet)
    adapted = images(tiny.pipeline())
    path = save_lora(tiny, tiny.unet, tmp_path)
    assert path.name == LORA_WEIGHT_NAME
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("unet.") and (".lora.down.weight" in k or ".lora.up.weight" in k) for k in keys)
    assert len(keys) == 2 * len(selected) and meta["unet.lora_alpha"] == alpha and meta["unet.r"] == rank

    fresh = build_tiny(0)
    pipe = fresh.pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    base = images(pipe)
    pipe.load_lora_weights(str(tmp_path))
    loaded = images(pipe)
    assert abs(loaded - base).max() > 1e-3  # the adapter is not a no-op...
    assert abs(loaded - adapted).max() < 1e-5  # ...and reproduces the in-memory model


def test_from_pretrained_pipeline_loads_lora(tmp_path, tiny_dir):
    """The real-user path: a diffusers directory via from_pretrained, then load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    from calora_ray.models import load_components

    comps = load_components(str(tiny_dir))
    _, selected = pick(comps.unet)
    attach_lora(comps.unet, selected, rank=4, alpha=8)
    randomize_lora(comps.unet, seed=3)
    adapted = images(comps.pipeline())
    save_lora(comps, comps.unet, tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert abs(images(pipe) - adapted).max() < 1e-5


def test_selection_file_with_foreign_modules(tmp_path, tiny):
    report = tmp_path / "sensitivity.json"
    report.write_text(json.dumps({"selected": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                               "down_blocks.7.attentions.0.attn9.to_q"]}))
    names = read_selection(report)
    with pytest.raises(SelectionError, match=r"sensitivity.json.*down_blocks\.7\.attentions\.0\.attn9\.to_q"):
        check_modules(names, find_candidates(tiny.unet), f"--selection {report}")


@pytest.mark.parametrize("content,match", [(None, "file not found"), ("{not json", "not a sensitivity report"),
                                           ('{"selected": []}', "non-empty list")])
def test_bad_selection_files(tmp_path, content, match):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SelectionError, match=match):
        read_selection(path)
