"""Generation in bf16 / fp16 against fp32: per component, the mean pixel difference and images/s.

    .venv/bin/python benchmarks/precision_check.py                 # CPU: fp32 vs bf16, toy-sd (~2 min)
    python benchmarks/precision_check.py --models toy-sd,tiny      # a GPU: fp16 and bf16 (~1 min)
    python benchmarks/precision_check.py --models tiny --sdpa-math # a GPU: is a fused attention kernel it?

`MaskGenerator` (models/toy-sd + models/toy-sd-controlnet; `tiny` = the tiny random model with the
random segmentation ControlNet of benchmarks/batch_invariance.py, the model of the 40/255 fp16 H100
measurement) makes N images (toy labels, the paper's prompts, seeds sample_seed(0, i)) in fp32: the
reference. Then, per precision p (CPU: bf16; CUDA: fp16, and bf16 where the GPU has it):

  - one component in p, everything else fp32: the text encoder, the UNet, the ControlNet, the VAE
    decode. That component's calls go to a copy of it in p (inputs cast to p, outputs back to fp32);
    the pipeline still sees fp32 modules, so its latents stay fp32;
  - text encoder + UNet + ControlNet in p, latents fp32, VAE fp32 (all of the models but the VAE);
  - all in p, VAE too ("no upcast": what generation did before the fix);
  - the library's p: `MaskGenerator(dtype=p)` (the latents follow the text embeddings' dtype, as in
    diffusers; the VAE decodes in fp32).

Reported per row: mean and max |difference| to the fp32 images (uint8, over all pixels and channels,
in /255), and for the whole-pipeline rows images/s (batch N, median of --rounds timed rounds after
one warm-up, the rows interleaved round by round). Then, per component, the largest |value| its
submodules output in the fp32 run: above 65504 (fp16's largest) fp16 overflows there. Results: docs/benchmarks.md, "Precision". Prints
markdown tables; writes nothing else (the random ControlNet goes to a temp dir that is removed).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from batch_invariance import TOY_CONTROLNET, TOY_SD, make_tiny_controlnet  # noqa: E402  (beside this script)
from common import machine, print_table, setup  # noqa: E402

CONDITIONS = ("clear", "foggy", "night", "rainy", "snowy")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast(x, dtype):
    """Floating tensors of 2+ dims (activations, not timesteps) in x (nested tuples, lists, dicts,
    diffusers / transformers outputs) cast to dtype."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dim() >= 2 else x
    if isinstance(x, dict):
        items = {k: cast(v, dtype) for k, v in x.items()}
        return items if type(x) is dict else type(x)(**items)
    if isinstance(x, (tuple, list)):
        return type(x)(cast(v, dtype) for v in x)
    return x


def tensors(x):
    """The floating tensors in x (nested as cast() walks it)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors(v)]
    return []


def peak_activations(gen, labels, prompts, seeds, steps, guidance) -> dict[str, float]:
    """Per component, the largest |value| any of its submodules outputs during one generate() call
    (fp16's largest finite value is 65504; attention logits inside the fused kernel are not seen)."""
    c, peaks, handles = gen.components, {}, []
    for part, module in (("text encoder", c.text_encoder), ("UNet", c.unet), ("ControlNet", gen.controlnet),
                         ("VAE decode", c.vae)):
        def hook(_module, _inputs, output, part=part):
            for t in tensors(output):
                peaks[part] = max(peaks.get(part, 0.0), float(t.detach().abs().max()))
        handles += [m.register_forward_hook(hook) for m in module.modules()]
    try:
        gen.generate(labels, prompts, seeds, steps, guidance)
    finally:
        for h in handles:
            h.remove()
    return peaks


def run_in(module: torch.nn.Module, dtype: torch.dtype, method: str = "forward") -> None:
    """Route module.<method> to a copy of the module in dtype: inputs cast to dtype, outputs to fp32."""
    twin = copy.deepcopy(module).to(dtype)
    call = getattr(twin, method)

    def routed(*args, **kwargs):
        return cast(call(*cast(args, dtype), **cast(kwargs, dtype)), torch.float32)

    object.__setattr__(module, method, routed)


def load(name: str, work: Path, dtype: torch.dtype, device: str):
    from calora_ray.generation import MaskGenerator

    if name == "tiny":
        if not (work / "controlnet").exists():
            make_tiny_controlnet(work / "controlnet")
        return MaskGenerator("tiny", controlnet=str(work / "controlnet"), device=device, dtype=dtype)
    if name == "toy-sd":
        return MaskGenerator(str(TOY_SD), controlnet=str(TOY_CONTROLNET), device=device, dtype=dtype)
    raise SystemExit(f"--models: unknown {name!r} (toy-sd, tiny)")


def variants(name: str, work: Path, p: str, device: str) -> list[tuple[str, object, bool]]:
    """(row, generator, timed) of precision p."""
    dtype = DTYPES[p]
    rows = []
    for label, parts in (("text encoder", ("text_encoder",)), ("UNet", ("unet",)), ("ControlNet", ("controlnet",)),
                         ("VAE decode", ("vae",)), ("text encoder + UNet + ControlNet (latents fp32)",
                                                    ("text_encoder", "unet", "controlnet"))):
        gen = load(name, work, torch.float32, device)
        for part in parts:
            module = gen.controlnet if part == "controlnet" else getattr(gen.components, part)
            run_in(module, dtype, "decode" if part == "vae" else "forward")
        rows.append((f"{p}: {label} only" if len(parts) == 1 else f"{p}: {label}", gen, False))
    no_upcast = load(name, work, dtype, device)
    no_upcast.components.vae.to(dtype)
    rows.append((f"{p}: all, VAE decode in {p} too (no upcast)", no_upcast, True))
    rows.append((f"{p}: all, VAE decode fp32 (the library's {p})", load(name, work, dtype, device), True))
    return rows


def workload(gen, n: int):
    from calora_ray.datasets import open_dataset
    from calora_ray.generation import build_prompt, sample_seed

    ds = open_dataset("toy", num_images=n, resolution=gen.native_resolution)
    labels = [np.asarray(ds[i]["label"], dtype=np.uint8) for i in range(n)]
    prompts = [build_prompt(label, CONDITIONS[i % len(CONDITIONS)]) for i, label in enumerate(labels)]
    return labels, prompts, [sample_seed(0, i) for i in range(n)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy-sd", help="comma-separated: toy-sd, tiny")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated: bf16, fp16 (default: bf16 on CPU; fp16 and, where supported, bf16 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the whole-pipeline rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sdpa-math", action="store_true",
                        help="attention through torch's plain math kernel, not the fused ones (does a kernel deviate?)")
    args = parser.parse_args(argv)
    setup(args.threads)
    from calora_ray.cli import quiet_libraries

    quiet_libraries()
    if args.precisions:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    elif args.device == "cuda":
        precisions = ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    else:
        precisions = ["bf16"]
    unknown = [p for p in precisions if p not in ("bf16", "fp16")]
    if unknown:
        raise SystemExit(f"--precisions: unknown {unknown} (bf16, fp16)")
    device = args.device
    print(f"# {machine()}; device {device}" + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""))
    print(f"# {args.num_images} images, {args.steps} steps, guidance {args.guidance}, batch {args.num_images}, "
          f"{args.rounds} timed rounds")
    if args.sdpa_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(SDPBackend.MATH).__enter__()  # for the whole run
        print("# attention: torch's math kernel only (--sdpa-math)")
    work = Path(tempfile.mkdtemp(prefix="precision-"))
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            reference = load(name, work, torch.float32, device)
            labels, prompts, seeds = workload(reference, args.num_images)
            rows = [("fp32 (reference)", reference, True)]
            for p in precisions:
                rows += variants(name, work, p, device)
            images, times = {}, {row: [] for row, _, timed in rows if timed}
            for row, gen, _ in rows:
                images[row] = gen.generate(labels, prompts, seeds, args.steps, args.guidance)  # also the warm-up
            timed = [(row, gen) for row, gen, t in rows if t]
            for r in range(args.rounds):
                for row, gen in timed[r % len(timed):] + timed[:r % len(timed)]:
                    sync(device)
                    start = time.perf_counter()
                    gen.generate(labels, prompts, seeds, args.steps, args.guidance)
                    sync(device)
                    times[row].append(time.perf_counter() - start)
            ref = [x.astype(np.int16) for x in images["fp32 (reference)"]]
            table = []
            for row, _, _ in rows:
                diff = np.stack([np.abs(x.astype(np.int16) - y) for x, y in zip(images[row], ref)])
                speed = f"{args.num_images / statistics.median(times[row]):.2f}" if row in times else ""
                table.append([row, f"{diff.mean():.2f}", int(diff.max()), speed])
            print(f"\n{name} ({labels[0].shape[1]}x{labels[0].shape[0]})\n")
            print_table(["components in the precision", "mean abs diff to fp32 (/255)", "max (/255)", "images/s"],
                        table)
            library = [("fp32", reference)] + [(row.split(":")[0], gen) for row, gen, _ in rows if "library" in row]
            peaks = {p: peak_activations(gen, labels, prompts, seeds, args.steps, args.guidance) for p, gen in library}
            print("\npeak |activation| per component (fp16's largest finite value: 65504)\n")
            print_table(["component"] + [f"peak, {p}" for p in peaks],
                        [[part] + [f"{peaks[p][part]:.4g}" for p in peaks] for part in peaks["fp32"]])
            sys.stdout.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
