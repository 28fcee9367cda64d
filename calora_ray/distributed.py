"""Ray for the jobs: connect to the cluster, size the workers, check the run storage, run a plain
per-worker function on a Ray Train TorchTrainer, and the worker-side calls (report a checkpoint,
fetch the latest one, the device, the threads). Nothing here knows about CA-LoRA.

The per-worker functions (calora_ray.ray_train) call the same plain code as the single-process
path; they learn their rank from torch.distributed (calora_ray.collectives) and hand checkpoints to
Ray through `ray_report`. Distribution is configuration (config.DistributedConfig).
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs
import torch

from .errors import UserError


class ClusterResourceError(UserError, RuntimeError):
    """The cluster cannot host the requested workers (checked before training, with a bounded wait)."""


class StoragePathError(UserError, PermissionError):
    """--storage-path cannot hold the run state (checked before training)."""


# ----------------------------------------------------------------------------- inside a worker


def ray_report(metrics: dict, checkpoint_dir: str | Path | None = None) -> None:
    """ray.train.report from every worker (a barrier); only rank 0 passes a checkpoint directory."""
    import ray.train  # delayed: importing Ray takes seconds, bad input fails before

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


@contextmanager
def ray_latest_checkpoint():
    """The latest checkpoint of this run as a local directory (for local storage the checkpoint
    itself, else a download removed afterwards), or None; read-only, for the `with` block."""
    import ray.train  # delayed: importing Ray takes seconds, bad input fails before

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def worker_device() -> torch.device:
    import ray.train.torch  # delayed: importing Ray takes seconds, bad input fails before

    return ray.train.torch.get_device()


def set_worker_threads() -> None:
    """Use the CPUs Ray reserved for this worker (Ray exports them as OMP_NUM_THREADS)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the driver side


def ensure_ray() -> None:
    """Connect to the cluster this job was submitted to (RAY_ADDRESS), or start a local one."""
    import ray  # delayed: importing Ray takes seconds, bad input fails before

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True,
                 logging_level="WARNING", configure_logging=True)


def check_storage_path(storage_path: str) -> str:
    """Fail early, naming the path, if the run state cannot be written there. Returns it normalised."""
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use it"
        raise StoragePathError(f"--storage-path {storage_path}: cannot write the run state there ({e})") from None
    return storage_path


def delete_run(storage_path: str, name: str) -> None:
    """Remove a run's state (its checkpoints) under storage_path/name, if there is any."""
    fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
    target = f"{path.rstrip('/')}/{name}"
    if fs.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(target)


def resolve_resources(num_workers: int, use_gpu: str, cpus_per_worker: int | None,
                      wait_s: float) -> tuple[bool, int]:
    """(use GPUs?, CPUs per worker) that this cluster can host; waits at most `wait_s` for them.

    use_gpu 'auto' takes GPUs when the cluster has one per worker. cpus_per_worker None shares the
    cluster's CPUs between the workers (so one worker on a laptop uses every core, like the plain
    single-process path does).
    """
    import ray  # delayed: importing Ray takes seconds, bad input fails before

    deadline = time.monotonic() + wait_s
    while True:
        total = ray.cluster_resources()
        cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
        gpu = gpus >= num_workers if use_gpu == "auto" else use_gpu == "true"
        per_worker = cpus_per_worker or max(1, cpus // num_workers)
        missing = []
        if gpu and gpus < num_workers:
            missing.append(f"{num_workers} GPU(s) (one per worker); the cluster has {gpus}")
        if per_worker * num_workers > cpus:
            missing.append(f"{per_worker * num_workers} CPU(s) ({num_workers} workers x {per_worker}); "
                           f"the cluster has {cpus}")
        if not missing:
            return gpu, per_worker
        if time.monotonic() >= deadline:
            raise ClusterResourceError(
                f"--num-workers {num_workers} --use-gpu {use_gpu} needs " + " and ".join(missing)
                + f" (waited {wait_s:g} s for the autoscaler; lower --num-workers, use --use-gpu false, "
                  f"or raise --resource-wait-s)")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def run_trainer(worker_fn: Callable[[dict], None], worker_config: dict[str, Any], *, name: str,
                storage_path: str, num_workers: int, use_gpu: str = "auto", cpus_per_worker: int | None = None,
                max_failures: int = 0, resource_wait_s: float = 60.0, num_to_keep: int | None = 2):
    """Run `worker_fn(worker_config)` on `num_workers` Ray Train workers; returns the ray Result.

    Resume is Ray's: a run with the same `name` and `storage_path` restores its checkpoint
    manager, and `ray.train.get_checkpoint()` in the workers returns the latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # delayed: Ray takes seconds
    from ray.train.torch import TorchTrainer  # delayed: importing Ray takes seconds

    ensure_ray()
    gpu, per_worker = resolve_resources(num_workers, use_gpu, cpus_per_worker, resource_wait_s)
    resources = {"CPU": per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={**worker_config, "cpus_per_worker": per_worker},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep)),
    )
    return trainer.fit()
