"""One training loop for every fine-tuning (LoRA here; the segmentation ControlNet reuses it).

- `TrainingTask`: what is trained — the trainable parameters, the loss of a batch, and how to
  save them. `lora_task` builds the CA-LoRA one; a ControlNet task is a second small builder.
- `train`: the loop (plain torch). Sharded data, gradient accumulation, LoRA-only gradient
  all-reduce, mixed precision on CUDA, a learning-rate schedule, checkpoints, logs, validation.
  In a single process it is an ordinary function; under Ray Train the same function runs in
  every worker and hands its checkpoints to `report`.
- `finetune_worker` / `run_finetune`: the Ray Train adapter and the jobs/finetune.py driver.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import FinetuneConfig, TrainingConfig, to_dict
from .distributed import all_reduce_gradients, all_reduce_sum, rank_and_world
from .losses import diffusion_loss, diffusion_target, noisy_latents, sample_timesteps
from .lora import LORA_WEIGHT_NAME, attach_lora, check_modules, file_sha256, read_selection, save_lora
from .models import Components, encode_images, encode_prompts, load_components, resolve_dtype
from .outputs import atomic_write_text, prepare_run_dir
from .plots import plot_loss
from .sensitivity import find_candidates

STATE_FILE = "training_state.pt"


# ----------------------------------------------------------------------------- the task


@dataclass
class TrainingTask:
    """What the loop trains: two model setups (LoRA, ControlNet) share one loop."""

    components: Components
    params: list[nn.Parameter]  # the trainable ones (fp32)
    module: nn.Module  # put in train()/eval() mode around steps and validation
    compute_loss: Callable[[list[dict], torch.Generator], torch.Tensor]  # batch items -> loss
    state_dict: Callable[[], dict[str, torch.Tensor]]  # trainable weights, for checkpoints
    load_state_dict: Callable[[dict[str, torch.Tensor]], None]
    save_final: Callable[[Path], Path]  # the user-facing artefact (diffusers format)


def captions_for(labels: list[np.ndarray], caption: str, with_classes: bool) -> list[str]:
    """The training caption of each image: the base prompt, optionally ' with {classes present}'."""
    if not with_classes:
        return [caption] * len(labels)
    from .data.labels import class_names_present

    from .concepts import join_class_names

    out = []
    for label in labels:
        names = class_names_present(label)
        out.append(f"{caption} with {join_class_names(names)}" if names else caption)
    return out


def diffusion_step_loss(components: Components, latents: torch.Tensor, cond: dict,
                        generator: torch.Generator, control: Callable | None = None,
                        timesteps: str = "uniform") -> torch.Tensor:
    """L_diff on a batch: random timesteps and noise (from `generator`), x_t, UNet, MSE to the target.

    latents: (B, C, h, w) clean x_0; cond: UNet conditioning kwargs with B rows.
    control: optional (x_t, t) -> extra UNet kwargs (a ControlNet's residuals).
    timesteps: how t is drawn (losses.sample_timesteps: "uniform" or "cubic").
    """
    scheduler = components.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = sample_timesteps(latents.shape[0], scheduler.config.num_train_timesteps, generator, timesteps)
    t = t.to(latents.device)
    noisy = noisy_latents(scheduler, latents, noise, t)
    extra = control(noisy, t) if control is not None else {}
    pred = components.unet(noisy, t, **cond, **extra).sample
    return diffusion_loss(pred, diffusion_target(scheduler, latents, noise, t))


def _stack_cond(conds: list[dict]) -> dict:
    out = {"encoder_hidden_states": torch.cat([c["encoder_hidden_states"] for c in conds])}
    if "added_cond_kwargs" in conds[0]:
        out["added_cond_kwargs"] = {k: torch.cat([c["added_cond_kwargs"][k] for c in conds])
                                    for k in conds[0]["added_cond_kwargs"]}
    return out


def lora_task(components: Components, modules: list[str], rank: int, alpha: float, *, caption: str,
              caption_with_classes: bool = False, seed: int = 0, gradient_checkpointing: bool = False) -> TrainingTask:
    """CA-LoRA: adapters on exactly `modules` of the frozen UNet, trained with L_diff on captioned images."""
    unet = components.unet
    torch.manual_seed(seed)  # peft draws the LoRA init from the global generator: same on every worker
    attach_lora(unet, modules, rank, alpha)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    cache: dict[str, dict] = {}

    def compute_loss(items: list[dict], generator: torch.Generator) -> torch.Tensor:
        size = items[0]["image"].shape[0]
        prompts = captions_for([it["label"] for it in items], caption, caption_with_classes)
        for p in set(prompts) - cache.keys():
            cache[p] = encode_prompts(components, [p], size, size)
        latents = encode_images(components, np.stack([it["image"] for it in items]), generator)
        return diffusion_step_loss(components, latents, _stack_cond([cache[p] for p in prompts]), generator)

    def state_dict():
        return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}

    def load_state_dict(state):
        params = dict(unet.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    return TrainingTask(components=components, params=[p for p in unet.parameters() if p.requires_grad],
                        module=unet, compute_loss=compute_loss, state_dict=state_dict,
                        load_state_dict=load_state_dict, save_final=lambda d: save_lora(components, unet, d))


def controlnet_task(components: Components, *, lora: str | None = None, caption: str | None,
                    caption_with_classes: bool = True, seed: int = 0, timesteps: str = "cubic",
                    proportion_empty_prompts: float = 0.0, gradient_checkpointing: bool = False) -> TrainingTask:
    """A segmentation ControlNet, initialised from the base UNet (diffusers' ControlNetModel.from_unet),
    trained with L_diff to steer the frozen UNet — with the CA-LoRA adapter `lora` applied — from
    the colour-coded label map (Cityscapes palette, at the label's own size: never interpolated).
    timesteps: "cubic" (default) draws most training steps at high noise, where the layout of a
    sample is decided; "uniform" as in the original ControlNet recipe (losses.sample_timesteps).
    proportion_empty_prompts: train this share of the pairs with the empty prompt (the ControlNet
    paper uses 0.5): the mask is then the only clue, and classifier-free guidance's unconditional
    branch, which also runs the ControlNet, sees what it was trained on.
    """
    from diffusers import ControlNetModel

    from .generation import conditioning_channels, control_tensor

    unet = components.unet
    torch.manual_seed(seed)  # the zero convolutions are zero; the conditioning embedding draws from here
    # From the base UNet, before the adapter: the ControlNet copies plain encoder weights.
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels(components.vae_scale_factor))
    controlnet.to(device=unet.device, dtype=torch.float32)
    if lora is not None:
        components.pipeline().load_lora_weights(str(lora))  # patches the shared UNet in place
    unet.requires_grad_(False)
    controlnet.requires_grad_(True)
    if gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    cache: dict[str, dict] = {}

    def compute_loss(items: list[dict], generator: torch.Generator) -> torch.Tensor:
        size = items[0]["image"].shape[0]
        labels = [it["label"] for it in items]
        # caption None: each item's own caption (the toy world's renders carry one)
        prompts = ([it["caption"] for it in items] if caption is None
                   else captions_for(labels, caption, caption_with_classes))
        if proportion_empty_prompts > 0:
            drop = torch.rand((len(prompts),), generator=generator) < proportion_empty_prompts
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        for p in set(prompts) - cache.keys():
            cache[p] = encode_prompts(components, [p], size, size)
        cond = _stack_cond([cache[p] for p in prompts])
        latents = encode_images(components, np.stack([it["image"] for it in items]), generator)
        control_image = control_tensor(labels, unet.device)

        def control(noisy, t):
            down, mid = controlnet(noisy.float(), t, encoder_hidden_states=cond["encoder_hidden_states"].float(),
                                   controlnet_cond=control_image, return_dict=False)
            return {"down_block_additional_residuals": [d.to(noisy.dtype) for d in down],
                    "mid_block_additional_residual": mid.to(noisy.dtype)}

        return diffusion_step_loss(components, latents, cond, generator, control, timesteps=timesteps)

    def state_dict():
        return {k: v.detach().cpu().clone() for k, v in controlnet.state_dict().items()}

    def save_final(directory: Path) -> Path:
        controlnet.save_pretrained(str(directory))
        return Path(directory)

    return TrainingTask(components=components, params=[p for p in controlnet.parameters() if p.requires_grad],
                        module=controlnet, compute_loss=compute_loss, state_dict=state_dict,
                        load_state_dict=controlnet.load_state_dict, save_final=save_final)


# ----------------------------------------------------------------------------- the loop


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """All randomness of one step of one stream (a worker's rank, or a training phase): resuming
    at step N replays steps N+1... exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_003 + step) % (2**63))


def save_checkpoint(directory: Path, task: TrainingTask, optimizer, lr_scheduler, step: int,
                    history: list[dict], seed: int) -> None:
    """Trainable weights + optimizer + schedule + step + loss history (+ the final artefact format,
    so any checkpoint directory also loads into a stock pipeline)."""
    torch.save({"step": step, "weights": task.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "history": history,
                # every draw of step s on rank r comes from step_generator(seed, r, s): the seed is
                # the whole RNG state a resume needs.
                "rng": {"scheme": "step_generator(seed, rank, step)", "seed": seed}},
               directory / STATE_FILE)
    task.save_final(directory)


def _log(message: str) -> None:
    # Not print(): Ray Train patches print() in workers to also log it, and each line shows twice.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def train(task: TrainingTask, dataset, tc: TrainingConfig, *, device: torch.device,
          mixed_precision: str = "no", resume_from: Path | None = None,
          report: Callable[[dict, Path | None], None] | None = None, log_dir: Path | None = None,
          quiet: bool = False) -> list[dict]:
    """Train `task` for `tc.steps` optimizer steps; returns the loss history [{step, loss, lr}].

    Each worker (rank r of W, from torch.distributed) draws batches from its shard
    dataset[r::W]; the LoRA gradients are averaged across workers before every optimizer step.
    Every `checkpoint_every` steps and at the end, all workers call `report(metrics, dir)` (rank 0
    with a checkpoint directory, the others with None), as ray.train.report requires.
    """
    from diffusers.optimization import get_scheduler

    rank, world = rank_and_world()
    optimizer = torch.optim.AdamW(task.params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps,
                                 num_training_steps=tc.steps)
    start, history = 0, []
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
        task.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        start, history = state["step"], state["history"]
        if rank == 0 and not quiet:
            _log(f"resumed from step {start} ({resume_from.name})")
    shard = list(range(rank, len(dataset), world)) or list(range(len(dataset)))
    use_amp = device.type == "cuda" and mixed_precision != "no"
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    writer = None
    if rank == 0 and tc.report_to == "tensorboard" and log_dir is not None:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    images_per_step = tc.batch_size * tc.gradient_accumulation_steps * world
    started, started_step = time.perf_counter(), start
    task.module.train()
    for step in range(start + 1, tc.steps + 1):
        generator = step_generator(tc.seed, rank, step)
        step_loss = torch.zeros((), device=device)
        for _ in range(tc.gradient_accumulation_steps):
            picks = torch.randint(0, len(shard), (tc.batch_size,), generator=generator).tolist()
            items = [dataset[shard[i]] for i in picks]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = task.compute_loss(items, generator) / tc.gradient_accumulation_steps
            scaler.scale(loss).backward()
            step_loss += loss.detach().float()
        if tc.simulate_failure_at_step == step and resume_from is None and rank == world - 1:
            raise RuntimeError(f"simulated worker failure at step {step} (--simulate-failure-at-step)")
        scaler.unscale_(optimizer)
        all_reduce_gradients(task.params)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = float(all_reduce_sum(step_loss.reshape(1)).item() / world)
        lr = lr_scheduler.get_last_lr()[0]
        if step % tc.log_every == 0 or step in (1, tc.steps):
            elapsed = time.perf_counter() - started
            history.append({"step": step, "loss": mean_loss, "lr": lr, "elapsed_s": round(elapsed, 4)})
            rate = (step - started_step) / elapsed if elapsed > 0 else 0.0
            if rank == 0 and not quiet:
                eta = (tc.steps - step) / rate if rate > 0 else float("nan")
                _log(f"step {step}/{tc.steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                     f"{rate * images_per_step:.1f} img/s  ETA {eta:.0f} s")
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/images_per_s", rate * images_per_step, step)
        if rank == 0 and log_dir is not None and tc.validation_every and step % tc.validation_every == 0:
            validate(task, tc, step, log_dir, writer)
        if report is not None and (step % tc.checkpoint_every == 0 or step == tc.steps):
            with tempfile.TemporaryDirectory(prefix="calora-ckpt-") as tmp:
                if rank == 0:
                    save_checkpoint(Path(tmp), task, optimizer, lr_scheduler, step, history, tc.seed)
                report({"step": step, "loss": mean_loss}, Path(tmp) if rank == 0 else None)
    task.module.eval()
    if writer is not None:
        writer.close()
    return history


@torch.no_grad()
def validate(task: TrainingTask, tc: TrainingConfig, step: int, log_dir: Path, writer=None) -> Path:
    """Sample the validation prompts with the current weights; a labelled grid PNG under log_dir."""
    from .sampling import image_grid, sample_images

    task.module.eval()
    size = task.components.unet.config.sample_size * task.components.vae_scale_factor
    rows = sample_images(task.components, tc.validation_prompts, 1, tc.seed, tc.validation_steps, 7.5, size)
    task.module.train()
    grid = image_grid(rows, [f"step {step}: {p}" for p in tc.validation_prompts])
    out = log_dir / "validation" / f"step_{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    if writer is not None:
        writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return out


# ----------------------------------------------------------------------------- Ray Train + the job


def run_worker(cfg, build_task: Callable[[Components], TrainingTask]) -> None:
    """The body of every Ray Train training worker: load the model on this worker's device, build
    the task, open the data, and run the shared `train` loop from the latest checkpoint."""
    from .cli import quiet_libraries
    from .data import open_dataset
    from .distributed import ray_latest_checkpoint, ray_report, set_worker_threads, worker_device

    quiet_libraries()
    set_worker_threads()
    device = worker_device()
    components = load_components(cfg.model, cfg.model_seed)
    components.to(device, resolve_dtype(cfg.mixed_precision, device))
    task = build_task(components)
    dataset = open_dataset(cfg.data, split=cfg.split, num_images=cfg.num_images,
                           resolution=cfg.resolution, seed=0)
    resume_from = ray_latest_checkpoint()
    try:
        train(task, dataset, cfg, device=device, mixed_precision=cfg.mixed_precision,
              resume_from=resume_from, report=ray_report, log_dir=Path(cfg.output) / "logs")
    finally:
        if resume_from is not None:
            shutil.rmtree(resume_from, ignore_errors=True)


def finetune_worker(config: dict) -> None:
    """One Ray Train worker of jobs/finetune.py: the same `train` as the single-process path."""
    cfg: FinetuneConfig = config["cfg"]
    run_worker(cfg, lambda components: lora_task(
        components, config["modules"], cfg.rank, cfg.lora_alpha, caption=cfg.caption,
        caption_with_classes=cfg.caption_with_classes, seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing))


# What defines a run: a rerun with the same output resumes only if these agree.
RUN_IDENTITY = ("model", "model_seed", "data", "split", "num_images", "resolution", "rank", "alpha", "caption",
                "caption_with_classes", "seed", "batch_size", "gradient_accumulation_steps", "learning_rate",
                "weight_decay", "lr_scheduler", "lr_warmup_steps")


def run_training_job(cfg, identity: dict, worker_fn, worker_config: dict, what: str):
    """The Ray Train part of a training job's driver (fine-tuning, ControlNet): the run directory
    (cfg.output; resume if `identity` matches), the checkpoint storage, the trainer. Returns
    (the ray Result, the run's storage URI); raises what the workers raised."""
    from .distributed import check_storage_path, delete_run, run_trainer

    output = Path(cfg.output)
    if cfg.storage_path:
        storage = check_storage_path(cfg.storage_path)
        name = f"{output.name}-{hashlib.sha1(str(output).encode()).hexdigest()[:8]}"
        if cfg.overwrite:  # starting over means the old checkpoints too, wherever they are
            delete_run(storage, name)
    else:
        storage, name = None, "ray_train"
    prepare_run_dir(output, identity, cfg.overwrite, what)
    storage = storage or check_storage_path(str(output))
    result = run_trainer(worker_fn, worker_config, name=name, storage_path=storage,
                         num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                         resource_wait_s=cfg.resource_wait_s)
    if result.error is not None:
        raise result.error
    return result, f"{storage.rstrip('/')}/{name}"


def run_finetune(cfg: FinetuneConfig) -> Path:
    """jobs/finetune.py: check inputs, train on Ray Train workers, write the adapter and reports.

    The selection, data, model and storage are checked before Ray starts, so bad input leaves
    nothing behind. The output directory is also the run directory: running the same command
    again resumes from the latest checkpoint.
    """
    from .data import open_dataset
    from .models import load_unet_skeleton

    cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).expanduser().resolve()))
    output = Path(cfg.output)
    selection = None if cfg.selection == "all" else read_selection(cfg.selection)
    dataset = open_dataset(cfg.data, split=cfg.split, num_images=cfg.num_images,
                           resolution=cfg.resolution, seed=0)
    for i in range(len(dataset)):  # every pair once: a bad label fails now, naming its file
        dataset[i]
    candidates = find_candidates(load_unet_skeleton(cfg.model, cfg.model_seed))
    modules = list(candidates) if selection is None else selection
    check_modules(modules, candidates, f"--selection {cfg.selection}")
    identity = {k: v for k, v in to_dict(cfg).items() if k in RUN_IDENTITY} | {"modules": modules}
    started = time.perf_counter()
    result, run = run_training_job(cfg, identity, finetune_worker, {"cfg": cfg, "modules": modules},
                                   "calora_ray fine-tuning")
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        write_finetune_outputs(cfg, ckpt / LORA_WEIGHT_NAME, state, modules, len(candidates), len(dataset),
                               run=run, elapsed=time.perf_counter() - started)
    return output


def write_loss_files(output: Path, history: list[dict], title: str) -> None:
    """loss.csv and loss.png of a training history, each written into place atomically."""
    with open(output / ".loss.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "elapsed_s"])
        w.writeheader()
        w.writerows(history)
    (output / ".loss.csv.tmp").replace(output / "loss.csv")
    plot_loss([h["step"] for h in history], [h["loss"] for h in history], output / ".loss.tmp.png", title=title)
    (output / ".loss.tmp.png").replace(output / "loss.png")


def write_finetune_outputs(cfg: FinetuneConfig, weights: Path, state: dict, modules: list[str],
                           num_candidates: int, num_images: int, run: str, elapsed: float) -> None:
    """The adapter, loss.csv, loss.png and finetune.json, each written into place atomically."""
    output = Path(cfg.output)
    tmp = output / f".{LORA_WEIGHT_NAME}.tmp"
    shutil.copyfile(weights, tmp)
    tmp.replace(output / LORA_WEIGHT_NAME)
    history = state["history"]
    write_loss_files(output, history, f"LoRA on {len(modules)} projections of {cfg.model}, data {cfg.data}")
    from safetensors import safe_open

    with safe_open(str(output / LORA_WEIGHT_NAME), "pt") as f:
        lora_params = sum(f.get_tensor(k).numel() for k in f.keys())
        lora_modules = sorted({k.removeprefix("unet.").rsplit(".lora.", 1)[0] for k in f.keys()})
    atomic_write_text(output / "finetune.json", json.dumps({
        "lora": LORA_WEIGHT_NAME,
        "lora_sha256": file_sha256(output / LORA_WEIGHT_NAME),
        "selection": cfg.selection,
        "modules": modules,
        "lora_modules": lora_modules,
        "num_modules": len(modules),
        "num_candidates": num_candidates,
        "rank": cfg.rank,
        "alpha": cfg.lora_alpha,
        "trainable_params": lora_params,
        "steps": state["step"],
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_workers": cfg.num_workers,
        "num_images": num_images,
        "final_loss": history[-1]["loss"],
        "run": run,
        "elapsed_s": round(elapsed, 3),
        "calora_ray_version": __version__,
        "config": to_dict(cfg),
    }, indent=2, default=str) + "\n")



# ----------------------------------------------------------------------------- the ControlNet job

CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# run_train_controlnet adds the LoRA's sha256 to these.
CONTROLNET_IDENTITY = tuple(k for k in RUN_IDENTITY if k not in ("rank", "alpha")) + (
    "timesteps", "proportion_empty_prompts")


def controlnet_worker(config: dict) -> None:
    """One Ray Train worker of jobs/train_controlnet.py: the same `train` loop as fine-tuning."""
    cfg = config["cfg"]
    run_worker(cfg, lambda components: controlnet_task(
        components, lora=cfg.lora, caption=cfg.caption, caption_with_classes=cfg.caption_with_classes,
        seed=cfg.seed, timesteps=cfg.timesteps,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
        gradient_checkpointing=cfg.gradient_checkpointing))


def run_train_controlnet(cfg) -> Path:
    """jobs/train_controlnet.py: check inputs, train the ControlNet on Ray Train workers (checkpoints,
    resume: as fine-tuning), then write it in the diffusers format + controlnet.json + loss files."""
    from .data import open_dataset
    from .models import load_unet_skeleton

    cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).expanduser().resolve()))
    output = Path(cfg.output)
    lora_sha = None
    if cfg.lora is not None:
        lora_file = Path(cfg.lora) / LORA_WEIGHT_NAME
        if not lora_file.is_file():
            raise FileNotFoundError(f"--lora {cfg.lora}: no {LORA_WEIGHT_NAME} there (pass a jobs/finetune.py output)")
        cfg = dataclasses.replace(cfg, lora=str(Path(cfg.lora).resolve()))
        lora_sha = file_sha256(lora_file)
    dataset = open_dataset(cfg.data, split=cfg.split, num_images=cfg.num_images,
                           resolution=cfg.resolution, seed=0)
    for i in range(len(dataset)):  # every pair once: a bad label fails now, naming its file
        dataset[i]
    unet = load_unet_skeleton(cfg.model, cfg.model_seed)
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        raise ValueError(f"--model {cfg.model}: ControlNet training supports SD-1.x/2.x-shaped models, not SDXL")
    identity = {k: v for k, v in to_dict(cfg).items() if k in CONTROLNET_IDENTITY} | {"lora_sha256": lora_sha}
    started = time.perf_counter()
    result, run = run_training_job(cfg, identity, controlnet_worker, {"cfg": cfg}, "calora_ray ControlNet training")
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        for name in CONTROLNET_FILES:
            shutil.copyfile(ckpt / name, output / f".{name}.tmp")
            (output / f".{name}.tmp").replace(output / name)
    history = state["history"]
    write_loss_files(output, history, f"ControlNet on {cfg.model}" + (" + LoRA" if cfg.lora else "")
                     + f", data {cfg.data}")
    atomic_write_text(output / "controlnet.json", json.dumps({
        "controlnet": CONTROLNET_FILES[1],
        "controlnet_sha256": file_sha256(output / CONTROLNET_FILES[1]),
        "conditioning": "Cityscapes palette colours of the train-id label map (calora_ray.data.labels.colorize), "
                        "values / 255, at the label's size",
        "model": cfg.model,
        "lora": cfg.lora,
        "lora_sha256": lora_sha,
        "steps": state["step"],
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "num_images": len(dataset),
        "final_loss": history[-1]["loss"],
        "run": run,
        "elapsed_s": round(time.perf_counter() - started, 3),
        "calora_ray_version": __version__,
        "config": to_dict(cfg),
    }, indent=2, default=str) + "\n")
    return output
