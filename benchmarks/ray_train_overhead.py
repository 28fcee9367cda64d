"""Ray Train overhead: one Ray Train worker vs the plain single-process path, on the same box.

Two jobs on the tiny model, each run both ways, interleaved in one process:
  scoring      plain: load_components + scoring.score_samples; Ray: ray_train.run_scoring with
               --num-workers 1 (score_worker on a 1-worker TorchTrainer).
  fine-tuning  plain: load_components + training.lora_task + training.train; Ray:
               ray_train.run_finetune with --num-workers 1 (finetune_worker, the same `train`).
Reported per job: (a) steady-state throughput measured inside the loop, Ray worker / plain
(target >= 0.9x), and (b) end-to-end wall time including Ray start-up and model loading.
See docs/benchmarks.md, section "Ray Train overhead".

    python benchmarks/ray_train_overhead.py            # full run (~5.5 min on 2 shared CPU cores)
    python benchmarks/ray_train_overhead.py --quick    # smoke run, no measurement
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import torch
from common import machine, median, paired_ratio, print_table

from calora_ray.concepts import resolve_concept
from calora_ray.config import FinetuneConfig, ScoreConfig, TrainingConfig, build_config
from calora_ray.datasets import open_dataset
from calora_ray.distributed import ray_report, run_trainer, set_worker_threads
from calora_ray.lora import read_selection
from calora_ray.models import load_components
from calora_ray.ray_train import run_finetune, run_scoring
from calora_ray.scoring import score_samples
from calora_ray.selection import select_top_k
from calora_ray.sensitivity import find_candidates
from calora_ray.training import lora_task, train

TARGET = 0.9
MODEL = "tiny"
TIMESTEP = 81  # the paper's t
RESOLUTION = 64
DATA = "toy:target"
RANK = 4  # the tiny model's LoRA rank (benchmarks/common.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=4,
                   help="Timed rounds; each runs scoring and fine-tuning once plain and once on Ray.")
    p.add_argument("--num-samples", type=int, default=16, help="Scoring samples per run.")
    p.add_argument("--x0-steps", type=int, default=4, help="DDIM steps of the generated x_0 per sample.")
    p.add_argument("--steps", type=int, default=60, help="Fine-tuning steps per run.")
    p.add_argument("--batch-size", type=int, default=4, help="Fine-tuning images per step.")
    p.add_argument("--num-images", type=int, default=4, help="Images of the toy:target training set.")
    p.add_argument("--skip-steps", type=int, default=5,
                   help="Fine-tuning steps left out of the steady-state rate (both paths): a Ray worker "
                        "is a fresh process whose first steps pay one-time set-up.")
    p.add_argument("--cpus", type=int, default=1,
                   help="CPUs given to Ray (ray.init num_cpus; the one worker reserves them all and sets "
                        "its torch threads to them) and torch threads of the plain path. 1: steady on a "
                        "shared machine (as --threads 1 of P1/P2); torch's default here is "
                        f"{torch.get_num_threads()}.")
    p.add_argument("--ray-worker-niceness", type=int, default=None,
                   help="Diagnosis: start Ray's workers at this niceness (sets RAY_worker_niceness before "
                        "ray.init). Default: Ray's own (15), i.e. what the jobs get.")
    p.add_argument("--settle-s", type=float, default=3.0,
                   help="Untimed pause after every run, so that one run's clean-up (Ray's actors exiting, "
                        "idle workers starting) does not land in the next run's time.")
    p.add_argument("--seed", type=int, default=0, help="Seed of x_0, noise, LoRA init and batches.")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 4 samples, 8 steps (skipping 2): a smoke run, no measurement.")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.num_samples, args.steps, args.skip_steps, args.settle_s = 1, 4, 8, 2, 0.0
    if not 0 <= args.skip_steps < args.steps:
        p.error("--skip-steps must be in [0, --steps)")
    return args


def unique_dir(root: Path, name: str) -> str:
    # A fresh directory per Ray run: a fine-tuning output that exists would be resumed, not rerun.
    return str(root / f"{name}-{uuid.uuid4().hex[:8]}")


def steady_seconds(history: list[dict], skip: int) -> float:
    """Seconds from the end of step `skip` to the last step, from the loop's own elapsed_s log."""
    elapsed = {int(h["step"]): float(h["elapsed_s"]) for h in history}
    return elapsed[max(elapsed)] - (elapsed[skip] if skip else 0.0)


# ----------------------------------------------------------------------------- the two paths


def plain_scoring(args) -> dict:
    started = time.perf_counter()
    components = load_components(MODEL)
    candidates = find_candidates(components.unet)
    concept = resolve_concept("style")
    loop_started = time.perf_counter()
    sums = score_samples(components, candidates, concept, list(range(args.num_samples)), timestep=TIMESTEP,
                         seed=args.seed, x0="generated", resolution=RESOLUTION, x0_steps=args.x0_steps,
                         batch_size=4, progress=False)
    end = time.perf_counter()
    return {"loop_s": end - loop_started, "e2e_s": end - started, "scores": sums.scores()}


def ray_scoring(args, root: Path) -> dict:
    cfg = build_config(ScoreConfig, {
        "model": MODEL, "concept": "style", "timestep": TIMESTEP, "num_samples": args.num_samples,
        "x0": "generated", "x0_steps": args.x0_steps, "batch_size": 4, "resolution": RESOLUTION,
        "seed": args.seed, "num_workers": 1, "output": unique_dir(root, "score")})
    started = time.perf_counter()
    output = run_scoring(cfg)
    e2e = time.perf_counter() - started
    report = json.loads((output / "sensitivity.json").read_text())
    # elapsed_s: timed inside the worker around score_samples (after the model load).
    return {"loop_s": report["elapsed_s"], "e2e_s": e2e, "scores": report["scores_normalized"]}


def training_config(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "log_every": 1,
            "checkpoint_every": args.steps}


def plain_finetune(args, selection: str) -> dict:
    started = time.perf_counter()
    components = load_components(MODEL)
    task = lora_task(components, read_selection(selection), RANK, float(RANK),
                     caption=FinetuneConfig().caption, seed=args.seed)
    dataset = open_dataset(DATA, split="train", num_images=args.num_images, resolution=RESOLUTION, seed=0)
    history = train(task, dataset, TrainingConfig(**training_config(args)), device=torch.device("cpu"),
                    quiet=True)
    return {"loop_s": steady_seconds(history, args.skip_steps), "e2e_s": time.perf_counter() - started}


def ray_finetune(args, selection: str, root: Path) -> dict:
    cfg = build_config(FinetuneConfig, {
        "model": MODEL, "data": DATA, "num_images": args.num_images, "resolution": RESOLUTION,
        "selection": selection, "rank": RANK, "alpha": float(RANK), "num_workers": 1,
        "output": unique_dir(root, "finetune"), **training_config(args)})
    started = time.perf_counter()
    output = run_finetune(cfg)
    e2e = time.perf_counter() - started
    with open(output / "loss.csv", newline="") as f:
        history = list(csv.DictReader(f))  # elapsed_s: timed inside the worker's loop
    return {"loop_s": steady_seconds(history, args.skip_steps), "e2e_s": e2e}


def _thread_probe(config: dict) -> None:
    """A Ray Train worker that sets its threads the way score_worker / finetune_worker do."""
    set_worker_threads()
    # Results come back through a checkpoint (as in score_worker): Ray Train v2 keeps no bare metrics.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "threads.json").write_text(json.dumps({
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "nice": os.nice(0)}))
        ray_report({}, tmp)


def ray_worker_threads(root: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    result = run_trainer(_thread_probe, {}, name=f"probe-{uuid.uuid4().hex[:8]}", storage_path=str(root),
                         num_workers=1, use_gpu="false", num_to_keep=None)
    if result.error is not None:
        raise result.error
    elapsed = time.perf_counter() - started
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / "threads.json").read_text()), elapsed


# ----------------------------------------------------------------------------- main


def run_rounds(args, root: Path, selection: str) -> dict:
    """{job: {path: [result per round]}}, the paths interleaved: P R, R P, P R, ...

    Alternating the order keeps either path from always running right after the other's clean-up.
    """
    paths = {"score": {"plain": lambda: plain_scoring(args), "ray": lambda: ray_scoring(args, root)},
             "finetune": {"plain": lambda: plain_finetune(args, selection),
                          "ray": lambda: ray_finetune(args, selection, root)}}
    runs = {job: {"plain": [], "ray": []} for job in paths}
    for r in range(args.repeats):
        order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
        for job in paths:
            for path in order:
                runs[job][path].append(paths[job][path]())
                time.sleep(args.settle_s)
        done = [f"{job} {path} {runs[job][path][-1]['loop_s']:.2f}/{runs[job][path][-1]['e2e_s']:.1f} s"
                for job in paths for path in order]
        print(f"  round {r + 1}/{args.repeats} (loop/end-to-end): {', '.join(done)}", flush=True)
    return runs


def print_results(args, runs: dict, cold: dict, threads: dict) -> None:
    work = {"score": (args.num_samples, "samples/s", f"{args.num_samples} samples, x_0 {args.x0_steps} DDIM steps"),
            "finetune": (args.steps - args.skip_steps, "steps/s",
                         f"steps {args.skip_steps + 1}-{args.steps} of {args.steps}, batch {args.batch_size}")}
    rows, e2e_rows = [], []
    for job, (units, unit, what) in work.items():
        plain, ray = ([x["loop_s"] for x in runs[job][p]] for p in ("plain", "ray"))
        ratio = median(plain) / median(ray)  # throughput Ray / plain = time plain / time Ray
        rows.append([job, what, f"{threads['plain']} / {threads['ray']}", f"{units / median(plain):.2f}",
                     f"{units / median(ray):.2f}", unit, f"{ratio:.2f}x", f"{paired_ratio(plain, ray):.2f}x",
                     "yes" if ratio >= TARGET else "no"])
        plain, ray = ([x["e2e_s"] for x in runs[job][p]] for p in ("plain", "ray"))
        e2e_rows.append([job, f"{median(plain):.1f}", f"{median(ray):.1f}", f"{median(ray) - median(plain):.1f}",
                         f"{median(ray) / median(plain):.2f}x", f"{paired_ratio(ray, plain):.2f}x",
                         f"{cold[job]['loop_s']:.2f} s ({units / cold[job]['loop_s']:.2f} {unit})"])
    print("Steady-state throughput, measured inside the loop (medians):\n")
    print_table(["job", "work per run", "torch threads plain / Ray", "plain", "Ray worker", "unit",
                 "Ray ÷ plain (medians)", "Ray ÷ plain (paired)", f">= {TARGET}x"], rows)
    print("\nEnd to end (plain: load model + run, in this process; Ray: the run_* call, ray.init excluded):\n")
    print_table(["job", "plain (s)", "Ray (s)", "Ray − plain (s)", "Ray ÷ plain (medians)",
                 "Ray ÷ plain (paired)", "plain loop, first run in process (cold)"], e2e_rows)


def main(args):
    import ray

    torch.set_num_threads(args.cpus)
    if args.ray_worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)
    print(f"Ray Train overhead, tiny model; {args.repeats} round(s) after 1 warm-up; {machine()}", flush=True)
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_init_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="calora-ray-overhead-") as tmp:
        root = Path(tmp)
        probe, probe_s = ray_worker_threads(root)
        threads = {"plain": torch.get_num_threads(), "ray": probe["torch_threads"]}
        print(f"  ray.init {ray_init_s:.1f} s; first (empty) 1-worker TorchTrainer run {probe_s:.1f} s; torch "
              f"threads: plain {threads['plain']}, Ray worker {threads['ray']} "
              f"(OMP_NUM_THREADS={probe['OMP_NUM_THREADS']}); process niceness: plain {os.nice(0)}, Ray worker "
              f"{probe['nice']}", flush=True)
        # Warm-up (untimed): the plain path's first run in this process pays one-time costs (lazy
        # imports, first kernels) that every Ray run pays again in its fresh worker process. Its
        # scores give the selection (top 2 %, the score job's default) both fine-tuning paths use.
        cold = {"score": plain_scoring(args)}
        selection = str(root / "selection.json")
        Path(selection).write_text(json.dumps(
            {"selected": select_top_k(cold["score"]["scores"], ScoreConfig().top_k_percent)}))
        cold["finetune"] = plain_finetune(args, selection)
        print(f"  warm-up done; LoRA on {', '.join(read_selection(selection))}", flush=True)
        runs = run_rounds(args, root, selection)
    ray.shutdown()
    # Same samples, same seeds: the Ray worker must have computed the plain path's scores.
    reference = cold["score"]["scores"]
    score_diff = max(abs(run["scores"][n] - v) / abs(v) for run in runs["score"]["ray"] for n, v in reference.items())
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min in all. ray.init (local cluster start, once per "
          f"process, not in the end-to-end times): {ray_init_s:.1f} s. Ray scores vs plain: max relative "
          f"difference {score_diff:.1e}.\n")
    print_results(args, runs, cold, threads)


if __name__ == "__main__":
    main(parse_args())
