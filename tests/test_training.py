"""CA-LoRA fine-tuning: the loop lowers the diffusion loss and is reproducible from its seed."""

import numpy as np
import torch

from calora_ray.data import open_dataset
from calora_ray.lora import attach_lora, lora_state_dict
from calora_ray.models import build_tiny, encode_images, encode_prompts
from calora_ray.sensitivity import find_candidates
from calora_ray.training import captions_for, diffusion_step_loss, train_lora

CAPTION = "Photorealistic first-person urban street view"


def fixed_batch_loss(components, dataset):
    """L_diff on a fixed batch: the same images, VAE draws, noise and timesteps every call."""
    g = torch.Generator().manual_seed(1234)
    images = np.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.no_grad():
        latents = encode_images(components, images, g)
        cond = encode_prompts(components, [CAPTION] * len(images), 64, 64)
        return float(diffusion_step_loss(components, latents, cond, g))


def lora_model(seed=0, modules=None):
    comps = build_tiny(0)
    comps.unet.requires_grad_(False)
    torch.manual_seed(seed)
    attach_lora(comps.unet, modules or list(find_candidates(comps.unet)), rank=4, alpha=4)
    return comps


def test_a_few_steps_lower_the_diffusion_loss_on_a_fixed_toy_batch():
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    comps = lora_model()
    before = fixed_batch_loss(comps, dataset)
    history = train_lora(comps, dataset, steps=30, batch_size=4, learning_rate=3e-3, caption=CAPTION,
                         seed=0, log_every=5, progress=False)
    after = fixed_batch_loss(comps, dataset)
    assert [s for s, _ in history][:2] == [1, 5] and history[-1][0] == 30
    assert after < before * 0.95, (before, after)


def test_same_seed_same_weights_and_losses():
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    runs = []
    for _ in range(2):
        comps = lora_model(seed=7)
        hist = train_lora(comps, dataset, steps=3, batch_size=2, learning_rate=1e-3, caption=CAPTION, seed=7,
                          log_every=1, progress=False)
        runs.append((hist, lora_state_dict(comps.unet)))
    (h1, w1), (h2, w2) = runs
    assert h1 == h2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    comps = lora_model(seed=8)
    train_lora(comps, dataset, steps=3, batch_size=2, learning_rate=1e-3, caption=CAPTION, seed=8,
               log_every=1, progress=False)
    w3 = lora_state_dict(comps.unet)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_only_lora_parameters_change():
    dataset = open_dataset("toy:target", num_images=2, resolution=64)
    selected = ["up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"]
    comps = lora_model(modules=selected)
    frozen = {n: p.detach().clone() for n, p in comps.unet.named_parameters() if "lora_" not in n}
    train_lora(comps, dataset, steps=2, batch_size=2, learning_rate=1e-2, caption=CAPTION, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in comps.unet.named_parameters() if "lora_" not in n)
    changed = [n for n, p in comps.unet.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed == [selected[0] + ".lora_B.default.weight"]


def test_captions_with_class_names():
    label = np.full((4, 4), 255, np.uint8)
    label[0] = 0   # road
    label[1] = 13  # car
    label[2] = 10  # sky
    assert captions_for([label], CAPTION, True) == [f"{CAPTION} with road, sky and car"]
    assert captions_for([label], CAPTION, False) == [CAPTION]
