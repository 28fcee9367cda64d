"""The generate job's driver before the first shard: does its work grow with the number of masks?

jobs/generate.py's driver lists the masks and starts the run (ray_data.prepare_generate); the actors
decode and check each mask as they use it. Before that change the driver also decoded and checked
every mask itself (masks.check_masks, 8 threads) before Ray started: 1.3 ms per mask on a local disk,
~20 minutes for 1M masks with every GPU idle. This script measures both side by side on a directory
of N small Cityscapes-layout label PNGs it writes (64x128 labelIds, a few hundred bytes each), each
run a real `run_generate` (toy-sd + the shipped ControlNet, 1 step, one 1-row shard, local Ray):

  to first shard   from the call to run_generate until the first shard is committed (its commit
                   record's mtime): the driver's work, Ray's start, the actor's model load, and one
                   1-step image (~0.1 s)
  pre-Ray work     the driver's own part of that: inputs, mask listing, run start (plus, for the
                   baseline, check_masks over every mask)
  driver peak RSS  ru_maxrss of the driver process at the end, and its growth over the process
                   after its imports

Each (N, side) runs in its own subprocess, --rounds times (median reported). Ratios: 20k vs 1k
masks per side (target: flat within 20 % for the new driver), and new vs baseline at each N.

    .venv/bin/python benchmarks/generate_driver_startup.py            # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import glob, json, os, resource, sys, time
from calora_ray import ray_data
from calora_ray.config import GenerateConfig, build_config
from calora_ray.masks import check_masks
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
masks, out, side = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = build_config(GenerateConfig, {"model": "toy-sd", "controlnet": "models/toy-sd-controlnet", "masks": masks,
                                    "num_samples": 1, "rows_per_shard": 1, "steps": 1, "measure_samples": 0,
                                    "preview_samples": 1, "output": out})
prepare, timing = ray_data.prepare_generate, {}

def timed_prepare(cfg):
    t = time.perf_counter()
    plan = prepare(cfg)
    if side == "baseline":  # what the driver did before: decode and check every mask before Ray starts
        check_masks(plan["refs"], plan["checked"]["resolution"])
    timing["pre_ray_s"], timing["masks"] = time.perf_counter() - t, len(plan["refs"])
    return plan

ray_data.prepare_generate = timed_prepare
start = time.time()
ray_data.run_generate(cfg, progress=False)
first = min(os.stat(f).st_mtime for f in glob.glob(f"{out}/_commits/*.json"))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({**timing, "first_shard_s": first - start, "peak_rss_mb": rss, "rss_growth_mb": rss - rss0}))
"""


def write_masks(root: Path, n: int) -> str:
    """n labelIds PNGs in gtFine/train/<city>/ (1000 per city), all different."""
    rng = np.random.default_rng(0)
    base = np.full((64, 128), 7, np.uint8)  # road
    base[:24] = 23  # sky
    for i in range(n):
        city = root / "gtFine" / "train" / f"city{i // 1000:03d}"
        city.mkdir(parents=True, exist_ok=True)
        label = base.copy()
        x = int(rng.integers(0, 112))
        label[30:46, x:x + 16] = 26  # a car somewhere
        Image.fromarray(label).save(city / f"c{i // 1000:03d}_{i:06d}_000019_gtFine_labelIds.png")
    return str(root)


def run(masks: str, out: str, side: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, masks, out, side], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            masks = write_masks(Path(tmp) / f"masks{n}", n)
            for k in range(args.rounds):
                for side in (("new", "baseline") if k % 2 == 0 else ("baseline", "new")):
                    rec = run(masks, f"{tmp}/out-{n}-{side}-{k}", side)
                    assert rec["masks"] == n, rec
                    results.setdefault((n, side), []).append(rec)
                    print(f"{n} masks, {side}: first shard {rec['first_shard_s']:.2f} s, pre-Ray {rec['pre_ray_s']:.2f} s, "
                          f"peak RSS {rec['peak_rss_mb']:.0f} MB",
                          file=sys.stderr, flush=True)

    def med(n, side, key):
        return statistics.median(r[key] for r in results[(n, side)])

    print(f"\n{args.rounds} round(s) per cell, medians\n")
    print("| masks | driver | time to the first shard (s) | of which pre-Ray driver work (s) | driver peak RSS (MB) | "
          "RSS growth after imports (MB) |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        for side, name in (("new", "lists only (actors check)"), ("baseline", "checks every mask first (before)")):
            print(f"| {n} | {name} | {med(n, side, 'first_shard_s'):.2f} | {med(n, side, 'pre_ray_s'):.2f} | "
                  f"{med(n, side, 'peak_rss_mb'):.0f} | {med(n, side, 'rss_growth_mb'):.0f} |")
    lo, hi = args.sizes[0], args.sizes[-1]
    for side in ("new", "baseline"):
        print(f"\n{side}, {hi} / {lo} masks: time to the first shard "
              f"{med(hi, side, 'first_shard_s') / med(lo, side, 'first_shard_s'):.2f}x, pre-Ray work "
              f"{med(hi, side, 'pre_ray_s') / med(lo, side, 'pre_ray_s'):.2f}x, peak RSS "
              f"{med(hi, side, 'peak_rss_mb') / med(lo, side, 'peak_rss_mb'):.2f}x")
    for n in args.sizes:
        print(f"at {n} masks: baseline / new time to the first shard "
              f"{med(n, 'baseline', 'first_shard_s') / med(n, 'new', 'first_shard_s'):.2f}x")


if __name__ == "__main__":
    main()
