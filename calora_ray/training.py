"""One training loop for every fine-tuning (LoRA here; the segmentation ControlNet reuses it), and
the step/log/checkpoint core the toy model's pretraining (toyworld.pretrain) runs on too.

- `TrainingTask`: what is trained — the trainable parameters, the loss of a batch, and how to
  save them. `lora_task` builds the CA-LoRA one, `controlnet_task` the segmentation ControlNet.
- `train`: the loop (plain torch). Sharded data, gradient accumulation, an all-reduce of the
  trainable gradients only, mixed precision on CUDA, a learning-rate schedule, checkpoints, logs,
  validation. In a single process it is an ordinary function; under Ray Train
  (calora_ray.ray_train) the same function runs in every worker and hands its checkpoints to `report`.
- The core every loop shares: `Progress` (where a run stands; part of each checkpoint) and
  `StepLoop` (the budget in steps or minutes, timing, the loss rows, the log line, when to
  checkpoint); `log`, the one logger; `write_loss_files`, the one loss.csv / loss.png writer;
  `save_state` / `load_state`, checkpoint state as safetensors + JSON (never pickle), loaded
  without running code.
- The plain halves of the fine-tuning and ControlNet jobs: their input checks before any training
  (`check_finetune_inputs`, `check_controlnet_inputs`) and their outputs (`write_finetune_outputs`,
  `write_controlnet_outputs`). calora_ray.ray_train runs the jobs on Ray Train.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .collectives import all_reduce_gradients, all_reduce_sum, rank_and_world
from .concepts import join_class_names
from .config import ControlNetConfig, DataConfig, FinetuneConfig, TrainingConfig, to_dict
from .controlnet import (CONTROLNET_FILES, RECORD_NAME, conditioning_channels, control_tensor, controlnet_sha256,
                         save_controlnet)
from .data.labels import class_names_present
from .datasets import open_dataset
from .errors import UserError
from .losses import diffusion_loss, diffusion_target, noisy_latents, sample_timesteps
from .lora import (LORA_WEIGHT_NAME, attach_lora, check_modules, file_sha256, load_lora, lora_file, read_selection,
                   save_lora)
from .models import Components, encode_images, encode_prompts, load_unet_skeleton
from .outputs import atomic_write_text
from .plots import image_grid, plot_loss
from .sampling import sample_images
from .sensitivity import find_candidates

STATE_FILE = "training_state.safetensors"


class TrainingStateError(UserError, ValueError):
    """A checkpoint's state file that is not a plain training state (or cannot be read)."""


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


def empty_prompt_conditioning(components: Components, height: int, width: int) -> dict:
    """The UNet conditioning an SDXL pipeline's classifier-free guidance gives its unconditional
    branch: all-zero text embeddings and pooled embedding (StableDiffusionXL*Pipeline's
    force_zeros_for_empty_prompt, on in SDXL's model_index.json), with the same size
    micro-conditioning as the prompt. (SD-1.x/2.x encode the empty prompt instead: encode_prompts.)"""
    if not components.is_sdxl:
        raise ValueError(f"empty_prompt_conditioning is SDXL's; {components.name} encodes the empty prompt")
    cond = encode_prompts(components, [""], height, width)
    added = cond["added_cond_kwargs"]
    return {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
            "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]}}


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
                    proportion_empty_prompts: float = 0.0, gradient_checkpointing: bool = False,
                    control_palette: str = "cityscapes") -> TrainingTask:
    """A segmentation ControlNet, initialised from the base UNet (diffusers' ControlNetModel.from_unet),
    trained with L_diff to steer the frozen UNet — with the CA-LoRA adapter `lora` applied — from
    the colour-coded label map (calora_ray.controlnet.control_tensor: the `control_palette` colours,
    'cityscapes' or 'ade20k', at the label's own size: never interpolated).
    timesteps: "cubic" (default) draws most training steps at high noise, where the layout of a
    sample is decided; "uniform" as in the original ControlNet recipe (losses.sample_timesteps).
    proportion_empty_prompts: train this share of the pairs with the empty prompt (the ControlNet
    paper uses 0.5): the mask is then the only clue, and classifier-free guidance's unconditional
    branch, which also runs the ControlNet, sees what it was trained on (for SDXL that branch is
    all-zero text conditioning: `empty_prompt_conditioning`).
    SDXL-shaped models: the ControlNet gets the UNet's added conditions too (pooled text embedding
    and the size micro-conditioning original = target = the training resolution, crop (0, 0);
    models.encode_prompts), as diffusers' examples/controlnet/train_controlnet_sdxl.py trains it and
    StableDiffusionXLControlNetPipeline calls it.
    """
    unet = components.unet
    torch.manual_seed(seed)  # the zero convolutions are zero; the conditioning embedding draws from here
    # From the base UNet, before the adapter: the ControlNet copies plain encoder weights.
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels(components.vae_scale_factor))
    controlnet.to(device=unet.device, dtype=torch.float32)
    if lora is not None:
        load_lora(components, lora)  # patches the shared UNet in place
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
            cache[p] = (empty_prompt_conditioning(components, size, size) if p == "" and components.is_sdxl
                        else encode_prompts(components, [p], size, size))
        cond = _stack_cond([cache[p] for p in prompts])
        latents = encode_images(components, np.stack([it["image"] for it in items]), generator)
        control_image = control_tensor(labels, unet.device, control_palette)
        extra = {}
        if components.is_sdxl:  # pooled text + size micro-conditioning, exactly what the UNet gets
            extra["added_cond_kwargs"] = {k: v.float() for k, v in cond["added_cond_kwargs"].items()}

        def control(noisy, t):
            down, mid = controlnet(noisy.float(), t, encoder_hidden_states=cond["encoder_hidden_states"].float(),
                                   controlnet_cond=control_image, return_dict=False, **extra)
            return {"down_block_additional_residuals": [d.to(noisy.dtype) for d in down],
                    "mid_block_additional_residual": mid.to(noisy.dtype)}

        return diffusion_step_loss(components, latents, cond, generator, control, timesteps=timesteps)

    def state_dict():
        return {k: v.detach().cpu().clone() for k, v in controlnet.state_dict().items()}

    return TrainingTask(components=components, params=[p for p in controlnet.parameters() if p.requires_grad],
                        module=controlnet, compute_loss=compute_loss, state_dict=state_dict,
                        load_state_dict=controlnet.load_state_dict,
                        save_final=lambda d: save_controlnet(controlnet, d))


# ----------------------------------------------------------------------------- the core every loop shares


def log(message: str) -> None:
    """One line on stderr: the log of every training loop."""
    # Not print(): Ray Train patches print() in workers to also log it, and each line shows twice.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """All randomness of one step of one stream (a worker's rank, or a training phase): resuming
    at step N replays steps N+1... exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_003 + step) % (2**63))


@dataclass
class Progress:
    """Where a training run stands, saved in its checkpoints: optimizer steps taken, seconds spent
    training (summed over resumes), the loss rows logged so far and the losses since the last row."""

    step: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # rows {"step", "loss", "lr", "elapsed_s"}
    window: list[float] = field(default_factory=list)  # the loss of every step since the last row

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        """The progress fields of a checkpoint's state (older states have no elapsed_s / window)."""
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})

    def spent(self, max_steps: int | None, max_minutes: float | None = None) -> bool:
        return ((max_steps is not None and self.step >= max_steps)
                or (max_minutes is not None and self.elapsed_s >= max_minutes * 60))


class StepLoop:
    """The step/log/checkpoint core of every training loop (fine-tuning, ControlNet, both phases of
    the toy model's pretraining).

        loop = StepLoop("vae", progress, max_steps=..., log_every=..., images_per_step=...)
        for step in loop:                 # progress.step + 1, ... until the budget is spent
            loss, lr = ...                # one optimizer step
            row = loop.record(loss, lr)   # the new loss row, or None
            if loop.checkpoint_due(every_steps=...): ...

    The budget is `max_steps` and/or `max_minutes` of training time (summed over resumes). A row
    (the mean loss since the previous row) is appended to progress.history at the first step,
    every `log_every` steps and at the last one, and logged as one line unless `quiet`.
    """

    def __init__(self, name: str, progress: Progress, *, max_steps: int | None, max_minutes: float | None = None,
                 log_every: int, images_per_step: int, quiet: bool = False):
        self.name, self.progress, self.max_steps, self.max_minutes = name, progress, max_steps, max_minutes
        self.log_every, self.images_per_step, self.quiet = log_every, images_per_step, quiet
        self._start()

    def _start(self) -> None:
        self._started, self._base_s, self._first_step = time.perf_counter(), self.progress.elapsed_s, self.progress.step
        self._checkpoint_s = self.progress.elapsed_s

    def __iter__(self):
        self._start()
        while not self.done:
            yield self.progress.step + 1

    @property
    def done(self) -> bool:
        return self.progress.spent(self.max_steps, self.max_minutes)

    @property
    def steps_per_s(self) -> float:
        """Optimizer steps per second since this process started the loop."""
        seconds = self.progress.elapsed_s - self._base_s
        return (self.progress.step - self._first_step) / seconds if seconds > 0 else 0.0

    def eta_s(self) -> float:
        """Seconds until the budget is spent (the nearer of the step and the time budget)."""
        left = [math.inf]
        if self.max_steps is not None:
            rate = self.steps_per_s
            left.append((self.max_steps - self.progress.step) / rate if rate > 0 else math.nan)
        if self.max_minutes is not None:
            left.append(self.max_minutes * 60 - self.progress.elapsed_s)
        return min(left)

    def record(self, loss: float, lr: float) -> dict | None:
        """Count one optimizer step with its loss and learning rate; returns the loss row it logged, if any."""
        p = self.progress
        p.step += 1
        p.elapsed_s = self._base_s + time.perf_counter() - self._started
        p.window.append(loss)
        if not (p.step % self.log_every == 0 or p.step == 1 or self.done):
            return None
        row = {"step": p.step, "loss": sum(p.window) / len(p.window), "lr": lr, "elapsed_s": round(p.elapsed_s, 4)}
        p.history.append(row)
        p.window.clear()
        if not self.quiet:
            of = f"/{self.max_steps}" if self.max_steps is not None else ""
            log(f"{self.name + ' ' if self.name else ''}step {p.step}{of}  loss {row['loss']:.4f}  lr {lr:.2e}  "
                f"{self.steps_per_s * self.images_per_step:.1f} img/s  ETA {self.eta_s():.0f} s")
        return row

    def checkpoint_due(self, every_steps: int | None = None, every_minutes: float | None = None) -> bool:
        """After `record`: whether a checkpoint is due now — every `every_steps` steps, after
        `every_minutes` of training since the last one, and at the end of the budget."""
        p = self.progress
        due = (self.done or (every_steps is not None and p.step % every_steps == 0)
               or (every_minutes is not None and p.elapsed_s - self._checkpoint_s >= every_minutes * 60))
        if due:
            self._checkpoint_s = p.elapsed_s
        return due


STATE_KEY = "calora_ray.state"  # the safetensors header entry that holds a state's JSON
_TAGS = ("__tensor__", "__tuple__", "__items__")


def save_state(state: dict, path: Path) -> None:
    """Write a checkpoint's state into place atomically as one safetensors file: its tensors in the
    body, the rest — numbers, strings, None, lists, tuples and dicts of them — as JSON in the header
    (STATE_KEY), with {"__tensor__": name} where a tensor was. Anything else is a TypeError. No
    pickle: `load_state` reads it back without running code."""
    tensors: dict[str, torch.Tensor] = {}

    def key(where: str, k) -> str:  # the tensor's name: its path in the state, e.g. optimizer/state/0/exp_avg
        return f"{where}/{k}" if where else str(k)

    def encode(value, where: str):
        if isinstance(value, torch.Tensor):
            tensors[where] = value.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": where}
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in value):
                return {k: encode(v, key(where, k)) for k, v in value.items()}
            return {"__items__": [[k, encode(v, key(where, k))] for k, v in value.items()]}  # e.g. int keys
        if isinstance(value, (list, tuple)):
            items = [encode(v, key(where, i)) for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{where}: a {type(value).__name__} cannot be part of a training state")

    structure = json.dumps(encode(state, ""))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={STATE_KEY: structure})
    tmp.replace(path)


def load_state(path: Path) -> dict:
    """A state written by `save_state`, loaded without running code.

    State files live under --storage-path or the output, maybe a shared bucket, so they are input:
    a safetensors body and a JSON header cannot run code, and anything else (a pickle, say, which
    could run code on every worker that resumes) is refused with a TrainingStateError naming the
    file. So is the pickle `.pt` state of older versions beside it.
    """
    path = Path(path)
    if not path.is_file():
        legacy = path.with_suffix(".pt")
        if legacy.is_file():
            raise TrainingStateError(
                f"{legacy}: a training state in the pickle format of older calora_ray versions, which is not "
                f"loaded any more (loading a pickle can run code); pass --overwrite to start the run over")
        raise TrainingStateError(f"{path}: no training state there")

    try:
        with safe_open(str(path), "pt") as f:
            structure = json.loads((f.metadata() or {})[STATE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}

        def decode(value):
            if isinstance(value, list):
                return [decode(v) for v in value]
            if not isinstance(value, dict):
                return value
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            if "__tuple__" in value:
                return tuple(decode(v) for v in value["__tuple__"])
            if "__items__" in value:
                return {k: decode(v) for k, v in value["__items__"]}
            return {k: decode(v) for k, v in value.items()}

        state = decode(structure)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a dict")
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it is not a state to resume from
        raise TrainingStateError(
            f"{path}: not a calora_ray training state (a safetensors file with its JSON in the header; "
            f"{type(e).__name__}: {e}); delete it, or pass --overwrite to start the run over") from None
    return state


def write_loss_files(directory: Path, history: list[dict], title: str, **plot_kwargs) -> None:
    """loss.csv and loss.png (plots.plot_loss; `plot_kwargs` go to it) of a loss history, each
    written into place atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".loss.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "elapsed_s"])
        w.writeheader()
        w.writerows(history)
    (directory / ".loss.csv.tmp").replace(directory / "loss.csv")
    if history:
        plot_loss([h["step"] for h in history], [h["loss"] for h in history], directory / ".loss.tmp.png",
                  title=title, **plot_kwargs)
        (directory / ".loss.tmp.png").replace(directory / "loss.png")


# ----------------------------------------------------------------------------- the loop


def save_checkpoint(directory: Path, task: TrainingTask, optimizer, lr_scheduler, progress: Progress,
                    seed: int) -> None:
    """Trainable weights + optimizer + schedule + progress (step, time, loss rows) (+ the final
    artefact format, so any checkpoint directory also loads into a stock pipeline)."""
    save_state({**dataclasses.asdict(progress), "weights": task.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                # every draw of step s on rank r comes from step_generator(seed, r, s): the seed is
                # the whole RNG state a resume needs.
                "rng": {"scheme": "step_generator(seed, rank, step)", "seed": seed}},
               directory / STATE_FILE)
    task.save_final(directory)


def load_checkpoint(directory: Path, task: TrainingTask, optimizer, lr_scheduler) -> Progress:
    """Restore what `save_checkpoint` wrote into the task, optimizer and schedule; returns the progress."""
    state = load_state(directory / STATE_FILE)
    task.load_state_dict(state["weights"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return Progress.from_state(state)


def train(task: TrainingTask, dataset, tc: TrainingConfig, *, device: torch.device,
          mixed_precision: str = "no", resume_from: Path | None = None,
          report: Callable[[dict, Path | None], None] | None = None, log_dir: Path | None = None,
          quiet: bool = False) -> list[dict]:
    """Train `task` for `tc.steps` optimizer steps; returns the loss history [{step, loss, lr, elapsed_s}].

    Each worker (rank r of W, from torch.distributed) draws batches from its shard
    dataset[r::W]; the trainable gradients are averaged across workers before every optimizer step.
    Every `checkpoint_every` steps and at the end, all workers call `report(metrics, dir)` (rank 0
    with a checkpoint directory, the others with None), as ray.train.report requires.
    """
    rank, world = rank_and_world()
    optimizer = torch.optim.AdamW(task.params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps,
                                 num_training_steps=tc.steps)
    progress = Progress()
    if resume_from is not None:
        progress = load_checkpoint(resume_from, task, optimizer, lr_scheduler)
        if rank == 0 and not quiet:
            log(f"resumed from step {progress.step} ({resume_from.name})")
    shard = list(range(rank, len(dataset), world)) or list(range(len(dataset)))
    use_amp = device.type == "cuda" and mixed_precision != "no"
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    writer = None
    if rank == 0 and tc.report_to == "tensorboard" and log_dir is not None:
        from tensorboardX import SummaryWriter  # delayed: optional, only for --report-to tensorboard

        writer = SummaryWriter(str(log_dir))
    images_per_step = tc.batch_size * tc.gradient_accumulation_steps * world
    loop = StepLoop("", progress, max_steps=tc.steps, log_every=tc.log_every, images_per_step=images_per_step,
                    quiet=quiet or rank != 0)
    task.module.train()
    for step in loop:
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
        row = loop.record(mean_loss, lr_scheduler.get_last_lr()[0])
        if row is not None and writer is not None:
            writer.add_scalar("train/loss", row["loss"], step)
            writer.add_scalar("train/lr", row["lr"], step)
            writer.add_scalar("train/images_per_s", loop.steps_per_s * images_per_step, step)
        if rank == 0 and log_dir is not None and tc.validation_every and step % tc.validation_every == 0:
            validate(task, tc, step, log_dir, writer)
        if report is not None and loop.checkpoint_due(every_steps=tc.checkpoint_every):
            with tempfile.TemporaryDirectory(prefix="calora-ckpt-") as tmp:
                if rank == 0:
                    save_checkpoint(Path(tmp), task, optimizer, lr_scheduler, progress, tc.seed)
                report({"step": step, "loss": mean_loss}, Path(tmp) if rank == 0 else None)
    task.module.eval()
    if writer is not None:
        writer.close()
    return progress.history


@torch.no_grad()
def validate(task: TrainingTask, tc: TrainingConfig, step: int, log_dir: Path, writer=None) -> Path:
    """Sample the validation prompts with the current weights; a labelled grid PNG under log_dir."""
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


# ----------------------------------------------------------------------------- the two jobs' plain halves


def training_data(cfg: DataConfig):
    """The (image, label) pairs a training job trains on (the same dataset on every worker)."""
    return open_dataset(cfg.data, split=cfg.split, num_images=cfg.num_images, resolution=cfg.resolution, seed=0)


def check_training_data(cfg: DataConfig) -> int:
    """Read every pair once, so a bad label fails before any training, naming its file; returns their number."""
    dataset = training_data(cfg)
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset)


def check_finetune_inputs(cfg: FinetuneConfig) -> tuple[list[str], int, int]:
    """jobs/finetune.py's inputs, checked before any training: the selection (against the model's
    candidate projections) and the data. Returns (modules to adapt, number of candidates, of images)."""
    selection = None if cfg.selection == "all" else read_selection(cfg.selection)
    num_images = check_training_data(cfg)
    candidates = find_candidates(load_unet_skeleton(cfg.model, cfg.model_seed))
    modules = list(candidates) if selection is None else selection
    check_modules(modules, candidates, f"--selection {cfg.selection}")
    return modules, len(candidates), num_images


def run_record(cfg, state: dict, num_images: int, run: str, elapsed: float) -> dict:
    """What finetune.json and controlnet.json both report of a finished training run."""
    return {"steps": state["step"], "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_workers": cfg.num_workers,
            "num_images": num_images, "final_loss": state["history"][-1]["loss"], "run": run,
            "elapsed_s": round(elapsed, 3), "calora_ray_version": __version__, "config": to_dict(cfg)}


def write_finetune_outputs(cfg: FinetuneConfig, weights: Path, state: dict, modules: list[str],
                           num_candidates: int, num_images: int, run: str, elapsed: float) -> None:
    """The adapter, loss.csv, loss.png and finetune.json, each written into place atomically."""
    output = Path(cfg.output)
    tmp = output / f".{LORA_WEIGHT_NAME}.tmp"
    shutil.copyfile(weights, tmp)
    tmp.replace(output / LORA_WEIGHT_NAME)
    history = state["history"]
    write_loss_files(output, history, f"LoRA on {len(modules)} projections of {cfg.model}, data {cfg.data}")
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
        **run_record(cfg, state, num_images, run, elapsed),
    }, indent=2, default=str) + "\n")


def check_controlnet_inputs(cfg: ControlNetConfig) -> tuple[ControlNetConfig, str | None, int]:
    """jobs/train_controlnet.py's inputs, checked before any training: the LoRA, the data and the
    model (SD-1.x/2.x- or SDXL-shaped: `controlnet_task` takes either). Returns (cfg with the LoRA's
    absolute path, its sha256 or None, the number of pairs)."""
    lora_sha = None
    if cfg.lora is not None:
        weights = lora_file(cfg.lora)
        cfg = dataclasses.replace(cfg, lora=str(weights.parent.resolve()))
        lora_sha = file_sha256(weights)
    num_images = check_training_data(cfg)
    load_unet_skeleton(cfg.model, cfg.model_seed)  # a --model that does not load fails here, naming it
    return cfg, lora_sha, num_images


def write_controlnet_outputs(cfg: ControlNetConfig, checkpoint: Path, state: dict, lora_sha: str | None,
                             num_images: int, run: str, elapsed: float) -> None:
    """The ControlNet directory's files (from the final checkpoint), loss.csv, loss.png and
    controlnet.json, each written into place atomically."""
    output = Path(cfg.output)
    for name in CONTROLNET_FILES:
        shutil.copyfile(checkpoint / name, output / f".{name}.tmp")
        (output / f".{name}.tmp").replace(output / name)
    history = state["history"]
    write_loss_files(output, history, f"ControlNet on {cfg.model}" + (" + LoRA" if cfg.lora else "")
                     + f", data {cfg.data}")
    atomic_write_text(output / RECORD_NAME, json.dumps({
        "controlnet": CONTROLNET_FILES[1],
        "controlnet_sha256": controlnet_sha256(output, "--output"),
        "control_palette": cfg.control_palette,  # what generate and serve check their --control-palette against
        "conditioning": f"{cfg.control_palette} palette colours of the train-id label map "
                        "(calora_ray.data.labels.colorize), values / 255, at the label's size",
        "model": cfg.model,
        "lora": cfg.lora,
        "lora_sha256": lora_sha,
        **run_record(cfg, state, num_images, run, elapsed),
    }, indent=2, default=str) + "\n")
