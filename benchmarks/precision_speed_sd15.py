"""Which precision is fastest for generation at SD-1.5's size: images/s per precision, side by side.

    python benchmarks/precision_speed_sd15.py                          # a GPU (~1 min on an H200)
    .venv/bin/python benchmarks/precision_speed_sd15.py --device cpu --batch 1 --steps 1 --repeats 1

The toy models are too small to time a GPU with (at 64x64 every precision is bound by kernel
launches: benchmarks/precision_check.py measures their deviation). Here SD-1.5's UNet, a segmentation
ControlNet built from it and SD-1.5's VAE (the configs of benchmarks/sd15_unet_flops.py, random
weights: nothing is downloaded; speed does not depend on the weights' values) run what
jobs/generate.py runs per batch of B 512x512 images: `--steps` denoising steps of ControlNet + UNet
on the classifier-free-guidance batch 2B, then the VAE decode of B latents in fp32 (the library
always decodes in fp32). Per precision of the ControlNet + UNet (fp32; fp32 with TF32 matmuls and
convolutions; bf16; fp16): seconds per denoising step and per decode (median of --repeats rounds,
the precisions interleaved round by round), and the resulting images/s. The text encoder (once
per batch, 77 tokens) is left out: under 1 % of a step. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, machine, median, print_table, setup  # noqa: E402
from sd15_unet_flops import LATENT, RESOLUTION, SD15_UNET, SD15_VAE, TOKENS  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(device: torch.device):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from calora_ray.controlnet import conditioning_channels

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(8)).eval()
        vae = AutoencoderKL(**SD15_VAE).eval()
    for m in (unet, controlnet, vae):
        m.requires_grad_(False)
    return unet, controlnet, vae


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per batch B (the UNet sees 2B)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default=None, help="comma-separated of fp32, tf32, bf16, fp16 "
                        "(default: all on CUDA, fp32 and bf16 on CPU)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    setup(args.threads)
    from calora_ray.cli import quiet_libraries

    quiet_libraries()
    device = torch.device(args.device)
    names = (args.precisions.split(",") if args.precisions
             else list(PRECISIONS) if device.type == "cuda" else ["fp32", "bf16"])
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise SystemExit(f"--precisions: unknown {unknown} (one of {list(PRECISIONS)})")
    unet32, controlnet32, vae = build(device)
    b = args.batch
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(2 * b, 4, LATENT, LATENT, generator=g).to(device)
    text = torch.randn(2 * b, TOKENS, SD15_UNET["cross_attention_dim"], generator=g).to(device)
    control = torch.rand(2 * b, 3, RESOLUTION, RESOLUTION, generator=g).to(device)
    timestep = torch.full((2 * b,), 500, dtype=torch.long, device=device)

    models = {}
    for n in names:
        dtype = PRECISIONS[n]
        models[n] = (unet32, controlnet32) if dtype == torch.float32 else (
            type(unet32).from_config(unet32.config).to(device, dtype).eval(),
            type(controlnet32).from_config(controlnet32.config).to(device, dtype).eval())

    def step(n):
        unet, controlnet = models[n]
        dtype = PRECISIONS[n]

        def run():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = n == "tf32"
            with torch.no_grad():
                x, h, c = latents.to(dtype), text.to(dtype), control.to(dtype)
                down, mid = controlnet(x, timestep, encoder_hidden_states=h, controlnet_cond=c, return_dict=False)
                unet(x, timestep, encoder_hidden_states=h, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)
                sync(device)
        return run

    def decode():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            vae.decode(latents[:b] / vae.config.scaling_factor, return_dict=False)
        sync(device)

    print(f"# {machine()}; device {device}" + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""))
    print(f"# SD-1.5 UNet + ControlNet (random weights), {RESOLUTION}x{RESOLUTION}, batch {b} (CFG batch {2 * b}), "
          f"{args.steps} steps, VAE decode fp32; median of {args.repeats} rounds\n")
    fns = {n: step(n) for n in names}
    fns["decode"] = decode
    times = interleaved_times(fns, repeats=args.repeats, warmup=1, min_sample_s=0.5 if device.type == "cuda" else 0.0)
    t_decode = median(times["decode"])
    base = None
    rows = []
    for n in names:
        t_step = median(times[n])
        per_batch = args.steps * t_step + t_decode
        ips = b / per_batch
        base = base or ips
        rows.append([n, f"{1e3 * t_step:.1f}", f"{1e3 * t_decode:.1f}", f"{ips:.2f}", f"{ips / base:.2f}x"])
    print_table(["UNet + ControlNet in", "ms per step", "ms per decode (fp32)", "images/s", f"vs {names[0]}"], rows)


if __name__ == "__main__":
    main()
