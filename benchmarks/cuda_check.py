"""The CUDA path, checked and timed on a GPU machine (CI has none, so this is run by hand).

    python benchmarks/cuda_check.py [--out DIR]

Part A, correctness on the tiny model for each precision (fp32, bf16, fp16): scoring gives
finite positive scores; LoRA training with autocast (+ GradScaler for fp16) keeps the LoRA weights
fp32 and moves them; the saved adapter loads into a stock pipeline on the GPU and reproduces the
in-memory model. Part B, timings on the mid-size SD-1.5-shaped UNet of benchmarks/common.py:
scoring per sample vs a full-LoRA step (batch 1 and 4), and a CA-LoRA (2 %) step vs a full-LoRA
step, in fp32 and bf16. Prints a JSON summary (also written to DIR/cuda_check.json).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calora_ray.concepts import resolve_concept
from calora_ray.config import TrainingConfig
from calora_ray.datasets import open_dataset
from calora_ray.lora import attach_lora, save_lora
from calora_ray.models import expand_conditioning, load_components, resolve_dtype
from calora_ray.scoring import score_samples
from calora_ray.selection import select_top_k
from calora_ray.sensitivity import (SensitivitySums, find_candidates, grad_only_for,
                                    sample_gradient_norms)
from calora_ray.training import diffusion_step_loss, lora_task, train

CUDA = torch.device("cuda")


def correctness(precision: str, out: Path) -> dict:
    concept = resolve_concept("style")
    comps = load_components("tiny").to(CUDA, resolve_dtype(precision, CUDA))
    sums = score_samples(comps, find_candidates(comps.unet), concept, [0, 1], timestep=81, seed=0, x0_steps=2,
                         progress=False)
    scores = list(sums.scores().values())
    comps = load_components("tiny").to(CUDA, resolve_dtype(precision, CUDA))
    modules = list(find_candidates(comps.unet))[-4:]
    task = lora_task(comps, modules, 4, 4, caption=concept.base_prompt)
    dataset = open_dataset("toy:target", num_images=4, resolution=64)
    history = train(task, dataset, TrainingConfig(steps=6, batch_size=4, learning_rate=1e-3, log_every=1),
                    device=CUDA, mixed_precision=precision, quiet=True)
    lora = {n: p for n, p in comps.unet.named_parameters() if "lora_" in n}
    result = {"scores_finite_positive": all(s == s and s > 0 for s in scores),
              "losses": [round(h["loss"], 4) for h in history],
              "lora_dtypes": sorted({str(p.dtype) for p in lora.values()}),
              "lora_B_moved": any(float(p.detach().abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)}
    if precision == "no":  # the round trip is exact only in fp32
        def sample(pipe):
            pipe.set_progress_bar_config(disable=True)
            return pipe(concept.base_prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

        adapted = sample(comps.pipeline())
        save_lora(comps, comps.unet, out / "lora")
        fresh = load_components("tiny").to(CUDA)
        pipe = fresh.pipeline()
        pipe.load_lora_weights(str(out / "lora"))
        result["roundtrip_max_abs_diff"] = float(abs(sample(pipe) - adapted).max())
    return result


def timed(fn, repeats=10, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timings(precision: str) -> dict:
    import copy

    from common import build_model

    dtype = resolve_dtype(precision, CUDA)
    model = build_model("mid")
    unet = model.components.unet.to(CUDA, dtype)
    base = {k: v.to(CUDA, dtype) for k, v in model.base_cond.items()}
    augs = [{k: v.to(CUDA, dtype) for k, v in c.items()} for c in model.augmented_conds]
    cands = find_candidates(unet)
    weights = [m.weight for m in cands.values()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, *model.latent_shape), generator=g).to(CUDA, dtype)
    t = torch.tensor([81], device=CUDA)

    def score_one():
        with grad_only_for(unet, weights):
            sample_gradient_norms(unet, weights, x, t, x, base, augs)

    out = {"score_per_sample_ms": 1e3 * timed(score_one)}
    # scores for the CA-LoRA selection
    sums = SensitivitySums(list(cands))
    with grad_only_for(unet, weights):
        for _ in range(2):
            sums.add(*sample_gradient_norms(unet, weights, torch.randn_like(x), t, torch.randn_like(x), base, augs))
    selected = select_top_k(sums.scores(), 2)
    for label, modules in (("full", list(cands)), ("calora", selected)):
        for batch in (1, 4):
            lunet = copy.deepcopy(unet)
            torch.manual_seed(0)
            attach_lora(lunet, modules, model.lora_rank, model.lora_rank)
            lunet.train()
            comps = copy.copy(model.components)
            comps.unet = lunet
            params = [p for p in lunet.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            lat = torch.randn((batch, *model.latent_shape), generator=g).to(CUDA, dtype)
            cond = expand_conditioning(base, batch)
            gen = torch.Generator().manual_seed(1)

            def step():
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    loss = diffusion_step_loss(comps, lat, cond, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            out[f"{label}_step_b{batch}_ms"] = 1e3 * timed(step)
    out["p1_ratio_b1"] = out["score_per_sample_ms"] / out["full_step_b1_ms"]
    out["p1_ratio_b4"] = out["score_per_sample_ms"] / out["full_step_b4_ms"]
    out["p2_ratio_b1"] = out["calora_step_b1_ms"] / out["full_step_b1_ms"]
    out["p2_ratio_b4"] = out["calora_step_b4_ms"] / out["full_step_b4_ms"]
    out["calora_selected"] = selected
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/cuda_check")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU")
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for precision in ("no", "bf16", "fp16"):
        summary[f"tiny_{precision}"] = correctness(precision, out)
        print(json.dumps({precision: summary[f"tiny_{precision}"]}), flush=True)
    for precision in ("no", "bf16"):
        summary[f"mid_timings_{precision}"] = timings(precision)
        print(json.dumps({f"mid_{precision}": summary[f"mid_timings_{precision}"]}), flush=True)
    (out / "cuda_check.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
