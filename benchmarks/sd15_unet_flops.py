"""SD-1.5 at 512x512: what one generated image costs in FLOPs, and what a 512x512 pair costs in bytes.

No weights and no GPU are needed: the models are diffusers' classes built from SD-1.5's configs
(copied below, nothing downloaded) on torch's `meta` device, where tensors have shapes but no data,
and `torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of every matmul, convolution and
attention (1 multiply-add = 2 FLOPs) from the shapes alone. Elementwise work (GroupNorm, SiLU,
softmax, additions, the scheduler) is not counted: it is memory-bound and small in FLOPs, and what
it costs in time belongs to the "fraction of peak" a time estimate assumes (docs/scaling.md).

Counted, as jobs/generate.py's pipeline (diffusers' StableDiffusionControlNetPipeline with
classifier-free guidance, `calora_ray.generation.MaskGenerator`) runs them per image:

  per denoising step   UNet + segmentation ControlNet (`ControlNetModel.from_unet`, the project's
                       conditioning widths for f = 8) on a batch of 2 (conditional + unconditional)
                       4x64x64 latents, the 512x512 control image, 77 CLIP tokens
  once per image       the VAE decoder (4x64x64 -> 3x512x512), the CLIP text encoder on 2 prompts
                       (the prompt and the empty one)
  training steps       (for the fine-tune / ControlNet estimates) batch 4: the UNet forward and its
                       backward to the input with every weight frozen (what a LoRA in down_blocks.0
                       forces; the LoRA's own rank-r matmuls are not included), and the ControlNet
                       step (ControlNet trainable, UNet frozen); the VAE encoder per 512x512 image
  LoRA size            parameters of a rank-64 LoRA on all 128 candidate projections and on the top
                       2 %: the gradient a fine-tuning step all-reduces across Ray Train workers

The second part (--storage-samples, 0 skips it) measures bytes per 512x512 pair in the generate
job's row format (`calora_ray.shards.table_bytes`, the writer the job uses: PNG columns stored
uncompressed, the rest zstd): toy-city renders drawn natively at 512x512, toy-city 64x64 renders
upscaled (bicubic) to 512x512, and uniform noise (PNG's incompressible bound), each with its
512x512 label; plus the CPU time of PNG-encoding one 512x512 image and label (the actor does it
between two GPU batches, not overlapped with them).

    .venv/bin/python benchmarks/sd15_unet_flops.py           # 15-30 s on 2 shared cores
    .venv/bin/python benchmarks/sd15_unet_flops.py --storage-samples 0 --steps 20 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# SD-1.5's UNet (stable-diffusion-v1-5 unet/config.json), as diffusers' UNet2DConditionModel takes it.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False,
}
# SD-1.5's VAE (vae/config.json): AutoencoderKL, f = 8.
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "act_fn": "silu", "norm_num_groups": 32, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
# SD-1.5's text encoder: CLIP ViT-L/14's text tower (text_encoder/config.json).
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
RESOLUTION, LATENT, TOKENS, CFG_BATCH, TRAIN_BATCH = 512, 64, 77, 2, 4
META = torch.device("meta")


def count(fn) -> tuple[int, dict[str, int]]:
    """(FLOPs, FLOPs per aten op) of fn() under FlopCounterMode."""
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops(), {str(k): v for k, v in mode.get_flop_counts()["Global"].items()}


def check_attention_is_counted() -> None:
    """On `meta`, scaled_dot_product_attention decomposes into bmm, which the counter counts (on the CPU
    it runs a fused kernel the counter does not know, and counts 0): checked against 4*B*H*L*S*D."""
    q, k, v = (torch.empty(2, 8, n, 40, device=META) for n in (4096, 77, 77))
    flops, _ = count(lambda: F.scaled_dot_product_attention(q, k, v))
    expected = 4 * 2 * 8 * 4096 * 77 * 40
    if flops != expected:
        raise SystemExit(f"FlopCounterMode counts {flops} FLOPs for one attention on meta, expected {expected}: "
                         f"this torch version dispatches attention differently; the counts below would be wrong")


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_sizes(unet, rank: int = 64) -> str:
    """Trainable parameters of a rank-`rank` LoRA (A: r x in, B: out x r) on every candidate projection
    (calora_ray.sensitivity.find_candidates) and on the top 2 % by count: the gradient each training
    step all-reduces across Ray Train workers (fp32)."""
    from calora_ray.sensitivity import find_candidates

    sizes = sorted((rank * (m.in_features + m.out_features) for m in find_candidates(unet).values()), reverse=True)
    k = max(1, round(0.02 * len(sizes)))
    return (f"LoRA rank {rank}: all {len(sizes)} candidate projections {sum(sizes) / 1e6:.2f} M parameters "
            f"({4 * sum(sizes) / 2**20:.0f} MiB of fp32 gradient per all-reduce); top 2 % = {k} projections: "
            f"{sum(sizes[-k:]) / 1e6:.3f}-{sum(sizes[:k]) / 1e6:.3f} M ({4 * sum(sizes[:k]) / 2**20:.1f} MiB at most)")


def build_models():
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from calora_ray.controlnet import conditioning_channels

    with torch.device(META):
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        # as training.controlnet_task builds it: from the base UNet, with the conditioning widths for f = 8
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(8)).eval()
        vae = AutoencoderKL(**SD15_VAE).eval()
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()
    return unet, controlnet, vae, text


def inputs(batch: int) -> dict:
    return {"sample": torch.empty(batch, 4, LATENT, LATENT, device=META),
            "timestep": torch.full((batch,), 500, dtype=torch.long, device=META),
            "encoder_hidden_states": torch.empty(batch, TOKENS, SD15_UNET["cross_attention_dim"], device=META),
            "control": torch.empty(batch, 3, RESOLUTION, RESOLUTION, device=META)}


def count_inference(unet, controlnet, vae, text) -> dict:
    x = inputs(CFG_BATCH)
    residuals = {}

    def run_controlnet():
        down, mid = controlnet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                               controlnet_cond=x["control"], conditioning_scale=1.0, return_dict=False)
        residuals.update(down=down, mid=mid)

    def run_unet():
        unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
             down_block_additional_residuals=residuals["down"], mid_block_additional_residual=residuals["mid"],
             return_dict=False)

    z = torch.empty(1, 4, LATENT, LATENT, device=META)
    ids = torch.zeros(CFG_BATCH, TOKENS, dtype=torch.long, device=META)
    with torch.no_grad():
        out = {"controlnet": count(run_controlnet), "unet": count(run_unet),
               "vae_decoder": count(lambda: vae.decode(z, return_dict=False)),
               "text_encoder": count(lambda: text(input_ids=ids))}
    return out


def count_training(unet, controlnet, vae) -> dict:
    """Batch-4 training steps, forward + backward (no optimizer: its FLOPs are elementwise)."""
    x = inputs(TRAIN_BATCH)
    unet.requires_grad_(False)

    def lora_bound():  # every weight frozen, gradient to the input: the backward a LoRA in down_blocks.0 forces
        sample = x["sample"].clone().requires_grad_(True)
        out = unet(sample, x["timestep"], encoder_hidden_states=x["encoder_hidden_states"], return_dict=False)[0]
        out.float().pow(2).mean().backward()

    def controlnet_step():  # ControlNet trainable, UNet frozen (training.controlnet_task)
        controlnet.requires_grad_(True)
        down, mid = controlnet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                               controlnet_cond=x["control"], return_dict=False)
        out = unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                   down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        controlnet.requires_grad_(False)

    image = torch.empty(1, 3, RESOLUTION, RESOLUTION, device=META)
    with torch.no_grad():
        encoder = count(lambda: vae.encode(image))
    return {"lora_step_bound": count(lora_bound), "controlnet_step": count(controlnet_step),
            "vae_encoder": encoder}


def storage(samples: int) -> list[dict]:
    """Bytes per 512x512 pair in the generate job's row format, for three kinds of image."""
    from PIL import Image

    from calora_ray.data.png import encode_png
    from calora_ray.datasets import open_dataset
    from calora_ray.generation import build_prompt, class_pixels, sample_id
    from calora_ray.shards import SCHEMA, table_bytes

    native = open_dataset("toy:target", split="val", num_images=samples, resolution=RESOLUTION)
    small = open_dataset("toy:target", split="val", num_images=samples, resolution=None)  # 64x64, as rendered
    rng = np.random.default_rng(0)
    kinds = {
        "toy city rendered at 512x512": lambda i: native[i]["image"],
        "toy city 64x64 upscaled (bicubic)": lambda i: np.asarray(
            Image.fromarray(small[i]["image"]).resize((RESOLUTION, RESOLUTION), Image.BICUBIC)),
        "uniform noise (incompressible bound)": lambda i: rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), np.uint8),
    }
    labels = [native[i]["label"] for i in range(samples)]
    results = []
    for kind, image_of in kinds.items():
        rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        encode_s = []
        for i in range(samples):
            image, label = image_of(i), labels[i]
            started = time.perf_counter()
            image_png, label_png = encode_png(image), encode_png(label)
            encode_s.append(time.perf_counter() - started)
            row = {"sample_id": sample_id(0, i), "image": image_png, "label": label_png,
                   "prompt": build_prompt(label, "night"), "condition": "night", "seed": 1000 + i,
                   "width": RESOLUTION, "height": RESOLUTION, "class_pixels": class_pixels(label),
                   "model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "lora_sha256": "0" * 64,
                   "mask": f"s3://bucket/cityscapes/gtFine/train/city/c_{i:06d}_000019_gtFine_labelIds.png"}
            for name in SCHEMA.names:
                rows[name].append(row[name])
        data = table_bytes(rows)
        results.append({"kind": kind, "rows": samples, "parquet_bytes_per_row": len(data) / samples,
                        "image_png_bytes": float(np.mean([len(b) for b in rows["image"]])),
                        "label_png_bytes": float(np.mean([len(b) for b in rows["label"]])),
                        "png_encode_ms": 1000 * float(np.median(encode_s))})
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50], help="denoising steps per image")
    parser.add_argument("--storage-samples", type=int, default=8,
                        help="512x512 pairs per kind in the bytes-per-pair part (0 skips it)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)

    check_attention_is_counted()
    unet, controlnet, vae, text = build_models()
    inf = count_inference(unet, controlnet, vae, text)
    train = count_training(unet, controlnet, vae)
    G = 1e9

    print("## SD-1.5 at 512x512: parameters and forward GFLOPs (meta device, FlopCounterMode; 1 MAC = 2 FLOPs)\n")
    print(f"torch {torch.__version__}; counted: matmul, convolution, attention; not: elementwise ops\n")
    print("| model | parameters | call | GFLOPs |")
    print("|---|---|---|---|")
    rows = [("UNet", params(unet), f"batch {CFG_BATCH}, 4x64x64, 77 tokens", inf["unet"][0]),
            ("ControlNet (from_unet, cond. 16-32-96-256)", params(controlnet),
             f"batch {CFG_BATCH}, + 3x512x512 control image", inf["controlnet"][0]),
            ("VAE decoder", params(vae.decoder) + params(vae.post_quant_conv), "batch 1, 4x64x64 -> 3x512x512",
             inf["vae_decoder"][0]),
            ("VAE encoder (training only)", params(vae.encoder) + params(vae.quant_conv), "batch 1, 3x512x512",
             train["vae_encoder"][0]),
            ("CLIP text encoder", params(text), f"batch {CFG_BATCH} (prompt + empty), 77 tokens", inf["text_encoder"][0])]
    for name, n, call, flops in rows:
        print(f"| {name} | {n / 1e6:,.1f} M | {call} | {flops / G:,.1f} |")

    print("\n" + lora_sizes(unet))

    step = inf["unet"][0] + inf["controlnet"][0]
    once = inf["vae_decoder"][0] + inf["text_encoder"][0]
    print("\n## Per generated image (classifier-free guidance: every step runs batch 2)\n")
    print(f"per denoising step (UNet + ControlNet, batch 2): {step / G:,.1f} GFLOPs "
          f"(UNet {inf['unet'][0] / G:,.1f} + ControlNet {inf['controlnet'][0] / G:,.1f}); "
          f"once per image (VAE decoder + text encoder): {once / G:,.1f} GFLOPs\n")
    print("| steps | TFLOPs per image | of which VAE decoder + text encoder |")
    print("|---|---|---|")
    for s in args.steps:
        total = s * step + once
        print(f"| {s} | {total / 1e12:.2f} | {100 * once / total:.1f} % |")

    print("\n## Training steps, batch 4, forward + backward (for the fine-tune / ControlNet estimates)\n")
    print("| step | GFLOPs per step | per image |")
    print("|---|---|---|")
    vae_enc = TRAIN_BATCH * train["vae_encoder"][0]
    for name, key in (("LoRA, backward to down_blocks.0 (frozen UNet; LoRA matmuls excluded) + VAE encoder x4",
                       "lora_step_bound"),
                      ("ControlNet (trainable) + frozen UNet + VAE encoder x4", "controlnet_step")):
        total = train[key][0] + vae_enc
        print(f"| {name} | {total / G:,.1f} | {total / TRAIN_BATCH / G:,.1f} |")

    if args.storage_samples:
        print(f"\n## Bytes per 512x512 pair in the generate job's Parquet rows ({args.storage_samples} pairs per kind)\n")
        print("| image | image PNG (KiB) | label PNG (KiB) | Parquet bytes per row (KiB) | PNG encode, image + label (ms, 1 thread) |")
        print("|---|---|---|---|---|")
        for r in storage(args.storage_samples):
            print(f"| {r['kind']} | {r['image_png_bytes'] / 1024:.1f} | {r['label_png_bytes'] / 1024:.1f} | "
                  f"{r['parquet_bytes_per_row'] / 1024:.1f} | {r['png_encode_ms']:.1f} |")
    print(f"\n(ran in {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
