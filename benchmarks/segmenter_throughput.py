"""Segmenter training throughput: mmseg's Runner in a plain process vs the same run inside a Ray task
(what jobs/evaluate.py runs), and the share of a step spent waiting for data (Parquet decoding).

Both sides train the same run (calora_ray.evaluation.train_run: toy-fcn-r18-w16 by default, real
toy:target + a synthetic Parquet set mixed 1:1, batch 8, 64x64) for --iters iterations with the same
number of torch threads; the plain side in a fresh subprocess, the Ray side as a fresh Ray task
(calora_ray.ray_eval.train_task, max_calls=1) on a local Ray with --threads CPUs. Rounds alternate
plain / Ray. Reported per side: images/s from the median step time after 5 warm-up iterations
(mmengine's IterTimerHook), the loader's share of a step (its data_time / time), and the whole run's
wall time (process or task start, model build, training, the final validation).

The synthetic set is made here from toy:source renders written as shards (generation.write_render_shards,
the row format of jobs/generate.py; no diffusion model needed), or pass --synthetic URI (e.g. a toy-sd generate output).

    .venv/bin/python benchmarks/segmenter_throughput.py                 # ~10 min on 2 cores
    .venv/bin/python benchmarks/segmenter_throughput.py --iters 20 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The scripts run as `python benchmarks/<script>.py` from a checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# (imports below this line are deliberately late: they need the path above)
from calora_ray.config import EvaluateConfig, build_config  # noqa: E402
from calora_ray.generation import write_render_shards  # noqa: E402


def plain_run(cfg_values: dict, work_dir: str, threads: int) -> dict:
    """train_run in a fresh Python process (no Ray), `threads` torch threads."""
    code = ("import json, sys, time, torch; t0 = time.perf_counter(); torch.set_num_threads(%d)\n"
            "from calora_ray.config import EvaluateConfig, build_config\n"
            "from calora_ray.evaluation import RunSpec, train_run\n"
            "cfg = build_config(EvaluateConfig, json.loads(sys.argv[1]))\n"
            "rec = train_run(cfg, RunSpec('real+synthetic', cfg.synthetic[0], 0, sys.argv[2]))\n"
            "rec['process_wall_s'] = time.perf_counter() - t0\n"
            "print('RESULT ' + json.dumps(rec))\n") % threads
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg_values), work_dir], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)}, cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    rec = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rec["end_to_end_s"] = time.perf_counter() - started
    return rec


def ray_run(cfg_values: dict, work_dir: str, threads: int) -> dict:
    """The same run as a Ray task, as run_evaluate submits it (fresh worker, `threads` CPUs)."""
    import ray

    from calora_ray.evaluation import RunSpec
    from calora_ray.ray_eval import train_task

    cfg = build_config(EvaluateConfig, cfg_values)
    task = ray.remote(max_calls=1, max_retries=0)(train_task).options(num_cpus=threads, num_gpus=0)
    started = time.perf_counter()
    rec = ray.get(task.remote(cfg, RunSpec("real+synthetic", cfg.synthetic[0], 0, work_dir), threads))
    rec["end_to_end_s"] = time.perf_counter() - started
    return rec


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", default="toy-fcn-r18-w16")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--synthetic", default=None, help="a shard URI (default: 512 toy:source renders made here)")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        synthetic = args.synthetic
        if synthetic is None:
            synthetic = f"{tmp}/synthetic"
            write_render_shards(synthetic, "toy:source", count=512, rows_per_shard=128)
        values = {"model_config": args.model_config, "synthetic": [synthetic], "iters": args.iters, "seeds": 1,
                  "loader_workers": args.loader_workers, "val_images": 16, "output": f"{tmp}/out"}
        ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        results = {"plain": [], "ray": []}
        for k in range(args.rounds):
            order = ("plain", "ray") if k % 2 == 0 else ("ray", "plain")
            for mode in order:
                fn = plain_run if mode == "plain" else ray_run
                rec = fn(values, f"{tmp}/{mode}-{k}", args.threads)
                results[mode].append(rec)
                print(f"round {k} {mode}: {rec['images_per_s']} img/s, loader {100 * rec['loader_share_of_step']:.1f} % "
                      f"of a step, {rec['end_to_end_s']:.1f} s end to end", file=sys.stderr, flush=True)
        ray.shutdown()

    def med(mode, key):
        return statistics.median(r[key] for r in results[mode])

    print(f"\nmodel config {args.model_config}, {args.iters} iterations, batch 8 (4 real + 4 synthetic), "
          f"{args.threads} torch threads, {args.loader_workers} loader worker(s), {args.rounds} round(s) per side\n")
    print("| side | images/s (median step) | loader share of a step | train time (s) | run wall time (s) | end to end (s) |")
    print("|---|---|---|---|---|---|")
    for mode in ("plain", "ray"):
        print(f"| {'mmseg Runner, plain process' if mode == 'plain' else 'the same run in a Ray task'} | "
              f"{med(mode, 'images_per_s'):.1f} | {100 * med(mode, 'loader_share_of_step'):.1f} % | "
              f"{med(mode, 'train_time_s'):.1f} | {med(mode, 'wall_time_s'):.1f} | {med(mode, 'end_to_end_s'):.1f} |")
    ratio = med("ray", "images_per_s") / med("plain", "images_per_s")
    wall = med("plain", "end_to_end_s") / med("ray", "end_to_end_s")
    print(f"\nRay / plain throughput: {ratio:.2f}x (images/s); {wall:.2f}x end to end (plain time / Ray time)")


if __name__ == "__main__":
    main()
