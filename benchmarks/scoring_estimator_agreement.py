"""Scoring estimators 'all' vs 'one' (jobs/score.py --augmented-per-sample): which ranks toy-sd's
projections better per second of compute?

Both estimate the same expectation over (x_0, noise, c_aug): 'all' scores every sample against every
augmented prompt, 'one' against the one prompt the sample's seed draws (scoring.augmented_indices),
so 'one' is cheaper per sample and noisier per sample. This script, for each concept and x_0 source:

1. a reference ranking: --reference-samples samples under 'all' at --reference-seed (no sample in
   common with the rest);
2. a pool of --pool-samples samples at --seed under 'all', kept per sample (scoring.sample_norms).
   A 'one' run over a block of these samples is exactly the pool's numbers at each sample's drawn
   prompt (same x_0 and noise; tests/test_sensitivity.py checks it, and step 3 checks it again here
   against real score_samples runs), so both estimators are read off the one pool;
3. the time per sample of each estimator: score_samples end to end (x_0 sampling included, the
   job's path) over --timing-samples samples, timed interleaved (benchmarks/common.py) on the first
   concept (prompts are padded to the text encoder's full length, so the cost is every concept's),
   in CPU time of this one-thread process by default (--clock): on a shared machine, wall time
   also counts the other jobs' load (one wall-time run gave 0.74x and 1.83x for two concepts);
4. for every sample count n, disjoint blocks of n pool samples (the replicates), each block's
   normalised ranking against the reference: Spearman, top-k overlap (k = 2 % and 10 % by count,
   as docs/ablation.md's ranking study), and for 'one' the Spearman difference to 'all' on the
   same blocks (paired). Then the same at EQUAL TIME (of --clock): 'one' with
   n x (time per sample 'all' / 'one') samples against 'all' with n;
5. why: per module, the variance of one sample's normalised score under 'one' over that under
   'all' (1 + (1 - 1/A) x mean prompt-to-prompt variance within a sample / variance of the
   samples' 'all' means). 'one' ranks better per second where this ratio is below the time ratio.

    python benchmarks/scoring_estimator_agreement.py        # ~13 min on 2 shared CPU cores
    python benchmarks/scoring_estimator_agreement.py --quick  # a smoke run, no measurement
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from common import interleaved_times, machine, median, paired_ratio, parse_ints, print_table, setup

from calora_ray.concepts import resolve_concept
from calora_ray.datasets import open_dataset
from calora_ray.models import load_components
from calora_ray.scoring import augmented_indices, sample_norms, score_samples
from calora_ray.selection import spearman, top_k_overlap
from calora_ray.sensitivity import RATIO_EPS, SensitivitySums, find_candidates

ESTIMATORS = ("all", "one")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sd", help="Model preset or directory.")
    p.add_argument("--concepts", default="style,viewpoint", help="Comma-separated concepts.")
    p.add_argument("--x0", default="generated,target",
                   help="Comma-separated x_0 sources (jobs/score.py --x0); each gets its own reference and pool.")
    p.add_argument("--timestep", type=int, default=81)
    p.add_argument("--x0-steps", type=int, default=20, help="DDIM steps of x_0 sampling (the job's default).")
    p.add_argument("--x0-guidance", type=float, default=7.5)
    p.add_argument("--data", default="toy", help="Images of --x0 target.")
    p.add_argument("--batch-size", type=int, default=4, help="Samples per x_0 batch (the job's default).")
    p.add_argument("--reference-samples", type=int, default=96)
    p.add_argument("--reference-seed", type=int, default=1)
    p.add_argument("--pool-samples", type=int, default=192, help="Samples the replicates are cut from.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the pool.")
    p.add_argument("--samples", default="4,8,16,32", help="Sample counts n per estimator (and budgets of 'all').")
    p.add_argument("--ks", default="2,10", help="Top-k %% (by count) of the overlaps.")
    p.add_argument("--timing-samples", type=int, default=8, help="Samples per timed score_samples call.")
    p.add_argument("--repeats", type=int, default=6, help="Timed rounds.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine).")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="Time of a call: CPU time of this process (with --threads 1, the compute it costs) "
                        "or wall time.")
    p.add_argument("--quick", action="store_true", help="Tiny sizes, 2 DDIM steps: a smoke run, no measurement.")
    args = p.parse_args(argv)
    if args.quick:
        args.reference_samples, args.pool_samples, args.samples = 8, 16, "2,4"
        args.timing_samples, args.repeats, args.warmup, args.x0_steps = 4, 1, 0, 2
    return args


def scoring_kwargs(args, x0: str, dataset) -> dict:
    return dict(timestep=args.timestep, x0=x0, resolution=64, x0_steps=args.x0_steps,
                x0_guidance=args.x0_guidance, batch_size=args.batch_size, dataset=dataset)


def pool_records(components, candidates, concept, num_samples: int, seed: int, kw: dict) -> list:
    """Per sample 0..num_samples-1 under 'all': (diff_rms (M,), concept_rms (A, M))."""
    return [(diff, conc) for _, _, diff, conc in
            sample_norms(components, candidates, concept, list(range(num_samples)), seed=seed, **kw)]


def block_sums(names: list[str], records: list, block: range, estimator: str, seed: int) -> SensitivitySums:
    """The sums a score_samples run of `estimator` over `block` gives, from the pool's per-sample
    'all' numbers: each sample's diff gradients and its prompts' concept gradients."""
    sums = SensitivitySums(names)
    for i in block:
        diff, conc = records[i]
        sums.add(diff, conc[augmented_indices(seed, i, conc.shape[0], estimator)])
    return sums


def agreement(names, records, reference: dict, n: int, estimator: str, seed: int, ks: list[float]) -> dict:
    """Spearman and top-k overlaps against `reference` of every disjoint block of n pool samples."""
    blocks = [range(r * n, (r + 1) * n) for r in range(len(records) // n)]
    rows = []
    for block in blocks:
        scores = block_sums(names, records, block, estimator, seed).scores(normalized=True)
        rows.append([spearman(scores, reference)] + [top_k_overlap(scores, reference, k) for k in ks])
    return {"n": n, "replicates": len(blocks), "metrics": list(zip(*rows))}


def variance_ratio(records: list) -> torch.Tensor:
    """Per module: Var of one sample's normalised score under 'one' ÷ under 'all'. -> (M,)

    r[i, k] = sample i's ratio under prompt k. 'all' scores a sample with mean_k r[i, k] (variance
    B over samples); 'one' with a single r[i, k], which adds the prompt-to-prompt variance W within
    a sample, less the W / A that 'all' already carries: (B + (1 - 1/A) W) / B.
    """
    r = torch.stack([conc / (diff + RATIO_EPS) for diff, conc in records]).double()  # (N, A, M)
    num_prompts = r.shape[1]
    between = r.mean(1).var(0)
    within = r.var(1).mean(0) if num_prompts > 1 else torch.zeros_like(between)
    return 1 + (1 - 1 / num_prompts) * within / between


def mean_sd(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(args):
    setup(args.threads)
    started = time.perf_counter()
    concepts = [resolve_concept(c.strip()) for c in args.concepts.split(",") if c.strip()]
    x0_modes = [x.strip() for x in args.x0.split(",") if x.strip()]
    sample_counts, ks = parse_ints(args.samples), [float(k) for k in args.ks.split(",")]
    components = load_components(args.model)
    candidates = find_candidates(components.unet)
    names = list(candidates)
    print(f"Scoring estimators on {args.model} ({len(names)} candidates), t={args.timestep}, x_0 DDIM steps "
          f"{args.x0_steps}, batch {args.batch_size}; reference {args.reference_samples} samples 'all' seed "
          f"{args.reference_seed}; pool {args.pool_samples} samples seed {args.seed}; {machine()}", flush=True)
    cost_rows, grid_rows, equal_rows, variance_rows = [], [], [], []
    for x0 in x0_modes:
        dataset = open_dataset(args.data, split="train", resolution=64, seed=args.seed) if x0 == "target" else None
        kw = scoring_kwargs(args, x0, dataset)

        # 3. time per sample of both estimators, interleaved, on the first concept. Each call's result
        # is kept (every concept's, one untimed call each for the others) to check the pool's derivation.
        last = {}

        def timed_run(concept, estimator):
            last[concept.name, estimator] = score_samples(
                components, candidates, concept, list(range(args.timing_samples)), seed=args.seed,
                augmented_per_sample=estimator, progress=False, **kw)

        print(f"  x0={x0}: timing {len(ESTIMATORS)} score_samples calls x {args.repeats} rounds ... "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        times = interleaved_times({e: partial(timed_run, concepts[0], e) for e in ESTIMATORS}, args.repeats,
                                  args.warmup, min_sample_s=0,
                                  clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        for c in concepts[1:]:
            for e in ESTIMATORS:
                timed_run(c, e)
        per_sample = {e: median(times[e]) / args.timing_samples for e in ESTIMATORS}
        ratio = paired_ratio(times["one"], times["all"])
        cost_rows += [[x0, e, len(augmented_indices(0, 0, len(concepts[0].augmented_prompts), e)),
                       f"{per_sample[e] * 1e3:.0f}", f"{ratio:.2f}x" if e == "one" else ""] for e in ESTIMATORS]

        for c in concepts:
            print(f"  x0={x0} {c.name}: reference ({args.reference_samples}) and pool ({args.pool_samples}) ... "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            reference = pool_records(components, candidates, c, args.reference_samples, args.reference_seed, kw)
            reference = block_sums(names, reference, range(args.reference_samples), "all",
                                   args.reference_seed).scores(normalized=True)
            records = pool_records(components, candidates, c, args.pool_samples, args.seed, kw)
            for e in ESTIMATORS:  # the derivation from the pool is exactly what score_samples gives
                derived = block_sums(names, records, range(args.timing_samples), e, args.seed)
                real = last[c.name, e]
                assert all(torch.equal(getattr(derived, f), getattr(real, f))
                           for f in ("ratio_sum", "concept_sum", "diff_sum")), (x0, c.name, e)
            by_n = {(e, n): agreement(names, records, reference, n, e, args.seed, ks)
                    for e in ESTIMATORS for n in sample_counts}
            for e in ESTIMATORS:
                for n in sample_counts:
                    a = by_n[e, n]
                    if not a["replicates"]:
                        continue
                    paired = "" if e == "all" else mean_sd(
                        x - y for x, y in zip(a["metrics"][0], by_n["all", n]["metrics"][0]))
                    grid_rows.append([x0, c.name, e, n, f"{n * per_sample[e]:.1f}", a["replicates"]]
                                     + [mean_sd(m) for m in a["metrics"]] + [paired])
            ratio = variance_ratio(records)
            time_ratio = per_sample["one"] / per_sample["all"]
            variance_rows.append([x0, c.name, f"{ratio.median():.4f}", f"{ratio.max():.4f}", f"{time_ratio:.2f}",
                                  f"{1 / (time_ratio * ratio.median()):.2f}x"])
            for n in sample_counts:
                budget = n * per_sample["all"]
                n_one = max(1, round(budget / per_sample["one"]))
                a_all = agreement(names, records, reference, n, "all", args.seed, ks)
                a_one = agreement(names, records, reference, n_one, "one", args.seed, ks)
                if not (a_all["replicates"] and a_one["replicates"]):
                    continue
                equal_rows.append([x0, c.name, f"{budget:.1f}", n, n_one]
                                  + [f"{mean_sd(x)} / {mean_sd(y)}" for x, y in zip(a_all["metrics"], a_one["metrics"])]
                                  + [f"{a_all['replicates']} / {a_one['replicates']}"])
    metrics = ["Spearman vs reference"] + [f"top-{k:g} % overlap" for k in ks]
    print(f"\n{args.clock.upper()} time per sample (score_samples end to end on '{concepts[0].name}', "
          "medians of interleaved rounds):")
    print_table(["x_0", "estimator", "c_aug / sample", "time / sample (ms)", "'one' ÷ 'all' (paired)"], cost_rows)
    print("\nAgreement with the reference by sample count (mean ± sd over disjoint blocks of the pool):")
    print_table(["x_0", "concept", "estimator", "samples n", "compute (s)", "replicates"] + metrics
                + ["Spearman 'one' − 'all', same blocks"], grid_rows)
    print(f"\nAt equal {args.clock} time ('all' with n samples vs 'one' with the samples the same seconds buy; "
          "all / one):")
    print_table(["x_0", "concept", "compute (s)", "n 'all'", "n 'one'"] + metrics + ["replicates"], equal_rows)
    print("\nWhy: per-sample variance of the normalised score, 'one' ÷ 'all' (over the pool, per module):")
    print_table(["x_0", "concept", "variance ratio (median)", "(max)", "time ratio 'one' ÷ 'all'",
                 "efficiency per second 'one' ÷ 'all' (median module)"], variance_rows)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(parse_args())
