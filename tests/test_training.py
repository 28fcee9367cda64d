"""CA-LoRA fine-tuning: the loop lowers the diffusion loss and is reproducible from its seed."""

import shutil

import numpy as np
import torch

from calora_ray.config import TrainingConfig
from calora_ray.data import open_dataset
from calora_ray.lora import lora_state_dict
from calora_ray.models import build_tiny
from calora_ray.sensitivity import find_candidates
from calora_ray.training import captions_for, lora_task, train

CAPTION = "Photorealistic first-person urban street view"


def lora_model(seed=0, modules=None):
    comps = build_tiny(0)
    return lora_task(comps, modules or list(find_candidates(comps.unet)), rank=4, alpha=4, caption=CAPTION, seed=seed)


def settings(**kw):
    return TrainingConfig(**{"batch_size": 4, "learning_rate": 1e-3, "log_every": 1, **kw})


def test_a_few_steps_lower_the_diffusion_loss_on_a_fixed_toy_batch(fixed_batch_loss):
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    task = lora_model()
    before = fixed_batch_loss(task.components, dataset)
    history = train(task, dataset, settings(steps=20, learning_rate=3e-3, log_every=5), device=torch.device("cpu"),
                    quiet=True)
    after = fixed_batch_loss(task.components, dataset)
    assert [h["step"] for h in history] == [1, 5, 10, 15, 20]
    assert after < before * 0.95, (before, after)


def test_same_seed_same_weights_and_losses():
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    runs = []
    for seed in (7, 7, 8):
        task = lora_model(seed=seed)
        hist = train(task, dataset, settings(steps=3, batch_size=2, seed=seed), device=torch.device("cpu"), quiet=True)
        runs.append((hist, lora_state_dict(task.components.unet)))
    (h1, w1), (h2, w2), (h3, w3) = runs
    losses = [[(h["step"], h["loss"], h["lr"]) for h in hist] for hist in (h1, h2, h3)]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    """4 steps, checkpoint at 2, resume from it: the same weights as 4 uninterrupted steps."""
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    kept = {}

    def report(metrics, directory):
        if directory is not None:
            shutil.copytree(directory, tmp_path / f"step{metrics['step']}")
            kept[metrics["step"]] = tmp_path / f"step{metrics['step']}"

    whole = lora_model()
    train(whole, dataset, settings(steps=4, checkpoint_every=2, lr_scheduler="cosine"), device=torch.device("cpu"),
          report=report, quiet=True)
    assert sorted(kept) == [2, 4]
    assert (kept[2] / "pytorch_lora_weights.safetensors").is_file()  # a checkpoint is a loadable adapter too
    resumed = lora_model()
    hist = train(resumed, dataset, settings(steps=4, lr_scheduler="cosine"), device=torch.device("cpu"),
                 resume_from=kept[2], quiet=True)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    a, b = lora_state_dict(whole.components.unet), lora_state_dict(resumed.components.unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_and_checkpointing_run():
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    comps = build_tiny(0)
    task = lora_task(comps, list(find_candidates(comps.unet))[:4], rank=2, alpha=2, caption=CAPTION,
                     gradient_checkpointing=True)
    hist = train(task, dataset, settings(steps=2, batch_size=1, gradient_accumulation_steps=3),
                 device=torch.device("cpu"), quiet=True)
    assert len(hist) == 2 and all(h["loss"] > 0 for h in hist)


def test_only_lora_parameters_change():
    dataset = open_dataset("toy:target", num_images=2, resolution=64)
    selected = ["up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"]
    task = lora_model(modules=selected)
    unet = task.components.unet
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    train(task, dataset, settings(steps=2, batch_size=2, learning_rate=1e-2), device=torch.device("cpu"), quiet=True)
    assert all(torch.equal(p, frozen[n]) for n, p in unet.named_parameters() if "lora_" not in n)
    changed = [n for n, p in unet.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed == [selected[0] + ".lora_B.default.weight"]


def test_captions_with_class_names():
    label = np.full((4, 4), 255, np.uint8)
    label[0] = 0   # road
    label[1] = 13  # car
    label[2] = 10  # sky
    assert captions_for([label], CAPTION, True) == [f"{CAPTION} with road, sky and car"]
    assert captions_for([label], CAPTION, False) == [CAPTION]


def test_tensorboard_logs_and_validation_images(tmp_path):
    from PIL import Image

    dataset = open_dataset("toy:target", num_images=2, resolution=64)
    task = lora_model(modules=["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"])
    train(task, dataset, settings(steps=2, batch_size=1, report_to="tensorboard", validation_every=2,
                                  validation_steps=2, validation_prompts=["Sketch of urban street in top-down view",
                                                                           CAPTION]),
          device=torch.device("cpu"), log_dir=tmp_path, quiet=True)
    import struct

    from tensorboardX.proto.event_pb2 import Event

    (events,) = tmp_path.glob("events.out.tfevents.*")
    data, tags = events.read_bytes(), set()
    while data:  # TFRecord framing: length, crc, payload, crc
        (n,) = struct.unpack("<Q", data[:8])
        event = Event.FromString(data[12:12 + n])
        tags |= {v.tag for v in event.summary.value}
        data = data[16 + n:]
    assert {"train/loss", "train/lr", "train/images_per_s", "validation"} <= tags

    grid = Image.open(tmp_path / "validation" / "step_000002.png")
    assert grid.size[0] == 128 and grid.size[1] > 2 * 128  # a 128-px row per prompt, under its caption
    assert np.asarray(grid.convert("L"))[-128:].std() > 1  # images, not an empty canvas
