"""P1: the cost of scoring one sample, in units of one full-LoRA training step.

Scoring one (x_0, noise) sample = the c_aug predictions (no grad) + one forward under c + one
backward for L_diff and one per L_concept, restricted to the candidate weights
(calora_ray.sensitivity.sample_gradient_norms on precomputed latents: x_0 sampling excluded).
Under each estimator of --estimators (jobs/score.py --augmented-per-sample): 'all' scores a sample
against every c_aug (3 for `style`), 'one' against the one c_aug the sample's seed draws.
A full-LoRA step = LoRA (rank 4 tiny / 64 mid) on every candidate, diffusion loss, backward,
AdamW, on a batch of latents. Target: scoring / sample <= 2.5x a training step.
Everything is timed interleaved in one process; see benchmarks/common.py and docs/benchmarks.md.

    python benchmarks/p1_scoring_cost.py            # full run (~4 min on 2 shared CPU cores)
    python benchmarks/p1_scoring_cost.py --quick
"""

from __future__ import annotations

import argparse
from functools import partial

from common import (SCORING_TIMESTEP, augmented_predictions, build_model, interleaved_times, lora_step,
                    machine, median, paired_ratio, parse_estimators, parse_ints, parse_models, print_table,
                    sample_prompts, score_one, scoring_sample, setup)

from calora_ray.concepts import resolve_concept
from calora_ray.scoring import score_samples
from calora_ray.sensitivity import find_candidates

TARGET = 2.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,mid", help="Comma-separated: tiny, mid.")
    p.add_argument("--batch-sizes", default="1,4",
                   help="Batch sizes of the full-LoRA training step to compare against.")
    p.add_argument("--estimators", default="all,one",
                   help="Comma-separated scoring estimators (--augmented-per-sample), timed side by side.")
    p.add_argument("--repeats", type=int, default=15, help="Timed rounds (each times every variant once).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed rounds first.")
    p.add_argument("--x0-steps", type=int, default=20,
                   help="DDIM steps of score_samples' x_0 sampling (timed for models that have a pipeline).")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine).")
    p.add_argument("--seed", type=int, default=0, help="Model weights, latents and LoRA init.")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up: a smoke run, no measurement.")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    return args


def main(args):
    setup(args.threads)
    batch_sizes = parse_ints(args.batch_sizes)
    estimators = parse_estimators(args.estimators)
    print(f"P1 scoring cost per sample vs one full-LoRA step; estimators {', '.join(estimators)}; "
          f"{args.repeats} rounds after {args.warmup} warm-up; {machine()}")
    rows, extra, versus = [], [], []
    for name in parse_models(args.models):
        model = build_model(name, args.seed)
        candidates = find_candidates(model.components.unet)
        weights = [m.weight for m in candidates.values()]
        sample = scoring_sample(model, 0, args.seed)
        fns = {}
        for e in estimators:
            prompts = sample_prompts(model, e, 0, args.seed)  # sample 0's c_aug under this estimator
            fns[f"score {e}"] = partial(score_one, model, weights, sample, prompts)
            # Its no-grad part alone, to show where the time goes.
            fns[f"c_aug forwards {e}"] = partial(augmented_predictions, model, sample, prompts)
        for b in batch_sizes:
            fns[f"step b={b}"] = lora_step(model, list(candidates), b, args.seed)
        if model.components.vae is not None:
            # The whole per-sample cost of `jobs/score.py --x0 generated`, x_0 sampling included.
            for e in estimators:
                fns[f"score_samples {e}"] = partial(
                    score_samples, model.components, candidates, resolve_concept("style"), [0],
                    timestep=SCORING_TIMESTEP, seed=args.seed, x0="generated", resolution=64,
                    x0_steps=args.x0_steps, batch_size=1, augmented_per_sample=e, progress=False)
        print(f"  {name}: {model.description}; timing {', '.join(fns)} ...", flush=True)
        times = interleaved_times(fns, args.repeats, args.warmup)
        for b in batch_sizes:
            step = times[f"step b={b}"]
            for e in estimators:
                score = times[f"score {e}"]
                ratio = median(score) / median(step)
                rows.append([name, len(candidates), model.lora_rank, b, e,
                             len(sample_prompts(model, e, 0, args.seed)), f"{median(score) * 1e3:.1f}",
                             f"{median(times[f'c_aug forwards {e}']) * 1e3:.1f}",
                             f"{median(step) * 1e3:.1f}", f"{ratio:.2f}x", f"{paired_ratio(score, step):.2f}x",
                             "yes" if ratio <= TARGET else "no"])
        for e in estimators:
            if f"score_samples {e}" in times:
                extra.append([name, e, args.x0_steps, f"{median(times[f'score_samples {e}']) * 1e3:.1f}",
                              f"{median(times[f'score {e}']) * 1e3:.1f}",
                              f"{median(times[f'score_samples {e}']) / median(times['step b=1']):.2f}x"])
        if {"all", "one"} <= set(estimators):
            versus.append([name, f"{paired_ratio(times['score one'], times['score all']):.2f}x"]
                          + ([f"{paired_ratio(times['score_samples one'], times['score_samples all']):.2f}x"]
                             if "score_samples one" in times else ["-"]))
    print()
    print_table(["model", "candidates", "LoRA rank", "step batch", "estimator", "c_aug / sample",
                 "scoring / sample (ms)", "of which c_aug forwards (ms)",
                 "full-LoRA step (ms)", "ratio (medians)", "ratio (paired)", f"<= {TARGET}x"], rows)
    if extra:
        print("\nscore_samples end to end (x0='generated', 1 sample: x_0 sampling + the gradients above):")
        print_table(["model", "estimator", "x_0 DDIM steps", "score_samples / sample (ms)", "gradients only (ms)",
                     "÷ step b=1"], extra)
    if versus:
        print("\n'one' ÷ 'all' per sample (paired):")
        print_table(["model", "gradients only", "score_samples end to end"], versus)


if __name__ == "__main__":
    main(parse_args())
