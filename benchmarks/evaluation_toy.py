"""The toy-world experiment of docs/evaluation.md: does a synthetic set help a segmenter?

Real only (the 30 `toy:target` training images) against real + 500 pairs of each of:
- `synth-nolora`: toy-sd + the shipped segmentation ControlNet, no LoRA (jobs/generate.py);
- `synth-calora`: the same with the demo's CA-LoRA (outputs/demo/finetune: run `make demo` first);
- two control sets with exact labels (generation.write_render_shards): `oracle-target`, 500 more
  `toy:target` renders (toy:target train images 30..529: what a perfect generator would give), and
  `render-source`, 500 `toy:source` renders (exact labels, the other look).
3 seeds each, toy-fcn-r18-w16, 2000 iterations, validation every 500. Every step resumes: running
the script again after a crash (or with the generation done) redoes only what is missing.

    .venv/bin/python benchmarks/evaluation_toy.py --work /tmp/eval      # ~90 min on 2 cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# (imports below this line are deliberately late: they need the path above)
from calora_ray.generation import write_render_shards  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/evaluation_toy", help="where the sets and the result go")
    parser.add_argument("--lora", default="outputs/demo/finetune", help="the CA-LoRA (a jobs/finetune.py output)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    py = sys.executable

    def run(*cmd):
        print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
        subprocess.run([py, *map(str, cmd)], check=True, cwd=ROOT)

    generate = ["jobs/generate.py", "--model", "toy-sd", "--controlnet", "models/toy-sd-controlnet", "--masks",
                "toy:target", "--num-samples", 500, "--conditions", "clear", "--rows-per-shard", 50]
    run(*generate, "--output", work / "synth-nolora")
    run(*generate, "--lora", args.lora, "--output", work / "synth-calora")
    for name, source, start in (("oracle-target", "toy:target", 30), ("render-source", "toy:source", 0)):
        if not (work / name / "_commits").is_dir():
            write_render_shards(str(work / name), source, "train", start, 500)
    run("jobs/evaluate.py", "--real", "toy:target", "--real-images", 30, "--val", "toy:target",
        "--seeds", args.seeds, "--iters", 2000, "--val-interval", 500, "--cpus-per-trial", 1,
        "--synthetic", *(work / n for n in ("synth-nolora", "synth-calora", "oracle-target", "render-source")),
        "--output", work / "result")


if __name__ == "__main__":
    main()
