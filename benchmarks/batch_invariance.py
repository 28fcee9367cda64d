"""Batch invariance of MaskGenerator: how far an image moves when the batch around it changes.

    .venv/bin/python benchmarks/batch_invariance.py            # ~4 min on 2 idle cores (more when loaded)
    .venv/bin/python benchmarks/batch_invariance.py --quick    # smoke run (~10 s)

`MaskGenerator.generate(labels, prompts, seeds, ...)` draws image i's noise from its own seed, so
an image's content does not depend on the rest of the batch; but the batched CPU kernels (conv,
matmul, attention) may sum in another order for another batch size, so pixels can move by float
rounding. This measures by how much, so that claims and tests can state a bound N/255 instead of
a byte-for-byte equality that only holds within one batch composition.

For each model (the tiny random model with a random segmentation ControlNet built here the way
tests/conftest.py builds its fixture; and models/toy-sd + models/toy-sd-controlnet, the demo's
models, when they load), each torch thread count and each step count: S images (seed
sample_seed(0, i), toy label i % L, the paper's prompt of that label under a cycling condition,
guidance 4) are made

  - alone (batch 1): the reference;
  - in batches of 2, 4, 8: the S images shuffled (another permutation per batch size, so an image
    sits at varying positions next to varying neighbours) and cut into consecutive batches;
  - the batches of the largest size once more (the same batch twice: must be byte-identical);
  - with threads > the first count: batch 1 is also compared with batch 1 at the first count;
  - each batch size after the first is also compared with the first (e.g. batches of 8 vs of 2).

Reported per row: the fraction of images byte-identical to the reference, the max abs pixel
difference (uint8 0..255, over all pixels and channels of all S images), the mean abs difference,
the fraction of pixel values that differ at all, and the max difference of the pipeline's float
output before generate() rounds it (how far the values are from flipping by more than one unit).
Results in docs/benchmarks.md, "Batch invariance". Prints a markdown table; writes nothing else
(the random ControlNet goes to a temp dir that is removed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine  # noqa: E402  (benchmarks/common.py, beside this script)

CONDITIONS = ("clear", "foggy", "night", "rainy", "snowy")
TOY_SD, TOY_CONTROLNET = ROOT / "models" / "toy-sd", ROOT / "models" / "toy-sd-controlnet"


def _import(name: str, *modules: str):
    """`name` from the first of `modules` that has it (names stay while modules move)."""
    import importlib

    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} is in none of {', '.join(modules)}")


def make_tiny_controlnet(path: Path) -> None:
    """tests/conftest.py's controlnet_dir: from_unet of build_tiny(0), zero convolutions made non-zero.
    Seeded before from_unet too (the fixture is not: its conditioning embedding's fresh layers draw from
    torch's global generator, whose seed is random per process), so every run measures the same model."""
    from diffusers import ControlNetModel

    conditioning_channels = _import("conditioning_channels", "calora_ray.controlnet", "calora_ray.generation")
    build_tiny = _import("build_tiny", "calora_ray.models")

    unet = build_tiny(0).unet
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(4))
    torch.manual_seed(0)
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out]:
            module.weight.normal_(0, 0.05)
    controlnet.save_pretrained(path)


def load_generators(models: list[str], work: Path) -> list[tuple[str, object]]:
    from calora_ray.generation import MaskGenerator

    out = []
    for name in models:
        if name == "tiny":
            make_tiny_controlnet(work / "controlnet")
            out.append(("tiny + random ControlNet", MaskGenerator("tiny", controlnet=str(work / "controlnet"),
                                                                  device="cpu")))
        elif name == "toy-sd":
            try:
                out.append(("toy-sd + toy-sd-controlnet", MaskGenerator(str(TOY_SD), controlnet=str(TOY_CONTROLNET),
                                                                        device="cpu")))
            except Exception as e:  # noqa: BLE001 - the committed models are optional here
                print(f"# toy-sd skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      file=sys.stderr)
        else:
            raise SystemExit(f"unknown model {name!r} (tiny, toy-sd)")
    return out


def workload(gen, num_seeds: int, num_labels: int):
    """S (label, prompt, seed) triples at the model's native size."""
    open_dataset = _import("open_dataset", "calora_ray.data", "calora_ray.datasets")
    from calora_ray.generation import build_prompt, sample_seed

    res = gen.native_resolution
    ds = open_dataset("toy", num_images=num_labels, resolution=res)
    labels = [np.asarray(ds[i]["label"], dtype=np.uint8) for i in range(num_labels)]
    items = []
    for i in range(num_seeds):
        label = labels[i % num_labels]
        items.append((label, build_prompt(label, CONDITIONS[i % len(CONDITIONS)]), sample_seed(0, i)))
    return items


class FloatTap:
    """Wraps gen.pipe to keep the pipeline's float images, before generate() rounds them to uint8."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, None

    def __call__(self, *args, **kwargs):
        out = self.pipe(*args, **kwargs)
        self.images = np.clip(np.array(out.images, dtype=np.float64), 0.0, 1.0) * 255.0
        return out

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def run_batches(gen, items, order: list[int], batch: int, steps: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Images of items[order] made in consecutive batches of `batch`: {item: (uint8 image, float image 0..255)}."""
    out = {}
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        images = gen.generate([items[i][0] for i in idx], [items[i][1] for i in idx], [items[i][2] for i in idx],
                              steps=steps, guidance=4.0)
        floats = gen.pipe.images if isinstance(gen.pipe, FloatTap) else [None] * len(idx)
        out.update(zip(idx, zip(images, floats)))
    return out


def compare(ref: dict, other: dict) -> dict:
    keys = sorted(ref)
    diffs = [np.abs(ref[k][0].astype(np.int16) - other[k][0].astype(np.int16)) for k in keys]
    floats = [float(np.abs(ref[k][1] - other[k][1]).max()) for k in keys if ref[k][1] is not None]
    return {"identical": sum(int(not d.any()) for d in diffs) / len(keys),
            "max": int(max(d.max() for d in diffs)),
            "mean": float(np.mean([d.mean() for d in diffs])),
            "differing": float(np.mean([(d > 0).mean() for d in diffs])),
            "float_max": max(floats) if floats else None}


def fmt(c: dict) -> list[str]:
    return [f"{c['identical']:.2f}", str(c["max"]), f"{c['mean']:.1e}" if c["mean"] else "0",
            f"{100 * c['differing']:.3f} %", "n/a" if c["float_max"] is None else
            f"{c['float_max']:.1e}" if c["float_max"] else "0"]


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "toy-sd"], help="tiny and/or toy-sd")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts")
    parser.add_argument("--steps", nargs="+", type=int, default=[2, 25], help="DDIM step counts")
    parser.add_argument("--seeds", nargs="+", type=int, default=[32, 8],
                        help="images per step count (one number per --steps value, or one for all)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--labels", type=int, default=4, help="toy labels cycled over the images")
    parser.add_argument("--quick", action="store_true", help="tiny only, 1 thread, steps 2, 8 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.threads, args.steps, args.seeds = ["tiny"], [1], [2], [8]
    if len(args.seeds) == 1:
        args.seeds = args.seeds * len(args.steps)
    if len(args.seeds) != len(args.steps):
        raise SystemExit("--seeds needs one number per --steps value (or one for all)")

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="batch-invariance-"))
    rows, worst, worst_float = [], 0, 0.0
    try:
        for model_name, gen in load_generators(args.models, work):
            if hasattr(gen, "pipe"):
                gen.pipe = FloatTap(gen.pipe)
            for steps, num_seeds in zip(args.steps, args.seeds):
                items = workload(gen, num_seeds, args.labels)
                alone_first_threads = None
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    rng = np.random.default_rng(1000 * steps + threads)
                    alone = run_batches(gen, items, list(range(num_seeds)), 1, steps)
                    head = [model_name, threads, steps, num_seeds]
                    if alone_first_threads is None:
                        alone_first_threads = alone
                    else:
                        c = compare(alone_first_threads, alone)
                        rows.append(head + [1, f"batch 1 at {args.threads[0]} thread(s)", *fmt(c)])
                    largest = first = None
                    for batch in args.batch_sizes:
                        order = [int(i) for i in rng.permutation(num_seeds)]
                        batched = run_batches(gen, items, order, batch, steps)
                        c = compare(alone, batched)
                        worst, worst_float = max(worst, c["max"]), max(worst_float, c["float_max"] or 0.0)
                        rows.append(head + [batch, "batch 1", *fmt(c)])
                        if first is not None:
                            rows.append(head + [batch, f"batches of {first[0]}", *fmt(compare(first[1], batched))])
                        first = first or (batch, batched)
                        largest = (batch, order, batched)
                    batch, order, batched = largest
                    again = run_batches(gen, items, order, batch, steps)
                    c = compare(batched, again)
                    rows.append(head + [batch, f"the same batches of {batch} again", *fmt(c)])
                    print(f"# {model_name}, {threads} thread(s), {steps} steps, {num_seeds} images: "
                          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {machine()}; CPU, float32, DDIM with CFG (guidance 4), toy labels at the model's native "
          f"size, {args.labels} labels; {time.perf_counter() - started:.0f} s in all\n")
    print_table(["model", "threads", "steps", "images", "batch", "compared with", "byte-identical",
                 "max abs diff (/255)", "mean abs diff (/255)", "values differing", "max float diff (/255)"], rows)
    print(f"\nlargest difference from batch 1: {worst}/255 in the uint8 images, {worst_float:.2e}/255 in the "
          "pipeline's float output before rounding")


if __name__ == "__main__":
    main()
