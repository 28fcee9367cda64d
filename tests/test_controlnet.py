"""The segmentation ControlNet: trained by the shared loop on top of the frozen CA-LoRA UNet, saved
in the diffusers format, loaded by ControlNetModel.from_pretrained and a stock
StableDiffusionControlNetPipeline; the Ray Train job checkpoints and resumes. Its conditioning image in
either palette (--control-palette cityscapes|ade20k), exact to the pixel, and the palette check."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from calora_ray.config import ControlNetConfig, TrainingConfig, build_config
from calora_ray.controlnet import check_control_palette, control_image, control_tensor, recorded_palette
from calora_ray.data.labels import ADE20K_CLASSES, ADE20K_PALETTE, CLASS_NAMES, PALETTE
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
                                              "learning_rate": 1e-3, "cpus_per_worker": 1, "output": str(out),
                                              "control_palette": "ade20k"})
        run_train_controlnet(cfg)
        return json.loads((out / "controlnet.json").read_text())

    first = run(2)
    assert first["steps"] == 2 and first["lora_sha256"] and (out / "loss.png").stat().st_size > 0
    # the palette it learned is recorded, and generation / serving with another one is refused
    assert first["control_palette"] == "ade20k" and first["conditioning"].startswith("ade20k palette colours")
    with pytest.raises(ValueError, match="trained on the ade20k palette .* but --control-palette is cityscapes"):
        check_control_palette(out, "cityscapes")
    controlnet = ControlNetModel.from_pretrained(out)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir, controlnet=controlnet, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    label = open_dataset("toy", num_images=1)[0]["label"]
    images = pipe("Photorealistic first-person urban street view", image=control_image(label, "ade20k"),
                  num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
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


# ----------------------------------------------------------------------------- --control-palette ade20k


def every_train_id_label() -> np.ndarray:
    """64 x 64: a 4 x 4 block of each train id 0..18 and of ignore (255), the rest road."""
    label = np.zeros((64, 64), np.uint8)
    for k, train_id in enumerate([*range(19), 255]):
        label[4 * (k // 16):4 * (k // 16) + 4, 4 * (k % 16):4 * (k % 16) + 4] = train_id
    return label


def test_ade20k_palette_maps_every_train_id_to_mmsegs_ade20k_colour():
    pytest.importorskip("mmseg")  # the seg extra: only this test reads the reference list
    from mmseg.datasets.ade import ADE20KDataset

    classes = [c.strip() for c in ADE20KDataset.METAINFO["classes"]]
    palette = ADE20KDataset.METAINFO["palette"]
    assert len(classes) == len(palette) == 150
    assert [c.train_id for c in ADE20K_CLASSES] == list(range(19))  # every train id, once, in order
    for c in ADE20K_CLASSES:
        assert classes.index(c.name) == c.index, c  # the name is ADE20K-150's, the index is its own
        assert list(c.color) == palette[c.index], c  # the colour is exactly mmseg's
        assert ADE20K_PALETTE[c.train_id].tolist() == list(c.color)
        # exact entries keep the Cityscapes name (motorcycle: ADE20K's "minibike, motorbike")
        assert (c.approximate is None) == (c.name == CLASS_NAMES[c.train_id] or c.name == "minibike"), c
    assert [CLASS_NAMES[c.train_id] for c in ADE20K_CLASSES if c.approximate] == [
        "traffic sign", "vegetation", "terrain", "rider", "train"]
    assert "train" not in classes and "rider" not in classes and "traffic sign" not in classes
    assert not ADE20K_PALETTE[19:].any()  # ignore (255) and every unused id: black


def test_ade20k_palette_conditioning_pixels_are_exactly_the_mapped_colours():
    label = every_train_id_label()
    expected = np.zeros((*label.shape, 3), np.uint8)  # built from the table, not from ADE20K_PALETTE
    for c in ADE20K_CLASSES:
        expected[label == c.train_id] = c.color
    image = control_image(label, "ade20k")
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.array_equal(np.asarray(image), expected)  # ignore stays black, nothing interpolated
    assert np.array_equal(np.asarray(control_image(label)), PALETTE[label])  # the default: Cityscapes
    tensor = control_tensor([label, label[::-1]], palette="ade20k")
    assert tensor.shape == (2, 3, 64, 64) and tensor.dtype == torch.float32
    assert torch.equal((tensor * 255).round().to(torch.uint8), torch.from_numpy(
        np.stack([ADE20K_PALETTE[label], ADE20K_PALETTE[label[::-1]]])).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="unknown palette 'coco'"):
        control_image(label, "coco")


def cond_recorder(controlnet) -> list:
    """Every `controlnet_cond` the ControlNet's forward receives (a forward pre-hook)."""
    seen = []
    controlnet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()),
                                         with_kwargs=True)
    return seen


def expected_cond(labels) -> torch.Tensor:
    """(B, 3, H, W): the ADE20K colours of `labels` / 255, as the pipeline's image processor computes them."""
    return torch.from_numpy(np.stack([ADE20K_PALETTE[label].astype(np.float32) / 255.0 for label in labels])
                            ).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def public_shape(tmp_path_factory):
    """(model dir, ControlNet dir): the tiny model with an SD-shaped VAE (f = 8), and a random ControlNet of it
    whose conditioning part has a public SD-1.5 ControlNet's shape (lllyasviel/control_v11p_sd15_seg's config:
    conditioning_channels 3, conditioning_embedding_out_channels (16, 32, 96, 256)), tiny elsewhere."""
    from diffusers import AutoencoderKL, ControlNetModel

    from calora_ray.models import save_components

    root = tmp_path_factory.mktemp("public")
    tiny = build_tiny(0)
    torch.manual_seed(0)
    tiny.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             layers_per_block=1, norm_num_groups=8, sample_size=128).eval()
    model = save_components(tiny, root / "model")
    controlnet = ControlNetModel.from_unet(tiny.unet, conditioning_channels=3,
                                           conditioning_embedding_out_channels=(16, 32, 96, 256))
    with torch.no_grad():  # non-zero zero-convolutions, so the conditioning reaches the UNet
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out]:
            module.weight.normal_(0, 0.05)
    controlnet.save_pretrained(root / "controlnet")  # no controlnet.json: like a downloaded one
    return model, root / "controlnet"


def test_generate_with_ade20k_palette_feeds_a_public_shape_controlnet_exactly_the_ade20k_colours(public_shape,
                                                                                                 tmp_path):
    from calora_ray.config import GenerateConfig, parse_config
    from calora_ray.controlnet import vae_factor_of
    from calora_ray.generation import ShardGenerator, check_generate_inputs
    from calora_ray.masks import list_masks

    model, cn = public_shape
    config = json.loads((cn / "config.json").read_text())
    assert config["conditioning_channels"] == 3 and config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
    assert vae_factor_of(cn) == 8
    cfg = parse_config(GenerateConfig, ["--model", str(model), "--controlnet", str(cn), "--control-palette", "ade20k",
                                        "--resolution", "64", "--steps", "2", "--batch-size", "2",
                                        "--output", str(tmp_path / "out")], "generate")
    assert check_generate_inputs(cfg)["resolution"] == (64, 64)
    refs = list_masks("toy", "train", 2, 64)
    gen = ShardGenerator(cfg, refs, 64, threads=1)  # what each Ray Data actor builds from the job's config
    assert gen.generator.control_palette == "ade20k"
    seen = cond_recorder(gen.generator.controlnet)
    rows = gen.make_rows([0, 1])
    labels = [np.asarray(Image.open(io.BytesIO(png))) for png in rows["label"]]
    assert seen and all(torch.equal(cond, expected_cond(labels).repeat(2, 1, 1, 1)) for cond in seen)  # CFG: 2B
    # every train id and ignore, straight through MaskGenerator
    seen.clear()
    label = every_train_id_label()
    gen.generator.generate([label], ["a street"], [0], steps=1, guidance=1.0)
    assert len(seen) == 1 and torch.equal(seen[0], expected_cond([label]))


def test_train_controlnet_conditions_on_the_chosen_palette():
    dataset = open_dataset("toy", num_images=2)
    items = [dataset[0], dataset[1]]
    task = controlnet_task(build_tiny(0), caption="Photorealistic first-person urban street view",
                           control_palette="ade20k")
    seen = cond_recorder(task.module)
    task.compute_loss(items, torch.Generator().manual_seed(0))
    assert len(seen) == 1 and torch.equal(seen[0], expected_cond([it["label"] for it in items]))


def test_a_controlnet_recording_another_palette_is_refused_naming_both(controlnet_dir, tmp_path):
    import shutil

    from calora_ray.config import GenerateConfig
    from calora_ray.errors import UserError
    from calora_ray.generation import MaskGenerator
    from calora_ray.ray_data import run_generate

    assert recorded_palette(controlnet_dir) is None  # no controlnet.json (a downloaded one): trusted either way
    for palette in ("cityscapes", "ade20k"):
        check_control_palette(controlnet_dir, palette)
    cn = tmp_path / "cn"
    shutil.copytree(controlnet_dir, cn)
    (cn / "controlnet.json").write_text(json.dumps({"control_palette": "cityscapes"}))
    check_control_palette(cn, "cityscapes")
    mismatch = r"was trained on the cityscapes palette \(its controlnet.json\), but --control-palette is ade20k"
    with pytest.raises(UserError, match=mismatch):
        check_control_palette(cn, "ade20k")
    with pytest.raises(UserError, match=mismatch):
        MaskGenerator("tiny", controlnet=str(cn), control_palette="ade20k")
    with pytest.raises(UserError, match=mismatch):  # before Ray starts: check_generate_inputs
        run_generate(build_config(GenerateConfig, {"controlnet": str(cn), "control_palette": "ade20k",
                                                   "output": str(tmp_path / "out")}))
    assert not (tmp_path / "out").exists()
    (cn / "controlnet.json").write_text(json.dumps({"control_palette": "ade20k"}))
    with pytest.raises(UserError, match="trained on the ade20k palette .* but --control-palette is cityscapes"):
        check_control_palette(cn, "cityscapes")
    # a controlnet.json written before the option existed: the Cityscapes palette, the only one then
    (cn / "controlnet.json").write_text(json.dumps({"conditioning": "Cityscapes palette colours"}))
    assert recorded_palette(cn) == "cityscapes"
