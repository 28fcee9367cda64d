"""P2: a CA-LoRA training step vs a full-LoRA one: time, trainable parameters, AdamW state.

CA-LoRA = LoRA on the top k% (default 2 %) of the candidates by concept sensitivity, scored with
the library's gradient code (style concept, t = 81) on a few samples and picked by
calora_ray.selection.select_top_k. Full LoRA = LoRA on every candidate. Same rank (4 tiny / 64
mid), same batch, same AdamW. Target: CA-LoRA step <= 0.85x the full-LoRA step.

Two bounds show how much the answer depends on *where* the selected layers sit: LoRA on the k
earliest candidates (backward must run through almost the whole UNet) and on the k last ones
(backward stops near the output). All variants are timed interleaved in one process.

    python benchmarks/p2_calora_step.py            # full run (~2.5 min on 2 CPU cores)
    python benchmarks/p2_calora_step.py --quick
"""

from __future__ import annotations

import argparse

from common import (build_model, interleaved_times, lora_step, machine, median, paired_ratio,
                    parse_ints, parse_models, print_table, score_candidates, setup)

from calora_ray.selection import num_selected, select_top_k
from calora_ray.sensitivity import find_candidates

TARGET = 0.85


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,mid", help="Comma-separated: tiny, mid.")
    p.add_argument("--batch-sizes", default="1,4", help="Training batch sizes to time.")
    p.add_argument("--top-k-percent", type=float, default=2.0, help="CA-LoRA's k (paper: 2).")
    p.add_argument("--score-samples", type=int, default=2, help="Samples scored to pick CA-LoRA's modules.")
    p.add_argument("--no-bounds", action="store_true",
                   help="Skip the earliest-k / last-k placement bounds (time CA-LoRA and full LoRA only).")
    p.add_argument("--repeats", type=int, default=15, help="Timed rounds (each times every variant once).")
    p.add_argument("--warmup", type=int, default=2, help="Untimed rounds first (>= 1: fills AdamW's state).")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine).")
    p.add_argument("--seed", type=int, default=0, help="Model weights, scoring samples, latents, LoRA init.")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up: a smoke run, no measurement.")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    return args


def size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.1f} KiB"


def position(name: str, order: list[str]) -> str:
    """'down_blocks.0.attentions.0...attn1.to_q (#1/56)': where a module sits in the UNet."""
    return f"{name} (#{order.index(name) + 1}/{len(order)})"


def main(args):
    setup(args.threads)
    print(f"P2 CA-LoRA step vs full-LoRA step; k = {args.top_k_percent:g}% of candidates; {args.repeats} "
          f"rounds after {args.warmup} warm-up; {machine()}")
    rows = []
    for name in parse_models(args.models):
        model = build_model(name, args.seed)
        order = list(find_candidates(model.components.unet))
        sums = score_candidates(model, args.score_samples, args.seed)
        selected = select_top_k(sums.scores(), args.top_k_percent)
        k = num_selected(len(order), args.top_k_percent)
        variants = {"CA-LoRA": selected, "full LoRA": order}
        if not args.no_bounds:
            variants[f"earliest {k}"] = order[:k]
            variants[f"last {k}"] = order[-k:]
        print(f"  {name}: {model.description}; CA-LoRA selected ({args.score_samples} samples scored):")
        for n in selected:
            print(f"    {position(n, order)}")
        for b in parse_ints(args.batch_sizes):
            steps = {v: lora_step(model, modules, b, args.seed) for v, modules in variants.items()}
            print(f"  {name}, batch {b}: timing {', '.join(steps)} ...", flush=True)
            times = interleaved_times(steps, args.repeats, args.warmup)
            full = times["full LoRA"]
            for v, step in steps.items():
                ratio = median(times[v]) / median(full)
                rows.append([name, b, v, len(step.modules), f"{step.trainable_params:,}",
                             size(step.optimizer_state_bytes), f"{median(times[v]) * 1e3:.1f}",
                             f"{ratio:.2f}x", f"{paired_ratio(times[v], full):.2f}x",
                             ("yes" if ratio <= TARGET else "no") if v == "CA-LoRA" else ""])
            del steps
    print()
    print_table(["model", "batch", "LoRA on", "modules", "trainable params", "AdamW state",
                 "step (ms)", "÷ full (medians)", "÷ full (paired)", f"CA-LoRA <= {TARGET}x"], rows)


if __name__ == "__main__":
    main(parse_args())
