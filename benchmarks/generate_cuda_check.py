"""The generation path on a GPU (run by hand on a GPU machine; CI has none):

    python benchmarks/generate_cuda_check.py [--out DIR] [--model tiny|tiny-sdxl]

MaskGenerator (tiny model + a random segmentation ControlNet whose zero convolutions are made
non-zero) on CUDA in fp32, fp16 and bf16: finite images, the same seeds give the same bytes, and — the
noise being drawn on the CPU — the CUDA fp32 images match the CPU ones up to kernel rounding.
Then ShardGenerator writes one shard from the GPU (no Ray), and a rough images/s at batch 16.
Prints a JSON summary (also DIR/generate_cuda_check.json).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="gen-cuda-"))
    parser.add_argument("--model", default="tiny", choices=("tiny", "tiny-sdxl"),
                        help="the random SD-shaped or SDXL-shaped model (StableDiffusionXLControlNetPipeline)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from diffusers import ControlNetModel

    from calora_ray.config import GenerateConfig, build_config
    from calora_ray.datasets import open_dataset
    from calora_ray.controlnet import conditioning_channels
    from calora_ray.generation import MaskGenerator, ShardGenerator, build_prompt
    from calora_ray.models import build_tiny

    controlnet_dir = out / "controlnet"
    controlnet = ControlNetModel.from_unet(build_tiny(0, sdxl=args.model == "tiny-sdxl").unet,
                                           conditioning_embedding_out_channels=conditioning_channels(4))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            m.weight.normal_(0, 0.05)
    controlnet.save_pretrained(controlnet_dir)
    ds = open_dataset("toy", num_images=4)
    labels = [ds[i]["label"] for i in range(4)]
    prompts = [build_prompt(label, c) for label, c in zip(labels, ("clear", "foggy", "night", "snowy"))]
    seeds = [1, 2, 3, 4]
    report = {"model": args.model, "torch": torch.__version__, "device": torch.cuda.get_device_name(0)}

    cpu = MaskGenerator(args.model, controlnet=str(controlnet_dir), device="cpu").generate(labels, prompts, seeds, 10, 4.0)
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        gen = MaskGenerator(args.model, controlnet=str(controlnet_dir), device="cuda", dtype=dtype)
        a = gen.generate(labels, prompts, seeds, 10, 4.0)
        b = gen.generate(labels, prompts, seeds, 10, 4.0)
        diff = [np.abs(x.astype(int) - y.astype(int)) for x, y in zip(a, cpu)]
        batch = [labels[i % 4] for i in range(16)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            gen.generate(batch, [prompts[i % 4] for i in range(16)], list(range(16)), 25, 4.0)
        torch.cuda.synchronize()
        report[name] = {"same_seed_same_bytes": all(np.array_equal(x, y) for x, y in zip(a, b)),
                        "vs_cpu_mean_abs": float(np.mean([d.mean() for d in diff])),
                        "vs_cpu_max_abs": int(max(d.max() for d in diff)),
                        "images_per_s_b16_25steps": 48 / (time.perf_counter() - start)}

    cfg = build_config(GenerateConfig, {"model": args.model, "controlnet": str(controlnet_dir), "num_samples": 8,
                                        "rows_per_shard": 8, "steps": 5, "output": str(out / "shards")})
    from calora_ray.masks import list_masks
    from calora_ray.shards import ShardStore, read_table

    ShardStore(cfg.output).prepare({"check": True}, overwrite=True)
    record = ShardGenerator(cfg, list_masks("toy", resolution=64), 64, device="cuda").make_shard(0)
    report["shard"] = {"rows": record["rows"], "read_back": read_table(cfg.output).num_rows}
    text = json.dumps(report, indent=2)
    (out / "generate_cuda_check.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
