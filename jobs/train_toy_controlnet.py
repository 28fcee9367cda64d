"""Train the segmentation ControlNet that ships with toy-sd (models/toy-sd-controlnet).

    python jobs/train_toy_controlnet.py --device cuda --steps 2000 --output models/toy-sd-controlnet
    python jobs/train_toy_controlnet.py --init models/toy-sd-controlnet --threads 1 ...   # continue it

Like the public SD-1.5 segmentation ControlNets users download rather than train, toy-sd comes
with one, so the demo and the tests need no long ControlNet training. It is the ControlNet of
jobs/train_controlnet.py (calora_ray.training.controlnet_task on the same training loop) trained
on the pretraining world's first-person renders, each with its own caption (style and condition
vary), in one process (no Ray: it runs where Ray is not installed, e.g. a bare GPU box).
Writes a diffusers ControlNetModel directory plus loss.csv / loss.png and controlnet.json (which,
after --init, embeds the record of the run it continued: the model card lists every stage).
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from calora_ray.config import TrainingConfig, build_config
from calora_ray.controlnet import CONTROLNET_FILES, load_controlnet
from calora_ray.datasets import open_dataset
from calora_ray.models import load_components
from calora_ray.toyworld.world import first_person_indices
from calora_ray.training import controlnet_task, train, write_loss_files


def _render(args: tuple[int, int, int]) -> dict:
    num_images, resolution, index = args
    return open_dataset("toy:world", split="train", num_images=num_images, resolution=resolution)[index]


def first_person_world(num_images: int, resolution: int) -> list[dict]:
    """The first-person renders among the first `num_images` of toy:world's train split (about
    half), rendered once up front (the training loop would otherwise render every batch again),
    on every core (a GPU box has many)."""
    import multiprocessing

    from tqdm.auto import tqdm

    jobs = [(num_images, resolution, i) for i in first_person_indices("train", num_images)]
    with multiprocessing.get_context("spawn").Pool(max(1, min(16, os.cpu_count() or 1))) as pool:
        return list(tqdm(pool.imap(_render, jobs, chunksize=64), total=len(jobs), desc="render",
                         file=sys.stderr, mininterval=5))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--output", default="models/toy-sd-controlnet")
    parser.add_argument("--num-images", type=int, default=8000, help="toy:world train renders to draw from")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--init", default=None, help="continue from this ControlNet directory's weights "
                        "(a new optimizer and schedule)")
    parser.add_argument("--timesteps", default="cubic", choices=("uniform", "cubic"),
                        help="how training draws timesteps (calora_ray.losses.sample_timesteps)")
    parser.add_argument("--proportion-empty-prompts", type=float, default=0.0,
                        help="share of training pairs with the empty prompt (ControlNet paper: 0.5)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="also save the ControlNet every N steps under OUTPUT/checkpoint-N (0: only at the end)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is robust on a busy machine)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    components = load_components(args.model)
    components.to(device)
    resolution = components.unet.config.sample_size * components.vae_scale_factor
    t0 = time.perf_counter()
    dataset = first_person_world(args.num_images, resolution)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = controlnet_task(components, caption=None, seed=args.seed, timesteps=args.timesteps,
                           proportion_empty_prompts=args.proportion_empty_prompts)
    if args.init:
        task.module.load_state_dict(load_controlnet(args.init, "--init").state_dict())
    tc = build_config(TrainingConfig, {"steps": args.steps, "batch_size": args.batch_size,
                                       "learning_rate": args.learning_rate, "seed": args.seed,
                                       "lr_warmup_steps": 100, "log_every": 25,
                                       "checkpoint_every": args.checkpoint_every or args.steps})
    out = Path(args.output)

    def keep_checkpoint(metrics: dict, directory: Path | None) -> None:
        if directory is not None and metrics["step"] < args.steps:
            target = out / f"checkpoint-{metrics['step']}"
            target.mkdir(parents=True, exist_ok=True)
            for name in CONTROLNET_FILES:
                shutil.copyfile(directory / name, target / name)

    history = train(task, dataset, tc, device=device, report=keep_checkpoint)
    elapsed = time.perf_counter() - t0
    task.module.to("cpu")
    task.save_final(out)
    write_loss_files(out, history, "toy-sd segmentation ControlNet")
    (out / "controlnet.json").write_text(json.dumps({
        "base_model": args.model, "data": "toy:world train, first-person renders with their captions",
        "training_images": len(dataset), "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "timesteps": args.timesteps,
        "proportion_empty_prompts": args.proportion_empty_prompts, "seed": args.seed, "device": args.device, "init": args.init,
        "init_record": json.loads((Path(args.init) / "controlnet.json").read_text()) if args.init else None,
        "wall_s": round(elapsed, 1), "final_loss": sum(h["loss"] for h in history[-20:]) / len(history[-20:]),
        "command": shlex.join(["python", "jobs/train_toy_controlnet.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch_version": torch.__version__}, indent=2) + "\n")
    print(f"controlnet: {out}")


if __name__ == "__main__":
    main()
