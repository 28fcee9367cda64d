"""The Ray Train side of the three Train jobs: jobs/score.py, jobs/finetune.py and
jobs/train_controlnet.py run their plain code (calora_ray.scoring, calora_ray.training) in the
workers of a TorchTrainer (calora_ray.distributed.run_trainer).

- `score_worker` / `run_scoring`: every worker scores its whole batches of samples, the sums are
  all-reduced, rank 0 hands the report back through a checkpoint.
- `run_worker` (the body of both training workers) / `run_training_job` (the driver's run
  directory, checkpoint storage and trainer): `finetune_worker` + `run_finetune` and
  `controlnet_worker` + `run_train_controlnet` are the two jobs on them. The output directory is
  also the run directory: the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from .cli import quiet_libraries
from .collectives import rank_and_world
from .config import ControlNetConfig, FinetuneConfig, ScoreConfig
from .distributed import (check_storage_path, delete_run, ray_latest_checkpoint, ray_report, run_trainer,
                          set_worker_threads, worker_device)
from .lora import LORA_WEIGHT_NAME
from .models import Components, load_components, resolve_dtype
from .outputs import prepare_run_dir, run_identity, write_json
from .scoring import (build_report, check_score_inputs, prepare_scoring, score_samples, shard_indices,
                      write_score_outputs)
from .training import (STATE_FILE, TrainingTask, check_controlnet_inputs, check_finetune_inputs, controlnet_task,
                       load_state, lora_task, train, training_data, write_controlnet_outputs, write_finetune_outputs)

# ----------------------------------------------------------------------------- scoring


def score_worker(config: dict) -> None:
    """One Ray Train worker: score its shard, all-reduce the sums; rank 0 reports the report."""
    cfg: ScoreConfig = config["cfg"]
    set_worker_threads()
    rank, world = rank_and_world()
    device = worker_device()
    components, candidates, concept, dataset = prepare_scoring(cfg, device)
    started = time.perf_counter()
    sums = score_samples(components, candidates, concept, shard_indices(cfg.num_samples, cfg.batch_size, rank, world),
                         timestep=cfg.timestep, seed=cfg.seed, x0=cfg.x0, resolution=cfg.resolution,
                         x0_steps=cfg.x0_steps, x0_guidance=cfg.x0_guidance, batch_size=cfg.batch_size,
                         dataset=dataset, augmented_per_sample=cfg.augmented_per_sample, progress=rank == 0)
    sums = sums.all_reduce(device)
    report = build_report(cfg, components, concept, candidates, sums, time.perf_counter() - started, world)
    report["device"] = str(device)
    # Ray hands results back through checkpoints (stored under the run's storage path).
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            write_json(Path(tmp) / "sensitivity.json", report)
        ray_report({"num_pairs": sums.count}, tmp if rank == 0 else None)


def run_scoring(cfg: ScoreConfig) -> Path:
    """jobs/score.py: validate inputs, score on Ray Train workers, write sensitivity.json + .png.

    Cheap inputs (concept, output, data, storage) are checked before Ray starts, and the output
    directory appears only once complete. Returns the output directory.
    """
    check_score_inputs(cfg)
    with tempfile.TemporaryDirectory(prefix="calora-score-") as scratch:
        storage = check_storage_path(cfg.storage_path or scratch)
        result = run_trainer(score_worker, {"cfg": cfg}, name=f"score-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                             cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                             resource_wait_s=cfg.resource_wait_s, num_to_keep=None,
                             address=cfg.address, ray_connect_timeout_s=cfg.ray_connect_timeout_s,
                             verbose=cfg.verbose)
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as d:
            report = json.loads((Path(d) / "sensitivity.json").read_text())
    write_score_outputs(cfg, report)
    return Path(cfg.output)


# ----------------------------------------------------------------------------- training


def run_worker(cfg, build_task: Callable[[Components], TrainingTask]) -> None:
    """The body of every Ray Train training worker: load the model on this worker's device, build
    the task, open the data, and run the shared `train` loop from the latest checkpoint."""
    quiet_libraries()
    set_worker_threads()
    device = worker_device()
    components = load_components(cfg.model, cfg.model_seed)
    components.to(device, resolve_dtype(cfg.mixed_precision, device))
    task = build_task(components)
    dataset = training_data(cfg)
    with ray_latest_checkpoint() as resume_from:
        train(task, dataset, cfg, device=device, mixed_precision=cfg.mixed_precision,
              resume_from=resume_from, report=ray_report, log_dir=Path(cfg.output) / "logs")


def run_training_job(cfg, identity: dict, worker_fn, worker_config: dict, what: str):
    """The Ray Train part of a training job's driver (fine-tuning, ControlNet): the run directory
    (cfg.output; resume if `identity` matches), the checkpoint storage, the trainer. Returns
    (the ray Result, the run's storage URI); raises what the workers raised."""
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
                         resource_wait_s=cfg.resource_wait_s,
                         address=cfg.address, ray_connect_timeout_s=cfg.ray_connect_timeout_s,
                         verbose=cfg.verbose)
    if result.error is not None:
        raise result.error
    return result, f"{storage.rstrip('/')}/{name}"


def finetune_worker(config: dict) -> None:
    """One Ray Train worker of jobs/finetune.py: the same `train` as the single-process path."""
    cfg: FinetuneConfig = config["cfg"]
    run_worker(cfg, lambda components: lora_task(
        components, config["modules"], cfg.rank, cfg.lora_alpha, caption=cfg.caption,
        caption_with_classes=cfg.caption_with_classes, seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing))


def run_finetune(cfg: FinetuneConfig) -> Path:
    """jobs/finetune.py: check inputs, train on Ray Train workers, write the adapter and reports.

    The selection, data, model and storage are checked before Ray starts, so bad input leaves
    nothing behind. The output directory is also the run directory: running the same command
    again resumes from the latest checkpoint.
    """
    cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).expanduser().resolve()))
    modules, num_candidates, num_images = check_finetune_inputs(cfg)
    started = time.perf_counter()
    result, run = run_training_job(cfg, run_identity(cfg, modules=modules), finetune_worker,
                                   {"cfg": cfg, "modules": modules}, "calora_ray fine-tuning")
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        write_finetune_outputs(cfg, ckpt / LORA_WEIGHT_NAME, load_state(ckpt / STATE_FILE), modules, num_candidates,
                               num_images, run=run, elapsed=time.perf_counter() - started)
    return Path(cfg.output)


def controlnet_worker(config: dict) -> None:
    """One Ray Train worker of jobs/train_controlnet.py: the same `train` loop as fine-tuning."""
    cfg: ControlNetConfig = config["cfg"]
    run_worker(cfg, lambda components: controlnet_task(
        components, lora=cfg.lora, caption=cfg.caption, caption_with_classes=cfg.caption_with_classes,
        seed=cfg.seed, timesteps=cfg.timesteps, proportion_empty_prompts=cfg.proportion_empty_prompts,
        gradient_checkpointing=cfg.gradient_checkpointing, control_palette=cfg.control_palette))


def run_train_controlnet(cfg: ControlNetConfig) -> Path:
    """jobs/train_controlnet.py: check inputs, train the ControlNet on Ray Train workers (checkpoints,
    resume: as fine-tuning), then write it in the diffusers format + controlnet.json + loss files."""
    cfg = dataclasses.replace(cfg, output=str(Path(cfg.output).expanduser().resolve()))
    cfg, lora_sha, num_images = check_controlnet_inputs(cfg)
    started = time.perf_counter()
    result, run = run_training_job(cfg, run_identity(cfg, lora_sha256=lora_sha), controlnet_worker, {"cfg": cfg},
                                   "calora_ray ControlNet training")
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        write_controlnet_outputs(cfg, ckpt, load_state(ckpt / STATE_FILE), lora_sha, num_images, run=run,
                                 elapsed=time.perf_counter() - started)
    return Path(cfg.output)
