"""SDXL end to end on `tiny-sdxl` (random weights, SDXL-shaped: two text encoders, the pooled text
embedding and the size micro-conditioning), with the checks SD-1.x gets on `tiny`: scoring and
fine-tuning (their workers' plain functions) -> jobs/train_controlnet.py (its main, in process, on one
local Ray) -> generation into a shard (ShardGenerator, as each Ray Data actor of jobs/generate.py runs
it) and the Serve path (request parsing and batching around MaskGenerator, no HTTP); the fine-tuned
LoRA in a stock StableDiffusionXLControlNetPipeline; the SDXL added conditions that training and
generation give the ControlNet; bf16; and jobs/configs/sdxl-cityscapes.yaml through the config loader."""

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_job_main

from calora_ray.controlnet import control_image
from calora_ray.datasets import open_dataset
from calora_ray.generation import MaskGenerator, build_prompt, sample_seed
from calora_ray.models import build_tiny, encode_prompts

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "Photorealistic first-person urban street view"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (the job joins it instead of starting its own)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory):
    """score -> fine-tune -> ControlNet on tiny-sdxl: {"score", "finetune", "controlnet"} -> output directories.

    Scoring and fine-tuning run their plain halves in this process (the functions each Ray Train worker
    runs; their jobs' Ray plumbing is model-agnostic and tested on `tiny` in tests/test_jobs.py), the
    ControlNet runs as jobs/train_controlnet.py does (its main, on the local Ray): each Ray Train job costs
    30-40 s of worker start-up on a busy 2-core machine. Settings as small as still train something: 2
    samples, 2 optimizer steps each, a learning rate large enough to move the weights."""
    from calora_ray.concepts import resolve_concept
    from calora_ray.config import FinetuneConfig, parse_config
    from calora_ray.lora import LORA_WEIGHT_NAME
    from calora_ray.models import load_components
    from calora_ray.scoring import score_samples
    from calora_ray.selection import select_top_k
    from calora_ray.sensitivity import find_candidates
    from calora_ray.training import check_finetune_inputs, lora_task, train, training_data

    root = tmp_path_factory.mktemp("sdxl")
    out = {"score": root / "score", "finetune": root / "finetune", "controlnet": root / "controlnet"}
    # score (t = 81, k = 2 %), as jobs/score.py's workers do
    components = load_components("tiny-sdxl")
    candidates = find_candidates(components.unet)
    sums = score_samples(components, candidates, resolve_concept("style"), [0, 1], timestep=81, seed=0, x0_steps=2,
                         batch_size=2, progress=False)
    scores = sums.scores()
    out["score"].mkdir()
    (out["score"] / "sensitivity.json").write_text(json.dumps(
        {"scores": scores, "selected": select_top_k(scores, 2.0), "num_candidates": len(candidates)}))
    # fine-tune the selection, as jobs/finetune.py's workers do (its input checks first)
    cfg = parse_config(FinetuneConfig, ["--model", "tiny-sdxl", "--data", "toy:target", "--selection",
                                        str(out["score"] / "sensitivity.json"), "--steps", "2", "--batch-size", "2",
                                        "--rank", "4", "--num-images", "4", "--learning-rate", "3e-2",
                                        "--output", str(out["finetune"])], "finetune")
    modules, _, _ = check_finetune_inputs(cfg)
    components = load_components(cfg.model)
    task = lora_task(components, modules, cfg.rank, cfg.lora_alpha, caption=cfg.caption, seed=cfg.seed)
    history = train(task, training_data(cfg), cfg, device=torch.device("cpu"), quiet=True)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert task.save_final(out["finetune"]).name == LORA_WEIGHT_NAME
    # the ControlNet, as a user runs jobs/train_controlnet.py (--address local: never a cluster this machine runs)
    code, text = run_job_main("train_controlnet", "--model", "tiny-sdxl", "--data", "toy:target",
                              "--lora", out["finetune"], "--steps", "2", "--batch-size", "2", "--num-images", "4",
                              "--learning-rate", "1e-2", "--proportion-empty-prompts", "0.5", "--cpus-per-worker", "1",
                              "--address", "local", "--output", out["controlnet"])
    assert code == 0, f"jobs/train_controlnet.py failed:\n{text}"
    return out


@pytest.fixture(scope="module")
def random_controlnet(tmp_path_factory):
    """A random SDXL ControlNet of tiny-sdxl with its zero convolutions made non-zero: a fresh (or 2-step) one
    barely moves the image, so whether the label reaches the image would not show."""
    from conftest import save_random_controlnet

    return save_random_controlnet(tmp_path_factory.mktemp("controlnet-xl") / "cn", sdxl=True)


@pytest.fixture(scope="module")
def labels():
    ds = open_dataset("toy", num_images=2)
    return [ds[0]["label"], ds[1]["label"]]


def lora_sha256(trained) -> str:
    from calora_ray.lora import LORA_WEIGHT_NAME, file_sha256

    return file_sha256(trained["finetune"] / LORA_WEIGHT_NAME)


# ----------------------------------------------------------------------------- the chain


def test_the_chain_selects_2_percent_adapts_exactly_those_and_trains_an_sdxl_controlnet(trained):
    from diffusers import ControlNetModel
    from safetensors import safe_open

    from calora_ray.lora import LORA_WEIGHT_NAME

    unet = build_tiny(0, sdxl=True).unet
    report = json.loads((trained["score"] / "sensitivity.json").read_text())
    assert len(report["selected"]) == math.ceil(0.02 * report["num_candidates"])
    assert all(math.isfinite(v) and v > 0 for v in report["scores"].values())
    with safe_open(str(trained["finetune"] / LORA_WEIGHT_NAME), "pt") as f:
        adapted = sorted({k.removeprefix("unet.").rsplit(".lora.", 1)[0] for k in f.keys()})
    assert adapted == sorted(report["selected"])  # the LoRA is on exactly the selection

    record = json.loads((trained["controlnet"] / "controlnet.json").read_text())
    assert record["model"] == "tiny-sdxl" and record["steps"] == 2 and math.isfinite(record["final_loss"])
    assert record["lora_sha256"] == lora_sha256(trained)  # trained on top of that very adapter
    assert (trained["controlnet"] / "loss.png").stat().st_size > 0
    controlnet = ControlNetModel.from_pretrained(trained["controlnet"])
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "cross_attention_dim", "transformer_layers_per_block"):  # SDXL's, copied from the UNet
        assert json.dumps(controlnet.config[key]) == json.dumps(unet.config[key]), key  # tuples load as lists
    assert controlnet.config["addition_embed_type"] == "text_time"
    assert all(block.weight.abs().max() > 0 for block in controlnet.controlnet_down_blocks)  # it trained


# ----------------------------------------------------------------------------- the added conditions


def hook_kwargs(module) -> list[dict]:
    """The keyword arguments of every forward call of `module`."""
    seen = []
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    return seen


def test_controlnet_training_gives_the_controlnet_the_unets_sdxl_added_conditions(labels):
    from calora_ray.training import captions_for, controlnet_task

    ds = open_dataset("toy", num_images=2)
    items = [ds[0], ds[1]]
    assert all(np.array_equal(it["label"], label) for it, label in zip(items, labels))
    for proportion in (0.0, 1.0):
        components = build_tiny(0, sdxl=True)
        task = controlnet_task(components, caption=CAPTION, proportion_empty_prompts=proportion)
        to_controlnet, to_unet = hook_kwargs(task.module), hook_kwargs(components.unet)
        loss = task.compute_loss(items, torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and len(to_controlnet) == len(to_unet) == 1
        cn, un = to_controlnet[0], to_unet[0]
        for key in ("text_embeds", "time_ids"):  # the very conditioning the frozen UNet gets
            assert torch.equal(cn["added_cond_kwargs"][key], un["added_cond_kwargs"][key]), key
        assert torch.equal(cn["encoder_hidden_states"], un["encoder_hidden_states"])
        # size micro-conditioning: original = target = the training resolution, crop (0, 0)
        assert cn["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
        hidden, pooled = cn["encoder_hidden_states"], cn["added_cond_kwargs"]["text_embeds"]
        if proportion == 0.0:  # each caption encoded (alone, as the task caches them) as generation encodes prompts
            expected = [encode_prompts(components, [p], 64, 64) for p in captions_for(labels, CAPTION, True)]
            assert torch.equal(pooled, torch.cat([e["added_cond_kwargs"]["text_embeds"] for e in expected]))
            assert torch.equal(hidden, torch.cat([e["encoder_hidden_states"] for e in expected]))
            assert pooled.abs().max() > 0
        else:  # the empty prompt is SDXL's unconditional branch: all-zero text conditioning
            assert not hidden.any() and not pooled.any()


def test_generation_gives_the_controlnet_the_labels_size_and_the_unets_conditions(random_controlnet, labels):
    gen = MaskGenerator("tiny-sdxl", controlnet=str(random_controlnet))
    to_controlnet, to_unet = hook_kwargs(gen.controlnet), hook_kwargs(gen.components.unet)
    wide = np.concatenate(labels, axis=1)  # 64 x 128: height and width must not swap
    prompt = build_prompt(wide, "night")
    image = gen.generate([wide], [prompt], [3], steps=2, guidance=4.0)[0]
    assert image.shape == (64, 128, 3) and len(to_controlnet) == len(to_unet) == 2
    for cn, un in zip(to_controlnet, to_unet):
        assert cn["added_cond_kwargs"]["time_ids"].tolist() == [[64, 128, 0, 0, 64, 128]] * 2  # CFG: 2 rows
        for key in ("text_embeds", "time_ids"):
            assert torch.equal(cn["added_cond_kwargs"][key], un["added_cond_kwargs"][key]), key
        uncond, cond = cn["added_cond_kwargs"]["text_embeds"].chunk(2)
        assert not uncond.any() and cond.abs().max() > 0  # SDXL's zero unconditional branch, as trained
    # the ControlNet sees the label: another label, same seed and prompt (else the same bytes), another image
    other = gen.generate([np.concatenate(labels[::-1], axis=1)], [prompt], [3], steps=2, guidance=4.0)[0]
    assert not np.array_equal(other, image)


# ----------------------------------------------------------------------------- the LoRA in a stock pipeline


def test_the_lora_loads_in_a_stock_sdxl_controlnet_pipeline_changes_it_and_the_generator_is_that_pipeline(
        trained, labels, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from calora_ray.models import save_components

    model = save_components(build_tiny(0, sdxl=True), tmp_path / "tiny-sdxl")  # the from_pretrained path
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(trained["controlnet"]), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    label, prompt = labels[0], build_prompt(labels[0], "foggy")

    def stock():
        return pipe(prompt, image=control_image(label), num_inference_steps=2, guidance_scale=4.0, height=64,
                    width=64, generator=torch.Generator().manual_seed(7), output_type="np").images[0]

    base = stock()
    pipe.load_lora_weights(str(trained["finetune"]))
    selected = json.loads((trained["score"] / "sensitivity.json").read_text())["selected"]
    assert sorted(n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")) == sorted(selected)
    adapted = stock()
    assert np.abs(adapted - base).max() * 255 > 1  # not a LoRA that loads as a no-op
    # MaskGenerator (its own LoRA load, fp32 noise, micro-conditioning and fp32 decode) is that pipeline
    gen = MaskGenerator("tiny-sdxl", lora=str(trained["finetune"]), controlnet=str(trained["controlnet"]))
    ours = gen.generate([label], [prompt], [7], steps=2, guidance=4.0)[0]
    assert np.abs(ours.astype(int) - (adapted * 255).round().astype(int)).max() <= 1
    assert gen.lora_sha256 == lora_sha256(trained)


def test_decode_is_the_sdxl_pipelines_own_also_with_latent_statistics(random_controlnet, labels):
    gen = MaskGenerator("tiny-sdxl", controlnet=str(random_controlnet))
    vae = gen.components.vae
    call = dict(prompt="a street", image=control_image(labels[0]), num_inference_steps=1, height=64, width=64)
    for stats in (None, {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.5, 2.0, 1.0, 1.5]}):
        if stats is not None:
            vae.register_to_config(**stats)  # a VAE whose config records per-channel latent statistics
        latents = gen.pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").images
        own = gen.pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert np.abs(gen.decode(latents) - own).max() < 1e-5, stats


# ----------------------------------------------------------------------------- generate and serve


def test_a_generate_shard_has_exactly_its_rows_and_the_same_seeds_give_the_same_bytes(trained, tmp_path):
    from calora_ray.config import GenerateConfig, parse_config
    from calora_ray.generation import ShardGenerator, check_generate_inputs
    from calora_ray.masks import MaskReader, list_masks
    from calora_ray.shards import SCHEMA

    out = tmp_path / "generated"
    cfg = parse_config(GenerateConfig, [
        "--model", "tiny-sdxl", "--lora", str(trained["finetune"]), "--controlnet", str(trained["controlnet"]),
        "--masks", "toy", "--num-samples", "5", "--rows-per-shard", "3", "--steps", "2", "--batch-size", "2",
        "--output", str(out)], "generate")
    checked = check_generate_inputs(cfg)
    assert checked["resolution"] == (64, 64)  # the model's native square: UNet sample size x VAE factor
    refs = list_masks("toy", "train", resolution=64)
    gen = ShardGenerator(cfg, refs, 64, threads=1)  # what each Ray Data actor builds from the job's config
    record = gen.make_shard(1)  # samples 3 and 4
    assert record["rows"] == 2
    table = pq.read_table(out / "data")
    assert table.num_rows == 2 and table.column_names == SCHEMA.names
    reader = MaskReader()
    images = []
    for row in table.to_pylist():
        index = int(row["sample_id"].split("-")[1])
        label = np.asarray(Image.open(io.BytesIO(row["label"])))
        image = Image.open(io.BytesIO(row["image"]))
        assert image.mode == "RGB" and image.size == (64, 64) == (row["width"], row["height"])
        assert np.array_equal(label, reader.load(refs[index]))
        assert row["prompt"] == build_prompt(label, row["condition"]) and row["seed"] == sample_seed(0, index)
        assert row["model"] == "tiny-sdxl" and row["lora_sha256"] == checked["lora_sha256"] != ""
        images.append(np.asarray(image))
    assert [r["sample_id"] for r in table.to_pylist()] == ["s0-000000003", "s0-000000004"]
    assert np.abs(images[0].astype(int) - images[1]).mean() > 1  # another seed and mask, another image
    # another generator (another actor, a rerun) makes the same samples byte for byte
    again = ShardGenerator(cfg, refs, 64, threads=1).make_rows([3, 4])
    assert again["image"] == table.column("image").to_pylist()
    assert again["label"] == table.column("label").to_pylist()


def test_the_serve_path_parses_requests_and_batches_them_into_the_generators_images(trained):
    from calora_ray.data.labels import colorize
    from calora_ray.serve import Limits, generate_batch, parse_request

    gen = MaskGenerator("tiny-sdxl", lora=str(trained["finetune"]), controlnet=str(trained["controlnet"]))
    # what a replica sets from the model (SegmentationSampler): sides a multiple of VAE factor x 8
    limits = Limits(max_side=128, max_num_images=2, max_steps=3, default_steps=2,
                    side_multiple=gen.components.vae_scale_factor * 8)
    ds = open_dataset("toy", num_images=2)

    def b64(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    a, b = ds[0]["label"], ds[1]["label"]
    reqs = [parse_request({"mask": b64(a), "condition": "night", "seed": 11, "num_images": 2}, limits),
                parse_request({"colormask": b64(colorize(b)), "prompt": "a street", "seed": 5}, limits),
                parse_request({"mask": b64(b), "seed": 5, "num_inference_steps": 3}, limits)]
    assert reqs[0].prompt == build_prompt(a, "night") and np.array_equal(reqs[1].label, b)
    results, call_sizes = generate_batch(gen, reqs, max_images_per_call=16)
    assert call_sizes == [3, 1]  # the 2-step requests together, the 3-step one apart
    assert [len(r) for r in results] == [2, 1, 1]
    pixels = [[np.asarray(Image.open(io.BytesIO(png))) for png in r] for r in results]
    # the same images as MaskGenerator.generate of the same batch: the endpoint is the generator
    direct = gen.generate([a, a, b], [reqs[0].prompt] * 2 + ["a street"], [11, 12, 5], steps=2)
    assert all(np.array_equal(x, y) for x, y in zip(pixels[0] + pixels[1], direct))
    assert not np.array_equal(pixels[1][0], pixels[2][0])  # 3 steps and another prompt: another image


def test_bf16_generation_casts_both_text_encoders_and_decodes_in_fp32(random_controlnet, labels):
    gen = MaskGenerator("tiny-sdxl", controlnet=str(random_controlnet), dtype=torch.bfloat16)
    c = gen.components
    assert c.unet.dtype == c.text_encoder.dtype == c.text_encoder_2.dtype == gen.controlnet.dtype == torch.bfloat16
    assert c.vae.dtype == torch.float32
    prompts = [build_prompt(label, "rainy") for label in labels]
    bf16 = gen.generate(labels, prompts, [1, 2], steps=2, guidance=4.0)
    fp32 = MaskGenerator("tiny-sdxl", controlnet=str(random_controlnet)).generate(labels, prompts, [1, 2],
                                                                                   steps=2, guidance=4.0)
    diff = np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(bf16, fp32)])
    print(f"tiny-sdxl mean |bf16 - fp32| = {diff:.3f}/255")
    assert 0 < diff <= 2.0  # > 0: it ran in bf16; within the 2/255 of fp32


# ----------------------------------------------------------------------------- the shipped config


def test_the_sdxl_cityscapes_config_loads_for_every_job_it_has_a_section_for():
    from calora_ray.config import JOB_CONFIGS, parse_config

    path = ROOT / "jobs" / "configs" / "sdxl-cityscapes.yaml"
    sections = [key for key in yaml.safe_load(path.read_text()) if key in JOB_CONFIGS]
    assert {"score", "finetune", "train_controlnet", "generate", "serve"} <= set(sections)
    cfg = {job: parse_config(JOB_CONFIGS[job], ["--config", str(path)], job) for job in sections}
    for job, c in cfg.items():
        assert c.model == "stabilityai/stable-diffusion-xl-base-1.0" and c.mixed_precision == "bf16", job
    score, finetune, controlnet, generate = cfg["score"], cfg["finetune"], cfg["train_controlnet"], cfg["generate"]
    # the paper's hyper-parameters: k = 2 %, t = 81, rank 64, 10k steps
    assert (score.top_k_percent, score.timestep, score.k_by, score.selection_mode) == (2, 81, "count", "normalized")
    assert (finetune.rank, finetune.lora_alpha, finetune.steps, finetune.learning_rate) == (64, 64.0, 10000, 1e-4)
    assert score.resolution == finetune.resolution == controlnet.resolution == 1024  # SDXL's native square
    assert generate.resolution == cfg["serve"].resolution == "704x1408"  # Cityscapes' 1:2 in SDXL's ~1 MP bucket
    assert cfg["serve"].max_side == 2048
    # each stage reads the one before it
    assert finetune.selection == f"{score.output}/sensitivity.json"
    assert controlnet.lora == generate.lora == cfg["serve"].lora == finetune.output
    assert generate.controlnet == cfg["serve"].controlnet == controlnet.output
