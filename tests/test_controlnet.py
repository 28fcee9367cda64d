"""The segmentation ControlNet: trained by the shared loop on top of the frozen CA-LoRA UNet, saved
in the diffusers format, loaded by ControlNetModel.from_pretrained and a stock
StableDiffusionControlNetPipeline; the Ray Train job checkpoints and resumes."""

import csv
import json

import numpy as np
import pytest
import torch

from calora_ray.config import ControlNetConfig, TrainingConfig, build_config
from calora_ray.controlnet import control_image
from calora_ray.data.labels import PALETTE
from calora_ray.datasets import open_dataset
from calora_ray.models import build_tiny
from calora_ray.training import controlnet_task, train


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A tiny-model LoRA whose up-projections are non-zero, so applying it changes the UNet."""
    from calora_ray.lora import attach_lora, save_lora
    from calora_ray.sensitivity import find_candidates

    tiny = build_tiny(0)
    modules = list(find_candidates(tiny.unet))[:4]
    torch.manual_seed(0)
    attach_lora(tiny.unet, modules, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in tiny.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("lora") / "lora"
    save_lora(tiny, tiny.unet, path)
    return path


def test_conditioning_is_the_palette_at_the_labels_size():
    label = open_dataset("toy", num_images=1)[0]["label"]
    image = np.asarray(control_image(label))
    assert image.shape == (*label.shape, 3)
    assert np.array_equal(image, PALETTE[label])  # every pixel is its class colour: nothing interpolated


def test_only_the_controlnet_trains_on_the_frozen_lora_unet(lora_dir):
    tiny = build_tiny(0)
    task = controlnet_task(tiny, lora=str(lora_dir), caption="Photorealistic first-person urban street view")
    unet_before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    assert any("lora" in k for k in unet_before)  # the adapter is applied
    assert not any(p.requires_grad for p in tiny.unet.parameters())
    cn_before = task.state_dict()
    dataset = open_dataset("toy", num_images=4)
    history = train(task, dataset, TrainingConfig(steps=3, batch_size=2, learning_rate=1e-3, log_every=1),
                    device=torch.device("cpu"), quiet=True)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    after = task.state_dict()
    changed = [k for k in after if not torch.equal(after[k], cn_before[k])]
    assert any("controlnet_down_blocks" in k for k in changed)  # the zero convolutions learn first


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_job_saves_a_diffusers_controlnet_that_a_stock_pipeline_runs_and_resumes(local_ray, lora_dir, tiny_dir,
                                                                                  tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from calora_ray.ray_train import run_train_controlnet

    out = tmp_path / "cn"

    def run(steps):
        cfg = build_config(ControlNetConfig, {"model": str(tiny_dir), "lora": str(lora_dir), "num_images": 4,
                                              "batch_size": 2, "steps": steps, "log_every": 1, "checkpoint_every": 2,
                                              "learning_rate": 1e-3, "cpus_per_worker": 1, "output": str(out)})
        run_train_controlnet(cfg)
        return json.loads((out / "controlnet.json").read_text())

    first = run(2)
    assert first["steps"] == 2 and first["lora_sha256"] and (out / "loss.png").stat().st_size > 0
    controlnet = ControlNetModel.from_pretrained(out)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir, controlnet=controlnet, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    label = open_dataset("toy", num_images=1)[0]["label"]
    images = pipe("Photorealistic first-person urban street view", image=control_image(label), num_inference_steps=2,
                  height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # the same command with more steps resumes from the step-2 checkpoint
    losses = [row["loss"] for row in csv.DictReader((out / "loss.csv").read_text().splitlines())]
    second = run(3)
    assert second["steps"] == 3
    resumed = [row["loss"] for row in csv.DictReader((out / "loss.csv").read_text().splitlines())]
    assert resumed[:2] == losses and len(resumed) == 3
    assert not torch.equal(ControlNetModel.from_pretrained(out).controlnet_down_blocks[0].weight,
                           controlnet.controlnet_down_blocks[0].weight)


def test_cubic_timesteps_favour_high_noise_and_stay_in_range():
    from calora_ray.losses import sample_timesteps

    draw = {s: sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), s) for s in ("uniform", "cubic")}
    for t in draw.values():
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    # P(t > T/2) is 1/2 for uniform and 0.5 ** (1/3) = 0.794 for t = (1 - u^3) T
    assert abs(float((draw["uniform"] > 500).float().mean()) - 0.5) < 0.02
    assert abs(float((draw["cubic"] > 500).float().mean()) - 0.794) < 0.02
    assert torch.equal(draw["cubic"], sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), "cubic"))
    with pytest.raises(ValueError, match="cosine.*uniform"):
        sample_timesteps(4, 1000, torch.Generator(), "cosine")


@pytest.mark.parametrize("proportion", [0.0, 0.5, 1.0])
def test_empty_prompt_proportion(monkeypatch, proportion):
    import calora_ray.training as training

    seen = []
    real = training.encode_prompts
    monkeypatch.setattr(training, "encode_prompts", lambda c, prompts, h, w: seen.extend(prompts) or real(c, prompts, h, w))
    task = controlnet_task(build_tiny(0), caption="Photorealistic first-person urban street view",
                           proportion_empty_prompts=proportion)
    dataset = open_dataset("toy", num_images=8)
    task.compute_loss([dataset[i % 8] for i in range(32)], torch.Generator().manual_seed(0))
    empty = "" in seen
    assert empty == (proportion > 0)
    assert any(p.startswith("Photorealistic") for p in seen) == (proportion < 1)


def test_controlnet_recipe_options_are_validated():
    from calora_ray.config import ConfigError

    cfg = build_config(ControlNetConfig, {})
    assert (cfg.timesteps, cfg.proportion_empty_prompts) == ("cubic", 0.0)
    with pytest.raises(ConfigError, match="--timesteps"):
        build_config(ControlNetConfig, {"timesteps": "cosine"})
    with pytest.raises(ConfigError, match="--proportion-empty-prompts"):
        build_config(ControlNetConfig, {"proportion_empty_prompts": 1.5})
