"""P3: the generate job (Ray Data actor pool -> Parquet shards) against a bare single-process loop
writing the same shards, at N and 10·N samples; peak memory; files and scan speed of the output.

    .venv/bin/python benchmarks/p3_generation.py                 # N = 40 and 400, tiny, 10 steps
    .venv/bin/python benchmarks/p3_generation.py --quick         # smoke run

Both sides use the tiny model, a random segmentation ControlNet (from_unet, zero convolutions
made non-zero), toy masks, the same steps, resolution, batch size, shard size and torch threads
(one actor with --threads CPUs against one process with --threads threads). Each (mode, N) runs
in a fresh subprocess, so each peak RSS is its own. The timed span is the same on both sides:
model load -> last shard committed (the Ray side also starts its actor inside it; ray.init is
outside). The bare loop writes byte-identical shards (checked by sha256). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def make_controlnet(path: Path) -> None:
    import torch
    from diffusers import ControlNetModel

    from calora_ray.controlnet import conditioning_channels
    from calora_ray.models import build_tiny

    torch.manual_seed(0)  # before from_unet: its conditioning embedding draws from the global generator
    controlnet = ControlNetModel.from_unet(build_tiny(0).unet, conditioning_embedding_out_channels=conditioning_channels(4))
    with torch.no_grad():
        for m in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            m.weight.normal_(0, 0.05)
    controlnet.save_pretrained(path)


def config(args, controlnet: Path, output: Path, num_samples: int):
    from calora_ray.config import GenerateConfig, build_config

    return build_config(GenerateConfig, {
        "model": "tiny", "controlnet": str(controlnet), "masks": "toy", "num_samples": num_samples,
        "steps": args.steps, "batch_size": args.batch_size, "rows_per_shard": args.rows_per_shard,
        "num_actors": 1, "cpus_per_actor": args.threads, "output": str(output), "preview_samples": 4})


def child(args) -> None:
    """One measured run; prints one JSON line."""
    import torch

    from calora_ray.shards import ShardStore, shard_ranges

    torch.set_num_threads(args.threads)
    cfg = config(args, Path(args.controlnet), Path(args.output), args.num_samples)
    if args.child == "ray":
        import ray

        from calora_ray.ray_data import run_generate

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        start = time.perf_counter()
        summary = run_generate(cfg, progress=False)
        elapsed = time.perf_counter() - start
        actor_rss = summary["actor_peak_rss_mb"]
        ray.shutdown()
    else:
        from calora_ray.masks import check_masks, list_masks
        from calora_ray.generation import ShardGenerator

        masks, _ = check_masks(list_masks("toy", "train", None, 64), 64)
        store = ShardStore(args.output)
        store.prepare({"bare": True}, overwrite=True)
        start = time.perf_counter()
        generator = ShardGenerator(cfg, masks, 64, threads=args.threads)
        for k in range(len(shard_ranges(cfg.num_samples, cfg.rows_per_shard))):
            generator.make_shard(k)
        elapsed = time.perf_counter() - start
        actor_rss = None
    store = ShardStore(args.output)
    records = sorted(store.completed().values(), key=lambda r: r["shard"])
    print(json.dumps({"mode": args.child, "num_samples": args.num_samples, "elapsed_s": elapsed,
                      "images_per_s": args.num_samples / elapsed,
                      "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "actor_peak_rss_mb": actor_rss, "files": len(records),
                      "bytes": sum(r["bytes"] for r in records), "sha256": [r["sha256"] for r in records]}))


def scan(data_dir: Path, repeats: int = 5) -> dict:
    """pyarrow scan of the shards: every column, and the metadata columns only (median of repeats)."""
    import statistics

    import pyarrow.parquet as pq

    out = {}
    for name, columns in (("all columns", None), ("sample_id, condition, class_pixels", ["sample_id", "condition",
                                                                                          "class_pixels"])):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            table = pq.read_table(data_dir, columns=columns)
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        out[name] = {"rows": table.num_rows, "s": t, "rows_per_s": table.num_rows / t, "mb_per_s": table.nbytes / t / 2**20}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=40, help="N (the second run has --scale x N)")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (= the actor's CPUs)")
    parser.add_argument("--quick", action="store_true", help="N = 8, scale 2, 2 steps")
    parser.add_argument("--child", choices=("ray", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--controlnet", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.quick:
        args.num_samples, args.scale, args.steps = 8, 2, 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, print_table

    work = Path(tempfile.mkdtemp(prefix="p3-"))
    make_controlnet(work / "controlnet")
    results = []
    for n in (args.num_samples, args.num_samples * args.scale):
        for mode in ("ray", "bare"):
            cmd = [sys.executable, __file__, "--child", mode, "--controlnet", str(work / "controlnet"),
                   "--output", str(work / f"{mode}-{n}"), "--num-samples", str(n), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--rows-per-shard", str(args.rows_per_shard),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{mode} N={n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results.append(json.loads(lines[-1]))
            print(f"# {mode} N={n}: {results[-1]['images_per_s']:.2f} images/s", file=sys.stderr)

    print(f"machine: {machine()}; tiny model, {args.steps} DDIM steps (CFG), 64x64, batch {args.batch_size}, "
          f"{args.rows_per_shard} rows per shard, {args.threads} torch thread(s)\n")
    rows = []
    for n in (args.num_samples, args.num_samples * args.scale):
        ray_r = next(r for r in results if r["mode"] == "ray" and r["num_samples"] == n)
        bare = next(r for r in results if r["mode"] == "bare" and r["num_samples"] == n)
        rows.append([n, f"{ray_r['images_per_s']:.2f}", f"{bare['images_per_s']:.2f}",
                     f"{ray_r['images_per_s'] / bare['images_per_s']:.2f}x",
                     f"{ray_r['driver_peak_rss_mb']:.0f}", f"{ray_r['actor_peak_rss_mb']:.0f}",
                     f"{bare['driver_peak_rss_mb']:.0f}", ray_r["files"],
                     "yes" if ray_r["sha256"] == bare["sha256"] else "NO"])
    print_table(["N", "Ray Data job (img/s)", "bare loop (img/s)", "ratio", "Ray driver peak RSS (MB)",
                 "Ray actor peak RSS (MB)", "bare peak RSS (MB)", "shards", "identical shards"], rows)
    big = args.num_samples * args.scale
    per_file = next(r for r in results if r["mode"] == "ray" and r["num_samples"] == big)
    print(f"\nfiles per 10k samples: {-(-10_000 // args.rows_per_shard)} (--rows-per-shard {args.rows_per_shard}; "
          f"{per_file['bytes'] / big / 1024:.1f} KiB per 64x64 sample)\n")
    scan_rows = [[name, s["rows"], f"{s['s'] * 1000:.1f}", f"{s['rows_per_s']:.0f}", f"{s['mb_per_s']:.0f}"]
                 for name, s in scan(work / f"ray-{big}" / "data").items()]
    print_table(["pyarrow.parquet.read_table of data/", "rows", "ms", "rows/s", "MB/s (decoded Arrow)"], scan_rows)


if __name__ == "__main__":
    main()
