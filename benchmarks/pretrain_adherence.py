"""Pretraining time against prompt adherence: how soon does a toy-sd recipe learn its concepts?

    python benchmarks/pretrain_adherence.py --unet-steps 250 1000 2500 --output /tmp/pretrain_adherence
    python benchmarks/pretrain_adherence.py --device cuda ...      # the same draws, on a GPU

Trains jobs/configs/toy-sd.yaml's recipe (override any of its flags after --) in one run directory,
stopping at each UNet budget in turn (each stop continues the same run from its checkpoint), and
after each stop samples every style x viewpoint x condition prompt (DDIM 25 steps,
guidance 4; --samples-per-prompt each) and measures them with the toy-world probe (calora_ray.measure.measure_model). Prints
one row per budget: training minutes (VAE + UNet, on this device), the same steps' time on 2 idle CPU
cores (from the step times measured there), and adherence per attribute. A faster recipe is one
whose row reaches >= 0.9 sooner.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from calora_ray.config import PretrainConfig, parse_config
from calora_ray.measure import measure_model
from calora_ray.toyworld.pretrain import pretrain_toy_sd

ROOT = Path(__file__).resolve().parents[1]
CPU_STEP_S = {"vae": 0.76, "unet": 1.06}   # 2 idle cores, committed batch sizes (jobs/configs/toy-sd.yaml)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-steps", type=int, nargs="+", default=[250, 1000, 2500])
    parser.add_argument("--output", default="/tmp/pretrain_adherence")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="images per prompt (20 prompts)")
    parser.add_argument("--probe", default=None, help="probe directory (default: the venv's cache)")
    parser.add_argument("--report", default=None, help="where to write the rows (default: OUTPUT/pretrain_adherence.json)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for budget in sorted(args.unet_steps):
        cfg = parse_config(PretrainConfig, ["--config", str(ROOT / "jobs" / "configs" / "toy-sd.yaml"),
                                            "--output", str(out / "model"), "--unet-steps", str(budget),
                                            "--device", args.device, "--sample-images", "1",
                                            "--sample-steps", "5", *extra], job="pretrain_toy")
        model = pretrain_toy_sd(cfg)
        record = json.loads((model / "pretrain.json").read_text())
        report = measure_model(str(model), str(out / f"samples-{budget}"), num_images=args.samples_per_prompt,
                               probe=args.probe, train_data=None)
        adh = {k: v["adherence"] for k, v in report["prompt_adherence"].items()}
        steps = record["steps"]
        rows.append({"unet_steps": budget, "vae_steps": steps["vae"],
                     "train_min": round((record["wall_s"]["vae"] + record["wall_s"]["unet"]) / 60, 2),
                     "cpu_equivalent_min": round((steps["vae"] * CPU_STEP_S["vae"] + steps["unet"] * CPU_STEP_S["unet"]) / 60, 1),
                     "device": record.get("device"), "adherence": adh,
                     "kernel_mmd2_to_world": report["domain_alignment"]["kernel_mmd2"],
                     "unet_final_loss": record["final_loss"]["unet"]})
        Path(args.report or out / "pretrain_adherence.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"unet {budget:>5} steps  train {rows[-1]['train_min']:6.2f} min ({args.device})  "
              f"~{rows[-1]['cpu_equivalent_min']:5.1f} min on 2 CPU cores  adherence "
              + "  ".join(f"{k} {v:.3f}" for k, v in adh.items())
              + f"  MMD^2 {rows[-1]['kernel_mmd2_to_world']:.4f}", flush=True)


if __name__ == "__main__":
    main()
