"""jobs/evaluate.py on Ray: one Ray task per (training set, seed), each training one mmseg run.

- `trial_resources`: CPUs and GPUs per run that the cluster can host (a GPU each when it has GPUs,
  `--num-gpus-per-trial`; `--cpus-per-trial`), waiting a bounded time for an autoscaler.
- `run_evaluate`: the driver — check every input (evaluation.check_inputs: nothing is written
  before), start or resume the output (outputs.prepare_run's rule), skip the runs whose metrics
  are complete, run the others as Ray tasks (as many at once as the resources allow; a laptop's
  local Ray runs them one after another with the same command), write each run's metrics.json as
  it finishes (a line with mIoU and the ETA), then metrics.json, report.md and per_class_iou.png.

Each task runs in a fresh worker process (max_calls=1: mmengine keeps global state per process)
and prints mmengine's own log lines (iteration, loss, its ETA), which Ray forwards to the driver.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import ray  # this module is the Ray adapter of the evaluate job: it always needs Ray
import torch

from .config import EvaluateConfig
from .distributed import ClusterResourceError, cpus_per_gpu, ensure_ray
from .errors import UserError, UserValueError
from .evaluation import RunSpec, check_inputs, plan_runs, run_complete, train_run, write_report, write_run_metrics
from .outputs import for_workers, prepare_run, run_identity


def trial_resources(num_gpus_per_trial: float | None, cpus_per_trial: int | None,
                    wait_s: float = 60.0) -> tuple[float, int]:
    """(GPUs, CPUs) per run. Default: 1 GPU when the cluster has GPUs, else none; CPUs: the GPU nodes'
    CPUs per GPU (distributed.cpus_per_gpu) with GPUs, else every CPU (the runs then go one after another, each using all cores).
    Waits at most `wait_s` for the cluster to offer one run's worth, then fails naming the flags."""
    deadline = time.monotonic() + wait_s
    while True:
        total = ray.cluster_resources()
        cpus, gpus = int(total.get("CPU", 0)), float(total.get("GPU", 0))
        num_gpus = (1.0 if gpus >= 1 else 0.0) if num_gpus_per_trial is None else float(num_gpus_per_trial)
        num_cpus = cpus_per_trial or (cpus_per_gpu(ray.nodes()) if num_gpus and gpus else max(1, cpus))
        if num_gpus <= gpus and num_cpus <= cpus:
            return num_gpus, num_cpus
        if time.monotonic() >= deadline:
            raise ClusterResourceError(
                f"one run needs {num_gpus:g} GPU(s) and {num_cpus} CPU(s) (--num-gpus-per-trial, --cpus-per-trial); "
                f"the cluster has {gpus:g} GPU(s) and {cpus} CPU(s) (waited {wait_s:g} s; raise --resource-wait-s "
                f"for an autoscaler)")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def train_task(cfg: EvaluateConfig, run: RunSpec, threads: int) -> dict:
    """Inside the Ray task: the CPUs Ray reserved as torch threads, then one mmseg run."""
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return train_run(cfg, run)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict:
    """jobs/evaluate.py. Returns {"summary": per-set rows, "metrics", "report", "plot", "runs",
    "trained_now", "skipped", "elapsed_s"}. Running it again skips the runs whose metrics are complete."""
    checked = check_inputs(cfg)  # every user error, before anything is written
    runs = plan_runs(cfg)
    identity = run_identity(cfg, iters=checked["iters"], batch_size=checked["batch_size"],
                            model_config_file=checked["model_config_file"])
    prepare_run(cfg.output, identity, cfg.overwrite, "evaluate")
    records = {run.key: rec for run in runs if (rec := run_complete(run, checked["iters"])) is not None}
    for run in runs:
        if run.key in records and records[run.key]["synthetic"] != run.synthetic:
            raise UserValueError(f"--synthetic {run.synthetic}: {run.work_dir} holds a run of "
                                 f"{records[run.key]['synthetic']} (the same last path part); choose another --output")
    pending = [run for run in runs if run.key not in records]
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    say(f"evaluate: {len(runs)} run(s) ({len(runs) // cfg.seeds} set(s) x {cfg.seeds} seed(s)), "
        f"{len(records)} complete already, {len(pending)} to train, {checked['iters']} iterations each")

    started = time.perf_counter()
    failures: dict[str, BaseException] = {}
    if pending:
        ensure_ray(cfg.address, cfg.ray_connect_timeout_s, verbose=cfg.verbose)
        num_gpus, num_cpus = trial_resources(cfg.num_gpus_per_trial, cfg.cpus_per_trial, cfg.resource_wait_s)
        total = ray.cluster_resources()
        slots = max(1, min(len(pending), int(total.get("CPU", 1) // num_cpus),
                           int(total.get("GPU", 0) // num_gpus) if num_gpus else len(pending)))
        say(f"evaluate: each run is a Ray task with {num_cpus} CPU(s) and {num_gpus:g} GPU(s); {slots} at a time")
        task = ray.remote(max_calls=1, max_retries=0)(train_task).options(num_cpus=num_cpus, num_gpus=num_gpus)
        # the tasks run in their node's directory: local paths made absolute against the driver's
        worker_cfg = for_workers(cfg, ("output",), ("real", "val", "model_config", "synthetic"))
        local = dict(zip(cfg.synthetic, worker_cfg.synthetic))
        waiting = {task.remote(worker_cfg, dataclasses.replace(run, synthetic=local.get(run.synthetic)), num_cpus): run
                   for run in pending}
        done = 0
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            run = waiting.pop(ready[0])
            done += 1
            # the runs go `slots` at a time: the time per wave so far, times the waves left
            per_wave = (time.perf_counter() - started) / math.ceil(done / slots)
            eta = per_wave * math.ceil((len(pending) - done) / slots)
            try:
                record = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - reported after the other runs finish
                failures[run.key] = e
                say(f"[{done}/{len(pending)}] {run.key}: FAILED ({type(e).__name__}); ETA {_duration(eta)}")
                continue
            record["synthetic"] = run.synthetic  # as the user gave it (the rerun check compares it)
            write_run_metrics(record)
            records[run.key] = record
            say(f"[{done}/{len(pending)}] {run.key}: mIoU {record['mIoU']:.2f} in {_duration(record['wall_time_s'])}; "
                f"ETA {_duration(eta)}" if waiting else
                f"[{done}/{len(pending)}] {run.key}: mIoU {record['mIoU']:.2f} in {_duration(record['wall_time_s'])}")
    if failures:
        first_key = min(failures)
        cause = failures[first_key]
        original = getattr(cause, "cause", None) or cause  # a RayTaskError carries the task's exception
        if isinstance(original, UserError):
            raise original
        raise RuntimeError(f"{len(failures)} run(s) failed ({', '.join(sorted(failures))}); the others are complete, "
                           f"so running the same command again trains only these. {first_key}:\n{cause}")
    outputs = write_report(cfg, checked, [records[run.key] for run in runs])
    return {**outputs, "runs": len(runs), "trained_now": len(pending), "skipped": len(runs) - len(pending),
            "elapsed_s": time.perf_counter() - started}
